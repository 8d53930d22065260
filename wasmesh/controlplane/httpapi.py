"""The control plane's HTTP API (what `wasmesh apply/delete/get` talk to) plus /metrics.

Routes:
    POST /apply              body: YAML or JSON documents → {"results": [...], "errors": [...]}
    POST /delete             body: YAML or JSON documents (identity only) → same shape
    GET  /resources/<kind>[?namespace=NS]  → {"items": [<stored documents>]}
    GET  /metrics            Prometheus text (istiod's pilot_* series)
    GET  /debug/connections  connected proxies and their ACK state
    GET  /healthz

`ApiHandler` maps a request to a response; `serve_http` is the (tiny, HTTP/1.1, one request per
connection) asyncio transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from wasmesh.api.load import Document, LoadError, parse_json_document, parse_yaml_stream
from wasmesh.controlplane.store import ConfigStore, ResourceRejected, canonical_kind
from wasmesh.xds.metrics import XdsMetrics

log = logging.getLogger("wasmesh.controlplane")

MAX_BODY = 16 * 1024 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


def _json(status: int, payload: object) -> Response:
    return Response(status, json.dumps(payload, indent=2, sort_keys=False).encode() + b"\n")


def parse_documents(text: str, source: str) -> list[Document]:
    """YAML stream or JSON (object, or a List with items) → documents. Raises LoadError."""
    stripped = text.lstrip()
    path = Path(source)
    if stripped.startswith(("{", "[")):
        documents = parse_json_document(text, path)
        if documents and documents[0].kind == "List":
            items = documents[0].body.get("items") or []
            return [parse_json_document(json.dumps(item), path)[0] for item in items]
        return documents
    return parse_yaml_stream(text, path)


class ApiHandler:
    def __init__(
        self,
        store: ConfigStore,
        metrics: XdsMetrics,
        describe_connections: Callable[[], list[dict[str, object]]] = list,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.describe_connections = describe_connections

    def handle(self, method: str, target: str, body: bytes) -> Response:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        try:
            if method == "POST" and parts == ["apply"]:
                return self._apply(body, query.get("source", "request"))
            if method == "POST" and parts == ["delete"]:
                return self._delete(body, query.get("source", "request"))
            if method == "GET" and len(parts) == 2 and parts[0] == "resources":
                return self._list(parts[1], query.get("namespace"))
            if method == "GET" and parts == ["metrics"]:
                return Response(200, self.metrics.render().encode(), "text/plain; version=0.0.4")
            if method == "GET" and parts == ["debug", "connections"]:
                return _json(200, {"connections": self.describe_connections()})
            if method == "GET" and parts == ["healthz"]:
                return Response(200, b"ok\n", "text/plain")
        except ValueError as exc:
            return _json(400, {"errors": [str(exc)]})
        return _json(404, {"errors": [f"no route for {method} {url.path}"]})

    def _documents(self, body: bytes, source: str) -> list[Document]:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{source}: request body is not UTF-8") from None
        try:
            return parse_documents(text, source)
        except LoadError as exc:
            raise ValueError(str(exc)) from None

    def _apply(self, body: bytes, source: str) -> Response:
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        for document in self._documents(body, source):
            try:
                stored, action = self.store.apply(document, source="api")
            except ResourceRejected as exc:
                errors.extend(exc.errors)
                self.metrics.config_rejected.inc(document.kind)
                for line in exc.errors:
                    log.warning("rejected: %s", line)
                continue
            results.append(
                {
                    "kind": stored.kind,
                    "namespace": stored.namespace,
                    "name": stored.name,
                    "action": action,
                    "resourceVersion": stored.resource_version,
                }
            )
        return _json(422 if errors else 200, {"results": results, "errors": errors})

    def _delete(self, body: bytes, source: str) -> Response:
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        for document in self._documents(body, source):
            try:
                kind = canonical_kind(document.kind)
            except ValueError as exc:
                errors.append(f"{document.location}: {exc}")
                continue
            removed = self.store.delete(kind, document.namespace, document.name)
            if removed is None:
                errors.append(f'{kind} "{document.namespace}/{document.name}" not found')
            else:
                results.append(
                    {"kind": kind, "namespace": removed.namespace, "name": removed.name, "action": "deleted"}
                )
        return _json(404 if errors and not results else 200, {"results": results, "errors": errors})

    def _list(self, kind: str, namespace: str | None) -> Response:
        items = [dict(item.body) for item in self.store.select(canonical_kind(kind), namespace)]
        return _json(200, {"items": items})


async def _serve_one(handler: ApiHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY:
            response = _json(413, {"errors": [f"request body larger than {MAX_BODY} bytes"]})
        else:
            body = await reader.readexactly(length) if length else b""
            response = handler.handle(method.upper(), target, body)
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        response = _json(400, {"errors": ["malformed HTTP request"]})
    except Exception:  # a handler bug answers 500 rather than hanging the client
        log.exception("API request failed")
        response = _json(500, {"errors": ["internal error"]})
    reason = {
        200: "OK",
        400: "Bad Request",
        404: "Not Found",
        413: "Payload Too Large",
        422: "Unprocessable Entity",
        500: "Internal Server Error",
    }.get(response.status, "")
    writer.write(
        f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n".encode()
        + response.body
    )
    try:
        await writer.drain()
    finally:
        writer.close()


async def serve_http(handler: ApiHandler, host: str, port: int) -> asyncio.Server:
    """Start the API server; the returned server's first socket tells the bound port."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_one(handler, reader, writer)

    return await asyncio.start_server(on_connection, host, port, limit=MAX_BODY)
