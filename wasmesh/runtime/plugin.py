"""Plugins as HTTP filters: the filter factory per configured plugin, and the per-stream filter.

Envoy's per-stream order: context create → request headers/body/trailers → response
headers/body/trailers → on_log → on_done → on_delete. Callback results are converted
as proxy-wasm-cpp-host does (``convertVmCallResultToFilter*Status``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from wasmesh.http.filter import (
    FilterCallbacks,
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
    HttpFilter,
)
from wasmesh.http.headers import HeaderMap
from wasmesh.http.local_reply import LocalReplyFilter
from wasmesh.runtime.abi import AbiVersion
from wasmesh.runtime.contexts import RootContext, StreamContext
from wasmesh.runtime.engine import GuestFailure, GuestFunc, ProcExit, set_epoch_deadline

if TYPE_CHECKING:
    from wasmesh.runtime.runtime import Runtime, VmSlot
    from wasmesh.runtime.vm import PluginVm

FAIL_STREAM_DETAILS = "wasm_fail_stream"


class FailurePolicy(Enum):
    """What happens once a plugin's VM traps, runs out of CPU time or memory (Istio's failStrategy)."""

    FAIL_CLOSE = "FAIL_CLOSE"  # streams get a local 503 "wasm_fail_stream"
    FAIL_OPEN = "FAIL_OPEN"  # the plugin is skipped
    FAIL_RELOAD = "FAIL_RELOAD"  # a fresh VM serves the next request (with backoff)


class PluginLoadError(Exception):
    """A plugin could not be loaded; the message is one line naming the plugin and the cause."""


@dataclass
class PluginSpec:
    name: str
    module: bytes
    root_id: str = ""
    vm_id: str = ""
    vm_config: bytes = b""
    configuration: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    failure_policy: FailurePolicy = FailurePolicy.FAIL_CLOSE
    callback_deadline_ms: int = 1000
    memory_limit_bytes: int = 1 << 30


class WasmPlugin:
    """The HttpFilterFactory of one loaded plugin in one Runtime."""

    def __init__(self, runtime: Runtime, spec: PluginSpec, slot: VmSlot) -> None:
        self.name = spec.name
        self.spec = spec
        self.runtime = runtime
        self.slot = slot
        self.root: RootContext | None = None
        self.unloaded = False

    @property
    def vm(self) -> PluginVm:
        return self.slot.vm

    def create_filter(self) -> HttpFilter | None:
        if self.unloaded:
            return None
        vm = self.slot.vm
        if vm.failure is not None or self.root is None:
            policy = self.spec.failure_policy
            if policy == FailurePolicy.FAIL_OPEN:
                return None
            if policy == FailurePolicy.FAIL_RELOAD and self.runtime.try_reload(self.slot):
                return self.create_filter()
            return FailClosedFilter()
        return WasmHttpFilter(self, vm, self.root)


class FailClosedFilter(LocalReplyFilter):
    """Stands in for a failed plugin under FAIL_CLOSE: every stream gets a local 503."""

    def __init__(self) -> None:
        super().__init__(503, b"", FAIL_STREAM_DETAILS)


# Guest callback results → filter statuses, by index (cpp-host's convertVmCallResultToFilter*Status).
_HEADERS_STATUS = tuple(FilterHeadersStatus)
_DATA_STATUS = tuple(FilterDataStatus)
_HEADERS_CONTINUE = FilterHeadersStatus.CONTINUE
_HEADERS_STOP = FilterHeadersStatus.STOP_ITERATION
_HEADERS_STOP_ALL = FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK
_DATA_CONTINUE = FilterDataStatus.CONTINUE
_DATA_STOP_NO_BUFFER = FilterDataStatus.STOP_ITERATION_NO_BUFFER
_TRAILERS_CONTINUE = FilterTrailersStatus.CONTINUE
_TRAILERS_STOP = FilterTrailersStatus.STOP_ITERATION


class WasmHttpFilter(StreamContext):
    """One Proxy-Wasm stream context that is itself the Envoy HTTP filter driving it."""

    __slots__ = ("_plugin", "_vm", "_exports", "_failed", "_fail_open", "_honour_stop_iteration")

    def __init__(self, plugin: WasmPlugin, vm: PluginVm, root: RootContext) -> None:
        # Every field of Context and StreamContext set here, in one frame: this runs per request.
        self.vm = vm
        self.id = 0  # given by the VM on the first callback (PluginVm.add_stream)
        self.created = False
        self._source = None
        self._root = root
        self._plugin = plugin
        self._vm = vm
        self._exports = vm.stream_exports
        self._failed = False
        self._fail_open = plugin.spec.failure_policy == FailurePolicy.FAIL_OPEN
        self._honour_stop_iteration = vm.abi == AbiVersion.V0_2_100
        self.callbacks: FilterCallbacks | None = None
        self.request_headers: HeaderMap | None = None
        self.request_trailers: HeaderMap | None = None
        self.response_headers: HeaderMap | None = None
        self.response_trailers: HeaderMap | None = None
        self.request_body: bytearray | None = None
        self.response_body: bytearray | None = None
        self.in_decode = False
        self.in_encode = False
        self.resume_now = False
        self.local_reply_sent = False
        self.request_headers_held = False
        self.response_headers_held = False
        self.response_trailers_held = False
        self.in_log = False

    @property
    def context_id(self) -> int:
        return self.id

    def set_callbacks(self, callbacks: FilterCallbacks) -> None:
        self.callbacks = callbacks

    # -- guest calls with the failure policy ------------------------------------------------
    def _call(self, fn: GuestFunc | None, *args: int) -> int | None:
        """Run a stream callback; None if not exported or if the VM failed (policy applied).

        The stream context is created (proxy_on_context_create) before the first callback,
        exported or not, as Envoy does.

        PluginVm.call and GuestFunc.__call__, written out in this one frame: every stream
        callback of every request comes through here, and each Python frame costs about as
        much as the wasm crossing itself. Keep in step with those two (engine.py, vm.py).
        """
        if self._failed:
            return None
        vm = self._vm
        if not self.id:
            vm.add_stream(self)
            create = self._exports.context_create
            if create is not None:
                self._call(create, self._root.id)  # the context's id is set: no recursion beyond this
                if self._failed:
                    return None
            self.created = True
        try:
            # A VM that failed in between (a trap in on_tick, on_queue_ready, on_http_call_response)
            # fails this stream now, exported callback or not, as cpp-host's CHECK_FAIL does.
            if vm.failure is not None:
                raise vm.failure
            if fn is None:
                return None
            # PluginVm.call: this context is current and effective for the call.
            saved_current = vm._current
            saved_effective = vm._effective
            vm._current = vm._effective = self
            try:
                # GuestFunc.__call__: arguments into the ValRaw slots, deadline, raw call.
                try:
                    fn._pack_args(fn._vals_view, 0, self.id, *args)
                except struct.error:  # another arity (ABI 0.1.0 callbacks)
                    fn._set_args((self.id, *args))
                inst = fn._inst
                depth = inst._depth
                if depth == 0:
                    now = inst._clock.now
                    if now != inst._armed_at:
                        set_epoch_deadline(inst._ctx_p, inst._deadline_ticks_c)
                        inst._armed_at = now
                    inst._pending = None
                inst._depth = depth + 1
                try:
                    error = fn._call_raw(*fn._raw)
                finally:
                    inst._depth = depth
                if error or inst._trap.value:
                    inst._raise_failure(error)
                # Stream callbacks return i32 or nothing.
                result = fn._result_i32[0] if fn._returns_i32 else 0
            except ProcExit as exc:
                vm._fail(GuestFailure("trap", f"proc_exit({exc.code})", fn.name))
                raise vm.failure from None  # type: ignore[misc]
            except GuestFailure as exc:
                exc.name_function(fn.name)
                vm._fail(exc)
                raise
            finally:
                vm._current = saved_current
                vm._effective = saved_effective
            if saved_current is None and vm._deferred:
                vm._run_deferred()
            return result
        except GuestFailure as failure:
            self._failed = True
            self._plugin.runtime.report_failure(vm, failure)
            if not self._fail_open and self.callbacks is not None and not self.local_reply_sent:
                self.local_reply_sent = True
                self.callbacks.send_local_reply(503, b"", [], FAIL_STREAM_DETAILS)
            return None

    def _stopped_by_failure(self) -> bool:
        return self._failed and not self._fail_open

    def _stopped_by_reply_or_failure(self) -> bool:
        return self.local_reply_sent or (self._failed and not self._fail_open)

    def _headers_status(self, result: int | None) -> FilterHeadersStatus:
        if self.local_reply_sent or (self._failed and not self._fail_open):
            return _HEADERS_STOP_ALL
        if result is None or self.resume_now:
            return _HEADERS_CONTINUE
        if result >= _HEADERS_STOP_ALL or result < 0:
            return _HEADERS_STOP_ALL
        if result == _HEADERS_STOP and not self._honour_stop_iteration:
            # cpp-host: a headers "Pause" holds everything until proxy_continue_stream.
            return _HEADERS_STOP_ALL
        return _HEADERS_STATUS[result]

    def _data_status(self, result: int | None) -> FilterDataStatus:
        if self.local_reply_sent or (self._failed and not self._fail_open):
            return _DATA_STOP_NO_BUFFER
        if result is None or self.resume_now:
            return _DATA_CONTINUE
        if result >= _DATA_STOP_NO_BUFFER or result < 0:
            return _DATA_STOP_NO_BUFFER
        return _DATA_STATUS[result]

    def _trailers_status(self, result: int | None) -> FilterTrailersStatus:
        if self.local_reply_sent or (self._failed and not self._fail_open):
            return _TRAILERS_STOP
        if result is None or self.resume_now or result == 0:
            return _TRAILERS_CONTINUE
        return _TRAILERS_STOP

    def _decode(self, fn: GuestFunc | None, *args: int) -> int | None:
        self.in_decode = True
        self.resume_now = False
        try:
            return self._call(fn, *args)
        finally:
            self.in_decode = False

    def _encode(self, fn: GuestFunc | None, *args: int) -> int | None:
        self.in_encode = True
        self.resume_now = False
        try:
            return self._call(fn, *args)
        finally:
            self.in_encode = False

    # -- HttpFilter ---------------------------------------------------------------------
    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        # _decode written out: headers run on every request, on the latency path.
        self.request_headers = headers
        self.request_headers_held = True
        self.in_decode = True
        self.resume_now = False
        try:
            result = self._call(self._exports.request_headers, len(headers), end_stream)
        finally:
            self.in_decode = False
        # Anything but Continue keeps them readable, and so does a local reply or a failure (Envoy
        # stops there), until the stream is continued.
        held = bool(result) or self.local_reply_sent or self._failed
        self.request_headers_held = held and not self.resume_now
        if result == 0 and not self.local_reply_sent and not self._failed:
            return _HEADERS_CONTINUE  # the usual answer, without the _headers_status frame
        return self._headers_status(result)

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        self.request_body = data
        fn = self._exports.request_body
        if fn is None and self.id and self._vm.failure is None:  # header-only plugins: what _call(None) gives
            return _DATA_STOP_NO_BUFFER if self._stopped_by_reply_or_failure() else _DATA_CONTINUE
        return self._data_status(self._decode(fn, len(data), end_stream))

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        self.request_trailers = trailers
        fn = self._exports.request_trailers
        if fn is None and self.id and self._vm.failure is None:
            return _TRAILERS_STOP if self._stopped_by_reply_or_failure() else _TRAILERS_CONTINUE
        return self._trailers_status(self._decode(fn, len(trailers)))

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        self.response_headers = headers
        self.response_headers_held = True
        # A local reply sent while decoding (ours, or FAIL_CLOSE's 503) must pass this encoder (as Envoy).
        passthrough = self.local_reply_sent or (self._failed and not self._fail_open)
        self.in_encode = True  # _encode written out, as in decode_headers
        self.resume_now = False
        try:
            result = self._call(self._exports.response_headers, len(headers), end_stream)
        finally:
            self.in_encode = False
        self.response_headers_held = bool(result) and not self.resume_now
        status = self._headers_status(result)
        return _HEADERS_CONTINUE if passthrough else status

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        self.response_body = data
        if self._exports.response_body is None and self.id:
            return _DATA_CONTINUE  # nothing to call, and a reply or failure passes encoders anyway
        passthrough = self.local_reply_sent or self._stopped_by_failure()
        status = self._data_status(self._encode(self._exports.response_body, len(data), end_stream))
        return _DATA_CONTINUE if passthrough else status

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        self.response_trailers = trailers
        if self._exports.response_trailers is None and self.id:
            return _TRAILERS_CONTINUE
        passthrough = self.local_reply_sent or self._stopped_by_failure()
        self.response_trailers_held = True
        result = self._encode(self._exports.response_trailers, len(trailers))
        self.response_trailers_held = bool(result)
        status = self._trailers_status(result)
        return _TRAILERS_CONTINUE if passthrough else status

    def on_log(self) -> None:
        if self._vm.failure is not None:
            return  # cpp-host: no on_log on a failed VM, and no failure reply this late
        # Envoy creates the context first if the request never reached this filter.
        self.in_log = True
        try:
            self._call(self._exports.log)
        finally:
            self.in_log = False

    def on_destroy(self) -> None:
        if self.id:  # the context was started
            if not self._failed and self._vm.failure is None:
                self._call(self._exports.done)
                if self.created:  # PluginVm.delete_context, through the one-frame call path
                    self._call(self._exports.delete)
            self._vm.contexts.pop(self.id, None)
        self.callbacks = None
