"""Context objects: what every host call acts on (cpp-host's ContextBase, narrowed).

Host calls are written once against ``Context``; the root (plugin) context and the
per-stream context each override only what they can offer. Anything a context
cannot offer answers the status Envoy gives in that case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wasmesh.http.filter import FilterCallbacks
from wasmesh.http.headers import HeaderMap
from wasmesh.runtime.abi import BufferType, MapType, StreamType, WasmResult
from wasmesh.runtime.properties import PropertySource

if TYPE_CHECKING:
    from wasmesh.runtime.vm import PluginVm


@dataclass
class HttpCallResponse:
    """An http_call answer, as the HttpCaller hands it back (headers include ``:status``)."""

    headers: HeaderMap
    body: bytes = b""
    trailers: HeaderMap = field(default_factory=HeaderMap)


@dataclass
class PluginIdentity:
    name: str
    root_id: str
    vm_id: str
    configuration: bytes
    vm_config: bytes


class Context:
    """Base context: only the VM-wide scratch (callout responses, call data)."""

    __slots__ = ("vm", "id", "created", "_source")  # RootContext (no __slots__) gets a __dict__

    vm: PluginVm
    id: int
    created: bool
    _source: PropertySource | None

    def __init__(self, vm: PluginVm, context_id: int) -> None:
        self.vm = vm
        self.id = context_id
        self.created = False
        self._source: PropertySource | None = None

    @property
    def root(self) -> RootContext:
        raise NotImplementedError

    # -- maps ------------------------------------------------------------------------
    def header_map(self, map_type: int) -> HeaderMap | None:
        response = self.vm.http_call_response
        if response is not None:
            if map_type == MapType.HTTP_CALL_RESPONSE_HEADERS:
                return response.headers
            if map_type == MapType.HTTP_CALL_RESPONSE_TRAILERS:
                return response.trailers
        return None

    def writable_header_map(self, map_type: int) -> HeaderMap | None:
        """The map a plugin may change, or None (only a stream's own maps are writable)."""
        return None

    # -- buffers ----------------------------------------------------------------------
    def buffer(self, buffer_type: int) -> bytes | bytearray | None:
        if buffer_type == BufferType.HTTP_CALL_RESPONSE_BODY and self.vm.http_call_response is not None:
            return self.vm.http_call_response.body
        if buffer_type == BufferType.CALL_DATA and self.vm.call_data is not None:
            return self.vm.call_data
        return None

    def set_buffer(self, buffer_type: int, start: int, size: int, data: bytes) -> WasmResult:
        return WasmResult.BAD_ARGUMENT if self.buffer(buffer_type) is not None else WasmResult.NOT_FOUND

    # -- stream control -----------------------------------------------------------------
    def continue_stream(self, stream_type: int) -> WasmResult:
        return WasmResult.NOT_FOUND

    def close_stream(self, stream_type: int) -> WasmResult:
        return WasmResult.NOT_FOUND

    def send_local_response(
        self,
        status: int,
        details: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        grpc_status: int | None,
    ) -> WasmResult:
        return WasmResult.NOT_FOUND

    def clear_route_cache(self) -> WasmResult:
        return WasmResult.OK

    def property_source(self) -> PropertySource:
        """What properties are read from; built once per context (its plugin fields never change)."""
        if self._source is None:
            root = self.root
            self._source = PropertySource(
                plugin_name=root.identity.name,
                root_id=root.identity.root_id,
                vm_id=root.identity.vm_id,
                node=self.vm.services.node,
                root_state=root.filter_state,
            )
        return self._source


class RootContext(Context):
    """One per plugin (root_id) on a VM: configuration, timers, callouts, status."""

    def __init__(self, vm: PluginVm, context_id: int, identity: PluginIdentity) -> None:
        super().__init__(vm, context_id)
        self.identity = identity
        self.filter_state: dict[str, bytes] = {}
        self.tick_period_ms = 0
        self.tick_handle: Any = None
        self.status: tuple[int, bytes] = (0, b"")
        self.pending_http_calls: set[int] = set()
        self.done_pending = False
        self.deleted = False

    @property
    def root(self) -> RootContext:
        return self

    def buffer(self, buffer_type: int) -> bytes | bytearray | None:
        if buffer_type == BufferType.VM_CONFIGURATION:
            return self.identity.vm_config
        if buffer_type == BufferType.PLUGIN_CONFIGURATION:
            return self.identity.configuration
        return super().buffer(buffer_type)


# Plain ints: compared on every header host call.
_REQUEST_HEADERS = int(MapType.HTTP_REQUEST_HEADERS)
_REQUEST_TRAILERS = int(MapType.HTTP_REQUEST_TRAILERS)
_RESPONSE_HEADERS = int(MapType.HTTP_RESPONSE_HEADERS)
_RESPONSE_TRAILERS = int(MapType.HTTP_RESPONSE_TRAILERS)


class StreamContext(Context):
    """One per HTTP exchange; the HTTP filter itself (plugin.WasmHttpFilter), as in Envoy, where the
    Wasm ``Context`` is both the proxy-wasm context and the ``Http::StreamFilter``.

    No constructor of its own: the filter sets every field below in one frame (one per request).
    ``id`` stays 0 until the VM starts the context (proxy_on_context_create, on the first callback).
    """

    __slots__ = (
        "_root", "callbacks", "request_headers", "request_trailers", "response_headers",
        "response_trailers", "request_body", "response_body", "in_decode", "in_encode", "resume_now",
        "local_reply_sent", "request_headers_held", "response_headers_held", "response_trailers_held",
        "in_log",
    )  # fmt: skip

    _root: RootContext
    callbacks: FilterCallbacks | None
    request_headers: HeaderMap | None
    request_trailers: HeaderMap | None
    response_headers: HeaderMap | None
    response_trailers: HeaderMap | None
    request_body: bytearray | None
    response_body: bytearray | None
    # Set while the filter is inside its own decode_*/encode_* call, so a continue
    # asked for during that call becomes its return value instead of a re-entrant resume.
    in_decode: bool
    in_encode: bool
    resume_now: bool
    local_reply_sent: bool
    # Envoy's Wasm context lets properties read a header map during its own callback and, after
    # it, only while the plugin holds the stream there (the callback did not return Continue, and
    # no proxy_continue_stream since); on_log reads the final maps. These flags say which maps
    # properties may read now.
    request_headers_held: bool
    response_headers_held: bool
    response_trailers_held: bool
    in_log: bool

    @property
    def root(self) -> RootContext:
        return self._root

    def writable_header_map(self, map_type: int) -> HeaderMap | None:
        if map_type == _REQUEST_HEADERS:
            return self.request_headers
        if map_type == _RESPONSE_HEADERS:
            return self.response_headers
        if map_type == _REQUEST_TRAILERS:
            return self.request_trailers
        if map_type == _RESPONSE_TRAILERS:
            return self.response_trailers
        return None

    def header_map(self, map_type: int) -> HeaderMap | None:
        found = self.writable_header_map(map_type)
        return found if found is not None else super().header_map(map_type)

    def buffer(self, buffer_type: int) -> bytes | bytearray | None:
        if buffer_type == BufferType.HTTP_REQUEST_BODY:
            return self.request_body
        if buffer_type == BufferType.HTTP_RESPONSE_BODY:
            return self.response_body
        return super().buffer(buffer_type)

    def set_buffer(self, buffer_type: int, start: int, size: int, data: bytes) -> WasmResult:
        if buffer_type == BufferType.HTTP_REQUEST_BODY:
            body = self.request_body
        elif buffer_type == BufferType.HTTP_RESPONSE_BODY:
            body = self.response_body
        else:
            return super().set_buffer(buffer_type, start, size, data)
        if body is None:
            return WasmResult.NOT_FOUND
        # Envoy supports only "replace a prefix" (start 0) and "append" (start >= len).
        if start == 0:
            del body[: min(size, len(body))]
            body[0:0] = data
        elif start >= len(body):
            body += data
        else:
            return WasmResult.BAD_ARGUMENT
        return WasmResult.OK

    # -- stream control, deferred until the VM call returns (Envoy addAfterVmCallAction) --
    def continue_stream(self, stream_type: int) -> WasmResult:
        if stream_type not in (StreamType.HTTP_REQUEST, StreamType.HTTP_RESPONSE):
            return WasmResult.UNIMPLEMENTED if stream_type == StreamType.UPSTREAM else WasmResult.BAD_ARGUMENT
        self.vm.defer(lambda: self._resume(stream_type))
        return WasmResult.OK

    def _resume(self, stream_type: int) -> None:
        if self.callbacks is None or self.local_reply_sent:
            return
        # A held header map is no longer readable to properties once its stream moves on (Envoy).
        if stream_type == StreamType.HTTP_REQUEST:
            self.request_headers_held = False
            if self.in_decode:
                self.resume_now = True
            else:
                self.callbacks.continue_decoding()
        else:
            self.response_headers_held = False
            if self.in_encode:
                self.resume_now = True
            else:
                self.callbacks.continue_encoding()

    def close_stream(self, stream_type: int) -> WasmResult:
        if stream_type > StreamType.UPSTREAM:
            return WasmResult.BAD_ARGUMENT
        callbacks = self.callbacks
        if callbacks is not None:
            self.vm.defer(callbacks.reset_stream)
        return WasmResult.OK

    def send_local_response(
        self,
        status: int,
        details: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        grpc_status: int | None,
    ) -> WasmResult:
        if self.callbacks is None:
            return WasmResult.NOT_FOUND

        def reply() -> None:
            if self.callbacks is None or self.local_reply_sent:
                return
            self.local_reply_sent = True
            self.callbacks.send_local_reply(status, body, headers, details, grpc_status)

        # Sent once the callback returns; the callback's own return value is then ignored, as in
        # Envoy (the filter's status reads local_reply_sent, set by reply()).
        self.vm.defer(reply)
        return WasmResult.OK

    def clear_route_cache(self) -> WasmResult:
        callbacks = self.callbacks
        if callbacks is not None:
            callbacks.clear_route_cache()
        return WasmResult.OK

    def property_source(self) -> PropertySource:
        source = super().property_source()
        callbacks = self.callbacks
        # The stream's side changes as the exchange moves on: refresh it on every read.
        source.stream_info = callbacks.stream_info if callbacks is not None else None
        in_log = self.in_log
        source.request_headers = self.request_headers if in_log or self.request_headers_held else None
        source.response_headers = self.response_headers if in_log or self.response_headers_held else None
        source.response_trailers = self.response_trailers if in_log or self.response_trailers_held else None
        return source


Action = Callable[[], None]
