"""Test support for the proxy: an echo upstream and a proxy running on its own loop thread.

Both are real servers on 127.0.0.1 with free ports; tests talk to them with blocking
sockets / http.client, exactly as a client would.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import httptools
import uvloop

if TYPE_CHECKING:
    from wasmesh.proxy.server import ProxyServer

T = TypeVar("T")


class LoopThread:
    """An event loop (uvloop) running in a daemon thread; ``run(coro)`` executes there."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class _EchoProtocol(asyncio.Protocol):
    """Answers each request with JSON describing it; special paths:

    /status/N      respond with status N
    /delay?ms=N    wait N ms before answering
    /chunked?n=B&parts=P   chunked response of B bytes in P parts
    /big?n=B       content-length response of B bytes
    /close         answer with connection: close
    /hang          never answer
    /drop-next     answer, then close this connection when its next request arrives (no answer):
                   what a server that timed out an idle keep-alive connection looks like
    Every response carries x-upstream-name and x-upstream-conn (connection number).
    """

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.conn_no = 0
        self.headers: list[tuple[str, str]] = []
        self.url = b""
        self.body_hash = hashlib.sha256()
        self.body_len = 0
        self.drop_next = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = transport
        self.server.connections += 1
        self.conn_no = self.server.connections

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.headers = []
        self.url = b""
        self.body_hash = hashlib.sha256()
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode().lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body_hash.update(body)
        self.body_len += len(body)

    def on_message_complete(self) -> None:
        self.server.requests += 1
        method = self.parser.get_method().decode()
        url = self.url.decode()
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        info = {
            "method": method,
            "path": url,
            "headers": self.headers,
            "body_len": self.body_len,
            "body_sha256": self.body_hash.hexdigest(),
            "server": self.server.name,
        }
        keep_alive = self.parser.should_keep_alive()
        path = parts.path
        if self.drop_next:
            if self.transport is not None:
                self.transport.close()
            return
        if path == "/drop-next":
            self.drop_next = True
        if path == "/hang":
            return
        if path == "/delay":
            asyncio.get_running_loop().call_later(
                int(query.get("ms", "100")) / 1000, self._respond, 200, info, keep_alive
            )
            return
        if path.startswith("/status/"):
            self._respond(int(path.rsplit("/", 1)[1]), info, keep_alive)
            return
        if path == "/close":
            self._respond(200, info, False)
            return
        if path == "/big":
            n = int(query.get("n", "1000000"))
            self._send(200, [("content-type", "application/octet-stream")], _pattern(n), keep_alive)
            return
        if path == "/chunked":
            n = int(query.get("n", "100000"))
            count = max(1, int(query.get("parts", "10")))
            assert self.transport is not None
            self.transport.write(self._head(200, [("transfer-encoding", "chunked")], keep_alive))
            data = _pattern(n)
            step = max(1, (n + count - 1) // count)
            for i in range(0, n, step):
                piece = data[i : i + step]
                self.transport.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.transport.write(b"0\r\n\r\n")
            if not keep_alive:
                self.transport.close()
            return
        self._respond(200, info, keep_alive)

    def _head(self, status: int, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {status} X\r\n",
            f"x-upstream-name: {self.server.name}\r\n",
            f"x-upstream-conn: {self.conn_no}\r\n",
        ]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        if not keep_alive:
            lines.append("connection: close\r\n")
        return ("".join(lines) + "\r\n").encode()

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        no_body = status in (204, 304) or status < 200
        hdrs = headers if no_body else [*headers, ("content-length", str(len(body)))]
        self.transport.write(self._head(status, hdrs, keep_alive) + (b"" if no_body else body))
        if not keep_alive:
            self.transport.close()

    def _respond(self, status: int, info: dict[str, Any], keep_alive: bool) -> None:
        body = b"" if info["method"] == "HEAD" else json.dumps(info).encode()
        self._send(status, [("content-type", "application/json")], body, keep_alive)


def _pattern(n: int) -> bytes:
    unit = bytes(range(256))
    return (unit * (n // 256 + 1))[:n]


def pattern(n: int) -> bytes:
    return _pattern(n)


class EchoServer:
    def __init__(self, lt: LoopThread, name: str = "echo") -> None:
        self.lt = lt
        self.name = name
        self.connections = 0
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> EchoServer:
        async def go() -> None:
            self.server = await self.lt.loop.create_server(lambda: _EchoProtocol(self), "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]

        self.lt.run(go())
        return self

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()

        self.lt.run(go())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A port nothing listens on (connect gets ECONNREFUSED)."""
    return free_port()


def request(
    port: int,
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        merged: dict[str, str] = {}
        for k, v in r.getheaders():  # repeated headers joined with ", " (order kept)
            merged[k.lower()] = f"{merged[k.lower()]}, {v}" if k.lower() in merged else v
        return r.status, merged, data
    finally:
        if conn is None:
            c.close()


def raw_exchange(port: int, payload: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, read until the server closes (or timeout); returns everything read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except TimeoutError:
            pass
        return out


def simple_config(upstream_port: int, **route_extra: Any) -> dict[str, Any]:
    return {
        "listeners": [
            {
                "name": "main",
                "address": "127.0.0.1",
                "port": 0,
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "cluster": "backend", **route_extra}],
                    }
                ],
            }
        ],
        "clusters": [
            {"name": "backend", "endpoints": [f"127.0.0.1:{upstream_port}"], "connect_timeout": "1s"}
        ],
    }


StartProxy = Callable[..., "ProxyServer"]
