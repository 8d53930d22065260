"""Helpers for the proxy-over-xDS tests: a chain-marking WAT plugin, YAML builders, HTTP clients,
and `ProxyThread`, which runs an in-process `XdsProxy` on its own event loop."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import yaml

from wasmesh.proxy.xds import XdsProxy

# Adds its whole configuration as a request header `x-chain` (so the upstream sees the chain order);
# proxy_on_configure refuses a configuration whose third byte is 'f' (e.g. {"fail": 1}).
MARK_PLUGIN_WAT = r"""
(module
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $next (mut i32) (i32.const 1024))
  (global $config (mut i32) (i32.const 0))
  (global $config_len (mut i32) (i32.const 0))
  (data (i32.const 8) "x-chain")
  (func (export "proxy_abi_version_0_2_1"))
  (func $malloc (export "malloc") (param $n i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $next))
    (global.set $next
      (i32.and (i32.add (i32.add (global.get $next) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (local.get $at))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (call $malloc (local.get $n)))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (if (i32.eqz (local.get $size)) (then (return (i32.const 1))))
    (drop (call $get_buffer (i32.const 7) (i32.const 0) (local.get $size) (i32.const 16) (i32.const 20)))
    (global.set $config (i32.load (i32.const 16)))
    (global.set $config_len (i32.load (i32.const 20)))
    (if (i32.ge_u (global.get $config_len) (i32.const 3))
      (then (if (i32.eq (i32.load8_u offset=2 (global.get $config)) (i32.const 102))
        (then (return (i32.const 0))))))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (global.get $config_len)
      (then (drop (call $add_header (i32.const 0) (i32.const 8) (i32.const 7)
                                    (global.get $config) (global.get $config_len)))))
    (i32.const 0))
)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def workload_yaml(name: str, labels: dict[str, str], port: int, upstream_port: int) -> str:
    body = {
        "apiVersion": "wasmesh.io/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {
            "listeners": [
                {
                    "name": "http",
                    "port": port,
                    "address": "127.0.0.1",
                    "virtualHosts": [{"routes": [{"match": {"prefix": "/"}, "cluster": "echo"}]}],
                }
            ],
            "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{upstream_port}"]}],
        },
    }
    return yaml.safe_dump(body, sort_keys=False)


def wasmplugin_yaml(name: str, url: str, config: dict[str, Any] | None = None, **spec: Any) -> str:
    body: dict[str, Any] = {"url": url, **spec}
    if config is not None:
        body["pluginConfig"] = config
    document = {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": "default"},
        "spec": body,
    }
    return yaml.safe_dump(document, sort_keys=False)


def api_call(api_port: int, verb: str, text: str) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}/{verb}", data=text.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def metric_value(api_port: int, series: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def get(port: int, path: str = "/") -> tuple[int, dict[str, Any]]:
    """(status, JSON body or {}) of GET through a proxy listener; (0, {}) if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, dict(json.loads(response.read() or b"{}"))
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def eventually(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def chain_of(port: int) -> list[str] | None:
    """The x-chain values the upstream saw for one request (None if the request failed)."""
    status, body = get(port)
    return [json.loads(v)["id"] for v in body.get("chain", [])] if status == 200 else None


class ProxyThread:
    """An XdsProxy on its own event loop thread (the test thread makes blocking HTTP calls)."""

    def __init__(self, xds_port: int, node_id: str, labels: dict[str, str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"proxy-{node_id}", daemon=True)
        self.thread.start()
        self.proxy = self.call(self._create(xds_port, node_id, labels))

    async def _create(self, xds_port: int, node_id: str, labels: dict[str, str]) -> XdsProxy:
        proxy = XdsProxy(f"127.0.0.1:{xds_port}", node_id, labels, drain_timeout_s=0.5, reconnect_max=0.5)
        await proxy.start()
        return proxy

    @staticmethod
    async def _cancel_leftovers() -> None:
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    def call(self, coroutine: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.proxy.stop(0.5))
        self.call(self._cancel_leftovers())  # e.g. grpc's request-iterator task, as asyncio.run does
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
