"""Units behind the proxy's per-request savings: one response parser per upstream connection,
and batched randomness for x-request-id."""

from __future__ import annotations

import os
import uuid
from typing import Any

from wasmesh.http.headers import HeaderMap
from wasmesh.proxy.exchange import RequestIdGenerator, request_ids
from wasmesh.proxy.http1 import ResponseParser


class _Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_response_headers(self, headers: HeaderMap, end_stream: bool, keep_alive: bool) -> None:
        self.events.append(("headers", (headers.get(b":status"), end_stream, keep_alive)))

    def on_response_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def on_response_complete(self) -> None:
        self.events.append(("complete", None))


def test_one_parser_serves_consecutive_responses_including_after_head() -> None:
    events = _Events()
    parser = ResponseParser(events)
    parser.expect_no_body()  # a HEAD request: its content-length announces no body bytes
    parser.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
    assert parser.next_response() is True
    parser.feed(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhel")
    parser.feed(b"lo")
    assert parser.next_response() is True
    parser.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert events.events == [
        ("headers", (b"200", True, True)),
        ("complete", None),
        ("headers", (b"201", False, True)),
        ("body", b"hel"),
        ("body", b"lo"),
        ("complete", None),
        ("headers", (b"204", True, True)),
        ("complete", None),
    ]


def test_unsolicited_bytes_after_a_response_make_the_connection_unusable() -> None:
    events = _Events()
    parser = ResponseParser(events)
    parser.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert ("complete", None) in events.events
    assert parser.next_response() is False


def test_interim_response_does_not_end_the_message() -> None:
    events = _Events()
    parser = ResponseParser(events)
    parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert parser.next_response() is False  # the real response is still to come
    parser.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert parser.next_response() is True


def test_request_ids_are_distinct_version_4_uuids() -> None:
    generator = RequestIdGenerator()
    ids = [generator.new_id() for _ in range(1000)]  # several refills of the random buffer
    assert len(set(ids)) == len(ids)
    for raw in ids:
        parsed = uuid.UUID(raw.decode())
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed).encode() == raw  # canonical lower-case text form


def test_request_ids_after_fork_do_not_repeat_the_parents() -> None:
    """Workers may be forked: the proxy's generator forgets its buffered randomness in the child."""
    request_ids.new_id()  # the buffer is now filled
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.close(read_end)
        os.write(write_end, request_ids.new_id())
        os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 64)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert len(child_id) == 36 and child_id != request_ids.new_id()
