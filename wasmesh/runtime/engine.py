"""The engine layer: the only module that touches wasmtime.

Hot paths use wasmtime's raw "unchecked" C entry points, which cost ~1–2 µs per
crossing instead of the ~10–25 µs of wasmtime-py's public call API:

* imports are defined with ``wasmtime_linker_define_func_unchecked``: one ctypes
  callback per imported function reads ``wasmtime_val_raw_t`` arguments directly;
* exports are called with ``wasmtime_func_call_unchecked`` through preallocated
  ``ValRaw`` arrays and cached function handles;
* both crossings have two implementations ("crossings"): the C extension
  ``wasmesh.runtime._fastpath`` (built at install when a C compiler is there), which
  costs a few hundred ns a crossing, and a pure-ctypes one through prototypes without
  ``argtypes`` and with every pointer argument prebuilt once per instance (~1–3 µs).
  ``WasmEngine(crossing=...)`` picks one; by default the C one when it is built and
  ``WASMESH_PURE_PYTHON`` is not ``1``. The runtime test suite runs against both;
* linear memory is reached through a base pointer taken once: the engine is built
  with ``memory_may_move = False``, so growth never relocates a memory and only the
  cached size needs refreshing, when an access falls beyond it.

Compiled modules are cached on disk (serialized by wasmtime, keyed by the module's
sha256, the wasmtime version and this engine's configuration), so a multi-MB Go
plugin starts in tens of milliseconds after its first compile.

CPU time per guest call is bounded with epoch interruption: a daemon thread bumps
the engine epoch once per ``epoch_tick_s`` of CPU time used by the threads that run
guests (``_EpochTicker``; at least once per ``WALL_CLOCK_BACKSTOP`` periods of
wall-clock time), and each outermost guest call runs under a
deadline armed in the current epoch period (re-armed only when the period changed,
which gives the same bound as arming every call). Memory is bounded per store with
``Store.set_limits``.

Host calls can be restricted (``WasmInstance.restrict``): while the allocator or a
module's initialisation runs, cpp-host lets the guest make only a few host calls, and
any other one fails the VM.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import math
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import wasmtime
from wasmtime import _bindings as raw

ValKind = Literal["i32", "i64", "f32", "f64"]

_MASK32 = 0xFFFFFFFF
WASM_MAGIC = b"\0asm"
WASM_PAGE = 65536

WASMTIME_VERSION = importlib.metadata.version("wasmtime")

# Anything in the engine configuration that changes generated code must be in this
# string: wasmtime refuses (or worse, misreads) images built under another config.
_ENGINE_CONFIG_ID = "epoch_interruption=1;cranelift_opt_level=speed;memory_may_move=0"

_FINALIZER_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_NO_FINALIZER = _FINALIZER_T()  # a NULL function pointer: nothing to finalize

# A second handle on wasmtime's shared library whose prototypes have no argtypes:
# the hot calls pass prebuilt ctypes objects, so ctypes converts nothing per call.
_LIB = ctypes.CDLL(raw.dll._name)  # type: ignore[attr-defined]
_call_unchecked = _LIB.wasmtime_func_call_unchecked
_call_unchecked.restype = ctypes.c_void_p  # wasmtime_error_t*, None when the call succeeded
_set_epoch_deadline = _LIB.wasmtime_context_set_epoch_deadline
_set_epoch_deadline.restype = None
_memory_data_size = _LIB.wasmtime_memory_data_size
_memory_data_size.restype = ctypes.c_size_t
_memory_data = _LIB.wasmtime_memory_data
_memory_data.restype = ctypes.c_void_p
_define_unchecked = _LIB.wasmtime_linker_define_func_unchecked
_define_unchecked.restype = ctypes.c_void_p

# The deadline entry point, for the one caller that writes GuestFunc.__call__ out in its own
# frame (wasmesh.runtime.plugin.WasmHttpFilter._call, once per stream callback).
set_epoch_deadline = _set_epoch_deadline

Crossing = Literal["c", "ctypes"]
PURE_PYTHON_ENV = "WASMESH_PURE_PYTHON"


def _load_fastpath() -> Any | None:
    """The C crossings bound to the wasmtime library loaded above, or None if not built."""
    try:
        from wasmesh.runtime import _fastpath
    except ImportError:
        return None
    def address(function: Any) -> int:
        return ctypes.cast(function, ctypes.c_void_p).value or 0

    _fastpath.bind(address(_LIB.wasmtime_func_call_unchecked), address(_LIB.wasm_trap_new))
    return _fastpath


_FASTPATH = _load_fastpath()


def available_crossings() -> tuple[Crossing, ...]:
    """The crossings this installation has: "ctypes" always, "c" when the extension was built."""
    return ("c", "ctypes") if _FASTPATH is not None else ("ctypes",)


def default_crossing() -> Crossing:
    if _FASTPATH is None or os.environ.get(PURE_PYTHON_ENV) == "1":
        return "ctypes"
    return "c"

# wasmtime_func_unchecked_callback_t with the ValRaw array as a plain address.
_HOST_CALLBACK_T = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
)
_VAL_RAW_SIZE = ctypes.sizeof(raw.wasmtime_val_raw_t)  # 16: every slot is a v128
# How one argument sits in its ValRaw slot (little-endian, low bytes first).
_SLOT_FORMAT: dict[str, str] = {"i32": "I12x", "i64": "q8x", "f32": "f12x", "f64": "d8x"}

# How the C crossing names parameter and result kinds (see _fastpath.c).
_KIND_CODE: dict[str, str] = {"i32": "i", "i64": "I", "f32": "f", "f64": "F"}
_RESULT_CODE: dict[str | None, int] = {None: 0, "i32": 1, "i64": 2, "f32": 3, "f64": 4}

_RESULT_PACK: dict[str, struct.Struct] = {
    kind: struct.Struct("<" + code) for kind, code in (("i32", "I"), ("i64", "q"), ("f32", "f"), ("f64", "d"))
}

_KIND_TO_VALTYPE: dict[str, Callable[[], wasmtime.ValType]] = {
    "i32": wasmtime.ValType.i32,
    "i64": wasmtime.ValType.i64,
    "f32": wasmtime.ValType.f32,
    "f64": wasmtime.ValType.f64,
}


COMPILE_CACHE_ENV = "WASMESH_COMPILE_CACHE"


def default_cache_dir() -> str:
    """Where compiled modules are cached: $WASMESH_COMPILE_CACHE, else ~/.cache/wasmesh/compiled."""
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "wasmesh", "compiled")
    return os.environ.get(COMPILE_CACHE_ENV) or home_cache


# --------------------------------------------------------------------------- errors


class WasmError(Exception):
    """Base of every engine-level failure."""


class ModuleLoadError(WasmError):
    """The bytes are not a usable module (not wasm, invalid, or cannot be linked/instantiated)."""


class GuestFailure(WasmError):
    """The guest trapped, ran past its CPU deadline or hit its memory cap.

    ``reason`` is one of "trap", "deadline", "memory_limit", "host_error".
    """

    def __init__(self, reason: str, message: str, function: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = message
        # The export the host called when this happened, as cpp-host logs it
        # ("Function: proxy_on_request_headers failed: ..."); None until the VM layer names it.
        self.function = function

    def name_function(self, function: str) -> None:
        """Name the export that failed; the innermost export the host called keeps its name."""
        if self.function is None:
            self.function = function

    def __str__(self) -> str:
        if self.function is None:
            return self.detail
        return f"Function: {self.function} failed: {self.detail}"


class ProcExit(WasmError):
    """The guest called WASI ``proc_exit``; ``code`` 0 during ``_start`` is success."""

    def __init__(self, code: int) -> None:
        super().__init__(f"proc_exit({code})")
        self.code = code


# --------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class FuncSig:
    params: tuple[ValKind, ...]
    results: tuple[ValKind, ...] = ()

    def functype(self) -> wasmtime.FuncType:
        return wasmtime.FuncType(
            [_KIND_TO_VALTYPE[k]() for k in self.params], [_KIND_TO_VALTYPE[k]() for k in self.results]
        )

    @staticmethod
    def of(ty: wasmtime.FuncType) -> FuncSig | None:
        """The signature of a wasmtime FuncType, or None if it uses non-numeric types."""
        kinds: list[list[ValKind]] = [[], []]
        for out, vals in ((kinds[0], ty.params), (kinds[1], ty.results)):
            for v in vals:
                name = str(v)
                if name not in _KIND_TO_VALTYPE:
                    return None
                out.append(name)  # type: ignore[arg-type]
        return FuncSig(tuple(kinds[0]), tuple(kinds[1]))


def sig(params: str = "", results: str = "") -> FuncSig:
    """Shorthand: ``sig("iiI", "i")`` — i = i32, I = i64."""
    conv: dict[str, ValKind] = {"i": "i32", "I": "i64", "f": "f32", "F": "f64"}
    return FuncSig(tuple(conv[c] for c in params), tuple(conv[c] for c in results))


HostImpl = Callable[..., int | None]


def traced_host_impl(where: str, impl: HostImpl, log: Callable[[str], None]) -> HostImpl:
    """``impl`` logging each call with its arguments and its result (cpp-host's trace lines)."""

    def traced(*args: Any) -> int | None:
        log(f"[vm->host] {where}({', '.join(map(str, args))})")
        try:
            result = impl(*args)
        except BaseException as exc:
            log(f"[vm<-host] {where} failed: {type(exc).__name__}: {exc}")
            raise
        log(f"[vm<-host] {where} return: {'void' if result is None else result}")
        return result

    return traced


@dataclass(frozen=True)
class HostFunc:
    """An import the host provides: i32 params arrive masked to u32, i64 params signed."""

    module: str
    name: str
    signature: FuncSig
    impl: HostImpl


# --------------------------------------------------------------------------- compile


@dataclass
class CompileStats:
    compiled: int = 0
    deserialized: int = 0
    memory_hits: int = 0


@dataclass
class CompiledModule:
    sha256: str
    module: wasmtime.Module
    imports: list[tuple[str, str, FuncSig | None]]
    exports: dict[str, FuncSig | None]  # None: not a function (memory, table, global) or exotic types
    from_disk_cache: bool = False


def _func_sig(ty: object) -> FuncSig | None:
    return FuncSig.of(ty) if isinstance(ty, wasmtime.FuncType) else None


def _first_line(text: str) -> str:
    """One line out of wasmtime's multi-line errors: the cause, and the innermost wasm frame."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    if "Caused by:" in lines:
        at = lines.index("Caused by:")
        cause = "; ".join(lines[at + 1:]) or lines[0]
        frames = [line for line in lines[:at] if line[:1].isdigit()]
        if frames:
            frame = frames[0].split(" - ", 1)[-1]
            return f"{cause} (in {frame})"
        return cause
    return lines[0]


class EpochClock:
    """The engine's epoch as Python sees it, for arming deadlines only when it moved.

    The ticker bumps ``now`` *before* the engine's epoch, so ``now`` is never behind
    it: a deadline armed while ``now`` had its current value still leaves at least
    ``ticks - 1`` full periods, which ``WasmEngine.deadline_ticks`` pads for.
    """

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0


# A guest whose thread is descheduled still fails after this many times its deadline in wall-clock
# time (the backstop when its thread's CPU clock is not read, e.g. a guest called from a thread the
# engine was never told about, or a platform without per-thread CPU clocks).
WALL_CLOCK_BACKSTOP = 10


def _thread_cpu_clock(ident: int) -> int | None:
    """The CPU-time clock of thread ``ident`` (Linux: pthread_getcpuclockid), None where unavailable."""
    getcpuclockid = getattr(time, "pthread_getcpuclockid", None)
    if getcpuclockid is None:
        return None
    try:
        return int(getcpuclockid(ident))
    except (OSError, OverflowError):
        return None


class _EpochTicker:
    """Advances an engine's epoch by the CPU time its guest threads use, from a daemon thread.

    Deadlines are CPU time, as documented: every ``period_s`` of wall-clock time the ticker reads the
    CPU clock of each thread that runs guests (``add_guest_thread``) and bumps the epoch once per
    ``period_s`` of CPU time the busiest of them used. A thread that waits for the CPU on a loaded
    machine uses none, so its guest is not failed early. As a backstop, the epoch also moves at least
    once every ``WALL_CLOCK_BACKSTOP`` periods of wall-clock time. Guest code runs inside calls that
    release the GIL, so this thread keeps reading while a guest loops forever.
    """

    def __init__(self, engine: wasmtime.Engine, clock: EpochClock, period_s: float) -> None:
        self._engine = engine
        self._clock = clock
        self._period_s = period_s
        self._lock = threading.Lock()
        self._threads: dict[int, tuple[int, float]] = {}  # ident -> (cpu clock id, CPU time last read)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wasmesh-epoch", daemon=True)
        self._thread.start()

    def add_guest_thread(self, ident: int) -> bool:
        """Count thread ``ident``'s CPU time from now on; False if its CPU clock cannot be read."""
        with self._lock:
            if ident in self._threads:
                return True
            cpu_clock = _thread_cpu_clock(ident)
            if cpu_clock is None:
                return False
            try:
                self._threads[ident] = (cpu_clock, time.clock_gettime(cpu_clock))
            except OSError:
                return False
            return True

    def _cpu_used(self) -> float:
        """The most CPU time any guest thread used since the last read (dead threads are dropped)."""
        used = 0.0
        with self._lock:
            for ident, (cpu_clock, last) in list(self._threads.items()):
                try:
                    now = time.clock_gettime(cpu_clock)
                except OSError:  # the thread ended
                    del self._threads[ident]
                    continue
                self._threads[ident] = (cpu_clock, now)
                used = max(used, now - last)
        return used

    def _run(self) -> None:
        cpu_credit = 0.0
        wall_credit = 0.0
        while not self._stop.wait(self._period_s):
            cpu_credit += self._cpu_used()
            wall_credit += 1
            ticks = int(cpu_credit / self._period_s)
            if ticks == 0 and wall_credit >= WALL_CLOCK_BACKSTOP:
                ticks = 1
            if ticks:
                cpu_credit -= ticks * self._period_s
                cpu_credit = max(cpu_credit, 0.0)
                wall_credit = 0
            for _ in range(ticks):
                self._clock.now += 1
                self._engine.increment_epoch()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class WasmEngine:
    """A wasmtime Engine with a compile cache (memory + disk) and an epoch ticker."""

    def __init__(
        self, cache_dir: str | None = None, epoch_tick_s: float = 0.05, crossing: Crossing | None = None
    ) -> None:
        if crossing is None:
            crossing = default_crossing()
        elif crossing not in available_crossings():
            raise ValueError(
                f"crossing {crossing!r} is not available here (have: {', '.join(available_crossings())});"
                " the C one is built by 'pip install' when a C compiler and Python headers are present"
            )
        self.crossing: Crossing = crossing
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.cranelift_opt_level = "speed"
        # Memories grow in place (32-bit memories fit the default 4 GiB reservation),
        # so an instance can keep one base pointer for its whole life.
        config.memory_may_move = False
        self.engine = wasmtime.Engine(config)
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.epoch_tick_s = epoch_tick_s
        self.stats = CompileStats()
        self._modules: dict[str, CompiledModule] = {}
        self._lock = threading.Lock()
        self.clock = EpochClock()
        self._ticker: _EpochTicker | None = _EpochTicker(self.engine, self.clock, epoch_tick_s)

    def add_guest_thread(self, ident: int | None = None) -> bool:
        """Measure deadlines in thread ``ident``'s CPU time (default: the calling thread); False where
        the platform has no per-thread CPU clock (deadlines are then wall-clock time x the backstop)."""
        ticker = self._ticker
        thread = threading.get_ident() if ident is None else ident
        return ticker is not None and ticker.add_guest_thread(thread)

    def deadline_ticks(self, deadline_ms: int) -> int:
        # +1: the current epoch period may be about to end (and a lazily armed
        # deadline may date from the start of the period, see EpochClock).
        return max(1, math.ceil(deadline_ms / 1000.0 / self.epoch_tick_s)) + 1

    def _cache_path(self, digest: str) -> str:
        flavour = hashlib.sha256(f"{WASMTIME_VERSION};{_ENGINE_CONFIG_ID}".encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, f"{digest}-{flavour}.cwasm")

    def compile(self, wasm: bytes, origin: str = "module") -> CompiledModule:
        """Compile (or fetch from cache) ``wasm``; raises ModuleLoadError naming ``origin``."""
        if not isinstance(wasm, bytes | bytearray) or not wasm[:4] == WASM_MAGIC:
            head = bytes(wasm[:8]) if isinstance(wasm, bytes | bytearray) else type(wasm).__name__
            raise ModuleLoadError(f"{origin}: not a WebAssembly module (starts with {head!r})")
        digest = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            cached = self._modules.get(digest)
            if cached is not None:
                self.stats.memory_hits += 1
                return cached
            module, from_disk = self._compile_uncached(bytes(wasm), digest, origin)
            compiled = CompiledModule(
                sha256=digest,
                module=module,
                imports=[
                    (imp.module, imp.name or "", _func_sig(imp.type)) for imp in module.imports
                ],
                exports={exp.name: _func_sig(exp.type) for exp in module.exports},
                from_disk_cache=from_disk,
            )
            self._modules[digest] = compiled
            return compiled

    def _compile_uncached(self, wasm: bytes, digest: str, origin: str) -> tuple[wasmtime.Module, bool]:
        path = self._cache_path(digest)
        if os.path.exists(path):
            try:
                module = wasmtime.Module.deserialize_file(self.engine, path)
                self.stats.deserialized += 1
                return module, True
            except wasmtime.WasmtimeError:
                pass  # stale or corrupt image: compile again and overwrite it
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise ModuleLoadError(f"{origin}: invalid WebAssembly module: {_first_line(str(exc))}") from None
        self.stats.compiled += 1
        self._store_in_cache(path, module)
        return module, False

    def _store_in_cache(self, path: str, module: wasmtime.Module) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".cwasm")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(module.serialize())
                os.replace(tmp, path)  # atomic: readers see the old image or the whole new one
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass  # a read-only or full cache directory only costs the next start a compile

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        self._modules.clear()


# --------------------------------------------------------------------------- instances


_VOID_P = ctypes.c_void_p
_TRAP_PTR = ctypes.POINTER(raw.wasm_trap_t)
_ERROR_PTR = ctypes.POINTER(raw.wasmtime_error_t)
_pack_u32 = struct.Struct("<I").pack_into
_pack_u64 = struct.Struct("<Q").pack_into
_unpack_u32 = struct.Struct("<I").unpack_from


class RestrictedHostCall(GuestFailure):
    """The guest made a host call that is not allowed at this point (cpp-host's restricted_callback)."""

    def __init__(self, message: str) -> None:
        super().__init__("restricted_callback", message)


class GuestFunc:
    """A guest export called through ``wasmtime_func_call_unchecked``."""

    __slots__ = (
        "name", "signature", "_inst", "_func", "_func_p", "_vals", "_vals_p", "_vals_view", "_n_c",
        "_pack_args", "_u32", "_i32", "_i64", "_result", "_call_raw", "_raw", "_returns_i32",
        "_result_i32",
    )  # fmt: skip

    def __init__(self, inst: WasmInstance, name: str, func: wasmtime.Func, signature: FuncSig) -> None:
        self.name = name
        self.signature = signature
        self._inst = inst
        self._func = func  # owns the wasmtime_func_t that _func_p points to
        self._func_p = _VOID_P(ctypes.addressof(func._func))
        slots = max(len(signature.params), len(signature.results), 1)
        self._vals = (raw.wasmtime_val_raw_t * slots)()
        self._vals_p = _VOID_P(ctypes.addressof(self._vals))
        self._n_c = ctypes.c_size_t(slots)
        self._vals_view = memoryview(self._vals).cast("B")
        # All arguments in one pack_into: each sits in the low bytes of its 16-byte slot.
        self._pack_args = struct.Struct("<" + "".join(_SLOT_FORMAT[k] for k in signature.params)).pack_into
        # Typed views over the same bytes: slot k's i32 is u32[4k], its i64 is i64[2k].
        self._u32 = (ctypes.c_uint32 * (4 * slots)).from_buffer(self._vals)
        self._i32 = (ctypes.c_int32 * (4 * slots)).from_buffer(self._vals)
        self._i64 = (ctypes.c_int64 * (2 * slots)).from_buffer(self._vals)
        self._result: ValKind | None = signature.results[0] if signature.results else None
        # The crossing, and everything wasmtime_func_call_unchecked takes in order: one tuple, no
        # attribute loads per call (ctypes objects for the ctypes crossing, addresses for C's).
        self._call_raw: Callable[..., int | None]
        if inst.crossing == "c":
            self._call_raw = _FASTPATH.call  # type: ignore[union-attr]
            self._raw: tuple[Any, ...] = (
                inst._ctx_p.value, self._func_p.value, self._vals_p.value, slots, inst._trap_p.value,
            )  # fmt: skip
        else:
            self._call_raw = _call_unchecked
            self._raw = (inst._ctx_p, self._func_p, self._vals_p, self._n_c, inst._trap_p)
        self._returns_i32 = self._result == "i32"
        self._result_i32 = self._vals_view.cast("i")  # slot 0's i32 is element 0 (faster than ctypes)

    @property
    def arity(self) -> int:
        return len(self.signature.params)

    def trace_calls(self, log: Callable[[str], None]) -> None:
        """Log each call of this export with its arguments and its result (cpp-host's trace lines).

        The tracing wraps the raw crossing itself, so both call paths (``__call__`` and the filter's
        written-out copy of it) trace, and a GuestFunc whose calls are not traced runs exactly the
        untraced crossing: tracing off costs nothing.
        """
        name = self.name
        untraced = self._call_raw
        view = self._vals_view
        unpack_args = struct.Struct("<" + "".join(_SLOT_FORMAT[k] for k in self.signature.params)).unpack_from
        unpack_result = (
            struct.Struct("<" + _SLOT_FORMAT[self._result]).unpack_from if self._result is not None else None
        )
        trap = self._inst._trap

        def traced(*raw_args: Any) -> int | None:
            log(f"[host->vm] {name}({', '.join(map(str, unpack_args(view)))})")
            error = untraced(*raw_args)
            if error or trap.value:
                log(f"[host<-vm] {name} failed")
            elif unpack_result is None:
                log(f"[host<-vm] {name} return: void")
            else:
                log(f"[host<-vm] {name} return: {unpack_result(view)[0]}")
            return error

        self._call_raw = traced

    def _set_args(self, args: tuple[int, ...]) -> None:
        for index, kind in enumerate(self.signature.params):
            value = args[index] if index < len(args) else 0
            if kind == "i32":
                self._u32[4 * index] = value & _MASK32
            elif kind == "i64":
                self._i64[2 * index] = value
            elif kind == "f32":  # each value as its declared type: an f32 is read from the low 4 bytes
                self._vals[index].f32 = float(value)
            else:
                self._vals[index].f64 = float(value)

    def __call__(self, *args: int) -> int:
        """Call with ints (extra args are dropped, missing ones are 0); returns the first result or 0."""
        try:
            self._pack_args(self._vals_view, 0, *args)
        except struct.error:  # another arity (ABI 0.1.0 callbacks), or a value to mask
            self._set_args(args)
        inst = self._inst
        depth = inst._depth
        if depth == 0:
            now = inst._clock.now
            if now != inst._armed_at:
                _set_epoch_deadline(inst._ctx_p, inst._deadline_ticks_c)
                inst._armed_at = now
            inst._pending = None
        inst._depth = depth + 1
        try:
            error = self._call_raw(*self._raw)
        finally:
            inst._depth = depth
        if error or inst._trap.value:
            inst._raise_failure(error)
        if self._returns_i32:
            return self._result_i32[0]
        result = self._result
        if result is None:
            return 0
        if result == "i64":
            return self._i64[0]
        return int(self._vals[0].f64 if result == "f64" else self._vals[0].f32)


class WasmInstance:
    """One store + one instance of a compiled module, with raw host imports linked."""

    def __init__(
        self,
        engine: WasmEngine,
        compiled: CompiledModule,
        host_funcs: Mapping[tuple[str, str], HostFunc],
        memory_limit_bytes: int = 1 << 30,
        on_link_mismatch: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.crossing = engine.crossing
        self.compiled = compiled
        self.memory_limit_bytes = memory_limit_bytes
        # The thread that creates an instance is the one that calls it (a worker's event loop, a
        # harness's test thread): its CPU time is what the deadlines count.
        engine.add_guest_thread()
        self._store: wasmtime.Store | None = wasmtime.Store(engine.engine)
        self._store.set_limits(memory_size=memory_limit_bytes)
        self._ctx = self._store._context()
        self._ctx_p = _VOID_P(ctypes.cast(self._ctx, ctypes.c_void_p).value)
        self._trap = _VOID_P()  # wasmtime writes a wasm_trap_t* here when a call traps
        self._trap_p = _VOID_P(ctypes.addressof(self._trap))
        self._clock = engine.clock
        self._armed_at = -1  # the clock value when the deadline was last armed; -1 = re-arm
        self._depth = 0
        self._pending: BaseException | None = None
        self._deadline_ms = 5000
        self._deadline_ticks = engine.deadline_ticks(self._deadline_ms)
        self._deadline_ticks_c = ctypes.c_uint64(self._deadline_ticks)
        # Set (with ``restrict``, or directly on hot paths) while the guest may make only the host
        # calls named ``module.name`` in the set; None: every host call is allowed.
        self.allowed_hostcalls: frozenset[str] | None = None
        self.restricted_phase = ""
        self._keepalive: list[Any] = []
        self._mem: wasmtime.Memory | None = None
        self._mem_p: Any = None
        self._mem_base = 0
        self._mem_size = 0
        self._view: memoryview | None = None
        self.functions: dict[str, GuestFunc] = {}
        linker = wasmtime.Linker(engine.engine)
        defined: set[tuple[str, str]] = set()
        for module_name, name, import_sig in compiled.imports:
            key = (module_name, name)
            if key in defined or import_sig is None:
                continue
            host = host_funcs.get(key)
            if host is None:
                continue
            if host.signature != import_sig:
                # Leave it to the trap stub below: the module still links, and only
                # calling this import fails.
                if on_link_mismatch is not None:
                    on_link_mismatch(
                        f"import {module_name}.{name} has type {import_sig.params}->{import_sig.results},"
                        f" host provides {host.signature.params}->{host.signature.results}"
                    )
                continue
            self._define(linker, host)
            defined.add(key)
        try:
            linker.define_unknown_imports_as_traps(compiled.module)
            # A module's `start` function (AssemblyScript has one) runs inside instantiate:
            # arm the startup deadline first, or the store's zero deadline interrupts it at once.
            raw.wasmtime_context_set_epoch_deadline(self._ctx, self._deadline_ticks)
            instance = linker.instantiate(self._store, compiled.module)
        except wasmtime.Trap as exc:
            raise GuestFailure("trap", f"start function trapped: {_first_line(exc.message)}") from None
        except wasmtime.WasmtimeError as exc:
            raise ModuleLoadError(f"cannot instantiate module: {_first_line(str(exc))}") from None
        self._instance: wasmtime.Instance | None = instance
        exports = instance.exports(self._store)
        for name, export_sig in compiled.exports.items():
            ext = exports.get(name) if hasattr(exports, "get") else None
            if isinstance(ext, wasmtime.Func) and export_sig is not None:
                self.functions[name] = GuestFunc(self, name, ext, export_sig)
            elif isinstance(ext, wasmtime.Memory) and name == "memory":
                self._mem = ext
                self._mem_p = _VOID_P(ctypes.addressof(ext._memory))
                self._mem_base = _memory_data(self._ctx_p, self._mem_p) or 0
                self._refresh_memory()

    # -- linking -------------------------------------------------------------------
    def _define(self, linker: wasmtime.Linker, host: HostFunc) -> None:
        functype = host.signature.functype()
        python_callback = self._trampoline(host)
        callback: Any
        env: Any = None
        if self.crossing == "c":
            # The C callback unpacks the arguments, calls impl and packs its result; the Python
            # trampoline still serves restricted phases, and reports failures.
            where = f"{host.module}.{host.name}"
            binding = (
                host.impl,
                "".join(_KIND_CODE[k] for k in host.signature.params).encode(),
                _RESULT_CODE[host.signature.results[0] if host.signature.results else None],
                self,
                lambda args: python_callback(None, None, args, 0),
                lambda exc: self._host_failure(where, exc),
            )
            _FASTPATH.check_binding(binding)  # type: ignore[union-attr]
            callback = _VOID_P(_FASTPATH.host_callback_address())  # type: ignore[union-attr]
            env = _VOID_P(id(binding))
            self._keepalive.append(binding)
        else:
            callback = _HOST_CALLBACK_T(python_callback)
        module_b = host.module.encode()
        name_b = host.name.encode()
        linker_p = _VOID_P(ctypes.cast(linker.ptr(), ctypes.c_void_p).value)
        functype_p = _VOID_P(ctypes.cast(functype.ptr(), ctypes.c_void_p).value)
        error = _define_unchecked(
            linker_p, module_b, ctypes.c_size_t(len(module_b)), name_b, ctypes.c_size_t(len(name_b)),
            functype_p, callback, env, _NO_FINALIZER,
        )
        if error:
            message = wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, _ERROR_PTR))
            raise ModuleLoadError(f"cannot define {host.module}.{host.name}: {message}")
        # wasmtime keeps raw pointers to both: they must live as long as the instance.
        self._keepalive.append((functype, callback))

    def _trampoline(self, host: HostFunc) -> Callable[[Any, Any, int, int], int]:
        impl = host.impl
        kinds = host.signature.params
        unpack = struct.Struct("<" + "".join(_SLOT_FORMAT[k] for k in kinds)).unpack_from
        # The ValRaw slots as a ctypes array: arguments are unpacked from it and the result is
        # packed back into slot 0 (there is always at least one slot when there is a result).
        slots = (ctypes.c_char * (_VAL_RAW_SIZE * max(len(kinds), 1))).from_address
        result = host.signature.results[0] if host.signature.results else None
        where = f"{host.module}.{host.name}"

        def refuse() -> None:
            raise RestrictedHostCall(f"restricted_callback: {where} called during {self.restricted_phase}")

        # One closure per result kind: an i32 result (nearly every import) is masked and
        # packed without further branching.
        if result == "i32":
            pack_u32 = _RESULT_PACK["i32"].pack_into

            def call_host(_env: Any, _caller: Any, args: int, _nargs: int) -> int:
                try:
                    if self.allowed_hostcalls is not None and where not in self.allowed_hostcalls:
                        refuse()
                    values = slots(args)
                    pack_u32(values, 0, (impl(*unpack(values)) or 0) & _MASK32)
                    return 0
                except BaseException as exc:  # a lost exception would hide the real failure: keep it
                    return self._host_failure(where, exc)

        else:
            pack = _RESULT_PACK[result].pack_into if result is not None else None

            def call_host(_env: Any, _caller: Any, args: int, _nargs: int) -> int:
                try:
                    if self.allowed_hostcalls is not None and where not in self.allowed_hostcalls:
                        refuse()
                    values = slots(args)
                    value = impl(*unpack(values))
                    if pack is not None:
                        pack(values, 0, value or 0)
                    return 0
                except BaseException as exc:  # a lost exception would hide the real failure: keep it
                    return self._host_failure(where, exc)

        return call_host

    def _host_failure(self, where: str, exc: BaseException) -> int:
        """Keep the first exception for the guest call to re-raise; the guest gets a trap."""
        if self._pending is None:
            self._pending = exc
        message = f"host function {where} failed: {exc}".encode()
        trap = raw.wasmtime_trap_new(message, len(message))
        return ctypes.cast(trap, ctypes.c_void_p).value or 0

    # -- restrictions ----------------------------------------------------------------
    def restrict(self, allowed: frozenset[str] | None, during: str = "") -> tuple[frozenset[str] | None, str]:
        """From now on only host calls named ``module.name`` in ``allowed`` may run (None: all).

        Returns the previous restriction, to hand back to ``restrict`` when the phase ends.
        """
        previous = self.allowed_hostcalls, self.restricted_phase
        self.allowed_hostcalls, self.restricted_phase = allowed, during
        return previous

    # -- failures ------------------------------------------------------------------
    def _raise_failure(self, error: int | None) -> None:
        pending, self._pending = self._pending, None
        trap_address, self._trap.value = self._trap.value, None
        self._armed_at = -1  # an interrupted store's deadline is spent
        message = "unknown failure"
        code: wasmtime.TrapCode | None = None
        if trap_address:
            trap_obj = wasmtime.Trap._from_ptr(ctypes.cast(trap_address, _TRAP_PTR))
            message = _first_line(trap_obj.message)
            code = trap_obj.trap_code
        elif error:
            err = wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, _ERROR_PTR))
            if isinstance(err, wasmtime.ExitTrap):
                raise ProcExit(err.code)
            message = _first_line(str(err))
        if pending is not None:
            if isinstance(pending, WasmError):
                raise pending
            raise GuestFailure("host_error", f"{type(pending).__name__}: {pending}") from pending
        if code == wasmtime.TrapCode.INTERRUPT:
            raise GuestFailure("deadline", f"exceeded its {self._deadline_ms} ms CPU deadline")
        self._refresh_memory()
        # wasmtime reports a refused memory.grow only as -1 to the guest, which then traps
        # on its own; a trap with memory this close to the cap is blamed on the cap.
        near_cap = min(64 * WASM_PAGE, self.memory_limit_bytes // 4)
        if self._mem is not None and self._mem_size + near_cap > self.memory_limit_bytes:
            raise GuestFailure(
                "memory_limit", f"hit its {self.memory_limit_bytes}-byte memory limit ({message})"
            )
        raise GuestFailure("trap", message)

    # -- deadlines -----------------------------------------------------------------
    @property
    def deadline_ms(self) -> int:
        return self._deadline_ms

    @deadline_ms.setter
    def deadline_ms(self, value: int) -> None:
        self._deadline_ms = value
        self._deadline_ticks = self.engine.deadline_ticks(value)
        self._deadline_ticks_c = ctypes.c_uint64(self._deadline_ticks)
        self._armed_at = -1

    # -- exports ---------------------------------------------------------------------
    def func(self, name: str) -> GuestFunc | None:
        return self.functions.get(name)

    @property
    def export_names(self) -> list[str]:
        return list(self.compiled.exports)

    # -- memory ----------------------------------------------------------------------
    # Guest memory is read and written through a memoryview over [base, base+size): slicing
    # costs a fraction of a ctypes call. The base never moves (memory_may_move = False); when
    # an access falls beyond the known size, the size is re-read and the view rebuilt.
    def _refresh_memory(self) -> None:
        if self._mem_p is not None:
            size = _memory_data_size(self._ctx_p, self._mem_p)
            if size != self._mem_size or self._view is None:
                self._mem_size = size
                memory = (ctypes.c_ubyte * size).from_address(self._mem_base)
                self._view = memoryview(memory).cast("B") if size else None

    @property
    def has_memory(self) -> bool:
        return self._mem is not None

    def memory_size(self) -> int:
        self._refresh_memory()
        return self._mem_size

    def _view_for(self, end: int) -> memoryview | None:
        """The memory view if [.., end) is inside memory (growing the view if memory grew)."""
        if end > self._mem_size:
            self._refresh_memory()
            if end > self._mem_size:
                return None
        return self._view

    def check_range(self, ptr: int, size: int) -> bool:
        return self._view_for(ptr + size) is not None

    def read(self, ptr: int, size: int) -> bytes | None:
        """Bytes at [ptr, ptr+size) or None when out of bounds."""
        if size == 0:
            return b""
        view = self._view if ptr + size <= self._mem_size else self._view_for(ptr + size)
        return None if view is None else view[ptr : ptr + size].tobytes()

    def write(self, ptr: int, data: bytes | bytearray) -> bool:
        size = len(data)
        if size == 0:
            return True
        view = self._view if ptr + size <= self._mem_size else self._view_for(ptr + size)
        if view is None:
            return False
        view[ptr : ptr + size] = data
        return True

    def write_with_address(self, ptr: int, data: bytes | bytearray, ptr_ptr: int, size_ptr: int) -> bool:
        """``data`` at ptr, then ptr and len(data) as u32 at ptr_ptr and size_ptr, in one call (how every
        value is handed to a plugin); False, with nothing written, if any of it is out of bounds."""
        size = len(data)
        end = max(ptr + size, ptr_ptr + 4, size_ptr + 4)
        view = self._view if end <= self._mem_size else self._view_for(end)
        if view is None:
            return False
        view[ptr : ptr + size] = data
        _pack_u32(view, ptr_ptr, ptr & _MASK32)
        _pack_u32(view, size_ptr, size & _MASK32)
        return True

    def write_u32(self, ptr: int, value: int) -> bool:
        view = self._view if ptr + 4 <= self._mem_size else self._view_for(ptr + 4)
        if view is None:
            return False
        _pack_u32(view, ptr, value & _MASK32)
        return True

    def write_u64(self, ptr: int, value: int) -> bool:
        view = self._view if ptr + 8 <= self._mem_size else self._view_for(ptr + 8)
        if view is None:
            return False
        _pack_u64(view, ptr, value & 0xFFFFFFFFFFFFFFFF)
        return True

    def read_u32(self, ptr: int) -> int | None:
        view = self._view if ptr + 4 <= self._mem_size else self._view_for(ptr + 4)
        return None if view is None else int(_unpack_u32(view, ptr)[0])

    def close(self) -> None:
        """Free the store now (its linear memory with it), not when the last Python reference goes.

        Callers may still hold GuestFuncs (a filter's resolved exports, the VM's allocator) or
        this instance: each closed GuestFunc raises instead of calling into the freed store, no
        deadline is armed on it again, and memory accesses find no memory.
        """
        if self._store is None:
            return
        for fn in self.functions.values():
            fn._call_raw = _closed_call
        self.functions.clear()
        self._keepalive.clear()
        self._depth = 1  # as if inside a call forever: the freed store's deadline is never re-armed
        self._view = None  # it points into the store's memory
        self._mem = self._mem_p = None
        self._mem_base = self._mem_size = 0
        self._instance = None
        store, self._store = self._store, None
        store.close()


def _closed_call(*_raw: Any) -> int:
    raise GuestFailure("trap", "called after its VM was closed")


@dataclass
class LinkPlan:
    """Host functions by (module, name); built once per Runtime and shared by its VMs."""

    funcs: dict[tuple[str, str], HostFunc] = field(default_factory=dict)

    def add(self, host: HostFunc) -> None:
        self.funcs[(host.module, host.name)] = host
