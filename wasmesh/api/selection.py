"""Which workloads and which traffic a WasmPlugin applies to (Istio 1.29 semantics).

Workload selection follows ``pilot/pkg/model/policyattachment.go``
(``WorkloadPolicyMatcher.ShouldAttachPolicy``) for sidecars and gateways:

- A plugin applies to workloads of its own namespace; a plugin in the root
  namespace (``istio-system`` by default) applies to every namespace.
- A workload that is not a Gateway-API gateway ignores plugins with
  ``targetRef``/``targetRefs`` and otherwise uses ``selector.matchLabels``
  (subset match; no selector, or no labels, selects every workload).
- A Gateway-API gateway (its pods carry ``gateway.networking.k8s.io/gateway-name``)
  uses the selector when the plugin has no target refs
  (``ENABLE_SELECTOR_BASED_K8S_GATEWAY_POLICY`` defaults to true), else needs a
  ``Gateway`` ref (group ``gateway.networking.k8s.io``) naming it, with the plugin
  in the gateway's namespace.

Waypoint-only attachments (Service, ServiceEntry, GatewayClass ``istio-waypoint``)
never match here: wasmesh has no waypoints.
"""

from __future__ import annotations

from collections.abc import Mapping

from wasmesh.api.model import PluginType, WasmPlugin, WorkloadMode

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
GATEWAY_API_GROUP = "gateway.networking.k8s.io"
DEFAULT_ROOT_NAMESPACE = "istio-system"


def _selector_matches(plugin: WasmPlugin, workload_labels: Mapping[str, str]) -> bool:
    if plugin.selector is None:
        return True
    return all(workload_labels.get(key) == value for key, value in plugin.selector.match_labels.items())


def selects(
    plugin: WasmPlugin,
    workload_labels: Mapping[str, str],
    workload_namespace: str,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    gateway_name: str | None = None,
) -> bool:
    """Does the plugin apply to this workload?

    ``gateway_name``: the Gateway-API Gateway the workload implements; when None it
    is read from the ``gateway.networking.k8s.io/gateway-name`` workload label.
    """
    if plugin.namespace not in (workload_namespace, root_namespace):
        return False
    if gateway_name is None:
        gateway_name = workload_labels.get(GATEWAY_NAME_LABEL)
    target_refs = plugin.effective_target_refs
    if gateway_name is None:
        return not target_refs and _selector_matches(plugin, workload_labels)
    if not target_refs:
        return _selector_matches(plugin, workload_labels)
    if plugin.namespace != workload_namespace:
        return False
    return any(
        ref.group == GATEWAY_API_GROUP
        and ref.kind == "Gateway"
        and ref.name == gateway_name
        and ref.namespace in ("", workload_namespace)
        for ref in target_refs
    )


def matches_traffic(plugin: WasmPlugin, mode: WorkloadMode | str, port: int) -> bool:
    """Does ``match[]`` let this traffic through? ``mode`` is CLIENT (outbound and gateways)
    or SERVER (sidecar inbound). Selectors OR together; mode and ports AND within one;
    an empty list matches everything, and so does Istio's "undefined listener"
    (mode UNDEFINED with port 0)."""
    wanted = WorkloadMode[mode] if isinstance(mode, str) else mode
    if not plugin.match or (wanted == WorkloadMode.UNDEFINED and port == 0):
        return True
    for selector in plugin.match:
        mode_ok = (
            selector.mode in (WorkloadMode.UNDEFINED, WorkloadMode.CLIENT_AND_SERVER)
            or selector.mode == wanted
        )
        ports_ok = not selector.ports or any(p.number != 0 and p.number == port for p in selector.ports)
        if mode_ok and ports_ok:
            return True
    return False


def matches_type(plugin: WasmPlugin, plugin_type: PluginType) -> bool:
    """HTTP or NETWORK filter? (UNSPECIFIED_PLUGIN_TYPE counts as HTTP.)"""
    wanted = PluginType.HTTP if plugin_type == PluginType.UNSPECIFIED_PLUGIN_TYPE else plugin_type
    return plugin.effective_type == wanted
