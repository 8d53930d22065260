"""A minimal blocking HTTP/1.1 client on ``http.client``, shared by the http and OCI fetchers.

Kept apart from the fetchers so they only decide *what* to ask and how to react; this module only moves
bytes: deadlines, TLS verification on/off, redirects, a body-size cap enforced while streaming, and
the SSRF guard (:mod:`wasmesh.agent.ssrf`).

Two properties hold whatever the server does:

* the deadline bounds the WHOLE exchange (connect, TLS, headers, body, every redirect hop): a watchdog
  shuts the socket down when it passes, so a server trickling one byte a second cannot stretch it;
* every hop's host is resolved once here, every resolved address is checked against the policy, and
  the socket connects to a checked address (never a second resolution).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from wasmesh.agent.errors import FetchError, FetchResult
from wasmesh.agent.ssrf import AddressPolicy

_CHUNK_BYTES = 64 * 1024
_MAX_REDIRECTS = 10
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class TransportError(Exception):
    """The request did not produce an HTTP response (refused, reset, TLS failure, timeout)."""

    def __init__(
        self,
        url: str,
        reason: str,
        *,
        timed_out: bool = False,
        tls_plain_http: bool = False,
        blocked: bool = False,
        redirected_from: str = "",
    ) -> None:
        # Formatted like Go's *url.Error so messages read as Istio's: Get "<url>": <reason>
        via = f" (redirected from {redirected_from})" if redirected_from else ""
        super().__init__(f'Get "{url}"{via}: {" ".join(reason.split())}')
        self.timed_out = timed_out
        # The address policy refused the destination: asking again (or over another scheme) cannot help.
        self.blocked = blocked
        # The server answered a TLS handshake with plain HTTP: the caller may retry with http://.
        self.tls_plain_http = tls_plain_http


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    url: str  # after redirects


def _insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_SECURE_TLS = ssl.create_default_context()
_INSECURE_TLS = _insecure_context()


def http_request(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float,
    deadline: float | None = None,
    verify_tls: bool = True,
    max_body_bytes: int,
    on_chunk: Callable[[bytes], None] | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
    keep_body: bool = True,
    policy: AddressPolicy | None = None,
) -> HttpResponse:
    """Send ``method`` to ``url``, following redirects (as GET); all must finish within ``timeout_s``.

    ``deadline`` (a ``time.monotonic()`` value) can only shorten that. ``Authorization`` is dropped when
    a redirect leaves the original host (blob stores hand out pre-signed URLs). Bodies of successful
    responses larger than ``max_body_bytes`` raise a FetchError instead of being truncated; error
    bodies are read only up to 64 KiB. ``policy`` decides which addresses may be connected to, on
    every hop (None: the always-blocked ranges plus ``BLOCKED_CIDRS_IN_WASM_FETCH``).
    """
    if policy is None:
        policy = AddressPolicy.from_env()
    end = time.monotonic() + timeout_s
    if deadline is not None:
        end = min(end, deadline)
    request_headers = dict(headers or {})
    original_host = urlsplit(url).netloc
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        response = _request_once(
            method,
            current,
            body,
            request_headers,
            end,
            verify_tls,
            max_body_bytes,
            on_chunk,
            on_progress,
            keep_body,
            policy,
            redirected_from=url if current != url else "",
        )
        if response.status not in _REDIRECT_STATUSES or "location" not in response.headers:
            return response
        method, body = "GET", None
        current = urljoin(current, response.headers["location"])
        if urlsplit(current).netloc != original_host:
            request_headers = {k: v for k, v in request_headers.items() if k.lower() != "authorization"}
    raise TransportError(url, f"stopped after {_MAX_REDIRECTS} redirects")


def resolve_checked(url: str, host: str, port: int, policy: AddressPolicy, redirected_from: str) -> list[str]:
    """The addresses ``host`` may be connected through; TransportError(blocked) if any is refused.

    A name with one refused address is refused whole: a name mixing allowed and metadata addresses is
    what a DNS-rebinding attacker serves, and connecting to "the other one" would hide it.
    """
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        reason = policy.refusal(literal)
        if reason is not None:
            raise TransportError(
                url, f"connection blocked: {reason}", blocked=True, redirected_from=redirected_from
            )
        return [str(literal)]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise TransportError(url, f"dial tcp: lookup {host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    reason = policy.first_refusal(addresses)
    if reason is not None:
        raise TransportError(
            url,
            f"connection blocked: {host} resolved to {reason}",
            blocked=True,
            redirected_from=redirected_from,
        )
    return addresses


def _connector(
    addresses: list[str], port: int, watchdog: _Watchdog
) -> Callable[..., socket.socket]:
    """A ``socket.create_connection`` stand-in for http.client that dials only the checked ``addresses``."""

    def create_connection(
        _address: object, timeout: float | None = None, source_address: object = None
    ) -> socket.socket:
        last_error: OSError | None = None
        for address in addresses:
            try:
                sock = socket.create_connection((address, port), timeout=timeout)
            except OSError as exc:
                last_error = exc
                continue
            watchdog.watch(sock.fileno())
            return sock
        assert last_error is not None
        raise last_error

    return create_connection


class _Watchdog:
    """Shuts a connection's socket down when the deadline passes, whatever call is blocked on it.

    It holds the file descriptor, not the socket object: TLS wraps (and detaches) the TCP socket,
    and the handshake is one of the calls a slow server can stretch. ``cancel()`` must run before
    the socket is closed, so a late timer can never shut down a reused descriptor.
    """

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._fd = -1
        self._cancelled = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, fd: int) -> None:
        with self._lock:
            self._fd = fd
            late = self.fired
        if late:
            self._shutdown(fd)

    def _fire(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self.fired = True
            if self._fd >= 0:
                self._shutdown(self._fd)

    @staticmethod
    def _shutdown(fd: int) -> None:
        # A socket object borrowing the descriptor; detach() hands it back without closing it. The
        # blocked reader (plain or TLS) then sees EOF or an error.
        try:
            borrowed = socket.socket(fileno=fd)
        except OSError:
            return
        try:
            borrowed.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            borrowed.detach()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
        self._timer.cancel()


def _transport_error(url: str, exc: Exception, deadline_passed: bool) -> TransportError:
    """The TransportError for a failed exchange; anything after the watchdog fired is the deadline's doing."""
    if deadline_passed or isinstance(exc, TimeoutError):
        return TransportError(url, "context deadline exceeded (Client.Timeout exceeded)", timed_out=True)
    if isinstance(exc, ssl.SSLError):
        plain = "WRONG_VERSION_NUMBER" in str(exc) or "record layer failure" in str(exc)
        return TransportError(url, f"tls: {exc}", tls_plain_http=plain)
    if isinstance(exc, http.client.IncompleteRead):
        return TransportError(url, f"unexpected EOF after {len(exc.partial)} bytes")
    return TransportError(url, f"{type(exc).__name__}: {exc}")


def _request_once(
    method: str,
    url: str,
    request_body: bytes | None,
    headers: Mapping[str, str],
    end: float,
    verify_tls: bool,
    max_body_bytes: int,
    on_chunk: Callable[[bytes], None] | None,
    on_progress: Callable[[int, int | None], None] | None,
    keep_body: bool,
    policy: AddressPolicy,
    redirected_from: str = "",
) -> HttpResponse:
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise TransportError(url, f"invalid port in URL {url!r}") from None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise TransportError(url, f"unsupported URL {url!r}")
    addresses = resolve_checked(url, host, port, policy, redirected_from)
    remaining = end - time.monotonic()
    if remaining <= 0:
        raise TransportError(url, "context deadline exceeded", timed_out=True)
    connection: http.client.HTTPConnection
    # The port is always given: http.client would otherwise read "[fd00:ec2::254]" as host
    # "fd00:ec2:" port 254.
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            host,
            port,
            timeout=remaining,
            context=_SECURE_TLS if verify_tls else _INSECURE_TLS,
        )
    else:
        connection = http.client.HTTPConnection(host, port, timeout=remaining)
    watchdog = _Watchdog(remaining)
    connection._create_connection = _connector(addresses, port, watchdog)  # type: ignore[attr-defined]
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    try:
        connection.request(
            method, target, body=request_body, headers={"User-Agent": "wasmesh-agent", **headers}
        )
        raw = connection.getresponse()
        response_headers: dict[str, str] = {}
        for name, value in raw.getheaders():
            key = name.lower()
            response_headers[key] = f"{response_headers[key]}, {value}" if key in response_headers else value
        ok = 200 <= raw.status < 300
        limit = max_body_bytes if ok else 64 * 1024
        length_header = response_headers.get("content-length", "")
        expected = int(length_header) if length_header.isdigit() else None
        if ok and expected is not None and expected > limit:
            raise FetchError(
                f"response from {url} is {expected} bytes, which exceeds the size limit of {limit} bytes",
                FetchResult.DOWNLOAD_FAILURE,
            )
        body = bytearray()
        received = 0
        while True:
            if watchdog.fired or time.monotonic() > end:
                raise TransportError(
                    url, "context deadline exceeded (Client.Timeout while reading body)", timed_out=True
                )
            # read1, not read: read(n) loops until it has n bytes, so a trickling server would hold it
            # for n receives; read1 returns what one receive brought.
            chunk = raw.read1(_CHUNK_BYTES)
            if not chunk:
                if watchdog.fired:  # the watchdog's shutdown reads as EOF: not the end of the body
                    raise TransportError(
                        url, "context deadline exceeded (Client.Timeout while reading body)", timed_out=True
                    )
                break
            received += len(chunk)
            if received > limit:
                if not ok:
                    break
                raise FetchError(
                    f"response from {url} exceeds the size limit of {limit} bytes",
                    FetchResult.DOWNLOAD_FAILURE,
                )
            if ok and on_chunk is not None:
                on_chunk(chunk)
            if ok and on_progress is not None:
                on_progress(received, expected)
            if keep_body or not ok:
                body += chunk
        if ok and expected is not None and received < expected:
            # http.client reports a short body as a clean EOF; a cut transfer must not pass as complete.
            raise TransportError(url, f"unexpected EOF: got {received} of {expected} bytes")
        return HttpResponse(raw.status, response_headers, bytes(body), url)
    except (FetchError, TransportError):
        raise
    except (OSError, http.client.HTTPException) as exc:
        raise _transport_error(url, exc, watchdog.fired) from None
    finally:
        watchdog.cancel()
        connection.close()
