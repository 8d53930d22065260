"""One Proxy-Wasm VM: ABI detection, start-up, contexts, guest callbacks, async deliveries.

The VM is the unit Envoy shares between plugins with the same (vm_id, module digest,
vm config). Guest callbacks run through ``invoke``: it sets the current/effective
context, runs the guest under its CPU deadline, and afterwards runs the actions the
guest asked for (continue, local reply, reset) — Envoy's ``addAfterVmCallAction``.
A trap marks the VM failed; the plugin layer turns that into the failure policy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from wasmesh.http.headers import HeaderMap
from wasmesh.runtime.abi import ABI_BY_EXPORT, ABI_MARKER_PREFIX, AbiVersion, LogLevel, WasmResult
from wasmesh.runtime.contexts import (
    Context,
    HttpCallResponse,
    PluginIdentity,
    RootContext,
    StreamContext,
)
from wasmesh.runtime.engine import (
    CompiledModule,
    GuestFailure,
    GuestFunc,
    HostFunc,
    ModuleLoadError,
    ProcExit,
    WasmEngine,
    WasmInstance,
    traced_host_impl,
)
from wasmesh.runtime.hostcalls import HostCalls, deliver_pairs_count
from wasmesh.runtime.metrics import MetricsRegistry
from wasmesh.runtime.shared import SharedData, SharedQueues
from wasmesh.runtime.wasi import WasiHost

logger = logging.getLogger("wasmesh.runtime")
TRACE = 5  # the "trace" level of wasmesh's loggers (wasmesh.proxy.admin.LOG_LEVELS)


class TimerHandle(Protocol):
    def cancel(self) -> Any: ...


class Scheduler(Protocol):
    """Timers for on_tick and deferred deliveries; the plugin harness supplies a manual clock."""

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> TimerHandle: ...


class HttpCaller(Protocol):
    """What the proxy implements for proxy_http_call."""

    def dispatch(
        self,
        cluster: str,
        headers: HeaderMap,
        body: bytes,
        trailers: HeaderMap,
        timeout_ms: int,
        on_response: Callable[[HttpCallResponse | None], None],
    ) -> bool:
        """Start the call; False means "unknown cluster". ``on_response(None)`` = reset/failure."""
        ...


LogHandler = Callable[[str, int, str], None]


@dataclass
class RuntimeServices:
    """Process/worker-level services every VM of a Runtime uses."""

    log_handler: LogHandler
    metrics: MetricsRegistry
    shared_data: SharedData
    shared_queues: SharedQueues
    http_caller: HttpCaller | None
    scheduler: Scheduler
    node: dict[str, Any]
    log_level: LogLevel = LogLevel.INFO


class AbiError(ModuleLoadError):
    pass


# cpp-host's restricted phases (WasmBase::startVm and allocMemory): any other host call
# fails the VM with "restricted_callback".
MALLOC_HOSTCALLS = frozenset({
    "env.proxy_log",
    *(f"{module}.{name}" for module in ("wasi_snapshot_preview1", "wasi_unstable")
      for name in ("fd_write", "clock_time_get", "poll_oneoff")),
})  # fmt: skip


class StreamExports:
    """The per-stream callbacks a module exports, resolved once per VM (None: not exported)."""

    __slots__ = (
        "context_create", "request_headers", "request_body", "request_trailers", "response_headers",
        "response_body", "response_trailers", "log", "done", "delete",
    )  # fmt: skip

    def __init__(self, functions: dict[str, GuestFunc]) -> None:
        self.context_create = functions.get("proxy_on_context_create")
        self.request_headers = functions.get("proxy_on_request_headers")
        self.request_body = functions.get("proxy_on_request_body")
        self.request_trailers = functions.get("proxy_on_request_trailers")
        self.response_headers = functions.get("proxy_on_response_headers")
        self.response_body = functions.get("proxy_on_response_body")
        self.response_trailers = functions.get("proxy_on_response_trailers")
        self.log = functions.get("proxy_on_log")
        self.done = functions.get("proxy_on_done")
        self.delete = functions.get("proxy_on_delete")


def detect_abi(compiled: CompiledModule) -> AbiVersion:
    markers = [name for name in compiled.exports if name.startswith(ABI_MARKER_PREFIX)]
    for name in markers:
        version = ABI_BY_EXPORT.get(name)
        if version is not None:
            return version
    if markers:
        raise AbiError(f"unsupported Proxy-Wasm ABI version export {markers[0]}"
                       f" (supported: {', '.join(v.export_name for v in AbiVersion)})")
    found = ", ".join(sorted(compiled.exports)[:12]) or "no exports"
    more = "" if len(compiled.exports) <= 12 else f", … {len(compiled.exports) - 12} more"
    raise AbiError(f"module has no proxy_abi_version_* export (found: {found}{more})")


class PluginVm:
    def __init__(
        self,
        engine: WasmEngine,
        compiled: CompiledModule,
        *,
        vm_id: str,
        vm_config: bytes,
        env: dict[str, str],
        memory_limit_bytes: int,
        services: RuntimeServices,
        label: str,
        startup_deadline_ms: int = 5000,
        callback_deadline_ms: int = 1000,
    ) -> None:
        self.abi = detect_abi(compiled)
        self.compiled = compiled
        self.vm_id = vm_id
        self.services = services
        self.label = label
        self.startup_deadline_ms = startup_deadline_ms
        self.callback_deadline_ms = callback_deadline_ms
        self.failure: GuestFailure | None = None
        self.on_failure: Callable[[PluginVm, GuestFailure], None] | None = None
        self.http_call_response: HttpCallResponse | None = None
        self.call_data: bytes | None = None
        self.in_configure = False
        self.closed = False
        self.contexts: dict[int, Context] = {}
        self._next_context_id = 0
        self._next_http_token = 0
        self._current: Context | None = None
        self._effective: Context | None = None
        self._deferred: list[Callable[[], None]] = []
        self._vm_context = RootContext(self, 0, PluginIdentity(label, "", vm_id, b"", vm_config))
        self.hostcalls = HostCalls(self)
        wasi = WasiHost(lambda: self.instance, env, self.log)
        # Trace lines for every call between host and VM, when the runtime logger is at trace level
        # as the VM is created: decided here, so that a VM without tracing runs the untraced path.
        self.traced = logger.isEnabledFor(TRACE)
        funcs: dict[tuple[str, str], HostFunc] = {}
        for host in [*self.hostcalls.host_funcs(), *wasi.host_funcs()]:
            if self.traced:
                where = f"{host.module}.{host.name}"
                host = dataclasses.replace(host, impl=traced_host_impl(where, host.impl, self._trace))
            funcs[(host.module, host.name)] = host
        # During initialisation cpp-host allows proxy_log and a list of WASI calls that Go's
        # wasip1 runtime outgrew (it also needs fd_fdstat_*, sched_yield, …): we allow
        # proxy_log and every WASI call, and refuse the proxy_* calls.
        self._startup_hostcalls = frozenset(
            {"env.proxy_log", *(f"{h.module}.{h.name}" for h in wasi.host_funcs())}
        )
        self.instance = WasmInstance(
            engine, compiled, funcs, memory_limit_bytes,
            on_link_mismatch=lambda msg: logger.warning("%s: %s (calls to it will trap)", label, msg),
        )
        # cpp-host (and Higress, ngx, MOSN) look up malloc first; the spec prefers
        # proxy_on_memory_allocate. Both allocate exactly the size asked for.
        if self.traced:
            for fn in self.instance.functions.values():
                fn.trace_calls(self._trace)
        allocator = self.instance.func("malloc") or self.instance.func("proxy_on_memory_allocate")
        if allocator is None:
            raise ModuleLoadError("module exports neither malloc nor proxy_on_memory_allocate")
        self._allocator: GuestFunc = allocator
        self._allocator_name = allocator.name
        self.hostcalls.bind(self.instance)
        self.stream_exports = StreamExports(self.instance.functions)

    # -- start-up ----------------------------------------------------------------------
    def start(self) -> None:
        """Run the module's initialisation as cpp-host does; raises GuestFailure on a trap."""
        self.instance.deadline_ms = self.startup_deadline_ms
        initialize = self.instance.func("_initialize")
        previous = self.instance.restrict(self._startup_hostcalls, "module initialisation")
        entry = "_initialize" if initialize is not None else "_start"
        try:
            if initialize is not None:
                initialize()
                main = self.instance.func("main")
                if main is not None:
                    entry = "main"
                    main(0, 0)
            else:
                start = self.instance.func("_start")
                if start is not None:
                    start()
        except ProcExit as exc:
            if exc.code != 0:
                raise GuestFailure("trap", f"initialisation exited with code {exc.code}", entry) from None
        except GuestFailure as exc:
            exc.name_function(entry)
            raise
        finally:
            self.instance.restrict(*previous)
        self.instance.deadline_ms = self.callback_deadline_ms

    def has_export(self, name: str) -> bool:
        return self.instance.func(name) is not None

    def export_arity(self, name: str) -> int:
        fn = self.instance.func(name)
        return fn.arity if fn is not None else 0

    # -- memory -----------------------------------------------------------------------
    def allocate(self, size: int) -> int:
        # instance.restrict(), written out: this runs for every value handed to the plugin.
        inst = self.instance
        saved = inst.allowed_hostcalls, inst.restricted_phase
        inst.allowed_hostcalls, inst.restricted_phase = MALLOC_HOSTCALLS, self._allocator_name
        try:
            return self._allocator(size) & 0xFFFFFFFF
        finally:
            inst.allowed_hostcalls, inst.restricted_phase = saved

    def copy_out(self, data: bytes | bytearray, ptr_ptr: int, size_ptr: int) -> WasmResult:
        """Hand ``data`` to the plugin: guest memory of exactly its size, written at *ptr_ptr/*size_ptr."""
        inst = self.instance
        if not data:
            ok = inst.write_u32(ptr_ptr, 0) and inst.write_u32(size_ptr, 0)
            return WasmResult.OK if ok else WasmResult.INVALID_MEMORY_ACCESS
        ptr = self.allocate(len(data))
        if ptr == 0 or not inst.write_with_address(ptr, data, ptr_ptr, size_ptr):
            return WasmResult.INVALID_MEMORY_ACCESS
        return WasmResult.OK

    # -- logging ----------------------------------------------------------------------
    def _trace(self, line: str) -> None:
        logger.log(TRACE, "%s: %s", self.label, line)

    def log(self, level: int, message: str) -> None:
        if level < self.services.log_level:
            return
        self.services.log_handler(self.effective_context().root.identity.name, level, message)

    # -- contexts ---------------------------------------------------------------------
    def effective_context(self) -> Context:
        return self._effective if self._effective is not None else self._vm_context

    def set_effective_context(self, context_id: int) -> bool:
        ctx = self.contexts.get(context_id)
        if ctx is None:
            return False
        self._effective = ctx
        return True

    def _new_context_id(self) -> int:
        self._next_context_id += 1
        return self._next_context_id

    def create_root(self, identity: PluginIdentity) -> RootContext:
        root = RootContext(self, self._new_context_id(), identity)
        self.contexts[root.id] = root
        self.invoke(root, "proxy_on_context_create", root.id, 0)
        root.created = True
        return root

    def add_stream(self, ctx: StreamContext) -> None:
        """Give a new stream context (the filter itself) its id; the filter then runs
        proxy_on_context_create through its own one-frame call path (plugin.WasmHttpFilter._call)."""
        self._next_context_id += 1
        ctx.id = self._next_context_id
        self.contexts[ctx.id] = ctx

    def start_root(self, root: RootContext) -> tuple[bool, str]:
        """on_vm_start then on_configure; (False, which) if either refused.

        Both run under the start-up deadline, not the per-request one: plugins parse their
        configuration there (compiling regexes, loading word lists), which can take a Go
        plugin well over a second on a busy machine.
        """
        self.instance.deadline_ms = self.startup_deadline_ms
        self.in_configure = False
        try:
            if self.invoke(root, "proxy_on_vm_start", root.id, len(root.identity.vm_config)) == 0:
                return False, "on_vm_start"
            self.in_configure = True
            if self.invoke(root, "proxy_on_configure", root.id, len(root.identity.configuration)) == 0:
                return False, "on_configure"
        finally:
            self.in_configure = False
            self.instance.deadline_ms = self.callback_deadline_ms
        return True, ""

    def delete_context(self, ctx: Context) -> None:
        delete = self.stream_exports.delete
        if delete is not None and self.failure is None and ctx.created:
            self.call(ctx, delete, ctx.id)
        self.contexts.pop(ctx.id, None)

    def shutdown_root(self, root: RootContext) -> None:
        """Root on_done; on_delete now if it agreed, else when it calls proxy_done."""
        if root.tick_handle is not None:
            root.tick_handle.cancel()
            root.tick_handle = None
        root.tick_period_ms = 0
        root.pending_http_calls.clear()
        if self.failure is not None:
            root.deleted = True
            self.contexts.pop(root.id, None)
            return
        done = self.invoke(root, "proxy_on_done", root.id)
        if done is None or done != 0:
            self._finish_root(root)
        else:
            root.done_pending = True

    def _finish_root(self, root: RootContext) -> None:
        root.deleted = True
        self.delete_context(root)

    def root_done(self, root: RootContext) -> bool:
        if not root.done_pending:
            return False
        root.done_pending = False
        self.defer(lambda: self._finish_root(root))
        return True

    # -- calls into the guest -----------------------------------------------------------
    def defer(self, action: Callable[[], None]) -> None:
        self._deferred.append(action)

    def invoke(self, ctx: Context, name: str, *args: int) -> int | None:
        """Call guest export ``name`` for ``ctx``; None if not exported. Raises GuestFailure."""
        fn = self.instance.functions.get(name)
        if fn is None:
            return None
        return self.call(ctx, fn, *args)

    def call(self, ctx: Context, fn: GuestFunc, *args: int) -> int:
        """Call a resolved guest export for ``ctx`` (the hot path of ``invoke``)."""
        if self.failure is not None:
            raise self.failure
        saved_current = self._current
        saved_effective = self._effective
        self._current = self._effective = ctx
        try:
            result = fn(*args)
        except ProcExit as exc:
            self._fail(GuestFailure("trap", f"proc_exit({exc.code})", fn.name))
            raise self.failure from None  # type: ignore[misc]
        except GuestFailure as exc:
            exc.name_function(fn.name)
            self._fail(exc)
            raise
        finally:
            self._current = saved_current
            self._effective = saved_effective
        if saved_current is None and self._deferred:
            self._run_deferred()
        return result

    def _fail(self, failure: GuestFailure) -> None:
        if self.failure is None:
            self.failure = failure
        self._deferred.clear()

    def _run_deferred(self) -> None:
        while self._deferred:
            action = self._deferred.pop(0)
            action()

    def invoke_async(self, ctx: Context, name: str, *args: int) -> None:
        """An event not tied to a filter call (tick, callout answer): failures go to on_failure."""
        if self.failure is not None:
            return
        try:
            self.invoke(ctx, name, *args)
        except GuestFailure as exc:
            if self.on_failure is not None:
                self.on_failure(self, exc)

    def _deliver(self, action: Callable[[], None]) -> None:
        # An answer that arrives while the guest is running (e.g. a caller failing
        # synchronously inside dispatch) waits until that VM call returns, as in Envoy.
        if self._current is not None:
            self.defer(action)
        else:
            action()

    # -- timers -----------------------------------------------------------------------
    def set_tick_period(self, root: RootContext, period_ms: int) -> None:
        if root.tick_handle is not None:
            root.tick_handle.cancel()
            root.tick_handle = None
        root.tick_period_ms = period_ms
        if period_ms > 0 and root.id != 0:
            self._schedule_tick(root)

    def _schedule_tick(self, root: RootContext) -> None:
        def fire() -> None:
            root.tick_handle = None
            if root.deleted or self.failure is not None or root.tick_period_ms <= 0:
                return
            self.invoke_async(root, "proxy_on_tick", root.id)
            if root.tick_period_ms > 0 and root.tick_handle is None and not root.deleted:
                self._schedule_tick(root)

        root.tick_handle = self.services.scheduler.call_later(root.tick_period_ms / 1000.0, fire)

    # -- shared queues ------------------------------------------------------------------
    def register_queue(self, root: RootContext, name: str) -> int:
        def ready(token: int) -> None:
            def deliver() -> None:
                if not root.deleted and self.failure is None:
                    self.invoke_async(root, "proxy_on_queue_ready", root.id, token)

            self.services.scheduler.call_later(0, deliver)

        return self.services.shared_queues.register(self.vm_id, name, ready)

    # -- http callouts -------------------------------------------------------------------
    def dispatch_http_call(
        self, root: RootContext, cluster: str, headers: HeaderMap, body: bytes, trailers: HeaderMap,
        timeout_ms: int,
    ) -> int | None:
        caller = self.services.http_caller
        if caller is None:
            return None
        self._next_http_token = (self._next_http_token % 0x7FFFFFFF) + 1
        token = self._next_http_token
        root.pending_http_calls.add(token)

        def on_response(response: HttpCallResponse | None) -> None:
            if token not in root.pending_http_calls:
                return  # the plugin went away, or the answer came twice
            root.pending_http_calls.discard(token)
            self._deliver(lambda: self._http_call_done(root, token, response))

        try:
            accepted = caller.dispatch(cluster, headers, body, trailers, timeout_ms, on_response)
        except Exception:
            logger.exception("%s: http_call dispatch to %r failed", self.label, cluster)
            accepted = False
        if not accepted:
            root.pending_http_calls.discard(token)
            return None
        return token

    def _http_call_done(self, root: RootContext, token: int, response: HttpCallResponse | None) -> None:
        if root.deleted or self.failure is not None:
            return
        if response is None:
            root.status = (WasmResult.BROKEN_CONNECTION, b"reset")
            counts = (0, 0, 0)
        else:
            root.status = (0, b"")
            counts = deliver_pairs_count(response)
        self.http_call_response = response
        try:
            self.invoke_async(root, "proxy_on_http_call_response", root.id, token, *counts)
        finally:
            self.http_call_response = None

    # -- teardown -----------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No guest call of this VM is on the stack (closing it now frees nothing still in use)."""
        return self._current is None and self.instance._depth == 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for ctx in list(self.contexts.values()):
            if isinstance(ctx, RootContext) and ctx.tick_handle is not None:
                ctx.tick_handle.cancel()
                ctx.tick_handle = None
        self.contexts.clear()
        self.instance.close()
        # Filters keep the exports they resolved (StreamExports) past close, and the instance's
        # host callbacks are freed now: calling one would crash the process. Unresolve them in
        # place, so a late callback finds nothing to call (as a lookup by name does).
        for name in StreamExports.__slots__:
            setattr(self.stream_exports, name, None)
        # HostCalls and the VM context point back here: drop them so that a closed VM is freed by
        # reference counting alone (workers gc.freeze() what they built at start-up, VMs included).
        self._deferred.clear()
        self._current = self._effective = None
        del self.hostcalls, self._vm_context
