"""HTTP/1.1 trailers through the real proxy, both directions, against real Envoy 1.40.

One `wasmesh proxy --config` process has two listeners: `plain` (no plugins: the pass-through
path) and `probe` (tests/plugins' probe plugin, whose `req-trailers` / `resp-trailers` cases read
and add trailers). Two Envoys run the same chains. A RecordingUpstream records the request trailers
it gets and answers `/trailers` chunked with trailers. Every case goes through all four proxies;
wasmesh must answer exactly as Envoy does, and the expected trailers are spelled out too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from proxy_testsupport import free_port

from wasmesh.testing.envoy import EnvoyResponse, EnvoyRunner, EnvoyWasmPlugin, _read_response
from wasmesh.testing.upstream import RecordedRequest, RecordingUpstream, Reply

pytestmark = pytest.mark.envoy

PROBE = Path(__file__).resolve().parents[1] / "plugins" / "build" / "probe.wasm"
UPSTREAM_TRAILERS = [("x-trailer-in", "from-upstream"), ("x-upstream-trailer", "1")]
Pairs = Sequence[tuple[str, str]]


def _reply(request: RecordedRequest) -> Reply:
    if request.path.startswith("/trailers"):
        return Reply(200, [("content-type", "text/plain")], b"chunked-body", trailers=UPSTREAM_TRAILERS)
    return Reply(200, [("content-type", "text/plain")], b"plain")


def _wire(method: str, path: str, headers: Pairs, body: bytes, trailers: Pairs) -> bytes:
    """A request as bytes; with trailers the body goes chunked (one chunk) followed by them."""
    pairs = [("host", "example.com"), *headers]
    if trailers:
        pairs.append(("transfer-encoding", "chunked"))
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n"
        payload += "".join(f"{k}: {v}\r\n" for k, v in trailers).encode() + b"\r\n"
    else:
        pairs.append(("content-length", str(len(body))))
        payload = body
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
    return head.encode() + payload


def _exchange(port: int, requests: Sequence[bytes], methods: Sequence[str]) -> list[EnvoyResponse]:
    """Send the requests on one connection (pipelined) and read one response per request."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"".join(requests))
        stream = sock.makefile("rb")
        return [_read_response(stream, method) for method in methods]


@dataclass(frozen=True)
class Observed:
    status: int
    headers: tuple[tuple[str, str], ...]  # x-probe-* and the framing headers
    body: bytes
    trailers: tuple[tuple[str, str], ...]
    upstream: (
        tuple[bytes, tuple[tuple[str, str], ...], str | None, str | None] | None
    )  # body, trailers, te, cl


def _observe(response: EnvoyResponse, upstream: RecordedRequest | None) -> Observed:
    kept = ("transfer-encoding", "content-length")
    headers = tuple((k, v) for k, v in response.headers if k.startswith("x-probe") or k in kept)
    seen = None
    if upstream is not None:
        seen = (
            upstream.body,
            tuple(upstream.trailers),
            upstream.header("transfer-encoding"),
            upstream.header("content-length"),
        )
    return Observed(response.status, headers, response.body, tuple(response.trailers), seen)


@dataclass
class Stack:
    upstream: RecordingUpstream
    ports: dict[str, int]  # envoy-plain, envoy-probe, wasmesh-plain, wasmesh-probe

    def observe(
        self, proxy: str, method: str, path: str, headers: Pairs, body: bytes, trailers: Pairs
    ) -> Observed:
        self.upstream.clear()
        (response,) = _exchange(self.ports[proxy], [_wire(method, path, headers, body, trailers)], [method])
        requests = list(self.upstream.requests)
        assert len(requests) <= 1
        return _observe(response, requests[0] if requests else None)


def _wait_ready(process: subprocess.Popen[bytes], admin_port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"wasmesh proxy exited: {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"wasmesh proxy not ready: {log.read_text()[-2000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert PROBE.is_file(), f"{PROBE} is not built (scripts/build-test-plugins.sh)"
    work = tmp_path_factory.mktemp("trailers")
    with RecordingUpstream(_reply) as upstream:
        envoys = [
            EnvoyRunner([], upstream_port=upstream.port),
            EnvoyRunner(
                [EnvoyWasmPlugin(PROBE, configuration="{}", name="probe")], upstream_port=upstream.port
            ),
        ]
        plain_port, probe_port, admin_port = free_port(), free_port(), free_port()
        routes = [
            {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "cluster": "upstream"}]}
        ]
        config = {
            "admin": {"address": "127.0.0.1", "port": admin_port},
            "listeners": [
                {"name": "plain", "port": plain_port, "virtual_hosts": routes},
                {"name": "probe", "port": probe_port, "virtual_hosts": routes},
            ],
            "clusters": [{"name": "upstream", "endpoints": [f"127.0.0.1:{upstream.port}"]}],
            "plugins": [
                {
                    "apiVersion": "extensions.istio.io/v1alpha1",
                    "kind": "WasmPlugin",
                    "metadata": {"name": "probe", "namespace": "default"},
                    "spec": {
                        "url": f"file://{PROBE}",
                        "pluginConfig": {},
                        "match": [{"ports": [{"number": probe_port}]}],
                    },
                }
            ],
        }
        (work / "proxy.json").write_text(json.dumps(config))
        log = work / "proxy.log"
        env = dict(os.environ, WASMESH_COMPILE_CACHE=str(tmp_path_factory.getbasetemp() / "compile-cache"))
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "wasmesh", "proxy", "--config", str(work / "proxy.json"),
                 "--log-level", "warning"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            for envoy in envoys:
                envoy.start()
            _wait_ready(process, admin_port, log)
            yield Stack(
                upstream,
                {
                    "envoy-plain": envoys[0].listener_port,
                    "envoy-probe": envoys[1].listener_port,
                    "wasmesh-plain": plain_port,
                    "wasmesh-probe": probe_port,
                },
            )
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for envoy in envoys:
                envoy.stop()


CLIENT_TRAILERS = [("x-trailer-in", "from-client"), ("x-client-trailer", "2")]
PROBE_BOTH = [("x-probe", "req-trailers,resp-trailers")]
PROBE_RESPONSE_TRAILERS = [
    ("x-probe-resp-trailer-get", "0:from-upstream"),
    ("x-probe-resp-trailer-added", "added"),
]
BOTH = (CLIENT_TRAILERS, UPSTREAM_TRAILERS, CLIENT_TRAILERS)

# (id, chain, method, path, headers, body, trailers, expected response trailers, expected upstream trailers)
CASES = [
    ("response-trailers", "plain", "GET", "/trailers", [], b"", [], UPSTREAM_TRAILERS, []),
    ("request-trailers", "plain", "POST", "/up", [], b"hello", CLIENT_TRAILERS, [], CLIENT_TRAILERS),
    ("both-ways", "plain", "POST", "/trailers", [], b"hello", *BOTH),
    ("plugin-reads-and-adds-both-ways", "probe", "POST", "/trailers", PROBE_BOTH, b"hello", CLIENT_TRAILERS,
     [*UPSTREAM_TRAILERS, *PROBE_RESPONSE_TRAILERS],
     [*CLIENT_TRAILERS, ("x-probe-trailer-added", "added")]),
    ("plugin-without-trailer-cases", "probe", "POST", "/trailers", [], b"hello", *BOTH),
    ("plugin-no-trailers-to-read", "probe", "POST", "/up", PROBE_BOTH, b"hello", [], [], []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("chain", "method", "path", "headers", "body", "trailers", "response_trailers", "upstream_trailers"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_trailers_reach_upstream_and_client_as_through_envoy(
    stack: Stack,
    chain: str,
    method: str,
    path: str,
    headers: Pairs,
    body: bytes,
    trailers: Pairs,
    response_trailers: Pairs,
    upstream_trailers: Pairs,
) -> None:
    from_envoy = stack.observe(f"envoy-{chain}", method, path, headers, body, trailers)
    from_wasmesh = stack.observe(f"wasmesh-{chain}", method, path, headers, body, trailers)
    assert from_wasmesh == from_envoy
    assert from_wasmesh.trailers == tuple(response_trailers)
    assert from_wasmesh.upstream is not None
    assert from_wasmesh.upstream[0] == body and from_wasmesh.upstream[1] == tuple(upstream_trailers)
    assert from_wasmesh.upstream[2:] == (("chunked", None) if trailers else (None, str(len(body))))


def test_plugin_reports_the_request_trailers_it_read(stack: Stack) -> None:
    seen = stack.observe("wasmesh-probe", "POST", "/trailers", PROBE_BOTH, b"hello", CLIENT_TRAILERS)
    assert dict(seen.headers)["x-probe-req-trailer-get"] == "0:from-client"
    assert dict(seen.headers)["x-probe-req-trailer-add"] == "0"
    assert dict(seen.headers)["x-probe-seen"] == "create,reqh,reqt,resph"


@pytest.mark.parametrize("chain", ["plain", "probe"])
def test_pipelined_requests_keep_their_own_trailers(stack: Stack, chain: str) -> None:
    """The second request is parsed while the first is answered (recorded, replayed later)."""
    first, second = [("x-trailer-in", "first")], [("x-trailer-in", "second"), ("x-more", "yes")]
    wire = [_wire("POST", "/trailers", [], b"one", first), _wire("POST", "/up", [], b"two", second)]
    results = {}
    for proxy in (f"envoy-{chain}", f"wasmesh-{chain}"):
        stack.upstream.clear()
        responses = _exchange(stack.ports[proxy], wire, ["POST", "POST"])
        received = [(r.path, r.body, r.trailers) for r in stack.upstream.requests]
        results[proxy] = ([(r.status, r.body, r.trailers) for r in responses], received)
    assert results[f"wasmesh-{chain}"] == results[f"envoy-{chain}"]
    assert results[f"wasmesh-{chain}"] == (
        [(200, b"chunked-body", UPSTREAM_TRAILERS), (200, b"plain", [])],
        [("/trailers", b"one", first), ("/up", b"two", second)],
    )
