"""wasmesh.runtime.properties on its own: the answers the Envoy differential suite cannot reach
(TLS sessions, metadata paths, IPv6 peers, malformed headers, the root context) with Envoy's
encodings (context.cc serializeValue: strings raw, int64/uint64 8 bytes LE, bool 1 byte,
protos serialised, maps pair-serialised)."""

from __future__ import annotations

import struct

from runtime_support import request

from wasmesh.http.filter import StreamInfo, TlsInfo
from wasmesh.http.headers import HeaderMap
from wasmesh.runtime.pairs import decode_pairs, encode_pairs
from wasmesh.runtime.properties import PropertySource, get_property, set_property

NODE = {"id": "node-1", "cluster": "mesh", "metadata": {"ISTIO_VERSION": "1.27", "LABELS": {"app": "web"}}}
EMPTY_MAP = struct.pack("<I", 0)


def i64(value: int) -> bytes:
    return struct.pack("<q", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def source(info: StreamInfo | None = None, **maps: HeaderMap | None) -> PropertySource:
    return PropertySource("plugin-a", "root-a", "vm-a", NODE, stream_info=info, **maps)


def get(src: PropertySource, dotted: str) -> bytes | None:
    return get_property(src, [p.encode() for p in dotted.split(".")])


def test_root_context_has_plugin_and_node_but_no_stream() -> None:
    root = source()
    assert get(root, "plugin_name") == b"plugin-a"
    assert get(root, "plugin_root_id") == b"root-a"
    assert get(root, "plugin_vm_id") == b"vm-a"
    assert get(root, "xds.node.id") == b"node-1"
    assert get(root, "node.metadata.ISTIO_VERSION") == b"1.27"
    for stream_only in ("request.path", "request.headers", "request.time", "response.code",
                        "response.headers", "connection.id", "connection_id", "source.address",
                        "upstream.address", "xds.cluster_name", "metadata"):  # fmt: skip
        assert get(root, stream_only) is None, stream_only
    # A root context keeps its own filter state: set_property round-trips there.
    assert set_property(root, [b"counter"], b"7") and get(root, "counter") == b"7"
    assert get(root, "filter_state.wasm.counter") == b"7"
    assert decode_pairs(get(root, "filter_state") or b"") == [(b"wasm.counter", b"7")]


def test_empty_paths_and_unknown_leaves_are_not_found() -> None:
    src = source(StreamInfo(), request_headers=request())
    assert get_property(src, []) is None and set_property(src, [], b"x") is False
    for dotted in ("request", "response", "connection", "upstream", "xds", "source", "destination",
                   "request.nothing", "response.nothing", "connection.nothing", "upstream.nothing",
                   "xds.nothing", "source.nothing", "nothing"):  # fmt: skip
        assert get(src, dotted) is None, dotted


def test_request_attributes_from_the_header_map() -> None:
    headers = request(b"/a/b?x=1&y=2#frag", [(b"x-multi", b"1"), (b"x-multi", b"2"), (b"referer", b"http://r/"),
                                           (b"user-agent", b"ua"), (b"x-request-id", b"rid"),
                                           (b"content-length", b"5")])  # fmt: skip
    info = StreamInfo(protocol="HTTP/1.0", start_time_ns=123, request_body_bytes=2)
    src = source(info, request_headers=headers)
    assert get(src, "request.path") == b"/a/b?x=1&y=2#frag"
    assert get(src, "request.url_path") == b"/a/b"
    assert get(src, "request.query") == b"x=1&y=2"  # Envoy cuts the fragment off the query
    assert get(src, "request.host") == b"example.com" and get(src, "request.method") == b"GET"
    assert get(src, "request.scheme") == b"http" and get(src, "request.protocol") == b"HTTP/1.0"
    assert get(src, "request.referer") == b"http://r/" and get(src, "request.useragent") == b"ua"
    assert get(src, "request.id") == b"rid"
    assert get(src, "request.headers.X-Multi") == b"1,2"  # lower-cased name, values comma-joined
    assert get(src, "request.time") == i64(123)
    assert get(src, "request.size") == i64(5)  # content-length while the headers are readable
    assert get(src, "request.headers_bytes") == i64(headers.byte_size())
    # Body bytes received so far, not the content-length.
    assert get(src, "request.total_size") == i64(2 + headers.byte_size())
    merged = dict(decode_pairs(get(src, "request.headers") or b""))
    assert merged[b"x-multi"] == b"1,2" and merged[b":path"] == b"/a/b?x=1&y=2#frag"
    assert get(src, "request.duration") is None  # until the stream completes
    info.complete_monotonic_ns = info.start_monotonic_ns + 4_000
    assert get(src, "request.duration") == i64(4_000)


def test_request_without_query_or_readable_headers() -> None:
    info = StreamInfo(request_body_bytes=9)
    plain = source(info, request_headers=request(b"/plain"))
    assert get(plain, "request.query") == b"" and get(plain, "request.url_path") == b"/plain"
    assert get(plain, "request.size") == i64(9)  # no content-length: the body bytes
    gone = source(info)  # the map is no longer readable (the headers callback continued)
    assert get(gone, "request.path") is None and get(gone, "request.headers.x") is None
    assert get(gone, "request.headers") == EMPTY_MAP
    assert get(gone, "request.headers_bytes") == i64(0)
    assert get(gone, "request.size") == get(gone, "request.total_size") == i64(9)
    bad = source(info, request_headers=request(extra=[(b"content-length", b"12x")]))
    assert get(bad, "request.size") is None  # Envoy: an unparsable content-length is NotFound


def test_response_attributes_and_grpc_status() -> None:
    info = StreamInfo(response_code=200, response_code_details="via_upstream", response_body_bytes=13)
    headers = HeaderMap([(b":status", b"200"), (b"content-type", b"text/plain")])
    trailers = HeaderMap([(b"x-t", b"1")])
    src = source(info, response_headers=headers, response_trailers=trailers)
    assert get(src, "response.code") == i64(200)
    assert get(src, "response.code_details") == b"via_upstream"
    assert get(src, "response.flags") == i64(0)
    assert get(src, "response.size") == i64(13)
    assert get(src, "response.headers_bytes") == i64(headers.byte_size())
    assert get(src, "response.total_size") == i64(13 + headers.byte_size() + trailers.byte_size())
    assert get(src, "response.headers.Content-Type") == b"text/plain"
    assert get(src, "response.trailers.x-t") == b"1"
    assert decode_pairs(get(src, "response.trailers") or b"") == [(b"x-t", b"1")]
    assert get(src, "response.grpc_status") == i64(2)  # inferred from HTTP 200: UNKNOWN
    headers.add(b"grpc-status", b"5")
    assert get(src, "response.grpc_status") == i64(5)
    trailers.add(b"grpc-status", b"99")  # the trailers win; beyond 16 is Envoy's InvalidCode
    assert get(src, "response.grpc_status") == i64(-1)
    trailers.set(b"grpc-status", b"abc")
    assert get(src, "response.grpc_status") == i64(-1)
    for code, grpc in ((401, 16), (403, 7), (404, 12), (503, 14), (400, 13)):
        assert get(source(StreamInfo(response_code=code)), "response.grpc_status") == i64(grpc), code


def test_response_before_the_upstream_answers() -> None:
    src = source(StreamInfo())
    for dotted in ("response.code", "response.code_details", "response.grpc_status", "response.headers.x"):
        assert get(src, dotted) is None, dotted
    assert get(src, "response.headers") == get(src, "response.trailers") == EMPTY_MAP
    assert get(src, "response.size") == get(src, "response.total_size") == i64(0)


def test_peers_and_upstream() -> None:
    info = StreamInfo(connection_id=42, downstream_remote_address=("::1", 5000),
                      downstream_local_address=("127.0.0.1", 8000))  # fmt: skip
    src = source(info)
    assert get(src, "source.address") == b"[::1]:5000" and get(src, "source.port") == i64(5000)
    assert get(src, "destination.address") == b"127.0.0.1:8000" and get(src, "destination.port") == i64(8000)
    assert get(src, "connection.id") == get(src, "connection_id") == u64(42)
    for leaf in ("address", "port", "local_address", "transport_failure_reason", "locality"):
        assert get(src, f"upstream.{leaf}") is None, leaf  # no host picked yet
    assert get(src, "upstream.request_attempt_count") == u64(0)
    info.upstream_address = ("10.0.0.2", 9000)
    assert get(src, "upstream.address") == b"10.0.0.2:9000" and get(src, "upstream.port") == i64(9000)
    assert get(src, "upstream.local_address") is None  # not connected yet
    info.upstream_local_address = ("10.0.0.1", 40000)
    assert get(src, "upstream.local_address") == b"10.0.0.1:40000"
    assert get(src, "upstream.transport_failure_reason") == b"" and get(src, "upstream.locality") == b""
    assert get(src, "upstream.request_attempt_count") == u64(1)
    assert get(source(StreamInfo()), "source.address") is None


def test_connection_on_plaintext_and_tls() -> None:
    plain = source(StreamInfo())
    assert get(plain, "connection.mtls") == b"\x00" and get(plain, "connection.requested_server_name") == b""
    for leaf in ("tls_version", "subject_peer_certificate", "dns_san_peer_certificate", "termination_details",
                 "transport_failure_reason", "sha256_peer_certificate_digest"):  # fmt: skip
        assert get(plain, f"connection.{leaf}") is None, leaf
    tls = TlsInfo("TLSv1.3", requested_server_name="web.example", peer_certificate_presented=True,
                  subject_peer_certificate="CN=client", uri_san_peer_certificate=("spiffe://a", "spiffe://b"),
                  dns_san_peer_certificate=("client.example",), sha256_peer_certificate_digest="ab12",
                  subject_local_certificate="CN=server", uri_san_local_certificate=(),
                  dns_san_local_certificate=("server.example",))  # fmt: skip
    src = source(StreamInfo(tls=tls))
    assert get(src, "connection.mtls") == b"\x01"
    assert get(src, "connection.tls_version") == b"TLSv1.3"
    assert get(src, "connection.requested_server_name") == b"web.example"
    assert get(src, "connection.subject_peer_certificate") == b"CN=client"
    assert get(src, "connection.subject_local_certificate") == b"CN=server"
    assert get(src, "connection.uri_san_peer_certificate") == b"spiffe://a"  # the first SAN
    assert get(src, "connection.uri_san_local_certificate") is None  # none: NotFound
    assert get(src, "connection.dns_san_peer_certificate") == b"client.example"
    assert get(src, "connection.dns_san_local_certificate") == b"server.example"
    assert get(src, "connection.sha256_peer_certificate_digest") == b"ab12"
    assert get(src, "connection.unknown_leaf") is None
    server_only = source(StreamInfo(tls=TlsInfo("TLSv1.2")))
    assert get(server_only, "connection.mtls") == b"\x00"
    assert get(server_only, "connection.sha256_peer_certificate_digest") is None  # empty digest: NotFound
    assert get(server_only, "connection.subject_peer_certificate") == b""  # a subject is always a string


def test_xds_names_metadata_and_node() -> None:
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import struct_pb2

    route_metadata = {"ns": {"flag": True, "n": 3, "s": "x", "list": ["a", 1], "obj": {"k": "v"}}}
    info = StreamInfo(cluster_name="up", route_name="r", virtual_host_name="vh", listener_direction=1,
                      route_metadata=route_metadata, dynamic_metadata={"envoy.lb": {"canary": "yes"}})
    src = source(info)
    assert get(src, "xds.cluster_name") == get(src, "cluster_name") == b"up"
    assert get(src, "xds.route_name") == get(src, "route_name") == b"r"
    assert get(src, "xds.virtual_host_name") == b"vh"
    assert get(src, "xds.virtual_host_metadata") == b""  # an empty Metadata message
    assert get(src, "xds.filter_chain_name") == b""
    assert get(src, "xds.listener_direction") == get(src, "listener_direction") == i64(1)
    assert get(src, "xds.cluster_metadata") == b"" and get(src, "xds.listener_metadata") == b""
    metadata = base_pb2.Metadata()
    metadata.ParseFromString(get(src, "xds.route_metadata") or b"")
    assert metadata.filter_metadata["ns"]["s"] == "x"
    assert get(src, "route_metadata.filter_metadata.ns.flag") == b"\x01"
    assert get(src, "xds.route_metadata.filter_metadata.ns.n") == struct.pack("<d", 3.0)  # Struct numbers
    assert get(src, "xds.route_metadata.filter_metadata.ns.s") == b"x"
    as_list = encode_pairs([(b"a", b""), (struct.pack("<d", 1.0), b"")])  # each element in the key slot
    assert get(src, "xds.route_metadata.filter_metadata.ns.list") == as_list
    nested = struct_pb2.Struct()
    nested.ParseFromString(get(src, "xds.route_metadata.filter_metadata.ns.obj") or b"")
    assert dict(nested) == {"k": "v"}
    namespaces = dict(decode_pairs(get(src, "xds.route_metadata.filter_metadata") or b""))
    assert set(namespaces) == {b"ns"}
    assert get(src, "xds.route_metadata.other") is None
    assert get(src, "xds.route_metadata.filter_metadata.ns.missing") is None
    assert get(src, "metadata.filter_metadata.envoy.lb.canary") is None  # "envoy.lb" is one segment
    assert get_property(src, [b"metadata", b"filter_metadata", b"envoy.lb", b"canary"]) == b"yes"
    node = base_pb2.Node()
    node.ParseFromString(get(src, "xds.node") or b"")
    assert (node.id, node.cluster) == ("node-1", "mesh")
    assert get(src, "xds.node.metadata.LABELS.app") == b"web"
    assert get(src, "xds.node.metadata.NOPE") is None
    assert get(source(StreamInfo(virtual_host_name=None)), "xds.virtual_host_metadata") is None
    for unnamed in ("xds.cluster_name", "xds.route_name", "xds.virtual_host_name"):
        assert get(source(StreamInfo()), unnamed) is None, unnamed
    no_node = PropertySource("p", "", "", {}, stream_info=StreamInfo())
    assert get(no_node, "xds.node") is None


def test_set_property_goes_to_the_stream_filter_state() -> None:
    info = StreamInfo()
    src = source(info)
    assert set_property(src, [b"a", b"b"], b"v")
    assert info.filter_state == {"wasm.a.b": b"v"}
    assert get(src, "a.b") == b"v" and get(src, "filter_state.wasm.a.b") == b"v"
    assert decode_pairs(get(src, "filter_state") or b"") == [(b"wasm.a.b", b"v")]
