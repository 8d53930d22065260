/*
 * wasmesh.runtime._fastpath: the two wasm crossings of the hot path, in C.
 *
 * Each guest call and each host call crosses Python <-> wasmtime once. Through ctypes a
 * crossing costs 1-3 us of argument conversion and callback machinery; here it costs a
 * fraction of that. Nothing else lives here: every decision (deadlines, failures,
 * restrictions, what a host call does) stays in Python, in wasmesh/runtime/engine.py,
 * which falls back to its ctypes path when this module is missing or WASMESH_PURE_PYTHON=1.
 *
 * This file does not link against wasmtime. engine.py hands over the addresses of the two
 * C functions it needs (bind), taken from the shared library that the wasmtime package
 * loads, so the extension is always paired with that exact library.
 *
 *   call(ctx, func, vals, n, trap) -> int
 *       wasmtime_func_call_unchecked with the GIL released (the epoch ticker thread must
 *       run while a guest loops). Returns the wasmtime_error_t* address, 0 when none.
 *
 *   host_callback_address() -> int
 *       A wasmtime_func_unchecked_callback_t. Its env is a HostBinding tuple, built by
 *       engine.py and kept alive by the instance:
 *           (impl, kinds: bytes, result: int, inst, slow, on_failure)
 *       kinds has one byte per parameter: 'i' i32 (passed unsigned), 'I' i64 (signed),
 *       'f' f32, 'F' f64; result is 0 none, 1 i32, 2 i64, 3 f32, 4 f64. When
 *       inst.allowed_hostcalls is not None the call goes to slow(args_address), the
 *       Python trampoline that enforces restrictions. When impl raises, on_failure(exc)
 *       returns the wasm_trap_t* address to hand back to wasmtime.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <float.h>
#include <math.h>

typedef void *(*call_unchecked_fn)(void *ctx, void *func, void *vals, size_t n, void **trap);
typedef void *(*trap_new_fn)(const char *message, size_t len);

static call_unchecked_fn wasmtime_call_unchecked = NULL;
static trap_new_fn wasmtime_trap_new = NULL;
static PyObject *allowed_hostcalls_name = NULL; /* interned "allowed_hostcalls" */

#define VAL_RAW_SIZE 16 /* every wasmtime_val_raw_t slot is a v128 */
#define MAX_PARAMS 16   /* no Proxy-Wasm or WASI import takes more */

static PyObject *bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "bind(call_unchecked_address, trap_new_address)");
        return NULL;
    }
    void *call = PyLong_AsVoidPtr(args[0]);
    void *trap_new = PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (call == NULL || trap_new == NULL) {
        PyErr_SetString(PyExc_ValueError, "bind: NULL address");
        return NULL;
    }
    wasmtime_call_unchecked = (call_unchecked_fn)call;
    wasmtime_trap_new = (trap_new_fn)trap_new;
    Py_RETURN_NONE;
}

static PyObject *call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "call(ctx, func, vals, n, trap)");
        return NULL;
    }
    if (wasmtime_call_unchecked == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "wasmesh.runtime._fastpath is not bound");
        return NULL;
    }
    void *ctx = PyLong_AsVoidPtr(args[0]);
    void *func = PyLong_AsVoidPtr(args[1]);
    void *vals = PyLong_AsVoidPtr(args[2]);
    size_t n = PyLong_AsSize_t(args[3]);
    void **trap = (void **)PyLong_AsVoidPtr(args[4]);
    if (PyErr_Occurred()) return NULL;
    void *error;
    Py_BEGIN_ALLOW_THREADS
    error = wasmtime_call_unchecked(ctx, func, vals, n, trap);
    Py_END_ALLOW_THREADS
    if (error == NULL) return PyLong_FromLong(0);
    return PyLong_FromVoidPtr(error);
}

/* A trap for wasmtime when even the Python failure path failed: the guest must stop. */
static void *last_resort_trap(void) {
    static const char message[] = "wasmesh: host call failed and its failure could not be reported";
    PyErr_WriteUnraisable(NULL);
    return wasmtime_trap_new(message, sizeof(message) - 1);
}

/* The trap address returned by a Python callable (slow path or on_failure). */
static void *trap_from(PyObject *returned) {
    if (returned == NULL) return last_resort_trap();
    void *trap = PyLong_AsVoidPtr(returned);
    Py_DECREF(returned);
    if (trap == NULL && PyErr_Occurred()) return last_resort_trap();
    return trap;
}

static void *fail(PyObject *on_failure) {
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *type, *exc, *traceback;
    PyErr_Fetch(&type, &exc, &traceback);
    PyErr_NormalizeException(&type, &exc, &traceback);
    if (exc != NULL && traceback != NULL) PyException_SetTraceback(exc, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
#endif
    PyObject *returned = PyObject_CallOneArg(on_failure, exc ? exc : Py_None);
    Py_XDECREF(exc);
    return trap_from(returned);
}

static void *host_call(PyObject *binding, unsigned char *slots) {
    /* binding: (impl, kinds, result, inst, slow, on_failure), checked in make_binding */
    PyObject *impl = PyTuple_GET_ITEM(binding, 0);
    PyObject *kinds = PyTuple_GET_ITEM(binding, 1);
    long result_kind = PyLong_AsLong(PyTuple_GET_ITEM(binding, 2));
    PyObject *inst = PyTuple_GET_ITEM(binding, 3);
    PyObject *on_failure = PyTuple_GET_ITEM(binding, 5);

    PyObject *allowed = PyObject_GetAttr(inst, allowed_hostcalls_name);
    if (allowed == NULL) return fail(on_failure);
    int restricted = allowed != Py_None;
    Py_DECREF(allowed);
    if (restricted) {
        PyObject *address = PyLong_FromVoidPtr(slots);
        if (address == NULL) return fail(on_failure);
        PyObject *returned = PyObject_CallOneArg(PyTuple_GET_ITEM(binding, 4), address);
        Py_DECREF(address);
        return trap_from(returned);
    }

    Py_ssize_t nparams = PyBytes_GET_SIZE(kinds);
    const char *kind = PyBytes_AS_STRING(kinds);
    PyObject *argv[MAX_PARAMS];
    Py_ssize_t built = 0;
    for (; built < nparams; built++) {
        unsigned char *slot = slots + built * VAL_RAW_SIZE;
        PyObject *value;
        switch (kind[built]) {
        case 'i': {
            uint32_t v;
            memcpy(&v, slot, 4);
            value = PyLong_FromUnsignedLong(v);
            break;
        }
        case 'I': {
            int64_t v;
            memcpy(&v, slot, 8);
            value = PyLong_FromLongLong(v);
            break;
        }
        case 'f': {
            float v;
            memcpy(&v, slot, 4);
            value = PyFloat_FromDouble(v);
            break;
        }
        default: {
            double v;
            memcpy(&v, slot, 8);
            value = PyFloat_FromDouble(v);
            break;
        }
        }
        if (value == NULL) break;
        argv[built] = value;
    }
    PyObject *returned = NULL;
    if (built == nparams) returned = PyObject_Vectorcall(impl, argv, (size_t)nparams, NULL);
    for (Py_ssize_t k = 0; k < built; k++) Py_DECREF(argv[k]);
    if (returned == NULL) return fail(on_failure);

    /* A None result is 0, as in the Python trampoline ("impl(...) or 0"). */
    int ok = 1;
    switch (result_kind) {
    case 1: {
        uint32_t v = returned == Py_None ? 0 : (uint32_t)PyLong_AsUnsignedLongLongMask(returned);
        memcpy(slots, &v, 4);
        break;
    }
    case 2: {
        int64_t v = returned == Py_None ? 0 : PyLong_AsLongLong(returned);
        memcpy(slots, &v, 8);
        break;
    }
    case 3: {
        double d = returned == Py_None ? 0.0 : PyFloat_AsDouble(returned);
        if (isfinite(d) && (d > FLT_MAX || d < -FLT_MAX)) /* as struct.pack("f") refuses it */
            PyErr_SetString(PyExc_OverflowError, "float too large for an f32 result");
        float v = (float)d;
        memcpy(slots, &v, 4);
        break;
    }
    case 4: {
        double v = returned == Py_None ? 0.0 : PyFloat_AsDouble(returned);
        memcpy(slots, &v, 8);
        break;
    }
    default:
        break;
    }
    Py_DECREF(returned);
    if (PyErr_Occurred()) ok = 0;
    return ok ? NULL : fail(on_failure);
}

/* wasmtime_func_unchecked_callback_t */
static void *host_callback(void *env, void *caller, void *args_and_results, size_t len) {
    (void)caller;
    (void)len;
    PyGILState_STATE gil = PyGILState_Ensure();
    void *trap = host_call((PyObject *)env, (unsigned char *)args_and_results);
    PyGILState_Release(gil);
    return trap;
}

static PyObject *host_callback_address(PyObject *self, PyObject *unused) {
    return PyLong_FromVoidPtr((void *)host_callback);
}

/* Validates a HostBinding once, so host_call can use the unchecked tuple accessors. */
static PyObject *check_binding(PyObject *self, PyObject *binding) {
    if (!PyTuple_CheckExact(binding) || PyTuple_GET_SIZE(binding) != 6) {
        PyErr_SetString(PyExc_TypeError, "a HostBinding is (impl, kinds, result, inst, slow, on_failure)");
        return NULL;
    }
    PyObject *kinds = PyTuple_GET_ITEM(binding, 1);
    if (!PyBytes_CheckExact(kinds) || PyBytes_GET_SIZE(kinds) > MAX_PARAMS) {
        PyErr_SetString(PyExc_ValueError, "HostBinding kinds: bytes of at most 16 of i, I, f, F");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < PyBytes_GET_SIZE(kinds); k++) {
        if (!strchr("iIfF", PyBytes_AS_STRING(kinds)[k])) {
            PyErr_SetString(PyExc_ValueError, "HostBinding kinds: bytes of at most 16 of i, I, f, F");
            return NULL;
        }
    }
    long result = PyLong_AsLong(PyTuple_GET_ITEM(binding, 2));
    if (PyErr_Occurred()) return NULL;
    if (result < 0 || result > 4) {
        PyErr_SetString(PyExc_ValueError, "HostBinding result: 0 none, 1 i32, 2 i64, 3 f32, 4 f64");
        return NULL;
    }
    for (int k = 0; k < 6; k++) {
        if (k != 1 && k != 2 && k != 3 && !PyCallable_Check(PyTuple_GET_ITEM(binding, k))) {
            PyErr_Format(PyExc_TypeError, "HostBinding item %d must be callable", k);
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL, "bind(call_unchecked, trap_new)"},
    {"call", (PyCFunction)(void (*)(void))call, METH_FASTCALL, "call(ctx, func, vals, n, trap) -> error"},
    {"host_callback_address", host_callback_address, METH_NOARGS, "the C host callback's address"},
    {"check_binding", check_binding, METH_O, "validate a HostBinding tuple"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "wasmesh.runtime._fastpath",
    "The Python <-> wasmtime crossings of the hot path, in C (see _fastpath.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    allowed_hostcalls_name = PyUnicode_InternFromString("allowed_hostcalls");
    if (allowed_hostcalls_name == NULL) return NULL;
    return PyModule_Create(&module);
}
