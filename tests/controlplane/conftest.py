"""Shared fixtures for control-plane tests (helpers live in cp_helpers.py)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from cp_helpers import CHAIN_PLUGIN_WAT


@pytest.fixture(autouse=True)
def client_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own (empty) CLI client config, never the user's ~/.wasmesh/config."""
    path = tmp_path_factory.mktemp("client") / "config"
    monkeypatch.setenv("WASMESH_CONFIG", str(path))
    return path


@pytest.fixture(scope="session")
def chain_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plugins") / "chain.wasm"
    path.write_bytes(wasmtime.wat2wasm(CHAIN_PLUGIN_WAT))
    return path


@pytest.fixture(scope="session")
def not_wasm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plugins") / "broken.wasm"
    path.write_bytes(b"this is not a wasm module\n")
    return path


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers 200 with the request's x-chain header values, in order, as JSON."""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        body = json.dumps({"chain": self.headers.get_all("x-chain") or [], "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence access logs
        return


@pytest.fixture(scope="session")
def echo_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
