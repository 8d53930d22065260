"""xDS type URLs and the short names Istio uses for them in metrics and logs."""

from __future__ import annotations

from typing import Final

from envoy.extensions.wasm.v3 import wasm_pb2

LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
EXTENSION_CONFIG: Final = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"

HTTP_WASM: Final = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HTTP_RBAC: Final = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
HTTP_ROUTER: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
NETWORK_WASM: Final = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"
NETWORK_RBAC: Final = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
UDPA_TYPED_STRUCT: Final = "type.googleapis.com/udpa.type.v1.TypedStruct"
XDS_TYPED_STRUCT: Final = "type.googleapis.com/xds.type.v3.TypedStruct"
HTTP_CONNECTION_MANAGER: Final = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

# The VM environment keys istiod adds to a Wasm config for the agent (pilot/pkg/model/wasm.go). The
# agent, or a wasmesh proxy fetching remote code itself, consumes and strips every ISTIO_META_* key
# before the plugin runs, so none leaks into the plugin's environment.
ISTIO_META_PREFIX: Final = "ISTIO_META_"
ENV_PULL_SECRET: Final = "ISTIO_META_WASM_IMAGE_PULL_SECRET"
ENV_PULL_POLICY: Final = "ISTIO_META_WASM_IMAGE_PULL_POLICY"
ENV_RESOURCE_VERSION: Final = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION"

# WasmPlugin failStrategy names ↔ Envoy's FailurePolicy; Envoy treats UNSPECIFIED as FAIL_CLOSED.
FAILURE_POLICY_BY_STRATEGY: Final = {
    "FAIL_CLOSE": wasm_pb2.FAIL_CLOSED,
    "FAIL_OPEN": wasm_pb2.FAIL_OPEN,
    "FAIL_RELOAD": wasm_pb2.FAIL_RELOAD,
}
STRATEGY_BY_FAILURE_POLICY: Final = {
    wasm_pb2.UNSPECIFIED: "FAIL_CLOSE",
    **{policy: strategy for strategy, policy in FAILURE_POLICY_BY_STRATEGY.items()},
}

# Istio's pkg/model/xds.go GetMetricType: the label value of pilot_total_xds_rejects / pilot_xds_pushes.
_SHORT_NAMES: Final = {
    LISTENER: "lds",
    ROUTE: "rds",
    CLUSTER: "cds",
    ENDPOINT: "eds",
    EXTENSION_CONFIG: "ecds",
}

# The order a push sends types in: clusters before the listeners that route to them, and
# extension configs before the listeners that reference them (Envoy's ADS ordering advice).
PUSH_ORDER: Final = (CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE)

# Types served with wildcard semantics (an empty name list means "everything for this node").
WILDCARD_TYPES: Final = frozenset({LISTENER, CLUSTER})


def short_name(type_url: str) -> str:
    """`ecds`, `lds`, ... for a known type URL; the last path element otherwise."""
    return _SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1].lower())


def log_name(type_url: str) -> str:
    """Upper-case name used in log lines, e.g. `ADS:ECDS: ACK ERROR ...` as istiod logs."""
    return short_name(type_url).upper()
