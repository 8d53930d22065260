"""`wasmesh apply/delete/get/envoy-bootstrap` against a running control plane, and /metrics."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cp_helpers import eventually, free_port, get_json, plugin_yaml, workload_yaml

from wasmesh.api.model import WasmPlugin
from wasmesh.controlplane import cli
from wasmesh.controlplane.server import ControlPlane, ControlPlaneOptions, ControlPlaneThread


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wasmesh")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.handler(args))


@pytest.fixture(scope="module")
def control_plane() -> Iterator[ControlPlane]:
    thread = ControlPlaneThread(ControlPlaneOptions(xds_port=0, api_port=0))
    yield thread.start()
    thread.stop()


@pytest.fixture(scope="module")
def server(control_plane: ControlPlane) -> str:
    return f"http://127.0.0.1:{control_plane.api_port}"


def test_apply_get_delete(
    server: str, control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(
        plugin_yaml("auth", "file://./auth.wasm", {"a": 1}, phase="AUTHN", priority=7)
        + "---\n"
        + plugin_yaml("stats", "oci://ghcr.io/x/stats:1")
        + "---\n"
        + workload_yaml("web-1", {"app": "web"}, 10000, 8080)
    )
    assert run(["apply", "-f", str(manifest), "--server", server]) == 0
    out = capsys.readouterr().out
    assert "wasmplugin.extensions.istio.io/auth created" in out
    assert "workload.wasmesh.io/web-1 created" in out
    assert run(["apply", "-f", str(manifest), "--server", server]) == 0
    assert "wasmplugin.extensions.istio.io/auth unchanged" in capsys.readouterr().out

    assert run(["get", "wasmplugins", "--server", server]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "READY", "PHASE", "PRIORITY", "AGE"]
    assert lines[1].split()[:4] == ["auth", "0/0", "AUTHN", "7"]
    assert lines[2].split()[:4] == ["stats", "0/0", "UNSPECIFIED_PHASE", "<unset>"]

    assert run(["get", "wp", "auth", "-o", "yaml", "--server", server]) == 0
    document = yaml.safe_load(capsys.readouterr().out)
    assert document["metadata"]["generation"] == 1
    assert document["metadata"]["resourceVersion"]
    # Stored as written; the served plugin resolves a relative file:// URL against the directory
    # of the file `wasmesh apply` read (a wasmesh extension).
    assert document["spec"]["url"] == "file://./auth.wasm"
    stored = control_plane.store.get("WasmPlugin", "default", "auth")
    assert stored is not None and isinstance(stored.parsed, WasmPlugin)
    assert stored.parsed.url == f"file://{tmp_path.resolve()}/auth.wasm"

    bad = tmp_path / "bad.yaml"
    bad.write_text(plugin_yaml("broken", "fake://x"))
    assert run(["apply", "-f", str(bad), "--server", server]) == 1
    err = capsys.readouterr().err
    assert "WasmPlugin default/broken" in err and "url" in err

    assert run(["delete", "-f", str(manifest), "--server", server]) == 0
    assert 'wasmplugin.extensions.istio.io "auth" deleted' in capsys.readouterr().out
    assert run(["get", "wasmplugins", "--server", server]) == 0
    assert "No resources found" in capsys.readouterr().err
    assert run(["delete", "-f", str(manifest), "--server", server]) == 1
    assert "not found" in capsys.readouterr().err


def test_metrics_names(server: str) -> None:
    with urllib.request.urlopen(f"{server}/metrics", timeout=5) as response:
        text = response.read().decode()
    for name in ("pilot_total_xds_rejects", "pilot_xds_pushes", "pilot_xds", "pilot_proxy_convergence_time"):
        assert f"# TYPE {name} " in text
    assert 'pilot_proxy_convergence_time_bucket{le="0.1"}' in text


def test_get_unknown_kind(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["get", "pods", "--server", server]) == 2
    assert "unknown resource type 'pods'" in capsys.readouterr().err


@pytest.mark.envoy
def test_envoy_bootstrap_is_valid_for_envoy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("envoy") is None:
        pytest.skip("envoy is not on PATH")
    argv = ["envoy-bootstrap", "--xds", "127.0.0.1:15010", "--node-id", "web-1", "--labels", "app=web,v=1"]
    assert run(argv) == 0
    text = capsys.readouterr().out
    bootstrap = yaml.safe_load(text)
    assert bootstrap["node"]["metadata"]["LABELS"] == {"app": "web", "v": "1"}
    # Plain YAML: the config sources LDS and CDS share are written out twice, with no anchors.
    assert "&id" not in text and "*id" not in text
    lds, cds = bootstrap["dynamic_resources"]["lds_config"], bootstrap["dynamic_resources"]["cds_config"]
    assert lds == cds == {"ads": {}, "resource_api_version": "V3"}
    path = tmp_path / "bootstrap.yaml"
    path.write_text(text)
    result = subprocess.run(
        ["envoy", "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert run(["envoy-bootstrap", "--xds", "nope", "--node-id", "x"]) == 2
    assert "--xds: expected HOST:PORT" in capsys.readouterr().err


def test_control_plane_command_as_a_process(tmp_path: Path) -> None:
    (tmp_path / "plugin.yaml").write_text(plugin_yaml("from-dir", "file:///p.wasm", priority=3))
    api_port, xds_port = free_port(), free_port()
    server = f"http://127.0.0.1:{api_port}"
    command = [sys.executable, "-m", "wasmesh", "control-plane", "--plaintext", "--config-dir", str(tmp_path)]
    process = subprocess.Popen(
        [*command, "--api-port", str(api_port), "--xds-port", str(xds_port), "--log-level", "warning"]
        + ["--insecure-api", "--state-dir", str(tmp_path.parent / f"{tmp_path.name}-state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        eventually(lambda: get_json(f"{server}/resources/WasmPlugin")[0] == 200)
        result = subprocess.run(
            [sys.executable, "-m", "wasmesh", "get", "wasmplugins", "--server", server],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[1].split()[:4] == ["from-dir", "0/0", "UNSPECIFIED_PHASE", "3"]
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
