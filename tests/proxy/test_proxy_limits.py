"""Issue #15, wasmesh only: memory stays bounded under endless heads, slow clients are cut off
by the request-headers and idle timeouts, and max_connections closes the surplus at once.
(The status codes and bodies themselves are compared with Envoy in test_proxy_limits_vs_envoy.py.)"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from proxy_testsupport import EchoServer, StartProxy, simple_config

from wasmesh.proxy.config import ConfigError, parse_config

MIB = 1024 * 1024
ENDLESS = 100 * MIB  # what the peer tries to send as one header value
# Bytes a peer can push before the proxy's reading stops mattering: socket buffers on both sides.
SOCKET_SLACK = 16 * MIB


def _port(proxy: Any) -> int:
    return int(proxy.listener_address()[1])


def _push_endless(sock: socket.socket, head: bytes) -> int:
    """Send ``head`` then up to ENDLESS bytes of one header value; returns how many got out."""
    sent = 0
    piece = b"a" * 65536
    try:
        sock.sendall(head)
        while sent < ENDLESS:
            sock.sendall(piece)
            sent += len(piece)
    except OSError:  # the proxy closed: it stopped reading
        pass
    return sent


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


def test_endless_request_header_is_cut_off_at_the_limit(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=30) as sock:
        sent = _push_endless(sock, b"GET / HTTP/1.1\r\nhost: example.com\r\nx-endless: ")
        answer = _read_all(sock)
    assert sent < SOCKET_SLACK
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_endless_response_header_is_a_502_and_cut_off(start_proxy: StartProxy) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    pushed: list[int] = []

    def serve() -> None:
        conn, _ = upstream.accept()
        with conn:
            conn.settimeout(30)
            conn.recv(65536)
            pushed.append(_push_endless(conn, b"HTTP/1.1 200 OK\r\nx-endless: "))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        proxy = start_proxy(simple_config(upstream.getsockname()[1]))
        with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=30) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n\r\n")
            answer = _read_all(sock)
        server.join(30)
    finally:
        upstream.close()
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert answer.endswith(b"reset reason: protocol error")
    assert b"x-endless" not in answer
    assert len(pushed) == 1 and pushed[0] < SOCKET_SLACK


SLOW_CLIENTS = 50


def test_slow_clients_are_closed_by_the_timeouts(start_proxy: StartProxy, echo: EchoServer) -> None:
    """50 slowloris heads get a 408 after request_headers_timeout; 50 silent connections are closed
    after idle_timeout. Nothing stays open."""
    config = simple_config(echo.port)
    config["listeners"][0].update(request_headers_timeout="1s", idle_timeout="1s")
    proxy = start_proxy(config)
    port = _port(proxy)
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(SLOW_CLIENTS)]
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(SLOW_CLIENTS)]
    try:
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: example.com\r\nx-slow: ")
        time.sleep(0.5)
        for sock in slow:  # still trickling: the timeout counts from the head's first byte
            sock.sendall(b"a")
        answers = [_read_all(sock) for sock in slow]
        closed = [_read_all(sock) for sock in silent]
    finally:
        for sock in slow + silent:
            sock.close()
    expected = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 22\r\ncontent-type: text/plain\r\n"
        b"connection: close\r\n\r\nrequest header timeout"
    )
    assert answers == [expected] * SLOW_CLIENTS
    assert closed == [b""] * SLOW_CLIENTS
    assert proxy.listeners["main"].connections == set()


def test_idle_timeout_closes_a_kept_alive_connection_after_its_response(
    start_proxy: StartProxy, echo: EchoServer
) -> None:
    config = simple_config(echo.port)
    config["listeners"][0]["idle_timeout"] = "1s"
    proxy = start_proxy(config)
    with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close" not in answer  # kept alive, then closed idle


def test_max_connections_closes_the_surplus_at_once(start_proxy: StartProxy, echo: EchoServer) -> None:
    config = simple_config(echo.port)
    config["listeners"][0]["max_connections"] = 3
    proxy = start_proxy(config)
    port = _port(proxy)
    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    try:
        for sock in held:  # each is accepted and served
            sock.sendall(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            extra.sendall(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
            assert _read_all(extra) == b""
        assert proxy.listeners["main"].cx_overflow == 1
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 20
    while proxy.listeners["main"].connections and time.monotonic() < deadline:
        time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as again:  # room again
        again.sendall(b"GET / HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n\r\n")
        assert _read_all(again).startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    ("where", "key", "value", "error"),
    [
        ("listeners", "max_request_headers_kb", 0, "expected an integer 1-8192, got 0"),
        ("listeners", "max_headers_count", "many", "expected an integer 1-1000000, got 'many'"),
        ("listeners", "request_headers_timeout", "soon", "expected a duration like 5s or 250ms, got 'soon'"),
        ("listeners", "max_connections", -1, "expected an integer 0-10000000, got -1"),
        ("listeners", "accept_http_10", "yes", "expected true or false"),
        ("clusters", "max_response_headers_kb", 9000, "expected an integer 1-8192, got 9000"),
    ],
)
def test_limit_settings_are_validated(where: str, key: str, value: object, error: str) -> None:
    raw = simple_config(1)
    raw[where][0][key] = value
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, source="proxy.yaml")
    assert str(caught.value) == f"proxy.yaml: {where}[0].{key}: {error}"


def test_limit_defaults() -> None:
    config = parse_config(simple_config(1), source="proxy.yaml")
    listener, cluster = config.listeners[0], config.clusters[0]
    assert (
        listener.max_request_headers_kb, listener.max_headers_count, listener.request_headers_timeout_s,
        listener.idle_timeout_s, listener.max_connections, listener.accept_http_10,
    ) == (60, 100, 10.0, 3600.0, 0, False)  # fmt: skip
    assert (cluster.max_response_headers_kb, cluster.max_headers_count) == (80, 100)
