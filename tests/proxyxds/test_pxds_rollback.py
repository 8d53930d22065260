"""A rejected LDS update is all or nothing: the last good listeners keep serving (real control plane,
real proxy, real sockets)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pxds_support import (
    ProxyThread,
    api_call,
    chain_of,
    eventually,
    free_port,
    metric_value,
    wasmplugin_yaml,
)

from wasmesh.controlplane.server import ControlPlane

LDS_REJECTS = 'pilot_total_xds_rejects{type="lds"}'


def _workload(listeners: dict[str, int], upstream_port: int) -> str:
    """A Workload `web-1` (app=web) with one listener per (name, port), all routed to `echo`."""
    body = {
        "apiVersion": "wasmesh.io/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "listeners": [
                {
                    "name": name,
                    "port": port,
                    "address": "127.0.0.1",
                    "virtualHosts": [{"routes": [{"match": {"prefix": "/"}, "cluster": "echo"}]}],
                }
                for name, port in listeners.items()
            ],
            "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{upstream_port}"]}],
        },
    }
    return yaml.safe_dump(body, sort_keys=False)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process holds (listening), so the proxy's bind fails with EADDRINUSE."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield int(holder.getsockname()[1])


def _chain_on(connection: http.client.HTTPConnection) -> list[str]:
    """The x-chain ids the upstream saw for one request on an already open keep-alive connection."""
    connection.request("GET", "/")
    response = response_of(connection)
    assert response[0] == 200
    return [json.loads(v)["id"] for v in response[1].get("chain", [])]


def response_of(connection: http.client.HTTPConnection) -> tuple[int, dict[str, Any]]:
    answer = connection.getresponse()
    return answer.status, dict(json.loads(answer.read()))


def _serving(proxy: ProxyThread) -> dict[str, tuple[str, int]]:
    """Listener name → bound address, for the listeners the proxy serves."""
    return {name: lst.bound_address for name, lst in proxy.proxy.server.listeners.items()}


def test_update_removing_a_and_moving_b_to_a_taken_port_is_nacked_and_a_keeps_serving(
    control_plane: ControlPlane, mark_plugin: Path, echo_port: int, taken_port: int
) -> None:
    # b's routes are known already, so the update is applied (and fails) on LDS, not while b warms.
    api = control_plane.api_port
    port_a, port_b = free_port(), free_port()
    api_call(api, "apply", _workload({"a": port_a, "b": port_b}, echo_port))
    api_call(api, "apply", wasmplugin_yaml("mark", f"file://{mark_plugin}", {"id": "m"}))
    proxy = ProxyThread(control_plane.xds_port, "web-1", {"app": "web"})
    try:
        eventually(lambda: chain_of(port_a) == chain_of(port_b) == ["m"], what="a and b serving")
        kept_alive = http.client.HTTPConnection("127.0.0.1", port_a, timeout=5)
        assert _chain_on(kept_alive) == ["m"]
        listener_a = proxy.proxy.server.listeners["a"]
        before = metric_value(api, LDS_REJECTS)

        api_call(api, "apply", _workload({"b": taken_port}, echo_port))
        eventually(lambda: metric_value(api, LDS_REJECTS) == before + 1, what="LDS NACK counted")

        assert proxy.proxy.last_error == (
            f"listener b: cannot listen on 127.0.0.1:{taken_port}: Address already in use"
        )
        assert chain_of(port_a) == ["m"]  # new connections: a still accepts, with its chain
        assert _chain_on(kept_alive) == ["m"]  # and its open connections were not drained
        assert chain_of(port_b) == ["m"]
        assert proxy.proxy.server.listeners["a"] is listener_a
        assert _serving(proxy) == {"a": ("127.0.0.1", port_a), "b": ("127.0.0.1", port_b)}
        assert sorted(proxy.proxy.installed) == ["a", "b"]
        assert proxy.proxy.server.stats.config_reload_failed == 1
        kept_alive.close()
    finally:
        proxy.stop()


def test_update_giving_a_port_to_b_is_rolled_back_when_c_cannot_bind(
    control_plane: ControlPlane, mark_plugin: Path, echo_port: int, taken_port: int
) -> None:
    """a's port must be freed for b; c then fails: a is bound again, b and c stay where they were."""
    api = control_plane.api_port
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    api_call(api, "apply", _workload({"a": port_a, "b": port_b, "c": port_c}, echo_port))
    api_call(api, "apply", wasmplugin_yaml("mark", f"file://{mark_plugin}", {"id": "m"}))
    proxy = ProxyThread(control_plane.xds_port, "web-1", {"app": "web"})
    try:
        eventually(lambda: chain_of(port_c) == ["m"], what="a, b and c serving")
        listener_a = proxy.proxy.server.listeners["a"]
        chain_a = listener_a.chain
        before = metric_value(api, LDS_REJECTS)

        api_call(api, "apply", _workload({"b": port_a, "c": taken_port}, echo_port))
        eventually(lambda: metric_value(api, LDS_REJECTS) == before + 1, what="LDS NACK counted")

        assert proxy.proxy.last_error == (
            f"listener c: cannot listen on 127.0.0.1:{taken_port}: Address already in use"
        )
        assert [chain_of(port) for port in (port_a, port_b, port_c)] == [["m"], ["m"], ["m"]]
        addresses = {"a": ("127.0.0.1", port_a), "b": ("127.0.0.1", port_b), "c": ("127.0.0.1", port_c)}
        assert _serving(proxy) == addresses
        assert proxy.proxy.server.listeners["a"] is listener_a and listener_a.chain is chain_a

        # The next good update is applied: b takes a's port, a and c are gone.
        api_call(api, "apply", _workload({"b": port_a}, echo_port))
        eventually(lambda: sorted(_serving(proxy)) == ["b"], what="b moved onto a's port")
        assert _serving(proxy) == {"b": ("127.0.0.1", port_a)}
        assert chain_of(port_a) == ["m"]
        assert chain_of(port_b) is None and chain_of(port_c) is None
    finally:
        proxy.stop()


def test_wasmesh_proxy_xds_process_rolls_back_a_failed_listener_update(
    tmp_path: Path, control_plane: ControlPlane, mark_plugin: Path, echo_port: int, taken_port: int
) -> None:
    """The same rollback in a `wasmesh proxy --xds` process (uvloop), watched through its admin API."""
    api = control_plane.api_port
    port_a, port_b, port_c, admin_port = free_port(), free_port(), free_port(), free_port()
    api_call(api, "apply", _workload({"a": port_a, "b": port_b, "c": port_c}, echo_port))
    api_call(api, "apply", wasmplugin_yaml("mark", f"file://{mark_plugin}", {"id": "m"}))
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "wasmesh", "proxy", "--xds", f"127.0.0.1:{control_plane.xds_port}",
             "--plaintext",
             "--node-id", "web-1", "--labels", "app=web", "--admin", f"127.0.0.1:{admin_port}"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        eventually(lambda: chain_of(port_c) == ["m"], timeout=60, what=f"a, b and c serving ({log_path})")
        before = metric_value(api, LDS_REJECTS)

        # b takes a's port (a is closed first), c moves to a taken one: the update is rejected and undone.
        api_call(api, "apply", _workload({"b": port_a, "c": taken_port}, echo_port))
        eventually(lambda: metric_value(api, LDS_REJECTS) == before + 1, what="LDS NACK counted")

        dump = _admin_json(admin_port, "/config_dump")
        assert dump["xds"]["last_error"] == (
            f"listener c: cannot listen on 127.0.0.1:{taken_port}: Address already in use"
        )
        listeners = {entry["name"]: entry["address"] for entry in dump["listeners"]}
        assert listeners == {
            "a": f"127.0.0.1:{port_a}",
            "b": f"127.0.0.1:{port_b}",
            "c": f"127.0.0.1:{port_c}",
        }
        assert [chain_of(port) for port in (port_a, port_b, port_c)] == [["m"], ["m"], ["m"]]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log_path.read_text()[-2000:]


def _admin_json(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return dict(json.loads(response.read()))
