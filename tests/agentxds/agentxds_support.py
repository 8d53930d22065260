"""Helpers of the agent xDS tests: WAT plugin modules and an HTTP server that serves them."""

from __future__ import annotations

import hashlib
import http.server
import threading
from typing import Any

import wasmtime

# A Proxy-Wasm plugin that adds the response header `x-agent-plugin: <TAG>`; the tag makes every
# built module (and so its sha256) distinct.
TAGGED_PLUGIN_WAT = r"""
(module
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 16) "x-agent-plugin")
  (data (i32.const 48) "TAG")
  (func (export "proxy_abi_version_0_2_1"))
  (func $malloc (export "malloc") (param $size i32) (result i32)
    (local $p i32)
    global.get $heap
    local.set $p
    global.get $heap
    local.get $size
    i32.add
    i32.const 7
    i32.add
    i32.const -8
    i32.and
    global.set $heap
    local.get $p)
  (func (export "proxy_on_memory_allocate") (param i32) (result i32)
    local.get 0
    call $malloc)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
  (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    i32.const 2
    i32.const 16
    i32.const 14
    i32.const 48
    i32.const LEN
    call $add_header
    drop
    i32.const 0)
)
"""


def tagged_plugin(tag: str) -> bytes:
    """A module whose responses carry ``x-agent-plugin: <tag>`` (tag: up to 32 ASCII characters)."""
    assert tag.isascii() and 0 < len(tag) <= 32
    source = TAGGED_PLUGIN_WAT.replace('"TAG"', f'"{tag}"').replace("LEN", str(len(tag)))
    return bytes(wasmtime.wat2wasm(source))


class ModuleServer:
    """Serves ``modules[path]`` over plain HTTP on 127.0.0.1; anything else is 404. Counts requests."""

    def __init__(self) -> None:
        self.modules: dict[str, bytes] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                owner.requests.append(self.path)
                body = owner.modules.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/wasm")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence access logs
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, path: str, module: bytes) -> tuple[str, str]:
        """Serve ``module`` at ``path``; returns (url, sha256)."""
        self.modules[path] = module
        return f"http://127.0.0.1:{self.port}{path}", hashlib.sha256(module).hexdigest()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
