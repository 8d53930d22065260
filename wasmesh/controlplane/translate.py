"""Translation of workloads and WasmPlugins to Envoy xDS resources, as istiod 1.29 builds them.

Pure functions of their inputs (no I/O): `PluginView` is the part of a WasmPlugin the xDS
resources need, already normalised by wasmesh.api; `build_resources` assembles a proxy's
listeners (HCM with one `config_discovery` filter per plugin, then the router), route
configurations, STATIC clusters and ECDS `TypedExtensionConfig`s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, extension_pb2, http_uri_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.wasm.v3 import wasm_pb2 as network_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from envoy.type.matcher.v3 import regex_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2

from wasmesh.controlplane.resources import ClusterSpec, ListenerSpec, Workload
from wasmesh.xds import types

WASM_RUNTIME = "envoy.wasm.runtime.v8"
REMOTE_FETCH_TIMEOUT_SECONDS = 30  # istiod buildDataSource always sets 30 s


@dataclass(frozen=True)
class PluginView:
    """The WasmPlugin fields the xDS translation needs (built by controlplane.plugins)."""

    namespace: str
    name: str
    resource_version: str
    url: str  # normalised: scheme always present (oci:// when the user gave none)
    sha256: str = ""
    pull_policy: str = ""  # "", "IfNotPresent" or "Always" as written (Istio sends it only if set)
    pull_secret_json: str | None = None  # dockerconfigjson; "" when the named Secret is missing
    plugin_name: str = ""
    configuration_json: str = ""
    fail_strategy: str = "FAIL_CLOSE"
    env: Mapping[str, str] = field(default_factory=dict)
    host_env_keys: tuple[str, ...] = ()
    plugin_type: Literal["HTTP", "NETWORK"] = "HTTP"

    @property
    def resource_name(self) -> str:
        return f"extensions.istio.io/wasmplugin/{self.namespace}.{self.name}"


def pack(resource: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(resource)
    return packed


def _ads_source(initial_fetch_timeout: float | None = None) -> config_source_pb2.ConfigSource:
    source = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )
    if initial_fetch_timeout is not None:
        source.initial_fetch_timeout.CopyFrom(duration_pb2.Duration(seconds=int(initial_fetch_timeout)))
    return source


def _discovery(type_urls: Sequence[str]) -> config_source_pb2.ExtensionConfigSource:
    # initial_fetch_timeout 0s: block listener warming until the plugin arrives, because plugins
    # may be critical for security (istiod's comment in extension/wasmplugin.go).
    return config_source_pb2.ExtensionConfigSource(config_source=_ads_source(0), type_urls=list(type_urls))


def build_plugin_config(plugin: PluginView) -> wasm_pb2.PluginConfig:
    """envoy.extensions.wasm.v3.PluginConfig exactly as istiod's buildPluginConfig fills it."""
    code = base_pb2.AsyncDataSource()
    if plugin.url.startswith("file://"):
        code.local.filename = plugin.url[len("file://") :]
    else:
        code.remote.http_uri.CopyFrom(
            http_uri_pb2.HttpUri(
                uri=plugin.url,
                cluster="_",
                timeout=duration_pb2.Duration(seconds=REMOTE_FETCH_TIMEOUT_SECONDS),
            )
        )
        code.remote.sha256 = plugin.sha256
    env = wasm_pb2.EnvironmentVariables(host_env_keys=list(plugin.host_env_keys))
    env.key_values[types.ENV_RESOURCE_VERSION] = plugin.resource_version
    if plugin.pull_policy:
        env.key_values[types.ENV_PULL_POLICY] = plugin.pull_policy
    if plugin.pull_secret_json is not None and not plugin.url.startswith("file://"):
        env.key_values[types.ENV_PULL_SECRET] = plugin.pull_secret_json
    for key, value in plugin.env.items():
        env.key_values[key] = value
    config = wasm_pb2.PluginConfig(
        name=f"{plugin.namespace}.{plugin.name}",
        root_id=plugin.plugin_name,
        vm_config=wasm_pb2.VmConfig(runtime=WASM_RUNTIME, code=code, environment_variables=env),
        failure_policy=types.FAILURE_POLICY_BY_STRATEGY.get(plugin.fail_strategy, wasm_pb2.FAIL_CLOSED),
    )
    configuration = any_pb2.Any()
    if plugin.configuration_json:
        configuration.Pack(wrappers_pb2.StringValue(value=plugin.configuration_json))
    config.configuration.CopyFrom(configuration)
    return config


def build_extension_config(plugin: PluginView) -> extension_pb2.TypedExtensionConfig:
    plugin_config = build_plugin_config(plugin)
    wasm: message.Message
    if plugin.plugin_type == "NETWORK":
        wasm = network_wasm_pb2.Wasm(config=plugin_config)
    else:
        wasm = http_wasm_pb2.Wasm(config=plugin_config)
    return extension_pb2.TypedExtensionConfig(name=plugin.resource_name, typed_config=pack(wasm))


def build_route_configuration(listener: ListenerSpec) -> route_pb2.RouteConfiguration:
    hosts = []
    for host in listener.virtual_hosts:
        routes = []
        for rule in host.routes:
            match = route_components_pb2.RouteMatch()
            if rule.match_kind == "prefix":
                match.prefix = rule.match_value
            elif rule.match_kind == "exact":
                match.path = rule.match_value
            else:
                match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=rule.match_value))
            routes.append(
                route_components_pb2.Route(
                    match=match, route=route_components_pb2.RouteAction(cluster=rule.cluster)
                )
            )
        hosts.append(
            route_components_pb2.VirtualHost(name=host.name, domains=list(host.domains), routes=routes)
        )
    return route_pb2.RouteConfiguration(name=listener.name, virtual_hosts=hosts)


def build_listener(listener: ListenerSpec, chain: Sequence[PluginView]) -> listener_pb2.Listener:
    http_filters = [
        hcm_pb2.HttpFilter(
            name=plugin.resource_name, config_discovery=_discovery([types.HTTP_WASM, types.HTTP_RBAC])
        )
        for plugin in chain
        if plugin.plugin_type == "HTTP"
    ]
    http_filters.append(
        hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))
    )
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=listener.name,
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=listener.name),
        http_filters=http_filters,
    )
    # NETWORK plugins sit before the HCM ("can be applied to HTTP traffic as well").
    network_filters = [
        listener_components_pb2.Filter(
            name=plugin.resource_name, config_discovery=_discovery([types.NETWORK_WASM, types.NETWORK_RBAC])
        )
        for plugin in chain
        if plugin.plugin_type == "NETWORK"
    ]
    network_filters.append(
        listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=pack(manager)
        )
    )
    return listener_pb2.Listener(
        name=listener.name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=listener.address, port_value=listener.port)
        ),
        filter_chains=[listener_components_pb2.FilterChain(filters=network_filters)],
        traffic_direction=base_pb2.INBOUND if listener.mode == "SERVER" else base_pb2.OUTBOUND,
    )


def build_cluster(cluster: ClusterSpec) -> cluster_pb2.Cluster:
    endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=ep.host, port_value=ep.port)
                )
            )
        )
        for ep in cluster.endpoints
    ]
    seconds = int(cluster.connect_timeout_seconds)
    nanos = int(round((cluster.connect_timeout_seconds - seconds) * 1e9))
    return cluster_pb2.Cluster(
        name=cluster.name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=seconds, nanos=nanos),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=cluster.name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)],
        ),
    )


def build_resources(
    workload: Workload | None,
    chains: Mapping[str, Sequence[PluginView]],
    visible_plugins: Sequence[PluginView],
) -> dict[str, dict[str, any_pb2.Any]]:
    """All xDS resources for one proxy.

    `chains`: listener name → its ordered plugins. `visible_plugins`: every plugin the proxy may
    fetch by ECDS name (its namespace and the root namespace, as istiod's WasmPluginsByName).
    """
    listeners: dict[str, any_pb2.Any] = {}
    routes: dict[str, any_pb2.Any] = {}
    clusters: dict[str, any_pb2.Any] = {}
    if workload is not None:
        for spec in workload.listeners:
            listeners[spec.name] = pack(build_listener(spec, chains.get(spec.name, ())))
            routes[spec.name] = pack(build_route_configuration(spec))
        for cluster in workload.clusters:
            clusters[cluster.name] = pack(build_cluster(cluster))
    extensions = {plugin.resource_name: pack(build_extension_config(plugin)) for plugin in visible_plugins}
    return {
        types.LISTENER: listeners,
        types.ROUTE: routes,
        types.CLUSTER: clusters,
        types.EXTENSION_CONFIG: extensions,
    }
