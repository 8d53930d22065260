"""A recording HTTP/1.1 upstream for tests that go over real sockets (Envoy, the wasmesh proxy).

It listens on 127.0.0.1 (a free port by default), records every request it gets
and answers with a configurable ``Reply`` (or a function of the request).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal

__all__ = ["RecordedRequest", "Reply", "RecordingUpstream"]


@dataclass
class RecordedRequest:
    """A request as the upstream received it (header names lower-cased, in arrival order)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)
    connection: int = 0  # which TCP connection carried it: 1 for the upstream's first, and so on

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("content-type", "text/plain")])
    body: bytes = b"upstream-body"
    trailers: list[tuple[str, str]] = field(default_factory=list)  # non-empty: sent chunked
    # "before_response": close the connection without answering (what a server closing an idle
    # keep-alive connection does to a request that crossed the close); "mid_body": send the head and
    # the first half of the body, then close.
    disconnect: Literal["", "before_response", "mid_body"] = ""


ReplyFactory = Callable[[RecordedRequest], Reply]


class RecordingUpstream:
    """``with RecordingUpstream() as up: ... up.port, up.requests, up.reply = Reply(...)``.

    ``idle_timeout_s`` > 0 closes a keep-alive connection that stays idle that long (as web servers do).
    """

    def __init__(
        self, reply: Reply | ReplyFactory | None = None, port: int = 0, idle_timeout_s: float = 0.0
    ) -> None:
        self.reply: Reply | ReplyFactory = reply if reply is not None else Reply()
        self.requests: list[RecordedRequest] = []
        self.idle_timeout_s = idle_timeout_s
        self._connections = itertools.count(1)
        self._lock = threading.Lock()
        self._requested_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("RecordingUpstream is not started")
        return int(self._server.server_address[1])

    @property
    def last_request(self) -> RecordedRequest | None:
        with self._lock:
            return self.requests[-1] if self.requests else None

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _answer_for(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
        reply = self.reply
        return reply(request) if callable(reply) else reply

    def start(self) -> RecordingUpstream:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = self.idle_timeout_s or None  # an idle connection's read times out: it is closed
            connection_number = 0

            def setup(self) -> None:
                super().setup()
                with upstream._lock:
                    self.connection_number = next(upstream._connections)

            def _handle(self) -> None:
                trailers: list[tuple[str, str]] = []
                if (self.headers.get("transfer-encoding") or "").lower() == "chunked":
                    body = self._read_chunked(trailers)
                else:
                    length = int(self.headers.get("content-length") or 0)
                    body = self.rfile.read(length) if length else b""
                headers = [(k.lower(), v) for k, v in self.headers.items()]
                request = RecordedRequest(
                    self.command, self.path, headers, body, trailers, self.connection_number
                )
                reply = upstream._answer_for(request)
                if reply.disconnect == "before_response":
                    self.close_connection = True
                    return
                self.send_response_only(reply.status)
                for key, value in reply.headers:
                    if key.lower() not in ("content-length", "transfer-encoding"):
                        self.send_header(key, value)
                if reply.trailers:
                    self.send_header("transfer-encoding", "chunked")
                else:
                    self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if reply.disconnect == "mid_body":
                    self.wfile.write(reply.body[: len(reply.body) // 2])
                    self.close_connection = True
                    return
                if reply.trailers:
                    if reply.body:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(reply.body), reply.body))
                    tail = "".join(f"{k}: {v}\r\n" for k, v in reply.trailers)
                    self.wfile.write(b"0\r\n" + tail.encode() + b"\r\n")
                else:
                    self.wfile.write(reply.body)

            def _read_chunked(self, trailers: list[tuple[str, str]]) -> bytes:
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                            name, _, value = line.decode("latin-1").partition(":")
                            trailers.append((name.strip().lower(), value.strip()))
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

            def log_message(self, format: str, *args: object) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", self._requested_port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="recording-upstream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> RecordingUpstream:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
