"""Clusters of static endpoints: round-robin, keep-alive connection pools, connect timeouts.

A stream asks its cluster for a connection with ``Cluster.acquire(stream)``; the
stream gets ``on_upstream_ready(conn)`` (possibly synchronously, from an idle
connection) or ``on_upstream_connect_failure(reason)``. When the response ended
cleanly the stream hands the connection back with ``conn.release()``; otherwise
``conn.close()``. Everything is callback-driven on the loop: no task per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Protocol, cast

from wasmesh.http.headers import HeaderMap
from wasmesh.proxy.config import ClusterConfig
from wasmesh.proxy.http1 import BadMessage, ResponseParser

log = logging.getLogger("wasmesh.proxy.upstream")

WRITE_HIGH_WATER = 64 * 1024
PROTOCOL_ERROR = "protocol_error"  # on_upstream_reset's reason for a malformed or oversized response


class UpstreamStream(Protocol):
    """The user of one upstream connection for one request (the proxy's exchange or an http_call)."""

    def on_upstream_ready(self, conn: UpstreamConnection) -> None: ...

    def on_upstream_connect_failure(self, reason: str) -> None:
        """``reason`` is ``connection_refused``, ``connect_timeout`` or ``connection_failure``."""

    def on_response_headers(self, headers: HeaderMap, end_stream: bool, keep_alive: bool) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_complete(self) -> None: ...

    def on_response_batch_end(self) -> None:
        """Everything the last read carried has been reported (a held body chunk can go on now)."""

    def on_upstream_reset(self, reason: str) -> None:
        """The connection failed while this stream used it (``connection_termination``, or
        ``PROTOCOL_ERROR`` for a malformed response or one over the cluster's header limits)."""

    def on_upstream_writable(self, writable: bool) -> None:
        """The connection's write buffer crossed the high (False) or low (True) water mark."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "cluster",
        "endpoint",
        "transport",
        "parser",
        "stream",
        "closed",
        "last_used",
        "local_address",
        "reusable",
        "reused",
    )

    def __init__(self, cluster: Cluster, endpoint: tuple[str, int]) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        limits = cluster.config
        self.parser = ResponseParser(self, limits.max_response_headers_kb * 1024, limits.max_headers_count)
        self.stream: UpstreamStream | None = None
        self.closed = False
        self.last_used = 0.0
        self.local_address: tuple[str, int] | None = None
        self.reusable = True  # false once a response said "connection: close" (or HTTP/1.0)
        self.reused = False  # taken from the idle pool (the server may have closed it meanwhile)

    # asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple):
            self.local_address = (str(sockname[0]), int(sockname[1]))

    def data_received(self, data: bytes) -> None:
        if self.stream is None:
            # Bytes on an idle connection: the server is misbehaving; drop the connection.
            self.close()
            return
        stream = self.stream
        try:
            self.parser.feed(data)
        except BadMessage as exc:
            # Never forwarded: the stream answers 502 with Envoy's "reset reason: protocol error".
            log.debug("cluster %s: %s from %s:%d", self.cluster.name, exc, *self.endpoint)
            self.close()
            stream.on_upstream_reset(PROTOCOL_ERROR)
            return
        stream.on_response_batch_end()

    def eof_received(self) -> bool | None:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self.transport = None
        self.cluster._forget(self)
        stream = self.stream
        if stream is None or was_closed:
            return
        if self.parser.connection_closed():
            return  # EOF ended a close-delimited body; on_response_complete already ran
        self.stream = None
        stream.on_upstream_reset("connection_termination")

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.on_upstream_writable(False)

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.on_upstream_writable(True)

    # parser events, forwarded to the current stream ---------------------------------
    def on_response_headers(self, headers: HeaderMap, end_stream: bool, keep_alive: bool) -> None:
        self.reusable = keep_alive
        if self.stream is not None:
            self.stream.on_response_headers(headers, end_stream, keep_alive)

    def on_response_body(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.on_response_body(data)

    def on_response_complete(self) -> None:
        if self.stream is not None:
            self.stream.on_response_complete()

    # used by streams ---------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def expect_no_body(self) -> None:
        self.parser.expect_no_body()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def release(self) -> None:
        """The exchange ended cleanly and the connection may carry another request."""
        self.stream = None
        if self.closed or self.transport is None:
            return
        if not self.reusable or not self.parser.next_response():
            self.close()
            return
        self.transport.resume_reading()
        self.last_used = time.monotonic()
        self.cluster._give_back(self)

    def close(self) -> None:
        self.stream = None
        if not self.closed:
            self.closed = True
            self.cluster._forget(self)
            if self.transport is not None:
                self.transport.close()


class ClusterStats:
    __slots__ = ("cx_total", "cx_connect_fail", "cx_connect_timeout", "cx_active", "rq_total")

    def __init__(self) -> None:
        self.cx_total = 0
        self.cx_connect_fail = 0
        self.cx_connect_timeout = 0
        self.cx_active = 0
        self.rq_total = 0


class Cluster:
    def __init__(self, config: ClusterConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.name = config.name
        self._loop = loop
        self._endpoints = config.endpoints
        self._next = 0
        self._idle: dict[tuple[str, int], deque[UpstreamConnection]] = {e: deque() for e in config.endpoints}
        self._all: set[UpstreamConnection] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self.stats = ClusterStats()
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        if config.idle_timeout_s > 0:
            self._sweeper = loop.call_later(max(config.idle_timeout_s / 2, 0.5), self._sweep_idle)

    def acquire(self, stream: UpstreamStream, *, fresh: bool = False) -> None:
        """Give ``stream`` a connection to the next endpoint (round-robin), reused when idle
        unless ``fresh`` (a retry after a pooled connection turned out to be closed)."""
        endpoint = self._endpoints[self._next]
        self._next = (self._next + 1) % len(self._endpoints)
        self.stats.rq_total += 1
        idle = self._idle.get(endpoint)
        while idle and not fresh:
            conn = idle.pop()  # most recently used first: warm and least likely closed by the server
            if not conn.closed:
                conn.reused = True
                conn.stream = stream
                stream.on_upstream_ready(conn)
                return
        task = self._loop.create_task(self._connect(endpoint, stream))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, endpoint: tuple[str, int], stream: UpstreamStream) -> None:
        conn = UpstreamConnection(self, endpoint)
        self.stats.cx_total += 1
        try:
            async with asyncio.timeout(self.config.connect_timeout_s or None):
                await self._loop.create_connection(lambda: conn, endpoint[0], endpoint[1])
        except TimeoutError:
            self.stats.cx_connect_timeout += 1
            self.stats.cx_connect_fail += 1
            stream.on_upstream_connect_failure("connect_timeout")
            return
        except ConnectionRefusedError:
            self.stats.cx_connect_fail += 1
            stream.on_upstream_connect_failure("connection_refused")
            return
        except OSError as exc:
            self.stats.cx_connect_fail += 1
            log.debug("cluster %s: connect to %s:%d failed: %s", self.name, endpoint[0], endpoint[1], exc)
            stream.on_upstream_connect_failure("connection_failure")
            return
        if self._closed:
            conn.close()
            stream.on_upstream_connect_failure("connection_failure")
            return
        self._all.add(conn)
        self.stats.cx_active = len(self._all)
        conn.stream = stream
        stream.on_upstream_ready(conn)

    def _give_back(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.endpoint)
        if idle is None or self._closed or len(idle) >= self.config.max_idle_per_endpoint:
            conn.close()
            return
        idle.append(conn)

    def _forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.endpoint)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self.stats.cx_active = len(self._all)

    def _sweep_idle(self) -> None:
        now = time.monotonic()
        limit = self.config.idle_timeout_s
        for idle in self._idle.values():
            while idle and now - idle[0].last_used > limit:
                idle.popleft().close()
        if not self._closed:
            self._sweeper = self._loop.call_later(max(limit / 2, 0.5), self._sweep_idle)

    def idle_count(self) -> int:
        return sum(len(d) for d in self._idle.values())

    def close(self) -> None:
        """Close idle connections now; busy ones close when their stream ends."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


class ClusterManager:
    """The named clusters of one worker. ``update`` swaps in new definitions on reload."""

    def __init__(self, configs: tuple[ClusterConfig, ...], loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.clusters: dict[str, Cluster] = {c.name: Cluster(c, loop) for c in configs}

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def update(self, configs: tuple[ClusterConfig, ...]) -> None:
        """Keep clusters whose config is unchanged (and their warm pools); replace the others."""
        new: dict[str, Cluster] = {}
        for c in configs:
            old = self.clusters.get(c.name)
            new[c.name] = old if old is not None and old.config == c else Cluster(c, self._loop)
        for name, old in self.clusters.items():
            if new.get(name) is not old:
                old.close()
        self.clusters = new

    def close(self) -> None:
        for c in self.clusters.values():
            c.close()
