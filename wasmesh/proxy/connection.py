"""Listeners and downstream HTTP/1.1 connections (asyncio.Protocol + httptools).

A connection parses requests into ``ProxyExchange``s. HTTP/1.1 pipelining is
honoured: a request that arrives while an earlier one is still being answered is
recorded and replayed once the earlier response is done (reading pauses meanwhile).
Malformed input gets a 400 and the connection closes; the worker lives on. Garbage behind a
complete request waits until that request is answered (as Envoy does: the 200, then the 400).

Each listener bounds its connections (``max_connections``: more are closed at once) and sweeps
them a few times per timeout: a head that takes longer than ``request_headers_timeout`` gets a
408, a connection without a request for ``idle_timeout`` is closed. The sweep polls counters the
connection keeps anyway, so requests pay no timer of their own.

A listener with ``tls`` terminates TLS (1.2+, HTTP/1.1 only): the handshake completes before
``connection_made``, which records the session once as a ``TlsInfo`` for every exchange of the
connection; plaintext connections do no TLS work at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import ssl
from collections import deque
from typing import Any, cast

from wasmesh.http.filter import TlsInfo
from wasmesh.http.headers import HeaderMap
from wasmesh.proxy.chain import PluginChain
from wasmesh.proxy.config import ListenerConfig, certificate_names
from wasmesh.proxy.exchange import ProxyExchange
from wasmesh.proxy.http1 import BadMessage, RequestParser, bare_response, reason_phrase, simple_response
from wasmesh.proxy.router import Router
from wasmesh.proxy.stats import ListenerStats, ProxyStats
from wasmesh.proxy.upstream import WRITE_HIGH_WATER, ClusterManager

log = logging.getLogger("wasmesh.proxy")

PAUSE_PIPELINE = 4
PAUSE_PROTOCOL_ERROR = 8  # garbage behind a request: nothing more is read while it is answered

_EV_HEADERS, _EV_BODY, _EV_COMPLETE = 0, 1, 2

_connection_ids = itertools.count(1)


class Listener:
    """One listening socket with its routes and its current plugin chain."""

    def __init__(
        self,
        config: ListenerConfig,
        clusters: ClusterManager,
        proxy_stats: ProxyStats,
        node: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.config = config
        self.name = config.name
        self.router = Router(config.virtual_hosts)
        self.clusters = clusters
        self.proxy_stats = proxy_stats
        self.stats: ListenerStats = proxy_stats.listener(config.name)
        self.node = node
        self.loop = loop
        self.chain = PluginChain()
        self.server: asyncio.Server | None = None
        self.connections: set[DownstreamConnection] = set()
        self.draining = False
        self.scheme = b"https" if config.tls is not None else b"http"
        # The context new handshakes use; a reload swaps in a new one (renewed certificate).
        self.tls_context: ssl.SSLContext | None = config.tls.context if config.tls is not None else None
        self.cx_overflow = 0  # connections closed at once: max_connections was reached
        self._sweeper: asyncio.TimerHandle | None = None
        self._accepting = False  # the sweep ends once this is false and no connection is left

    def swap_chain(self, chain: PluginChain) -> PluginChain:
        """Install ``chain`` for new exchanges; the old one is retired (freed once its exchanges end)."""
        old, self.chain = self.chain, chain
        old.retire()
        return old

    def update_routes(self, config: ListenerConfig) -> None:
        """New routes, limits and TLS certificates; the TLS mode itself only changes with a restart."""
        self.config = config  # new connections take its limits; the sweep its timeouts
        self.router = Router(config.virtual_hosts)
        if config.tls is not None and self.tls_context is not None:
            self.tls_context = config.tls.context
        interval = self._sweep_interval()
        if self._sweeper is None and self._accepting and interval is not None:
            self._sweeper = self.loop.call_later(interval, self._sweep)

    def _on_client_hello(
        self, ssl_object: ssl.SSLObject, server_name: str | None, initial: ssl.SSLContext
    ) -> None:
        """SNI callback (runs for every ClientHello): remember the name, use the newest context."""
        setattr(ssl_object, _SNI_ATTRIBUTE, server_name or "")
        current = self.tls_context
        if current is not None and current is not initial:
            ssl_object.context = current

    def _sweep_interval(self) -> float | None:
        timeouts = [t for t in (self.config.request_headers_timeout_s, self.config.idle_timeout_s) if t > 0]
        if not timeouts:
            return None
        return min(max(min(timeouts) / 4, 0.05), 1.0)

    def _sweep(self) -> None:
        """Close connections past request_headers_timeout (408) or idle_timeout (closed)."""
        self._sweeper = None
        now = self.loop.time()
        config = self.config
        for c in list(self.connections):
            c.check_timeouts(now, config.request_headers_timeout_s, config.idle_timeout_s)
        interval = self._sweep_interval()
        if interval is not None and (self._accepting or self.connections):
            self._sweeper = self.loop.call_later(interval, self._sweep)

    async def start(self, reuse_port: bool = False, sock: Any = None) -> None:
        server_ssl = self.tls_context
        if server_ssl is not None:
            server_ssl.sni_callback = self._on_client_hello
        if sock is not None:
            self.server = await self.loop.create_server(
                lambda: DownstreamConnection(self), sock=sock, backlog=2048, ssl=server_ssl
            )
        else:
            self.server = await self.loop.create_server(
                lambda: DownstreamConnection(self),
                self.config.address,
                self.config.port,
                reuse_port=reuse_port or None,
                backlog=2048,
                ssl=server_ssl,
            )
        self._accepting = True
        interval = self._sweep_interval()
        if interval is not None:
            self._sweeper = self.loop.call_later(interval, self._sweep)

    @property
    def bound_address(self) -> tuple[str, int]:
        assert self.server is not None and self.server.sockets
        name = self.server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    def stop_accepting(self) -> None:
        self._accepting = False
        if self.server is not None:
            self.server.close()

    def start_draining(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones after their current response."""
        self.draining = True
        for c in list(self.connections):
            c.close_if_idle()


_SNI_ATTRIBUTE = "wasmesh_requested_server_name"


def tls_info(ssl_object: Any, config: ListenerConfig) -> TlsInfo:
    """The session facts plugins read (connection.* attributes), from a completed handshake."""
    peer_der = ssl_object.getpeercert(binary_form=True)
    peer = certificate_names(ssl_object.getpeercert() or {}) if peer_der else None
    local = config.tls.local if config.tls is not None else None
    return TlsInfo(
        version=str(ssl_object.version() or ""),
        requested_server_name=str(getattr(ssl_object, _SNI_ATTRIBUTE, "")),
        peer_certificate_presented=peer_der is not None,
        subject_peer_certificate=peer.subject if peer else "",
        uri_san_peer_certificate=peer.uri_sans if peer else (),
        dns_san_peer_certificate=peer.dns_sans if peer else (),
        sha256_peer_certificate_digest=hashlib.sha256(peer_der).hexdigest() if peer_der else "",
        subject_local_certificate=local.subject if local else "",
        uri_san_local_certificate=local.uri_sans if local else (),
        dns_san_local_certificate=local.dns_sans if local else (),
    )


class DownstreamConnection(asyncio.Protocol):
    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.connection_id = next(_connection_ids)
        self.transport: asyncio.Transport | None = None
        config = listener.config
        self.parser = RequestParser(
            self,
            listener.scheme,
            config.max_request_headers_kb * 1024,
            config.max_headers_count,
            config.accept_http_10,
        )
        self.scheme = listener.scheme
        self.tls: TlsInfo | None = None
        self.peer: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.current: ProxyExchange | None = None  # the exchange whose response is being written
        self.receiving: ProxyExchange | None = None  # the exchange whose request is being parsed
        self.queue: deque[ProxyExchange] = deque()
        self._paused = 0
        self._closing = False
        self._writing_paused = False
        # Writes made during one loop iteration go out as one send (response head + body, 100-continue...).
        self._out: list[bytes] | None = None
        self._accepted = False  # counted in the listener's stats (not closed for max_connections)
        # Malformed bytes behind complete requests: answered (status, message) once they are.
        self._deferred_error: BadMessage | None = None
        # What the timeout sweep last saw: a head (by number) or an idle spell (by exchanges done).
        self.exchanges_done = 0
        self._watched: tuple[bool, int] = (False, -1)
        self._watched_since = 0.0

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = transport
        limit = self.listener.config.max_connections
        if limit and len(self.listener.connections) >= limit:
            # Over the listener's limit: closed before a byte is read, as Envoy's connection limit does.
            self.listener.cx_overflow += 1
            self._closing = True
            transport.close()
            return
        self._accepted = True
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = (str(peer[0]), int(peer[1]))
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            self.local = (str(local[0]), int(local[1]))
        if self.listener.tls_context is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.tls = tls_info(ssl_object, self.listener.config)
        stats = self.listener.stats
        stats.cx_total += 1
        stats.cx_active += 1
        self.listener.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._deferred_error is not None:
            return
        try:
            self.parser.feed(data)
        except BadMessage as exc:
            receiving = self.receiving
            if self.current is not None and (receiving is None or receiving.request_received):
                # Garbage after whole requests: they are answered first, then the error (Envoy's order).
                self._deferred_error = exc
                self.pause_reading(PAUSE_PROTOCOL_ERROR)
                return
            self._protocol_error(exc)
            return
        ex = self.receiving
        if ex is not None and ex.deferred is None:
            self._guard(ex, ex.request_batch_end)

    def eof_received(self) -> bool | None:
        # Like Envoy's HTTP/1 codec, a client half-close ends the connection (and resets its exchanges).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.transport = None
        if not self._accepted:
            return
        self.listener.connections.discard(self)
        self.listener.stats.cx_active -= 1
        pending = [e for e in (self.current, *self.queue, self.receiving) if e is not None]
        self.current = self.receiving = None
        self.queue.clear()
        seen: set[int] = set()
        for ex in pending:
            if id(ex) in seen:
                continue
            seen.add(id(ex))
            ex.downstream_reset()

    def pause_writing(self) -> None:
        self._writing_paused = True
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()

    # ------------------------------------------------------------------ RequestHandler (parser events)

    def on_request_headers(
        self, headers: HeaderMap, end_stream: bool, keep_alive: bool, http10: bool
    ) -> None:
        if self._closing:
            # The rest of a read after a response that closes the connection (a local reply before
            # the request body was read): never served, as Envoy never parses it.
            return
        ex = ProxyExchange(self, self.listener, keep_alive, http10)
        self.receiving = ex
        if self.current is None:
            self.current = ex
            self._guard(ex, ex.start, headers, end_stream)
        else:
            ex.deferred = [(_EV_HEADERS, (headers, end_stream))]
            self.queue.append(ex)
            self.pause_reading(PAUSE_PIPELINE)

    def on_request_body(self, data: bytes) -> None:
        ex = self.receiving
        if ex is None:
            return
        if ex.deferred is not None:
            ex.deferred.append((_EV_BODY, data))
        else:
            self._guard(ex, ex.request_body, data)

    def on_request_complete(self, had_body: bool) -> None:
        ex = self.receiving
        if ex is None:
            return
        trailers = self.parser.trailers
        if ex.deferred is not None:
            ex.deferred.append((_EV_COMPLETE, (had_body, trailers)))
        else:
            self._guard(ex, ex.request_complete, had_body, trailers)

    def _guard(self, ex: ProxyExchange, fn: Any, *args: Any) -> None:
        """Run an exchange step; a bug there resets that exchange instead of reading as malformed HTTP."""
        try:
            fn(*args)
        except Exception:
            log.exception("listener %s: exchange failed", self.listener.name)
            ex.reset("internal_error")

    # ------------------------------------------------------------------ used by exchanges

    @property
    def draining(self) -> bool:
        return self.listener.draining

    def write(self, data: bytes) -> None:
        if self.transport is None or self._closing:
            return
        if self._out is None:
            self._out = [data]
            self.loop.call_soon(self._flush)
        else:
            self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def flush(self) -> None:
        """Hand what this event queued to the socket now (the scheduled flush then finds nothing)."""
        if self._out is not None:
            self._flush()

    def abort(self) -> None:
        self._closing = True
        self._out = None
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.resume_reading()

    def exchange_done(self, ex: ProxyExchange, keep_alive: bool) -> None:
        if ex is not self.current:
            return  # a queued exchange reset along with the connection
        self.current = None
        self.exchanges_done += 1
        if self.receiving is ex and ex.request_received:
            self.receiving = None
        if not keep_alive or self._closing:
            self._close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.current = nxt
            events, nxt.deferred = nxt.deferred or [], None
            for kind, payload in events:
                if nxt.done:
                    break
                if kind == _EV_HEADERS:
                    assert isinstance(payload, tuple)
                    self._guard(nxt, nxt.start, payload[0], payload[1])
                elif kind == _EV_BODY:
                    self._guard(nxt, nxt.request_body, payload)
                else:
                    assert isinstance(payload, tuple)
                    self._guard(nxt, nxt.request_complete, payload[0], payload[1])
        if not self.queue:
            self.resume_reading(PAUSE_PIPELINE)
        if self.current is None and self._deferred_error is not None:
            self._protocol_error(self._deferred_error)
        elif self.current is None and self.listener.draining:
            self._close()

    def check_timeouts(self, now: float, headers_timeout_s: float, idle_timeout_s: float) -> None:
        """The listener's sweep: 408 for a head slower than ``headers_timeout_s``; close a
        connection idle for ``idle_timeout_s`` (0 disables either)."""
        if self._closing:
            return
        parser = self.parser
        if parser.in_head:
            watched, timeout = (True, parser.messages_begun), headers_timeout_s
        elif self.current is None and self.receiving is None:
            watched, timeout = (False, self.exchanges_done), idle_timeout_s
        else:
            self._watched = (False, -1)  # an exchange is running: neither timeout applies
            return
        if watched != self._watched:
            self._watched, self._watched_since = watched, now
            return
        if timeout <= 0 or now - self._watched_since < timeout:
            return
        if watched[0]:
            log.debug("listener %s: request headers timeout for %s", self.listener.name, self.peer)
            self._reply_and_close(408, body=b"request header timeout")  # Envoy's words
        else:
            log.debug("listener %s: idle timeout for %s", self.listener.name, self.peer)
            self._close()

    def close_if_idle(self) -> None:
        if self.current is None and self.receiving is None:
            self._close()

    def _close(self) -> None:
        self._flush()
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def _protocol_error(self, error: BadMessage) -> None:
        self.listener.stats.cx_protocol_error += 1
        log.debug("listener %s: %s from %s", self.listener.name, error, self.peer)
        self._reply_and_close(error.status, bare=error.bare)

    def _reply_and_close(self, status: int, *, bare: bool = False, body: bytes | None = None) -> None:
        """Answer ``status`` (unless a response is already under way) and close."""
        ex = self.current
        respond = ex is None or not ex.response_started
        if ex is not None:
            ex.keep_alive = False
        if respond and self.transport is not None:
            if bare:
                self.write(bare_response(status))
            else:
                self.write(simple_response(status, reason_phrase(status) if body is None else body))
        self._close()
