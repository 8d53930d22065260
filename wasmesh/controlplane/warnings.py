"""Warnings about accepted resources and connected proxies (logged, returned by apply, shown by describe).

A warning never rejects anything: the resource is stored and served, the proxy stays connected.
"""

from __future__ import annotations

from wasmesh.api.model import PluginType, WasmPlugin
from wasmesh.xds.snapshot import ProxyNode

L4_NOT_SERVED = (
    "type NETWORK: L4 (network filter) plugins are not served yet: wasmesh proxies skip them "
    "(Envoy receives them as network filters before the HTTP connection manager)"
)


def plugin_warnings(plugin: WasmPlugin) -> list[str]:
    """One line per warning, each naming the resource."""
    if plugin.effective_type == PluginType.NETWORK:
        return [f"WasmPlugin {plugin.namespace}/{plugin.name}: {L4_NOT_SERVED}"]
    return []


def unmatched_proxy_warning(conn_id: str, proxy: ProxyNode) -> str:
    """For a proxy whose node names no Workload or Gateway (e.g. a bootstrap with the wrong --namespace)."""
    return (
        f"proxy {conn_id} (node {proxy.id}, namespace {proxy.namespace}): no Workload or Gateway "
        f'"{proxy.namespace}/{proxy.workload_name}" matches its node, so it gets no listeners or clusters '
        "(check the node's --namespace, --workload and node id)"
    )
