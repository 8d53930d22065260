"""The sans-I/O HTTP filter manager: runs one exchange through a filter chain.

It follows Envoy's ``FilterManager`` (source/common/http/filter_manager.cc):

* decoder callbacks run in chain order, encoder callbacks in reverse order;
* ``STOP_ITERATION`` on headers holds the headers, but body chunks still reach the
  SAME filter; ``STOP_ALL_ITERATION_AND_BUFFER``/``_WATERMARK`` deliver nothing more
  to the filter (chunks are buffered) until it continues;
* ``STOP_ITERATION_AND_BUFFER`` on data buffers the chunk; the next chunk is handed
  to that filter together with everything buffered so far (the Proxy-Wasm view of
  a buffered body); ``STOP_ITERATION_NO_BUFFER`` forwards nothing and buffers
  nothing; ``_WATERMARK`` buffers and pauses the request source past the limit;
* ``continue_decoding``/``continue_encoding`` resume from the filter after the one
  that stopped (or from it, when it stopped everything and has not seen the data);
* one buffer per direction, bounded by ``buffer_limit``: past it a non-streaming
  buffer gives a 413 local reply (request) or 500 (response), as Envoy does;
* a local reply goes through the encoder callbacks of the filters that saw the
  request (Envoy runs a Wasm filter's response callbacks only when its request
  callbacks ran); once the response has started through the encoders it goes
  straight downstream; once response headers went downstream the stream is reset;
* ``on_log`` then ``on_destroy`` run exactly once per filter, whatever happened.

Transport contract beyond ``ExchangeSink`` (see ``wasmesh.http.exchange``): after a
local reply ``upstream_abandoned`` tells whether an upstream request had already
been started and must now be dropped; response events arriving after a local reply
are ignored. ``on_downstream_reset`` and a filter's ``reset_stream`` complete the
exchange themselves (``complete`` is idempotent).

Once ``complete`` ran, the manager lets go of its filters and its sink, so a
finished exchange is freed by reference counting alone (no cyclic garbage per
request: the sink usually points back at the manager, and filters hold callbacks).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Concatenate, ParamSpec, TypeVar

from wasmesh.http.exchange import ExchangeSink
from wasmesh.http.filter import (
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
    HttpFilter,
    HttpFilterFactory,
    StreamInfo,
)
from wasmesh.http.headers import HeaderMap

__all__ = [
    "FilterManager",
    "DEFAULT_BUFFER_LIMIT",
    "grpc_percent_encode",
    "http_to_grpc_status",
    "reason_phrase",
    "upstream_failure_body",
]

DEFAULT_BUFFER_LIMIT = 1 << 20  # Envoy's default per_connection_buffer_limit_bytes

_log = logging.getLogger(__name__)

_StatusT = TypeVar("_StatusT")
_P = ParamSpec("_P")
_R = TypeVar("_R")

# Envoy's CodeUtility::toString for the codes a filter manager emits itself.
_REASONS: dict[int, str] = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_RESET_BEFORE_RESPONSE = "upstream_reset_before_response_started{"


def upstream_failure_body(status: int, details: str) -> bytes:
    """The body Envoy's router sends for an upstream failure with these response details
    (kept identical to the proxy's pass-through path for chains without plugins)."""
    if details.startswith(_RESET_BEFORE_RESPONSE) and details.endswith("}"):
        # Envoy's details are its body's reason with spaces as underscores ("connection_termination").
        reason = details[len(_RESET_BEFORE_RESPONSE) : -1].replace("_", " ")
        return b"upstream connect error or disconnect/reset before headers. reset reason: " + reason.encode()
    if status == 504:
        return b"upstream request timeout"
    if status == 404:
        return b""
    return details.encode()


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def grpc_percent_encode(message: bytes) -> bytes:
    """grpc-message encoding (Envoy's Grpc::Utility::PercentEncoding): non-printables and '%'."""
    return b"".join(
        b"%%%02X" % byte if byte < 0x20 or byte > 0x7E or byte == 0x25 else bytes([byte]) for byte in message
    )


def http_to_grpc_status(http_status: int) -> int:
    """Envoy's Grpc::Utility::httpToGrpcStatus (used for gRPC local replies)."""
    return {
        400: 13,  # INTERNAL
        401: 16,  # UNAUTHENTICATED
        403: 7,  # PERMISSION_DENIED
        404: 12,  # UNIMPLEMENTED
        429: 14,  # UNAVAILABLE
        502: 14,
        503: 14,
        504: 14,
    }.get(http_status, 2)  # UNKNOWN


# A filter's iteration state in one direction. Plain ints, not an Enum: they are read and
# compared several times per filter per request, and an Enum member lookup costs ~10x more.
_ITERATING = 0
_STOPPED_SINGLE = 1  # headers held; data still reaches this filter
_STOPPED_ALL_BUFFER = 2  # nothing reaches this filter; data buffered
_STOPPED_ALL_WATERMARK = 3  # as above, and the source is paused past the limit
_STOPPED_ALL = (_STOPPED_ALL_BUFFER, _STOPPED_ALL_WATERMARK)

# The iteration state each stopping headers status leaves the filter in (anything else continues:
# CONTINUE, and CONTINUE_AND_END_STREAM which Envoy's Wasm filter maps to Continue).
_ITERATION_AFTER_HEADERS: dict[int, int] = {
    FilterHeadersStatus.STOP_ITERATION: _STOPPED_SINGLE,
    FilterHeadersStatus.STOP_ALL_ITERATION_AND_BUFFER: _STOPPED_ALL_BUFFER,
    FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK: _STOPPED_ALL_WATERMARK,
}
# Statuses compared on every filter call, as module names (an IntEnum member lookup is slower).
_HEADERS_STOP = FilterHeadersStatus.STOP_ITERATION
_DATA_CONTINUE = FilterDataStatus.CONTINUE
_DATA_STOP_NO_BUFFER = FilterDataStatus.STOP_ITERATION_NO_BUFFER
_DATA_STOP_WATERMARK = FilterDataStatus.STOP_ITERATION_AND_WATERMARK
_BUFFERING_DATA_STATUSES = frozenset(
    (FilterDataStatus.STOP_ITERATION_AND_BUFFER, FilterDataStatus.STOP_ITERATION_AND_WATERMARK)
)
_TRAILERS_CONTINUE = FilterTrailersStatus.CONTINUE
_TRAILERS_STOP = FilterTrailersStatus.STOP_ITERATION


def _entry_point(
    method: Callable[Concatenate[FilterManager, _P], _R],
) -> Callable[Concatenate[FilterManager, _P], _R]:
    """Wraps every way into the manager (events, and filters calling back): a completion
    requested while inside (a reset, a downstream disconnect) runs once the outermost call unwinds.
    (A plain wrapper, not a contextmanager: this runs several times per request.)"""

    @functools.wraps(method)
    def run(self: FilterManager, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        self._depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._complete_pending and not self._completed:
                self.complete()

    return run


class _Entry:
    """One filter's state in one direction (Envoy's ActiveStream{De,En}coderFilter)."""

    __slots__ = (
        "filter",
        "index",
        "iteration",
        "headers_called",
        "headers_continued",
        "end_stream",
        "iterate_from_current",
        "in_callback",
        "continue_requested",
    )

    def __init__(self, http_filter: HttpFilter, index: int) -> None:
        self.filter = http_filter
        self.index = index
        self.iteration = _ITERATING
        self.headers_called = False
        self.headers_continued = False
        self.end_stream = False
        self.iterate_from_current = False
        self.in_callback = False
        self.continue_requested = False


class _Direction:
    """Per-direction stream state: the held headers/trailers and the one shared buffer."""

    __slots__ = (
        "is_request",
        "entries",
        "headers",
        "trailers",
        "buffer",
        "buffer_holder",
        "streaming",
        "source_complete",
        "headers_sent",
        "done",
        "aborted",
    )

    def __init__(self, is_request: bool) -> None:
        self.is_request = is_request
        self.entries: list[_Entry] = []
        self.headers: HeaderMap | None = None
        self.trailers: HeaderMap | None = None
        self.buffer: bytearray | None = None
        self.buffer_holder: int | None = None  # index of the filter the buffered data stopped at
        self.streaming = False  # the buffer is a watermark (pause) buffer, not a bounded one
        self.source_complete = False  # the source sent end_stream
        self.headers_sent = False  # headers reached the sink
        self.done = False  # end of stream reached the sink
        self.aborted = False  # a local reply/reset stopped this direction's iteration


class _Callbacks:
    """The FilterCallbacks handed to one filter.

    It names its filter by chain position, not by holding the filter's entries: a filter that
    keeps its callbacks after on_destroy must not form a filter -> callbacks -> entry -> filter cycle.
    """

    __slots__ = ("_manager", "_index")

    def __init__(self, manager: FilterManager, index: int) -> None:
        self._manager = manager
        self._index = index

    @property
    def stream_info(self) -> StreamInfo:
        return self._manager.stream_info

    def request_headers(self) -> HeaderMap | None:
        return self._manager._request.headers

    def request_trailers(self) -> HeaderMap | None:
        return self._manager._request.trailers

    def response_headers(self) -> HeaderMap | None:
        return self._manager._response.headers

    def response_trailers(self) -> HeaderMap | None:
        return self._manager._response.trailers

    def continue_decoding(self) -> None:
        self._manager._continue(self._index, decoding=True)

    def continue_encoding(self) -> None:
        self._manager._continue(self._index, decoding=False)

    def send_local_reply(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        details: str,
        grpc_status: int | None = None,
    ) -> None:
        self._manager._filter_local_reply(status, body, headers, details, grpc_status)

    def reset_stream(self) -> None:
        self._manager._reset("filter_reset_stream")

    def clear_route_cache(self) -> None:
        self._manager.route_cache_cleared = True

    def add_request_trailers(self) -> HeaderMap:
        return self._manager._add_trailers(self._manager._request)

    def add_response_trailers(self) -> HeaderMap:
        return self._manager._add_trailers(self._manager._response)


class _CompletedSink:
    """The sink of a completed exchange: nothing reaches the transport any more (the manager
    dropped the real sink so that the transport and the manager do not keep each other alive)."""

    __slots__ = ()

    def upstream_request_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        pass

    def upstream_request_data(self, data: bytes, end_stream: bool) -> None:
        pass

    def upstream_request_trailers(self, trailers: HeaderMap) -> None:
        pass

    def downstream_response_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        pass

    def downstream_response_data(self, data: bytes, end_stream: bool) -> None:
        pass

    def downstream_response_trailers(self, trailers: HeaderMap) -> None:
        pass

    def reset(self, details: str) -> None:
        pass

    def pause_request_source(self) -> None:
        pass

    def resume_request_source(self) -> None:
        pass


_COMPLETED_SINK = _CompletedSink()


class FilterManager:
    """Drives one HTTP exchange through a chain of filters (see ``wasmesh.http.exchange``)."""

    __slots__ = (
        "_factories",
        "stream_info",
        "_sink",
        "buffer_limit",
        "_request",
        "_response",
        "_filters",
        "_chain_created",
        "_depth",
        "_complete_pending",
        "_completed",
        "_is_reset",
        "_source_paused",
        "_head_request",
        "_grpc_request",
        "local_reply_sent",
        "upstream_started",
        "upstream_abandoned",
        "route_cache_cleared",
    )

    def __init__(
        self,
        factories: Sequence[HttpFilterFactory],  # not copied: the proxy's chains are tuples
        stream_info: StreamInfo,
        sink: ExchangeSink,
        *,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    ) -> None:
        self._factories = factories
        self.stream_info = stream_info
        self._sink = sink
        self.buffer_limit = buffer_limit
        self._request = _Direction(True)
        self._response = _Direction(False)
        self._filters: list[HttpFilter] = []
        self._chain_created = False
        self._depth = 0
        self._complete_pending = False
        self._completed = False
        self._is_reset = False
        self._source_paused = False
        self._head_request = False
        self._grpc_request = False
        self.local_reply_sent = False
        self.upstream_started = False
        self.upstream_abandoned = False
        self.route_cache_cleared = False

    # ------------------------------------------------------------------ state
    @property
    def request_headers(self) -> HeaderMap | None:
        return self._request.headers

    @property
    def response_headers(self) -> HeaderMap | None:
        return self._response.headers

    @property
    def response_started(self) -> bool:
        """Response headers went downstream (a local reply can no longer replace them)."""
        return self._response.headers_sent

    @property
    def response_complete(self) -> bool:
        return self._response.done

    @property
    def request_complete(self) -> bool:
        """The whole request (end of stream) reached the upstream."""
        return self._request.done

    @property
    def is_reset(self) -> bool:
        return self._is_reset

    @property
    def completed(self) -> bool:
        return self._completed

    # ------------------------------------------------------ downstream events
    # The four events of every exchange run _entry_point's bookkeeping written out (one frame
    # fewer each, on the latency path); the rarer ways in keep the decorator.
    def on_request_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        if self._completed or self._is_reset or self._complete_pending or self._request.headers is not None:
            return
        self._depth += 1
        try:
            if not self._chain_created:
                self._create_chain()
            req = self._request
            req.headers = headers
            req.source_complete = end_stream
            # One pass over the (already lower-case) names instead of two HeaderMap.get calls.
            method = content_type = None
            for name, value in headers.pairs():
                if name == b":method":
                    if method is None:
                        method = value
                elif name == b"content-type" and content_type is None:
                    content_type = value
            self._head_request = method == b"HEAD"
            self._grpc_request = content_type is not None and content_type.startswith(b"application/grpc")
            self._iterate_headers(req, 0, end_stream)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._complete_pending and not self._completed:
                self.complete()

    def on_request_data(self, chunk: bytes, end_stream: bool) -> None:
        req = self._request
        if self._completed or self._is_reset or self._complete_pending or req.headers is None:
            return
        if req.source_complete:
            return
        self.stream_info.request_body_bytes += len(chunk)
        req.source_complete = end_stream
        if req.aborted:
            return
        self._depth += 1
        try:
            self._iterate_data(req, 0, bytearray(chunk), end_stream)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._complete_pending and not self._completed:
                self.complete()

    @_entry_point
    def on_request_trailers(self, trailers: HeaderMap) -> None:
        req = self._request
        if self._closed() or req.headers is None or req.source_complete:
            return
        req.source_complete = True
        req.trailers = trailers
        if req.aborted:
            return
        self._iterate_trailers(req, 0)

    @_entry_point
    def on_downstream_reset(self) -> None:
        """The client went away: no more callbacks except on_log/on_destroy, which run now."""
        if self._completed:
            return
        self._is_reset = True
        self.stream_info.response_code_details = (
            self.stream_info.response_code_details or "downstream_remote_disconnect"
        )
        self._complete_pending = True

    # -------------------------------------------------------- upstream events
    def on_response_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        resp = self._response
        if self._completed or self._is_reset or self._complete_pending or self.local_reply_sent:
            return
        if resp.headers is not None:
            return
        self._depth += 1
        try:
            if not self._chain_created:
                self._create_chain()
            resp.headers = headers
            resp.source_complete = end_stream
            # Envoy's router records these when upstream headers arrive, before any encoder runs.
            self._record_response_code(headers)
            self.stream_info.response_code_details = "via_upstream"
            self._iterate_headers(resp, 0, end_stream)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._complete_pending and not self._completed:
                self.complete()

    def on_response_data(self, chunk: bytes, end_stream: bool) -> None:
        resp = self._response
        if self._completed or self._is_reset or self._complete_pending or self.local_reply_sent:
            return
        if resp.headers is None or resp.source_complete:
            return
        resp.source_complete = end_stream
        if resp.aborted:
            return
        self._depth += 1
        try:
            self._iterate_data(resp, 0, bytearray(chunk), end_stream)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._complete_pending and not self._completed:
                self.complete()

    @_entry_point
    def on_response_trailers(self, trailers: HeaderMap) -> None:
        resp = self._response
        if self._closed() or self.local_reply_sent or resp.headers is None or resp.source_complete:
            return
        resp.source_complete = True
        resp.trailers = trailers
        if resp.aborted:
            return
        self._iterate_trailers(resp, 0)

    @_entry_point
    def on_upstream_failure(self, status: int, details: str, body: bytes | None = None) -> None:
        """The upstream could not answer (503 refused/reset, 504 timeout): Envoy's router local reply."""
        if self._closed() or self.local_reply_sent:
            return
        if body is None:
            body = upstream_failure_body(status, details)
        self._create_chain()
        # The router is the last decoder filter: every filter sees its reply.
        self._send_local_reply(status, body, [], details, None, from_router=True)

    def complete(self) -> None:
        """The exchange is over: every filter gets on_log, then on_destroy, exactly once."""
        if self._completed:
            return
        if self._depth > 0:
            self._complete_pending = True
            return
        self._completed = True
        self._request.aborted = True
        self._response.aborted = True
        self.stream_info.complete_monotonic_ns = time.monotonic_ns()
        for http_filter in self._filters:
            try:
                http_filter.on_log()
            except Exception:  # a broken filter must not keep the others from logging
                _log.exception("filter on_log raised")
        for http_filter in self._filters:
            try:
                http_filter.on_destroy()
            except Exception:
                _log.exception("filter on_destroy raised")
        # Let go of everything that may point back here (the sink usually holds this manager,
        # filters hold their callbacks): the exchange is then freed by reference counting.
        # The held headers, stream info and outcome flags stay readable.
        self._filters = []
        self._request.entries = []
        self._response.entries = []
        self._sink = _COMPLETED_SINK

    # --------------------------------------------------------------- internals

    def _closed(self) -> bool:
        return self._completed or self._is_reset or self._complete_pending

    def _create_chain(self) -> None:
        if self._chain_created:
            return
        self._chain_created = True
        for factory in self._factories:
            http_filter = factory.create_filter()
            if http_filter is not None:
                self._filters.append(http_filter)
        count = len(self._filters)
        for index, http_filter in enumerate(self._filters):
            decoder = _Entry(http_filter, index)
            # Encoders run in reverse: the last filter of the chain encodes first.
            encoder = _Entry(http_filter, count - 1 - index)
            self._request.entries.append(decoder)
            self._response.entries.insert(0, encoder)
            http_filter.set_callbacks(_Callbacks(self, index))

    def _skip_encoder(self, direction: _Direction, entry: _Entry) -> bool:
        """Filters that never saw the request do not see the response (a local reply)."""
        if direction.is_request:
            return False
        decoders = self._request.entries
        return not decoders[len(decoders) - 1 - entry.index].headers_called

    def _invoke(
        self,
        direction: _Direction,
        entry: _Entry,
        stop: _StatusT,
        hook: Callable[..., _StatusT],
        *args: object,
    ) -> _StatusT:
        """Run one filter callback; a raising filter fails the exchange and reads as ``stop``."""
        entry.in_callback = True
        try:
            status = hook(*args)
        except Exception as exc:
            entry.in_callback = False
            self._filter_raised(direction, exc)
            return stop
        entry.in_callback = False
        if direction.aborted:
            return stop
        return status

    def _filter_raised(self, direction: _Direction, exc: Exception) -> None:
        _log.exception("filter raised during %s", "decoding" if direction.is_request else "encoding")
        self._filter_failed(f"filter_raised_{type(exc).__name__}")

    def _filter_failed(self, details: str) -> None:
        if self._closed():
            return
        if self.local_reply_sent or self._response.headers_sent:
            self._reset(details)
        else:
            self._send_local_reply(500, b"", [], details, None)

    # Headers ----------------------------------------------------------------
    def _iterate_headers(self, d: _Direction, start: int, end_stream: bool) -> None:
        headers = d.headers
        assert headers is not None
        is_request = d.is_request
        decoders = self._request.entries
        last = len(decoders) - 1
        for entry in d.entries[start:] if start else d.entries:
            # _skip_encoder, written out (headers run for every filter of every request).
            if not is_request and not decoders[last - entry.index].headers_called:
                continue
            entry.end_stream = end_stream
            entry.continue_requested = False
            # Marked before the call: a local reply sent from inside it reaches this filter's encoder.
            entry.headers_called = True
            # _invoke, written out.
            entry.in_callback = True
            try:
                if is_request:
                    status = entry.filter.decode_headers(headers, end_stream)
                else:
                    status = entry.filter.encode_headers(headers, end_stream)
            except Exception as exc:
                entry.in_callback = False
                self._filter_raised(d, exc)
                status = _HEADERS_STOP
            entry.in_callback = False
            if d.aborted:
                return
            iteration = _ITERATION_AFTER_HEADERS.get(status)
            if iteration is None:
                entry.headers_continued = True
                continue
            entry.iteration = iteration
            if entry.continue_requested:  # continue called from inside the callback
                self._common_continue(d, entry)
            return
        self._emit_headers(d, headers, end_stream)

    def _emit_headers(self, d: _Direction, headers: HeaderMap, end_stream: bool) -> None:
        d.headers_sent = True
        if end_stream:
            d.done = True
        if d.is_request:
            self.upstream_started = True
            self._sink.upstream_request_headers(headers, end_stream)
        else:
            self._record_response_code(headers)
            self._sink.downstream_response_headers(headers, end_stream)

    def _record_response_code(self, headers: HeaderMap) -> None:
        # HeaderMap.get, written out: names are lower-case already and :status comes first.
        for name, status in headers.pairs():
            if name == b":status":
                if status.isdigit():
                    self.stream_info.response_code = int(status)
                return

    # Data -------------------------------------------------------------------
    def _iterate_data(self, d: _Direction, start: int, data: bytearray, end_stream: bool) -> None:
        trailers_at_start = d.trailers is not None
        trailers_added_at: int | None = None
        is_request = d.is_request
        decoders = self._request.entries
        last = len(decoders) - 1
        for entry in d.entries[start:] if start else d.entries:
            # _skip_encoder, written out.
            if not is_request and not decoders[last - entry.index].headers_called:
                continue
            if entry.iteration in _STOPPED_ALL:
                d.streaming = entry.iteration == _STOPPED_ALL_WATERMARK
                self._buffer_data(d, entry, data)
                return
            if entry.end_stream:
                return
            entry.end_stream = end_stream and d.trailers is None
            if d.buffer_holder == entry.index and d.buffer is not None and data is not d.buffer:
                # The filter buffered earlier chunks: it sees the whole body so far.
                d.buffer.extend(data)
                data = d.buffer
                if len(data) > self.buffer_limit:
                    self._buffer_over_limit(d)
                    if d.aborted or self._closed():
                        return
            entry.continue_requested = False
            # _invoke, written out.
            entry.in_callback = True
            try:
                if is_request:
                    status = entry.filter.decode_data(data, entry.end_stream)
                else:
                    status = entry.filter.encode_data(data, entry.end_stream)
            except Exception as exc:
                entry.in_callback = False
                self._filter_raised(d, exc)
                status = _DATA_STOP_NO_BUFFER
            entry.in_callback = False
            if d.aborted:
                return
            if not trailers_at_start and d.trailers is not None and trailers_added_at is None:
                trailers_added_at = entry.index
            if not self._after_data(d, entry, status, data):
                return
        modified_end_stream = end_stream and trailers_added_at is None
        self._emit_data(d, data, modified_end_stream)
        if trailers_added_at is not None and not d.aborted:
            self._iterate_trailers(d, trailers_added_at + 1)

    def _after_data(self, d: _Direction, entry: _Entry, status: FilterDataStatus, data: bytearray) -> bool:
        """Envoy's commonHandleAfterDataCallback: True = keep iterating."""
        if status == _DATA_CONTINUE:
            if entry.iteration == _STOPPED_SINGLE:
                # The filter held the headers (or buffered) and now lets everything go.
                self._buffer_data(d, entry, data)
                self._common_continue(d, entry)
                return False
            return True
        entry.iteration = _STOPPED_SINGLE
        if status in _BUFFERING_DATA_STATUSES:
            d.streaming = status == _DATA_STOP_WATERMARK
            self._buffer_data(d, entry, data)
        elif data is d.buffer:
            d.buffer_holder = entry.index  # what was buffered stays buffered
        elif d.source_complete and d.trailers is None and d.buffer is None:
            # The last chunk was dropped: keep an empty buffer so that continuing
            # later still delivers end_stream downstream.
            d.buffer = bytearray()
            d.buffer_holder = entry.index
        if entry.continue_requested and not d.aborted:
            self._common_continue(d, entry)
        return False

    def _buffer_data(self, d: _Direction, entry: _Entry, data: bytearray) -> None:
        d.buffer_holder = entry.index
        if data is d.buffer:
            return
        if d.buffer is None:
            d.buffer = bytearray()
        d.buffer.extend(data)
        if len(d.buffer) > self.buffer_limit:
            self._buffer_over_limit(d)

    def _buffer_over_limit(self, d: _Direction) -> None:
        if d.streaming:
            if d.is_request and not self._source_paused:
                self._source_paused = True
                self._sink.pause_request_source()
            return
        if d.is_request:
            self._send_local_reply(413, b"Payload Too Large", [], "request_payload_too_large", None)
        else:
            self._send_local_reply(500, b"Internal Server Error", [], "response_payload_too_large", None)

    def _emit_data(self, d: _Direction, data: bytearray, end_stream: bool) -> None:
        payload = bytes(data)
        if data is d.buffer:
            d.buffer = None
            d.buffer_holder = None
            if d.is_request and self._source_paused:
                self._source_paused = False
                self._sink.resume_request_source()
        if end_stream:
            d.done = True
        if d.is_request:
            self._sink.upstream_request_data(payload, end_stream)
        else:
            self.stream_info.response_body_bytes += len(payload)
            self._sink.downstream_response_data(payload, end_stream)

    # Trailers ---------------------------------------------------------------
    def _iterate_trailers(self, d: _Direction, start: int) -> None:
        trailers = d.trailers
        assert trailers is not None
        for entry in d.entries[start:]:
            if self._skip_encoder(d, entry):
                continue
            if entry.iteration in _STOPPED_ALL:
                return
            entry.continue_requested = False
            hook = entry.filter.decode_trailers if d.is_request else entry.filter.encode_trailers
            status = self._invoke(d, entry, _TRAILERS_STOP, hook, trailers)
            entry.end_stream = True
            if d.aborted:
                return
            if status == _TRAILERS_CONTINUE:
                if entry.iteration == _STOPPED_SINGLE:
                    self._common_continue(d, entry)
                    return
                continue
            entry.iteration = _STOPPED_SINGLE
            if entry.continue_requested:
                self._common_continue(d, entry)
            return
        d.done = True
        if d.is_request:
            self._sink.upstream_request_trailers(trailers)
        else:
            self._sink.downstream_response_trailers(trailers)

    def _add_trailers(self, d: _Direction) -> HeaderMap:
        if d.trailers is None:
            d.trailers = HeaderMap()
        return d.trailers

    # Continue ---------------------------------------------------------------
    @_entry_point
    def _continue(self, filter_index: int, *, decoding: bool) -> None:
        """A filter's continue_decoding/continue_encoding (also later, from a timer or an http_call)."""
        d = self._request if decoding else self._response
        if self._closed() or d.aborted:
            return
        # Encoders are stored in reverse chain order.
        entry = d.entries[filter_index if decoding else len(d.entries) - 1 - filter_index]
        if entry.in_callback:
            # Envoy's Wasm filter defers a continue issued inside its own callback
            # until that callback returned; the status is applied first.
            entry.continue_requested = True
            return
        self._common_continue(d, entry)

    def _common_continue(self, d: _Direction, entry: _Entry) -> None:
        """Envoy's ActiveStreamFilterBase::commonContinue."""
        entry.continue_requested = False
        if self._closed() or d.aborted:
            return
        if entry.iteration == _ITERATING:
            return  # nothing is held by this filter
        if entry.iteration in _STOPPED_ALL:
            entry.iterate_from_current = True
        entry.iteration = _ITERATING
        if not entry.headers_continued:
            entry.headers_continued = True
            end_stream = d.source_complete and d.buffer is None and d.trailers is None
            self._iterate_headers(d, entry.index + 1, end_stream)
            if d.aborted:
                return
        had_trailers = d.trailers is not None
        if d.buffer is not None:
            start = entry.index if entry.iterate_from_current else entry.index + 1
            self._iterate_data(d, start, d.buffer, d.source_complete and not had_trailers)
            if d.aborted:
                return
        if had_trailers:
            start = entry.index if entry.iterate_from_current else entry.index + 1
            self._iterate_trailers(d, start)
        entry.iterate_from_current = False

    # Local reply / reset ----------------------------------------------------
    @_entry_point
    def _filter_local_reply(
        self,
        status: int,
        body: bytes,
        extra_headers: list[tuple[bytes, bytes]],
        details: str,
        grpc_status: int | None,
    ) -> None:
        """A filter's send_local_reply (it may come from a timer or an http_call answer)."""
        self._send_local_reply(status, body, extra_headers, details, grpc_status)

    def _send_local_reply(
        self,
        status: int,
        body: bytes,
        extra_headers: list[tuple[bytes, bytes]],
        details: str,
        grpc_status: int | None,
        *,
        from_router: bool = False,
    ) -> None:
        if self._closed():
            return
        resp = self._response
        if resp.headers_sent:
            # Envoy: prior headers were already sent downstream; all it can do is reset.
            self._reset(details)
            return
        # Nothing more goes upstream; an upstream request already under way is dropped
        # (the router's own replies come from a failed upstream: nothing left to drop).
        self._request.aborted = True
        if self.upstream_started and not from_router and not resp.source_complete:
            self.upstream_abandoned = True
        self.local_reply_sent = True
        self.stream_info.response_code_details = details
        headers, body = self._local_reply_message(status, body, extra_headers, grpc_status)
        self._record_response_code(headers)
        end_stream = not body
        if resp.headers is None:
            # The response has not started: through the encoder filters.
            resp.headers = headers
            resp.source_complete = True
            self._iterate_headers(resp, 0, end_stream)
            if body and not resp.aborted and not self._closed():
                self._iterate_data(resp, 0, bytearray(body), True)
        else:
            # The response is inside the encoder filters: bypass them (Envoy's sendDirectLocalReply).
            resp.aborted = True
            resp.headers = headers
            resp.buffer = None
            self._emit_headers(resp, headers, end_stream)
            if body and not self._closed():
                self._emit_data(resp, bytearray(body), True)

    def _local_reply_message(
        self, status: int, body: bytes, extra_headers: list[tuple[bytes, bytes]], grpc_status: int | None
    ) -> tuple[HeaderMap, bytes]:
        """Envoy's Utility::prepareLocalReply: the headers and body of a local reply."""
        headers = HeaderMap([(b":status", str(status).encode())])
        for name, value in extra_headers:
            headers.add(name, value)
        if self._grpc_request:
            # gRPC clients need a trailers-only response: HTTP 200 with grpc-status.
            headers.set(b":status", b"200")
            headers.set(b"content-type", b"application/grpc")
            code = grpc_status if grpc_status is not None else http_to_grpc_status(status)
            headers.set(b"grpc-status", str(code).encode())
            if body:
                headers.set(b"grpc-message", grpc_percent_encode(body))
            return headers, b""
        if body and not self._head_request:
            headers.set(b"content-length", str(len(body)).encode())
            if headers.get(b"content-type") is None:
                headers.add(b"content-type", b"text/plain")
            return headers, body
        headers.remove(b"content-length")
        headers.remove(b"content-type")
        return headers, b""

    @_entry_point
    def _reset(self, details: str) -> None:
        if self._closed():
            return
        self._is_reset = True
        self._request.aborted = True
        self._response.aborted = True
        if self.upstream_started and not self._response.done:
            self.upstream_abandoned = True
        self.stream_info.response_code_details = details
        self._sink.reset(details)
        self._complete_pending = True
