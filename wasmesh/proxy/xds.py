"""wasmesh proxies as xDS clients: accepted ADS state → ProxyConfig + plugin chains, hot-applied.

Three layers, kept apart:

* **Translation** (`translate_resources`, pure): Listener / RouteConfiguration / Cluster protos and
  ECDS `TypedExtensionConfig`s → an `XdsPlan`: `ListenerConfig`/`ClusterConfig` values of the
  proxy's own config model plus, per listener, its ordered HTTP filters as `WasmFilterSpec` /
  `RbacFilterSpec`. A listener whose route configuration or ECDS resources have not arrived is
  *warming* (Envoy's term): it is listed in `XdsPlan.warming`, not in `XdsPlan.listeners`.
* **Chain building** (`XdsChainBuilder`): filter specs → a `PluginChain` — Wasm modules come from
  `vm_config.code.local.filename` or, for `remote`, through the agent's verified `ModuleCache`
  (sha256 checked); RBAC deny-all/allow-all (what `wasmesh agent` substitutes when a fetch fails)
  becomes a small Python filter answering 403 / passing through.
* **Applying** (`XdsProxy`): drives a `ProxyServer` from an `XdsClient`. Every update is applied
  *before* it is ACKed (inside the client's `validate` hook, as Envoy applies before ACKing), so a
  plugin that fails to load NACKs the update (`RejectUpdate`, one line) and the last good config
  keeps serving. Unlike `ProxyServer.apply_config` (files: fixed listener set), listeners come and
  go here: new ones are bound, removed ones stop accepting and drain. An update is all or nothing: a
  listener that cannot bind NACKs it (naming listener, address and errno text), and every listener of
  the last good state keeps serving — also one whose port the update had to free (it is bound again).

Warming: a listener that exists keeps serving its previous routes and chain while its new version
warms; a new listener is not bound until everything it references has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import duration_pb2, json_format, message, wrappers_pb2

from wasmesh.http.filter import (
    HttpFilter,
    HttpFilterFactory,
)
from wasmesh.http.local_reply import LocalReplyFilter
from wasmesh.proxy.chain import PluginChain
from wasmesh.proxy.config import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_ROUTE_TIMEOUT_S,
    CacheConfig,
    ClusterConfig,
    ConfigError,
    DirectResponse,
    HeaderMatch,
    ListenerConfig,
    PluginResource,
    ProxyConfig,
    RouteConfig,
    RouteMatch,
    VirtualHostConfig,
    WasmLimits,
)
from wasmesh.proxy.connection import Listener
from wasmesh.proxy.plugins import RuntimeChainBuilder, one_line, vm_env
from wasmesh.proxy.server import ProxyServer
from wasmesh.security.workload import WorkloadCertificates, XdsTlsOptions
from wasmesh.xds import types
from wasmesh.xds.client import ClientSnapshot, RejectUpdate, XdsClient, build_node, http_connection_manager

if TYPE_CHECKING:
    from wasmesh.proxy.admin import AdminHandlers
    from wasmesh.runtime.plugin import PluginSpec

log = logging.getLogger("wasmesh.proxy.xds")

ROUTER_FILTER = "envoy.filters.http.router"
# ISTIO_META_* VM env keys carry control plane → agent metadata (pull policy, secret, resource
# version). For remote code they are consumed here and stripped, as istio-agent strips them before
# Envoy sees the config; local code passes through with them, as it does through the agent. (The
# resource version in the env is also why two plugins of one module get separate VMs, as in Envoy.)


class XdsConfigError(ValueError):
    """An xDS resource the proxy cannot use; one line naming the resource and field."""


# --------------------------------------------------------------------------- plan model


@dataclass(frozen=True)
class WasmFilterSpec:
    """One ECDS `envoy.extensions.filters.http.wasm.v3.Wasm` filter, ready for the runtime."""

    resource_name: str  # the ECDS name, e.g. extensions.istio.io/wasmplugin/default.tracking
    plugin_name: str  # PluginConfig.name, e.g. default.tracking (the runtime's plugin name)
    root_id: str
    configuration: bytes
    failure_policy: str  # FAIL_CLOSE | FAIL_OPEN | FAIL_RELOAD (wasmesh.runtime.FailurePolicy names)
    vm_id: str = ""
    local_filename: str = ""
    remote_url: str = ""
    sha256: str = ""
    pull_policy: str = ""
    pull_secret: str = ""
    resource_version: str = ""
    env: tuple[tuple[str, str], ...] = ()
    host_env_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class RbacFilterSpec:
    """An ECDS RBAC filter wasmesh understands: deny-all (403) or allow-all (pass through)."""

    resource_name: str
    allow: bool
    stat_prefix: str = ""


FilterSpec = WasmFilterSpec | RbacFilterSpec


@dataclass(frozen=True)
class ListenerPlan:
    config: ListenerConfig
    filters: tuple[FilterSpec, ...]


@dataclass(frozen=True)
class XdsPlan:
    """What the proxy should serve for one consistent xDS state."""

    listeners: Mapping[str, ListenerPlan] = field(default_factory=dict)
    clusters: tuple[ClusterConfig, ...] = ()
    # Listener name → what it still waits for (route config / ECDS names): Envoy's warming.
    warming: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


# --------------------------------------------------------------------------- translation


def _seconds(duration: duration_pb2.Duration) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def _socket_address(address: address_pb2.Address, where: str) -> tuple[str, int]:
    if not address.HasField("socket_address"):
        raise XdsConfigError(f"{where}: only socket_address is supported")
    socket_address = address.socket_address
    if socket_address.WhichOneof("port_specifier") != "port_value":
        raise XdsConfigError(f"{where}.port_value: required (named ports are not supported)")
    if not socket_address.address:
        raise XdsConfigError(f"{where}.address: required")
    return socket_address.address, int(socket_address.port_value)


def translate_cluster(cluster: cluster_pb2.Cluster) -> ClusterConfig:
    """A STATIC cluster with inline `load_assignment` endpoints."""
    where = f"cluster {cluster.name}"
    kind = cluster.WhichOneof("cluster_discovery_type")
    if kind == "type" and cluster.type not in (cluster_pb2.Cluster.STATIC, cluster_pb2.Cluster.STRICT_DNS):
        name = cluster_pb2.Cluster.DiscoveryType.Name(cluster.type)
        raise XdsConfigError(f"{where}: type: {name} is not supported (STATIC or STRICT_DNS)")
    if kind == "cluster_type":
        raise XdsConfigError(f"{where}: cluster_type: custom cluster types are not supported")
    endpoints: list[tuple[str, int]] = []
    for li, locality in enumerate(cluster.load_assignment.endpoints):
        for ei, lb_endpoint in enumerate(locality.lb_endpoints):
            at = f"{where}: load_assignment.endpoints[{li}].lb_endpoints[{ei}].endpoint.address"
            endpoints.append(_socket_address(lb_endpoint.endpoint.address, at))
    if not endpoints:
        raise XdsConfigError(f"{where}: load_assignment: at least one endpoint is required")
    timeout = (
        _seconds(cluster.connect_timeout)
        if cluster.HasField("connect_timeout")
        else DEFAULT_CONNECT_TIMEOUT_S
    )
    return ClusterConfig(name=cluster.name, endpoints=tuple(endpoints), connect_timeout_s=timeout)


def _string_match(matcher: string_pb2.StringMatcher, where: str) -> tuple[str | None, str | None, str | None]:
    """(exact, prefix, regex) of a StringMatcher (suffix/contains become regexes)."""
    kind = matcher.WhichOneof("match_pattern")
    if kind == "exact":
        return matcher.exact, None, None
    if kind == "prefix":
        return None, matcher.prefix, None
    if kind == "safe_regex":
        return None, None, matcher.safe_regex.regex
    if kind == "suffix":
        return None, None, f".*{_escape(matcher.suffix)}"
    if kind == "contains":
        return None, None, f".*{_escape(matcher.contains)}.*"
    raise XdsConfigError(f"{where}: unsupported string matcher {kind}")


def _escape(text: str) -> str:
    return re.escape(text)


def _header_match(matcher: route_components_pb2.HeaderMatcher, where: str) -> HeaderMatch:
    kind = matcher.WhichOneof("header_match_specifier")
    name = matcher.name.lower()
    invert = matcher.invert_match
    if kind is None:
        return HeaderMatch(name=name, present=True, invert=invert)
    if kind == "present_match":
        return HeaderMatch(name=name, present=matcher.present_match, invert=invert)
    if kind == "exact_match":
        return HeaderMatch(name=name, exact=matcher.exact_match, invert=invert)
    if kind == "prefix_match":
        return HeaderMatch(name=name, prefix=matcher.prefix_match, invert=invert)
    if kind == "safe_regex_match":
        return HeaderMatch(name=name, regex=matcher.safe_regex_match.regex, invert=invert)
    if kind == "suffix_match":
        return HeaderMatch(name=name, regex=f".*{_escape(matcher.suffix_match)}", invert=invert)
    if kind == "contains_match":
        return HeaderMatch(name=name, regex=f".*{_escape(matcher.contains_match)}.*", invert=invert)
    if kind == "string_match":
        exact, prefix, regex = _string_match(matcher.string_match, where)
        return HeaderMatch(name=name, exact=exact, prefix=prefix, regex=regex, invert=invert)
    raise XdsConfigError(f"{where}: unsupported header matcher {kind}")


def _route(route: route_components_pb2.Route, where: str, index: int) -> RouteConfig:
    match = route.match
    kind = match.WhichOneof("path_specifier")
    if kind == "prefix":
        route_match = RouteMatch(prefix=match.prefix)
    elif kind == "path":
        route_match = RouteMatch(exact=match.path)
    elif kind == "safe_regex":
        route_match = RouteMatch(regex=match.safe_regex.regex)
    else:
        raise XdsConfigError(f"{where}.match: path matcher {kind or '(none)'} is not supported")
    headers = tuple(_header_match(h, f"{where}.match.headers[{i}]") for i, h in enumerate(match.headers))
    route_match = RouteMatch(
        prefix=route_match.prefix, exact=route_match.exact, regex=route_match.regex, headers=headers
    )
    name = route.name or f"route-{index}"
    action = route.WhichOneof("action")
    if action == "direct_response":
        body = route.direct_response.body.inline_string or route.direct_response.body.inline_bytes.decode(
            "utf-8", "replace"
        )
        return RouteConfig(
            name=name, match=route_match, direct_response=DirectResponse(route.direct_response.status, body)
        )
    if action != "route":
        raise XdsConfigError(
            f"{where}: action {action or '(none)'} is not supported (route, direct_response)"
        )
    route_action = route.route
    if route_action.WhichOneof("cluster_specifier") != "cluster":
        raise XdsConfigError(f"{where}.route: only a single named cluster is supported")
    timeout = _seconds(route_action.timeout) if route_action.HasField("timeout") else DEFAULT_ROUTE_TIMEOUT_S
    return RouteConfig(
        name=name,
        match=route_match,
        cluster=route_action.cluster,
        timeout_s=timeout,
        prefix_rewrite=route_action.prefix_rewrite or None,
        host_rewrite=route_action.host_rewrite_literal or None,
    )


def translate_route_configuration(routes: route_pb2.RouteConfiguration) -> tuple[VirtualHostConfig, ...]:
    hosts: list[VirtualHostConfig] = []
    for vi, host in enumerate(routes.virtual_hosts):
        where = f"route configuration {routes.name}: virtual_hosts[{vi}]"
        hosts.append(
            VirtualHostConfig(
                name=host.name or f"vhost-{vi}",
                domains=tuple(d.lower() for d in host.domains) or ("*",),
                routes=tuple(_route(r, f"{where}.routes[{ri}]", ri) for ri, r in enumerate(host.routes)),
            )
        )
    return tuple(hosts)


def translate_filter(extension: extension_pb2.TypedExtensionConfig) -> FilterSpec:
    """An ECDS resource → the filter spec it describes (Wasm, or RBAC deny-all / allow-all)."""
    type_url = extension.typed_config.type_url
    if type_url == types.HTTP_WASM:
        wasm = http_wasm_pb2.Wasm()
        extension.typed_config.Unpack(wasm)
        return _wasm_filter(extension.name, wasm.config)
    if type_url == types.HTTP_RBAC:
        rbac = http_rbac_pb2.RBAC()
        extension.typed_config.Unpack(rbac)
        return _rbac_filter(extension.name, rbac)
    raise XdsConfigError(f"extension config {extension.name}: typed_config {type_url} is not supported")


def _wasm_filter(resource_name: str, config: wasm_pb2.PluginConfig) -> WasmFilterSpec:
    where = f"extension config {resource_name}"
    code = config.vm_config.code
    local = remote = sha256 = ""
    if code.HasField("local"):
        kind = code.local.WhichOneof("specifier")
        if kind != "filename":
            raise XdsConfigError(f"{where}: vm_config.code.local: only filename is supported, got {kind}")
        local = code.local.filename
    elif code.HasField("remote"):
        remote = code.remote.http_uri.uri
        sha256 = code.remote.sha256
        if not remote:
            raise XdsConfigError(f"{where}: vm_config.code.remote.http_uri.uri: required")
    else:
        raise XdsConfigError(f"{where}: vm_config.code: local or remote is required")
    configuration = b""
    if config.configuration.type_url:
        if config.configuration.type_url.endswith("google.protobuf.StringValue"):
            holder = wrappers_pb2.StringValue()
            config.configuration.Unpack(holder)
            configuration = holder.value.encode()
        elif config.configuration.type_url.endswith("google.protobuf.BytesValue"):
            raw = wrappers_pb2.BytesValue()
            config.configuration.Unpack(raw)
            configuration = raw.value
        else:
            # Envoy hands other Any payloads to the plugin serialized; so do we.
            configuration = config.configuration.value
    variables = config.vm_config.environment_variables
    policy = types.STRATEGY_BY_FAILURE_POLICY.get(config.failure_policy, "FAIL_CLOSE")
    if config.failure_policy == wasm_pb2.UNSPECIFIED and config.fail_open:
        policy = "FAIL_OPEN"  # the deprecated bool, still honoured by Envoy
    return WasmFilterSpec(
        resource_name=resource_name,
        plugin_name=config.name or resource_name.rsplit("/", 1)[-1],
        root_id=config.root_id,
        configuration=configuration,
        failure_policy=policy,
        vm_id=config.vm_config.vm_id,
        local_filename=local,
        remote_url=remote,
        sha256=sha256,
        pull_policy=variables.key_values.get(types.ENV_PULL_POLICY, ""),
        pull_secret=variables.key_values.get(types.ENV_PULL_SECRET, ""),
        resource_version=variables.key_values.get(types.ENV_RESOURCE_VERSION, ""),
        env=tuple(
            sorted(
                (k, v)
                for k, v in variables.key_values.items()
                if local or not k.startswith(types.ISTIO_META_PREFIX)
            )
        ),
        host_env_keys=tuple(variables.host_env_keys),
    )


def _rbac_filter(resource_name: str, rbac: http_rbac_pb2.RBAC) -> RbacFilterSpec:
    # Istio's substitutes: allow-all is RBAC{} (no rules: everything passes); deny-all is
    # RBAC{rules: {}} (ALLOW action without policies: nothing matches, so everything is denied).
    if rbac.HasField("matcher") or rbac.HasField("shadow_matcher"):
        raise XdsConfigError(f"extension config {resource_name}: RBAC matcher is not supported")
    if not rbac.HasField("rules"):
        return RbacFilterSpec(resource_name, allow=True, stat_prefix=rbac.rules_stat_prefix)
    if rbac.rules.policies:
        raise XdsConfigError(
            f"extension config {resource_name}: RBAC rules.policies are not supported "
            "(only deny-all / allow-all)"
        )
    allow = rbac.rules.action != rbac_pb2.RBAC.ALLOW  # DENY/LOG with no policies deny nothing
    return RbacFilterSpec(resource_name, allow=allow, stat_prefix=rbac.rules_stat_prefix)


_L4_WARNED: set[tuple[str, str]] = set()


def _warn_network_plugins(listener: listener_pb2.Listener) -> None:
    """Log once per listener and plugin that a `type: NETWORK` WasmPlugin is skipped (L4 is not served)."""
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            if not network_filter.HasField("config_discovery"):
                continue
            key = (listener.name, network_filter.name)
            if key not in _L4_WARNED:
                _L4_WARNED.add(key)
                log.warning(
                    "listener %s: %s: type NETWORK: L4 (network filter) plugins are not served yet; skipped",
                    listener.name,
                    network_filter.name,
                )


def translate_listener(
    listener: listener_pb2.Listener,
    routes: Mapping[str, route_pb2.RouteConfiguration],
    extensions: Mapping[str, extension_pb2.TypedExtensionConfig],
) -> ListenerPlan | tuple[str, ...]:
    """The listener's plan, or the names it still waits for (route config, ECDS) while warming."""
    where = f"listener {listener.name}"
    address, port = _socket_address(listener.address, f"{where}: address.socket_address")
    _warn_network_plugins(listener)
    manager = http_connection_manager(listener)
    if manager is None:
        raise XdsConfigError(f"{where}: filter_chains: an HTTP connection manager is required")
    missing: list[str] = []
    virtual_hosts: tuple[VirtualHostConfig, ...] = ()
    route_kind = manager.WhichOneof("route_specifier")
    if route_kind == "rds":
        route_configuration = routes.get(manager.rds.route_config_name)
        if route_configuration is None:
            missing.append(manager.rds.route_config_name)
        else:
            virtual_hosts = translate_route_configuration(route_configuration)
    elif route_kind == "route_config":
        virtual_hosts = translate_route_configuration(manager.route_config)
    else:
        raise XdsConfigError(f"{where}: http connection manager: rds or route_config is required")
    filters: list[FilterSpec] = []
    for fi, http_filter in enumerate(manager.http_filters):
        if http_filter.HasField("config_discovery"):
            extension = extensions.get(http_filter.name)
            if extension is None:
                missing.append(http_filter.name)
            else:
                filters.append(translate_filter(extension))
            continue
        config_type = http_filter.typed_config.type_url
        if config_type == types.HTTP_ROUTER:
            if fi != len(manager.http_filters) - 1:
                raise XdsConfigError(f"{where}: http_filters[{fi}]: the router must be the last filter")
            continue
        if config_type in (types.HTTP_WASM, types.HTTP_RBAC):
            inline = extension_pb2.TypedExtensionConfig(
                name=http_filter.name, typed_config=http_filter.typed_config
            )
            filters.append(translate_filter(inline))
            continue
        if http_filter.is_optional:
            continue
        raise XdsConfigError(
            f"{where}: http_filters[{fi}] {http_filter.name}: {config_type} is not supported"
        )
    if missing:
        return tuple(missing)
    direction = {1: 1, 2: 2}.get(int(listener.traffic_direction), 0)
    config = ListenerConfig(
        name=listener.name,
        address=address,
        port=port,
        virtual_hosts=virtual_hosts,
        use_remote_address=manager.use_remote_address.value
        if manager.HasField("use_remote_address")
        else True,
        generate_request_id=(
            manager.generate_request_id.value if manager.HasField("generate_request_id") else True
        ),
        direction=direction,
        **_downstream_limits(manager),
    )
    return ListenerPlan(config=config, filters=tuple(filters))


def _downstream_limits(manager: hcm_pb2.HttpConnectionManager) -> dict[str, Any]:
    """The HCM's header limits, timeouts and HTTP/1.0 switch, where the control plane set them."""
    limits: dict[str, Any] = {}
    common = manager.common_http_protocol_options
    if manager.HasField("max_request_headers_kb"):
        limits["max_request_headers_kb"] = manager.max_request_headers_kb.value
    if common.HasField("max_headers_count"):
        limits["max_headers_count"] = common.max_headers_count.value
    if manager.HasField("request_headers_timeout"):
        limits["request_headers_timeout_s"] = manager.request_headers_timeout.ToTimedelta().total_seconds()
    if common.HasField("idle_timeout"):
        limits["idle_timeout_s"] = common.idle_timeout.ToTimedelta().total_seconds()
    if manager.HasField("http_protocol_options"):
        limits["accept_http_10"] = manager.http_protocol_options.accept_http_10
    return limits


def translate_resources(resources: Mapping[str, Mapping[str, message.Message]]) -> XdsPlan:
    """One consistent xDS state (type URL → name → unpacked resource) → what to serve."""
    routes = {
        k: v for k, v in resources.get(types.ROUTE, {}).items() if isinstance(v, route_pb2.RouteConfiguration)
    }
    extensions = {
        k: v
        for k, v in resources.get(types.EXTENSION_CONFIG, {}).items()
        if isinstance(v, extension_pb2.TypedExtensionConfig)
    }
    clusters = tuple(
        translate_cluster(c)
        for _, c in sorted(resources.get(types.CLUSTER, {}).items())
        if isinstance(c, cluster_pb2.Cluster)
    )
    listeners: dict[str, ListenerPlan] = {}
    warming: dict[str, tuple[str, ...]] = {}
    for name, listener in sorted(resources.get(types.LISTENER, {}).items()):
        if not isinstance(listener, listener_pb2.Listener):
            continue
        result = translate_listener(listener, routes, extensions)
        if isinstance(result, ListenerPlan):
            listeners[name] = result
        else:
            warming[name] = result
    return XdsPlan(listeners=listeners, clusters=clusters, warming=warming)


def translate_snapshot(snapshot: ClientSnapshot) -> XdsPlan:
    return translate_resources(snapshot.resources)


# --------------------------------------------------------------------------- RBAC filters

RBAC_DENIED_BODY = b"RBAC: access denied"
RBAC_DENIED_DETAILS = "rbac_access_denied_matched_policy[none]"


class DenyAllFilter(LocalReplyFilter):
    """Envoy's RBAC filter with an ALLOW policy set that matches nothing: 403 for every request."""

    def __init__(self) -> None:
        super().__init__(403, RBAC_DENIED_BODY, RBAC_DENIED_DETAILS)


class RbacFilterFactory:
    """deny-all → `DenyAllFilter` per stream; allow-all → no filter at all (nothing to check)."""

    def __init__(self, spec: RbacFilterSpec) -> None:
        self.name = spec.resource_name
        self.spec = spec

    def create_filter(self) -> HttpFilter | None:
        return None if self.spec.allow else DenyAllFilter()


# --------------------------------------------------------------------------- chain building


class XdsChainBuilder(RuntimeChainBuilder):
    """Loads filter specs into one worker's Runtime; also the ProxyServer's `ChainBuilder`."""

    async def fetch_module(self, spec: WasmFilterSpec) -> bytes:
        """The module bytes; XdsConfigError (one line naming the resource) when unavailable."""
        try:
            if spec.local_filename:
                return await asyncio.to_thread(Path(spec.local_filename).read_bytes)
            path = await self.module_cache().get(
                spec.remote_url,
                sha256=spec.sha256,
                pull_policy=spec.pull_policy or "UNSPECIFIED_POLICY",
                pull_secret=spec.pull_secret.encode(),
                resource_name=spec.resource_name,
                resource_version=spec.resource_version,
            )
            return await asyncio.to_thread(Path(path).read_bytes)
        except Exception as exc:  # noqa: BLE001 - any fetch failure becomes one line
            where = spec.local_filename or spec.remote_url
            reason = one_line(exc)
            raise XdsConfigError(f"{spec.resource_name}: cannot read module {where}: {reason}") from None

    def _plugin_spec(self, spec: WasmFilterSpec, module: bytes) -> PluginSpec:
        from wasmesh.runtime.plugin import FailurePolicy, PluginSpec

        return PluginSpec(
            name=spec.plugin_name,
            module=module,
            root_id=spec.root_id,
            vm_id=spec.vm_id,
            configuration=spec.configuration,
            env=vm_env(spec.env, spec.host_env_keys),
            failure_policy=FailurePolicy[spec.failure_policy],
            callback_deadline_ms=self.limits.callback_deadline_ms,
            memory_limit_bytes=self.limits.memory_limit_bytes,
        )

    async def build_filters(self, filters: Sequence[FilterSpec], generation: int) -> PluginChain:
        """A chain of the filters in order; XdsConfigError (one line) if any plugin cannot load."""
        wasm_specs = [f for f in filters if isinstance(f, WasmFilterSpec)]
        modules = dict(
            zip(
                [id(s) for s in wasm_specs],
                await asyncio.gather(*(self.fetch_module(s) for s in wasm_specs)),
                strict=True,
            )
        )

        def factory(spec: FilterSpec) -> HttpFilterFactory:
            if isinstance(spec, RbacFilterSpec):
                return RbacFilterFactory(spec)
            return self.load_plugin(
                self._plugin_spec(spec, modules[id(spec)]),
                lambda reason: XdsConfigError(f"{spec.resource_name}: {reason}"),
            )

        return self.assemble_chain(
            (factory(spec) for spec in filters), generation, [_describe(spec) for spec in filters]
        )

    # ChainBuilder protocol: ProxyServer only calls this for WasmPlugin documents, which xDS mode has none of.
    async def build(
        self, listener: ListenerConfig, resources: Sequence[PluginResource], generation: int
    ) -> PluginChain:
        if resources:
            raise ConfigError(f"{resources[0].source}: WasmPlugin documents are not used with --xds")
        return PluginChain(generation=generation)

    def _unload(self, factory: HttpFilterFactory) -> None:
        if isinstance(factory, RbacFilterFactory):
            return  # a Python filter: no VM behind it
        super()._unload(factory)


def _describe(spec: FilterSpec) -> dict[str, object]:
    if isinstance(spec, RbacFilterSpec):
        return {"name": spec.resource_name, "rbac": "allow-all" if spec.allow else "deny-all"}
    return {
        "name": spec.plugin_name,
        "ecds": spec.resource_name,
        "url": spec.remote_url or f"file://{spec.local_filename}",
        "root_id": spec.root_id,
        "fail_strategy": spec.failure_policy,
    }


# --------------------------------------------------------------------------- applying


_WILDCARDS = ("0.0.0.0", "::", "")


def _port_taken(config: ListenerConfig, wanted: Sequence[tuple[str, int]]) -> bool:
    """Whether a listener bound as `config` holds a port that one of `wanted` must bind."""
    if config.port == 0:
        return False
    return any(
        port == config.port and (address == config.address or {address, config.address} & set(_WILDCARDS))
        for address, port in wanted
    )


@dataclass
class _Installed:
    plan: ListenerPlan
    chain: PluginChain


class XdsProxy:
    """A ProxyServer fed by an XdsClient. `await start()`, then `await stop()`.

    proxy = XdsProxy("127.0.0.1:15010", "web-1", {"app": "web"}, namespace="default")
    await proxy.start()
    await proxy.wait_serving("http")   # the listener is bound and its chain loaded
    """

    def __init__(
        self,
        target: str,
        node_id: str,
        labels: Mapping[str, str] | None = None,
        *,
        namespace: str = "default",
        metadata: Mapping[str, Any] | None = None,
        cache: CacheConfig | None = None,
        reuse_port: bool = False,
        worker_id: int = 0,
        drain_timeout_s: float = 10.0,
        reconnect_max: float = 2.0,
        wasm_limits: WasmLimits | None = None,
        tls: XdsTlsOptions | None = None,
    ) -> None:
        """`tls`: connect over mTLS with a workload certificate for tls.identity; None: plain text."""
        self.target = target
        node = build_node(node_id, labels or {}, namespace, metadata)
        self.node: dict[str, Any] = json_format.MessageToDict(node, preserving_proto_field_name=True)
        holder: list[ProxyServer] = []
        self.builder = XdsChainBuilder(
            node=self.node,
            cache=cache,
            clusters=lambda: holder[0].clusters if holder else None,
            compile_cache_dir=os.environ.get("WASMESH_COMPILE_CACHE") or None,
            limits=wasm_limits,
        )
        bootstrap = ProxyConfig(
            listeners=(),
            clusters=(),
            node=self.node,
            wasm=self.builder.limits,
            source=f"xds://{target}",
            drain_timeout_s=drain_timeout_s,
        )
        self.server = ProxyServer(
            bootstrap, chain_builder=self.builder, reuse_port=reuse_port, worker_id=worker_id
        )
        holder.append(self.server)
        self.client = XdsClient(
            target,
            node_id,
            labels,
            namespace=namespace,
            metadata=metadata,
            on_update=self._on_update,
            validate=self._validate,
            reconnect_max=reconnect_max,
            tls=WorkloadCertificates(tls, target) if tls is not None else None,
        )
        self.installed: dict[str, _Installed] = {}
        self.plan = XdsPlan()
        self.applied_updates = 0
        self.rejected_updates = 0
        self.last_error = ""
        self._lock = asyncio.Lock()
        self._applied = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.server.start()  # no listeners yet: only the cluster manager and stats
        self._task = asyncio.create_task(self.client.run(), name=f"xds-{self.client.node.id}")

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        self.client.request_stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.server.stop(drain_timeout_s)

    def address(self, listener: str) -> tuple[str, int]:
        return self.server.listener_address(listener)

    async def wait_for(self, predicate: Callable[[XdsProxy], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate(self)` holds after some applied update."""
        async with self._applied:
            await asyncio.wait_for(self._applied.wait_for(lambda: predicate(self)), timeout)

    async def wait_serving(self, listener: str, timeout: float = 10.0) -> None:
        await self.wait_for(lambda p: listener in p.server.listeners, timeout)

    def chain_names(self, listener: str) -> list[str]:
        """The plugin names of a listener's current chain, in order."""
        installed = self.installed.get(listener)
        return [] if installed is None else list(installed.chain.names)

    # ------------------------------------------------------------------ xDS callbacks

    async def _validate(self, type_url: str, resources: Mapping[str, message.Message]) -> None:
        """Apply the candidate state before it is ACKed; a failure NACKs it (RejectUpdate)."""
        candidate = {k: dict(v) for k, v in self.client.snapshot.resources.items()}
        if type_url in types.WILDCARD_TYPES:
            candidate[type_url] = dict(resources)
        else:
            candidate.setdefault(type_url, {}).update(resources)
        try:
            plan = translate_resources(candidate)
            await self.apply(plan)
        except (XdsConfigError, ConfigError, OSError) as exc:
            self.rejected_updates += 1
            self.last_error = " ".join(str(exc).split())
            raise RejectUpdate(self.last_error) from None

    async def _on_update(self, snapshot: ClientSnapshot) -> None:
        # The accepted state normally equals what _validate applied; apply again only if it differs
        # (e.g. the client dropped resources no listener references any more).
        try:
            plan = translate_snapshot(snapshot)
            if plan != self.plan:
                await self.apply(plan)
        except (XdsConfigError, ConfigError, OSError) as exc:
            log.error("xDS update not applied, keeping the current configuration: %s", exc)

    # ------------------------------------------------------------------ apply

    async def apply(self, plan: XdsPlan) -> None:
        """Make the server serve `plan`; on error nothing changes and XdsConfigError/OSError is raised."""
        async with self._lock:
            await self._apply_locked(plan)
        async with self._applied:
            self._applied.notify_all()

    async def _apply_locked(self, plan: XdsPlan) -> None:
        server = self.server
        loop = asyncio.get_running_loop()
        assert server.clusters is not None, "XdsProxy.start() first"
        target: dict[str, ListenerPlan] = dict(plan.listeners)
        for name in plan.warming:  # keep serving the old version while the new one warms
            if name in self.installed:
                target[name] = self.installed[name].plan
        server.generation += 1
        generation = server.generation
        moved = {
            name
            for name, lp in target.items()
            if name in self.installed
            and (lp.config.address, lp.config.port)
            != (self.installed[name].plan.config.address, self.installed[name].plan.config.port)
        }
        removed = (set(self.installed) - set(target)) | moved
        to_bind = [name for name in target if name not in self.installed or name in moved]
        # All or nothing: a removed (or moved) listener keeps serving until the update commits. Only one
        # whose port a listener of this update binds closes first; if the update fails it is bound again.
        wanted = [(target[name].config.address, target[name].config.port) for name in to_bind]
        must_free = sorted(name for name in removed if _port_taken(self.installed[name].plan.config, wanted))
        new_chains: dict[str, PluginChain] = {}
        bound: dict[str, Listener] = {}
        freed: list[str] = []
        try:
            for name, listener_plan in target.items():
                # A listener bound anew (also a moved one) gets its own chain; the old one drains with it.
                if name in to_bind or self.installed[name].plan.filters != listener_plan.filters:
                    new_chains[name] = await self.builder.build_filters(listener_plan.filters, generation)
            for name in must_free:
                server.listeners[name].stop_accepting()
                freed.append(name)
            for name in to_bind:
                config = target[name].config
                listener = Listener(config, server.clusters, server.stats, self.node, loop)
                listener.chain = new_chains[name]
                try:
                    await listener.start(reuse_port=server.reuse_port)
                except OSError as exc:
                    raise XdsConfigError(
                        f"listener {name}: cannot listen on {config.address}:{config.port}: "
                        f"{os.strerror(exc.errno) if exc.errno else one_line(exc)}"
                    ) from None
                bound[name] = listener
        except BaseException:
            for listener in bound.values():
                listener.stop_accepting()
            for chain in new_chains.values():
                chain.retire()
            await self._restore(freed)
            self.server.stats.config_reload_failed += 1
            raise
        for name in removed:
            self._remove_listener(name)
        server.clusters.update(plan.clusters)
        for name, listener_plan in target.items():
            if name in bound:
                server.listeners[name] = bound[name]
                self.installed[name] = _Installed(listener_plan, bound[name].chain)
                continue
            listener = server.listeners[name]
            listener.update_routes(listener_plan.config)
            listener.node = self.node
            if name in new_chains:
                listener.swap_chain(new_chains[name])
            self.installed[name] = _Installed(listener_plan, listener.chain)
        server.config = ProxyConfig(
            listeners=tuple(target[name].config for name in sorted(target)),
            clusters=plan.clusters,
            node=self.node,
            wasm=self.builder.limits,
            source=f"xds://{self.target}",
            drain_timeout_s=server.config.drain_timeout_s,
        )
        server.stats.config_reload_total += 1
        self.plan = plan
        self.applied_updates += 1
        log.info(
            "xDS config applied: listeners %s%s",
            ", ".join(f"{n}({'+'.join(self.chain_names(n)) or 'no plugins'})" for n in sorted(target))
            or "none",
            f"; warming {', '.join(sorted(plan.warming))}" if plan.warming else "",
        )

    async def _restore(self, names: Sequence[str]) -> None:
        """Bind again the listeners a failed update had closed: the last good listeners keep serving."""
        for name in names:
            listener = self.server.listeners[name]
            try:
                await listener.start(reuse_port=self.server.reuse_port)
            except OSError as exc:
                # Someone took the port meanwhile: nothing can serve it; say so, keep the rest.
                log.error("listener %s: cannot listen again after a rejected update: %s", name, one_line(exc))

    def _remove_listener(self, name: str) -> None:
        listener = self.server.listeners.pop(name, None)
        self.installed.pop(name, None)
        if listener is None:
            return
        listener.stop_accepting()
        listener.start_draining()
        listener.chain.retire()  # its plugins unload once the draining exchanges finish

    # ------------------------------------------------------------------ admin

    def config_dump(self) -> dict[str, Any]:
        dump = self.server.config_dump()
        dump["xds"] = {
            "target": self.target,
            "node": self.node,
            "connected": self.client.connected,
            "versions": dict(self.client.snapshot.versions),
            "warming": {k: list(v) for k, v in self.plan.warming.items()},
            "applied_updates": self.applied_updates,
            "rejected_updates": self.rejected_updates,
            "last_error": self.last_error,
        }
        return dump

    def admin_handlers(self) -> AdminHandlers:
        from wasmesh.proxy.admin import AdminHandlers

        async def prometheus() -> str:
            return self.server.render_prometheus()

        async def config_dump() -> object:
            return self.config_dump()

        async def ready() -> bool:
            # Ready once the first LDS/CDS state has been applied (Envoy's initial fetch).
            return self.server.ready and self.applied_updates > 0

        return AdminHandlers(prometheus=prometheus, config_dump=config_dump, ready=ready)


# --------------------------------------------------------------------------- process entry points


@dataclass(frozen=True)
class XdsOptions:
    """What `wasmesh proxy --xds` was given (picklable: worker processes receive it)."""

    target: str
    node_id: str
    labels: tuple[tuple[str, str], ...] = ()
    namespace: str = "default"
    cache_dir: str | None = None
    insecure_registries: tuple[str, ...] = ()  # --insecure-registry and WASM_INSECURE_REGISTRIES
    allowed_file_dirs: tuple[str, ...] = ()  # --allowed-file-dir
    wasm_limits: WasmLimits = field(default_factory=WasmLimits)
    tls: XdsTlsOptions | None = None  # None: plain-text xDS (--plaintext)

    def proxy(self, *, reuse_port: bool = False, worker_id: int = 0) -> XdsProxy:
        cache = CacheConfig(
            dir=self.cache_dir,
            insecure_registries=self.insecure_registries,
            allowed_file_dirs=self.allowed_file_dirs,
        )
        return XdsProxy(
            self.target,
            self.node_id,
            dict(self.labels),
            namespace=self.namespace,
            cache=cache,
            reuse_port=reuse_port,
            worker_id=worker_id,
            wasm_limits=self.wasm_limits,
            tls=self.tls,
        )


def parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v2` → pairs; ValueError (one line naming --labels) when malformed."""
    pairs: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--labels: expected k=v[,k=v...], got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


async def serve_xds(
    options: XdsOptions,
    /,
    *,
    worker_id: int = 0,
    reuse_port: bool = False,
    admin_address: tuple[str, int] | None = None,
    report: Connection | None = None,
) -> int:
    """Run one xDS-driven worker until SIGTERM/SIGINT; returns the exit code."""
    from wasmesh.proxy.workers import run_worker_until_stopped

    proxy = options.proxy(reuse_port=reuse_port, worker_id=worker_id)
    await proxy.start()
    log.info("worker %d: xDS client of %s as node %s", worker_id, options.target, options.node_id)
    await run_worker_until_stopped(
        proxy.admin_handlers(),
        worker_id=worker_id,
        admin_address=admin_address,
        report=report,
        announcement={"xds": options.target, "node": options.node_id},
        in_flight=proxy.server.in_flight,
    )
    await proxy.stop()
    return 0


def run_xds_proxy(
    options: XdsOptions, *, workers: int = 1, admin: tuple[str, int] | None = None, log_level: str = "info"
) -> int:
    """Blocking entry point of `wasmesh proxy --xds`.

    With `--workers N` every worker process runs its own XdsClient (Envoy's workers share one
    main-thread client; separate processes are simpler and each keeps its own Runtime anyway).
    """
    from wasmesh.proxy.workers import Supervisor, install_uvloop, setup_logging

    setup_logging(log_level)
    install_uvloop()
    if workers <= 1:
        return asyncio.run(serve_xds(options, admin_address=admin))
    return asyncio.run(Supervisor(serve_xds, options, workers, admin, log_level).run())
