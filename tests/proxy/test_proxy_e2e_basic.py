"""End-to-end proxying over real sockets with an empty plugin chain."""

from __future__ import annotations

import http.client
import json
import socket
import time

from proxy_testsupport import (
    EchoServer,
    LoopThread,
    StartProxy,
    closed_port,
    pattern,
    raw_exchange,
    request,
    simple_config,
)


def _port(proxy: object) -> int:
    return proxy.listener_address()[1]  # type: ignore[attr-defined,no-any-return]


def test_get_forwards_and_sets_forwarding_headers(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    status, headers, body = request(_port(proxy), path="/hello?x=1", headers={"Host": "example.com"})
    assert status == 200
    info = json.loads(body)
    assert info["path"] == "/hello?x=1"
    sent = dict(info["headers"])
    assert sent["host"] == "example.com"
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert len(sent["x-request-id"]) == 36
    assert headers["x-upstream-name"] == "echo-a"


def test_existing_request_id_and_xff_are_kept_and_appended(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    _, _, body = request(_port(proxy), headers={"x-request-id": "abc", "x-forwarded-for": "10.0.0.1"})
    sent = dict(json.loads(body)["headers"])
    assert sent["x-request-id"] == "abc"
    assert sent["x-forwarded-for"] == "10.0.0.1,127.0.0.1"


def test_keep_alive_reuses_upstream_connection(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    conn = http.client.HTTPConnection("127.0.0.1", _port(proxy), timeout=5)
    upstream_conns = set()
    for _ in range(20):
        status, headers, _ = request(0, conn=conn)
        assert status == 200
        upstream_conns.add(headers["x-upstream-conn"])
    conn.close()
    assert len(upstream_conns) == 1


def test_post_body_with_content_length_and_chunked(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    data = pattern(300_000)
    status, _, body = request(_port(proxy), "POST", "/upload", body=data)
    assert status == 200
    info = json.loads(body)
    assert info["body_len"] == len(data)
    # Chunked upload: http.client sends an iterable body with transfer-encoding: chunked.
    chunks = [data[i : i + 10_000] for i in range(0, len(data), 10_000)]
    status, _, body = request(_port(proxy), "POST", "/upload", body=iter(chunks))  # type: ignore[arg-type]
    info = json.loads(body)
    assert info["body_len"] == len(data)
    assert dict(info["headers"]).get("transfer-encoding") == "chunked"


def test_large_streaming_bodies_both_ways(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    n = 20 * 1024 * 1024
    status, _, body = request(_port(proxy), path=f"/big?n={n}")
    assert status == 200 and body == pattern(n)
    status, headers, body = request(_port(proxy), path="/chunked?n=1000000&parts=37")
    assert status == 200 and body == pattern(1_000_000)
    assert headers.get("transfer-encoding") == "chunked"
    big = pattern(8 * 1024 * 1024)
    status, _, body = request(_port(proxy), "PUT", "/upload", body=big)
    import hashlib

    assert json.loads(body)["body_sha256"] == hashlib.sha256(big).hexdigest()


def test_head_and_no_body_statuses(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    conn = http.client.HTTPConnection("127.0.0.1", _port(proxy), timeout=5)
    status, _, body = request(0, "HEAD", "/", conn=conn)
    assert status == 200 and body == b""
    status, _, body = request(0, "GET", "/status/204", conn=conn)
    assert status == 204 and body == b""
    status, _, body = request(0, "GET", "/", conn=conn)  # connection still usable after both
    assert status == 200 and json.loads(body)["method"] == "GET"
    conn.close()


def test_upstream_refused_is_503(start_proxy: StartProxy) -> None:
    proxy = start_proxy(simple_config(closed_port()))
    status, _, body = request(_port(proxy))
    assert status == 503
    assert b"upstream connect error" in body


def test_upstream_request_timeout_is_504(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port, timeout="200ms"))
    status, _, body = request(_port(proxy), path="/hang")
    assert status == 504
    assert body == b"upstream request timeout"
    status, _, _ = request(_port(proxy), path="/delay?ms=10")
    assert status == 200


def test_connect_timeout_is_503(start_proxy: StartProxy) -> None:
    # A listening socket with a full backlog that never accepts: connects hang until the timeout.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(0)
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(blocker.getsockname())
            fillers.append(s)
        raw = simple_config(blocker.getsockname()[1])
        raw["clusters"][0]["connect_timeout"] = "300ms"
        proxy = start_proxy(raw)
        started = time.monotonic()
        status, _, body = request(_port(proxy))
        assert status == 503
        assert time.monotonic() - started < 5
    finally:
        for s in fillers:
            s.close()
        blocker.close()


def test_malformed_request_gets_400_and_worker_survives(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    out = raw_exchange(_port(proxy), b"GARBAGE / HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    assert b"connection: close" in out
    out = raw_exchange(_port(proxy), b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: zz\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    out = raw_exchange(_port(proxy), b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    status, _, _ = request(_port(proxy))
    assert status == 200


def test_pipelined_requests_answered_in_order(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    payload = (
        b"".join(b"GET /delay?ms=%d&i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (50 - i * 10, i) for i in range(4))
        + b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    out = raw_exchange(_port(proxy), payload)
    positions = [out.find(b"i=%d" % i) for i in range(4)]
    assert all(p > 0 for p in positions) and positions == sorted(positions)
    assert out.count(b"HTTP/1.1 200") == 5


def test_http10_client(start_proxy: StartProxy, echo: EchoServer) -> None:
    """With accept_http_10 (off by default, as in Envoy: 426) an HTTP/1.0 client is served."""
    config = simple_config(echo.port)
    config["listeners"][0]["accept_http_10"] = True
    proxy = start_proxy(config)
    out = raw_exchange(_port(proxy), b"GET /chunked?n=1000 HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding" not in out.lower()
    assert out.endswith(pattern(1000))


def test_expect_continue(start_proxy: StartProxy, echo: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo.port))
    with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=5) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        first = s.recv(1000)
        assert first.startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"hello")
        rest = b""
        while b"body_len" not in rest:
            rest += s.recv(65536)
    assert b'"body_len": 5' in rest


def test_client_gone_mid_body_frees_upstream(
    start_proxy: StartProxy, echo: EchoServer, loop_thread: LoopThread
) -> None:
    proxy = start_proxy(simple_config(echo.port))
    with socket.create_connection(("127.0.0.1", _port(proxy)), timeout=5) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and loop_thread.call(proxy.in_flight):
        time.sleep(0.02)
    assert loop_thread.call(proxy.in_flight) == 0
    assert request(_port(proxy))[0] == 200


def test_routes_rewrites_direct_response_and_round_robin(
    start_proxy: StartProxy, echo: EchoServer, echo_b: EchoServer
) -> None:
    raw = {
        "listeners": [
            {
                "name": "main",
                "port": 0,
                "virtual_hosts": [
                    {
                        "name": "api",
                        "domains": ["api.example.com"],
                        "routes": [
                            {"match": {"prefix": "/v1/"}, "cluster": "a", "prefix_rewrite": "/internal/",
                             "host_rewrite": "backend.internal"},
                            {"match": {"exact": "/health"}, "direct_response": {"status": 200, "body": "ok"}},
                        ],
                    },
                    {"name": "rr", "domains": ["rr.example.com"], "routes": [{"match": {"prefix": "/"},
                                                                            "cluster": "both"}]},
                ],
            }
        ],
        "clusters": [
            {"name": "a", "endpoints": [f"127.0.0.1:{echo.port}"]},
            {"name": "both", "endpoints": [f"127.0.0.1:{echo.port}", f"127.0.0.1:{echo_b.port}"]},
        ],
    }  # fmt: skip
    proxy = start_proxy(raw)
    port = _port(proxy)
    status, _, body = request(port, path="/v1/items?x=1", headers={"Host": "api.example.com"})
    info = json.loads(body)
    assert status == 200 and info["path"] == "/internal/items?x=1"
    assert dict(info["headers"])["host"] == "backend.internal"
    assert request(port, path="/health", headers={"Host": "api.example.com"})[2] == b"ok"
    assert request(port, path="/nothing", headers={"Host": "api.example.com"})[0] == 404
    assert request(port, path="/", headers={"Host": "unknown.example.com"})[0] == 404
    names = [request(port, headers={"Host": "rr.example.com"})[1]["x-upstream-name"] for _ in range(4)]
    assert names == ["echo-a", "echo-b", "echo-a", "echo-b"]
    text = proxy.render_prometheus()
    assert 'wasmesh_downstream_rq_total{listener="main",response_code_class="4xx"} 2' in text
    assert 'wasmesh_upstream_rq_total{cluster="both",response_code_class="2xx"} 4' in text


def test_stale_pooled_connection_is_retried_once(start_proxy: StartProxy, echo_b: EchoServer) -> None:
    proxy = start_proxy(simple_config(echo_b.port))
    conn = http.client.HTTPConnection("127.0.0.1", _port(proxy), timeout=5)
    assert request(0, path="/drop-next", conn=conn)[0] == 200
    # The pooled upstream connection now drops the next request: the proxy resends it on a new one.
    status, headers, _ = request(0, path="/after", conn=conn)
    conn.close()
    assert status == 200
