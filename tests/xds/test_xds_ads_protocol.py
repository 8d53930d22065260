"""ADS server ↔ XdsClient over real gRPC: subscriptions, ACK/NACK, push-only-on-change, reconnect."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, message, wrappers_pb2

from wasmesh.xds import types
from wasmesh.xds.client import ClientSnapshot, RejectUpdate, XdsClient
from wasmesh.xds.server import AdsServer
from wasmesh.xds.snapshot import ProxyNode, Snapshot


def pack(resource: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(resource)
    return packed


def listener_with_filters(name: str, filter_names: list[str]) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    for filter_name in filter_names:
        manager.http_filters.add(name=filter_name).config_discovery.type_urls.append(types.HTTP_WASM)
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name="hcm", typed_config=pack(manager))]
    )
    return listener_pb2.Listener(name=name, filter_chains=[chain])


def extension(name: str, value: str) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(
        name=name, typed_config=pack(wrappers_pb2.StringValue(value=value))
    )


class TableGenerator:
    """Serves whatever the test puts in `table`, the same for every proxy with label app=web."""

    def __init__(self) -> None:
        self.table: dict[str, dict[str, message.Message]] = {}
        self.calls = 0

    def generate(self, proxy: ProxyNode) -> Snapshot:
        self.calls += 1
        if proxy.labels.get("app") != "web":
            return Snapshot({})
        return Snapshot({t: {n: pack(r) for n, r in items.items()} for t, items in self.table.items()})


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


def has_extension(name: str, value: str) -> Callable[[ClientSnapshot], bool]:
    def check(snapshot: ClientSnapshot) -> bool:
        config = snapshot.extension_configs().get(name)
        if config is None:
            return False
        holder = wrappers_pb2.StringValue()
        config.typed_config.Unpack(holder)
        return holder.value == value

    return check


def test_subscribe_follow_references_and_push_on_change() -> None:
    async def body() -> None:
        generator = TableGenerator()
        generator.table = {
            types.LISTENER: {"l1": listener_with_filters("l1", ["ext/a"])},
            types.CLUSTER: {"c1": cluster_pb2.Cluster(name="c1")},
            types.EXTENSION_CONFIG: {
                "ext/a": extension("ext/a", "v1"),
                "ext/b": extension("ext/b", "unused"),
            },
        }
        server = AdsServer(generator, debounce_after=0.01)
        port = await server.start()
        updates: list[ClientSnapshot] = []
        client = XdsClient(f"127.0.0.1:{port}", "web-1", {"app": "web"}, on_update=updates.append)
        task = asyncio.create_task(client.run())
        try:
            snapshot = await client.wait_for(has_extension("ext/a", "v1"))
            # Only the referenced extension is subscribed (ECDS by name), the chain resolves it.
            assert set(snapshot.extension_configs()) == {"ext/a"}
            assert [ref.name for ref in snapshot.http_filter_chains()["l1"]] == ["ext/a"]
            assert snapshot.http_filter_chains()["l1"][0].config is not None
            assert set(snapshot.clusters()) == {"c1"}

            pushes_before = server.metrics.pushes.value("ecds")
            lds_before = server.metrics.pushes.value("lds")
            generator.table[types.EXTENSION_CONFIG]["ext/a"] = extension("ext/a", "v2")
            server.config_changed()
            await client.wait_for(has_extension("ext/a", "v2"))
            assert server.metrics.pushes.value("ecds") == pushes_before + 1
            assert server.metrics.pushes.value("lds") == lds_before  # listeners did not change: not sent

            # A change only to an unsubscribed resource sends nothing at all.
            generator.table[types.EXTENSION_CONFIG]["ext/b"] = extension("ext/b", "changed")
            server.config_changed()
            await server.wait_for_push()
            assert server.metrics.pushes.value("ecds") == pushes_before + 1

            # A new filter in the listener: LDS push, then the client subscribes to the new name.
            generator.table[types.LISTENER]["l1"] = listener_with_filters("l1", ["ext/b", "ext/a"])
            server.config_changed()
            snapshot = await client.wait_for(has_extension("ext/b", "changed"))
            assert [ref.name for ref in snapshot.http_filter_chains()["l1"]] == ["ext/b", "ext/a"]
            await asyncio.sleep(0.05)
            watched = server.describe()[0]["watched"]
            assert isinstance(watched, Mapping)
            assert watched["ecds"]["names"] == ["ext/a", "ext/b"]
            assert watched["ecds"]["acked"] == watched["ecds"]["sent"]
            assert server.metrics.convergence.count() >= 1
        finally:
            client.request_stop()
            task.cancel()
            await server.stop()

    run(body)


def test_nack_is_counted_and_not_resent() -> None:
    async def body() -> None:
        generator = TableGenerator()
        generator.table = {
            types.LISTENER: {"l1": listener_with_filters("l1", ["ext/a"])},
            types.EXTENSION_CONFIG: {"ext/a": extension("ext/a", "good")},
        }
        server = AdsServer(generator, debounce_after=0.01)
        port = await server.start()

        def validate(type_url: str, resources: Mapping[str, message.Message]) -> None:
            for resource in resources.values():
                if isinstance(resource, extension_pb2.TypedExtensionConfig):
                    holder = wrappers_pb2.StringValue()
                    resource.typed_config.Unpack(holder)
                    if holder.value == "bad":
                        raise RejectUpdate("module is not valid wasm")

        client = XdsClient(f"127.0.0.1:{port}", "web-1", {"app": "web"}, validate=validate)
        task = asyncio.create_task(client.run())
        try:
            await client.wait_for(has_extension("ext/a", "good"))
            generator.table[types.EXTENSION_CONFIG]["ext/a"] = extension("ext/a", "bad")
            server.config_changed()
            for _ in range(200):
                if server.metrics.rejects.value("ecds"):
                    break
                await asyncio.sleep(0.01)
            assert server.metrics.rejects.value("ecds") == 1
            assert client.nacks_sent == 1
            # The client keeps the last good config; the server records the error.
            assert has_extension("ext/a", "good")(client.snapshot)
            watched = server.describe()[0]["watched"]
            assert isinstance(watched, Mapping)
            assert watched["ecds"]["error"] == "module is not valid wasm"
            # The same bad config is not pushed again on an unrelated push.
            server.config_changed()
            await server.wait_for_push()
            await asyncio.sleep(0.05)
            assert client.nacks_sent == 1
            # A fixed config is accepted.
            generator.table[types.EXTENSION_CONFIG]["ext/a"] = extension("ext/a", "fixed")
            server.config_changed()
            await client.wait_for(has_extension("ext/a", "fixed"))
        finally:
            client.request_stop()
            task.cancel()
            await server.stop()

    run(body)


def test_label_selection_and_reconnect_after_server_restart() -> None:
    async def body() -> None:
        generator = TableGenerator()
        generator.table = {
            types.LISTENER: {"l1": listener_with_filters("l1", ["ext/a"])},
            types.EXTENSION_CONFIG: {"ext/a": extension("ext/a", "one")},
        }
        server = AdsServer(generator, debounce_after=0.01)
        port = await server.start()
        web = XdsClient(f"127.0.0.1:{port}", "web-1", {"app": "web"}, reconnect_initial=0.05)
        other = XdsClient(f"127.0.0.1:{port}", "db-1", {"app": "db"})
        tasks = [asyncio.create_task(web.run()), asyncio.create_task(other.run())]
        try:
            await web.wait_for(has_extension("ext/a", "one"))
            await asyncio.sleep(0.1)
            assert other.snapshot.listeners() == {}
            assert server.metrics.connected.value() == 2

            await server.stop(grace=0)
            await asyncio.sleep(0.2)
            assert has_extension("ext/a", "one")(web.snapshot)  # kept while disconnected

            generator.table[types.EXTENSION_CONFIG]["ext/a"] = extension("ext/a", "two")
            restarted = AdsServer(generator, debounce_after=0.01)
            await restarted.start(port=port)
            try:
                await web.wait_for(has_extension("ext/a", "two"))
            finally:
                await restarted.stop()
        finally:
            for client in (web, other):
                client.request_stop()
            for task in tasks:
                task.cancel()
            await server.stop()

    run(body)


def test_thread_api_start_stop() -> None:
    async def serve(ready: asyncio.Event, done: asyncio.Event, port_box: list[int]) -> None:
        generator = TableGenerator()
        generator.table = {types.CLUSTER: {"c1": cluster_pb2.Cluster(name="c1")}}
        server = AdsServer(generator)
        port_box.append(await server.start())
        ready.set()
        await done.wait()
        await server.stop()

    async def body() -> None:
        ready, done, port_box = asyncio.Event(), asyncio.Event(), []
        serving = asyncio.create_task(serve(ready, done, port_box))
        await ready.wait()
        client = XdsClient(f"127.0.0.1:{port_box[0]}", "web-1", {"app": "web"})
        client.start()
        try:
            for _ in range(300):
                if "c1" in client.snapshot.clusters():
                    break
                await asyncio.sleep(0.01)
            assert "c1" in client.snapshot.clusters()
        finally:
            await asyncio.to_thread(client.stop)
            done.set()
            await serving

    run(body)
