"""The control plane's HTTP API (what `wasmesh apply/delete/get/describe` talk to) plus /metrics.

Routes:
    POST   /apply              body: YAML or JSON documents → {"results": [...], "errors": [...]}
    POST   /delete             body: YAML or JSON documents (identity only) → same shape
    GET    /resources/<kind>[?namespace=NS]          → {"items": [<stored documents>]}
    GET    /resources/<kind>/<namespace>/<name>      → the stored document
    DELETE /resources/<kind>/<namespace>/<name>      → {"results": [...], "errors": [...]}
    DELETE /resources/<kind>[?namespace=NS]          → deletes all of a kind (in one namespace)
    GET    /status/wasmplugins[?namespace=NS]        → per-plugin, per-proxy load status
    GET    /status/wasmplugins/<namespace>/<name>
    GET    /metrics            Prometheus text (istiod's pilot_* series)
    GET    /debug/connections  connected proxies and their ACK state
    GET    /healthz            the process answers
    GET    /readyz             the control plane has loaded its config and serves xDS

Every route but /healthz and /readyz needs `Authorization: Bearer TOKEN` (unless the control plane
runs with --insecure-api): 401 with `WWW-Authenticate: Bearer` without a valid token, 403 (the
Kubernetes RBAC message) when the token's role or namespaces do not allow the verb. /metrics is
open to every role, /debug/connections to admins. Secrets are returned with their values redacted,
to every role. Changes and denials are written to the audit log.

Errors are JSON `{"errors": ["one line each"]}`: 400 for a body that cannot be read (syntax, no
documents, too deep, excessive YAML aliasing, bad chunked encoding), 404 for an unknown route or
resource, 405 for a known route with another method, 413 for a body over MAX_BODY, 422 for
documents that fail validation, 500 (one line; the traceback goes to the log) for a handler bug.

`ApiHandler` maps a request to a response; `serve_http` is the (tiny, HTTP/1.1, one request per
connection) asyncio transport, with Content-Length or chunked request bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from wasmesh.api.load import Document
from wasmesh.api.model import WasmPlugin
from wasmesh.controlplane.audit import AuditLog
from wasmesh.controlplane.auth import ANONYMOUS_ADMIN, Identity, TokenStore, bearer_token, forbidden_message
from wasmesh.controlplane.bodies import BodyError, parse_documents
from wasmesh.controlplane.store import ConfigStore, ResourceRejected, canonical_kind
from wasmesh.controlplane.warnings import plugin_warnings
from wasmesh.xds.metrics import XdsMetrics

log = logging.getLogger("wasmesh.controlplane")

MAX_BODY = 16 * 1024 * 1024
MAX_HEAD = 64 * 1024

StatusSource = Callable[[str | None, str | None], list[dict[str, Any]]]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def _json(status: int, payload: object) -> Response:
    return Response(status, json.dumps(payload, indent=2, sort_keys=False).encode() + b"\n")


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    response = _json(status, {"errors": [message]})
    return Response(response.status, response.body, response.content_type, dict(headers or {}))


# Route patterns (matched against the path's segments) and the methods each allows.
_ROUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("apply", ("POST",)),
    ("delete", ("POST",)),
    ("resources/*", ("GET", "DELETE")),
    ("resources/*/*/*", ("GET", "DELETE")),
    ("status/wasmplugins", ("GET",)),
    ("status/wasmplugins/*/*", ("GET",)),
    ("metrics", ("GET",)),
    ("debug/connections", ("GET",)),
    ("healthz", ("GET",)),
    ("readyz", ("GET",)),
)


_ANONYMOUS_ROUTES = ("healthz", "readyz")


class _Forbidden(Exception):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(messages[0])
        self.messages = messages


def _route_for(parts: list[str]) -> tuple[str, tuple[str, ...]] | None:
    for pattern, methods in _ROUTES:
        expected = pattern.split("/")
        if len(expected) == len(parts) and all(e in ("*", p) for e, p in zip(expected, parts, strict=True)):
            return pattern, methods
    return None


class ApiHandler:
    """Maps (method, target, body) to a Response; safe to call from any thread."""

    def __init__(
        self,
        store: ConfigStore,
        metrics: XdsMetrics,
        describe_connections: Callable[[], list[dict[str, object]]] = list,
        plugin_status: StatusSource | None = None,
        ready: Callable[[], bool] = lambda: True,
        tokens: TokenStore | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        """`tokens` None: no authentication (--insecure-api), every caller acts as an admin."""
        self.tokens = tokens
        self.audit = audit
        self.store = store
        self.metrics = metrics
        self.describe_connections = describe_connections
        self.plugin_status = plugin_status
        self.ready = ready

    def _audit(
        self,
        identity: Identity | None,
        verb: str,
        kind: str,
        namespace: str | None,
        name: str,
        code: int,
        peer: str,
        reason: str = "",
    ) -> None:
        if self.audit is not None:
            self.audit.record(
                user=identity.user if identity is not None else "system:anonymous",
                verb=verb,
                kind=kind,
                namespace=namespace or "",
                name=name,
                code=code,
                source=peer,
                reason=reason,
            )

    def authenticate(
        self, method: str, target: str, headers: Mapping[str, str] | None, peer: str = ""
    ) -> Identity | Response:
        """Who calls, or the (audited) 401 for a request without a valid token."""
        path = urlsplit(target).path
        if self.tokens is None or path.strip("/") in _ANONYMOUS_ROUTES:
            return ANONYMOUS_ADMIN
        token = bearer_token((headers or {}).get("authorization"))
        why = "no bearer token"
        if token is not None:
            identity, why = self.tokens.authenticate(token)
            if identity is not None:
                return identity
        self._audit(None, method.lower(), "", None, path, 401, peer, why)
        return _error(401, f"Unauthorized: {why}", {"WWW-Authenticate": 'Bearer realm="wasmesh"'})

    def _authorize(
        self, identity: Identity, verb: str, kind: str, namespace: str | None, name: str, peer: str
    ) -> None:
        if not identity.may(verb, namespace):
            message = forbidden_message(identity, verb, kind, namespace, name)
            self._audit(identity, verb, kind, namespace, name, 403, peer, "forbidden")
            raise _Forbidden([message])

    def handle(
        self,
        method: str,
        target: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        peer: str = "",
    ) -> Response:
        identity = self.authenticate(method, target, headers, peer)
        if isinstance(identity, Response):
            return identity
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [unquote(p) for p in url.path.split("/") if p]
        route = _route_for(parts)
        if route is None:
            return _error(404, f"no route for {method} {url.path}")
        pattern, methods = route
        if method not in methods:
            allowed = ", ".join(methods)
            return _error(
                405, f"{method} is not allowed on {url.path} (allowed: {allowed})", {"Allow": allowed}
            )
        try:
            return self._dispatch(pattern, method, parts, query, body, identity, peer)
        except _Forbidden as exc:
            return _json(403, {"errors": exc.messages})
        except (ValueError, BodyError) as exc:
            return _error(400, str(exc))

    def _dispatch(
        self,
        pattern: str,
        method: str,
        parts: list[str],
        query: dict[str, str],
        body: bytes,
        identity: Identity,
        peer: str,
    ) -> Response:
        namespace = query.get("namespace") or None
        if pattern == "apply":
            return self._apply(body, query.get("source", "request"), identity, peer)
        if pattern == "delete":
            return self._delete(body, query.get("source", "request"), identity, peer)
        if pattern == "resources/*":
            kind = canonical_kind(parts[1])
            if method == "GET":
                self._authorize(identity, "list", kind, namespace, "", peer)
                return self._list(kind, namespace)
            self._authorize(identity, "delete", kind, namespace, "", peer)
            return self._delete_all(kind, namespace, identity, peer)
        if pattern == "resources/*/*/*":
            kind = canonical_kind(parts[1])
            if method == "GET":
                self._authorize(identity, "get", kind, parts[2], parts[3], peer)
                return self._get(kind, parts[2], parts[3])
            self._authorize(identity, "delete", kind, parts[2], parts[3], peer)
            return self._delete_one(kind, parts[2], parts[3], identity, peer)
        if pattern.startswith("status/wasmplugins"):
            if len(parts) == 4:
                self._authorize(identity, "get", "WasmPlugin", parts[2], parts[3], peer)
            else:
                self._authorize(identity, "list", "WasmPlugin", namespace, "", peer)
            return self._status(parts[2:], namespace)
        if pattern == "metrics":  # every authenticated role (Prometheus scrapes with a viewer token)
            return Response(200, self.metrics.render().encode(), "text/plain; version=0.0.4")
        if pattern == "debug/connections":  # every proxy in every namespace: admins only
            if identity.role != "admin":
                self._audit(identity, "get", "", None, "/debug/connections", 403, peer, "forbidden")
                raise _Forbidden([f'forbidden: User "{identity.user}" cannot get path "/debug/connections"'])
            return _json(200, {"connections": self.describe_connections()})
        if pattern == "readyz":
            if self.ready():
                return Response(200, b"ok\n", "text/plain")
            return Response(503, b"not ready\n", "text/plain")
        return Response(200, b"ok\n", "text/plain")  # healthz

    def _documents(self, body: bytes, source: str) -> list[Document]:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BodyError(f"{source}: request body is not UTF-8 (byte {exc.start})") from None
        return parse_documents(text, source)

    def _authorize_documents(
        self, documents: list[Document], identity: Identity, peer: str, deleting: bool
    ) -> None:
        """Every document must be allowed before any is applied or deleted (all or nothing)."""
        denied: list[str] = []
        for document in documents:
            try:
                kind = canonical_kind(document.kind)
            except ValueError:
                kind = document.kind  # the store rejects it; who may not write it still may not
            if deleting:
                verb = "delete"
            else:  # `kubectl apply` creates a new object and patches an existing one
                exists = self.store.get(kind, document.namespace, document.name) is not None
                verb = "patch" if exists else "create"
            try:
                self._authorize(identity, verb, kind, document.namespace, document.name, peer)
            except _Forbidden as exc:
                denied.extend(exc.messages)
        if denied:
            raise _Forbidden(denied)

    def _apply(self, body: bytes, source: str, identity: Identity, peer: str) -> Response:
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        warnings: list[str] = []
        documents = self._documents(body, source)
        self._authorize_documents(documents, identity, peer, deleting=False)
        for document in documents:
            try:
                stored, action = self.store.apply(document, source="api")
            except ResourceRejected as exc:
                errors.extend(exc.errors)
                self._audit(identity, "apply", document.kind, document.namespace, document.name, 422, peer)
                self.metrics.config_rejected.inc(document.kind)
                for line in exc.errors:
                    log.warning("rejected: %s", line)
                continue
            if isinstance(stored.parsed, WasmPlugin):
                for warning in plugin_warnings(stored.parsed):
                    warnings.append(warning)
                    if action != "unchanged":
                        log.warning("%s", warning)
            self._audit(identity, "apply", stored.kind, stored.namespace, stored.name, 200, peer, action)
            results.append(
                {
                    "kind": stored.kind,
                    "namespace": stored.namespace,
                    "name": stored.name,
                    "action": action,
                    "resourceVersion": stored.resource_version,
                }
            )
        payload: dict[str, Any] = {"results": results, "errors": errors}
        if warnings:  # kubectl prints the API server's warnings as `Warning: ...` on stderr
            payload["warnings"] = warnings
        return _json(422 if errors else 200, payload)

    def _delete(self, body: bytes, source: str, identity: Identity, peer: str) -> Response:
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        documents = self._documents(body, source)
        self._authorize_documents(documents, identity, peer, deleting=True)
        for document in documents:
            try:
                kind = canonical_kind(document.kind)
            except ValueError as exc:
                errors.append(f"{document.location}: {exc}")
                continue
            self._delete_into(kind, document.namespace, document.name, results, errors, identity, peer)
        return _json(404 if errors and not results else 200, {"results": results, "errors": errors})

    def _delete_into(
        self,
        kind: str,
        namespace: str,
        name: str,
        results: list[dict[str, Any]],
        errors: list[str],
        identity: Identity,
        peer: str,
    ) -> None:
        removed = self.store.delete(kind, namespace, name)
        self._audit(identity, "delete", kind, namespace, name, 404 if removed is None else 200, peer)
        if removed is None:
            errors.append(f'{kind} "{namespace}/{name}" not found')
        else:
            results.append(
                {"kind": kind, "namespace": removed.namespace, "name": removed.name, "action": "deleted"}
            )

    def _delete_one(self, kind: str, namespace: str, name: str, identity: Identity, peer: str) -> Response:
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        self._delete_into(kind, namespace, name, results, errors, identity, peer)
        return _json(404 if errors else 200, {"results": results, "errors": errors})

    def _delete_all(self, kind: str, namespace: str | None, identity: Identity, peer: str) -> Response:
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        for item in self.store.select(kind, namespace):
            self._delete_into(kind, item.namespace, item.name, results, errors, identity, peer)
        return _json(200, {"results": results, "errors": errors})

    def _list(self, kind: str, namespace: str | None) -> Response:
        items = [item.public_body() for item in self.store.select(kind, namespace)]
        return _json(200, {"items": items})

    def _get(self, kind: str, namespace: str, name: str) -> Response:
        stored = self.store.get(kind, namespace, name)
        if stored is None:
            return _error(404, f'{kind} "{namespace}/{name}" not found')
        return _json(200, stored.public_body())

    def _status(self, identity: list[str], namespace: str | None) -> Response:
        if self.plugin_status is None:
            return _json(200, {"items": []})
        if not identity:
            return _json(200, {"items": self.plugin_status(namespace, None)})
        namespace, name = identity
        items = self.plugin_status(namespace, name)
        if not items:
            return _error(404, f'WasmPlugin "{namespace}/{name}" not found')
        return _json(200, items[0])


_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,8})(;[^\r\n]*)?\r\n$")


class _RequestRefused(Exception):
    """The request cannot be served as sent; `response` says why."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _too_large() -> _RequestRefused:
    return _RequestRefused(_error(413, f"request body larger than {MAX_BODY} bytes"))


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body (RFC 9112 section 7.1), at most MAX_BODY bytes; trailers are read and dropped."""
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        match = _CHUNK_SIZE.match(line)
        if match is None:
            raise _RequestRefused(_error(400, "malformed chunked request body: bad chunk size line"))
        size = int(match.group(1), 16)
        if size == 0:
            break
        if len(body) + size > MAX_BODY:
            raise _too_large()
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise _RequestRefused(_error(400, "malformed chunked request body: chunk not followed by CRLF"))
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields
        pass
    return bytes(body)


async def _read_body(
    headers: dict[str, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bytes:
    encoding = headers.get("transfer-encoding")
    length_text = headers.get("content-length")
    if encoding is not None and length_text is not None:
        raise _RequestRefused(_error(400, "both Transfer-Encoding and Content-Length are set"))
    if encoding is not None and encoding.lower() != "chunked":
        raise _RequestRefused(_error(501, f"Transfer-Encoding {encoding!r} is not supported (only chunked)"))
    length = 0
    if length_text is not None:
        if not length_text.isdigit():
            raise _RequestRefused(_error(400, f"invalid Content-Length {length_text!r}"))
        length = int(length_text)
        if length > MAX_BODY:
            raise _too_large()
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if encoding is not None:
        return await _read_chunked(reader)
    return await reader.readexactly(length) if length else b""


async def _serve_one(handler: ApiHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    method = target = ""
    address = writer.get_extra_info("peername")
    peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else ""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        method = method.upper()
        headers: dict[str, str] = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        caller = handler.authenticate(method, target, headers, peer)
        if isinstance(caller, Response):  # before reading the body: strangers may not upload 16 MiB
            raise _RequestRefused(caller)
        body = await asyncio.wait_for(_read_body(headers, reader, writer), 60)
        if method == "GET":
            response = handler.handle(method, target, body, headers, peer)
        else:  # parsing and validating a large body must not stall /healthz or xDS on this loop
            response = await asyncio.to_thread(handler.handle, method, target, body, headers, peer)
    except _RequestRefused as exc:
        response = exc.response
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        response = _error(400, "malformed HTTP request")
    except Exception as exc:  # a handler bug answers 500 rather than hanging the client
        log.exception("API request %s %s failed", method, target)
        where = urlsplit(target).path
        response = _error(
            500, f"internal error handling {method} {where}: {type(exc).__name__} (see the control plane log)"
        )
    extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers.items())
    writer.write(
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}\r\n"
        f"Content-Type: {response.content_type}\r\n{extra}"
        f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n".encode()
        + response.body
    )
    try:
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve_http(
    handler: ApiHandler, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> asyncio.Server:
    """Start the API server (HTTPS with `ssl_context`); the first socket tells the bound port."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_one(handler, reader, writer)

    if ssl_context is None:
        return await asyncio.start_server(on_connection, host, port, limit=MAX_HEAD)
    return await asyncio.start_server(
        on_connection, host, port, limit=MAX_HEAD, ssl=ssl_context, ssl_handshake_timeout=30
    )
