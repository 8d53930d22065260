"""Translation of xDS resources (built by the control plane's own translator) and RBAC substitutes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from google.protobuf import message
from pxds_support import free_port, get

from wasmesh.controlplane.resources import ClusterSpec, Endpoint, ListenerSpec, RouteRule, VirtualHost
from wasmesh.controlplane.translate import (
    PluginView,
    build_cluster,
    build_extension_config,
    build_listener,
    build_route_configuration,
    pack,
)
from wasmesh.proxy.xds import (
    RbacFilterSpec,
    WasmFilterSpec,
    XdsConfigError,
    XdsPlan,
    XdsProxy,
    translate_cluster,
    translate_filter,
    translate_resources,
)
from wasmesh.xds import types


def _listener(port: int) -> ListenerSpec:
    routes = (RouteRule(match_kind="prefix", match_value="/", cluster="echo"),)
    return ListenerSpec(
        name="http",
        port=port,
        address="127.0.0.1",
        mode="SERVER",
        virtual_hosts=(VirtualHost("v", ("*",), routes),),
    )


def _plugin(name: str, url: str, **fields: object) -> PluginView:
    return PluginView(namespace="default", name=name, resource_version="7", url=url, **fields)  # type: ignore[arg-type]


def _resources(
    port: int, upstream: int, chain: list[PluginView], extensions: list[extension_pb2.TypedExtensionConfig]
) -> dict[str, dict[str, message.Message]]:
    spec = _listener(port)
    cluster = ClusterSpec(
        name="echo", endpoints=(Endpoint("127.0.0.1", upstream),), connect_timeout_seconds=0.25
    )
    return {
        types.LISTENER: {"http": build_listener(spec, chain)},
        types.ROUTE: {"http": build_route_configuration(spec)},
        types.CLUSTER: {"echo": build_cluster(cluster)},
        types.EXTENSION_CONFIG: {e.name: e for e in extensions},
    }


def _rbac(name: str, deny: bool) -> extension_pb2.TypedExtensionConfig:
    rbac = http_rbac_pb2.RBAC(rules=rbac_pb2.RBAC()) if deny else http_rbac_pb2.RBAC()
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(rbac))


def test_listener_routes_clusters_and_wasm_filter(mark_plugin: Path) -> None:
    local = _plugin("a", f"file://{mark_plugin}", plugin_name="root", configuration_json='{"id":"a"}')
    remote = _plugin(
        "r", "oci://registry.local/r:1", sha256="ab" * 32, fail_strategy="FAIL_OPEN", pull_policy="Always"
    )
    extensions = [build_extension_config(local), build_extension_config(remote)]
    plan = translate_resources(_resources(10001, 10002, [local, remote], extensions))
    assert not plan.warming
    listener = plan.listeners["http"]
    assert (listener.config.address, listener.config.port) == ("127.0.0.1", 10001)
    assert listener.config.virtual_hosts[0].routes[0].cluster == "echo"
    assert plan.clusters[0].endpoints == (("127.0.0.1", 10002),)
    assert plan.clusters[0].connect_timeout_s == pytest.approx(0.25)
    first, second = listener.filters
    assert isinstance(first, WasmFilterSpec) and isinstance(second, WasmFilterSpec)
    assert (first.plugin_name, first.root_id, first.configuration) == ("default.a", "root", b'{"id":"a"}')
    assert first.local_filename == str(mark_plugin) and first.failure_policy == "FAIL_CLOSE"
    assert ("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION", "7") in first.env  # local code passes through
    assert (second.remote_url, second.sha256, second.failure_policy) == (
        "oci://registry.local/r:1",
        "ab" * 32,
        "FAIL_OPEN",
    )
    assert second.pull_policy == "Always" and second.resource_version == "7" and second.env == ()


def test_listener_warms_until_routes_and_extension_configs_arrive(mark_plugin: Path) -> None:
    plugin = _plugin("a", f"file://{mark_plugin}")
    resources = _resources(10001, 10002, [plugin], [])
    assert translate_resources(resources).warming == {"http": ("extensions.istio.io/wasmplugin/default.a",)}
    resources[types.EXTENSION_CONFIG] = {plugin.resource_name: build_extension_config(plugin)}
    del resources[types.ROUTE]
    plan = translate_resources(resources)
    assert plan.warming == {"http": ("http",)} and not plan.listeners


def test_rbac_substitutes_and_unsupported_resources() -> None:
    assert translate_filter(_rbac("x", deny=True)) == RbacFilterSpec("x", allow=False)
    assert translate_filter(_rbac("x", deny=False)) == RbacFilterSpec("x", allow=True)
    eds = cluster_pb2.Cluster(name="svc", type=cluster_pb2.Cluster.EDS)
    with pytest.raises(XdsConfigError, match=r"^cluster svc: type: EDS is not supported"):
        translate_cluster(eds)


def test_deny_all_answers_403_allow_all_passes_and_warming_keeps_old_version(echo_port: int) -> None:
    async def scenario() -> None:
        port = free_port()
        proxy = XdsProxy("127.0.0.1:1", "unit", drain_timeout_s=0.1)
        await proxy.server.start()  # only the server: plans are applied directly, no control plane
        try:
            name = "extensions.istio.io/wasmplugin/default.gone"
            denied = _resources(port, echo_port, [_plugin("gone", "oci://x/y:1")], [_rbac(name, deny=True)])
            await proxy.apply(translate_resources(denied))
            assert await asyncio.to_thread(get, port) == (403, {})
            # The next version warms (its ECDS is missing): the deny-all version keeps serving.
            await proxy.apply(XdsPlan(warming={"http": (name,)}, clusters=proxy.plan.clusters))
            assert (await asyncio.to_thread(get, port))[0] == 403
            allowed = _resources(port, echo_port, [_plugin("gone", "oci://x/y:1")], [_rbac(name, deny=False)])
            await proxy.apply(translate_resources(allowed))
            assert (await asyncio.to_thread(get, port))[0] == 200
            # Removing the listener closes its port.
            await proxy.apply(XdsPlan())
            assert (await asyncio.to_thread(get, port))[0] == 0
        finally:
            await proxy.server.stop(0.1)

    asyncio.run(scenario())
