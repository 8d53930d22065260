"""The admin listener: /stats/prometheus, /config_dump, /ready, /logging (Envoy's admin paths).

Handlers are async callables so the same server fronts one in-process worker or a
supervisor that gathers from several worker processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools

from wasmesh.proxy.http1 import reason_phrase

log = logging.getLogger("wasmesh.proxy.admin")

LOG_LEVELS = {
    "trace": 5,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": 100,
}


@dataclass
class AdminResponse:
    status: int
    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"


@dataclass
class AdminHandlers:
    prometheus: Callable[[], Awaitable[str]]
    config_dump: Callable[[], Awaitable[object]]
    ready: Callable[[], Awaitable[bool]]
    # Called after /logging changed the level here, so worker processes follow.
    set_level: Callable[[str], Awaitable[None]] | None = None


def current_levels() -> dict[str, str]:
    names = ["wasmesh", "wasmesh.proxy", "wasmesh.plugin", "wasmesh.runtime"]
    return {n: logging.getLevelName(logging.getLogger(n).getEffectiveLevel()).lower() for n in names}


def apply_level(level: str) -> None:
    """Set the level of wasmesh's loggers (what Envoy's POST /logging?level= does for all loggers)."""
    logging.getLogger("wasmesh").setLevel(LOG_LEVELS[level])


async def handle(handlers: AdminHandlers, method: str, target: str) -> AdminResponse:
    parts = urlsplit(target)
    path = parts.path
    query = parse_qs(parts.query)
    if path == "/ready":
        ok = await handlers.ready()
        return AdminResponse(200 if ok else 503, b"LIVE\n" if ok else b"PRE_INITIALIZING\n")
    if path == "/stats/prometheus":
        text = await handlers.prometheus()
        return AdminResponse(200, text.encode(), b"text/plain; version=0.0.4; charset=utf-8")
    if path == "/config_dump":
        dump = await handlers.config_dump()
        return AdminResponse(200, json.dumps(dump, indent=2, default=str).encode(), b"application/json")
    if path == "/logging":
        if method == "POST":
            level = (query.get("level") or [""])[0].lower()
            if level not in LOG_LEVELS:
                allowed = ", ".join(sorted(LOG_LEVELS))
                return AdminResponse(400, f"logging: level must be one of {allowed}\n".encode())
            apply_level(level)
            if handlers.set_level is not None:
                await handlers.set_level(level)
        elif method != "GET":
            return AdminResponse(405, b"use GET or POST\n")
        lines = [f"{name}: {lvl}" for name, lvl in current_levels().items()]
        return AdminResponse(200, ("active loggers:\n  " + "\n  ".join(lines) + "\n").encode())
    if path == "/":
        return AdminResponse(200, b"/stats/prometheus\n/config_dump\n/ready\n/logging\n")
    return AdminResponse(404, b"not found\n")


class _AdminProtocol(asyncio.Protocol):
    def __init__(self, handlers: AdminHandlers) -> None:
        self.handlers = handlers
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        keep_alive = self.parser.should_keep_alive()
        task = asyncio.get_running_loop().create_task(
            self._respond(method, self.url.decode("latin-1"), keep_alive)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _respond(self, method: str, target: str, keep_alive: bool) -> None:
        try:
            resp = await handle(self.handlers, method, target)
        except Exception as exc:  # noqa: BLE001 - the admin page reports, never crashes the worker
            log.exception("admin %s failed", target)
            resp = AdminResponse(500, f"{type(exc).__name__}: {exc}\n".encode())
        if self.transport is None or self.transport.is_closing():
            return
        head = b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n" % (
            resp.status,
            reason_phrase(resp.status),
            resp.content_type,
            len(resp.body),
        )
        if not keep_alive:
            head += b"connection: close\r\n"
        self.transport.write(head + b"\r\n" + resp.body)
        if not keep_alive:
            self.transport.close()


async def start_admin(handlers: AdminHandlers, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _AdminProtocol(handlers), host, port)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def label_worker(text: str, worker: str) -> str:
    """Add ``worker="N"`` to every sample line of a Prometheus text (to merge several processes)."""
    out: list[str] = []
    for line in text.splitlines():
        if not line or line.startswith("#") or 'worker="' in line:
            out.append(line)
            continue
        m = _SAMPLE.match(line)
        if m is None:
            out.append(line)
            continue
        name, labels, rest = m.group(1), m.group(2), m.group(3)
        inner = labels[1:-1] if labels else ""
        merged = f'worker="{worker}"' + ("," + inner if inner else "")
        out.append(f"{name}{{{merged}}}{rest}")
    return "\n".join(out) + "\n"


def merge_prometheus(texts: list[str]) -> str:
    """Concatenate expositions, keeping each family's HELP/TYPE once and its samples together."""
    families: dict[str, list[str]] = {}
    meta: dict[str, list[str]] = {}
    order: list[str] = []
    current = ""
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                current = name
                if name not in families:
                    families[name] = []
                    meta[name] = []
                    order.append(name)
                if line not in meta[name]:
                    meta[name].append(line)
                continue
            if line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            name = m.group(1) if m else line.split(" ", 1)[0]
            family = current if current and name.startswith(current) else name
            if family not in families:
                families[family] = []
                meta[family] = []
                order.append(family)
            families[family].append(line)
    out: list[str] = []
    for name in order:
        out.extend(meta[name])
        out.extend(families[name])
    return "\n".join(out) + "\n"
