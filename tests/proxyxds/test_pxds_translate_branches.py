"""xDS → proxy model translation, branch by branch: every matcher, action, code source, configuration
payload, failure policy and filter kind, and the one-line error each unusable field gets."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, extension_pb2, http_uri_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.wasm.v3 import wasm_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import duration_pb2, message, struct_pb2, wrappers_pb2

from wasmesh.controlplane.translate import pack
from wasmesh.proxy.config import DirectResponse, HeaderMatch, ListenerConfig, RouteConfig, RouteMatch
from wasmesh.proxy.xds import (
    RbacFilterSpec,
    WasmFilterSpec,
    XdsConfigError,
    _port_taken,
    parse_labels,
    translate_cluster,
    translate_filter,
    translate_listener,
    translate_resources,
    translate_route_configuration,
)
from wasmesh.xds import types

# --------------------------------------------------------------------------- builders


def _address(host: str = "127.0.0.1", port: int = 8080) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _cluster(*addresses: address_pb2.Address, **fields: object) -> cluster_pb2.Cluster:
    endpoints = [
        endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=a))
        for a in addresses
    ]
    return cluster_pb2.Cluster(
        name="svc",
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name="svc",
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)],
        ),
        **fields,
    )


def _routes(*routes: route_components_pb2.Route) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name="rc", virtual_hosts=[route_components_pb2.VirtualHost(name="vh", domains=["*"], routes=routes)]
    )


def _to_cluster(match: route_components_pb2.RouteMatch) -> route_components_pb2.Route:
    return route_components_pb2.Route(match=match, route=route_components_pb2.RouteAction(cluster="svc"))


def _only_route(route: route_components_pb2.Route) -> RouteConfig:
    (host,) = translate_route_configuration(_routes(route))
    (translated,) = host.routes
    return translated


def _header_route(matcher: route_components_pb2.HeaderMatcher) -> HeaderMatch:
    route = _only_route(_to_cluster(route_components_pb2.RouteMatch(prefix="/", headers=[matcher])))
    (header,) = route.match.headers
    assert isinstance(header, HeaderMatch)
    return header


def _wasm(config: wasm_pb2.PluginConfig, name: str = "ext") -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(http_wasm_pb2.Wasm(config=config)))


def _local_code(filename: str = "/m.wasm") -> wasm_pb2.VmConfig:
    return wasm_pb2.VmConfig(code=base_pb2.AsyncDataSource(local=base_pb2.DataSource(filename=filename)))


def _listener(manager: hcm_pb2.HttpConnectionManager, **fields: object) -> listener_pb2.Listener:
    network_filter = listener_components_pb2.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=pack(manager)
    )
    return listener_pb2.Listener(
        name="l",
        address=_address(port=9000),
        filter_chains=[listener_components_pb2.FilterChain(filters=[network_filter])],
        **fields,
    )


ROUTER = hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))
NO_RESOURCES: dict[str, message.Message] = {}


def _inline_manager(*filters: hcm_pb2.HttpFilter, **fields: object) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        route_config=_routes(_to_cluster(route_components_pb2.RouteMatch(prefix="/"))),
        http_filters=[*filters, ROUTER],
        **fields,
    )


# --------------------------------------------------------------------------- clusters


def test_cluster_endpoints_timeout_and_defaults() -> None:
    cluster = _cluster(
        _address("10.0.0.1", 80),
        _address("10.0.0.2", 81),
        connect_timeout=duration_pb2.Duration(nanos=250_000_000),
    )
    config = translate_cluster(cluster)
    assert (config.name, config.endpoints, config.connect_timeout_s) == (
        "svc",
        (("10.0.0.1", 80), ("10.0.0.2", 81)),
        0.25,
    )
    assert translate_cluster(_cluster(_address())).connect_timeout_s == 5.0  # Envoy's default


@pytest.mark.parametrize(
    ("cluster", "error"),
    [
        (_cluster(), "cluster svc: load_assignment: at least one endpoint is required"),
        (
            _cluster(address_pb2.Address(pipe=address_pb2.Pipe(path="/tmp/s"))),
            "cluster svc: load_assignment.endpoints[0].lb_endpoints[0].endpoint.address: "
            "only socket_address is supported",
        ),
        (
            _cluster(
                address_pb2.Address(socket_address=address_pb2.SocketAddress(address="h", named_port="http"))
            ),
            "cluster svc: load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.port_value: "
            "required (named ports are not supported)",
        ),
        (
            _cluster(address_pb2.Address(socket_address=address_pb2.SocketAddress(port_value=80))),
            "cluster svc: load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.address: required",
        ),
        (
            cluster_pb2.Cluster(name="svc", cluster_type=cluster_pb2.Cluster.CustomClusterType(name="x")),
            "cluster svc: cluster_type: custom cluster types are not supported",
        ),
    ],
    ids=["no-endpoints", "pipe", "named-port", "no-address", "custom-type"],
)
def test_cluster_errors_name_the_field(cluster: cluster_pb2.Cluster, error: str) -> None:
    with pytest.raises(XdsConfigError) as caught:
        translate_cluster(cluster)
    assert str(caught.value) == error


# --------------------------------------------------------------------------- routes


def test_path_matchers_and_route_action_fields() -> None:
    exact = _only_route(_to_cluster(route_components_pb2.RouteMatch(path="/exact")))
    assert exact.match == RouteMatch(exact="/exact")
    regex = _only_route(
        _to_cluster(route_components_pb2.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex="/r/[0-9]+")))
    )
    assert regex.match == RouteMatch(regex="/r/[0-9]+")
    action = route_components_pb2.RouteAction(
        cluster="svc",
        timeout=duration_pb2.Duration(seconds=3),
        prefix_rewrite="/v2",
        host_rewrite_literal="internal",
    )
    full = _only_route(
        route_components_pb2.Route(name="r", match=route_components_pb2.RouteMatch(prefix="/"), route=action)
    )
    assert (full.name, full.cluster, full.timeout_s, full.prefix_rewrite, full.host_rewrite) == (
        "r",
        "svc",
        3.0,
        "/v2",
        "internal",
    )
    unnamed = _only_route(_to_cluster(route_components_pb2.RouteMatch(prefix="/")))
    assert (unnamed.name, unnamed.timeout_s) == ("route-0", 15.0)


def test_direct_response_inline_string_and_bytes() -> None:
    def direct(body: base_pb2.DataSource) -> RouteConfig:
        return _only_route(
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                direct_response=route_components_pb2.DirectResponseAction(status=204, body=body),
            )
        )

    assert direct(base_pb2.DataSource(inline_string="ok")).direct_response == DirectResponse(204, "ok")
    assert direct(base_pb2.DataSource(inline_bytes=b"b\xff")).direct_response == DirectResponse(
        204, "b\ufffd"
    )


@pytest.mark.parametrize(
    ("route", "error"),
    [
        (
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(path_separated_prefix="/p"),
                route=route_components_pb2.RouteAction(cluster="svc"),
            ),
            "route configuration rc: virtual_hosts[0].routes[0].match: path matcher path_separated_prefix "
            "is not supported",
        ),
        (
            route_components_pb2.Route(route=route_components_pb2.RouteAction(cluster="svc")),
            "route configuration rc: virtual_hosts[0].routes[0].match: path matcher (none) is not supported",
        ),
        (
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                redirect=route_components_pb2.RedirectAction(host_redirect="x"),
            ),
            "route configuration rc: virtual_hosts[0].routes[0]: action redirect is not supported "
            "(route, direct_response)",
        ),
        (
            route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/")),
            "route configuration rc: virtual_hosts[0].routes[0]: action (none) is not supported "
            "(route, direct_response)",
        ),
        (
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(cluster_header="x-cluster"),
            ),
            "route configuration rc: virtual_hosts[0].routes[0].route: "
            "only a single named cluster is supported",
        ),
    ],
    ids=["path-separated-prefix", "no-path-matcher", "redirect", "no-action", "cluster-header"],
)
def test_route_errors_name_the_field(route: route_components_pb2.Route, error: str) -> None:
    with pytest.raises(XdsConfigError) as caught:
        translate_route_configuration(_routes(route))
    assert str(caught.value) == error


def test_virtual_host_defaults() -> None:
    config = route_pb2.RouteConfiguration(name="rc", virtual_hosts=[route_components_pb2.VirtualHost()])
    (host,) = translate_route_configuration(config)
    assert (host.name, host.domains, host.routes) == ("vhost-0", ("*",), ())
    named = route_pb2.RouteConfiguration(
        virtual_hosts=[route_components_pb2.VirtualHost(name="api", domains=["API.example.com"])]
    )
    assert translate_route_configuration(named)[0].domains == ("api.example.com",)


StringMatcher = string_pb2.StringMatcher
HeaderMatcher = route_components_pb2.HeaderMatcher


def _matcher(**fields: object) -> route_components_pb2.HeaderMatcher:
    return HeaderMatcher(name="X-A", **fields)


def _match(**fields: object) -> HeaderMatch:
    return HeaderMatch(name="x-a", **fields)  # type: ignore[arg-type]


def _regex(text: str) -> regex_pb2.RegexMatcher:
    return regex_pb2.RegexMatcher(regex=text)


@pytest.mark.parametrize(
    ("matcher", "expected"),
    [
        (_matcher(), _match(present=True)),
        (_matcher(present_match=False), _match(present=False)),
        (_matcher(exact_match="v", invert_match=True), _match(exact="v", invert=True)),
        (_matcher(prefix_match="v"), _match(prefix="v")),
        (_matcher(safe_regex_match=_regex("v+")), _match(regex="v+")),
        (_matcher(suffix_match=".v"), _match(regex=r".*\.v")),
        (_matcher(contains_match="a.b"), _match(regex=r".*a\.b.*")),
        (_matcher(string_match=StringMatcher(exact="v")), _match(exact="v")),
        (_matcher(string_match=StringMatcher(prefix="v")), _match(prefix="v")),
        (_matcher(string_match=StringMatcher(safe_regex=_regex("v."))), _match(regex="v.")),
        (_matcher(string_match=StringMatcher(suffix="+")), _match(regex=r".*\+")),
        (_matcher(string_match=StringMatcher(contains="(")), _match(regex=r".*\(.*")),
    ],
    ids=[
        "no-specifier", "present-false", "exact-inverted", "prefix", "regex", "suffix", "contains",
        "string-exact", "string-prefix", "string-regex", "string-suffix", "string-contains",
    ],
)  # fmt: skip
def test_header_matchers(matcher: route_components_pb2.HeaderMatcher, expected: HeaderMatch) -> None:
    assert _header_route(matcher) == expected


def test_unsupported_header_and_string_matchers_name_the_field() -> None:
    where = "route configuration rc: virtual_hosts[0].routes[0].match.headers[0]"
    range_match = HeaderMatcher(name="x-a", range_match={"start": 1, "end": 2})
    with pytest.raises(XdsConfigError) as caught:
        _header_route(range_match)
    assert str(caught.value) == f"{where}: unsupported header matcher range_match"
    empty_string = HeaderMatcher(name="x-a", string_match=StringMatcher())
    with pytest.raises(XdsConfigError) as caught:
        _header_route(empty_string)
    assert str(caught.value) == f"{where}: unsupported string matcher None"


# --------------------------------------------------------------------------- ECDS filters


def test_wasm_configuration_payloads_and_failure_policies() -> None:
    def spec(**fields: object) -> WasmFilterSpec:
        translated = translate_filter(_wasm(wasm_pb2.PluginConfig(vm_config=_local_code(), **fields)))
        assert isinstance(translated, WasmFilterSpec)
        return translated

    assert spec(configuration=pack(wrappers_pb2.StringValue(value="text"))).configuration == b"text"
    assert spec(configuration=pack(wrappers_pb2.BytesValue(value=b"\x00raw"))).configuration == b"\x00raw"
    other = struct_pb2.Struct(fields={"k": struct_pb2.Value(string_value="v")})
    assert spec(configuration=pack(other)).configuration == other.SerializeToString()
    assert spec().configuration == b""
    assert spec().plugin_name == "ext"  # no PluginConfig.name: the resource name's last segment
    assert spec(name="ns.p").plugin_name == "ns.p"
    assert spec().failure_policy == "FAIL_CLOSE"
    assert spec(fail_open=True).failure_policy == "FAIL_OPEN"  # the deprecated bool
    assert spec(failure_policy=wasm_pb2.FAIL_RELOAD).failure_policy == "FAIL_RELOAD"
    assert spec(failure_policy=wasm_pb2.FAIL_CLOSED, fail_open=True).failure_policy == "FAIL_CLOSE"


def test_wasm_vm_fields_and_remote_code() -> None:
    remote = wasm_pb2.VmConfig(
        vm_id="vm-1",
        code=base_pb2.AsyncDataSource(
            remote=base_pb2.RemoteDataSource(
                http_uri=http_uri_pb2.HttpUri(uri="https://h/m.wasm"), sha256="ab"
            )
        ),
        environment_variables=wasm_pb2.EnvironmentVariables(
            host_env_keys=["HOME"],
            key_values={
                "A": "1",
                "ISTIO_META_WASM_IMAGE_PULL_SECRET": "s",
                "ISTIO_META_WASM_IMAGE_PULL_POLICY": "Always",
            },
        ),
    )
    spec = translate_filter(_wasm(wasm_pb2.PluginConfig(root_id="root", vm_config=remote)))
    assert spec == WasmFilterSpec(
        resource_name="ext",
        plugin_name="ext",
        root_id="root",
        configuration=b"",
        failure_policy="FAIL_CLOSE",
        vm_id="vm-1",
        remote_url="https://h/m.wasm",
        sha256="ab",
        pull_policy="Always",
        pull_secret="s",
        env=(("A", "1"),),  # remote code: the agent's ISTIO_META_* keys are consumed, not passed on
        host_env_keys=("HOME",),
    )


@pytest.mark.parametrize(
    ("extension", "error"),
    [
        (
            _wasm(wasm_pb2.PluginConfig(vm_config=wasm_pb2.VmConfig(
                code=base_pb2.AsyncDataSource(local=base_pb2.DataSource(inline_bytes=b"\x00asm"))))),
            "extension config ext: vm_config.code.local: only filename is supported, got inline_bytes",
        ),
        (
            _wasm(wasm_pb2.PluginConfig(vm_config=wasm_pb2.VmConfig(
                code=base_pb2.AsyncDataSource(remote=base_pb2.RemoteDataSource(sha256="ab"))))),
            "extension config ext: vm_config.code.remote.http_uri.uri: required",
        ),
        (
            _wasm(wasm_pb2.PluginConfig()),
            "extension config ext: vm_config.code: local or remote is required",
        ),
        (
            extension_pb2.TypedExtensionConfig(name="ext", typed_config=pack(router_pb2.Router())),
            f"extension config ext: typed_config {types.HTTP_ROUTER} is not supported",
        ),
        (
            extension_pb2.TypedExtensionConfig(name="ext", typed_config=pack(
                http_rbac_pb2.RBAC(rules=rbac_pb2.RBAC(policies={"p": rbac_pb2.Policy()})))),
            "extension config ext: RBAC rules.policies are not supported (only deny-all / allow-all)",
        ),
        (
            extension_pb2.TypedExtensionConfig(name="ext", typed_config=pack(
                http_rbac_pb2.RBAC(matcher={}))),
            "extension config ext: RBAC matcher is not supported",
        ),
    ],
    ids=["inline-bytes", "remote-without-uri", "no-code", "router-as-ecds", "rbac-policies", "rbac-matcher"],
)  # fmt: skip
def test_filter_errors_name_the_resource_and_field(
    extension: extension_pb2.TypedExtensionConfig, error: str
) -> None:
    with pytest.raises(XdsConfigError) as caught:
        translate_filter(extension)
    assert str(caught.value) == error


def test_rbac_actions_and_stat_prefix() -> None:
    def rbac(rules: rbac_pb2.RBAC) -> RbacFilterSpec | WasmFilterSpec:
        packed = pack(http_rbac_pb2.RBAC(rules=rules, rules_stat_prefix="p."))
        return translate_filter(extension_pb2.TypedExtensionConfig(name="r", typed_config=packed))

    assert rbac(rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)) == RbacFilterSpec(
        "r", allow=False, stat_prefix="p."
    )
    assert rbac(rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)) == RbacFilterSpec("r", allow=True, stat_prefix="p.")
    assert rbac(rbac_pb2.RBAC(action=rbac_pb2.RBAC.LOG)) == RbacFilterSpec("r", allow=True, stat_prefix="p.")


# --------------------------------------------------------------------------- listeners


def test_inline_route_config_inline_filters_optional_filters_and_manager_fields() -> None:
    inline_wasm = hcm_pb2.HttpFilter(
        name="inline-wasm",
        typed_config=pack(http_wasm_pb2.Wasm(config=wasm_pb2.PluginConfig(vm_config=_local_code("/i.wasm")))),
    )
    inline_rbac = hcm_pb2.HttpFilter(name="inline-rbac", typed_config=pack(http_rbac_pb2.RBAC()))
    optional = hcm_pb2.HttpFilter(name="cors", typed_config=pack(struct_pb2.Struct()), is_optional=True)
    manager = _inline_manager(
        inline_wasm,
        optional,
        inline_rbac,
        use_remote_address=wrappers_pb2.BoolValue(value=False),
        generate_request_id=wrappers_pb2.BoolValue(value=False),
    )
    from envoy.config.core.v3 import base_pb2 as core_base

    plan = translate_listener(_listener(manager, traffic_direction=core_base.OUTBOUND), {}, {})
    assert not isinstance(plan, tuple)
    assert [type(f).__name__ for f in plan.filters] == ["WasmFilterSpec", "RbacFilterSpec"]
    assert plan.filters[1] == RbacFilterSpec("inline-rbac", allow=True)
    assert isinstance(plan.filters[0], WasmFilterSpec) and plan.filters[0].local_filename == "/i.wasm"
    config = plan.config
    assert isinstance(config, ListenerConfig)
    assert (config.name, config.address, config.port, config.direction) == ("l", "127.0.0.1", 9000, 2)
    assert (config.use_remote_address, config.generate_request_id) == (False, False)
    assert config.virtual_hosts[0].routes[0].cluster == "svc"
    defaults = translate_listener(_listener(_inline_manager()), {}, {})
    assert not isinstance(defaults, tuple)
    assert (defaults.config.use_remote_address, defaults.config.generate_request_id) == (True, True)
    assert defaults.config.direction == 0


def test_manager_limits_and_timeouts_reach_the_listener() -> None:
    """What the control plane sets on the HCM bounds the listener as it bounds Envoy's; unset: defaults."""
    from envoy.config.core.v3 import protocol_pb2

    manager = _inline_manager(
        max_request_headers_kb=wrappers_pb2.UInt32Value(value=8),
        request_headers_timeout=duration_pb2.Duration(seconds=2, nanos=500_000_000),
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            max_headers_count=wrappers_pb2.UInt32Value(value=20),
            idle_timeout=duration_pb2.Duration(seconds=30),
        ),
        http_protocol_options=protocol_pb2.Http1ProtocolOptions(accept_http_10=True),
    )
    plan = translate_listener(_listener(manager), {}, {})
    assert not isinstance(plan, tuple)
    limits = plan.config
    assert (limits.max_request_headers_kb, limits.max_headers_count) == (8, 20)
    assert (limits.request_headers_timeout_s, limits.idle_timeout_s) == (2.5, 30.0)
    assert limits.accept_http_10 is True
    defaults = translate_listener(_listener(_inline_manager()), {}, {})
    assert not isinstance(defaults, tuple)
    unset = ListenerConfig(name="x", address="127.0.0.1", port=1, virtual_hosts=())
    assert (defaults.config.max_request_headers_kb, defaults.config.max_headers_count) == (
        unset.max_request_headers_kb, unset.max_headers_count
    )
    assert (defaults.config.request_headers_timeout_s, defaults.config.idle_timeout_s) == (
        unset.request_headers_timeout_s, unset.idle_timeout_s
    )
    assert defaults.config.accept_http_10 is False


@pytest.mark.parametrize(
    ("listener", "error"),
    [
        (
            listener_pb2.Listener(name="l", address=_address()),
            "listener l: filter_chains: an HTTP connection manager is required",
        ),
        (
            _listener(hcm_pb2.HttpConnectionManager(http_filters=[ROUTER])),
            "listener l: http connection manager: rds or route_config is required",
        ),
        (
            _listener(_inline_manager(ROUTER)),
            "listener l: http_filters[0]: the router must be the last filter",
        ),
        (
            _listener(
                _inline_manager(hcm_pb2.HttpFilter(name="cors", typed_config=pack(struct_pb2.Struct())))
            ),
            "listener l: http_filters[0] cors: type.googleapis.com/google.protobuf.Struct is not supported",
        ),
        (
            listener_pb2.Listener(name="l"),
            "listener l: address.socket_address: only socket_address is supported",
        ),
    ],
    ids=["no-manager", "no-routes", "router-not-last", "unsupported-filter", "no-address"],
)
def test_listener_errors_name_the_field(listener: listener_pb2.Listener, error: str) -> None:
    with pytest.raises(XdsConfigError) as caught:
        translate_listener(listener, {}, {})
    assert str(caught.value) == error


def test_resources_of_the_wrong_message_type_are_ignored() -> None:
    listener = _listener(_inline_manager())
    plan = translate_resources(
        {
            types.LISTENER: {"l": listener, "odd": _routes()},
            types.ROUTE: {"odd": listener},
            types.CLUSTER: {"svc": _cluster(_address()), "odd": listener},
            types.EXTENSION_CONFIG: {"odd": listener},
        }
    )
    assert sorted(plan.listeners) == ["l"] and not plan.warming
    assert [c.name for c in plan.clusters] == ["svc"]


# --------------------------------------------------------------------------- small helpers


def test_port_taken_by_same_address_or_wildcards() -> None:
    def listener(address: str, port: int) -> ListenerConfig:
        return ListenerConfig(name="x", address=address, port=port, virtual_hosts=())

    assert _port_taken(listener("127.0.0.1", 80), [("127.0.0.1", 80)]) is True
    assert _port_taken(listener("127.0.0.1", 80), [("127.0.0.2", 80)]) is False
    assert _port_taken(listener("127.0.0.1", 80), [("127.0.0.1", 81)]) is False
    assert _port_taken(listener("0.0.0.0", 80), [("127.0.0.1", 80)]) is True
    assert _port_taken(listener("127.0.0.1", 80), [("::", 80)]) is True
    assert _port_taken(listener("127.0.0.1", 0), [("127.0.0.1", 0)]) is False  # any free port: no clash
    assert _port_taken(listener("127.0.0.1", 80), []) is False


def test_parse_labels() -> None:
    assert parse_labels(" app = web ,, tier=edge,empty=") == (("app", "web"), ("tier", "edge"), ("empty", ""))
    assert parse_labels("") == ()
    for bad in ("app", "=web"):
        with pytest.raises(ValueError) as caught:
            parse_labels(bad)
        assert str(caught.value) == f"--labels: expected k=v[,k=v...], got {bad!r}"
