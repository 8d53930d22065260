"""Chain ordering (phase, priority, creation time, name, namespace) and workload/traffic selection."""

# Exact Istio/Kubernetes messages are kept on one line each, so some lines are long.
# ruff: noqa: E501

from __future__ import annotations

from datetime import UTC, datetime

from wasmplugin_api_helpers import DATA_DIR, spec_document

from wasmesh.api import load_documents, matches_traffic, matches_type, order_chain, parse_wasmplugin, selects
from wasmesh.api.model import ObjectMeta, PluginPhase, PluginType, WasmPlugin, WorkloadMode
from wasmesh.api.ordering import group_by_phase


def plugin(
    name: str,
    phase: PluginPhase = PluginPhase.UNSPECIFIED_PHASE,
    priority: int | None = None,
    namespace: str = "default",
    created: int | None = None,
) -> WasmPlugin:
    timestamp = datetime(2024, 1, 1, 0, 0, created, tzinfo=UTC) if created is not None else None
    return WasmPlugin(
        metadata=ObjectMeta(name=name, namespace=namespace, creation_timestamp=timestamp),
        url="oci://r/x:1",
        phase=phase,
        priority=priority,
    )


def names(plugins: list[WasmPlugin]) -> list[str]:
    return [f"{p.namespace}/{p.name}" for p in plugins]


def test_phases_in_chain_order() -> None:
    chain = order_chain(
        [
            plugin("none"),
            plugin("stats", PluginPhase.STATS),
            plugin("authz", PluginPhase.AUTHZ),
            plugin("authn", PluginPhase.AUTHN),
        ]
    )
    assert names(chain) == ["default/authn", "default/authz", "default/stats", "default/none"]


def test_priority_descending_and_unset_is_min_int32() -> None:
    chain = order_chain(
        [
            plugin("unset"),
            plugin("low", priority=-2147483647),
            plugin("high", priority=100),
            plugin("zero", priority=0),
        ]
    )
    assert names(chain) == ["default/high", "default/zero", "default/low", "default/unset"]


def test_ties_by_creation_time_then_name_then_namespace() -> None:
    chain = order_chain(
        [
            plugin("b", priority=1, created=5),
            plugin("a", priority=1, created=9),
            plugin("c", priority=1, created=1),
            plugin("d", priority=1, namespace="zz", created=5),
            plugin("d", priority=1, namespace="aa", created=5),
            plugin("never-stored", priority=1),  # no creationTimestamp: Go's zero time, first
        ]
    )
    assert names(chain) == ["default/never-stored", "default/c", "default/b", "aa/d", "zz/d", "default/a"]


def test_istio_docs_three_plugin_example_chain() -> None:
    documents = load_documents([DATA_DIR / "istio-docs-examples.yaml"])
    plugins = [
        parse_wasmplugin(d) for d in documents if d.name in ("openid-connect", "acl-check", "check-header")
    ]
    assert [p.name for p in order_chain(reversed(plugins))] == ["openid-connect", "acl-check", "check-header"]
    groups = group_by_phase(plugins)
    assert [p.name for p in groups[PluginPhase.AUTHZ]] == ["acl-check", "check-header"]
    assert groups[PluginPhase.STATS] == []


def parsed(spec: str, namespace: str = "default") -> WasmPlugin:
    document = spec_document(spec)
    document.body["metadata"]["namespace"] = namespace
    return parse_wasmplugin(document)


def test_selector_subset_match_and_namespace_scope() -> None:
    web = parsed("url: x\nselector: {matchLabels: {app: web}}", namespace="shop")
    assert selects(web, {"app": "web", "version": "v1"}, "shop")
    assert not selects(web, {"app": "db"}, "shop")
    assert not selects(web, {"app": "web"}, "other")
    everything = parsed("url: x")
    assert selects(everything, {}, "default") and not selects(everything, {}, "shop")
    empty_selector = parsed("url: x\nselector: {}")
    assert selects(empty_selector, {"any": "thing"}, "default")


def test_root_namespace_plugin_applies_everywhere() -> None:
    mesh_wide = parsed("url: x\nselector: {matchLabels: {istio: ingressgateway}}", namespace="istio-system")
    assert selects(mesh_wide, {"istio": "ingressgateway"}, "istio-ingress")
    assert not selects(mesh_wide, {"istio": "ingressgateway"}, "istio-ingress", root_namespace="mesh-root")


def test_target_refs_attach_to_gateway_api_gateways_only() -> None:
    gateway_ref = "url: x\ntargetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: public}]"
    attached = parsed(gateway_ref, namespace="edge")
    gateway_labels = {"gateway.networking.k8s.io/gateway-name": "public"}
    assert selects(attached, gateway_labels, "edge")
    assert selects(attached, {}, "edge", gateway_name="public")
    assert not selects(attached, {"gateway.networking.k8s.io/gateway-name": "internal"}, "edge")
    assert not selects(attached, {"app": "web"}, "edge")  # sidecars ignore targetRef policies
    assert not selects(attached, gateway_labels, "other")
    legacy = parsed(
        "url: x\ntargetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: public}", "edge"
    )
    assert selects(legacy, gateway_labels, "edge")
    service_ref = parsed("url: x\ntargetRefs: [{kind: Service, name: public}]", namespace="edge")
    assert not selects(service_ref, gateway_labels, "edge")  # waypoint-only attachment


def test_gateway_without_target_refs_falls_back_to_selector() -> None:
    selector_plugin = parsed("url: x\nselector: {matchLabels: {tier: edge}}", namespace="edge")
    assert selects(selector_plugin, {"tier": "edge"}, "edge", gateway_name="public")
    assert not selects(selector_plugin, {}, "edge", gateway_name="public")


def test_matches_traffic_mode_and_ports() -> None:
    any_traffic = parsed("url: x")
    assert matches_traffic(any_traffic, "SERVER", 8080)
    inbound_8080 = parsed("url: x\nmatch: [{mode: SERVER, ports: [{number: 8080}]}]")
    assert matches_traffic(inbound_8080, "SERVER", 8080)
    assert not matches_traffic(inbound_8080, "SERVER", 9090)
    assert not matches_traffic(inbound_8080, WorkloadMode.CLIENT, 8080)
    assert matches_traffic(inbound_8080, WorkloadMode.UNDEFINED, 0)
    either = parsed("url: x\nmatch: [{mode: CLIENT}, {ports: [{number: 9090}]}]")
    assert matches_traffic(either, "CLIENT", 1) and matches_traffic(either, "SERVER", 9090)
    assert not matches_traffic(either, "SERVER", 80)
    both = parsed("url: x\nmatch: [{mode: CLIENT_AND_SERVER, ports: [{number: 80}]}]")
    assert matches_traffic(both, "CLIENT", 80) and matches_traffic(both, "SERVER", 80)


def test_matches_type() -> None:
    assert matches_type(parsed("url: x"), PluginType.HTTP)
    assert matches_type(parsed("url: x\ntype: NETWORK"), PluginType.NETWORK)
    assert not matches_type(parsed("url: x\ntype: NETWORK"), PluginType.HTTP)
