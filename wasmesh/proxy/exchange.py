"""One HTTP exchange on a downstream connection: the glue between the wire and the filter manager.

``ProxyExchange`` implements ``wasmesh.http.exchange.ExchangeSink`` (what comes out of
the plugin chain goes to the upstream or to the client) and ``UpstreamStream`` (what
the upstream connection reports goes into the chain). Header handling follows Envoy's
HTTP connection manager, applied before the chain runs so plugins see it:

* ``x-forwarded-for``: with ``use_remote_address`` (the default, an edge proxy) the
  client address is appended; otherwise left as received.
* ``x-forwarded-proto``: set to the downstream scheme at the edge, else only if absent.
* ``x-request-id``: generated (UUID4) when absent and ``generate_request_id`` is on.
* ``Host`` becomes ``:authority``; it is sent upstream as Host (after ``host_rewrite``).
* ``Expect: 100-continue`` is answered by the proxy and not forwarded (as Envoy does).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from wasmesh.http.filter import StreamInfo
from wasmesh.http.headers import HeaderMap
from wasmesh.proxy.http1 import (
    CRLF,
    LAST_CHUNK,
    ResponseFraming,
    encode_chunk,
    encode_request_head,
    encode_response_head,
)
from wasmesh.proxy.passthrough import FilterManagerLike, make_filter_manager
from wasmesh.proxy.upstream import PROTOCOL_ERROR, WRITE_HIGH_WATER, UpstreamConnection

if TYPE_CHECKING:
    import asyncio

    from wasmesh.proxy.chain import PluginChain
    from wasmesh.proxy.config import DirectResponse
    from wasmesh.proxy.connection import DownstreamConnection, Listener

log = logging.getLogger("wasmesh.proxy")

PAUSE_FILTER = 1
PAUSE_UPSTREAM = 2

# RFC 9110 section 9.2.2.
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

BUFFER_LIMIT = 1 << 20  # per-filter buffering limit, Envoy's default per_connection_buffer_limit_bytes


class RequestIdGenerator:
    """Random (version 4) UUIDs for ``x-request-id``, as text bytes.

    Like Envoy's RandomGeneratorImpl::uuid, OS randomness is read for many ids at once: one
    getrandom call per 256 requests instead of ``uuid.uuid4()``'s call and UUID object per request.
    """

    __slots__ = ("_hex", "_offset")

    _IDS_PER_READ = 256

    def __init__(self) -> None:
        self._hex = ""
        self._offset = 0

    def forget(self) -> None:
        """Drop the buffered randomness (a forked child must not repeat its parent's ids)."""
        self._hex = ""
        self._offset = 0

    def new_id(self) -> bytes:
        start = self._offset
        if start >= len(self._hex):
            self._hex = os.urandom(16 * self._IDS_PER_READ).hex()
            start = 0
        self._offset = start + 32
        h = self._hex[start : start + 32]
        # Version nibble 4; variant bits 10 (RFC 9562): the 17th hex digit is one of 8, 9, a, b.
        variant = "89ab"[int(h[16], 16) & 3]
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}".encode()


request_ids = RequestIdGenerator()
os.register_at_fork(after_in_child=request_ids.forget)


class ProxyExchange:
    __slots__ = (
        "conn",
        "listener",
        "keep_alive",
        "http10",
        "info",
        "fm",
        "chain",
        "done",
        "deferred",
        "request_received",
        "head_request",
        "upstream",
        "upstream_chunked",
        "pending",
        "pending_bytes",
        "request_sent",
        "upstream_started_ns",
        "upstream_response_started",
        "upstream_complete",
        "response_body_expected",
        "held_response_headers",
        "timer",
        "response_started",
        "response_framing",
        "response_keep_alive",
        "upstream_failed",
        "cluster_name",
        "route_timeout_s",
        "upstream_status",
        "held_body",
        "held_request_body",
        "replay",
        "retried",
        "idempotent",
    )

    def __init__(
        self, conn: DownstreamConnection, listener: Listener, keep_alive: bool, http10: bool
    ) -> None:
        self.conn = conn
        self.listener = listener
        self.keep_alive = keep_alive
        self.http10 = http10
        self.info: StreamInfo | None = None
        self.fm: FilterManagerLike | None = None
        self.chain: PluginChain | None = None
        self.done = False
        # Events recorded while an earlier pipelined exchange is still answering.
        self.deferred: list[tuple[int, object]] | None = None
        self.request_received = False
        self.head_request = False
        self.upstream: UpstreamConnection | None = None
        self.upstream_chunked = False
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.request_sent = False
        self.upstream_started_ns = 0
        self.upstream_response_started = False
        self.upstream_complete = False
        self.upstream_failed = False
        self.response_body_expected = False
        self.held_response_headers: HeaderMap | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.response_started = False
        self.response_framing = ResponseFraming.LENGTH
        self.response_keep_alive = keep_alive
        self.cluster_name: str | None = None
        self.route_timeout_s = 0.0
        self.upstream_status = 0
        # The body bytes of the current read, not yet handed to the chain (see request_body); a
        # bytearray once a read brought more than one piece, so many small chunks join in linear time.
        self.held_body: bytes | bytearray | None = None
        self.held_request_body: bytes | bytearray | None = None
        self.replay: bytes | None = None
        self.retried = False
        self.idempotent = False

    # ------------------------------------------------------------------ downstream events

    def start(self, headers: HeaderMap, end_stream: bool) -> None:
        listener = self.listener
        conn = self.conn
        lstats = listener.stats
        lstats.rq_total += 1
        lstats.rq_active += 1
        cfg = listener.config
        info = StreamInfo(
            connection_id=conn.connection_id,
            downstream_remote_address=conn.peer,
            downstream_local_address=conn.local,
            protocol="HTTP/1.0" if self.http10 else "HTTP/1.1",
            listener_name=cfg.name,
            listener_direction=cfg.direction,
            node=listener.node,
        )
        if conn.tls is not None:
            info.scheme = "https"
            info.tls = conn.tls
        self.info = info
        self.request_received = end_stream
        method = headers.pairs()[2][1]  # RequestParser's order: :authority, :path, :method
        self.head_request = method == b"HEAD"
        self._mutate_request_headers(headers)
        selected = listener.router.select(headers)
        if selected is not None:
            info.virtual_host_name = selected[0].name
            info.route_name = selected[1].name
            info.cluster_name = selected[1].cluster
        chain = listener.chain
        chain.acquire()
        self.chain = chain
        self.fm = fm = make_filter_manager(chain.factories, info, self, BUFFER_LIMIT)
        fm.on_request_headers(headers, end_stream)

    def _mutate_request_headers(self, headers: HeaderMap) -> None:
        cfg = self.listener.config
        pairs = headers.pairs()
        xff_index = xfp_index = -1
        has_request_id = False
        expect_continue = False
        for i, (k, v) in enumerate(pairs):
            if k == b"x-forwarded-for":
                xff_index = i
            elif k == b"x-forwarded-proto":
                xfp_index = i
            elif k == b"x-request-id":
                has_request_id = True
            elif k == b"expect" and v.lower() == b"100-continue":
                expect_continue = True
        if cfg.use_remote_address and self.conn.peer is not None:
            client = self.conn.peer[0].encode()
            if xff_index >= 0:
                pairs[xff_index] = (b"x-forwarded-for", pairs[xff_index][1] + b"," + client)
            else:
                pairs.append((b"x-forwarded-for", client))
            if xfp_index >= 0:
                pairs[xfp_index] = (b"x-forwarded-proto", self.conn.scheme)
            else:
                pairs.append((b"x-forwarded-proto", self.conn.scheme))
        elif xfp_index < 0:
            pairs.append((b"x-forwarded-proto", self.conn.scheme))
        if not has_request_id and cfg.generate_request_id:
            pairs.append((b"x-request-id", request_ids.new_id()))
        if expect_continue:
            headers.remove(b"expect")
            if not self.http10:
                self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # Envoy's HTTP/1 codec framing, which plugins see in on_request_body/on_response_body: the body
    # bytes of one read (however many chunks they hold) are one frame with end_stream=false, and the
    # end of the message is a frame of its own, empty, with end_stream=true (a chunked body ending
    # with its last-chunk alone likewise). A message without a body ends on its headers instead.
    def request_body(self, data: bytes) -> None:
        if self.done or self.fm is None:
            return
        self.held_request_body = _hold(self.held_request_body, data)

    def request_batch_end(self) -> None:
        held, self.held_request_body = self.held_request_body, None
        if held is not None and not self.done and self.fm is not None:
            self.fm.on_request_data(held if isinstance(held, bytes) else bytes(held), False)

    def request_complete(self, had_body: bool, trailers: HeaderMap | None = None) -> None:
        held, self.held_request_body = self.held_request_body, None
        if held is not None and not self.done and self.fm is not None:
            self.fm.on_request_data(held if isinstance(held, bytes) else bytes(held), False)
        # Complete only from the end frame on: a reply sent while the last bytes were still being
        # delivered (a 413 from the buffer limit) closes the connection, as under Envoy.
        self.request_received = True
        if self.done or self.fm is None:
            return
        if trailers is not None:  # a chunked body's trailers end the stream, as in Envoy's codec
            self.fm.on_request_trailers(trailers)
        elif had_body:
            self.fm.on_request_data(b"", True)

    def downstream_reset(self) -> None:
        """The client closed the connection before the exchange ended."""
        if self.done:
            return
        if self.fm is not None:
            try:
                self.fm.on_downstream_reset()
            except Exception:
                log.exception("filter manager failed on downstream reset")
        if self.info is not None and self.info.response_code_details is None:
            self.info.response_code_details = "downstream_remote_disconnect"
        self._finish(keep_alive=False)

    # ------------------------------------------------------------------ ExchangeSink: towards upstream

    def upstream_request_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        if self.done or self.upstream is not None or self.upstream_failed:
            return
        info = self.info
        assert info is not None
        listener = self.listener
        selected = listener.router.select(headers)
        if selected is None:
            info.route_name = None
            self._fail_soon(404, "route_not_found")
            return
        vhost, route = selected
        info.virtual_host_name = vhost.name
        info.route_name = route.name
        rc = route.config
        if rc.direct_response is not None:
            self._direct_response(rc.direct_response)
            return
        cluster = listener.clusters.get(route.cluster or "")
        if cluster is None:
            self._fail_soon(503, "cluster_not_found")
            return
        info.cluster_name = cluster.name
        self.cluster_name = cluster.name
        self.route_timeout_s = route.timeout_s
        if rc.prefix_rewrite is not None:
            headers.set(b":path", route.rewrite_path(headers.get(b":path") or b"/"))
        if rc.host_rewrite is not None:
            headers.set(b":authority", rc.host_rewrite.encode())
        chunked = not end_stream and headers.get(b"content-length") is None
        self.upstream_chunked = chunked
        self.idempotent = headers.get(b":method") in IDEMPOTENT_METHODS
        head = encode_request_head(headers, chunked)
        self.pending = [head]
        self.pending_bytes = len(head)
        self.upstream_started_ns = time.monotonic_ns()
        if end_stream:
            self.request_sent = True
            self._start_timer()
        cluster.acquire(self)

    def upstream_request_data(self, data: bytes, end_stream: bool) -> None:
        if self.done or self.upstream_failed or self.request_sent:
            return
        if self.upstream_chunked:
            piece = encode_chunk(data) if data else b""
            if end_stream:
                piece += LAST_CHUNK
        else:
            piece = data
        if piece:
            self._send_upstream(piece)
        if end_stream:
            self.request_sent = True
            self._start_timer()

    def upstream_request_trailers(self, trailers: HeaderMap) -> None:
        if self.done or self.upstream_failed or self.request_sent:
            return
        if self.upstream_chunked:
            lines = b"".join(b"%b: %b\r\n" % (k, v) for k, v in trailers if k[:1] != b":")
            self._send_upstream(b"0\r\n" + lines + CRLF)
        self.request_sent = True
        self._start_timer()

    def _send_upstream(self, piece: bytes) -> None:
        up = self.upstream
        if up is not None:
            up.write(piece)
            return
        self.pending.append(piece)
        self.pending_bytes += len(piece)
        if self.pending_bytes > WRITE_HIGH_WATER:
            self.conn.pause_reading(PAUSE_UPSTREAM)

    # ------------------------------------------------------------------ UpstreamStream

    def on_upstream_ready(self, conn: UpstreamConnection) -> None:
        if self.done or self.upstream_failed:
            conn.release()  # nothing was written on it yet
            return
        self.upstream = conn
        assert self.info is not None
        self.info.upstream_address = conn.endpoint
        self.info.upstream_local_address = conn.local_address
        if self.head_request:
            conn.expect_no_body()
        pending = self.pending
        self.pending = []
        self.pending_bytes = 0
        payload = pending[0] if len(pending) == 1 else b"".join(pending)
        # A pooled connection the server closed while idle fails before any answer; an idempotent
        # request (RFC 9110 9.2.2: a proxy must not retry others) that went out whole in this one
        # write is sent again on a fresh connection, once. Envoy answers 503 here unless a route
        # retry policy says `reset`; wasmesh retries, as Go's net/http and urllib3 do.
        replayable = conn.reused and self.request_sent and self.idempotent and not self.retried
        self.replay = payload if replayable else None
        conn.write(payload)
        self.conn.resume_reading(PAUSE_UPSTREAM)

    def on_upstream_connect_failure(self, reason: str) -> None:
        if self.done or self.upstream_failed:
            return
        self._upstream_failure(503, f"upstream_reset_before_response_started{{{reason}}}")

    def on_upstream_reset(self, reason: str) -> None:
        self.upstream = None
        if self.done or self.upstream_failed or self.upstream_complete:
            return
        protocol_error = reason == PROTOCOL_ERROR
        if (
            not self.upstream_response_started
            and self.replay is not None
            and self.cluster_name is not None
            and not protocol_error  # the server answered, badly: asking again would repeat the request
        ):
            cluster = self.listener.clusters.get(self.cluster_name)
            if cluster is not None:
                self.retried = True
                self.pending, self.pending_bytes, self.replay = [self.replay], len(self.replay), None
                cluster.acquire(self, fresh=True)
                return
        self._cluster_stats_reset()
        if not self.upstream_response_started:
            # Envoy answers a response it cannot parse (or one over the header limits) with 502.
            status = 502 if protocol_error else 503
            self._upstream_failure(status, f"upstream_reset_before_response_started{{{reason}}}")
        else:
            self.reset(f"upstream_reset_after_response_started{{{reason}}}")

    def on_upstream_writable(self, writable: bool) -> None:
        if writable:
            self.conn.resume_reading(PAUSE_UPSTREAM)
        else:
            self.conn.pause_reading(PAUSE_UPSTREAM)

    def on_response_headers(self, headers: HeaderMap, end_stream: bool, keep_alive: bool) -> None:
        self.upstream_response_started = True
        self.upstream_status = _status_of(headers)
        if self.done or self.fm is None:
            return
        self.response_body_expected = not end_stream
        if end_stream:
            # Delivered at on_response_complete, once the connection is back in the pool.
            self.held_response_headers = headers
            return
        self.fm.on_response_headers(headers, False)

    def on_response_body(self, data: bytes) -> None:
        # Framed as request bodies are (see request_body): one frame per read, then an empty end.
        if self.done or self.fm is None:
            return
        self.held_body = _hold(self.held_body, data)

    def on_response_batch_end(self) -> None:
        held, self.held_body = self.held_body, None
        if held is not None and not self.done and self.fm is not None:
            self.fm.on_response_data(held if isinstance(held, bytes) else bytes(held), False)

    def on_response_complete(self) -> None:
        trailers = self.upstream.parser.trailers if self.upstream is not None else None
        self._upstream_done(clean=True)
        held, self.held_body = self.held_body, None
        if self.done or self.fm is None:
            return
        held_headers = self.held_response_headers
        if held_headers is not None:
            self.held_response_headers = None
            self.fm.on_response_headers(held_headers, True)
        elif trailers is not None:  # a chunked body's trailers end the stream, as in Envoy's codec
            if held is not None:
                self.fm.on_response_data(held if isinstance(held, bytes) else bytes(held), False)
                if self.done or self.fm is None:
                    return
            self.fm.on_response_trailers(trailers)
        elif self.response_body_expected:
            if held is not None:
                self.fm.on_response_data(held if isinstance(held, bytes) else bytes(held), False)
                if self.done or self.fm is None:
                    return
            self.fm.on_response_data(b"", True)

    # ------------------------------------------------------------------ ExchangeSink: towards downstream

    def downstream_response_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        if self.done or self.response_started:
            return
        self.response_started = True
        info = self.info
        assert info is not None
        status_raw = headers.get(b":status") or b"200"
        try:
            info.response_code = int(status_raw)
        except ValueError:
            info.response_code = 502
        # A response that starts before the request was read whole (a local reply to a POST from
        # on_request_headers, a 413) closes the connection, as Envoy's HTTP/1 codec does: the unread
        # rest of the request must never be parsed as a next request.
        keep_alive = self.keep_alive and self.request_received and not self.conn.draining
        head, framing, keep_alive = encode_response_head(
            headers,
            end_stream=end_stream,
            keep_alive=keep_alive,
            http10=self.http10,
            head_request=self.head_request,
        )
        self.response_framing = framing
        self.response_keep_alive = keep_alive
        self.conn.write(head)
        if end_stream:
            self._finish(keep_alive)

    def downstream_response_data(self, data: bytes, end_stream: bool) -> None:
        if self.done or not self.response_started:
            return
        if data:
            if not self.head_request:
                if self.response_framing == ResponseFraming.CHUNKED:
                    self.conn.write(encode_chunk(data))
                else:
                    self.conn.write(data)
        if end_stream:
            if self.response_framing == ResponseFraming.CHUNKED and not self.head_request:
                self.conn.write(LAST_CHUNK)
            self._finish(self.response_keep_alive and self.response_framing != ResponseFraming.CLOSE)

    def downstream_response_trailers(self, trailers: HeaderMap) -> None:
        if self.done or not self.response_started:
            return
        if self.response_framing == ResponseFraming.CHUNKED and not self.head_request:
            lines = b"".join(b"%b: %b\r\n" % (k, v) for k, v in trailers if k[:1] != b":")
            self.conn.write(b"0\r\n" + lines + CRLF)
        self._finish(self.response_keep_alive and self.response_framing != ResponseFraming.CLOSE)

    def reset(self, details: str) -> None:
        if self.done:
            return
        if self.info is not None:
            self.info.response_code_details = details
        self._upstream_done(clean=False)
        self.conn.abort()
        self._finish(keep_alive=False)

    def pause_request_source(self) -> None:
        self.conn.pause_reading(PAUSE_FILTER)

    def resume_request_source(self) -> None:
        self.conn.resume_reading(PAUSE_FILTER)

    # ------------------------------------------------------------------ internals

    def _direct_response(self, direct: DirectResponse) -> None:
        body = direct.body.encode()
        pairs = [(b":status", b"%d" % direct.status), (b"content-length", b"%d" % len(body))]
        if body:
            pairs.append((b"content-type", b"text/plain"))
        fm = self.fm
        assert fm is not None
        self.upstream_complete = True
        self.upstream_response_started = True
        fm.on_response_headers(HeaderMap.from_lowercase(pairs), not body)
        if body and not self.done:
            fm.on_response_data(body, True)

    def _fail_soon(self, status: int, details: str) -> None:
        # Not re-entering the filter manager from inside its own sink call.
        self.upstream_failed = True
        self.conn.loop.call_soon(self._deliver_failure, status, details)

    def _deliver_failure(self, status: int, details: str) -> None:
        if self.done or self.fm is None:
            return
        if self.info is not None:
            self.info.response_code_details = details
        try:
            self.fm.on_upstream_failure(status, details)
        except Exception:
            log.exception("filter manager failed delivering an upstream failure")
            self.reset("filter_manager_error")

    def _upstream_failure(self, status: int, details: str) -> None:
        self.upstream_failed = True
        self._upstream_done(clean=False)
        if self.cluster_name is not None and status == 503:
            stats = self.listener.proxy_stats.cluster(self.cluster_name)
            stats.rq_by_class[5] += 1
        self._deliver_failure(status, details)

    def _start_timer(self) -> None:
        if self.route_timeout_s > 0 and self.timer is None and not self.upstream_complete:
            self.timer = self.conn.loop.call_later(self.route_timeout_s, self._on_timeout)

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done or self.upstream_complete:
            return
        if self.cluster_name is not None:
            self.listener.proxy_stats.cluster(self.cluster_name).rq_timeout += 1
        if not self.upstream_response_started:
            self._upstream_failure(504, "upstream_response_timeout")
        else:
            self.reset("upstream_response_timeout")

    def _cluster_stats_reset(self) -> None:
        if self.cluster_name is not None:
            self.listener.proxy_stats.cluster(self.cluster_name).rq_reset += 1

    def _upstream_done(self, clean: bool) -> None:
        """The upstream side of this exchange is over: pool or close the connection."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.upstream_complete:
            return
        self.upstream_complete = True
        up = self.upstream
        self.upstream = None
        if clean and self.cluster_name is not None and self.upstream_started_ns:
            stats = self.listener.proxy_stats.cluster(self.cluster_name)
            if self.upstream_status:
                stats.rq_by_class[min(self.upstream_status // 100, 5)] += 1
            stats.rq_time.observe((time.monotonic_ns() - self.upstream_started_ns) / 1e6)
        if up is None:
            return
        if clean and self.request_sent:
            up.release()
        else:
            up.close()

    def _finish(self, keep_alive: bool) -> None:
        if self.done:
            return
        self.done = True
        if not self.upstream_complete:
            self._upstream_done(clean=False)
        info = self.info
        lstats = self.listener.stats
        lstats.rq_active -= 1
        code = info.response_code if info is not None and info.response_code else 0
        lstats.rq_by_class[min(code // 100, 5)] += 1
        if info is not None:
            lstats.rq_time.observe((time.monotonic_ns() - info.start_monotonic_ns) / 1e6)
        fm, self.fm = self.fm, None  # also breaks the exchange <-> filter manager reference cycle
        if fm is not None:
            # The response is complete: send it before the plugins' on_log/on_done/on_delete run,
            # so their work is not added to the client's latency.
            self.conn.flush()
            try:
                fm.complete()
            except Exception:
                log.exception("filter manager failed completing an exchange")
        if self.chain is not None:
            self.chain.release()
            self.chain = None
        self.conn.exchange_done(self, keep_alive and self.request_received)


def _hold(held: bytes | bytearray | None, data: bytes) -> bytes | bytearray:
    """``held`` with ``data`` appended: the first piece as is, later ones into one bytearray."""
    if held is None:
        return data
    if type(held) is bytearray:
        held += data
        return held
    return bytearray(held) + data


def _status_of(headers: HeaderMap) -> int:
    raw = headers.get(b":status")
    try:
        return int(raw) if raw else 0
    except ValueError:
        return 0
