"""The HTTP/1.1 parsers keep a chunked body's trailers for the message they end, and only for it."""

from __future__ import annotations

from typing import Any

from wasmesh.http.headers import HeaderMap
from wasmesh.proxy.http1 import RequestParser, ResponseParser


class _Recorder:
    """Records parser events; at each message end also the parser's trailers for that message."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.parser: RequestParser | ResponseParser | None = None

    def _trailers(self) -> list[tuple[bytes, bytes]] | None:
        assert self.parser is not None
        trailers = self.parser.trailers
        return None if trailers is None else list(trailers)

    def on_request_headers(
        self, headers: HeaderMap, end_stream: bool, keep_alive: bool, http10: bool
    ) -> None:
        self.events.append(("headers", [k for k, _ in headers if not k.startswith(b":")]))

    def on_request_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def on_request_complete(self, had_body: bool) -> None:
        self.events.append(("complete", self._trailers()))

    def on_response_headers(self, headers: HeaderMap, end_stream: bool, keep_alive: bool) -> None:
        self.events.append(("headers", [k for k, _ in headers if not k.startswith(b":")]))

    def on_response_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def on_response_complete(self) -> None:
        self.events.append(("complete", self._trailers()))


def test_request_trailers_belong_to_their_request_only() -> None:
    recorder = _Recorder()
    parser = RequestParser(recorder)
    recorder.parser = parser
    wire = (
        b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other: Two\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nde"
        b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nfg\r\n0\r\n\r\n"
    )
    for i in range(0, len(wire), 5):  # trailers split across reads, too
        parser.feed(wire[i : i + 5])
    completes = [payload for kind, payload in recorder.events if kind == "complete"]
    assert completes == [[(b"x-sum", b"1"), (b"x-other", b"Two")], None, None]
    headers = [payload for kind, payload in recorder.events if kind == "headers"]
    assert headers == [
        [b"transfer-encoding"],
        [b"content-length"],
        [b"transfer-encoding"],
    ]  # trailers not mixed in


def test_response_trailers_reset_between_responses_on_one_connection() -> None:
    recorder = _Recorder()
    parser = ResponseParser(recorder)
    recorder.parser = parser
    parser.feed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nGrpc-Status: 0\r\n\r\n"
    )
    assert parser.next_response() is True
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert recorder.events == [
        ("headers", [b"transfer-encoding"]),
        ("body", b"hi"),
        ("complete", [(b"grpc-status", b"0")]),
        ("headers", [b"content-length"]),
        ("body", b"ok"),
        ("complete", None),
    ]
