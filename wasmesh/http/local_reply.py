"""A filter that answers every request itself: the stand-in for a failed plugin (Envoy's
FAIL_CLOSED 503) and for the agent's deny-all RBAC fallback (403)."""

from __future__ import annotations

from wasmesh.http.filter import (
    FilterCallbacks,
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
)
from wasmesh.http.headers import HeaderMap


class LocalReplyFilter:
    def __init__(self, status: int, body: bytes, details: str) -> None:
        self.status = status
        self.body = body
        self.details = details
        self._callbacks: FilterCallbacks | None = None

    def set_callbacks(self, callbacks: FilterCallbacks) -> None:
        self._callbacks = callbacks

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        if self._callbacks is not None:
            self._callbacks.send_local_reply(self.status, self.body, [], self.details)
        return FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        return FilterDataStatus.STOP_ITERATION_NO_BUFFER

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        return FilterTrailersStatus.STOP_ITERATION

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        return FilterHeadersStatus.CONTINUE

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        return FilterDataStatus.CONTINUE

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        return FilterTrailersStatus.CONTINUE

    def on_log(self) -> None:
        pass

    def on_destroy(self) -> None:
        self._callbacks = None
