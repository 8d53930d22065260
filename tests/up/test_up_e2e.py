"""`wasmesh up` end to end, as a user runs it: the three demos over real sockets, and live reload."""

from __future__ import annotations

import base64
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


class UpProcess:
    def __init__(self, examples: Path, client_config: Path) -> None:
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wasmesh", "up", "--examples", str(examples),
             "--gateway-port", "0", "--admin-port", "0", "--xds-port", "0", "--api-port", "0",
             "--ca-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "WASMESH_CONFIG": str(client_config)},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, "".join(self.output))
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        tail = "".join(self.output)[-4000:]
        raise AssertionError(f"`wasmesh up` never printed {pattern!r}; output:\n{tail}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return -9
        return self.proc.returncode


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("up") / "examples"
    shutil.copytree(REPO / "examples", target, ignore=shutil.ignore_patterns("node_modules"))
    return target


@pytest.fixture(scope="module")
def client_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI's client config for this module: `wasmesh up` writes its context here, as kind does."""
    path = tmp_path_factory.mktemp("client") / "config"
    path.write_text("current-context: mine\ncontexts:\n- name: mine\n  server: https://127.0.0.1:1\n")
    return path


@pytest.fixture(scope="module")
def mesh(examples: Path, client_config: Path) -> Iterator[tuple[UpProcess, int]]:
    up = UpProcess(examples, client_config)
    try:
        m = up.wait_for(r"gateway \(istio: ingressgateway\)\s+http://127\.0\.0\.1:(\d+)", timeout=120)
        yield up, int(m.group(1))
    finally:
        code = up.stop()
        assert code == 0, "".join(up.output)[-3000:]
        # Stopping removes the mesh's context and gives the user back their own.
        config = yaml.safe_load(client_config.read_text())
        assert config["current-context"] == "mine"
        assert [c["name"] for c in config["contexts"]] == ["mine"]


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def basic(user_pass: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_pass).decode()}


def fresh_bucket() -> None:
    # The demo rate limit is 2 requests per second: let the bucket refill between checks.
    time.sleep(1.2)


@pytest.fixture(scope="module")
def api_server(mesh: tuple[UpProcess, int]) -> str:
    up, _ = mesh
    return up.wait_for(r"control plane API\s+(https://127\.0\.0\.1:\d+)", timeout=5).group(1)


@pytest.fixture(scope="module")
def wasmesh(client_config: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """The CLI as the tour runs it: no --server or token, only the context `wasmesh up` made current."""

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "wasmesh", *argv], capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**os.environ, "WASMESH_CONFIG": str(client_config)},
        )

    return run


def test_request_tracking_adds_the_configured_header(mesh: tuple[UpProcess, int]) -> None:
    _, port = mesh
    fresh_bucket()
    status, headers, body = get(port, "/headers")
    assert status == 200
    assert b'"X-Request-Id": "request-tracking"' in body
    # rate-limit runs on the httpbin sidecar, behind the gateway.
    assert headers.get("who-am-i") == "httpbin-sidecar"


def test_every_plugin_is_ready_on_the_proxy_it_selects(
    mesh: tuple[UpProcess, int], wasmesh: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    result = wasmesh("get", "wasmplugins", "-n", "istio-system")
    assert result.returncode == 0, result.stderr
    rows = [line.split()[:3] for line in result.stdout.splitlines()]
    assert rows == [
        ["NAME", "READY", "PHASE"],
        ["basic-auth", "1/1", "AUTHN"],
        ["rate-limit", "1/1", "AUTHZ"],
        ["request-tracking", "1/1", "STATS"],
    ]
    described = wasmesh("describe", "wasmplugin", "rate-limit", "-n", "istio-system")
    lines = described.stdout.splitlines()
    proxies = lines[lines.index("  Proxies:") + 1 : lines.index("Warnings:  <none>")]
    assert [row.split()[1:] for row in proxies] == [
        ["NODE", "NAMESPACE", "STATE", "LAST", "ERROR"],
        ["httpbin", "default", "ACK", "<none>"],
    ]
    gateway = wasmesh("describe", "wasmplugin", "basic-auth", "-n", "istio-system")
    assert "    ingressgateway-" in gateway.stdout and " istio-system   ACK " in gateway.stdout


def test_every_proxy_is_on_mtls_with_its_own_identity(mesh: tuple[UpProcess, int]) -> None:
    up, _ = mesh
    output = "".join(up.output)
    assert "xDS (ADS) listening on 127.0.0.1:" in output and "(mTLS)" in output
    for identity in ("istio-system/sa/ingressgateway", "default/sa/httpbin", "default/sa/productpage"):
        up.wait_for(rf"CA: issued a certificate for spiffe://cluster\.local/ns/{re.escape(identity)} ", 30)
    assert "ADS: refused node" not in output


def test_basic_auth_tour_is_never_rate_limited(mesh: tuple[UpProcess, int]) -> None:
    _, port = mesh
    answers = [get(port, "/productpage", basic(b"ok:test")) for _ in range(6)]
    assert [status for status, _, _ in answers] == [200] * 6
    assert all("who-am-i" not in headers for _, headers, _ in answers)


def test_rate_limit_429_after_two_requests_in_one_second(mesh: tuple[UpProcess, int]) -> None:
    _, port = mesh
    fresh_bucket()
    codes = []
    last_headers: dict[str, str] = {}
    for _ in range(3):
        status, last_headers, _ = get(port, "/status/200")
        codes.append(status)
    assert codes == [200, 200, 429]
    assert last_headers.get("powered-by") == "proxy-wasm"
    assert last_headers.get("who-am-i") == "httpbin-sidecar"


def test_basic_auth_on_productpage(mesh: tuple[UpProcess, int]) -> None:
    _, port = mesh
    fresh_bucket()
    status, _, _ = get(port, "/productpage")
    assert status == 401
    status, _, body = get(port, "/productpage", basic(b"ok:test"))
    assert status == 200 and b"Bookstore" in body
    fresh_bucket()
    status, _, _ = get(port, "/productpage", {"Authorization": "Basic YWRtaW4zOmFkbWluMw=="})
    assert status == 200
    status, _, _ = get(port, "/productpage", basic(b"ok:wrong"))
    assert status == 401


def test_editing_an_example_takes_effect_live(mesh: tuple[UpProcess, int], examples: Path) -> None:
    up, port = mesh
    yaml_path = examples / "request-tracking" / "wasmplugin.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("X-Request-Id", "X-Live-Edit"))
    deadline = time.monotonic() + 20
    body = b""
    while time.monotonic() < deadline:
        fresh_bucket()
        status, _, body = get(port, "/headers")
        if status == 200 and b'"X-Live-Edit": "request-tracking"' in body:
            break
    else:
        raise AssertionError(f"edit not applied; last body {body!r}; output:\n{''.join(up.output)[-3000:]}")


def test_the_api_wants_the_admin_token(
    api_server: str, wasmesh: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """The mesh's API is TLS with tokens: the tour's context carries one; without one, 401."""
    # Context "mine" has no token.
    anonymous = wasmesh("get", "wasmplugins", "-n", "istio-system", "--context", "mine",
                        "--server", api_server, "--insecure-skip-tls-verify")  # fmt: skip
    assert anonymous.returncode == 1
    assert anonymous.stderr.startswith("error: You must be logged in to the server (Unauthorized)")
