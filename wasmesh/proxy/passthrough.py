"""The filter manager for an empty chain: events go straight to the sink.

Same API as ``wasmesh.http.filter_manager.FilterManager`` (see wasmesh/http/exchange.py)
so the proxy drives both alike; used when a listener has no plugins, which keeps the
plain-proxy path free of filter bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from wasmesh.http.exchange import ExchangeSink
from wasmesh.http.filter import HttpFilterFactory, StreamInfo
from wasmesh.http.filter_manager import FilterManager, upstream_failure_body
from wasmesh.http.headers import HeaderMap


class FilterManagerLike(Protocol):
    """The slice of the FilterManager API the proxy uses."""

    def on_request_headers(self, headers: HeaderMap, end_stream: bool) -> None: ...
    def on_request_data(self, data: bytes, end_stream: bool) -> None: ...
    def on_request_trailers(self, trailers: HeaderMap) -> None: ...
    def on_response_headers(self, headers: HeaderMap, end_stream: bool) -> None: ...
    def on_response_data(self, data: bytes, end_stream: bool) -> None: ...
    def on_response_trailers(self, trailers: HeaderMap) -> None: ...
    def on_downstream_reset(self) -> None: ...
    def on_upstream_failure(self, status: int, details: str) -> None: ...
    def complete(self) -> None: ...


class PassThroughFilterManager:
    __slots__ = ("_sink", "_info", "_response_started")

    def __init__(self, stream_info: StreamInfo, sink: ExchangeSink) -> None:
        self._sink = sink
        self._info = stream_info
        self._response_started = False

    def on_request_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self._sink.upstream_request_headers(headers, end_stream)

    def on_request_data(self, data: bytes, end_stream: bool) -> None:
        self._info.request_body_bytes += len(data)
        self._sink.upstream_request_data(data, end_stream)

    def on_request_trailers(self, trailers: HeaderMap) -> None:
        self._sink.upstream_request_trailers(trailers)

    def on_response_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self._response_started = True
        self._sink.downstream_response_headers(headers, end_stream)

    def on_response_data(self, data: bytes, end_stream: bool) -> None:
        self._info.response_body_bytes += len(data)
        self._sink.downstream_response_data(data, end_stream)

    def on_response_trailers(self, trailers: HeaderMap) -> None:
        self._sink.downstream_response_trailers(trailers)

    def on_downstream_reset(self) -> None:
        pass

    def on_upstream_failure(self, status: int, details: str) -> None:
        if self._response_started:
            self._sink.reset(details)
            return
        self._response_started = True
        body = upstream_failure_body(status, details)
        self._info.response_code_details = details
        headers = HeaderMap.from_lowercase(
            [
                (b":status", b"%d" % status),
                (b"content-length", b"%d" % len(body)),
                (b"content-type", b"text/plain"),
            ]
        )
        self._sink.downstream_response_headers(headers, False)
        self._sink.downstream_response_data(body, True)

    def complete(self) -> None:
        pass


def make_filter_manager(
    factories: Sequence[HttpFilterFactory], stream_info: StreamInfo, sink: ExchangeSink, buffer_limit: int
) -> FilterManagerLike:
    if not factories:
        return PassThroughFilterManager(stream_info, sink)
    return FilterManager(factories, stream_info, sink, buffer_limit=buffer_limit)
