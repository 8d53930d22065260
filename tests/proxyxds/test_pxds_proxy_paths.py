"""XdsProxy paths the control-plane scenarios do not reach: remote modules through the verified cache
(served by a real HTTP server), the ChainBuilder protocol side, waiting helpers, a snapshot that
cannot be translated, and the admin handlers. Plans are applied to a real server on real sockets."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import logging
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2, http_uri_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import message, wrappers_pb2
from pxds_support import chain_of, free_port

from wasmesh.controlplane.resources import ClusterSpec, Endpoint, ListenerSpec, RouteRule, VirtualHost
from wasmesh.controlplane.translate import (
    PluginView,
    build_cluster,
    build_listener,
    build_route_configuration,
    pack,
)
from wasmesh.proxy.config import CacheConfig, ConfigError, PluginResource
from wasmesh.proxy.xds import XdsConfigError, XdsPlan, XdsProxy, translate_resources
from wasmesh.xds import types
from wasmesh.xds.client import ClientSnapshot, http_connection_manager

ECDS_NAME = "extensions.istio.io/wasmplugin/default.remote"


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server API
        return


@pytest.fixture(scope="module")
def module_server(mark_plugin: Path) -> Iterator[str]:
    """A real HTTP server for the directory holding mark.wasm; yields its base URL."""
    handler = functools.partial(_QuietFiles, directory=str(mark_plugin.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _resources(port: int, upstream: int, url: str, sha256: str) -> dict[str, dict[str, message.Message]]:
    """Listener `http` on `port` → cluster `echo`, with one ECDS Wasm filter whose code is remote."""
    listener = ListenerSpec(
        name="http",
        port=port,
        address="127.0.0.1",
        mode="SERVER",
        virtual_hosts=(VirtualHost("v", ("*",), (RouteRule("prefix", "/", "echo"),)),),
    )
    plugin = PluginView(namespace="default", name="remote", resource_version="1", url="oci://unused/x:1")
    config = wasm_pb2.PluginConfig(
        name="default.remote",
        configuration=pack(wrappers_pb2.StringValue(value='{"id":"remote"}')),
        vm_config=wasm_pb2.VmConfig(
            runtime="envoy.wasm.runtime.v8",
            code=base_pb2.AsyncDataSource(
                remote=base_pb2.RemoteDataSource(http_uri=http_uri_pb2.HttpUri(uri=url), sha256=sha256)
            ),
        ),
    )
    extension = extension_pb2.TypedExtensionConfig(
        name=ECDS_NAME, typed_config=pack(http_wasm_pb2.Wasm(config=config))
    )
    cluster = ClusterSpec(
        name="echo", endpoints=(Endpoint("127.0.0.1", upstream),), connect_timeout_seconds=1.0
    )
    return {
        types.LISTENER: {"http": build_listener(listener, [plugin])},
        types.ROUTE: {"http": build_route_configuration(listener)},
        types.CLUSTER: {"echo": build_cluster(cluster)},
        types.EXTENSION_CONFIG: {ECDS_NAME: extension},
    }


def _run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(scenario)


def test_remote_module_is_fetched_verified_and_served(
    tmp_path: Path, mark_plugin: Path, module_server: str, echo_port: int
) -> None:
    url = f"{module_server}/{mark_plugin.name}"
    good = hashlib.sha256(mark_plugin.read_bytes()).hexdigest()
    port = free_port()

    async def scenario() -> None:
        proxy = XdsProxy("127.0.0.1:1", "unit", cache=CacheConfig(dir=str(tmp_path / "cache")))
        await proxy.server.start()
        try:
            bad_sha = "0" * 64
            with pytest.raises(XdsConfigError) as caught:
                await proxy.apply(translate_resources(_resources(port, echo_port, url, bad_sha)))
            assert str(caught.value) == (
                f"{ECDS_NAME}: cannot read module {url}: module downloaded from {url} has checksum "
                f"{good}, which does not match: {bad_sha}"
            )
            assert proxy.server.listeners == {} and proxy.server.stats.config_reload_failed == 1

            await proxy.apply(translate_resources(_resources(port, echo_port, url, good)))
            assert proxy.chain_names("http") == ["default.remote"]
            assert await asyncio.to_thread(chain_of, port) == ["remote"]
            assert (tmp_path / "cache").is_dir()
        finally:
            await proxy.server.stop(0.1)

    _run(scenario())


def test_chain_builder_refuses_wasmplugin_documents() -> None:
    async def scenario() -> None:
        proxy = XdsProxy("127.0.0.1:1", "unit")
        try:
            listener = translate_resources(_resources(1, 2, "http://h/m.wasm", "ab")).listeners["http"].config
            resource = PluginResource(body={"kind": "WasmPlugin"}, source="plugins.yaml", doc_index=1)
            with pytest.raises(ConfigError) as caught:
                await proxy.builder.build(listener, [resource], 3)
            assert str(caught.value) == "plugins.yaml: WasmPlugin documents are not used with --xds"
            empty = await proxy.builder.build(listener, [], 4)
            assert (empty.generation, list(empty.names)) == (4, [])
        finally:
            proxy.builder.close()

    _run(scenario())


def test_waiting_helpers_admin_handlers_and_untranslatable_snapshot(
    echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()

    async def scenario() -> None:
        proxy = XdsProxy("127.0.0.1:1", "unit")
        await proxy.server.start()
        handlers = proxy.admin_handlers()
        try:
            assert await handlers.ready() is False  # nothing applied yet: not ready (Envoy's initial fetch)
            resources = _resources(port, echo_port, "http://h/m.wasm", "ab")
            del resources[types.EXTENSION_CONFIG]  # the ECDS resource has not arrived: the listener warms
            waiting = asyncio.create_task(proxy.wait_serving("http", timeout=10))
            await proxy.apply(translate_resources(resources))
            await asyncio.sleep(0.05)
            assert not waiting.done() and proxy.plan.warming == {"http": (ECDS_NAME,)}
            assert await handlers.ready() is True

            plain = dict(resources)
            plain[types.LISTENER] = {"http": _without_filters(resources[types.LISTENER]["http"])}
            await proxy.apply(translate_resources(plain))
            await waiting
            assert proxy.address("http") == ("127.0.0.1", port)
            assert await asyncio.to_thread(chain_of, port) == []

            metrics = await handlers.prometheus()
            assert "wasmesh_config_reload_total 2" in metrics.splitlines()
            dump = await handlers.config_dump()
            assert isinstance(dump, dict)
            assert dump["xds"]["applied_updates"] == 2 and dump["xds"]["warming"] == {}

            # An accepted snapshot the proxy cannot translate: logged, the current config keeps serving.
            broken = dict(plain)
            broken[types.CLUSTER] = {"echo": cluster_pb2.Cluster(name="echo", type=cluster_pb2.Cluster.EDS)}
            plan_before = proxy.plan
            with caplog.at_level(logging.ERROR, logger="wasmesh.proxy.xds"):
                await proxy._on_update(ClientSnapshot(resources=broken))
            assert proxy.plan is plan_before
            assert await asyncio.to_thread(chain_of, port) == []
            assert [r.getMessage() for r in caplog.records if r.name == "wasmesh.proxy.xds"] == [
                "xDS update not applied, keeping the current configuration: "
                "cluster echo: type: EDS is not supported (STATIC or STRICT_DNS)"
            ]
            with pytest.raises(TimeoutError):
                await proxy.wait_for(lambda p: "other" in p.server.listeners, timeout=0.2)
            await proxy.apply(XdsPlan())
            assert proxy.server.listeners == {}
        finally:
            await proxy.server.stop(0.1)

    _run(scenario())


def _without_filters(listener: listener_pb2.Listener) -> listener_pb2.Listener:
    """The same listener without its ECDS filters (only the router stays)."""
    manager = http_connection_manager(listener)
    assert manager is not None
    kept = [f for f in manager.http_filters if not f.HasField("config_discovery")]
    del manager.http_filters[:]
    manager.http_filters.extend(kept)
    copy = listener_pb2.Listener()
    copy.CopyFrom(listener)
    copy.filter_chains[0].filters[0].typed_config.Pack(manager)
    return copy


def test_route_resource_without_listener_does_not_bind() -> None:
    plan = translate_resources({types.ROUTE: {"r": route_pb2.RouteConfiguration(name="r")}})
    assert plan == XdsPlan()
