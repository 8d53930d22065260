"""Tiny Proxy-Wasm plugins in WAT for the proxy tests (compiled with wasmtime.wat2wasm).

* ``header_plugin(tag)``: adds ``x-chain: <tag>`` to the request and ``x-resp-chain: <tag>`` to
  the response (add, not replace, so a chain's order is visible in the header list).
* ``rewrite_plugin(path)``: replaces ``:path`` (route re-selection after a plugin change).
* ``trap_plugin()``: traps (``unreachable``) in every request-headers callback.
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

_PRELUDE_TEMPLATE = """
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value"
    (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") PAGES)
  (global $heap (mut i32) (i32.const 8192))
  (func (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (global.get $heap) (local.get $size)) (i32.const 7))
                               (i32.const -8)))
    (block $done
      (loop $grow
        (br_if $done (i32.le_u (global.get $heap) (i32.shl (memory.size) (i32.const 16))))
        (drop (memory.grow (i32.const 1)))
        (br $grow)))
    (local.get $ptr))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
"""
_PRELUDE = _PRELUDE_TEMPLATE.replace("PAGES", "2")


def _wat_string(text: str) -> str:
    return "".join(f"\\{b:02x}" for b in text.encode())


def header_plugin_wat(tag: str) -> str:
    return f"""(module {_PRELUDE}
  (data (i32.const 100) "x-chain")
  (data (i32.const 200) "x-resp-chain")
  (data (i32.const 300) "{_wat_string(tag)}")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add_header
      (i32.const 0) (i32.const 100) (i32.const 7) (i32.const 300) (i32.const {len(tag)})))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $add_header
      (i32.const 2) (i32.const 200) (i32.const 12) (i32.const 300) (i32.const {len(tag)})))
    (i32.const 0)))
"""


def rewrite_plugin_wat(path: str) -> str:
    return f"""(module {_PRELUDE}
  (data (i32.const 100) ":path")
  (data (i32.const 300) "{_wat_string(path)}")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $replace_header
      (i32.const 0) (i32.const 100) (i32.const 5) (i32.const 300) (i32.const {len(path)})))
    (i32.const 0)))
"""


def trap_plugin_wat() -> str:
    return f"""(module {_PRELUDE}
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    unreachable))
"""


def write_module(directory: Path, name: str, wat: str) -> Path:
    path = directory / f"{name}.wasm"
    path.write_bytes(wasmtime.wat2wasm(wat))
    return path


def wasmplugin_yaml(
    name: str,
    module: Path,
    *,
    phase: str | None = None,
    priority: int | None = None,
    fail_strategy: str = "FAIL_CLOSE",
    plugin_config: str | None = None,
) -> str:
    lines = [
        "apiVersion: extensions.istio.io/v1alpha1",
        "kind: WasmPlugin",
        "metadata:",
        f"  name: {name}",
        "  namespace: default",
        "spec:",
        f"  url: file://{module}",
        f"  failStrategy: {fail_strategy}",
    ]
    if phase:
        lines.append(f"  phase: {phase}")
    if priority is not None:
        lines.append(f"  priority: {priority}")
    if plugin_config:
        lines.append(f"  pluginConfig: {plugin_config}")
    return "\n".join(lines) + "\n"


def looping_plugin_wat(pages: int = 2) -> str:
    """A plugin whose request-headers callback never returns; ``pages`` of 64 KiB memory at start."""
    return f"""(module {_PRELUDE_TEMPLATE.replace("PAGES", str(pages))}
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $forever (br $forever))
    (i32.const 0)))
"""
