"""The test-plugin build: every plugin is produced, valid Wasm, has the exports its role needs, and a
second build is a no-op."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import wasmtime

REPO = Path(__file__).resolve().parents[2]

C_PLUGINS = ["probe"]
WAT_PLUGINS = {
    "abi_0_1_0_two_param": "proxy_abi_version_0_1_0",
    "abi_0_1_0_three_param": "proxy_abi_version_0_1_0",
    "abi_0_2_100_stop_iteration": "proxy_abi_version_0_2_100",
    "no_abi_version": None,
    "trap_in_initialize": "proxy_abi_version_0_2_1",
    "configure_false": "proxy_abi_version_0_2_1",
    "infinite_loop": "proxy_abi_version_0_2_1",
    "memory_grow": "proxy_abi_version_0_2_1",
    "command_start": "proxy_abi_version_0_2_1",
}
AS_PLUGINS = ["as-headers", "as-http_call"]


def exports_of(path: Path) -> dict[str, wasmtime.FuncType | None]:
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(path))
    return {
        export.name: export.type if isinstance(export.type, wasmtime.FuncType) else None
        for export in module.exports
    }


def test_second_build_is_a_no_op(built_plugins: Path) -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "build-test-plugins.sh")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_unknown_family_fails_with_one_line() -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "build-test-plugins.sh"), "rust"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert result.stderr.strip() == "build-test-plugins: unknown plugin family 'rust' (expected c, wat or as)"


def test_probe_is_a_wasi_reactor_on_abi_0_2_1(built_plugins: Path) -> None:
    exports = exports_of(built_plugins / "probe.wasm")
    for name in [
        "_initialize",
        "proxy_abi_version_0_2_1",
        "malloc",
        "proxy_on_memory_allocate",
        "proxy_on_context_create",
        "proxy_on_vm_start",
        "proxy_on_configure",
        "proxy_on_tick",
        "proxy_on_queue_ready",
        "proxy_on_http_call_response",
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_request_trailers",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_response_trailers",
        "proxy_on_log",
        "proxy_on_done",
        "proxy_on_delete",
    ]:
        assert name in exports, name
    headers = exports["proxy_on_request_headers"]
    assert headers is not None and len(headers.params) == 3
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(built_plugins / "probe.wasm"))
    assert {imp.module for imp in module.imports} == {"env"}


@pytest.mark.parametrize("name,marker", sorted(WAT_PLUGINS.items()))
def test_wat_plugin_has_its_abi_marker(built_plugins: Path, name: str, marker: str | None) -> None:
    exports = exports_of(built_plugins / f"{name}.wasm")
    markers = [export for export in exports if export.startswith("proxy_abi_version_")]
    assert markers == ([marker] if marker else [])
    assert "malloc" in exports


def test_wat_header_callback_arities(built_plugins: Path) -> None:
    two = exports_of(built_plugins / "abi_0_1_0_two_param.wasm")["proxy_on_request_headers"]
    three = exports_of(built_plugins / "abi_0_1_0_three_param.wasm")["proxy_on_request_headers"]
    assert two is not None and len(two.params) == 2
    assert three is not None and len(three.params) == 3
    command = exports_of(built_plugins / "command_start.wasm")
    assert "_start" in command and "_initialize" not in command


@pytest.mark.parametrize("name", AS_PLUGINS)
def test_assemblyscript_plugin_uses_the_sdk_abi(built_plugins: Path, name: str) -> None:
    exports = exports_of(built_plugins / f"{name}.wasm")
    # @solo-io/proxy-runtime 0.1.8 declares 0_2_0 (later releases moved to 0_2_1).
    assert [e for e in exports if e.startswith("proxy_abi_version_")] == ["proxy_abi_version_0_2_0"]
    assert "malloc" in exports
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(built_plugins / f"{name}.wasm"))
    assert ("wasi_unstable", "proc_exit") in {(imp.module, imp.name) for imp in module.imports}
