"""Envoy 1.40 vs wasmesh: every attribute of Envoy's attribute table, read at every callback.

The probe's `props-phases` case reads each property named in `x-probe-props` in every callback of
the stream (request headers/body/trailers, response headers/body/trailers, on_log, on_done) and
keeps the raw answer: the status and the exact bytes. After the stream, the dump is in shared
data, and a `props-fetch` request returns it. Each attribute is then compared by the rule below:

* `SAME`: status and bytes identical in every phase;
* per-process values (ids, times, ports, addresses of ephemeral sockets, Envoy-added headers):
  same status in every phase, the same encoding and shape, stable across phases, and consistent
  with their sibling attributes (`source.port` is the port of `source.address`, ...);
* `KNOWN_DIFFERENCES`: the documented differences (docs/runtime.md, "Properties"): what each side
  answers is asserted exactly, so a change on either side fails here too.
"""

from __future__ import annotations

import re
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
from differential_support import TRAILERS_PATH, DifferentialPair, start_probe_pair, stop_pair

from wasmesh.runtime.pairs import decode_pairs
from wasmesh.testing.compare import FRAMING_HEADERS, ObservedExchange
from wasmesh.testing.upstream import RecordingUpstream

pytestmark = pytest.mark.envoy

Answer = tuple[int, bytes]  # (proxy_status_t, the raw value)
Dump = dict[tuple[str, str], Answer]  # (phase, attribute) -> answer

OK, NOT_FOUND, SERIALIZATION_FAILURE = 0, 1, 3
ALL_PHASES = ("reqh", "reqb", "reqt", "resph", "respb", "respt", "log", "done")


@dataclass(frozen=True)
class Rule:
    """How one attribute is compared. `check` gets (phase, envoy answer, wasmesh answer, both dumps)."""

    check: Callable[[str, Answer, Answer, Dump, Dump], None]
    stable: bool = False  # one value for the whole stream (checked on each side, wherever found)


def _int64(answer: Answer) -> int:
    status, raw = answer
    assert status == OK and len(raw) == 8, f"not an 8-byte integer: {answer}"
    return int(struct.unpack("<q", raw)[0])


def _same(phase: str, envoy: Answer, wasmesh: Answer, _e: Dump, _w: Dump) -> None:
    assert envoy == wasmesh


def _same_status(check: Callable[[Answer], None]) -> Callable[[str, Answer, Answer, Dump, Dump], None]:
    """Same status on both sides; when found, each side's value passes `check`."""

    def compare(phase: str, envoy: Answer, wasmesh: Answer, _e: Dump, _w: Dump) -> None:
        assert envoy[0] == wasmesh[0], f"status: envoy {envoy[0]}, wasmesh {wasmesh[0]}"
        if envoy[0] == OK:
            check(envoy)
            check(wasmesh)

    return compare


_LOOPBACK_ADDRESS = re.compile(rb"127\.0\.0\.1:(\d+)")
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _address(answer: Answer) -> None:
    match = _LOOPBACK_ADDRESS.fullmatch(answer[1])
    assert match is not None and 0 < int(match.group(1)) < 65536, answer


def _upstream_local_address(
    phase: str, envoy: Answer, wasmesh: Answer, envoy_dump: Dump, wasmesh_dump: Dump
) -> None:
    """Known once the upstream connection is up (never without an upstream). While the request is
    still arriving that races the connect under Envoy, so there either side may still answer
    NotFound; from the response on, both know it."""
    for answer, dump in ((envoy, envoy_dump), (wasmesh, wasmesh_dump)):
        if answer[0] == OK:
            _address(answer)
        elif dump[(phase, "upstream.address")][0] == OK:
            assert answer[0] == NOT_FOUND and phase in ("reqh", "reqb", "reqt"), answer
        else:
            assert answer[0] == NOT_FOUND, answer


def _port_of(address_attribute: str) -> Callable[[str, Answer, Answer, Dump, Dump], None]:
    """An int64 port, equal on each side to the port of that side's `address_attribute`."""

    def compare(phase: str, envoy: Answer, wasmesh: Answer, envoy_dump: Dump, wasmesh_dump: Dump) -> None:
        assert envoy[0] == wasmesh[0], f"status: envoy {envoy[0]}, wasmesh {wasmesh[0]}"
        if envoy[0] != OK:
            return
        for answer, dump in ((envoy, envoy_dump), (wasmesh, wasmesh_dump)):
            address = dump[(phase, address_attribute)][1]
            assert address.rsplit(b":", 1)[1] == str(_int64(answer)).encode(), (answer, address)

    return compare


def _uint64_id(answer: Answer) -> None:
    assert len(answer[1]) == 8 and struct.unpack("<Q", answer[1])[0] > 0, answer


def _timestamp(answer: Answer) -> None:
    # Nanoseconds since the epoch: after 2020 and not in the future (a clock, not a duration).
    assert 1_577_836_800 * 10**9 < _int64(answer) <= time.time_ns(), answer


def _duration(answer: Answer) -> None:
    assert 0 < _int64(answer) < 600 * 10**9, answer  # nanoseconds; generous bound, not a timing test


def _uuid(answer: Answer) -> None:
    assert _UUID.fullmatch(answer[1]), answer


def _node(answer: Answer) -> None:
    from envoy.config.core.v3 import base_pb2

    node = base_pb2.Node()
    node.ParseFromString(answer[1])
    assert (node.id, node.cluster) == ("wasmesh-differential", "wasmesh-differential"), node


# Headers only one side's proxy adds (Envoy's router and codec), framing, and the random request id.
_PROXY_HEADERS = re.compile(b"|".join([rb"x-envoy-.*", b"date", b"server", b"x-request-id",
                                        *(h.encode() for h in FRAMING_HEADERS)]))


def _plugin_visible_pairs(answer: Answer) -> list[tuple[bytes, bytes]]:
    return sorted((k, v) for k, v in decode_pairs(answer[1]) if not _PROXY_HEADERS.fullmatch(k))


def _header_map(phase: str, envoy: Answer, wasmesh: Answer, _e: Dump, _w: Dump) -> None:
    """A pair-serialised map: equal except the headers only Envoy's router/codec add."""
    assert envoy[0] == wasmesh[0] == OK, (envoy[0], wasmesh[0])
    assert _plugin_visible_pairs(envoy) == _plugin_visible_pairs(wasmesh)


def _map_bytes(map_attribute: str) -> Callable[[str, Answer, Answer, Dump, Dump], None]:
    """`*.headers_bytes`: on each side, the name+value bytes of that side's own map."""

    def compare(phase: str, envoy: Answer, wasmesh: Answer, envoy_dump: Dump, wasmesh_dump: Dump) -> None:
        for answer, dump in ((envoy, envoy_dump), (wasmesh, wasmesh_dump)):
            pairs = decode_pairs(dump[(phase, map_attribute)][1])
            assert _int64(answer) == sum(len(k) + len(v) for k, v in pairs), (answer, pairs)

    return compare


def _total_size(*header_maps: str) -> Callable[[str, Answer, Answer, Dump, Dump], None]:
    """`*.total_size`: body bytes so far plus the bytes of the side's own `header_maps`; the body part
    must be the same on both sides."""

    def body_part(answer: Answer, dump: Dump, phase: str) -> int:
        maps = sum(len(k) + len(v) for m in header_maps for k, v in decode_pairs(dump[(phase, m)][1]))
        return _int64(answer) - maps

    def compare(phase: str, envoy: Answer, wasmesh: Answer, envoy_dump: Dump, wasmesh_dump: Dump) -> None:
        assert body_part(envoy, envoy_dump, phase) == body_part(wasmesh, wasmesh_dump, phase)

    return compare


def _known(envoy_answer: Answer, wasmesh_check: Callable[[Answer], None]) -> Rule:
    """A documented difference: Envoy answers exactly `envoy_answer` wherever wasmesh finds a value."""

    def compare(phase: str, envoy: Answer, wasmesh: Answer, _e: Dump, _w: Dump) -> None:
        if wasmesh[0] == NOT_FOUND and envoy[0] == NOT_FOUND:
            return  # neither has it in this phase (e.g. before the upstream is picked)
        assert envoy == envoy_answer, f"envoy: {envoy}"
        wasmesh_check(wasmesh)

    return Rule(compare)


def _not_found(answer: Answer) -> None:
    assert answer[0] == NOT_FOUND, answer


def _value(expected: bytes) -> Callable[[Answer], None]:
    def check(answer: Answer) -> None:
        assert answer == (OK, expected)

    return check


SAME = Rule(_same)
NODE_ID = b"wasmesh-differential"
SERIALIZED_NODE = b"\n\x14wasmesh-differential\x12\x14wasmesh-differential"

ATTRIBUTES: dict[str, Rule] = {
    "request.path": SAME,
    "request.url_path": SAME,
    "request.host": SAME,
    "request.scheme": SAME,
    "request.method": SAME,
    "request.headers": Rule(_header_map),
    "request.headers.x-probe-in": SAME,
    "request.headers.x-probe-absent": SAME,
    "request.headers_bytes": Rule(_map_bytes("request.headers")),
    "request.referer": SAME,
    "request.useragent": SAME,
    "request.time": Rule(_same_status(_timestamp), stable=True),
    "request.id": Rule(_same_status(_uuid), stable=True),
    "request.protocol": SAME,
    "request.query": SAME,
    "request.duration": Rule(_same_status(_duration)),
    "request.size": SAME,
    "request.total_size": Rule(_total_size("request.headers")),
    "response.code": SAME,
    "response.code_details": SAME,
    "response.flags": SAME,
    "response.grpc_status": SAME,
    "response.headers": Rule(_header_map),
    "response.headers.content-type": SAME,
    "response.headers_bytes": Rule(_map_bytes("response.headers")),
    "response.trailers": Rule(_header_map),
    "response.trailers.x-trailer-in": SAME,
    "response.size": SAME,
    "response.total_size": Rule(_total_size("response.headers", "response.trailers")),
    "connection.id": Rule(_same_status(_uint64_id), stable=True),
    "connection.mtls": SAME,
    "connection.requested_server_name": SAME,
    "connection.tls_version": SAME,
    "connection.subject_local_certificate": SAME,
    "connection.subject_peer_certificate": SAME,
    "connection.dns_san_local_certificate": SAME,
    "connection.dns_san_peer_certificate": SAME,
    "connection.uri_san_local_certificate": SAME,
    "connection.uri_san_peer_certificate": SAME,
    "connection.sha256_peer_certificate_digest": SAME,
    "connection.peer_certificate": SAME,
    "connection.termination_details": SAME,
    "connection.transport_failure_reason": SAME,
    "upstream.address": Rule(_same_status(_address), stable=True),
    "upstream.port": Rule(_port_of("upstream.address"), stable=True),
    "upstream.local_address": Rule(_upstream_local_address, stable=True),
    "upstream.transport_failure_reason": SAME,
    "upstream.tls_version": SAME,
    "upstream.subject_peer_certificate": SAME,
    "upstream.sha256_peer_certificate_digest": SAME,
    "upstream.request_attempt_count": SAME,
    "upstream.locality": SAME,
    "source.address": Rule(_same_status(_address), stable=True),
    "source.port": Rule(_port_of("source.address"), stable=True),
    "destination.address": Rule(_same_status(_address), stable=True),
    "destination.port": Rule(_port_of("destination.address"), stable=True),
    "xds.node": Rule(_same_status(_node)),
    "xds.node.id": SAME,
    "xds.node.cluster": SAME,
    "xds.cluster_name": SAME,
    "xds.cluster_metadata": SAME,
    "xds.listener_direction": SAME,
    "xds.listener_metadata": SAME,
    "xds.route_name": SAME,
    "xds.route_metadata": SAME,
    "xds.virtual_host_name": SAME,
    "xds.virtual_host_metadata": SAME,
    "xds.filter_chain_name": SAME,
    "plugin_name": SAME,
    "plugin_root_id": SAME,
    "plugin_vm_id": SAME,
    "connection_id": Rule(_same_status(_uint64_id), stable=True),
    "metadata": SAME,
    "probe_never_set": SAME,
}

# The documented differences (docs/runtime.md): the legacy top-level names, which wasmesh serves
# for Higress plugins and Envoy 1.40 no longer does, and the attributes wasmesh has no source for.
KNOWN_DIFFERENCES: dict[str, Rule] = {
    "node": _known((NOT_FOUND, b""), _value(SERIALIZED_NODE)),
    "node.id": _known((NOT_FOUND, b""), _value(NODE_ID)),
    "cluster_name": _known((NOT_FOUND, b""), _value(b"upstream")),
    "route_name": _known((NOT_FOUND, b""), _value(b"default")),
    "listener_direction": _known((NOT_FOUND, b""), _value(struct.pack("<q", 0))),
    "cluster_metadata": _known((NOT_FOUND, b""), _value(b"")),
    "route_metadata": _known((NOT_FOUND, b""), _value(b"")),
    "listener_metadata": _known((NOT_FOUND, b""), _value(b"")),
    # Envoy cannot serialise these (a null metadata message or a filter-state map): status 3.
    "filter_state": _known((SERIALIZATION_FAILURE, b""), _value(struct.pack("<I", 0))),
    "xds.upstream_host_metadata": _known((SERIALIZATION_FAILURE, b""), _not_found),
    "xds.upstream_host_locality_metadata": _known((SERIALIZATION_FAILURE, b""), _not_found),
}

def _untracked(envoy_check: Callable[[Answer], None]) -> Rule:
    """Facts wasmesh does not track (endpoint counts, upstream timings): wasmesh answers NotFound
    wherever Envoy has a value, which passes `envoy_check`."""

    def compare(phase: str, envoy: Answer, wasmesh: Answer, _e: Dump, _w: Dump) -> None:
        assert wasmesh[0] == NOT_FOUND, f"wasmesh now answers {wasmesh}: compare it with Envoy instead"
        if envoy[0] != NOT_FOUND:
            envoy_check(envoy)

    return Rule(compare)


def _one_endpoint(answer: Answer) -> None:
    assert answer == (OK, struct.pack("<Q", 1))  # the upstream cluster's one endpoint


def _elapsed(answer: Answer) -> None:
    assert 0 <= _int64(answer) < 600 * 10**9, answer  # a duration; a pooled connection may give 0


KNOWN_DIFFERENCES.update({
    "upstream.num_endpoints": _untracked(_one_endpoint),
    "upstream.cx_pool_ready_duration": _untracked(_elapsed),
    "response.backend_latency": _untracked(_elapsed),
})

RULES: dict[str, Rule] = {**ATTRIBUTES, **KNOWN_DIFFERENCES}


@pytest.fixture(scope="module")
def probe_pair(recording_upstream: RecordingUpstream) -> Iterator[DifferentialPair]:
    pair = start_probe_pair(recording_upstream)
    try:
        yield pair
    finally:
        stop_pair(pair)


def parse_dump(body: bytes) -> Dump:
    dump: Dump = {}
    for line in body.decode().splitlines():
        phase, attribute, status, value = line.split(" ")
        dump[(phase, attribute)] = (int(status), bytes.fromhex(value))
    return dump


def read_dump(
    run: Callable[..., ObservedExchange | str],
    key: str,
    cases: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    trailers: Sequence[tuple[str, str]] = (),
) -> Dump:
    """One stream with `props-phases`, then `props-fetch` until on_log and on_done are in the dump."""
    attributes = ",".join(RULES)
    request_headers = [("host", "example.com"), ("x-probe", cases), ("x-probe-key", key),
                       ("x-probe-props", attributes), *headers]  # fmt: skip
    answer = run("POST" if body else "GET", path, request_headers, body, trailers)
    assert not isinstance(answer, str), answer
    fetch = [("host", "example.com"), ("x-probe", "props-fetch"), ("x-probe-key", key)]
    deadline = time.monotonic() + 20  # Envoy runs on_log/on_done after the response went out
    while True:
        fetched = run("GET", "/props-fetch", fetch, b"")
        assert not isinstance(fetched, str) and fetched.status == 200, fetched
        dump = parse_dump(fetched.body)
        phases = {phase for phase, _ in dump}
        if {"log", "done"} <= phases or time.monotonic() > deadline:
            return dump
        time.sleep(0.05)


def compare_dumps(envoy: Dump, wasmesh: Dump) -> list[str]:
    """Every attribute in every phase by its rule; returns one line per divergence."""
    envoy_phases = sorted({p for p, _ in envoy}, key=ALL_PHASES.index)
    wasmesh_phases = sorted({p for p, _ in wasmesh}, key=ALL_PHASES.index)
    if envoy_phases != wasmesh_phases:
        return [f"callbacks: envoy {envoy_phases}, wasmesh {wasmesh_phases}"]
    failures: list[str] = []
    for attribute, rule in RULES.items():
        for phase in envoy_phases:
            envoy_answer, wasmesh_answer = envoy[(phase, attribute)], wasmesh[(phase, attribute)]
            try:
                rule.check(phase, envoy_answer, wasmesh_answer, envoy, wasmesh)
            except AssertionError as exc:
                reason = str(exc).splitlines()[0] if str(exc) else "differs"
                failures.append(f"{attribute} @ {phase}: envoy {envoy_answer!r:.160}, "
                                f"wasmesh {wasmesh_answer!r:.160} ({reason:.200})")
        if rule.stable:
            for side, dump in (("envoy", envoy), ("wasmesh", wasmesh)):
                found = {dump[(p, attribute)][1] for p in envoy_phases if dump[(p, attribute)][0] == OK}
                if len(found) > 1:
                    failures.append(f"{attribute}: {side} answers {len(found)} values in one stream: {found}")
    return failures


SCENARIOS: dict[str, dict[str, object]] = {
    # Both bodies buffered to the end (req/resp-body-read), so each body callback sees one whole body:
    # Envoy may hand an upstream body over in several chunks, streaming the first ones downstream
    # (response.size grows) before the end-of-stream callback; the harness hands it over in one.
    "body-both-ways": {
        "cases": "props-phases,req-body-read,resp-body-read",
        "path": "/probe/path?q=1&r=2",
        "headers": [("x-probe-in", "in-value"), ("referer", "http://referer.example/"),
                    ("user-agent", "probe-agent/1"), ("content-type", "text/plain")],
        "body": b"abcdef",
    },
    # Chunked request with trailers (no content-length); the upstream answers with trailers
    # (grpc-status 0): response.trailers and grpc_status from the trailers.
    "trailers-both-ways": {
        "cases": "props-phases",
        "path": TRAILERS_PATH,
        "headers": [("content-type", "text/plain")],
        "body": b"chunked body",
        "trailers": [("x-trailer-in", "down")],
    },
    # A local reply from on_request_headers: code, details and the inferred grpc_status (403 -> 7).
    "local-reply": {
        "cases": "props-phases,local",
        "path": "/local?x=1",
        "headers": [("content-length", "0")],
        "body": b"",
    },
    # on_request_headers pauses for an http_call (StopIteration), so the request headers stay
    # readable to properties in every later callback; the call's answer resumes the request.
    "held-by-http-call": {
        "cases": "props-phases,http-call,resp-body-read",
        "path": "/held?q=2",
        "headers": [("x-probe-cluster", "probe_call"), ("content-type", "text/plain")],
        "body": b"held body",
    },
    "get-no-body": {
        "cases": "props-phases,resp-body-read",
        "path": "/plain",
        "headers": [],
        "body": b"",
    },
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_attribute_in_every_callback_matches_envoy(probe_pair: DifferentialPair, scenario: str) -> None:
    spec = SCENARIOS[scenario]
    key = uuid.uuid4().hex[:12]
    args = (key, spec["cases"], spec["path"], spec["headers"], spec["body"], spec.get("trailers", ()))
    envoy = read_dump(probe_pair.run_envoy, *args)  # type: ignore[arg-type]
    wasmesh = read_dump(probe_pair.run_wasmesh, *args)  # type: ignore[arg-type]
    assert {"log", "done"} <= {phase for phase, _ in envoy}, "Envoy's on_log/on_done dump never arrived"
    failures = compare_dumps(envoy, wasmesh)
    assert not failures, "wasmesh differs from Envoy:\n  " + "\n  ".join(failures)


def test_plugin_identity_attributes_match_envoy(recording_upstream: RecordingUpstream) -> None:
    """plugin_root_id and plugin_vm_id when they are not empty (the pair above uses the defaults)."""
    pair = start_probe_pair(recording_upstream, root_id="probe_root", vm_id="probe_vm")
    try:
        args = (uuid.uuid4().hex[:12], "props-phases,resp-body-read", "/identity", [], b"")
        envoy, wasmesh = read_dump(pair.run_envoy, *args), read_dump(pair.run_wasmesh, *args)
    finally:
        stop_pair(pair)
    assert envoy[("reqh", "plugin_root_id")] == (OK, b"probe_root")
    assert envoy[("reqh", "plugin_vm_id")] == (OK, b"probe_vm")
    assert envoy[("log", "plugin_name")] == (OK, b"probe")
    failures = compare_dumps(envoy, wasmesh)
    assert not failures, "wasmesh differs from Envoy:\n  " + "\n  ".join(failures)
