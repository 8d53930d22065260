"""A proxy or agent told to stop while a module fetch hangs on a stalled registry exits at once.

The proxy used to wait for the fetch thread (the interpreter joins thread-pool workers at exit), i.e.
for the 15 s request timeout of the registry request; the agent died of SIGTERM without stopping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from agent_testsupport import RawListener, free_port, wait_for_port

from wasmesh.agent.options import DEFAULT_HTTP_TIMEOUT_S
from wasmesh.controlplane.server import ControlPlaneOptions, ControlPlaneThread


def mesh_with_remote_plugin(mesh: Path, url: str) -> None:
    workload = {
        "apiVersion": "wasmesh.io/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "listeners": [
                {
                    "name": "http",
                    "port": free_port(),
                    "address": "127.0.0.1",
                    "virtualHosts": [{"routes": [{"match": {"prefix": "/"}, "cluster": "upstream"}]}],
                }
            ],
            "clusters": [{"name": "upstream", "endpoints": [f"127.0.0.1:{free_port()}"]}],
        },
    }
    plugin = {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "stalled", "namespace": "default"},
        "spec": {"url": url},
    }
    (mesh / "web.yaml").write_text(yaml.safe_dump(workload))
    (mesh / "plugin.yaml").write_text(yaml.safe_dump(plugin))


def wasmesh_process(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "wasmesh", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def stop_with_sigterm(process: subprocess.Popen[bytes]) -> float:
    """Seconds from SIGTERM to exit."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(DEFAULT_HTTP_TIMEOUT_S + 30)
    return time.monotonic() - started


def end(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_proxy_exits_promptly_on_sigterm_while_a_fetch_is_stalled(tmp_path: Path) -> None:
    stalled = RawListener("127.0.0.1", answer=None)  # accepts, reads, never answers
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    mesh_with_remote_plugin(mesh, f"oci://{stalled.host}/stalled/plugin:v1")
    runner = ControlPlaneThread(ControlPlaneOptions(config_dir=mesh, xds_port=0, api_port=0))
    plane = runner.start()
    log_path = tmp_path / "proxy.log"
    process = wasmesh_process(
        ["proxy", "--xds", f"127.0.0.1:{plane.xds_port}",
         "--plaintext", "--node-id", "web-1", "--labels", "app=web",
         "--cache-dir", str(tmp_path / "cache")],
        log_path,
    )  # fmt: skip
    try:
        stalled.wait_for_connection()  # the module fetch is in flight (its TLS ClientHello arrived)
        assert stalled.tls_connections() == 1
        time.sleep(0.5)  # the proxy is waiting on the registry, not just connecting
        elapsed = stop_with_sigterm(process)
    finally:
        end(process)
        runner.stop()
        stalled.stop()
    assert process.returncode == 0, log_path.read_text()[-2000:]
    # Well before the fetch could have ended on its own (the 15 s request timeout): the old
    # behaviour waited that out.
    assert elapsed < DEFAULT_HTTP_TIMEOUT_S / 3, f"exit took {elapsed:.1f} s"


def test_agent_exits_cleanly_on_sigterm_while_a_fetch_is_stalled(tmp_path: Path) -> None:
    """control plane -> agent (converting ECDS: the fetch stalls) -> a wasmesh proxy as its Envoy."""
    stalled = RawListener("127.0.0.1", answer=None)
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    mesh_with_remote_plugin(mesh, f"oci://{stalled.host}/stalled/plugin:v1")
    runner = ControlPlaneThread(ControlPlaneOptions(config_dir=mesh, xds_port=0, api_port=0))
    plane = runner.start()
    agent_port, metrics_port = free_port(), free_port()
    agent_log = tmp_path / "agent.log"
    agent = wasmesh_process(
        ["agent", "--xds", f"127.0.0.1:{plane.xds_port}",
         "--plaintext", "--listen", f"127.0.0.1:{agent_port}",
         "--metrics-port", str(metrics_port), "--cache-dir", str(tmp_path / "cache")],
        agent_log,
    )  # fmt: skip
    client = None
    try:
        wait_for_port(metrics_port, timeout_s=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/ready", timeout=10) as response:
            assert response.status == 200
        client = wasmesh_process(
            ["proxy", "--xds", f"127.0.0.1:{agent_port}",
             "--plaintext", "--node-id", "web-1", "--labels", "app=web",
             "--cache-dir", str(tmp_path / "proxy-cache")],
            tmp_path / "proxy.log",
        )  # fmt: skip
        stalled.wait_for_connection()  # the agent is converting the ECDS resource
        time.sleep(0.5)
        elapsed = stop_with_sigterm(agent)
    finally:
        end(agent, *([client] if client is not None else []))
        runner.stop()
        stalled.stop()
    log_text = agent_log.read_text()
    assert agent.returncode == 0, log_text[-2000:]
    assert "agent: stopping" in log_text
    assert elapsed < DEFAULT_HTTP_TIMEOUT_S / 3, f"exit took {elapsed:.1f} s"
