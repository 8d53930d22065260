"""A reusable state-of-the-world ADS client, behaving like Envoy's gRPC mux.

It subscribes to clusters and listeners (wildcard), follows the listeners' references to route
configurations (RDS) and extension configs (ECDS, by name), ACKs what it accepts and NACKs what
its `validate` hook rejects, keeps the last good state across control-plane restarts and
reconnects with backoff. Use it from asyncio (`await client.run()` in a task) or from threads
(`client.start()` / `client.stop()`).

    async def on_update(snapshot: ClientSnapshot) -> None:
        for listener, chain in snapshot.http_filter_chains().items():
            ...  # chain: ordered FilterRef(name, TypedExtensionConfig | None)

    client = XdsClient("127.0.0.1:15010", "web-1", {"app": "web"}, namespace="default",
                       on_update=on_update)
    task = asyncio.create_task(client.run())
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, message, struct_pb2
from google.rpc import status_pb2

from wasmesh.security.workload import WorkloadCertificates, stop_task
from wasmesh.xds import types

log = logging.getLogger("wasmesh.xds.client")

MESSAGE_CLASSES: dict[str, type[message.Message]] = {
    types.LISTENER: listener_pb2.Listener,
    types.ROUTE: route_pb2.RouteConfiguration,
    types.CLUSTER: cluster_pb2.Cluster,
    types.EXTENSION_CONFIG: extension_pb2.TypedExtensionConfig,
}

# gRPC status code Envoy puts in a NACK's error_detail (INTERNAL).
NACK_CODE = 13


class RejectUpdate(Exception):
    """Raised by a `validate` hook: the update is NACKed with this message."""


@dataclass(frozen=True)
class FilterRef:
    """One HTTP filter of a listener's chain; `config` is the resolved ECDS resource, if any."""

    name: str
    discovered: bool
    config: extension_pb2.TypedExtensionConfig | None


@dataclass(frozen=True)
class ClientSnapshot:
    """Everything the client has accepted, by type URL and resource name (unpacked messages)."""

    resources: Mapping[str, Mapping[str, message.Message]] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)

    def of(self, type_url: str) -> Mapping[str, message.Message]:
        return self.resources.get(type_url, {})

    def listeners(self) -> dict[str, listener_pb2.Listener]:
        return {k: v for k, v in self.of(types.LISTENER).items() if isinstance(v, listener_pb2.Listener)}

    def clusters(self) -> dict[str, cluster_pb2.Cluster]:
        return {k: v for k, v in self.of(types.CLUSTER).items() if isinstance(v, cluster_pb2.Cluster)}

    def routes(self) -> dict[str, route_pb2.RouteConfiguration]:
        return {k: v for k, v in self.of(types.ROUTE).items() if isinstance(v, route_pb2.RouteConfiguration)}

    def extension_configs(self) -> dict[str, extension_pb2.TypedExtensionConfig]:
        items = self.of(types.EXTENSION_CONFIG).items()
        return {k: v for k, v in items if isinstance(v, extension_pb2.TypedExtensionConfig)}

    def http_filter_chains(self) -> dict[str, list[FilterRef]]:
        """Listener name → its HTTP filters in order, ECDS references resolved when available."""
        extensions = self.extension_configs()
        chains: dict[str, list[FilterRef]] = {}
        for name, listener in self.listeners().items():
            manager = http_connection_manager(listener)
            if manager is None:
                continue
            chain: list[FilterRef] = []
            for http_filter in manager.http_filters:
                discovered = http_filter.HasField("config_discovery")
                chain.append(FilterRef(http_filter.name, discovered, extensions.get(http_filter.name)))
            chains[name] = chain
        return chains


def http_connection_manager(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager | None:
    """The HCM of the listener's first filter chain, if it has one."""
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.type_url == types.HTTP_CONNECTION_MANAGER:
                manager = hcm_pb2.HttpConnectionManager()
                network_filter.typed_config.Unpack(manager)
                return manager
    return None


def referenced_names(listeners: Mapping[str, message.Message]) -> tuple[set[str], set[str]]:
    """(route config names, extension config names) the listeners reference."""
    routes: set[str] = set()
    extensions: set[str] = set()
    for listener in listeners.values():
        if not isinstance(listener, listener_pb2.Listener):
            continue
        manager = http_connection_manager(listener)
        if manager is None:
            continue
        if manager.HasField("rds"):
            routes.add(manager.rds.route_config_name)
        for http_filter in manager.http_filters:
            if http_filter.HasField("config_discovery"):
                extensions.add(http_filter.name)
    return routes, extensions


def build_node(
    node_id: str, labels: Mapping[str, str], namespace: str, metadata: Mapping[str, Any] | None = None
) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id, cluster=namespace)
    values: dict[str, Any] = dict(metadata or {})
    values.setdefault("LABELS", dict(labels))
    values.setdefault("NAMESPACE", namespace)
    struct = struct_pb2.Struct()
    struct.update(values)
    node.metadata.CopyFrom(struct)
    return node


UpdateCallback = Callable[["ClientSnapshot"], "Awaitable[None] | None"]
# Raise RejectUpdate (or ValueError) to NACK; may be a coroutine function.
ValidateHook = Callable[[str, Mapping[str, message.Message]], "Awaitable[None] | None"]


@dataclass
class _TypeState:
    names: set[str] | None  # None: wildcard
    version: str = ""
    nonce: str = ""


class XdsClient:
    """An ADS client for one node. See the module docstring for usage."""

    def __init__(
        self,
        target: str,
        node_id: str,
        labels: Mapping[str, str] | None = None,
        *,
        namespace: str = "default",
        metadata: Mapping[str, Any] | None = None,
        on_update: UpdateCallback | None = None,
        validate: ValidateHook | None = None,
        subscriptions: Mapping[str, Sequence[str] | None] | None = None,
        follow_references: bool = True,
        channel: grpc.aio.Channel | None = None,
        reconnect_initial: float = 0.1,
        reconnect_max: float = 5.0,
        tls: WorkloadCertificates | None = None,
    ) -> None:
        """`subscriptions` replaces the default (wildcard CDS + LDS): type URL → names (None = wildcard).
        `follow_references` subscribes RDS/ECDS to whatever the accepted listeners reference.
        `tls`: connect over mTLS with this workload certificate (renewed at half life while the
        client runs; each new connection uses the current one); None: plain text."""
        self.target = target
        self.tls = tls
        self.node = build_node(node_id, labels or {}, namespace, metadata)
        self.on_update = on_update
        self.validate = validate
        self.follow_references = follow_references
        self._shared_channel = channel
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        initial = subscriptions if subscriptions is not None else {types.CLUSTER: None, types.LISTENER: None}
        self._states: dict[str, _TypeState] = {
            type_url: _TypeState(None if names is None else set(names)) for type_url, names in initial.items()
        }
        self._resources: dict[str, dict[str, message.Message]] = {}
        self.snapshot = ClientSnapshot()
        self.connected = False
        self.nacks_sent = 0
        self.last_nack = ""
        self.last_refusal = ""  # the control plane's last PERMISSION_DENIED/UNAUTHENTICATED message
        self._stopping = False
        self._changed: asyncio.Condition | None = None
        self._outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- asyncio API -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and reconnect with exponential backoff, until `stop()` / cancellation."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        rotation = None
        if self.tls is not None and self._shared_channel is None:
            rotation = asyncio.get_running_loop().create_task(self.tls.run_rotation())
        try:
            await self._run_streams()
        finally:
            await stop_task(rotation)

    async def _channel(self) -> grpc.aio.Channel | None:
        """A new channel to the control plane (None, logged, when no certificate can be had)."""
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target)
        try:
            return await self.tls.channel(self.target)
        except (grpc.aio.AioRpcError, OSError, ValueError) as exc:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            if detail != self.last_refusal:  # once, not on every retry
                log.warning("xDS client %s: no workload certificate: %s", self.node.id, detail)
            self.last_refusal = str(detail)
            return None

    async def _run_streams(self) -> None:
        delay = self.reconnect_initial
        while not self._stopping:
            channel = self._shared_channel or await self._channel()
            if channel is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)
                continue
            try:
                await self._stream(channel)
                delay = self.reconnect_initial
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self.connected:
                    log.info("xDS client %s: stream to %s ended: %s", self.node.id, self.target, exc.code())
                    delay = self.reconnect_initial
                elif exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    refusal = exc.details() or exc.code().name
                    if refusal != self.last_refusal:  # once, not on every retry
                        log.warning("xDS client %s: refused by %s: %s", self.node.id, self.target, refusal)
                    self.last_refusal = refusal
            finally:
                self.connected = False
                if self._shared_channel is None:
                    await channel.close()
            if self._stopping:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max)

    async def wait_for(
        self, predicate: Callable[[ClientSnapshot], bool], timeout: float = 10.0
    ) -> ClientSnapshot:
        """Wait until the accepted state satisfies `predicate` (must be called on the client's loop)."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.snapshot)), timeout)
        return self.snapshot

    def request_stop(self) -> None:
        self._stopping = True
        if self._outbox is not None:
            self._outbox.put_nowait(discovery_pb2.DiscoveryRequest())  # wakes the sender; never sent

    # ---- thread API ------------------------------------------------------------------------

    def start(self) -> None:
        """Run the client in a background thread with its own event loop."""
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._task = loop.create_task(self.run())
            ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
            loop.close()

        self._thread = threading.Thread(target=main, name=f"xds-client-{self.node.id}", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, timeout: float = 5.0) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            self._stopping = True
            loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- protocol --------------------------------------------------------------------------

    def _request(self, type_url: str) -> discovery_pb2.DiscoveryRequest:
        state = self._states[type_url]
        return discovery_pb2.DiscoveryRequest(
            node=self.node,
            type_url=type_url,
            version_info=state.version,
            response_nonce=state.nonce,
            resource_names=sorted(state.names) if state.names is not None else [],
        )

    async def _stream(self, channel: grpc.aio.Channel) -> None:
        outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self._outbox = outbox
        for type_url in types.PUSH_ORDER:
            if type_url in self._states:
                state = self._states[type_url]
                state.nonce = ""  # a new stream: nonces of the old one mean nothing
                outbox.put_nowait(self._request(type_url))

        async def requests() -> Any:
            while True:
                request = await outbox.get()
                if self._stopping:
                    return
                yield request

        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources(requests())
        async for response in call:
            self.connected = True
            await self._handle_response(response, outbox)

    async def _handle_response(
        self, response: discovery_pb2.DiscoveryResponse, outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest]
    ) -> None:
        type_url = response.type_url
        state = self._states.get(type_url)
        if state is None:
            return
        try:
            decoded = self._decode(type_url, response.resources)
            if self.validate is not None:
                verdict = self.validate(type_url, decoded)
                if inspect.isawaitable(verdict):
                    await verdict
        except (RejectUpdate, ValueError, message.DecodeError) as exc:
            self.nacks_sent += 1
            self.last_nack = str(exc)
            log.warning(
                "xDS client %s: NACK %s version %s: %s",
                self.node.id,
                types.short_name(type_url),
                response.version_info,
                exc,
            )
            state.nonce = response.nonce
            nack = self._request(type_url)
            nack.error_detail.CopyFrom(status_pb2.Status(code=NACK_CODE, message=str(exc)))
            outbox.put_nowait(nack)
            return
        if state.names is None:
            self._resources[type_url] = decoded
        else:
            merged = dict(self._resources.get(type_url, {}))
            merged.update(decoded)
            self._resources[type_url] = {k: v for k, v in merged.items() if k in state.names}
        state.version = response.version_info
        state.nonce = response.nonce
        outbox.put_nowait(self._request(type_url))  # ACK
        if self.follow_references and type_url == types.LISTENER:
            self._follow(outbox)
        await self._publish()

    def _follow(self, outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest]) -> None:
        route_names, extension_names = referenced_names(self._resources.get(types.LISTENER, {}))
        for type_url, names in ((types.EXTENSION_CONFIG, extension_names), (types.ROUTE, route_names)):
            state = self._states.setdefault(type_url, _TypeState(set()))
            if state.names != names:
                state.names = set(names)
                kept = self._resources.get(type_url, {})
                self._resources[type_url] = {k: v for k, v in kept.items() if k in names}
                outbox.put_nowait(self._request(type_url))

    @staticmethod
    def _decode(type_url: str, resources: Sequence[any_pb2.Any]) -> dict[str, message.Message]:
        message_class = MESSAGE_CLASSES.get(type_url)
        if message_class is None:
            raise RejectUpdate(f"unsupported type {type_url}")
        decoded: dict[str, message.Message] = {}
        for packed in resources:
            if packed.type_url != type_url:
                raise RejectUpdate(f"resource of type {packed.type_url} in a {type_url} response")
            item = message_class()
            packed.Unpack(item)
            name = str(getattr(item, "name", ""))
            if not name:
                raise RejectUpdate(f"{types.short_name(type_url)} resource without a name")
            decoded[name] = item
        return decoded

    async def _publish(self) -> None:
        self.snapshot = ClientSnapshot(
            resources={k: dict(v) for k, v in self._resources.items()},
            versions={k: s.version for k, s in self._states.items()},
        )
        if self.on_update is not None:
            result = self.on_update(self.snapshot)
            if inspect.isawaitable(result):
                await result
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()
