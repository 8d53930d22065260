"""State-of-the-world ADS server on grpc.aio (Envoy's AggregatedDiscoveryService).

Per connection it tracks, for every type URL the proxy watches, the subscribed names, the last
version and nonce sent, the last version ACKed and the last NACK — the same bookkeeping as istiod's
`WatchedResource`. Config changes are debounced (100 ms quiet period, 10 s max, like
PILOT_DEBOUNCE_AFTER/PILOT_DEBOUNCE_MAX) and a push only sends a type to a proxy whose resources for
it actually changed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from wasmesh.xds import types
from wasmesh.xds.metrics import XdsMetrics
from wasmesh.xds.snapshot import ProxyNode, Snapshot, SnapshotGenerator

log = logging.getLogger("wasmesh.xds")

# Checks a stream's claimed node against the caller's verified identity (see AdsServer).
Authenticator = Callable[[ProxyNode, "grpc.aio.ServicerContext[Any, Any]"], ProxyNode]

DEFAULT_DEBOUNCE_AFTER = 0.1
DEFAULT_DEBOUNCE_MAX = 10.0

# error_detail.code of a fetch-failure report: `wasmesh agent` sends it upstream, in place of Envoy's
# ACK, for a response in which it replaced modules it could not fetch by the RBAC fallback. Envoy runs
# that response (so it counts as ACKed, not as a reject); the resources the message names are marked
# FETCH_FAILED. Envoy's own NACKs carry 13 (INTERNAL); 14 is google.rpc.Code.UNAVAILABLE.
FETCH_FAILURE_CODE = 14

# Per-resource states (see AdsServer.resource_state).
ACK = "ACK"
NACK = "NACK"
FETCH_FAILED = "FETCH_FAILED"
PENDING = "PENDING"


@dataclass(frozen=True)
class ResourceReport:
    """The last NACK or fetch failure reported for one resource, for the content it was sent with."""

    digest: bytes
    state: str  # NACK | FETCH_FAILED
    message: str


@dataclass(frozen=True)
class ResourceState:
    state: str  # ACK | NACK | FETCH_FAILED | PENDING
    error: str = ""  # the last NACK/fetch failure message for this resource ("" when none)


def _mentions(message: str, name: str) -> bool:
    """Whether an error message names the resource: its full name, or (ECDS) its PluginConfig name.

    istiod's ECDS names are `extensions.istio.io/wasmplugin/<ns>.<name>`; Envoy's and the proxies'
    messages name either that or the PluginConfig name `<ns>.<name>`."""
    short = name.rsplit("/", 1)[-1]
    return any(
        re.search(rf"(?<![\w./-]){re.escape(candidate)}(?![\w-])", message) is not None
        for candidate in {name, short}
    )


def _parts_naming(message: str, name: str) -> str:
    """The `; `-separated parts of a report that name the resource (the whole message when none do)."""
    parts = [part for part in message.split("; ") if _mentions(part, name)]
    return "; ".join(parts) if parts else message


@dataclass
class WatchedResource:
    type_url: str
    names: set[str] | None  # None: wildcard
    nonce_sent: str = ""
    version_sent: str = ""
    version_acked: str = ""
    last_error: str = ""
    # When the config change that triggered the unacknowledged push happened (for convergence time).
    push_started: float | None = None
    # Content digests per resource name: of the last response sent, and of the last one ACKed.
    sent_digests: dict[str, bytes] = field(default_factory=dict)
    acked_digests: dict[str, bytes] = field(default_factory=dict)
    # The last NACK / fetch failure per resource name (cleared when that resource is ACKed).
    reports: dict[str, ResourceReport] = field(default_factory=dict)


@dataclass
class Connection:
    conn_id: str
    proxy: ProxyNode
    peer: str
    outbox: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = field(default_factory=asyncio.Queue)
    watched: dict[str, WatchedResource] = field(default_factory=dict)
    nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    connected_at: float = field(default_factory=time.time)
    warnings_logged: set[str] = field(default_factory=set)


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serve `generator`'s snapshots over ADS; call `config_changed()` after every config update."""

    def __init__(
        self,
        generator: SnapshotGenerator,
        metrics: XdsMetrics | None = None,
        *,
        debounce_after: float = DEFAULT_DEBOUNCE_AFTER,
        debounce_max: float = DEFAULT_DEBOUNCE_MAX,
        proxy_warnings: Callable[[str, ProxyNode], list[str]] | None = None,
        authenticate: Authenticator | None = None,
    ) -> None:
        """`proxy_warnings(conn_id, proxy)` names problems with a connected proxy (e.g. its node matches
        no workload); each is logged once per connection, at connect time or after the push that
        causes it. `authenticate(proxy, context)` checks the node a stream claims against the
        caller's verified identity and returns the node with `identity` set; it raises
        PermissionError to refuse the stream (PERMISSION_DENIED). None: plain text, no identities."""
        self.generator = generator
        self.authenticate = authenticate
        self.proxy_warnings = proxy_warnings
        self.metrics = metrics or XdsMetrics()
        self.debounce_after = debounce_after
        self.debounce_max = debounce_max
        self.connections: dict[str, Connection] = {}
        self._conn_ids = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._first_change: float | None = None
        self._last_change = 0.0
        self._debounce_task: asyncio.Task[None] | None = None
        self._pushes_done = 0
        self._push_event = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        credentials: grpc.ServerCredentials | None = None,
        handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> int:
        """Listen on host:port (0 = a free port) and return the bound port; with `credentials` over
        (m)TLS. `handlers` are further services on the same port (the CA's renewal service)."""
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_concurrent_streams", 100000),
                ("grpc.keepalive_time_ms", 30000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ]
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        if handlers:
            self._server.add_generic_rpc_handlers(tuple(handlers))
        address = f"{host}:{port}"
        bound: int = (
            self._server.add_insecure_port(address)
            if credentials is None
            else self._server.add_secure_port(address, credentials)
        )
        if bound == 0:
            raise OSError(f"xDS server: cannot listen on {host}:{port}")
        await self._server.start()
        transport = "plain text" if credentials is None else "mTLS"
        log.info("xDS (ADS) listening on %s:%d (%s)", host, bound, transport)
        return bound

    async def stop(self, grace: float | None = 0.5) -> None:
        if self._debounce_task is not None:
            self._debounce_task.cancel()
        for conn in list(self.connections.values()):
            conn.outbox.put_nowait(None)
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    # ---- config change → debounced push ----------------------------------------------------

    def config_changed(self) -> None:
        """Record a config event; a push follows after the debounce quiet period."""
        now = time.monotonic()
        if self._first_change is None:
            self._first_change = now
        self._last_change = now
        if self._debounce_task is None or self._debounce_task.done():
            self._debounce_task = asyncio.get_running_loop().create_task(self._debounce())

    async def _debounce(self) -> None:
        while True:
            assert self._first_change is not None
            now = time.monotonic()
            quiet_until = self._last_change + self.debounce_after
            hard_limit = self._first_change + self.debounce_max
            if now >= quiet_until or now >= hard_limit:
                break
            await asyncio.sleep(min(quiet_until, hard_limit) - now)
        started = self._first_change
        self._first_change = None
        self.push_all(started)

    def push_all(self, change_time: float | None = None) -> None:
        """Push every connection whatever changed for it (synchronously builds and enqueues)."""
        started = change_time if change_time is not None else time.monotonic()
        for conn in list(self.connections.values()):
            try:
                snapshot = self.generator.generate(conn.proxy)
            except Exception:  # a generator bug must not take down the push loop for everyone
                log.exception("xDS: building the snapshot for %s failed", conn.conn_id)
                continue
            for type_url in types.PUSH_ORDER:
                watched = conn.watched.get(type_url)
                if watched is not None:
                    self._respond(conn, watched, snapshot, started, only_if_changed=True)
            self._log_warnings(conn)
        self._pushes_done += 1
        self._push_event.set()
        self._push_event = asyncio.Event()

    async def wait_for_push(self, timeout: float = 5.0) -> None:
        """Wait until the next push completes (tests and benchmarks)."""
        await asyncio.wait_for(self._push_event.wait(), timeout)

    # ---- the ADS stream --------------------------------------------------------------------

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except (StopAsyncIteration, grpc.aio.AioRpcError):
            return
        if not first.node.id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first DiscoveryRequest must carry node.id"
            )
        proxy = ProxyNode.from_node(first.node)
        if self.authenticate is not None:
            try:
                proxy = self.authenticate(proxy, context)
            except PermissionError as exc:
                log.warning("ADS: refused node %s from %s: %s", proxy.id, context.peer(), exc)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        conn = Connection(f"{proxy.id}-{next(self._conn_ids)}", proxy, context.peer())
        self.connections[conn.conn_id] = conn
        self.metrics.connected.set(len(self.connections))
        log.info("ADS: new connection %s (namespace %s)", conn.conn_id, proxy.namespace)
        self._log_warnings(conn)
        self._handle_request(conn, first)
        reader = asyncio.get_running_loop().create_task(self._read_requests(conn, requests))
        try:
            while True:
                response = await conn.outbox.get()
                if response is None:
                    break
                yield response
        finally:
            reader.cancel()
            if self.connections.pop(conn.conn_id, None) is not None:
                self.metrics.connected.set(len(self.connections))
                log.info("ADS: disconnected %s", conn.conn_id)

    async def _read_requests(
        self, conn: Connection, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]
    ) -> None:
        try:
            async for request in requests:
                self._handle_request(conn, request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # stream reset by the peer etc.
            log.debug("ADS: stream error on %s: %s", conn.conn_id, exc)
        finally:
            conn.outbox.put_nowait(None)

    def _handle_request(self, conn: Connection, request: discovery_pb2.DiscoveryRequest) -> None:
        type_url = request.type_url
        short = types.log_name(type_url)
        wildcard = type_url in types.WILDCARD_TYPES
        names: set[str] | None = None if wildcard else set(request.resource_names)
        watched = conn.watched.get(type_url)

        if request.HasField("error_detail") and request.error_detail.code == FETCH_FAILURE_CODE:
            # The agent's report: Envoy runs this response, with fallbacks for the named resources.
            log.warning("ADS:%s: FETCH FAILED %s %s", short, conn.conn_id, request.error_detail.message)
            if watched is not None and request.response_nonce == watched.nonce_sent:
                self._acknowledged(conn, watched, request, names)
                self._report(watched, FETCH_FAILED, request.error_detail.message, only_named=True)
            return

        if request.HasField("error_detail"):
            # NACK: keep what the proxy has, count it, never re-send the same thing.
            detail = request.error_detail
            log.warning("ADS:%s: ACK ERROR %s %d:%s", short, conn.conn_id, detail.code, detail.message)
            self.metrics.rejects.inc(types.short_name(type_url))
            if watched is not None:
                watched.last_error = detail.message
                watched.push_started = None
                if request.response_nonce == watched.nonce_sent:
                    self._report(watched, NACK, detail.message, only_named=False)
                if names is not None:
                    watched.names = names
            return

        if not request.response_nonce or watched is None:
            # A new subscription, or a reconnecting proxy resyncing: always answer with the full state.
            watched = WatchedResource(type_url, names, version_acked=request.version_info)
            conn.watched[type_url] = watched
            self._respond(conn, watched, None, None, only_if_changed=False)
            return

        if request.response_nonce != watched.nonce_sent:
            log.debug(
                "ADS:%s: %s expired nonce %s (sent %s)",
                short,
                conn.conn_id,
                request.response_nonce,
                watched.nonce_sent,
            )
            return

        self._acknowledged(conn, watched, request, names)

    def _acknowledged(
        self,
        conn: Connection,
        watched: WatchedResource,
        request: discovery_pb2.DiscoveryRequest,
        names: set[str] | None,
    ) -> None:
        """The proxy runs the latest response: record it, and answer a changed subscription."""
        watched.version_acked = request.version_info
        watched.last_error = ""
        watched.acked_digests = dict(watched.sent_digests)
        for name in watched.sent_digests:
            watched.reports.pop(name, None)
        if watched.push_started is not None:
            self.metrics.convergence.observe(max(0.0, time.monotonic() - watched.push_started))
            watched.push_started = None
        if names is not None and names != watched.names:
            watched.names = names
            self._respond(conn, watched, None, None, only_if_changed=False)

    @staticmethod
    def _report(watched: WatchedResource, state: str, message: str, *, only_named: bool) -> None:
        """Attribute a NACK or fetch failure of the latest response to the resources it concerns.

        The resources the message names; for a NACK naming none, those that changed since the last
        ACK (or, when nothing changed, every resource of the response)."""
        sent = watched.sent_digests
        named = [name for name in sent if _mentions(message, name)]
        if not named and not only_named:
            named = [name for name, digest in sent.items() if watched.acked_digests.get(name) != digest]
            named = named or list(sent)
        for name in named:
            watched.reports[name] = ResourceReport(sent[name], state, _parts_naming(message, name))

    def _log_warnings(self, conn: Connection) -> None:
        if self.proxy_warnings is None:
            return
        try:
            warnings = self.proxy_warnings(conn.conn_id, conn.proxy)
        except Exception:  # a bug here must not break the stream
            log.exception("xDS: computing warnings for %s failed", conn.conn_id)
            return
        for warning in warnings:
            if warning not in conn.warnings_logged:
                conn.warnings_logged.add(warning)
                log.warning("%s", warning)

    def _respond(
        self,
        conn: Connection,
        watched: WatchedResource,
        snapshot: Snapshot | None,
        change_time: float | None,
        *,
        only_if_changed: bool,
    ) -> None:
        if snapshot is None:
            snapshot = self.generator.generate(conn.proxy)
        version, resources = snapshot.select(watched.type_url, watched.names)
        if only_if_changed and version == watched.version_sent:
            return
        nonce = f"{next(conn.nonces)}"
        response = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=watched.type_url, nonce=nonce, resources=resources
        )
        watched.version_sent = version
        watched.nonce_sent = nonce
        watched.sent_digests = snapshot.digests(watched.type_url, watched.names)
        if change_time is not None:
            watched.push_started = change_time
        self.metrics.pushes.inc(types.short_name(watched.type_url))
        conn.outbox.put_nowait(response)
        log.debug(
            "ADS:%s: PUSH %s version %s resources %d",
            types.log_name(watched.type_url),
            conn.conn_id,
            version,
            len(resources),
        )

    # ---- introspection ---------------------------------------------------------------------

    @staticmethod
    def resource_state(conn: Connection, type_url: str, name: str, current: bytes | None) -> ResourceState:
        """Where the proxy stands with resource `name`, whose current content digest is `current`.

        ACK: it runs this content. NACK / FETCH_FAILED: it refused this content / its agent could not
        fetch the module and serves the RBAC fallback instead. PENDING: not subscribed yet, or this
        content is not acknowledged yet (the error of an earlier content is kept as `error`)."""
        watched = conn.watched.get(type_url)
        if watched is None or (watched.names is not None and name not in watched.names):
            return ResourceState(PENDING)
        report = watched.reports.get(name)
        if report is not None and report.digest == current:
            return ResourceState(report.state, report.message)
        error = report.message if report is not None else ""
        if current is not None and watched.acked_digests.get(name) == current:
            return ResourceState(ACK)
        return ResourceState(PENDING, error)

    def describe(self) -> list[dict[str, object]]:
        """Connected proxies and what each has ACKed (served on the API as /debug/connections)."""
        rows: list[dict[str, object]] = []
        for conn in self.connections.values():
            rows.append(
                {
                    "id": conn.conn_id,
                    "node": conn.proxy.id,
                    "identity": conn.proxy.identity,
                    "namespace": conn.proxy.namespace,
                    "labels": dict(conn.proxy.labels),
                    "watched": {
                        types.short_name(w.type_url): {
                            "names": sorted(w.names) if w.names is not None else "*",
                            "sent": w.version_sent,
                            "acked": w.version_acked,
                            "error": w.last_error,
                        }
                        for w in conn.watched.values()
                    },
                }
            )
        return rows
