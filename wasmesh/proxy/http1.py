"""HTTP/1.1 wire format, sans-I/O: httptools parsing glue and message serialisation.

Parsers turn bytes into events on a handler object and never touch a socket, so
tests can feed byte strings. Serialisers turn ``HeaderMap``s into bytes. Names go
on the wire lower-case (as Envoy's HTTP/1 codec does by default).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Protocol

import httptools

from wasmesh.http.headers import HeaderMap

# Connection-specific headers never forwarded (RFC 9110 §7.6.1; Envoy strips the same set).
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)

# Connection tokens that name no header to drop; the framing headers stay (the body depends on them).
_NOT_NOMINATABLE = frozenset({b"close", b"keep-alive", b"", b"content-length", b"transfer-encoding"})

LAST_CHUNK = b"0\r\n\r\n"
CRLF = b"\r\n"

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}
# Envoy says RFC 9110's name where Python's table still has RFC 7231's (observed with Envoy 1.40).
_REASONS[413] = b"Payload Too Large"


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def status_has_no_body(status: int) -> bool:
    return status < 200 or status in (204, 304)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class BadMessage(ValueError):
    """Malformed HTTP from a peer; the message is one line for logs and response details.

    ``bare``: Envoy's codec answers this one without a body (``bare_response``)."""

    def __init__(self, message: str, status: int = 400, *, bare: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.bare = bare


# Envoy 1.40's defaults, observed byte for byte: a request head (request line, headers and the
# blank line) of 60 KiB passes, one byte more is a 431; a response head may reach 80 KiB (the
# upstream codec's max_response_headers_kb) before the 502. Both allow 100 headers, Host included.
MAX_REQUEST_HEADERS_BYTES = 60 * 1024
MAX_RESPONSE_HEADERS_BYTES = 80 * 1024
MAX_HEADERS_COUNT = 100

# Bytes of a head the parser counts without seeing them in a callback: " HTTP/1.1\r\n" after the
# URL and the blank line ending the head (request); "HTTP/1.1 " "200" " " and the two CRLFs (response).
_REQUEST_HEAD_FRAMING = 11 + 2
_RESPONSE_HEAD_FRAMING = 9 + 3 + 1 + 2 + 2


# --------------------------------------------------------------------------- downstream (requests)


class RequestHandler(Protocol):
    """What ``RequestParser`` reports; the proxy's connection implements it."""

    def on_request_headers(
        self, headers: HeaderMap, end_stream: bool, keep_alive: bool, http10: bool
    ) -> None: ...

    def on_request_body(self, data: bytes) -> None: ...

    def on_request_complete(self, had_body: bool) -> None: ...


class RequestParser:
    """Parses a stream of HTTP/1.x requests into ``RequestHandler`` events.

    Headers come out as one ``HeaderMap`` with ``:authority`` (from Host; absent Host leaves it
    empty), ``:path``, ``:method`` and ``:scheme`` first (Envoy's order), then the rest
    with lower-case names; ``host`` itself is dropped as Envoy does.
    """

    __slots__ = (
        "_handler",
        "_parser",
        "_url",
        "_pairs",
        "_scheme",
        "_has_body",
        "_host_seen",
        "_size",
        "_error",
        "_trailer_pairs",
        "_in_head",
        "_head_began",
        "_unparsed_head",
        "max_head_bytes",
        "max_headers",
        "accept_http_10",
        "_nominated",
        "messages_begun",
        "trailers",
    )

    def __init__(
        self,
        handler: RequestHandler,
        scheme: bytes = b"http",
        max_head_bytes: int = MAX_REQUEST_HEADERS_BYTES,
        max_headers: int = MAX_HEADERS_COUNT,
        accept_http_10: bool = False,
    ) -> None:
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._pairs: list[tuple[bytes, bytes]] = []
        self._scheme = scheme
        self._has_body = False
        self._host_seen = False
        self._size = 0
        self._error: BadMessage | None = None
        self._trailer_pairs: list[tuple[bytes, bytes]] | None = None  # a list once the head is parsed
        self._nominated: bytes | None = None  # the Connection header's value, if any
        self._in_head = False  # a request began and its head is not complete yet
        self._head_began = False  # a request began during the current feed
        self._unparsed_head = 0  # bytes fed into an incomplete head (httptools buffers them)
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.accept_http_10 = accept_http_10  # Envoy's http_protocol_options.accept_http_10
        # Counts requests begun: a watcher polling ``in_head`` tells one slow head from the next.
        self.messages_begun = 0
        self.trailers: HeaderMap | None = None  # the trailers of the request just completed, if any

    @property
    def in_head(self) -> bool:
        """A request's first byte arrived and its head is not complete yet."""
        return self._in_head

    def feed(self, data: bytes) -> None:
        """Raises BadMessage on malformed input (the caller answers ``status`` and closes)."""
        was_in_head = self._in_head
        self._head_began = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise BadMessage("protocol upgrade is not supported") from None
        except httptools.HttpParserError as exc:
            # Our own rejections raised inside callbacks arrive wrapped by httptools.
            raise (self._error or BadMessage(f"malformed HTTP request: {exc}")) from None
        if self._in_head and was_in_head and not self._head_began:
            # httptools hands a header over only once it is complete, buffering it meanwhile: a
            # head that never ends (one endless header) is cut off here, so memory stays bounded
            # by the limit plus one read.
            self._unparsed_head += len(data)
            if self._unparsed_head > self.max_head_bytes:
                raise BadMessage("request headers too large", 431)

    def _reject(self, message: str, status: int = 400, *, bare: bool = False) -> BadMessage:
        self._error = BadMessage(message, status, bare=bare)
        return self._error

    # httptools callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        # Envoy's order for HTTP/1 requests, which plugins see in proxy_get_header_map_pairs.
        self._pairs = [(b":authority", b""), (b":path", b""), (b":method", b""), (b":scheme", self._scheme)]
        self._has_body = False
        self._host_seen = False
        self._nominated = None
        self._size = _REQUEST_HEAD_FRAMING
        self._trailer_pairs = None
        self._in_head = True
        self._head_began = True
        self._unparsed_head = 0
        self.messages_begun += 1
        self.trailers = None

    def on_url(self, url: bytes) -> None:
        if not self._url:
            self._size += len(self._parser.get_method()) + 1
        self._url += url
        self._size += len(url)
        if self._size > self.max_head_bytes:
            raise self._reject("request headers too large", 431)

    def on_header(self, name: bytes, value: bytes) -> None:
        # The limits are checked once the head is complete (memory meanwhile is bounded by feed);
        # each header's ": " and CRLF are added there too. Trailers count as well, as in Envoy.
        self._size += len(name) + len(value)
        lname = name.lower()
        if self._trailer_pairs is not None:  # after the head: the trailers of a chunked body
            self._size += 4
            if self._size > self.max_head_bytes or len(self._trailer_pairs) >= self.max_headers:
                raise self._reject("request trailers too large", 431)
            self._trailer_pairs.append((lname, value))
            return
        if lname == b"host":
            if self._host_seen:
                raise self._reject("multiple Host headers")
            self._host_seen = True
            self._pairs[0] = (b":authority", value)
            return
        if lname == b"content-length" or lname == b"transfer-encoding":
            self._has_body = True  # refined below; a zero length means no body
            if lname == b"content-length":
                if value.strip() == b"0":
                    self._has_body = False
            elif value.strip().lower() != b"chunked":
                # Envoy's codec implements chunked only ("identity, chunked", "gzip"...: 501).
                raise self._reject("unsupported transfer encoding", 501)
        elif lname == b"connection":
            self._nominated = value if self._nominated is None else self._nominated + b"," + value
        self._pairs.append((lname, value))

    def on_headers_complete(self) -> None:
        # The pairs hold the four pseudo-headers; Host replaced :authority instead of adding one.
        count = len(self._pairs) - 4 + self._host_seen
        self._size += 4 * count
        if self._size > self.max_head_bytes or count > self.max_headers:
            raise self._reject("request headers too large", 431)
        p = self._parser
        if p.should_upgrade():
            raise self._reject("protocol upgrade is not supported")
        url = self._url
        if url.startswith(b"http://") or url.startswith(b"https://"):
            # Absolute form (forward-proxy style): authority and path come from the URL.
            parsed = httptools.parse_url(url)
            if parsed.host:
                host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
                self._pairs[0] = (b":authority", host)
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        self._pairs[2] = (b":method", p.get_method())
        self._pairs[1] = (b":path", url)
        version = p.get_http_version()
        http10 = version == "1.0"
        if version != "1.1" and not (http10 and self.accept_http_10):
            # Envoy's default: HTTP/1.0 (unless accept_http_10) and HTTP/0.9 get 426.
            raise self._reject(f"HTTP/{version} is not accepted", 426)
        if not self._pairs[0][1] and not http10:
            raise self._reject("missing Host header", bare=True)
        self._trailer_pairs = []
        self._in_head = False
        if self._nominated is not None:
            self._drop_nominated(self._nominated)
        self._handler.on_request_headers(
            HeaderMap.from_lowercase(self._pairs), not self._has_body, p.should_keep_alive(), http10
        )

    def _drop_nominated(self, connection: bytes) -> None:
        """Headers the client named in Connection are hop-by-hop too (RFC 9110 §7.6.1): never
        forwarded, as Envoy drops them (``close``/``keep-alive`` name no header of their own)."""
        names = {t.strip().lower() for t in connection.split(b",")} - _NOT_NOMINATABLE
        if names:
            self._pairs = [(k, v) for k, v in self._pairs if k not in names or k[:1] == b":"]

    def on_body(self, body: bytes) -> None:
        self._handler.on_request_body(body)

    def on_message_complete(self) -> None:
        if self._trailer_pairs:
            self.trailers = HeaderMap.from_lowercase(self._trailer_pairs)
        self._handler.on_request_complete(self._has_body)


# --------------------------------------------------------------------------- upstream (responses)


class ResponseHandler(Protocol):
    def on_response_headers(self, headers: HeaderMap, end_stream: bool, keep_alive: bool) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_complete(self) -> None: ...


class ResponseParser:
    """Parses one connection's responses. ``expect_no_body()`` before a HEAD request's answer;
    ``next_response()`` between requests on a kept-alive connection."""

    __slots__ = (
        "_handler",
        "_parser",
        "_pairs",
        "_no_body",
        "_body_expected",
        "_done",
        "_headers_done",
        "_eof_body",
        "_between_messages",
        "_trailer_pairs",
        "_size",
        "_head_began",
        "_unparsed_head",
        "max_head_bytes",
        "max_headers",
        "trailers",
    )

    def __init__(
        self,
        handler: ResponseHandler,
        max_head_bytes: int = MAX_RESPONSE_HEADERS_BYTES,
        max_headers: int = MAX_HEADERS_COUNT,
    ) -> None:
        self._handler = handler
        self._parser = httptools.HttpResponseParser(self)
        self._pairs: list[tuple[bytes, bytes]] = []
        self._no_body = False
        self._body_expected = False
        self._done = False
        self._headers_done = False
        self._eof_body = False
        self._between_messages = True
        self._trailer_pairs: list[tuple[bytes, bytes]] = []
        self._size = 0
        self._head_began = False  # a response began during the current feed
        self._unparsed_head = 0  # bytes fed into an incomplete head (httptools buffers them)
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.trailers: HeaderMap | None = None  # the trailers of the response just completed, if any

    def expect_no_body(self) -> None:
        self._no_body = True

    def next_response(self) -> bool:
        """Get ready for the response to the next request on this connection (the same parser
        carries on: no per-request parser, whose bound callbacks would form a reference cycle).
        False if bytes of another response already arrived unasked: do not reuse the connection."""
        self._no_body = False
        return self._between_messages

    @property
    def in_body_until_eof(self) -> bool:
        """The response has neither length nor chunking: it ends when the connection closes."""
        return self._headers_done and not self._done and self._eof_body

    @property
    def message_started(self) -> bool:
        return self._headers_done

    def feed(self, data: bytes) -> None:
        """Raises BadMessage for a malformed response or one whose head is over the limits."""
        was_in_head = not self._between_messages and not self._headers_done
        self._head_began = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise BadMessage("upstream switched protocols") from None
        except httptools.HttpParserError as exc:
            raise BadMessage(f"malformed HTTP response: {exc}") from None
        if was_in_head and not self._head_began and not self._headers_done:
            # An endless head is cut off here, not buffered by httptools (see RequestParser.feed).
            self._unparsed_head += len(data)
            if self._unparsed_head > self.max_head_bytes:
                raise BadMessage("response headers too large")
        if self._no_body and self._headers_done and not self._done:
            # httptools cannot be told a response answers HEAD; finish it ourselves and start
            # a fresh parser for the next response on this connection.
            self._done = True
            self._between_messages = True
            self._parser = httptools.HttpResponseParser(self)
            self._handler.on_response_complete()

    def on_message_begin(self) -> None:
        self._pairs = [(b":status", b"")]
        self._between_messages = False
        self._done = False
        self._headers_done = False
        self._body_expected = False
        self._eof_body = False
        self._trailer_pairs = []
        self._size = _RESPONSE_HEAD_FRAMING
        self._head_began = True
        self._unparsed_head = 0
        self.trailers = None

    def on_status(self, reason: bytes) -> None:
        self._size += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value)  # ": " and CRLF are added with the count
        if self._headers_done:  # after the head: the trailers of a chunked body
            self._size += 4
            if self._size > self.max_head_bytes or len(self._trailer_pairs) >= self.max_headers:
                raise BadMessage("response trailers too large")
            self._trailer_pairs.append((name.lower(), value))
            return
        self._pairs.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        count = len(self._pairs) - 1  # after :status
        self._size += 4 * count
        if self._size > self.max_head_bytes or count > self.max_headers:
            raise BadMessage("response headers too large")  # before anything is forwarded
        status = self._parser.get_status_code()
        self._pairs[0] = (b":status", b"%d" % status)
        self._headers_done = True
        if self._no_body or status_has_no_body(status):
            self._body_expected = False
        else:
            length: bytes | None = None
            chunked = False
            for k, v in self._pairs:
                if k == b"content-length":
                    length = v
                elif k == b"transfer-encoding":
                    chunked = True
            if chunked:
                self._body_expected = True
            elif length is not None:
                self._body_expected = length.strip() != b"0"
            else:
                self._body_expected = True
                self._eof_body = True
        if status < 200:
            # 1xx interim responses are not forwarded (Envoy drops them unless configured); 101 is refused.
            return
        keep_alive = self._parser.should_keep_alive() and not self._eof_body
        self._handler.on_response_headers(
            HeaderMap.from_lowercase(self._pairs), not self._body_expected, keep_alive
        )

    def on_body(self, body: bytes) -> None:
        self._handler.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._done:
            return
        if self._pairs and self._pairs[0][1].startswith(b"1"):
            return  # interim response finished; the real one follows
        self._done = True
        self._between_messages = True
        if self._trailer_pairs:
            self.trailers = HeaderMap.from_lowercase(self._trailer_pairs)
        self._handler.on_response_complete()

    def connection_closed(self) -> bool:
        """Tell the parser the peer closed; True if that completed an EOF-delimited body."""
        if self.in_body_until_eof:
            self._done = True
            self._handler.on_response_complete()
            return True
        return False


# --------------------------------------------------------------------------- serialisation


def encode_request_head(headers: HeaderMap, chunked: bool) -> bytes:
    """Request line and headers for the upstream. ``:authority`` becomes Host."""
    method = path = authority = b""
    out: list[bytes] = []
    for k, v in headers.pairs():
        if k[:1] == b":":
            if k == b":method":
                method = v
            elif k == b":path":
                path = v
            elif k == b":authority":
                authority = v
            continue
        if k in HOP_BY_HOP:
            continue
        out.append(b"%b: %b\r\n" % (k, v))
    head = b"%b %b HTTP/1.1\r\nhost: %b\r\n" % (method or b"GET", path or b"/", authority)
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    out.append(CRLF)
    return head + b"".join(out)


class ResponseFraming:
    LENGTH = 0  # content-length given (or no body): write data as is
    CHUNKED = 1
    CLOSE = 2  # HTTP/1.0 client without length: the body ends when we close


def encode_response_head(
    headers: HeaderMap, *, end_stream: bool, keep_alive: bool, http10: bool, head_request: bool
) -> tuple[bytes, int, bool]:
    """Serialise response headers; returns (bytes, framing, keep_alive actually used)."""
    status_value = b"200"
    has_length = False
    out: list[bytes] = []
    for k, v in headers.pairs():
        if k[:1] == b":":
            if k == b":status":
                status_value = v
            continue
        if k in HOP_BY_HOP:
            continue
        if k == b"content-length":
            has_length = True
        out.append(b"%b: %b\r\n" % (k, v))
    try:
        status = int(status_value)
    except ValueError:
        status = 502
    framing = ResponseFraming.LENGTH
    if status_has_no_body(status) or head_request:
        pass
    elif has_length:
        pass
    elif end_stream:
        out.append(b"content-length: 0\r\n")
    elif http10:
        framing = ResponseFraming.CLOSE
        keep_alive = False
    else:
        framing = ResponseFraming.CHUNKED
        out.append(b"transfer-encoding: chunked\r\n")
    if not keep_alive:
        out.append(b"connection: close\r\n")
    elif http10:
        out.append(b"connection: keep-alive\r\n")
    out.append(CRLF)
    line = b"HTTP/1.%d %d %b\r\n" % (0 if http10 else 1, status, reason_phrase(status))
    return line + b"".join(out), framing, keep_alive


def bare_response(status: int) -> bytes:
    """Envoy's codec-level rejection without a body (e.g. 400 for a request without Host)."""
    line = b"HTTP/1.1 %d %b\r\n" % (status, reason_phrase(status))
    return line + b"connection: close\r\ncontent-length: 0\r\n\r\n"


def simple_response(
    status: int, body: bytes = b"", *, close: bool = True, content_type: bytes = b"text/plain"
) -> bytes:
    """A complete response outside any exchange (e.g. 400 for a malformed request)."""
    head = b"HTTP/1.1 %d %b\r\ncontent-length: %d\r\n" % (status, reason_phrase(status), len(body))
    if body:
        head += b"content-type: %b\r\n" % content_type
    if close:
        head += b"connection: close\r\n"
    return head + CRLF + body
