"""`wasmesh run` / `wasmesh proxy` as subprocesses: admin endpoints, workers, graceful drain, bad configs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_plugins import header_plugin_wat, wasmplugin_yaml, write_module
from proxy_testsupport import EchoServer, free_port, request


def _wasmesh(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "wasmesh", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _admin(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait_ready(proc: subprocess.Popen[str], admin_port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if _admin(admin_port, "/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("proxy not ready in time")


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli-plugins")
    write_module(d, "a", header_plugin_wat("A"))
    write_module(d, "b", header_plugin_wat("B"))
    (d / "wasmplugins.yaml").write_text(
        wasmplugin_yaml("tag-a", d / "a.wasm", phase="AUTHN")
        + "---\n"
        + wasmplugin_yaml("tag-b", d / "b.wasm")
    )
    return d


@pytest.fixture
def run_proc() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_wasmesh_run_with_plugins_and_admin(
    echo: EchoServer, plugin_dir: Path, run_proc: list[subprocess.Popen[str]]
) -> None:
    port, admin = free_port(), free_port()
    proc = _wasmesh(
        "run", "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{echo.port}",
        "-f", str(plugin_dir / "wasmplugins.yaml"), f"file://{plugin_dir / 'a.wasm'}",
        "--config", '{"k": "v"}',
        "--root-id", "root", "--admin", f"127.0.0.1:{admin}",
    )  # fmt: skip
    run_proc.append(proc)
    _wait_ready(proc, admin)
    status, headers, body = request(port)
    assert status == 200
    # AUTHN tag-a first, then the UNSPECIFIED ones by creation time/name: cli-plugin (A), tag-b (B).
    assert [v for k, v in json.loads(body)["headers"] if k == "x-chain"] == ["A", "A", "B"]

    code, text = _admin(admin, "/stats/prometheus")
    assert code == 200
    assert 'wasmesh_downstream_rq_total{listener="main",response_code_class="2xx"} 1' in text
    assert "wasmesh_upstream_rq_time_ms_bucket" in text
    code, text = _admin(admin, "/config_dump")
    dump = json.loads(text)
    names = [p["name"] for p in dump["listeners"][0]["plugin_chain"]["plugins"]]
    assert names == ["default.tag-a", "default.cli-plugin", "default.tag-b"]
    assert _admin(admin, "/logging")[0] == 200
    code, text = _admin(admin, "/logging?level=debug", method="POST")
    assert code == 200 and "wasmesh: debug" in text
    assert _admin(admin, "/logging?level=nonsense", method="POST")[0] == 400
    assert _stop(proc) == 0


def test_workers_share_port_and_drain_gracefully(
    echo: EchoServer, run_proc: list[subprocess.Popen[str]]
) -> None:
    port, admin = free_port(), free_port()
    proc = _wasmesh(
        "run", "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{echo.port}",
        "--workers", "2", "--admin", f"127.0.0.1:{admin}",
    )  # fmt: skip
    run_proc.append(proc)
    _wait_ready(proc, admin)
    for _ in range(40):
        assert request(port)[0] == 200
    code, text = _admin(admin, "/stats/prometheus")
    assert code == 200 and 'worker="0"' in text and 'worker="1"' in text
    assert text.count("# TYPE wasmesh_downstream_rq_total counter") == 1
    dump = json.loads(_admin(admin, "/config_dump")[1])
    assert len(dump["workers"]) == 2

    # In-flight requests survive SIGTERM (drain), new connections are refused afterwards.
    results: list[int] = []
    slow = [
        threading.Thread(target=lambda: results.append(request(port, path="/delay?ms=700")[0]))
        for _ in range(4)
    ]
    for t in slow:
        t.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    for t in slow:
        t.join(10)
    assert results == [200, 200, 200, 200]
    assert proc.wait(30) == 0


def test_bad_config_is_one_line_and_nonzero(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        "listeners:\n  - name: main\n    port: 8080\n    virtual_hosts:\n      - domains: ['*']\n"
        "        routes:\n          - match: {prefix: /}\n            cluster: missing\nclusters: []\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "wasmesh", "proxy", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(cfg) in lines[0] and "listeners[0].virtual_hosts[0].routes[0].cluster" in lines[0]

    bad_plugin = tmp_path / "wp.yaml"
    bad_plugin.write_text(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: x}\n"
        "spec: {url: 'file:///nonexistent/x.wasm', phase: NOPE}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "wasmesh", "run", "--listen", f"127.0.0.1:{free_port()}", "--upstream",
         "http://127.0.0.1:1", "-f", str(bad_plugin)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad_plugin) in lines[0] and "phase" in lines[0], lines


def test_proxy_config_file_hot_reload(
    echo: EchoServer, plugin_dir: Path, tmp_path: Path, run_proc: list[subprocess.Popen[str]]
) -> None:
    port, admin = free_port(), free_port()
    plugins = tmp_path / "plugins.yaml"
    plugins.write_text(wasmplugin_yaml("tagger", plugin_dir / "a.wasm"))
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(
        f"admin: {{port: {admin}}}\nreload: {{poll_interval: 100ms}}\n"
        f"listeners:\n  - name: main\n    port: {port}\n    virtual_hosts:\n      - domains: ['*']\n"
        f"        routes: [{{match: {{prefix: /}}, cluster: echo}}]\n"
        f"clusters: [{{name: echo, endpoints: ['127.0.0.1:{echo.port}']}}]\n"
        f"plugins: [{{path: {plugins.name}}}]\n"
    )
    proc = _wasmesh("proxy", "--config", str(cfg))
    run_proc.append(proc)
    _wait_ready(proc, admin)
    assert request(port)[1]["x-resp-chain"] == "A"
    plugins.write_text(wasmplugin_yaml("tagger", plugin_dir / "b.wasm"))
    deadline = time.monotonic() + 10
    while request(port)[1].get("x-resp-chain") != "B":
        assert time.monotonic() < deadline, "plugin change not picked up"
        time.sleep(0.1)
    # A broken config file keeps the current chain serving.
    cfg.write_text(cfg.read_text() + "bogus: 1\n")
    time.sleep(0.5)
    assert request(port)[1]["x-resp-chain"] == "B"
    assert "wasmesh_config_reload_failed_total 1" in _admin(admin, "/stats/prometheus")[1]
    assert _stop(proc) == 0
