"""The probe's Envoy comparisons (test_differential_probe.py) through a real wasmesh proxy process.

Same plugin, same cases and requests, but wasmesh is `python -m wasmesh proxy` on real sockets
(differential_support.start_sockets_pair) instead of the in-memory harness: the proxy's own header
handling, routing, framing and connection handling sit between the client and the plugin, as Envoy's do.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from differential_support import (
    TEST_PLUGINS,
    TRAILERS_PATH,
    SocketsPair,
    assert_same_exchange,
    require_envoy,
    require_module,
    start_sockets_pair,
    stop_compared,
)
from test_differential_probe import LEGACY_NODE_ID, PROBE_CASES, _without_header

from wasmesh.testing.envoy import EnvoyWasmPlugin
from wasmesh.testing.upstream import RecordingUpstream

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def probe_sockets(recording_upstream: RecordingUpstream) -> Iterator[SocketsPair]:
    require_envoy()
    probe = require_module(TEST_PLUGINS / "probe.wasm")
    plugin = EnvoyWasmPlugin(probe, configuration='{"probe": true}', name="probe")
    pair = start_sockets_pair([plugin], recording_upstream, cluster_names=["probe_call"])
    try:
        yield pair
    finally:
        stop_compared(pair)


@pytest.mark.parametrize("case", list(PROBE_CASES))
def test_probe_case_over_sockets_matches_envoy(probe_sockets: SocketsPair, case: str) -> None:
    key = uuid.uuid4().hex[:12]
    headers = [("x-probe", case), ("x-probe-key", key), ("x-probe-cluster", "probe_call"),
               ("content-type", "text/plain"), ("x-probe-in", "in-value"), ("x-probe-remove", "gone")]
    method = "POST" if PROBE_CASES[case] else "GET"
    envoy, wasmesh = probe_sockets.run(method, "/probe/path?q=1", headers, PROBE_CASES[case])
    envoy, envoy_legacy = _without_header(envoy, LEGACY_NODE_ID)
    wasmesh, wasmesh_legacy = _without_header(wasmesh, LEGACY_NODE_ID)
    assert_same_exchange(envoy, wasmesh)
    if case == "props":  # the one intended difference, as in test_differential_probe
        assert envoy_legacy == ["1"]
        assert wasmesh_legacy == [f"0:{probe_sockets.envoy.node_id}"]
    else:
        assert envoy_legacy == wasmesh_legacy == []


def test_probe_grpc_local_reply_over_sockets_matches_envoy(probe_sockets: SocketsPair) -> None:
    headers = [("x-probe", "local-grpc"), ("x-probe-grpc-status", "16"), ("content-type", "application/grpc")]
    envoy, wasmesh = probe_sockets.run("POST", "/pkg.Service/Method", headers, b"\0\0\0\0\0")
    assert_same_exchange(envoy, wasmesh)


def test_probe_trailers_over_sockets_match_envoy(probe_sockets: SocketsPair) -> None:
    headers = [("x-probe", "req-trailers,resp-trailers"), ("content-type", "text/plain")]
    trailers = [("x-trailer-in", "down")]
    envoy, wasmesh = probe_sockets.run("POST", TRAILERS_PATH, headers, b"chunked body", trailers)
    assert_same_exchange(envoy, wasmesh)
    assert not isinstance(envoy, str) and ("x-probe-resp-trailer-added", "added") in envoy.trailers


def test_probe_unknown_cluster_over_sockets_matches_envoy(probe_sockets: SocketsPair) -> None:
    headers = [("x-probe", "http-call"), ("x-probe-cluster", "no_such_cluster")]
    envoy, wasmesh = probe_sockets.run("GET", "/", headers)
    assert_same_exchange(envoy, wasmesh)


def test_probe_idle_passthrough_over_sockets_matches_envoy(probe_sockets: SocketsPair) -> None:
    envoy, wasmesh = probe_sockets.run("POST", "/plain", [("x-a", "1")], b"body bytes")
    assert_same_exchange(envoy, wasmesh)
