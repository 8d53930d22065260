"""The HTTP filter contract shared by the runtime (Proxy-Wasm filters) and the proxy.

This mirrors Envoy's StreamDecoderFilter/StreamEncoderFilter: a filter sees the
request ("decode") then the response ("encode") and answers each event with a
status. The filter manager (``wasmesh.http.filter_manager``) runs a chain of
filters with Envoy's iteration, buffering and local-reply semantics; the proxy
and the plugin test harness drive the filter manager and never the filters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from wasmesh.http.headers import HeaderMap


class FilterHeadersStatus(IntEnum):
    CONTINUE = 0
    STOP_ITERATION = 1
    CONTINUE_AND_END_STREAM = 2
    STOP_ALL_ITERATION_AND_BUFFER = 3
    STOP_ALL_ITERATION_AND_WATERMARK = 4


class FilterDataStatus(IntEnum):
    CONTINUE = 0
    STOP_ITERATION_AND_BUFFER = 1
    STOP_ITERATION_AND_WATERMARK = 2
    STOP_ITERATION_NO_BUFFER = 3


class FilterTrailersStatus(IntEnum):
    CONTINUE = 0
    STOP_ITERATION = 1


@dataclass(frozen=True)
class TlsInfo:
    """The downstream TLS session of one connection, in the forms Envoy's ``connection.*`` attributes use.

    Built once per connection when the handshake completes, shared by its exchanges.
    Subjects are RFC 2253 strings ("CN=client,O=example"); SAN tuples keep certificate order
    (the attributes expose the first entry); the digest is lower-case hex of the DER peer cert.
    """

    version: str  # "TLSv1.2" / "TLSv1.3", as Envoy (and OpenSSL) print it
    requested_server_name: str = ""  # SNI; "" when the client sent none
    # connection.mtls; a listener with client_ca only accepts verified certificates.
    peer_certificate_presented: bool = False
    subject_peer_certificate: str = ""
    uri_san_peer_certificate: tuple[str, ...] = ()
    dns_san_peer_certificate: tuple[str, ...] = ()
    sha256_peer_certificate_digest: str = ""
    subject_local_certificate: str = ""
    uri_san_local_certificate: tuple[str, ...] = ()
    dns_san_local_certificate: tuple[str, ...] = ()


@dataclass
class StreamInfo:
    """Facts about one HTTP exchange, read by Proxy-Wasm properties and access logs.

    The proxy fills what it knows; anything left ``None`` reads as "not found".
    """

    connection_id: int = 0
    downstream_remote_address: tuple[str, int] | None = None
    downstream_local_address: tuple[str, int] | None = None
    protocol: str = "HTTP/1.1"  # "HTTP/1.0", "HTTP/1.1", "HTTP/2"
    scheme: str = "http"
    start_time_ns: int = field(default_factory=time.time_ns)
    start_monotonic_ns: int = field(default_factory=time.monotonic_ns)
    # Set when the exchange completes, before on_log (Envoy's StreamInfo::requestComplete).
    complete_monotonic_ns: int | None = None
    listener_name: str = ""
    listener_direction: int = 0  # envoy.config.core.v3.TrafficDirection: 0 unspecified, 1 inbound, 2 outbound
    route_name: str | None = None
    virtual_host_name: str | None = None
    cluster_name: str | None = None
    upstream_address: tuple[str, int] | None = None
    upstream_local_address: tuple[str, int] | None = None
    response_code: int | None = None
    response_code_details: str | None = None
    request_body_bytes: int = 0
    response_body_bytes: int = 0
    # xds.node: {"id": ..., "cluster": ..., "metadata": {...}} as Envoy's Node proto, JSON-shaped.
    node: dict[str, Any] = field(default_factory=dict)
    # Dynamic metadata: filter namespace -> struct (JSON-shaped).
    dynamic_metadata: dict[str, Any] = field(default_factory=dict)
    # Filter state written by proxy_set_property (key "wasm.<path>") and read back.
    filter_state: dict[str, bytes] = field(default_factory=dict)
    route_metadata: dict[str, Any] = field(default_factory=dict)
    cluster_metadata: dict[str, Any] = field(default_factory=dict)
    listener_metadata: dict[str, Any] = field(default_factory=dict)
    # The downstream TLS session; None on a plaintext connection.
    tls: TlsInfo | None = None


class FilterCallbacks(Protocol):
    """What the filter manager offers each filter (Envoy's decoder/encoder callbacks)."""

    @property
    def stream_info(self) -> StreamInfo: ...

    def request_headers(self) -> HeaderMap | None: ...
    def request_trailers(self) -> HeaderMap | None: ...
    def response_headers(self) -> HeaderMap | None: ...
    def response_trailers(self) -> HeaderMap | None: ...

    def continue_decoding(self) -> None:
        """Resume the request after this filter stopped iteration (may be called later, async)."""

    def continue_encoding(self) -> None:
        """Resume the response after this filter stopped iteration."""

    def send_local_reply(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        details: str,
        grpc_status: int | None = None,
    ) -> None:
        """Answer the downstream directly; the upstream is never contacted (or is abandoned)."""

    def reset_stream(self) -> None:
        """Abort the exchange (Envoy's resetStream / proxy_close_stream)."""

    def clear_route_cache(self) -> None:
        """The filter changed :path/:authority/headers; the route is chosen again."""

    def add_request_trailers(self) -> HeaderMap: ...
    def add_response_trailers(self) -> HeaderMap: ...


class HttpFilter(Protocol):
    """One filter instance serves exactly one exchange."""

    def set_callbacks(self, callbacks: FilterCallbacks) -> None: ...

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus: ...

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        """``data`` is the body the filter may read and modify in place: when the filter
        buffered earlier chunks (STOP_ITERATION_AND_BUFFER) it holds all of them."""

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus: ...

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus: ...

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus: ...

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus: ...

    def on_log(self) -> None:
        """The exchange is complete (or abandoned): access-log time."""

    def on_destroy(self) -> None:
        """Last call; release per-exchange state."""


class HttpFilterFactory(Protocol):
    """Makes one filter per exchange; one factory per configured plugin per worker."""

    name: str

    def create_filter(self) -> HttpFilter | None:
        """``None`` means "skip this filter for this exchange" (e.g. FAIL_OPEN after a VM failure)."""
