"""xDS type URLs and the short names Istio uses for them in metrics and logs."""

from __future__ import annotations

from typing import Final

LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
EXTENSION_CONFIG: Final = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"

HTTP_WASM: Final = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HTTP_RBAC: Final = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
HTTP_ROUTER: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_CONNECTION_MANAGER: Final = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

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
