"""Real Envoy 1.40 on a secure mesh: through `wasmesh agent` (Envoy → agent on loopback, agent →
control plane over mTLS with a bootstrap token, as Envoy → istio-agent → istiod), and straight to
the control plane over mTLS with a pre-provisioned certificate (`envoy-bootstrap --xds-cert`).
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentxds_support import ModuleServer, tagged_plugin

from wasmesh.testing.envoy import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "controlplane"))
from cp_helpers import ControlPlaneProcess, eventually, plugin_yaml, run_wasmesh, workload_yaml  # noqa: E402

pytestmark = pytest.mark.envoy


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        body = b"hello\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence access logs
        return


def _get(port: int) -> tuple[int, str | None]:
    """(status, x-agent-plugin header) of GET / on 127.0.0.1:port; (0, None) when nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return int(response.status), response.headers.get("x-agent-plugin")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("x-agent-plugin")
    except (urllib.error.URLError, ConnectionError, OSError):
        return 0, None


class SecureStack:
    """A secure `wasmesh control-plane` process with Workload web-1 and one plugin selecting it."""

    def __init__(self, workdir: Path, plugin_url: str) -> None:
        self.workdir = workdir
        self.upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        threading.Thread(target=self.upstream.serve_forever, daemon=True).start()
        self.listener_port = free_port()
        self.state, config = workdir / "state", workdir / "config"
        config.mkdir()
        upstream_port = int(self.upstream.server_address[1])
        (config / "web-1.yaml").write_text(
            workload_yaml("web-1", {"app": "web"}, self.listener_port, upstream_port)
        )
        (config / "plugin.yaml").write_text(plugin_yaml("tag", plugin_url, selector={"app": "web"}))
        self.ca_port = free_port()
        self.plane = ControlPlaneProcess(
            "--state-dir", str(self.state), "--ca-port", str(self.ca_port), "--config-dir", str(config),
            log_path=workdir / "control-plane.log",
        )  # fmt: skip
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.processes.append((process, log))
        return process

    def envoy(self, name: str, bootstrap_argv: list[str]) -> int:
        """Start Envoy with `wasmesh envoy-bootstrap ARGV`; returns its admin port."""
        admin = free_port()
        made = run_wasmesh("envoy-bootstrap", *bootstrap_argv, "--admin-port", str(admin))
        assert made.returncode == 0, made.stderr
        config = self.workdir / f"{name}.yaml"
        config.write_text(made.stdout)
        self.spawn(
            name, ["envoy", "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1", "-l", "info"]
        )
        return admin

    def logs(self) -> str:
        parts = [f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}" for _, log in self.processes]
        return "\n".join([*parts, f"--- control plane\n{self.plane.log()[-2000:]}"])

    def close(self) -> None:
        for process, _ in self.processes:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.plane.stop()
        self.upstream.shutdown()


@pytest.fixture
def modules() -> Iterator[ModuleServer]:
    server = ModuleServer()
    yield server
    server.stop()


def test_envoy_through_the_agent_on_mtls_serves_the_plugin(tmp_path: Path, modules: ModuleServer) -> None:
    url, _sha = modules.add("/tag.wasm", tagged_plugin("via-agent"))
    stack = SecureStack(tmp_path, url)
    try:
        token = run_wasmesh("control-plane", "bootstrap-token", "create", "--state-dir", str(stack.state),
                            "--namespace", "default", "--name", "web-1")  # fmt: skip
        assert token.returncode == 0, token.stderr
        token_file = tmp_path / "token"
        token_file.write_text(token.stdout)
        agent_port = free_port()
        stack.spawn("agent", [
            sys.executable, "-m", "wasmesh", "agent", "--xds", f"127.0.0.1:{stack.plane.xds_port}",
            "--listen", f"127.0.0.1:{agent_port}", "--metrics-port", str(free_port()),
            "--cache-dir", str(tmp_path / "cache"), "--namespace", "default", "--name", "web-1",
            "--xds-root-cert", str(stack.state / "ca-cert.pem"), "--xds-token-file", str(token_file),
            "--ca-address", f"127.0.0.1:{stack.ca_port}",
        ])  # fmt: skip
        stack.envoy(
            "envoy", ["--xds", f"127.0.0.1:{agent_port}", "--node-id", "web-1", "--labels", "app=web"]
        )
        eventually(lambda: _get(stack.listener_port) == (200, "via-agent"), timeout=60)
        log = stack.plane.log()
        assert "CA: issued a certificate for spiffe://cluster.local/ns/default/sa/web-1" in log, stack.logs()
        assert "ADS: new connection web-1-1 (namespace default)" in log
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None
    finally:
        stack.close()


def _certificate(stack: SecureStack, name: str) -> list[str]:
    cert, key = stack.workdir / f"{name}-cert.pem", stack.workdir / f"{name}-key.pem"
    made = run_wasmesh("control-plane", "cert", "create", "--state-dir", str(stack.state), "--namespace",
                       "default", "--name", name, "--cert-out", str(cert), "--key-out", str(key))  # fmt: skip
    assert made.returncode == 0, made.stderr
    return [
        "--xds-root-cert",
        str(stack.state / "ca-cert.pem"),
        "--xds-cert",
        str(cert),
        "--xds-key",
        str(key),
    ]


def test_envoy_straight_to_the_control_plane_over_mtls(tmp_path: Path) -> None:
    module = tmp_path / "tag.wasm"
    module.write_bytes(tagged_plugin("direct-mtls"))
    stack = SecureStack(tmp_path, f"file://{module}")
    try:
        tls = _certificate(stack, "web-1")
        xds = ["--xds", f"127.0.0.1:{stack.plane.xds_port}", "--labels", "app=web"]
        stack.envoy("envoy", [*xds, "--node-id", "web-1", *tls])
        eventually(lambda: _get(stack.listener_port) == (200, "direct-mtls"), timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None
    finally:
        stack.close()


def test_an_envoy_with_a_certificate_for_another_workload_gets_nothing(tmp_path: Path) -> None:
    module = tmp_path / "tag.wasm"
    module.write_bytes(tagged_plugin("intruder"))
    stack = SecureStack(tmp_path, f"file://{module}")
    try:
        tls = _certificate(stack, "other")
        xds = ["--xds", f"127.0.0.1:{stack.plane.xds_port}", "--labels", "app=web"]
        stack.envoy("intruder", [*xds, "--node-id", "web-1", *tls])
        expected = "ADS: refused node web-1 from ipv4:127.0.0.1:"
        eventually(lambda: expected in stack.plane.log(), timeout=60)
        refusal = next(line for line in stack.plane.log().splitlines() if expected in line)
        spiffe = "spiffe://cluster.local/ns/default/sa/other"
        assert refusal.endswith(f"identity {spiffe} may not act as namespace default workload web-1")
        assert _get(stack.listener_port) == (0, None)
        assert "ADS: new connection" not in stack.plane.log()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None
    finally:
        stack.close()
