"""A bounded, seeded fuzz run of the proxy's HTTP/1 request parser (sans-I/O, issue #15).

Requests are built from pieces that smuggling attacks use (Content-Length and Transfer-Encoding
together or repeated, odd spacing and case, bare LF, obs-fold, a request hidden in a body) and
fed whole and split at random points. For every input: the parser raises nothing but BadMessage;
a request it passes on never carries both framings nor two lengths; a Content-Length body comes
out exactly that long; and the split feed yields the same requests as the whole one (the same
bytes never frame differently with the read boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wasmesh.http.headers import HeaderMap
from wasmesh.proxy.http1 import BadMessage, RequestParser


@dataclass
class Recorded:
    heads: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    completed: int = 0

    def on_request_headers(
        self, headers: HeaderMap, end_stream: bool, keep_alive: bool, http10: bool
    ) -> None:
        self.heads.append(list(headers.pairs()))
        self.bodies.append(b"")

    def on_request_body(self, data: bytes) -> None:
        self.bodies[-1] += data

    def on_request_complete(self, had_body: bool) -> None:
        self.completed += 1


def parse(pieces: list[bytes]) -> tuple[Recorded, str | None]:
    recorded = Recorded()
    parser = RequestParser(recorded, accept_http_10=True)
    try:
        for piece in pieces:
            parser.feed(piece)
    except BadMessage as exc:
        return recorded, f"{exc.status}"
    return recorded, None


FRAMING_HEADERS = [
    b"Content-Length: 5", b"content-length: 0", b"Content-Length: 5, 5", b"content-length: +5",
    b"Content-Length:  5 ", b"content-length: 5\r\ncontent-length: 6", b"Transfer-Encoding: chunked",
    b"transfer-encoding: CHUNKED", b"Transfer-Encoding: chunked, identity", b"Transfer-Encoding:\tchunked",
    b"Transfer-Encoding : chunked", b"transfer-encoding: xchunked", b" transfer-encoding: chunked",
    b"x-folded: a\r\n chunked", b"Connection: x-gone", b"x-gone: 1", b"Host: other", b"host: a b",
]  # fmt: skip
BODIES = [
    b"", b"hello", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: example.com\r\n\r\n", b"zz\r\n",
    b"5;ext=1\r\nhello\r\n0\r\n\r\n",
]  # fmt: skip
request_lines = st.sampled_from(
    [b"GET / HTTP/1.1", b"POST /p HTTP/1.1", b"POST /p HTTP/1.0", b"GET  / HTTP/1.1", b"get / HTTP/1.1",
     b"POST http://a.example/x HTTP/1.1", b"GET / HTTP/1.1 ", b"GET /\x00 HTTP/1.1"]
)  # fmt: skip
line_ends = st.sampled_from([b"\r\n", b"\r\n", b"\n"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    end = draw(line_ends)
    lines = [draw(request_lines), b"host: example.com"]
    lines += draw(st.lists(st.sampled_from(FRAMING_HEADERS), max_size=4))
    lines += draw(st.lists(st.binary(max_size=12).map(lambda b: b"x-f: " + b), max_size=2))
    return end.join(lines) + end + end + draw(st.sampled_from(BODIES))


SPLITS = st.lists(st.integers(min_value=0, max_value=400), max_size=6)


# derandomize: the same 400 examples every run (a fixed seed), no example database.
@settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(first=requests(), second=requests(), splits=SPLITS)
def test_request_parser_never_frames_ambiguously(first: bytes, second: bytes, splits: list[int]) -> None:
    data = first + second
    whole, whole_error = parse([data])
    cuts = sorted({min(s, len(data)) for s in splits})
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    split, split_error = parse(pieces)
    assert (split.heads, split.bodies, split.completed, split_error) == (
        whole.heads, whole.bodies, whole.completed, whole_error,
    )  # fmt: skip
    for head, body in zip(whole.heads, whole.bodies, strict=True):
        names = [name for name, _ in head]
        assert names.count(b"content-length") <= 1 and names.count(b"transfer-encoding") <= 1
        assert not (b"content-length" in names and b"transfer-encoding" in names)
        lengths = [value for name, value in head if name == b"content-length"]
        if lengths and whole.completed >= len(whole.heads):
            assert len(body) == int(lengths[0])
        if (b"connection", b"x-gone") in head:
            assert b"x-gone" not in names  # nominated in Connection: hop-by-hop
