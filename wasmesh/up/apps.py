"""Sample upstream applications for `wasmesh up`: an httpbin-like app and a product page.

Deliberately small: an asyncio Protocol with httptools, so the demo needs no web framework.
"""

from __future__ import annotations

import asyncio
import json
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools

PRODUCT_PAGE = b"""<!doctype html>
<html><head><title>Simple Bookstore App</title></head>
<body><h1>The Comedy of Errors</h1>
<p>Summary: Wikipedia Summary: The Comedy of Errors is one of William Shakespeare's early plays.</p>
<p>Served by the wasmesh demo productpage app.</p></body></html>
"""

BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"

REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 418: "I'm a teapot",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _title(name: bytes) -> str:
    return "-".join(part.capitalize() for part in name.decode("latin-1").split("-"))


class SampleRequest:
    __slots__ = ("method", "url", "headers", "body")

    def __init__(self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body

    def headers_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.headers:
            key = _title(k)
            value = v.decode("latin-1")
            out[key] = f"{out[key]},{value}" if key in out else value
        return out


def handle(app: str, req: SampleRequest) -> tuple[int, list[tuple[str, str]], bytes]:
    """Route one request; pure function so it is testable without sockets."""
    parts = urlsplit(req.url)
    path = parts.path
    if app == "productpage" or path.startswith("/productpage"):
        return 200, [("content-type", "text/html; charset=utf-8")], PRODUCT_PAGE
    if path == "/headers":
        return _json({"headers": req.headers_dict()})
    if path.startswith("/status/"):
        try:
            code = int(path.rsplit("/", 1)[1])
        except ValueError:
            return _json({"error": f"invalid status code in {path}"}, 400)
        if not 100 <= code <= 599:
            return _json({"error": f"status code out of range: {code}"}, 400)
        return code, [("content-type", "text/plain")], b""
    if path.startswith("/anything") or path == "/get" or path == "/post":
        args = {k: v[0] if len(v) == 1 else v for k, v in parse_qs(parts.query).items()}
        return _json({
            "args": args,
            "data": req.body.decode("utf-8", "replace"),
            "headers": req.headers_dict(),
            "method": req.method,
            "url": req.url,
        })
    if path == "/":
        index = b"wasmesh demo app: /headers /status/N /anything /productpage\n"
        return 200, [("content-type", "text/plain")], index
    return _json({"error": f"no such page: {path}"}, 404)


def _json(body: object, status: int = 200) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("content-type", "application/json")], json.dumps(body, indent=2).encode() + b"\n"


class _SampleProtocol(asyncio.Protocol):
    def __init__(self, app: str) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(BAD_REQUEST)
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        req = SampleRequest(method, self._url.decode("latin-1"), self._headers, b"".join(self._body))
        status, headers, body = handle(self.app, req)
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
        head += [f"{k}: {v}" for k, v in headers]
        head.append(f"content-length: {len(body)}")
        head.append(f"x-served-by: {self.app}")
        keep_alive = self.parser.should_keep_alive()
        if not keep_alive:
            head.append("connection: close")
        if self.transport is not None:
            self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            if not keep_alive:
                self.transport.close()


async def serve_sample_app(app: str, host: str, port: int) -> asyncio.Server:
    """Start the named sample app ("httpbin" or "productpage") and return its server."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _SampleProtocol(app), host, port, reuse_address=True)
