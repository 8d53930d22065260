"""The Wasm safety limits as operator settings: the ``wasm:`` config section, the --wasm-* flags,
and a runaway plugin stopped by a configured deadline on live traffic."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from proxy_plugins import looping_plugin_wat, wasmplugin_yaml, write_module
from proxy_testsupport import EchoServer, LoopThread, StartProxy, request, simple_config

from wasmesh.proxy.cli import RunConfigSource, register, wasm_limits_from_flags
from wasmesh.proxy.config import MIB, ConfigError, PluginResource, WasmLimits, load_config, parse_config
from wasmesh.proxy.plugins import PluginChainError, WasmChainBuilder, parse_resources
from wasmesh.proxy.workers import FileConfigSource, StartupWasmLimitsSource, make_server
from wasmesh.proxy.xds import WasmFilterSpec, XdsOptions
from wasmesh.runtime.plugin import PluginSpec
from wasmesh.runtime.runtime import Runtime


def _minimal(**extra: Any) -> dict[str, Any]:
    return {"listeners": [], **extra}


# --------------------------------------------------------------------------- the wasm: section


def test_defaults_are_the_runtimes_own() -> None:
    limits = parse_config(_minimal()).wasm
    spec_defaults = PluginSpec(name="x", module=b"")
    runtime_defaults = inspect.signature(Runtime.__init__).parameters
    assert limits == WasmLimits()
    assert limits.callback_deadline_ms == spec_defaults.callback_deadline_ms
    assert limits.memory_limit_bytes == spec_defaults.memory_limit_bytes
    assert limits.startup_deadline_ms == runtime_defaults["startup_deadline_ms"].default
    assert limits.reload_backoff_s == runtime_defaults["reload_backoff_s"].default


def test_wasm_section_parses_durations_and_mib() -> None:
    raw = _minimal(
        wasm={
            "callback_deadline": "250ms",
            "startup_deadline": 2,
            "memory_limit_mib": 64,
            "reload_backoff": "1.5s",
        }
    )
    assert parse_config(raw).wasm == WasmLimits(
        callback_deadline_ms=250, startup_deadline_ms=2000, memory_limit_bytes=64 * MIB, reload_backoff_s=1.5
    )


def test_wasm_section_fields_are_optional() -> None:
    limits = parse_config(_minimal(wasm={"callback_deadline": "100ms", "reload_backoff": None})).wasm
    assert limits == WasmLimits(callback_deadline_ms=100)
    assert parse_config(_minimal(wasm=None)).wasm == WasmLimits()


@pytest.mark.parametrize(
    ("wasm", "message"),
    [
        ("fast", "proxy.yaml: wasm: expected a mapping, got str"),
        ({"callback_deadline": 0}, "proxy.yaml: wasm.callback_deadline: must be at least 1ms, got 0"),
        ({"callback_deadline": "0.2ms"}, "proxy.yaml: wasm.callback_deadline: must be at least 1ms"),
        ({"startup_deadline": "soon"}, "proxy.yaml: wasm.startup_deadline: expected a duration"),
        ({"startup_deadline": "2h"}, "proxy.yaml: wasm.startup_deadline: must be at most 1h"),
        ({"memory_limit_mib": 0}, "proxy.yaml: wasm.memory_limit_mib: expected an integer number of MiB"),
        ({"memory_limit_mib": 5000}, "proxy.yaml: wasm.memory_limit_mib: expected an integer number of MiB"),
        ({"memory_limit_mib": "1Gi"}, "proxy.yaml: wasm.memory_limit_mib: expected an integer number of MiB"),
        ({"memory_limit_mib": True}, "proxy.yaml: wasm.memory_limit_mib: expected an integer number of MiB"),
        ({"reload_backoff": -1}, "proxy.yaml: wasm.reload_backoff: duration must not be negative"),
        ({"callbackDeadlineMs": 100}, "proxy.yaml: wasm.callbackDeadlineMs: unknown field (allowed: "),
    ],
)
def test_wasm_section_errors_are_one_line_naming_the_field(wasm: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(wasm=wasm), source="proxy.yaml")
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_wasm_section_from_a_file(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("listeners: []\nwasm:\n  callback_deadline: 100ms\n  memory_limit_mib: 16\n")
    assert load_config(cfg).wasm == WasmLimits(callback_deadline_ms=100, memory_limit_bytes=16 * MIB)
    cfg.write_text("listeners: []\nwasm:\n  memory_limit_mib: lots\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}: wasm\.memory_limit_mib: "):
        load_config(cfg)


# --------------------------------------------------------------------------- builders and flags


def test_chain_builder_applies_limits_to_runtime_and_every_plugin_spec() -> None:
    limits = WasmLimits(
        callback_deadline_ms=100, startup_deadline_ms=300, memory_limit_bytes=8 * MIB, reload_backoff_s=0.25
    )
    builder = WasmChainBuilder(node={}, cache=None, clusters=lambda: None, limits=limits)
    body = {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"url": "file:///nowhere.wasm"},
    }
    (plugin,) = parse_resources([PluginResource(body=body, source="<inline>")])
    spec = builder._spec(plugin, b"")
    assert (spec.callback_deadline_ms, spec.memory_limit_bytes) == (100, 8 * MIB)
    try:
        assert (builder.runtime.startup_deadline_ms, builder.runtime.reload_backoff_s) == (300, 0.25)
    finally:
        builder.close()


def _parse_cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wasmesh")
    register(parser.add_subparsers())
    return parser.parse_args(list(argv))


def test_flags_set_the_limits_for_run_and_xds() -> None:
    args = _parse_cli(
        "proxy", "--xds", "127.0.0.1:15010", "--node-id", "n",
        "--wasm-callback-deadline", "100ms", "--wasm-startup-deadline", "3s",
        "--wasm-memory-limit-mib", "32", "--wasm-reload-backoff", "500ms",
    )  # fmt: skip
    limits = wasm_limits_from_flags(args, "wasmesh proxy")
    assert limits == WasmLimits(
        callback_deadline_ms=100, startup_deadline_ms=3000, memory_limit_bytes=32 * MIB, reload_backoff_s=0.5
    )
    xds_proxy = XdsOptions(target="127.0.0.1:1", node_id="n", wasm_limits=limits).proxy()
    assert xds_proxy.server.config.wasm == limits
    ecds = WasmFilterSpec(
        resource_name="r", plugin_name="p", root_id="", configuration=b"", failure_policy="FAIL_CLOSE"
    )
    spec = xds_proxy.builder._plugin_spec(ecds, b"")
    assert (spec.callback_deadline_ms, spec.memory_limit_bytes) == (100, 32 * MIB)
    assert xds_proxy.builder.runtime.startup_deadline_ms == 3000
    xds_proxy.builder.close()

    run = _parse_cli("run", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9")
    assert wasm_limits_from_flags(run, "wasmesh run") == WasmLimits()
    source = RunConfigSource(listen="127.0.0.1:8080", upstream="http://127.0.0.1:9", wasm=limits)
    assert source.load().wasm == limits


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--wasm-callback-deadline", "0", "wasmesh run: --wasm-callback-deadline: must be at least 1ms"),
        ("--wasm-startup-deadline", "later", "wasmesh run: --wasm-startup-deadline: expected a duration"),
        ("--wasm-memory-limit-mib", "0", "wasmesh run: --wasm-memory-limit-mib: expected an integer"),
        ("--wasm-reload-backoff", "-1s", "wasmesh run: --wasm-reload-backoff: expected a duration"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(flag: str, value: str, message: str) -> None:
    args = _parse_cli("run", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9", f"{flag}={value}")
    with pytest.raises(ConfigError) as info:
        wasm_limits_from_flags(args, "wasmesh run")
    assert str(info.value).startswith(message)


def test_flags_with_a_config_file_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse_cli("proxy", "--config", "proxy.yaml", "--wasm-callback-deadline", "100ms")
    assert args.handler(args) == 2
    assert capsys.readouterr().err.strip() == (
        "error: wasmesh proxy: --wasm-callback-deadline: only with --xds "
        "(a --config file sets limits in its wasm: section)"
    )


def test_reload_keeps_the_startup_limits_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("listeners: []\nwasm: {callback_deadline: 100ms}\n")
    started = load_config(cfg).wasm
    source = StartupWasmLimitsSource(FileConfigSource(str(cfg)), started)
    with caplog.at_level(logging.WARNING, logger="wasmesh.proxy"):
        assert source.load().wasm == started
        assert not caplog.records
        cfg.write_text("listeners: []\nwasm: {callback_deadline: 2s}\n")
        assert source.load().wasm == started
    assert "wasm: changed limits take effect when the proxy restarts" in caplog.text


# --------------------------------------------------------------------------- live traffic


def _two_listeners(upstream_port: int, plugin_file: Path, wasm: dict[str, Any]) -> dict[str, Any]:
    """`guarded` runs every plugin; `open` (same upstream) runs none."""
    raw = simple_config(upstream_port)
    guarded = {**raw["listeners"][0], "name": "guarded"}
    unguarded = {**raw["listeners"][0], "name": "open", "plugins": []}
    return {**raw, "listeners": [guarded, unguarded], "plugins": [{"path": str(plugin_file)}], "wasm": wasm}


def test_runaway_plugin_is_stopped_by_the_configured_deadline(
    start_proxy: StartProxy, echo: EchoServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = write_module(tmp_path, "loop", looping_plugin_wat(pages=2))
    plugin_file = tmp_path / "loop.yaml"
    plugin_file.write_text(wasmplugin_yaml("loop", module, fail_strategy="FAIL_CLOSE"))
    with caplog.at_level(logging.ERROR):
        proxy = start_proxy(_two_listeners(echo.port, plugin_file, {"callback_deadline": "100ms"}))
        guarded = proxy.listener_address("guarded")[1]
        # The deadline (not the 1 s default) ends the loop: the runtime names the limit it enforced.
        status, _, body = request(guarded, timeout=10)
        assert status == 503
    assert "exceeded its 100 ms CPU deadline" in caplog.text
    # The failed VM stays failed (FAIL_CLOSE) and keeps answering; the worker keeps serving.
    for _ in range(3):
        assert request(guarded, timeout=10)[0] == 503
    status, headers, body = request(proxy.listener_address("open")[1], path="/after", timeout=10)
    assert status == 200 and json.loads(body)["path"] == "/after"


def test_memory_limit_stops_a_plugin_that_needs_more(
    loop_thread: LoopThread, echo: EchoServer, tmp_path: Path
) -> None:
    pages_for_2_mib = 2 * MIB // 65536
    module = write_module(tmp_path, "big", looping_plugin_wat(pages=pages_for_2_mib))
    plugin_file = tmp_path / "big.yaml"
    plugin_file.write_text(wasmplugin_yaml("big", module))
    config = parse_config(_two_listeners(echo.port, plugin_file, {"memory_limit_mib": 1}))
    proxy = make_server(config, 0, False)
    try:
        with pytest.raises(PluginChainError) as info:
            loop_thread.run(proxy.start())
    finally:
        loop_thread.run(proxy.stop(drain_timeout_s=0))
    text = str(info.value)
    assert f"{plugin_file}: plugin default.big: " in text and "memory limit" in text and "\n" not in text
