"""Control-plane restarts and the `wasmesh proxy --xds` command (a real subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from pxds_support import (
    ProxyThread,
    api_call,
    chain_of,
    eventually,
    free_port,
    get,
    wasmplugin_yaml,
    workload_yaml,
)

from wasmesh.controlplane.server import ControlPlaneOptions, ControlPlaneThread


def test_control_plane_restart_keeps_config_then_resyncs(
    tmp_path: Path, mark_plugin: Path, echo_port: int
) -> None:
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    port, xds_port = free_port(), free_port()
    url = f"file://{mark_plugin}"
    (mesh / "web.yaml").write_text(workload_yaml("web-1", {"app": "web"}, port, echo_port))
    (mesh / "plugin.yaml").write_text(wasmplugin_yaml("a", url, {"id": "a"}))
    options = ControlPlaneOptions(config_dir=mesh, xds_port=xds_port, api_port=0)
    runner = ControlPlaneThread(options)
    runner.start()
    proxy = ProxyThread(xds_port, "web-1", {"app": "web"})
    try:
        eventually(lambda: chain_of(port) == ["a"], what="plugin a serving")
        runner.stop()
        eventually(lambda: not proxy.proxy.client.connected, what="disconnect noticed")
        for _ in range(5):
            assert chain_of(port) == ["a"]  # last good config keeps serving without a control plane

        (mesh / "plugin.yaml").write_text(wasmplugin_yaml("a", url, {"id": "after-restart"}))
        runner = ControlPlaneThread(options)
        runner.start()
        eventually(lambda: chain_of(port) == ["after-restart"], what="resync after reconnect")
        assert proxy.proxy.client.connected
    finally:
        proxy.stop()
        runner.stop()


def test_wasmesh_proxy_xds_subprocess_serves_example_plugin(
    tmp_path: Path, tracking_plugin: Path, echo_port: int
) -> None:
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    port, admin_port = free_port(), free_port()
    runner = ControlPlaneThread(ControlPlaneOptions(config_dir=mesh, xds_port=0, api_port=0))
    plane = runner.start()
    api_call(plane.api_port, "apply", workload_yaml("gw-1", {"istio": "ingressgateway"}, port, echo_port))
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wasmesh",
                "proxy",
                "--xds",
                f"127.0.0.1:{plane.xds_port}",
                "--plaintext",
                "--node-id",
                "gw-1",
                "--labels",
                "istio=ingressgateway,tier=edge",
                "--admin",
                f"127.0.0.1:{admin_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        eventually(lambda: get(port)[0] == 200, timeout=30, what=f"subprocess serving ({log_path})")
        plugin = wasmplugin_yaml(
            "request-tracking",
            f"file://{tracking_plugin}",
            {"tracking_header": "X-Tracking-Id"},
            selector={"matchLabels": {"istio": "ingressgateway"}},
            phase="STATS",
        )
        api_call(plane.api_port, "apply", plugin)
        eventually(
            lambda: "x-tracking-id" in get(port)[1].get("headers", {}), what="tracking header on the request"
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/config_dump", timeout=5) as response:
            dump = json.loads(response.read())
        chain = dump["listeners"][0]["plugin_chain"]["plugins"]
        assert [p["name"] for p in chain] == ["default.request-tracking"]
        assert dump["xds"]["connected"] is True

        api_call(plane.api_port, "delete", plugin)
        eventually(
            lambda: "x-tracking-id" not in get(port)[1].get("headers", {"x-tracking-id": ""}), what="gone"
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        runner.stop()
    assert process.returncode == 0, log_path.read_text()[-2000:]
