"""The control plane's HTTP API over real sockets: every error path, health and debug routes.

Most tests talk to a real `wasmesh control-plane` process; the 500 test serves the API in-process
(a real socket) with a status source that raises, since a correct control plane has no request
that makes it fail.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cp_helpers import ControlPlaneProcess, plugin_yaml

from wasmesh.controlplane.bodies import MAX_DEPTH
from wasmesh.controlplane.httpapi import MAX_BODY, ApiHandler, serve_http
from wasmesh.controlplane.store import ConfigStore
from wasmesh.xds.metrics import XdsMetrics


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def errors(self) -> list[str]:
        return list(json.loads(self.body)["errors"])

    @property
    def json(self) -> dict[str, object]:
        return dict(json.loads(self.body))


def raw_request(port: int, data: bytes, timeout: float = 30.0) -> Reply:
    """Send `data` as is and read the whole answer (the server closes after one request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 100 "):
        head, _, body = body.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split(" ")[1]), headers, body)


def request(port: int, method: str, path: str, body: bytes = b"") -> Reply:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
    return raw_request(port, head.encode() + body)


@pytest.fixture(scope="module")
def api_port() -> Iterator[int]:
    """A real `wasmesh control-plane` process; yields its API port."""
    plane = ControlPlaneProcess()
    yield plane.api_port
    plane.stop()


def plugin(name: str) -> bytes:
    return plugin_yaml(name, "file:///plugins/x.wasm").encode()


def stored_names(port: int) -> list[str]:
    reply = request(port, "GET", "/resources/WasmPlugin")
    assert reply.status == 200
    return [str(item["metadata"]["name"]) for item in json.loads(reply.body)["items"]]


def test_health_ready_and_debug_routes(api_port: int) -> None:
    healthz = request(api_port, "GET", "/healthz")
    assert (healthz.status, healthz.body) == (200, b"ok\n")
    readyz = request(api_port, "GET", "/readyz")
    assert (readyz.status, readyz.body) == (200, b"ok\n")
    connections = request(api_port, "GET", "/debug/connections")
    assert connections.status == 200
    assert connections.json == {"connections": []}
    metrics = request(api_port, "GET", "/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4"
    assert b"# TYPE pilot_xds gauge" in metrics.body


def test_unknown_route_is_404_and_wrong_method_is_405(api_port: int) -> None:
    unknown = request(api_port, "GET", "/nope")
    assert unknown.status == 404
    assert unknown.errors == ["no route for GET /nope"]
    wrong = request(api_port, "GET", "/apply")
    assert wrong.status == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.errors == ["GET is not allowed on /apply (allowed: POST)"]
    wrong_health = request(api_port, "POST", "/healthz", b"x")
    assert wrong_health.status == 405
    assert wrong_health.headers["allow"] == "GET"


def test_malformed_bodies_are_400_naming_the_problem(api_port: int) -> None:
    cases = {
        b"kind: WasmPlugin\nmetadata: [unclosed\n": (
            "request: line 3 column 1: YAML syntax error: expected ',' or ']', but got '<stream end>'"
            " (while parsing a flow sequence)"
        ),
        b'{"kind": "WasmPlugin", ': "request: line 1 column 24: JSON syntax error: Expecting property name"
        " enclosed in double quotes",
        b"": "request: no objects passed (the body holds no documents)",
        b"# only a comment\n---\n": "request: no objects passed (the body holds no documents)",
        b"just a string\n": "request: document 1: line 1: expected a mapping with apiVersion and kind,"
        " got str",
        b"\xff\xfe": "request: request body is not UTF-8 (byte 0)",
        b'{"kind": "List", "items": [null]}': "request: document 1: List items[0]: expected an object"
        " with apiVersion and kind, got null",
        b'{"kind": "List", "items": 5}': "request: document 1: List items: expected a list, got int",
        b"kind: List\nitems: [7]\n": "request: document 1: List items[0]: expected an object with"
        " apiVersion and kind, got int",
    }
    for body, message in cases.items():
        for path in ("/apply", "/delete"):
            reply = request(api_port, "POST", path, body)
            assert (reply.status, reply.errors) == (400, [message]), body
    assert stored_names(api_port) == []


def test_deeply_nested_documents_are_400(api_port: int) -> None:
    depth = MAX_DEPTH + 1
    deep_json = b'{"kind": "WasmPlugin", "spec": ' + b"[" * depth + b"]" * depth + b"}"
    reply = request(api_port, "POST", "/apply", deep_json)
    assert (reply.status, reply.errors) == (400, [f"request: nested deeper than {MAX_DEPTH} levels"])
    # Deeper than Python's recursion limit: refused the same way, not a 500.
    very_deep = b"[" * 100_000 + b"]" * 100_000
    reply = request(api_port, "POST", "/apply", very_deep)
    assert (reply.status, reply.errors) == (400, [f"request: nested deeper than {MAX_DEPTH} levels"])
    deep_yaml = b"kind: WasmPlugin\nspec: " + b"[" * 5000 + b"]" * 5000 + b"\n"
    reply = request(api_port, "POST", "/apply", deep_yaml)
    assert (reply.status, reply.errors) == (400, [f"request: nested deeper than {MAX_DEPTH} levels"])
    nested_101 = "kind: WasmPlugin\nspec:\n" + "".join(f"{'  ' * (level + 1)}k:\n" for level in range(depth))
    reply = request(api_port, "POST", "/apply", nested_101.encode())
    assert (reply.status, reply.errors) == (
        400,
        [f"request: document 1: line 1: nested deeper than {MAX_DEPTH} levels"],
    )


def alias_bomb(levels: int = 9, fanout: int = 9) -> bytes:
    lines = ["apiVersion: extensions.istio.io/v1alpha1", "kind: WasmPlugin", "metadata: {name: bomb}"]
    lines.append("spec:")
    lines.append(f"  a0: &a0 [{', '.join(['lol'] * fanout)}]")
    for level in range(1, levels):
        lines.append(f"  a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * fanout)}]")
    return ("\n".join(lines) + "\n").encode()


def test_yaml_alias_bomb_is_refused_quickly_and_healthz_stays_up(api_port: int) -> None:
    answers: list[int] = []
    stop = threading.Event()

    def poll_health() -> None:
        while not stop.is_set():
            answers.append(request(api_port, "GET", "/healthz", b"").status)
            time.sleep(0.05)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        # Expanding it would build 490 million nodes; the request's 30 s socket timeout would fire.
        reply = request(api_port, "POST", "/apply", alias_bomb())
    finally:
        stop.set()
        poller.join(30)
    assert reply.status == 400
    assert reply.errors == [
        "request: document 1: line 1: YAML aliases expand 38 nodes to 490329074 "
        "(document contains excessive aliasing)"
    ]
    assert set(answers) == {200}
    assert stored_names(api_port) == []
    # Anchors used as intended (a handful of reuses) are fine.
    reused = (
        b"apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: anchored}\n"
        b"spec:\n  url: file:///plugins/x.wasm\n  pluginConfig:\n    a: &shared {k: [1, 2, 3]}\n"
        b"    b: *shared\n    c: *shared\n"
    )
    applied = request(api_port, "POST", "/apply", reused)
    assert (applied.status, applied.json["errors"]) == (200, [])
    assert request(api_port, "DELETE", "/resources/wasmplugins/default/anchored").status == 200


def test_body_over_the_limit_is_413_without_reading_it(api_port: int) -> None:
    head = f"POST /apply HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
    reply = raw_request(api_port, head.encode())
    assert (reply.status, reply.errors) == (413, [f"request body larger than {MAX_BODY} bytes"])
    chunked_head = b"POST /apply HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = raw_request(api_port, chunked_head + f"{MAX_BODY + 1:x}\r\n".encode())
    assert (reply.status, reply.errors) == (413, [f"request body larger than {MAX_BODY} bytes"])


def chunked(body: bytes, size: int = 7) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"


def test_chunked_body_is_applied(api_port: int) -> None:
    head = b"POST /apply HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = raw_request(api_port, head + chunked(plugin("chunky")))
    assert reply.status == 200
    assert reply.json["results"] == [
        {
            "kind": "WasmPlugin",
            "namespace": "default",
            "name": "chunky",
            "action": "created",
            "resourceVersion": reply.json["results"][0]["resourceVersion"],  # type: ignore[index]
        }
    ]
    assert stored_names(api_port) == ["chunky"]
    delete_head = (
        b"POST /delete HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    )
    reply = raw_request(api_port, delete_head + chunked(plugin("chunky"), 100))
    assert reply.status == 200
    assert stored_names(api_port) == []


def test_bad_framing_is_refused(api_port: int) -> None:
    bad_chunk = b"POST /apply HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    reply = raw_request(api_port, bad_chunk)
    assert (reply.status, reply.errors) == (400, ["malformed chunked request body: bad chunk size line"])
    both = b"POST /apply HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = raw_request(api_port, both + chunked(b"abc"))
    assert (reply.status, reply.errors) == (400, ["both Transfer-Encoding and Content-Length are set"])
    gzip = b"POST /apply HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"
    reply = raw_request(api_port, gzip)
    assert (reply.status, reply.errors) == (501, ["Transfer-Encoding 'gzip' is not supported (only chunked)"])
    bad_length = b"POST /apply HTTP/1.1\r\nContent-Length: -5\r\n\r\n"
    reply = raw_request(api_port, bad_length)
    assert (reply.status, reply.errors) == (400, ["invalid Content-Length '-5'"])
    reply = raw_request(api_port, b"NONSENSE\r\n\r\n")
    assert (reply.status, reply.errors) == (400, ["malformed HTTP request"])
    assert stored_names(api_port) == []


def test_resource_routes_by_name(api_port: int) -> None:
    assert request(api_port, "POST", "/apply", plugin("one")).status == 200
    got = request(api_port, "GET", "/resources/wp/default/one")
    assert got.status == 200
    assert got.json["metadata"]["name"] == "one"  # type: ignore[index]
    missing = request(api_port, "GET", "/resources/wp/default/two")
    assert (missing.status, missing.errors) == (404, ['WasmPlugin "default/two" not found'])
    unknown_kind = request(api_port, "GET", "/resources/pods")
    assert (unknown_kind.status, unknown_kind.errors) == (
        400,
        ["unknown resource type 'pods' (known: wasmplugins, workloads, gateways, secrets)"],
    )
    deleted = request(api_port, "DELETE", "/resources/wp/default/one")
    assert deleted.status == 200
    assert deleted.json["results"] == [
        {"kind": "WasmPlugin", "namespace": "default", "name": "one", "action": "deleted"}
    ]
    again = request(api_port, "DELETE", "/resources/wp/default/one")
    assert (again.status, again.errors) == (404, ['WasmPlugin "default/one" not found'])


class _FailingStatus:
    def __call__(self, namespace: str | None, name: str | None) -> list[dict[str, object]]:
        raise RuntimeError("status source is broken")


def test_internal_error_is_500_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    handler = ApiHandler(ConfigStore(), XdsMetrics(), plugin_status=_FailingStatus())
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(serve_http(handler, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = int(server.sockets[0].getsockname()[1])
    try:
        reply = request(port, "GET", "/status/wasmplugins")
        assert reply.status == 500
        assert reply.errors == [
            "internal error handling GET /status/wasmplugins: RuntimeError (see the control plane log)"
        ]
        assert "RuntimeError: status source is broken" in caplog.text  # the traceback is logged
        assert request(port, "GET", "/healthz").status == 200  # and the server keeps serving
    finally:
        # The server belongs to the loop's thread: close it there (asyncio servers are not thread-safe).
        async def close() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_status_routes(api_port: int) -> None:
    prod = plugin_yaml("p", "file:///plugins/x.wasm", namespace="prod").encode()
    assert request(api_port, "POST", "/apply", plugin("d") + b"---\n" + prod).status == 200
    try:
        every = request(api_port, "GET", "/status/wasmplugins")
        assert every.status == 200
        assert [(item["namespace"], item["name"]) for item in every.json["items"]] == [  # type: ignore[attr-defined]
            ("default", "d"),
            ("prod", "p"),
        ]
        in_prod = request(api_port, "GET", "/status/wasmplugins?namespace=prod")
        assert in_prod.json == {
            "items": [
                {
                    "namespace": "prod",
                    "name": "p",
                    "resource": "extensions.istio.io/wasmplugin/prod.p",
                    "ready": 0,
                    "selected": 0,
                    "proxies": [],
                    "warnings": [],
                }
            ]
        }
        one = request(api_port, "GET", "/status/wasmplugins/default/d")
        assert (one.status, one.json["resource"]) == (200, "extensions.istio.io/wasmplugin/default.d")
        missing = request(api_port, "GET", "/status/wasmplugins/default/nope")
        assert (missing.status, missing.errors) == (404, ['WasmPlugin "default/nope" not found'])
    finally:
        assert request(api_port, "DELETE", "/resources/wp").status == 200
        assert request(api_port, "DELETE", "/resources/wp?namespace=prod").status == 200
    assert stored_names(api_port) == []
