"""Socket-free tests: config validation, routing, HTTP/1 parsing and serialisation, metrics merging."""

from __future__ import annotations

from typing import Any

import pytest

from wasmesh.http.headers import HeaderMap
from wasmesh.proxy.admin import label_worker, merge_prometheus
from wasmesh.proxy.config import ConfigError, parse_config
from wasmesh.proxy.http1 import (
    BadMessage,
    RequestParser,
    ResponseFraming,
    ResponseParser,
    encode_request_head,
    encode_response_head,
)
from wasmesh.proxy.router import Router


def _raw(routes: list[dict[str, Any]], domains: list[str] | None = None) -> dict[str, Any]:
    return {
        "listeners": [{"name": "l", "port": 0, "virtual_hosts": [{"name": "v", "domains": domains or ["*"],
                                                                  "routes": routes}]}],
        "clusters": [{"name": "c", "endpoints": ["127.0.0.1:1"]}],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["listeners"][0].update(port="x"), "listeners[0].port"),
        (
            lambda r: r["listeners"][0]["virtual_hosts"][0]["routes"][0].update(cluster="nope"),
            "routes[0].cluster",
        ),
        (
            lambda r: r["listeners"][0]["virtual_hosts"][0]["routes"][0].update(match={"regex": "("}),
            "match.regex",
        ),
        (lambda r: r["clusters"][0].update(endpoints=["nohost"]), "clusters[0].endpoints[0]"),
        (lambda r: r["clusters"][0].update(connect_timeout="soon"), "clusters[0].connect_timeout"),
        (lambda r: r.update(bogus=1), "bogus"),
        (lambda r: r["listeners"][0]["virtual_hosts"][0].update(domains=["a.*.com"]), "domains[0]"),
    ],
)
def test_config_errors_name_the_field(mutate: Any, field: str) -> None:
    raw = _raw([{"match": {"prefix": "/"}, "cluster": "c"}])
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="p.yaml")
    message = str(info.value)
    assert message.startswith("p.yaml: ") and field in message and "\n" not in message


def _headers(authority: str, path: str, **extra: str) -> HeaderMap:
    pairs = [(b":method", b"GET"), (b":path", path.encode()), (b":authority", authority.encode())]
    pairs += [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]
    return HeaderMap(pairs)


def test_virtual_host_domain_precedence() -> None:
    raw = {
        "listeners": [{"name": "l", "port": 0, "virtual_hosts": [
            {"name": name, "domains": domains, "routes": [{"match": {"prefix": "/"}, "cluster": "c"}]}
            for name, domains in [("any", ["*"]), ("suffix", ["*.example.com"]),
                                  ("longsuffix", ["*.api.example.com"]), ("prefix", ["example.*"]),
                                  ("exact", ["www.example.com"])]
        ]}],
        "clusters": [{"name": "c", "endpoints": ["127.0.0.1:1"]}],
    }  # fmt: skip
    router = Router(parse_config(raw).listeners[0].virtual_hosts)

    def vh(authority: str) -> str:
        found = router.virtual_host(authority.encode())
        assert found is not None
        return found.name

    assert vh("www.example.com") == "exact"
    assert vh("WWW.Example.com:8080") == "exact"  # case-insensitive; port stripped when nothing matches
    assert vh("a.api.example.com") == "longsuffix"
    assert vh("x.example.com") == "suffix"
    assert vh("example.org") == "prefix"
    assert vh("other") == "any"


def test_route_matching_kinds() -> None:
    routes = [
        {"name": "exact", "match": {"exact": "/x"}, "cluster": "c"},
        {"name": "regex", "match": {"regex": "/items/[0-9]+"}, "cluster": "c"},
        {"name": "hdr", "match": {"prefix": "/api", "headers": [{"name": "x-version", "exact": "2"}]},
         "cluster": "c"},
        {"name": "absent", "match": {"prefix": "/api", "headers": [{"name": "x-beta", "present": False}]},
         "cluster": "c"},
        {"name": "fallback", "match": {"prefix": "/"}, "cluster": "c"},
    ]  # fmt: skip
    router = Router(parse_config(_raw(routes)).listeners[0].virtual_hosts)

    def route(path: str, **h: str) -> str:
        found = router.select(_headers("h", path, **h))
        assert found is not None
        return found[1].name

    assert route("/x?q=1") == "exact"  # query ignored by exact
    assert route("/x/y") == "fallback"
    assert route("/items/42") == "regex"
    assert route("/items/4a") == "fallback"
    assert route("/api/v", x_version="2") == "hdr"
    assert route("/api/v", x_version="1") == "absent"
    assert route("/api/v", x_version="1", x_beta="yes") == "fallback"


def test_no_route_returns_none() -> None:
    raw = _raw([{"match": {"prefix": "/only"}, "cluster": "c"}], ["a.com"])
    router = Router(parse_config(raw).listeners[0].virtual_hosts)
    assert router.select(_headers("b.com", "/only")) is None
    assert router.select(_headers("a.com", "/other")) is None


class _Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_request_headers(
        self, headers: HeaderMap, end_stream: bool, keep_alive: bool, http10: bool
    ) -> None:
        self.events.append(("headers", (headers.pairs()[:], end_stream, keep_alive, http10)))

    def on_request_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def on_request_complete(self, had_body: bool) -> None:
        self.events.append(("complete", had_body))

    def on_response_headers(self, headers: HeaderMap, end_stream: bool, keep_alive: bool) -> None:
        self.events.append(("headers", (headers.pairs()[:], end_stream, keep_alive)))

    def on_response_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def on_response_complete(self) -> None:
        self.events.append(("complete", None))


def test_request_parser_pseudo_headers_and_chunked_body_in_fragments() -> None:
    ev = _Events()
    parser = RequestParser(ev)
    wire = (b"POST /p?q HTTP/1.1\r\nHost: Example.com\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
    for i in range(0, len(wire), 7):
        parser.feed(wire[i : i + 7])
    kind, (pairs, end_stream, keep_alive, http10) = ev.events[0]
    # Envoy's order of the pseudo-headers (plugins see it in proxy_get_header_map_pairs).
    assert pairs[:4] == [(b":authority", b"Example.com"), (b":path", b"/p?q"), (b":method", b"POST"),
                         (b":scheme", b"http")]  # fmt: skip
    assert (b"x-a", b"1") in pairs and not any(k == b"host" for k, _ in pairs)
    assert (end_stream, keep_alive, http10) == (False, True, False)
    assert b"".join(d for k, d in ev.events if k == "body") == b"hello"
    assert ev.events[-1] == ("complete", True)


def test_request_parser_rejects_garbage_and_double_host() -> None:
    with pytest.raises(BadMessage):
        RequestParser(_Events()).feed(b"NOT HTTP\r\n\r\n")
    with pytest.raises(BadMessage):
        RequestParser(_Events()).feed(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")


def test_response_parser_head_and_eof_body() -> None:
    ev = _Events()
    parser = ResponseParser(ev)
    parser.expect_no_body()
    parser.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
    assert [k for k, _ in ev.events] == ["headers", "complete"]
    ev2 = _Events()
    p2 = ResponseParser(ev2)
    p2.feed(b"HTTP/1.0 200 OK\r\n\r\nabc")
    assert ev2.events[0][1][2] is False  # not reusable
    assert p2.connection_closed() is True
    assert ev2.events[-1] == ("complete", None)


def test_serialisation_framing() -> None:
    req = HeaderMap([(b":method", b"GET"), (b":path", b"/a"), (b":authority", b"h"), (b":scheme", b"http"),
                     (b"connection", b"keep-alive"), (b"x", b"1")])  # fmt: skip
    assert encode_request_head(req, chunked=True) == (
        b"GET /a HTTP/1.1\r\nhost: h\r\nx: 1\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    head, framing, keep = encode_response_head(
        HeaderMap([(b":status", b"200")]), end_stream=False, keep_alive=True, http10=False, head_request=False
    )
    assert framing == ResponseFraming.CHUNKED and b"transfer-encoding: chunked" in head and keep
    head, framing, keep = encode_response_head(
        HeaderMap([(b":status", b"200")]), end_stream=False, keep_alive=True, http10=True, head_request=False
    )
    assert framing == ResponseFraming.CLOSE and not keep and head.startswith(b"HTTP/1.0 200 OK")
    head, _, _ = encode_response_head(
        HeaderMap([(b":status", b"404")]), end_stream=True, keep_alive=False, http10=False, head_request=False
    )
    assert head == b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def test_prometheus_merge_keeps_one_type_line_per_family() -> None:
    text = '# HELP m help\n# TYPE m counter\nm{a="1"} 3\nplain 1\n'
    merged = merge_prometheus([label_worker(text, "0"), label_worker(text, "1")])
    assert merged.count("# TYPE m counter") == 1
    assert 'm{worker="0",a="1"} 3' in merged and 'm{worker="1",a="1"} 3' in merged
    assert 'plain{worker="1"} 1' in merged
