"""Plugins as HTTP filters: the filter factory per configured plugin, and the per-stream filter.

Envoy's per-stream order: context create → request headers/body/trailers → response
headers/body/trailers → on_log → on_done → on_delete. Callback results are converted
as proxy-wasm-cpp-host does (``convertVmCallResultToFilter*Status``).
"""

from __future__ import annotations

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
from wasmesh.runtime.engine import GuestFailure, GuestFunc

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


class WasmHttpFilter:
    """One Proxy-Wasm stream context driven as an Envoy HTTP filter (implements StreamHooks)."""

    __slots__ = (
        "_plugin", "_vm", "_root", "_exports", "_ctx", "_failed", "_fail_open", "_honour_stop_iteration",
        "callbacks", "request_headers", "request_trailers", "response_headers", "response_trailers",
        "request_body", "response_body", "in_decode", "in_encode", "resume_now", "local_reply_sent",
    )  # fmt: skip

    def __init__(self, plugin: WasmPlugin, vm: PluginVm, root: RootContext) -> None:
        self._plugin = plugin
        self._vm = vm
        self._root = root
        self._exports = vm.stream_exports
        self._ctx: StreamContext | None = None
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

    @property
    def context_id(self) -> int:
        return self._ctx.id if self._ctx is not None else 0

    def set_callbacks(self, callbacks: FilterCallbacks) -> None:
        self.callbacks = callbacks

    # -- guest calls with the failure policy ------------------------------------------------
    def _call(self, fn: GuestFunc | None, *args: int) -> int | None:
        """Run a stream callback; None if not exported or if the VM failed (policy applied).

        The stream context is created (proxy_on_context_create) before the first callback,
        exported or not, as Envoy does.
        """
        if self._failed:
            return None
        try:
            ctx = self._ctx
            if ctx is None:
                ctx = self._ctx = self._vm.create_stream(self._root, self)
            if fn is None:
                return None
            return self._vm.call(ctx, fn, ctx.id, *args)
        except GuestFailure as failure:
            self._failed = True
            self._plugin.runtime.report_failure(self._vm, failure)
            if not self._fail_open and self.callbacks is not None and not self.local_reply_sent:
                self.local_reply_sent = True
                self.callbacks.send_local_reply(503, b"", [], FAIL_STREAM_DETAILS)
            return None

    def _stopped_by_failure(self) -> bool:
        return self._failed and not self._fail_open

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
        self.in_decode = True
        self.resume_now = False
        try:
            result = self._call(self._exports.request_headers, len(headers), end_stream)
        finally:
            self.in_decode = False
        return self._headers_status(result)

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        self.request_body = data
        return self._data_status(self._decode(self._exports.request_body, len(data), end_stream))

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        self.request_trailers = trailers
        return self._trailers_status(self._decode(self._exports.request_trailers, len(trailers)))

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        self.response_headers = headers
        # A local reply sent while decoding (ours, or FAIL_CLOSE's 503) must pass this encoder (as Envoy).
        passthrough = self.local_reply_sent or (self._failed and not self._fail_open)
        self.in_encode = True  # _encode written out, as in decode_headers
        self.resume_now = False
        try:
            result = self._call(self._exports.response_headers, len(headers), end_stream)
        finally:
            self.in_encode = False
        status = self._headers_status(result)
        return _HEADERS_CONTINUE if passthrough else status

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        self.response_body = data
        passthrough = self.local_reply_sent or self._stopped_by_failure()
        status = self._data_status(self._encode(self._exports.response_body, len(data), end_stream))
        return _DATA_CONTINUE if passthrough else status

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        self.response_trailers = trailers
        passthrough = self.local_reply_sent or self._stopped_by_failure()
        status = self._trailers_status(self._encode(self._exports.response_trailers, len(trailers)))
        return _TRAILERS_CONTINUE if passthrough else status

    def on_log(self) -> None:
        # Envoy creates the context first if the request never reached this filter.
        self._call(self._exports.log)

    def on_destroy(self) -> None:
        ctx = self._ctx
        if ctx is not None and not self._failed and self._vm.failure is None:
            self._call(self._exports.done)
            if not self._failed:
                try:
                    self._vm.delete_context(ctx)
                except GuestFailure as failure:
                    self._failed = True
                    self._plugin.runtime.report_failure(self._vm, failure)
        elif ctx is not None:
            self._vm.contexts.pop(ctx.id, None)
        self._ctx = None
        self.callbacks = None
