"""Fixtures for the proxy-over-xDS tests: plugin modules, an echo upstream, a control plane."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from pxds_support import MARK_PLUGIN_WAT
from real_parts import require_file

from wasmesh.controlplane.server import ControlPlane, ControlPlaneOptions, ControlPlaneThread

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def mark_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pxds-plugins") / "mark.wasm"
    path.write_bytes(wasmtime.wat2wasm(MARK_PLUGIN_WAT))
    return path


@pytest.fixture(scope="session")
def tracking_plugin() -> Path:
    return require_file(REPO / "examples" / "request-tracking" / "plugin.wasm", "examples/build.sh")


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """200 with the request's x-chain values (in order) and all headers, as JSON."""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = json.dumps(
            {
                "chain": self.headers.get_all("x-chain") or [],
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return


@pytest.fixture(scope="session")
def echo_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    (tmp_path / "mesh").mkdir()
    runner = ControlPlaneThread(ControlPlaneOptions(config_dir=tmp_path / "mesh", xds_port=0, api_port=0))
    plane = runner.start()
    yield plane
    runner.stop()
