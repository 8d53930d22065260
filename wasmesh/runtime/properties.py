"""Proxy-Wasm properties with Envoy's names and value encodings.

Read from ``wasmesh.http.filter.StreamInfo``, the stream's header maps and the plugin
identity. Encodings (Envoy ``serializeValue``): strings raw, ints 8-byte little-endian,
bools 1 byte, timestamps/durations int64 nanoseconds, maps pair-serialised, protos
(``xds.node``, metadata) as serialized protobuf. Both the ``xds.*`` names and the
legacy top-level names (``node``, ``cluster_name``, ``route_name``, ...) are served.
``proxy_set_property`` writes filter state under ``wasm.<path>`` (segments joined
with "."), which unknown top-level names read back.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wasmesh.http.filter import StreamInfo, TlsInfo
from wasmesh.http.filter_manager import http_to_grpc_status
from wasmesh.http.headers import HeaderMap
from wasmesh.runtime.pairs import encode_pairs

FILTER_STATE_PREFIX = "wasm."


@dataclass
class PropertySource:
    """Everything a property can be read from, for one (effective) context."""

    plugin_name: str
    root_id: str
    vm_id: str
    node: dict[str, Any]
    stream_info: StreamInfo | None = None
    request_headers: HeaderMap | None = None
    response_headers: HeaderMap | None = None
    response_trailers: HeaderMap | None = None
    # Filter state of a root context (no stream): set_property still round-trips there.
    root_state: dict[str, bytes] = field(default_factory=dict)


def _i64(value: int) -> bytes:
    return struct.pack("<q", value)


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)


def _bool(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"


def _address(addr: tuple[str, int] | None) -> bytes | None:
    if addr is None:
        return None
    host, port = addr
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()


def _headers_map(headers: HeaderMap | None) -> bytes | None:
    if headers is None:
        return None
    merged: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        merged.setdefault(name, []).append(value)
    return encode_pairs((k, b",".join(v)) for k, v in merged.items())


def _header(headers: HeaderMap | None, name: bytes) -> bytes | None:
    if headers is None:
        return None
    values = headers.get_all(name)
    return b",".join(values) if values else None


def _proto_struct_value(value: Any) -> bytes:
    """Encode a JSON-shaped leaf as Envoy's CEL → wasm serialisation would."""
    if isinstance(value, bool):
        return _bool(value)
    if isinstance(value, int | float):
        return struct.pack("<d", float(value))  # Struct numbers are doubles
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        return _serialize_struct(value)
    if isinstance(value, list):
        return encode_pairs((_proto_struct_value(v), b"") for v in value)
    return b""


def _serialize_struct(value: dict[str, Any]) -> bytes:
    from google.protobuf import json_format, struct_pb2

    message = struct_pb2.Struct()
    json_format.ParseDict(value, message)
    return bytes(message.SerializeToString())


def _serialize_node(node: dict[str, Any]) -> bytes:
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import json_format

    message = base_pb2.Node()
    json_format.ParseDict(node, message, ignore_unknown_fields=True)
    return bytes(message.SerializeToString())


def _serialize_metadata(namespaces: dict[str, Any]) -> bytes:
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import json_format

    message = base_pb2.Metadata()
    json_format.ParseDict({"filter_metadata": namespaces}, message, ignore_unknown_fields=True)
    return bytes(message.SerializeToString())


def _walk_json(value: Any, rest: list[str]) -> Any:
    for part in rest:
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return None
    return value


def _node_path(node: dict[str, Any], rest: list[str]) -> bytes | None:
    if not rest:
        return _serialize_node(node) if node else None
    leaf = _walk_json(node, rest)
    if leaf is None:
        return None
    return _proto_struct_value(leaf)


def _metadata_path(namespaces: dict[str, Any], rest: list[str]) -> bytes | None:
    """Metadata proto: ``filter_metadata.<namespace>.<key>...``."""
    if not rest:
        return _serialize_metadata(namespaces)
    if rest[0] != "filter_metadata":
        return None
    if len(rest) == 1:
        return encode_pairs((k.encode(), _serialize_struct(v)) for k, v in namespaces.items())
    leaf = _walk_json(namespaces, rest[1:])
    return None if leaf is None else _proto_struct_value(leaf)


_EMPTY_MAP = encode_pairs(())


def _request(src: PropertySource, leaf: str, rest: list[str]) -> bytes | None:
    info = src.stream_info
    headers = src.request_headers
    if leaf == "headers":
        if rest:
            return _header(headers, rest[0].lower().encode())
        return _headers_map(headers) if headers is not None else (_EMPTY_MAP if info is not None else None)
    if leaf in ("path", "url_path", "query"):
        path = _header(headers, b":path")
        if path is None:
            return None
        base, _, query = path.partition(b"?")
        if leaf == "query":
            return query.partition(b"#")[0]  # Envoy cuts a fragment off the query, not off url_path
        return path if leaf == "path" else base
    simple = {"host": b":authority", "method": b":method", "referer": b"referer",
              "useragent": b"user-agent", "id": b"x-request-id", "scheme": b":scheme"}
    if leaf in simple:
        return _header(headers, simple[leaf])
    if info is None:
        return None
    if leaf == "protocol":
        return info.protocol.encode()
    if leaf == "time":
        return _i64(info.start_time_ns)
    if leaf == "duration":
        # Envoy: only once the stream is complete (StreamInfo::requestComplete), i.e. in on_log/on_done.
        end = info.complete_monotonic_ns
        return None if end is None else _i64(end - info.start_monotonic_ns)
    if leaf == "size":
        # Envoy trusts content-length while the request headers are readable; an unparsable one is
        # NotFound. Without it (or once the headers are gone), the body bytes received so far.
        length = headers.get(b"content-length") if headers is not None else None
        if length is not None:
            try:
                return _i64(int(length.strip()))
            except ValueError:
                return None
        return _i64(info.request_body_bytes)
    if leaf == "headers_bytes":
        return _i64(headers.byte_size() if headers else 0)
    if leaf == "total_size":
        return _i64(info.request_body_bytes + (headers.byte_size() if headers else 0))
    return None


def _grpc_status(value: bytes) -> int:
    """Envoy's Grpc::Common::getGrpcStatus of one header: beyond 16 or unparsable is InvalidCode (-1)."""
    try:
        code = int(value)
    except ValueError:
        return -1
    return code if 0 <= code <= 16 else -1


def _response(src: PropertySource, leaf: str, rest: list[str]) -> bytes | None:
    info = src.stream_info
    headers = src.response_headers
    trailers = src.response_trailers
    if leaf in ("headers", "trailers"):
        which = headers if leaf == "headers" else trailers
        if rest:
            return _header(which, rest[0].lower().encode())
        return _headers_map(which) if which is not None else (_EMPTY_MAP if info is not None else None)
    if info is None:
        return None
    if leaf == "code":
        return _i64(info.response_code) if info.response_code is not None else None
    if leaf == "grpc_status":
        # Trailers, then headers, then inferred from the HTTP status (Grpc::Common::getGrpcStatus).
        for source in (trailers, headers):
            value = source.get(b"grpc-status") if source is not None else None
            if value is not None:
                return _i64(_grpc_status(value))
        return _i64(http_to_grpc_status(info.response_code)) if info.response_code is not None else None
    if leaf == "code_details":
        return info.response_code_details.encode() if info.response_code_details is not None else None
    if leaf == "flags":
        return _i64(0)
    if leaf == "size":
        return _i64(info.response_body_bytes)
    if leaf == "headers_bytes":
        return _i64(headers.byte_size() if headers else 0)
    if leaf == "total_size":
        return _i64(info.response_body_bytes + (headers.byte_size() if headers else 0)
                    + (trailers.byte_size() if trailers else 0))
    return None


def _peer(addr: tuple[str, int] | None, leaf: str) -> bytes | None:
    if addr is None:
        return None
    if leaf == "address":
        return _address(addr)
    if leaf == "port":
        return _i64(addr[1])
    return None


def _first(values: tuple[str, ...]) -> bytes | None:
    return values[0].encode() if values else None


# Envoy (context.cc): tls_version and subjects are strings whenever the connection is TLS (a subject
# may be empty); a SAN leaf is its first entry and the digest is present only when non-empty.
_TLS_LEAVES: dict[str, Callable[[TlsInfo], bytes | None]] = {
    "tls_version": lambda t: t.version.encode(),
    "subject_local_certificate": lambda t: t.subject_local_certificate.encode(),
    "subject_peer_certificate": lambda t: t.subject_peer_certificate.encode(),
    "uri_san_local_certificate": lambda t: _first(t.uri_san_local_certificate),
    "uri_san_peer_certificate": lambda t: _first(t.uri_san_peer_certificate),
    "dns_san_local_certificate": lambda t: _first(t.dns_san_local_certificate),
    "dns_san_peer_certificate": lambda t: _first(t.dns_san_peer_certificate),
    "sha256_peer_certificate_digest": lambda t: t.sha256_peer_certificate_digest.encode() or None,
}


def _connection(info: StreamInfo | None, leaf: str) -> bytes | None:
    if info is None:
        return None
    if leaf == "id":
        return _u64(info.connection_id)
    tls = info.tls
    if leaf == "mtls":
        return _bool(tls is not None and tls.peer_certificate_presented)
    if leaf == "requested_server_name":
        return tls.requested_server_name.encode() if tls is not None else b""
    if tls is not None:
        extract = _TLS_LEAVES.get(leaf)
        if extract is not None:
            return extract(tls)
    return None


def _upstream(info: StreamInfo | None, leaf: str) -> bytes | None:
    if info is None:
        return None
    if leaf == "request_attempt_count":
        return _u64(0 if info.upstream_address is None else 1)  # wasmesh does not retry
    if info.upstream_address is None:
        return None  # Envoy: no upstream info until the router picked a host
    if leaf in ("address", "port"):
        return _peer(info.upstream_address, leaf)
    if leaf == "local_address":
        return _address(info.upstream_local_address)
    if leaf == "transport_failure_reason":
        return b""
    if leaf == "locality":
        return b""  # an empty envoy.config.core.v3.Locality: wasmesh endpoints carry none
    return None


def _xds(src: PropertySource, leaf: str, rest: list[str]) -> bytes | None:
    info = src.stream_info
    if leaf == "node":
        return _node_path(src.node, rest)
    if info is None:
        return None
    if leaf == "cluster_name":
        return info.cluster_name.encode() if info.cluster_name is not None else None
    if leaf == "route_name":
        return info.route_name.encode() if info.route_name is not None else None
    if leaf == "virtual_host_name":
        return info.virtual_host_name.encode() if info.virtual_host_name is not None else None
    if leaf == "virtual_host_metadata":
        return _metadata_path({}, rest) if info.virtual_host_name is not None else None
    if leaf == "filter_chain_name":
        return b""  # wasmesh listeners have one unnamed filter chain
    if leaf == "listener_direction":
        return _i64(info.listener_direction)
    metadata = {
        "cluster_metadata": info.cluster_metadata,
        "route_metadata": info.route_metadata,
        "listener_metadata": info.listener_metadata,
    }
    if leaf in metadata:
        return _metadata_path(metadata[leaf], rest)
    return None


# Legacy Wasm-only top-level names that mean an ``xds.*`` leaf.
_LEGACY_XDS = {"node", "cluster_name", "cluster_metadata", "route_name", "route_metadata",
               "listener_direction", "listener_metadata"}

Resolver = Callable[[PropertySource, list[str]], bytes | None]


def get_property(src: PropertySource, path: list[bytes]) -> bytes | None:
    """The encoded value of ``path`` or None (NOT_FOUND)."""
    if not path:
        return None
    parts = [p.decode("utf-8", "replace") for p in path]
    head, rest = parts[0], parts[1:]
    info = src.stream_info
    leaf = rest[0] if rest else ""
    tail = rest[1:]
    if head == "plugin_name":
        return src.plugin_name.encode()
    if head == "plugin_root_id":
        return src.root_id.encode()
    if head == "plugin_vm_id":
        return src.vm_id.encode()
    if head == "connection_id":
        return _u64(info.connection_id) if info is not None else None
    if head == "request":
        return _request(src, leaf, tail) if rest else None
    if head == "response":
        return _response(src, leaf, tail) if rest else None
    if head in ("source", "destination"):
        if info is None or not rest:
            return None
        addr = info.downstream_remote_address if head == "source" else info.downstream_local_address
        return _peer(addr, leaf)
    if head == "connection":
        return _connection(info, leaf) if rest else None
    if head == "upstream":
        return _upstream(info, leaf) if rest else None
    if head == "xds":
        return _xds(src, leaf, tail) if rest else None
    if head in _LEGACY_XDS:
        return _xds(src, head, rest)
    if head == "metadata":
        return _metadata_path(info.dynamic_metadata, rest) if info is not None else None
    if head == "filter_state":
        state = info.filter_state if info is not None else src.root_state
        if not rest:
            return encode_pairs((k.encode(), v) for k, v in state.items())
        return state.get(".".join(rest))
    state = info.filter_state if info is not None else src.root_state
    return state.get(FILTER_STATE_PREFIX + ".".join(parts))


def set_property(src: PropertySource, path: list[bytes], value: bytes) -> bool:
    """Store ``value`` as filter state ``wasm.<path>``; False if the path is empty."""
    if not path:
        return False
    key = FILTER_STATE_PREFIX + ".".join(p.decode("utf-8", "replace") for p in path)
    state = src.stream_info.filter_state if src.stream_info is not None else src.root_state
    state[key] = bytes(value)
    return True
