"""The engine layer: the only module that touches wasmtime.

Hot paths use wasmtime's raw "unchecked" C entry points, which cost ~1–2 µs per
crossing instead of the ~10–25 µs of wasmtime-py's public call API:

* imports are defined with ``wasmtime_linker_define_func_unchecked``: one ctypes
  callback per imported function reads ``wasmtime_val_raw_t`` arguments directly;
* exports are called with ``wasmtime_func_call_unchecked`` through preallocated
  ``ValRaw`` arrays and cached function handles;
* linear memory is reached through the base pointer from ``wasmtime_memory_data``,
  refreshed lazily after anything that may have grown memory.

Compiled modules are cached on disk (serialized by wasmtime, keyed by the module's
sha256, the wasmtime version and this engine's configuration), so a multi-MB Go
plugin starts in tens of milliseconds after its first compile.

CPU time per guest call is bounded with epoch interruption: a daemon thread bumps
the engine epoch every ``epoch_tick_s`` and each outermost guest call sets its
deadline. Memory is bounded per store with ``Store.set_limits``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import math
import os
import tempfile
import threading
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
_ENGINE_CONFIG_ID = "epoch_interruption=1;cranelift_opt_level=speed"

_FINALIZER_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_NO_FINALIZER = _FINALIZER_T()  # a NULL function pointer: nothing to finalize

_KIND_TO_VALTYPE: dict[str, Callable[[], wasmtime.ValType]] = {
    "i32": wasmtime.ValType.i32,
    "i64": wasmtime.ValType.i64,
    "f32": wasmtime.ValType.f32,
    "f64": wasmtime.ValType.f64,
}


def default_cache_dir() -> str:
    return os.environ.get("WASMESH_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "wasmesh", "compiled"
    )


# --------------------------------------------------------------------------- errors


class WasmError(Exception):
    """Base of every engine-level failure."""


class ModuleLoadError(WasmError):
    """The bytes are not a usable module (not wasm, invalid, or cannot be linked/instantiated)."""


class GuestFailure(WasmError):
    """The guest trapped, ran past its CPU deadline or hit its memory cap.

    ``reason`` is one of "trap", "deadline", "memory_limit", "host_error".
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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


class _EpochTicker:
    """Bumps an engine's epoch at a fixed period from a daemon thread.

    Guest code runs inside ctypes calls, which release the GIL, so this thread keeps
    ticking while a guest loops forever.
    """

    def __init__(self, engine: wasmtime.Engine, period_s: float) -> None:
        self._engine = engine
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wasmesh-epoch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self._engine.increment_epoch()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class WasmEngine:
    """A wasmtime Engine with a compile cache (memory + disk) and an epoch ticker."""

    def __init__(self, cache_dir: str | None = None, epoch_tick_s: float = 0.05) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.cranelift_opt_level = "speed"
        self.engine = wasmtime.Engine(config)
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.epoch_tick_s = epoch_tick_s
        self.stats = CompileStats()
        self._modules: dict[str, CompiledModule] = {}
        self._lock = threading.Lock()
        self._ticker: _EpochTicker | None = _EpochTicker(self.engine, epoch_tick_s)

    def deadline_ticks(self, deadline_ms: int) -> int:
        # +1: the current epoch period may be about to end.
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


_CTX_PTR = ctypes.POINTER(raw.wasmtime_context_t)


class GuestFunc:
    """A guest export called through ``wasmtime_func_call_unchecked``."""

    __slots__ = ("name", "signature", "_inst", "_func", "_vals", "_n", "_kinds", "_result")

    def __init__(self, inst: WasmInstance, name: str, func: wasmtime.Func, signature: FuncSig) -> None:
        self.name = name
        self.signature = signature
        self._inst = inst
        self._func = ctypes.byref(func._func)
        self._n = max(len(signature.params), len(signature.results), 1)
        self._vals = (raw.wasmtime_val_raw_t * self._n)()
        self._kinds = signature.params
        self._result: ValKind | None = signature.results[0] if signature.results else None

    @property
    def arity(self) -> int:
        return len(self.signature.params)

    def __call__(self, *args: int) -> int:
        """Call with ints (extra args are dropped, missing ones are 0); returns the first result or 0."""
        inst = self._inst
        vals = self._vals
        kinds = self._kinds
        for i, kind in enumerate(kinds):
            value = args[i] if i < len(args) else 0
            if kind == "i32":
                vals[i].i32 = value & _MASK32
            elif kind == "i64":
                vals[i].i64 = value
            else:
                vals[i].f64 = float(value)
        depth = inst._depth
        if depth == 0:
            raw.wasmtime_context_set_epoch_deadline(inst._ctx, inst._deadline_ticks)
            inst._pending = None
        inst._depth = depth + 1
        trap = ctypes.POINTER(raw.wasm_trap_t)()
        try:
            error = raw.wasmtime_func_call_unchecked(inst._ctx, self._func, vals, self._n, ctypes.byref(trap))
        finally:
            inst._depth = depth
            inst._mem_stale = True
        if error or trap:
            inst._raise_failure(error, trap)
        result = self._result
        if result is None:
            return 0
        if result == "i32":
            return int(vals[0].i32)
        if result == "i64":
            return int(vals[0].i64)
        return int(vals[0].f64)


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
        self.compiled = compiled
        self.memory_limit_bytes = memory_limit_bytes
        self._store = wasmtime.Store(engine.engine)
        self._store.set_limits(memory_size=memory_limit_bytes)
        self._ctx = self._store._context()
        self._depth = 0
        self._pending: BaseException | None = None
        self._deadline_ms = 5000
        self._deadline_ticks = engine.deadline_ticks(self._deadline_ms)
        self._keepalive: list[Any] = []
        self._mem: wasmtime.Memory | None = None
        self._mem_ref: Any = None
        self._mem_base = 0
        self._mem_size = 0
        self._mem_stale = True
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
            self._instance = linker.instantiate(self._store, compiled.module)
        except wasmtime.Trap as exc:
            raise GuestFailure("trap", f"start function trapped: {_first_line(exc.message)}") from None
        except wasmtime.WasmtimeError as exc:
            raise ModuleLoadError(f"cannot instantiate module: {_first_line(str(exc))}") from None
        exports = self._instance.exports(self._store)
        for name, export_sig in compiled.exports.items():
            ext = exports.get(name) if hasattr(exports, "get") else None
            if isinstance(ext, wasmtime.Func) and export_sig is not None:
                self.functions[name] = GuestFunc(self, name, ext, export_sig)
            elif isinstance(ext, wasmtime.Memory) and name == "memory":
                self._mem = ext
                self._mem_ref = ctypes.byref(ext._memory)

    # -- linking -------------------------------------------------------------------
    def _define(self, linker: wasmtime.Linker, host: HostFunc) -> None:
        functype = host.signature.functype()
        callback = raw.wasmtime_func_unchecked_callback_t(self._trampoline(host))
        module_b = host.module.encode()
        name_b = host.name.encode()
        error = raw.wasmtime_linker_define_func_unchecked(
            linker.ptr(), module_b, len(module_b), name_b, len(name_b), functype.ptr(), callback, None,
            _NO_FINALIZER,
        )
        if error:
            raise ModuleLoadError(
                f"cannot define {host.module}.{host.name}: {wasmtime.WasmtimeError._from_ptr(error)}"
            )
        # wasmtime keeps raw pointers to both: they must live as long as the instance.
        self._keepalive.append((functype, callback))

    def _trampoline(self, host: HostFunc) -> Callable[[Any, Any, Any, int], int]:
        impl = host.impl
        kinds = host.signature.params
        count = len(kinds)
        result = host.signature.results[0] if host.signature.results else None
        all_i32 = all(k == "i32" for k in kinds)
        where = f"{host.module}.{host.name}"

        def call_host(_env: Any, _caller: Any, args: Any, _nargs: int) -> int:
            self._mem_stale = True
            try:
                if all_i32:
                    params = [args[i].i32 & _MASK32 for i in range(count)]
                else:
                    params = [
                        args[i].i32 & _MASK32 if k == "i32" else (args[i].i64 if k == "i64" else args[i].f64)
                        for i, k in enumerate(kinds)
                    ]
                value = impl(*params)
                if result == "i32":
                    args[0].i32 = (value or 0) & _MASK32
                elif result == "i64":
                    args[0].i64 = value or 0
                return 0
            except BaseException as exc:  # a lost exception would hide the real failure: keep it
                if self._pending is None:
                    self._pending = exc
                message = f"host function {where} failed: {exc}".encode()
                trap = raw.wasmtime_trap_new(message, len(message))
                return ctypes.cast(trap, ctypes.c_void_p).value or 0

        return call_host

    # -- failures ------------------------------------------------------------------
    def _raise_failure(self, error: Any, trap: Any) -> None:
        pending, self._pending = self._pending, None
        message = "unknown failure"
        code: wasmtime.TrapCode | None = None
        if trap:
            trap_obj = wasmtime.Trap._from_ptr(trap)
            message = _first_line(trap_obj.message)
            code = trap_obj.trap_code
        elif error:
            err = wasmtime.WasmtimeError._from_ptr(error)
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

    # -- exports ---------------------------------------------------------------------
    def func(self, name: str) -> GuestFunc | None:
        return self.functions.get(name)

    @property
    def export_names(self) -> list[str]:
        return list(self.compiled.exports)

    # -- memory ----------------------------------------------------------------------
    def _refresh_memory(self) -> None:
        if self._mem_ref is not None:
            base = raw.wasmtime_memory_data(self._ctx, self._mem_ref)
            self._mem_base = ctypes.cast(base, ctypes.c_void_p).value or 0
            self._mem_size = int(raw.wasmtime_memory_data_size(self._ctx, self._mem_ref))
        self._mem_stale = False

    @property
    def has_memory(self) -> bool:
        return self._mem is not None

    def memory_size(self) -> int:
        if self._mem_stale:
            self._refresh_memory()
        return self._mem_size

    def check_range(self, ptr: int, size: int) -> bool:
        if self._mem_stale:
            self._refresh_memory()
        return self._mem_base != 0 and ptr + size <= self._mem_size

    def read(self, ptr: int, size: int) -> bytes | None:
        """Bytes at [ptr, ptr+size) or None when out of bounds."""
        if self._mem_stale:
            self._refresh_memory()
        if size == 0:
            return b""
        if self._mem_base == 0 or ptr + size > self._mem_size:
            return None
        return ctypes.string_at(self._mem_base + ptr, size)

    def write(self, ptr: int, data: bytes) -> bool:
        if self._mem_stale:
            self._refresh_memory()
        size = len(data)
        if size == 0:
            return True
        if self._mem_base == 0 or ptr + size > self._mem_size:
            return False
        ctypes.memmove(self._mem_base + ptr, data, size)
        return True

    def write_u32(self, ptr: int, value: int) -> bool:
        return self.write(ptr, (value & _MASK32).to_bytes(4, "little"))

    def write_u64(self, ptr: int, value: int) -> bool:
        return self.write(ptr, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def read_u32(self, ptr: int) -> int | None:
        data = self.read(ptr, 4)
        return None if data is None else int.from_bytes(data, "little")

    def close(self) -> None:
        self.functions.clear()
        self._keepalive.clear()


@dataclass
class LinkPlan:
    """Host functions by (module, name); built once per Runtime and shared by its VMs."""

    funcs: dict[tuple[str, str], HostFunc] = field(default_factory=dict)

    def add(self, host: HostFunc) -> None:
        self.funcs[(host.module, host.name)] = host
