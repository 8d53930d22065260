"""A minimal blocking HTTP/1.1 client on ``http.client``, shared by the http and OCI fetchers.

Kept apart from the fetchers so they only decide *what* to ask and how to react; this module only moves
bytes: deadlines, TLS verification on/off, redirects, and a body-size cap enforced while streaming.
"""

from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from wasmesh.agent.errors import FetchError, FetchResult

_CHUNK_BYTES = 64 * 1024
_MAX_REDIRECTS = 10
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class TransportError(Exception):
    """The request did not produce an HTTP response (refused, reset, TLS failure, timeout)."""

    def __init__(
        self, url: str, reason: str, *, timed_out: bool = False, tls_plain_http: bool = False
    ) -> None:
        # Formatted like Go's *url.Error so messages read as Istio's: Get "<url>": <reason>
        super().__init__(f'Get "{url}": {" ".join(reason.split())}')
        self.timed_out = timed_out
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
) -> HttpResponse:
    """Send ``method`` to ``url``, following redirects (as GET); all must finish within ``timeout_s``.

    ``deadline`` (a ``time.monotonic()`` value) can only shorten that. ``Authorization`` is dropped when
    a redirect leaves the original host (blob stores hand out pre-signed URLs). Bodies of successful
    responses larger than ``max_body_bytes`` raise a FetchError instead of being truncated; error
    bodies are read only up to 64 KiB.
    """
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
        )
        if response.status not in _REDIRECT_STATUSES or "location" not in response.headers:
            return response
        method, body = "GET", None
        current = urljoin(current, response.headers["location"])
        if urlsplit(current).netloc != original_host:
            request_headers = {k: v for k, v in request_headers.items() if k.lower() != "authorization"}
    raise TransportError(url, f"stopped after {_MAX_REDIRECTS} redirects")


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
) -> HttpResponse:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransportError(url, f"unsupported URL {url!r}")
    remaining = end - time.monotonic()
    if remaining <= 0:
        raise TransportError(url, "context deadline exceeded", timed_out=True)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname,
            parts.port,
            timeout=remaining,
            context=_SECURE_TLS if verify_tls else _INSECURE_TLS,
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=remaining)
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
            if time.monotonic() > end:
                raise TransportError(
                    url, "context deadline exceeded (Client.Timeout while reading body)", timed_out=True
                )
            chunk = raw.read(_CHUNK_BYTES)
            if not chunk:
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
    except FetchError:
        raise
    except ssl.SSLError as exc:
        plain = "WRONG_VERSION_NUMBER" in str(exc) or "record layer failure" in str(exc)
        raise TransportError(url, f"tls: {exc}", tls_plain_http=plain) from None
    except TimeoutError:
        raise TransportError(
            url, "context deadline exceeded (Client.Timeout exceeded)", timed_out=True
        ) from None
    except http.client.IncompleteRead as exc:
        raise TransportError(url, f"unexpected EOF after {len(exc.partial)} bytes") from None
    except (OSError, http.client.HTTPException) as exc:
        raise TransportError(url, f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()
