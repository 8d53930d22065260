"""The I/O-facing side of the filter manager: what a transport must implement.

The filter manager (``wasmesh.http.filter_manager.FilterManager``) is sans-I/O.
A transport (the proxy's HTTP/1.1 protocol, or ``wasmesh.testing``'s harness)
feeds it downstream and upstream events and implements ``ExchangeSink`` to act on
what comes out of the chain:

    fm = FilterManager(factories, stream_info, sink)
    fm.on_request_headers(headers, end_stream)      # from downstream
    fm.on_request_data(chunk, end_stream)
    fm.on_request_trailers(trailers)
    fm.on_response_headers(headers, end_stream)     # from upstream
    fm.on_response_data(chunk, end_stream)
    fm.on_response_trailers(trailers)
    fm.on_downstream_reset()                        # client went away
    fm.on_upstream_failure(status, details)         # connect refused (503), timeout (504)
    fm.complete()                                   # exchange over: on_log, on_destroy

After ``complete`` the manager holds neither the sink nor the filters, so a sink may keep
a reference to its manager: nothing of a finished exchange needs the cyclic GC.

Every method may be called from the event loop only. Filters may resume iteration
later (an http_call answer, a timer) and the sink is then called from that
callback, still on the event loop.
"""

from __future__ import annotations

from typing import Protocol

from wasmesh.http.headers import HeaderMap


class ExchangeSink(Protocol):
    # --- towards the upstream (only after the whole chain let the request through) ---
    def upstream_request_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        """Pick the route from the (possibly rewritten) headers and start the upstream request."""

    def upstream_request_data(self, data: bytes, end_stream: bool) -> None: ...

    def upstream_request_trailers(self, trailers: HeaderMap) -> None: ...

    # --- towards the downstream ---
    def downstream_response_headers(self, headers: HeaderMap, end_stream: bool) -> None: ...

    def downstream_response_data(self, data: bytes, end_stream: bool) -> None: ...

    def downstream_response_trailers(self, trailers: HeaderMap) -> None: ...

    def reset(self, details: str) -> None:
        """Abort both sides (proxy_close_stream, or an unrecoverable filter error)."""

    # --- flow control: the chain is buffering and wants the source paused/resumed ---
    def pause_request_source(self) -> None: ...

    def resume_request_source(self) -> None: ...
