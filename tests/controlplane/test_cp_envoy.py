"""The control plane driving real Envoy 1.40 over ADS (LDS/RDS/CDS/ECDS) with a WAT plugin."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cp_helpers import (
    Envoy,
    eventually,
    free_port,
    get_json,
    plugin_yaml,
    workload_yaml,
)

from wasmesh.controlplane.server import ControlPlane, ControlPlaneOptions, ControlPlaneThread

pytestmark = pytest.mark.envoy

ECDS_PREFIX = "extensions.istio.io/wasmplugin/default."


class Mesh:
    def __init__(self, workdir: Path, echo_port: int) -> None:
        self.workdir = workdir
        self.config_dir = workdir / "config"
        self.config_dir.mkdir()
        self.echo_port = echo_port
        self.xds_port = free_port()
        self.api_port = free_port()
        self.web_port = free_port()
        self.db_port = free_port()
        self.thread = self._start_control_plane()
        self.envoys: list[Envoy] = []

    def _start_control_plane(self) -> ControlPlaneThread:
        options = ControlPlaneOptions(
            config_dir=self.config_dir, xds_port=self.xds_port, api_port=self.api_port, debounce_after=0.1
        )
        thread = ControlPlaneThread(options)
        thread.start()
        return thread

    @property
    def control_plane(self) -> ControlPlane:
        return self.thread.control_plane

    def restart_control_plane(self) -> None:
        self.thread.stop()
        self.thread = self._start_control_plane()

    def post(self, path: str, text: str) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", data=text.encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            return exc.code, dict(json.loads(exc.read()))

    def apply(self, text: str) -> dict[str, Any]:
        status, reply = self.post("/apply", text)
        assert status == 200, reply
        return reply

    def chain(self, port: int) -> list[str] | None:
        status, body = get_json(f"http://127.0.0.1:{port}/hello")
        return list(body["chain"]) if status == 200 else None

    def wait_chain(self, port: int, expected: list[str]) -> None:
        eventually(lambda: self.chain(port) == expected)

    def metric(self, line_prefix: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(line_prefix + " "):
                    return float(line.split()[-1])
        return 0.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, echo_port: int) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path_factory.mktemp("mesh"), echo_port)
    mesh.apply(workload_yaml("web-1", {"app": "web"}, mesh.web_port, echo_port))
    mesh.apply(workload_yaml("db-1", {"app": "db"}, mesh.db_port, echo_port))
    mesh.envoys = [
        Envoy(mesh.workdir, mesh.xds_port, "web-1", {"app": "web"}),
        Envoy(mesh.workdir, mesh.xds_port, "db-1", {"app": "db"}),
    ]
    try:
        mesh.wait_chain(mesh.web_port, [])
        mesh.wait_chain(mesh.db_port, [])
        yield mesh
    except AssertionError:
        for envoy in mesh.envoys:
            print(envoy.log_tail())
        raise
    finally:
        for envoy in mesh.envoys:
            envoy.stop()
        mesh.thread.stop()


def http_filter_names(envoy: Envoy) -> list[str]:
    """The HTTP filter names of the active `http` listener, from Envoy's /config_dump."""
    for config in envoy.config_dump()["configs"]:
        if not config["@type"].endswith("ListenersConfigDump"):
            continue
        for listener in config.get("dynamic_listeners", []):
            active = listener.get("active_state")
            if listener["name"] != "http" or active is None:
                continue
            manager = active["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
            return [item["name"] for item in manager["http_filters"]]
    return []


def test_apply_change_order_and_delete(mesh: Mesh, chain_plugin: Path) -> None:
    url = f"file://{chain_plugin}"
    mesh.apply(plugin_yaml("first", url, {"tag": "a"}, selector={"app": "web"}))
    mesh.wait_chain(mesh.web_port, ['{"tag":"a"}'])
    assert mesh.chain(mesh.db_port) == []  # label selection: the db proxy is not selected

    # Config change → new behaviour, no restart.
    mesh.apply(plugin_yaml("first", url, {"tag": "a2"}, selector={"app": "web"}))
    mesh.wait_chain(mesh.web_port, ['{"tag":"a2"}'])

    # A second plugin with a higher priority runs first within the same (unspecified) phase.
    mesh.apply(plugin_yaml("second", url, {"tag": "b"}, priority=10))
    mesh.wait_chain(mesh.web_port, ['{"tag":"b"}', '{"tag":"a2"}'])
    mesh.wait_chain(mesh.db_port, ['{"tag":"b"}'])
    web = mesh.envoys[0]
    assert http_filter_names(web) == [
        ECDS_PREFIX + "second",
        ECDS_PREFIX + "first",
        "envoy.filters.http.router",
    ]

    # Phase beats priority: AUTHN runs before UNSPECIFIED.
    mesh.apply(plugin_yaml("first", url, {"tag": "a2"}, selector={"app": "web"}, phase="AUTHN"))
    mesh.wait_chain(mesh.web_port, ['{"tag":"a2"}', '{"tag":"b"}'])
    assert http_filter_names(web)[:2] == [ECDS_PREFIX + "first", ECDS_PREFIX + "second"]

    # Delete → gone.
    status, reply = mesh.post("/delete", plugin_yaml("first", url))
    assert status == 200, reply
    mesh.wait_chain(mesh.web_port, ['{"tag":"b"}'])
    mesh.post("/delete", plugin_yaml("second", url))
    mesh.wait_chain(mesh.web_port, [])
    mesh.wait_chain(mesh.db_port, [])


def test_invalid_resource_is_rejected_and_never_pushed(mesh: Mesh, chain_plugin: Path) -> None:
    url = f"file://{chain_plugin}"
    mesh.apply(plugin_yaml("keeper", url, {"tag": "k"}, selector={"app": "web"}))
    mesh.wait_chain(mesh.web_port, ['{"tag":"k"}'])
    pushes = mesh.metric('pilot_xds_pushes{type="ecds"}')
    bad = plugin_yaml("keeper", url, {"tag": "changed"}, selector={"app": "web"}).replace(
        f"url: {url}", f"url: {url}\n  sha256: ABC"
    )
    status, reply = mesh.post("/apply", bad)
    assert status == 422
    assert any("sha256" in error for error in reply["errors"]), reply
    assert mesh.metric('pilot_xds_pushes{type="ecds"}') == pushes
    assert mesh.chain(mesh.web_port) == ['{"tag":"k"}']
    mesh.post("/delete", plugin_yaml("keeper", url))
    mesh.wait_chain(mesh.web_port, [])


def test_envoy_nack_is_counted_and_last_good_config_kept(
    mesh: Mesh, chain_plugin: Path, not_wasm_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"file://{chain_plugin}"
    mesh.apply(plugin_yaml("nacked", url, {"tag": "good"}, selector={"app": "web"}))
    mesh.wait_chain(mesh.web_port, ['{"tag":"good"}'])
    rejects = mesh.metric('pilot_total_xds_rejects{type="ecds"}')

    # proxy_on_configure returns false for this configuration: Envoy NACKs the ECDS update.
    mesh.apply(plugin_yaml("nacked", url, {"fail": True}, selector={"app": "web"}))
    eventually(lambda: mesh.metric('pilot_total_xds_rejects{type="ecds"}') > rejects)
    assert mesh.chain(mesh.web_port) == ['{"tag":"good"}']
    assert "ADS:ECDS: ACK ERROR web-1" in caplog.text

    # A module file that is not wasm: NACKed too, traffic still runs the last good plugin.
    rejects = mesh.metric('pilot_total_xds_rejects{type="ecds"}')
    mesh.apply(plugin_yaml("nacked", f"file://{not_wasm_file}", {"tag": "x"}, selector={"app": "web"}))
    eventually(lambda: mesh.metric('pilot_total_xds_rejects{type="ecds"}') > rejects)
    assert mesh.chain(mesh.web_port) == ['{"tag":"good"}']

    # Fixing the resource recovers.
    mesh.apply(plugin_yaml("nacked", url, {"tag": "fixed"}, selector={"app": "web"}))
    mesh.wait_chain(mesh.web_port, ['{"tag":"fixed"}'])
    mesh.post("/delete", plugin_yaml("nacked", url))
    mesh.wait_chain(mesh.web_port, [])


def test_config_dir_and_control_plane_restart(mesh: Mesh, chain_plugin: Path) -> None:
    url = f"file://{chain_plugin}"
    plugin_file = mesh.config_dir / "dir-plugin.yaml"
    plugin_file.write_text(plugin_yaml("from-dir", url, {"tag": "dir1"}, selector={"app": "web"}))
    mesh.wait_chain(mesh.web_port, ['{"tag":"dir1"}'])

    # An invalid edit is rejected (logged) and the last good version keeps being served.
    plugin_file.write_text(plugin_yaml("from-dir", "fake://nope", {"tag": "bad"}, selector={"app": "web"}))
    watcher = mesh.control_plane.watcher
    assert watcher is not None
    eventually(lambda: any("url" in line for line in watcher.errors))
    assert mesh.chain(mesh.web_port) == ['{"tag":"dir1"}']

    # Workloads applied over the API live in memory; keep them in the directory across the restart.
    (mesh.config_dir / "workloads.yaml").write_text(
        workload_yaml("web-1", {"app": "web"}, mesh.web_port, mesh.echo_port)
        + "---\n"
        + workload_yaml("db-1", {"app": "db"}, mesh.db_port, mesh.echo_port)
    )
    plugin_file.write_text(plugin_yaml("from-dir", url, {"tag": "dir2"}, selector={"app": "web"}))
    mesh.wait_chain(mesh.web_port, ['{"tag":"dir2"}'])

    mesh.thread.stop()
    # Envoy keeps serving its last config while the control plane is down.
    assert mesh.chain(mesh.web_port) == ['{"tag":"dir2"}']
    plugin_file.write_text(plugin_yaml("from-dir", url, {"tag": "dir3"}, selector={"app": "web"}))
    mesh.thread = mesh._start_control_plane()
    mesh.wait_chain(mesh.web_port, ['{"tag":"dir3"}'])  # reconnected and resynced
    eventually(lambda: mesh.metric("pilot_xds") == 2)

    plugin_file.unlink()
    mesh.wait_chain(mesh.web_port, [])
