"""Plugin status per proxy, against real proxies: Envoy 1.40 behind `wasmesh agent`, and a wasmesh proxy.

The control plane (a `wasmesh control-plane` process) must show, per WasmPlugin and per connected
proxy, whether the proxy runs it (ACK), refused it (NACK, with Envoy's / the proxy's message), or
could not fetch its module (FETCH_FAILED: the agent serves the RBAC fallback and reports it), in
`GET /status/wasmplugins`, `wasmesh get wasmplugins` (READY) and `wasmesh describe`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cp_helpers import ControlPlaneProcess, eventually, free_port, get_json, plugin_yaml, run_wasmesh

from wasmesh.controlplane.bootstrap import build_bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))
from agent_testsupport import Registry, start_registry  # noqa: E402

pytestmark = pytest.mark.envoy

ECDS = "extensions.istio.io/wasmplugin/default."


def workload(name: str, port: int, upstream_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "wasmesh.io/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "listeners": [
                {
                    "name": "http",
                    "port": port,
                    "address": "127.0.0.1",
                    "mode": "SERVER",
                    "virtualHosts": [{"routes": [{"match": {"prefix": "/"}, "cluster": "echo"}]}],
                }
            ],
            "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{upstream_port}"]}],
        },
    }


@dataclass
class Mesh:
    workdir: Path
    plane: ControlPlaneProcess
    registry: Registry
    envoy_port: int
    proxy_port: int
    processes: list[subprocess.Popen[bytes]]

    def wasmesh(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run_wasmesh(*argv, "--server", self.plane.server)

    def apply(self, text: str, verb: str = "apply") -> None:
        manifest = self.workdir / "manifest.yaml"
        manifest.write_text(text)
        result = self.wasmesh(verb, "-f", str(manifest))
        assert result.returncode == 0, result.stderr

    def status(self, name: str) -> dict[str, Any]:
        code, body = get_json(f"{self.plane.server}/status/wasmplugins/default/{name}")
        assert code == 200, body
        return body

    def states(self, name: str) -> dict[str, tuple[str, str]]:
        """node → (state, error) of the plugin's proxies."""
        return {p["node"]: (p["state"], p["error"]) for p in self.status(name)["proxies"]}

    def chain(self, port: int) -> list[str] | None:
        code, body = get_json(f"http://127.0.0.1:{port}/hello")
        return list(body["chain"]) if code == 200 else None

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.workdir.glob("*.log")
        )


def _spawn(workdir: Path, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    log = (workdir / f"{name}.log").open("wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, echo_port: int) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("status")
    plane = ControlPlaneProcess("--debounce", "0.05", log_path=workdir / "control-plane.log")
    registry = start_registry(workdir / "registry")
    envoy_port, proxy_port = free_port(), free_port()
    mesh = Mesh(workdir, plane, registry, envoy_port, proxy_port, [])
    try:
        mesh.apply(
            yaml.safe_dump_all(
                [workload("web-1", envoy_port, echo_port), workload("web-2", proxy_port, echo_port)]
            )
        )
        agent_port, admin_port = free_port(), free_port()
        python = [sys.executable, "-m", "wasmesh"]
        mesh.processes.append(
            _spawn(
                workdir,
                "agent",
                [*python, "agent", "--xds", f"127.0.0.1:{plane.xds_port}", "--plaintext",
                 "--listen", f"127.0.0.1:{agent_port}", "--metrics-port", str(free_port()),
                 "--cache-dir", str(workdir / "agent-cache"), "--insecure-registries", "*"],
            )
        )  # fmt: skip
        bootstrap = workdir / "envoy.yaml"
        bootstrap.write_text(
            yaml.safe_dump(
                build_bootstrap("127.0.0.1", agent_port, "web-1", {"app": "web"}, "default", admin_port)
            )
        )
        mesh.processes.append(
            _spawn(
                workdir,
                "envoy",
                [
                    "envoy",
                    "-c",
                    str(bootstrap),
                    "--use-dynamic-base-id",
                    "--concurrency",
                    "1",
                    "-l",
                    "warning",
                ],
            )
        )
        xds = ["--xds", f"127.0.0.1:{plane.xds_port}", "--plaintext", "--labels", "app=web"]
        mesh.processes.append(
            _spawn(
                workdir,
                "proxy-web-2",
                [*python, "proxy", *xds, "--node-id", "web-2", "--namespace", "default",
                 "--cache-dir", str(workdir / "proxy-cache")],
            )
        )  # fmt: skip
        # A bootstrap with the wrong namespace: its node names no Workload.
        mesh.processes.append(
            _spawn(
                workdir, "proxy-lost", [*python, "proxy", *xds, "--node-id", "web-2", "--namespace", "prod"]
            )
        )
        eventually(lambda: mesh.chain(envoy_port) == [] and mesh.chain(proxy_port) == [], timeout=90)
        yield mesh
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        for process in mesh.processes:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        registry.stop()
        plane.stop()


def test_loaded_plugin_is_ready_on_every_selected_proxy(mesh: Mesh, chain_plugin: Path) -> None:
    mesh.apply(plugin_yaml("good", f"file://{chain_plugin}", {"tag": "good"}, selector={"app": "web"}))
    eventually(lambda: mesh.chain(mesh.envoy_port) == ['{"tag":"good"}'])
    eventually(lambda: mesh.chain(mesh.proxy_port) == ['{"tag":"good"}'])
    eventually(lambda: mesh.states("good") == {"web-1": ("ACK", ""), "web-2": ("ACK", "")})
    status = mesh.status("good")
    assert (status["ready"], status["selected"], status["resource"]) == (2, 2, ECDS + "good")
    assert [p["listeners"] for p in status["proxies"]] == [["http"], ["http"]]

    rows = [line.split() for line in mesh.wasmesh("get", "wasmplugins").stdout.splitlines()]
    assert [row[:3] for row in rows] == [["NAME", "READY", "PHASE"], ["good", "2/2", "UNSPECIFIED_PHASE"]]


def test_unmatched_proxy_is_warned_in_log_and_describe(mesh: Mesh, chain_plugin: Path) -> None:
    mesh.apply(plugin_yaml("good", f"file://{chain_plugin}", {"tag": "good"}, selector={"app": "web"}))
    warning = re.compile(
        r'proxy (web-2-\d+) \(node web-2, namespace prod\): no Workload or Gateway "prod/web-2" matches '
        r"its node, "
        r"so it gets no listeners or clusters \(check the node's --namespace, --workload and node id\)"
    )
    logged = eventually(lambda: warning.search(mesh.plane.log()))
    described = mesh.wasmesh("describe", "wasmplugin", "good")
    assert described.returncode == 0, described.stderr
    lines = described.stdout.splitlines()
    warnings = lines[lines.index("Warnings:") + 1 :]
    assert [line.strip() for line in warnings] == [logged.group(0)]
    assert "  Ready:  2/2 (proxies that loaded it / proxies it selects)" in lines
    proxies = lines[lines.index("  Proxies:") + 1 : lines.index("Warnings:")]
    assert [row.split()[1:] for row in proxies] == [
        ["NODE", "NAMESPACE", "STATE", "LAST", "ERROR"],
        ["web-1", "default", "ACK", "<none>"],
        ["web-2", "default", "ACK", "<none>"],
    ]


def test_nacked_plugin_shows_each_proxys_error(mesh: Mesh, chain_plugin: Path) -> None:
    # proxy_on_configure returns false for this configuration: Envoy (V8) and the wasmesh proxy refuse it.
    mesh.apply(plugin_yaml("refused", f"file://{chain_plugin}", {"fail": True}, selector={"app": "web"}))
    try:
        states = eventually(
            lambda: (s := mesh.states("refused")) and all(state == "NACK" for state, _ in s.values()) and s,
            timeout=30,
        )
        assert sorted(states) == ["web-1", "web-2"]
        envoy_error, proxy_error = states["web-1"][1], states["web-2"][1]
        assert "default.refused" in envoy_error, envoy_error
        assert proxy_error.startswith(f"{ECDS}refused: "), proxy_error
        status = mesh.status("refused")
        assert (status["ready"], status["selected"]) == (0, 2)
        # The plugin that loaded before is still loaded everywhere.
        assert mesh.states("good") == {"web-1": ("ACK", ""), "web-2": ("ACK", "")}
        rows = [line.split()[:2] for line in mesh.wasmesh("get", "wasmplugins").stdout.splitlines()]
        assert rows == [["NAME", "READY"], ["good", "2/2"], ["refused", "0/2"]]
        described = mesh.wasmesh("describe", "wasmplugin", "refused").stdout
        assert "  Ready:  0/2 (proxies that loaded it / proxies it selects)" in described
        assert envoy_error in described and proxy_error in described
    finally:
        mesh.apply(plugin_yaml("refused", f"file://{chain_plugin}"), verb="delete")


def test_unfetchable_module_is_reported_by_the_agent(mesh: Mesh, chain_plugin: Path) -> None:
    image = f"oci://{mesh.registry.host}/wasmesh/does-not-exist:1.0"
    mesh.apply(plugin_yaml("missing", image, selector={"app": "web"}))
    try:
        states = eventually(
            lambda: (
                (s := mesh.states("missing")) and all(state != "PENDING" for state, _ in s.values()) and s
            ),
            timeout=60,
        )
        envoy_state, envoy_error = states["web-1"]
        assert envoy_state == "FETCH_FAILED", states
        assert envoy_error.startswith(f"{ECDS}missing: cannot fetch Wasm module {image}: "), envoy_error
        assert envoy_error.endswith("(serving the deny-all RBAC fallback)"), envoy_error
        # Envoy runs the deny-all fallback for the plugin (fail closed): 403, and the report is not a reject.
        assert get_json(f"http://127.0.0.1:{mesh.envoy_port}/hello")[0] == 403
        proxy_state, proxy_error = states["web-2"]
        assert proxy_state == "NACK", states
        assert proxy_error.startswith(f"{ECDS}missing: cannot read module {image}"), proxy_error
        status = mesh.status("missing")
        assert (status["ready"], status["selected"]) == (0, 2)
        assert "FETCH FAILED web-1-" in mesh.plane.log()
    finally:
        mesh.apply(plugin_yaml("missing", image), verb="delete")
    eventually(lambda: mesh.chain(mesh.envoy_port) == ['{"tag":"good"}'])


def test_network_plugin_is_accepted_and_warned_about(mesh: Mesh, chain_plugin: Path) -> None:
    manifest = mesh.workdir / "l4.yaml"
    manifest.write_text(
        plugin_yaml("l4", f"file://{chain_plugin}", selector={"app": "web"}).replace(
            "spec:\n", "spec:\n  type: NETWORK\n"
        )
    )
    validated = run_wasmesh("validate", "-f", str(manifest))
    assert (validated.returncode, validated.stdout) == (
        0,
        "1 WasmPlugin(s) checked, 1 valid: 0 error(s), 0 warning(s)\n",
    )
    warning = (
        "WasmPlugin default/l4: type NETWORK: L4 (network filter) plugins are not served yet: wasmesh "
        "proxies skip them (Envoy receives them as network filters before the HTTP connection manager)"
    )
    applied = mesh.wasmesh("apply", "-f", str(manifest))
    try:
        assert (applied.returncode, applied.stderr, applied.stdout) == (
            0,
            f"Warning: {warning}\n",
            "wasmplugin.extensions.istio.io/l4 created\n",
        )
        assert warning in mesh.plane.log()
        described = mesh.wasmesh("describe", "wasmplugin", "l4").stdout.splitlines()
        assert f"  {warning}" in described[described.index("Warnings:") + 1 :]
        proxy_log = mesh.workdir / "proxy-web-2.log"
        eventually(
            lambda: (
                f"listener http: {ECDS}l4: type NETWORK: L4 (network filter) plugins are not served yet;"
                " skipped" in proxy_log.read_text()
            ),
            timeout=30,
        )
        # The wasmesh proxy keeps serving its HTTP chain.
        assert mesh.chain(mesh.proxy_port) == ['{"tag":"good"}']
    finally:
        assert mesh.wasmesh("delete", "wasmplugin", "l4").returncode == 0
