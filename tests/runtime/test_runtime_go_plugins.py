"""The 14 real Go (Higress 0_2_100, Go wasip1 reactor) plugins of PyPI gpustack-higress-plugins
load and start with a documented/minimal configuration, and the compile cache works."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_support import FakeCallbacks, LogRecorder, request

from wasmesh.http.filter import FilterHeadersStatus
from wasmesh.runtime import PluginSpec, Runtime
from wasmesh.runtime.abi import AbiVersion
from wasmesh.runtime.plugin import WasmHttpFilter

gpustack = pytest.importorskip("gpustack_higress_plugins")
PLUGINS_DIR = Path(gpustack.__file__).parent / "plugins"

# Minimal valid configurations (Higress plugin READMEs; `{}` where the plugin documents
# every field as optional and accepts an empty global config).
CONFIGS: dict[str, dict[str, object]] = {
    "ai-data-masking": {"deny_openai": True, "deny_words": ["secret"]},
    "ai-statistics": {},
    "gpustack-ai-proxy": {},
    "gpustack-ext-auth": {},
    "gpustack-generic-proxy-router": {},
    "gpustack-ip-acl": {},
    "gpustack-lb": {},
    "gpustack-lb-decision-service": {},
    "gpustack-lb-least-load": {},
    "gpustack-lb-session-affinity": {"sessionKeys": [{"header": "x-session-id"}]},
    "gpustack-rate-limit": {},
    "gpustack-set-header-pre-route": {"routeNameHeader": "x-route-name"},
    "gpustack-token-usage": {},
    "transformer": {"reqRules": [{"operate": "add", "headers": [{"key": "x-added", "value": "by-wasm"}]}]},
}


def plugin_wasm(name: str) -> bytes:
    (path,) = sorted((PLUGINS_DIR / name).glob("*/plugin.wasm"))
    return path.read_bytes()


def test_every_packaged_plugin_has_a_config() -> None:
    assert sorted(p.name for p in PLUGINS_DIR.iterdir() if p.is_dir()) == sorted(CONFIGS)


@pytest.fixture(scope="module")
def go_runtime() -> Iterator[tuple[Runtime, LogRecorder]]:
    # The default (persistent) compile cache: the first run compiles ~80 MB of Go, later runs deserialize.
    logs = LogRecorder()
    rt = Runtime(log_handler=logs)
    yield rt, logs
    rt.close()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_go_plugin_loads_and_starts(go_runtime: tuple[Runtime, LogRecorder], name: str) -> None:
    rt, logs = go_runtime
    factory = rt.load_plugin(PluginSpec(name=name, module=plugin_wasm(name),
                                        configuration=json.dumps(CONFIGS[name]).encode()))
    assert factory.vm.abi == AbiVersion.V0_2_100
    assert factory.root is not None
    assert factory.vm.failure is None
    errors = [m for p, level, m in logs.lines if p == name and level >= 4]
    assert errors == [], errors


def test_go_plugin_serves_a_request(go_runtime: tuple[Runtime, LogRecorder]) -> None:
    rt, _ = go_runtime
    name = "transformer"
    factory = rt.load_plugin(PluginSpec(name=f"{name}-req", module=plugin_wasm(name),
                                        configuration=json.dumps(CONFIGS[name]).encode()))
    filt = factory.create_filter()
    assert isinstance(filt, WasmHttpFilter)
    callbacks = FakeCallbacks()
    filt.set_callbacks(callbacks)
    headers = request()
    assert filt.decode_headers(headers, True) == FilterHeadersStatus.CONTINUE
    assert headers.get(b"x-added") == b"by-wasm"
    filt.on_log()
    filt.on_destroy()
    assert callbacks.local_replies == [] and factory.vm.failure is None


def test_second_load_deserializes_from_the_disk_cache(tmp_path: Path) -> None:
    wasm = plugin_wasm("gpustack-lb-least-load")
    first = Runtime(compile_cache_dir=str(tmp_path))
    try:
        first.load_plugin(PluginSpec(name="a", module=wasm, configuration=b"{}"))
        assert (first.engine.stats.compiled, first.engine.stats.deserialized) == (1, 0)
    finally:
        first.close()
    assert len(list(tmp_path.glob("*.cwasm"))) == 1
    second = Runtime(compile_cache_dir=str(tmp_path))
    try:
        factory = second.load_plugin(PluginSpec(name="b", module=wasm, configuration=b"{}"))
        assert (second.engine.stats.compiled, second.engine.stats.deserialized) == (0, 1)
        assert factory.vm.compiled.from_disk_cache
    finally:
        second.close()
