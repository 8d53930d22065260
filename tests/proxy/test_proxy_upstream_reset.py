"""Upstream connections that close or reset: `wasmesh run` next to real Envoy 1.40, one real upstream.

What Envoy (no retry policy, as EnvoyRunner configures it) does, and wasmesh with it:

* an idle pooled connection the upstream closed is noticed and dropped: the next request (also a
  POST, which nobody retries) goes on a new connection and succeeds;
* a connection closed before any response byte → 503 ``upstream connect error or disconnect/reset
  before headers. reset reason: connection termination``;
* a reset after the response started → the client gets what arrived (head, part of the body) and
  the connection closes.

One deliberate difference: when a *pooled* connection closes as the request crosses the upstream's
close (no response byte yet), wasmesh sends an idempotent request (RFC 9110 9.2.2) that went out
whole once more on a fresh connection, so the client gets the answer; Envoy answers 503 unless a
route retry policy says ``reset``. Non-idempotent requests get Envoy's 503.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from proxy_testsupport import free_port

from wasmesh.testing.envoy import EnvoyResponse, EnvoyRunner, _read_response
from wasmesh.testing.upstream import RecordedRequest, RecordingUpstream, Reply

pytestmark = pytest.mark.envoy

UPSTREAM_IDLE_TIMEOUT_S = 2.0
RESET_BEFORE_HEADERS = (
    b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
)
FULL_BODY = b"0123456789" * 10


class Upstream:
    """Answers by path. `/stale...`: only the first request of a connection is answered; a later
    one finds the connection closed (the upstream timed it out just as the request arrived)."""

    def __init__(self) -> None:
        self._per_connection: Counter[int] = Counter()
        self._lock = threading.Lock()

    def reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self._per_connection[request.connection] += 1
            nth_on_connection = self._per_connection[request.connection]
        if request.path == "/close-on-request":
            return Reply(disconnect="before_response")
        if request.path == "/mid-body":
            return Reply(body=FULL_BODY, disconnect="mid_body")
        if request.path.startswith("/stale") and nth_on_connection > 1:
            return Reply(disconnect="before_response")
        return Reply(body=b"answered on request %d of its connection" % nth_on_connection)


@dataclass
class Proxies:
    upstream: RecordingUpstream
    envoy: int
    wasmesh: int


@pytest.fixture(scope="module")
def proxies() -> Iterator[Proxies]:
    with RecordingUpstream(Upstream().reply, idle_timeout_s=UPSTREAM_IDLE_TIMEOUT_S) as upstream:
        envoy = EnvoyRunner([], upstream_port=upstream.port)
        port, admin = free_port(), free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "wasmesh", "run", "--listen", f"127.0.0.1:{port}",
             "--upstream", f"http://127.0.0.1:{upstream.port}", "--admin", f"127.0.0.1:{admin}",
             "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ),
        )  # fmt: skip
        try:
            envoy.start()
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, (
                    f"wasmesh run exited: {process.stderr.read() if process.stderr else ''}"
                )
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "wasmesh run not ready"
                time.sleep(0.2)
            yield Proxies(upstream, envoy.listener_port, port)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            envoy.stop()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]  # framing and content type, sorted
    body: bytes
    closed_after: bool  # the proxy closed the client connection after this response


def _send(port: int, method: str, path: str, body: bytes = b"") -> Answer:
    framing = f"content-length: {len(body)}\r\n" if method in ("POST", "PUT", "PATCH") else ""
    head = f"{method} {path} HTTP/1.1\r\nhost: example.com\r\n{framing}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head + body)
        stream = sock.makefile("rb")
        response: EnvoyResponse = _read_response(stream, method)
        sock.settimeout(1)
        try:
            closed = stream.read(1) == b""
        except TimeoutError:
            closed = False
    kept = ("content-length", "content-type", "transfer-encoding")
    return Answer(
        response.status,
        tuple(sorted((k, v) for k, v in response.headers if k in kept)),
        response.body,
        closed,
    )


def _both(proxies: Proxies, fn: object) -> dict[str, tuple[Answer, list[tuple[str, int]]]]:
    """Run a scenario against each proxy; return its last answer and what the upstream received."""
    results = {}
    for name, port in (("envoy", proxies.envoy), ("wasmesh", proxies.wasmesh)):
        proxies.upstream.clear()
        answer = fn(port)  # type: ignore[operator]
        connections = sorted({r.connection for r in proxies.upstream.requests})
        results[name] = (
            answer,
            [(r.path, connections.index(r.connection)) for r in proxies.upstream.requests],
        )
    return results


def test_connection_closed_before_any_response_byte_is_a_503_like_envoys(proxies: Proxies) -> None:
    results = _both(proxies, lambda port: _send(port, "GET", "/close-on-request"))
    expected = Answer(
        503,
        (("content-length", str(len(RESET_BEFORE_HEADERS))), ("content-type", "text/plain")),
        RESET_BEFORE_HEADERS,
        closed_after=False,
    )
    assert results["wasmesh"] == results["envoy"] == (expected, [("/close-on-request", 0)])


def test_reset_in_the_middle_of_the_body_truncates_and_closes_like_envoy(proxies: Proxies) -> None:
    results = _both(proxies, lambda port: _send(port, "GET", "/mid-body"))
    framing = (("content-length", "100"), ("content-type", "text/plain"))
    expected = Answer(200, framing, FULL_BODY[:50], closed_after=True)
    assert results["wasmesh"] == results["envoy"] == (expected, [("/mid-body", 0)])


def test_idle_connection_the_upstream_closed_is_not_reused(proxies: Proxies) -> None:
    def scenario(port: int) -> Answer:
        assert _send(port, "GET", "/warm").status == 200
        time.sleep(UPSTREAM_IDLE_TIMEOUT_S + 1.5)  # the upstream closes the pooled connection meanwhile
        return _send(port, "POST", "/after-idle", b"not retried if it failed")

    results = _both(proxies, scenario)
    body = b"answered on request 1 of its connection"
    expected = Answer(200, (("content-length", str(len(body))), ("content-type", "text/plain")), body, False)
    assert results["wasmesh"] == results["envoy"] == (expected, [("/warm", 0), ("/after-idle", 1)])


def _stale(method: str, body: bytes = b"") -> object:
    def scenario(port: int) -> Answer:
        assert _send(port, "GET", "/stale-warm").status == 200  # leaves one pooled connection
        return _send(port, method, "/stale-next", body)

    return scenario


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_idempotent_request_on_a_connection_closing_under_it_is_sent_again(
    proxies: Proxies, method: str
) -> None:
    results = _both(proxies, _stale(method))
    answered = b"answered on request 1 of its connection"
    assert results["wasmesh"] == (
        Answer(
            200, (("content-length", str(len(answered))), ("content-type", "text/plain")), answered, False
        ),
        [("/stale-warm", 0), ("/stale-next", 0), ("/stale-next", 1)],
    )
    # Envoy without a retry policy: the reset reaches the client.
    assert results["envoy"] == (
        Answer(
            503,
            (("content-length", str(len(RESET_BEFORE_HEADERS))), ("content-type", "text/plain")),
            RESET_BEFORE_HEADERS,
            False,
        ),
        [("/stale-warm", 0), ("/stale-next", 0)],
    )


@pytest.mark.parametrize(("method", "body"), [("POST", b""), ("POST", b"payload"), ("PATCH", b"x")])
def test_non_idempotent_request_is_not_sent_again_503_like_envoy(
    proxies: Proxies, method: str, body: bytes
) -> None:
    results = _both(proxies, _stale(method, body))
    expected = Answer(
        503,
        (("content-length", str(len(RESET_BEFORE_HEADERS))), ("content-type", "text/plain")),
        RESET_BEFORE_HEADERS,
        False,
    )
    assert results["wasmesh"] == results["envoy"] == (expected, [("/stale-warm", 0), ("/stale-next", 0)])
