"""Plugin chains on live traffic: Istio ordering, re-routing, failure policies, hot reload."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from proxy_plugins import (
    header_plugin_wat,
    rewrite_plugin_wat,
    trap_plugin_wat,
    wasmplugin_yaml,
    write_module,
)
from proxy_testsupport import EchoServer, LoopThread, StartProxy, request, simple_config

from wasmesh.proxy.reload import ReloadWatcher
from wasmesh.proxy.workers import FileConfigSource


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("modules")
    return {
        "A": write_module(d, "a", header_plugin_wat("A")),
        "B": write_module(d, "b", header_plugin_wat("B")),
        "C": write_module(d, "c", header_plugin_wat("C")),
        "trap": write_module(d, "trap", trap_plugin_wat()),
        "rewrite": write_module(d, "rewrite", rewrite_plugin_wat("/other/x")),
    }


def _port(proxy: Any) -> int:
    return int(proxy.listener_address()[1])


def _with_plugins(raw: dict[str, Any], plugin_file: Path) -> dict[str, Any]:
    raw["plugins"] = [{"path": str(plugin_file)}]
    return raw


def test_chain_order_follows_istio(
    start_proxy: StartProxy, echo: EchoServer, modules: dict[str, Path], tmp_path: Path
) -> None:
    f = tmp_path / "plugins.yaml"
    f.write_text(
        "---\n".join(
            [
                wasmplugin_yaml("a-stats", modules["A"], phase="STATS"),
                wasmplugin_yaml("b-authn-low", modules["B"], phase="AUTHN", priority=1),
                wasmplugin_yaml("c-authn-high", modules["C"], phase="AUTHN", priority=10),
            ]
        )
    )
    proxy = start_proxy(_with_plugins(simple_config(echo.port), f))
    status, headers, body = request(_port(proxy))
    assert status == 200
    sent = [v for k, v in json.loads(body)["headers"] if k == "x-chain"]
    assert sent == ["C", "B", "A"]
    # Encoders run in reverse chain order.
    assert headers["x-resp-chain"] == "A, B, C"


def test_path_rewrite_reselects_route(
    start_proxy: StartProxy, echo: EchoServer, echo_b: EchoServer, modules: dict[str, Path], tmp_path: Path
) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(wasmplugin_yaml("rewrite", modules["rewrite"]))
    raw = simple_config(echo.port)
    raw["clusters"].append({"name": "other", "endpoints": [f"127.0.0.1:{echo_b.port}"]})
    raw["listeners"][0]["virtual_hosts"][0]["routes"].insert(
        0, {"match": {"prefix": "/other"}, "cluster": "other"}
    )
    proxy = start_proxy(_with_plugins(raw, f))
    status, headers, body = request(_port(proxy), path="/start")
    assert status == 200
    assert headers["x-upstream-name"] == "echo-b"
    assert json.loads(body)["path"] == "/other/x"


@pytest.mark.parametrize(("strategy", "expected"), [("FAIL_CLOSE", 503), ("FAIL_OPEN", 200)])
def test_trapping_plugin_gets_failure_policy_answer(
    start_proxy: StartProxy,
    echo: EchoServer,
    modules: dict[str, Path],
    tmp_path: Path,
    strategy: str,
    expected: int,
) -> None:
    f = tmp_path / "trap.yaml"
    f.write_text(wasmplugin_yaml("trap", modules["trap"], fail_strategy=strategy))
    proxy = start_proxy(_with_plugins(simple_config(echo.port), f))
    for _ in range(5):
        status, _, _ = request(_port(proxy))
        assert status == expected


def test_reload_swaps_chain_without_failing_in_flight(
    start_proxy: StartProxy,
    echo: EchoServer,
    modules: dict[str, Path],
    tmp_path: Path,
    loop_thread: LoopThread,
) -> None:
    plugins = tmp_path / "plugins.yaml"
    plugins.write_text(wasmplugin_yaml("tagger", modules["A"]))
    cfg = tmp_path / "proxy.yaml"
    raw = _with_plugins(simple_config(echo.port), plugins)
    cfg.write_text(json.dumps(raw))
    proxy = start_proxy(raw, source=str(cfg))
    port = _port(proxy)
    watcher = ReloadWatcher(FileConfigSource(str(cfg)), proxy, interval_s=0.05)

    # A slow request in flight across the swap keeps its old chain (tag A) and succeeds.
    results: list[tuple[int, dict[str, str], bytes]] = []
    slow = threading.Thread(target=lambda: results.append(request(port, path="/delay?ms=600")))
    slow.start()
    time.sleep(0.2)
    plugins.write_text(wasmplugin_yaml("tagger", modules["B"]))
    assert loop_thread.run(watcher.check_once()) is True
    status, headers, _ = request(port)
    assert status == 200 and headers["x-resp-chain"] == "B"
    slow.join(5)
    assert results and results[0][0] == 200 and results[0][1]["x-resp-chain"] == "A"

    # A broken file is rejected (one log line) and the current chain keeps serving.
    time.sleep(0.01)
    plugins.write_text("kind: WasmPlugin\n  bad: [yaml\n")
    assert loop_thread.run(watcher.check_once()) is False
    status, headers, _ = request(port)
    assert status == 200 and headers["x-resp-chain"] == "B"
    # A module that cannot be loaded is rejected the same way.
    bad_module = tmp_path / "bad.wasm"
    bad_module.write_bytes(b"\0asm\1\0\0\0garbage")
    plugins.write_text(wasmplugin_yaml("tagger", bad_module))
    assert loop_thread.run(watcher.check_once()) is False
    assert request(port)[1]["x-resp-chain"] == "B"
    assert proxy.stats.config_reload_failed == 2


def test_http_call_over_cluster_manager(
    start_proxy: StartProxy, echo: EchoServer, loop_thread: LoopThread
) -> None:
    from wasmesh.http.headers import HeaderMap
    from wasmesh.proxy.plugins import ClusterHttpCaller

    proxy = start_proxy(simple_config(echo.port))
    caller = ClusterHttpCaller(lambda: proxy.clusters)
    answers: list[Any] = []

    async def call(cluster: str, path: str, timeout_ms: int) -> bool:
        headers = HeaderMap([(b":method", b"POST"), (b":path", path.encode()), (b":authority", b"svc")])
        return caller.dispatch(cluster, headers, b"payload", HeaderMap(), timeout_ms, answers.append)

    assert loop_thread.run(call("nope", "/", 1000)) is False
    assert loop_thread.run(call("backend", "/called", 2000)) is True
    assert loop_thread.run(call("backend", "/hang", 200)) is True
    deadline = time.monotonic() + 5
    while len(answers) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    ok, timed_out = answers
    assert ok.headers.get(b":status") == b"200"
    info = json.loads(ok.body)
    assert info["path"] == "/called" and info["body_len"] == 7 and dict(info["headers"])["host"] == "svc"
    # As Envoy's AsyncClient: a timed-out call is answered by the router's own 504, not a failure.
    assert timed_out.headers.pairs() == [(b":status", b"504"), (b"content-length", b"24"),
                                         (b"content-type", b"text/plain")]  # fmt: skip
    assert timed_out.body == b"upstream request timeout"
