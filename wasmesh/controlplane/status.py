"""Plugin status per proxy: which connected proxies a WasmPlugin selects and whether each runs it.

For every WasmPlugin and every connected proxy whose chain includes it, the state of the plugin's
ECDS resource on that connection (`AdsServer.resource_state`): ACK (the proxy runs the current
content), NACK (the proxy refused it: error_detail's message), FETCH_FAILED (`wasmesh agent` could not
fetch the module and serves the deny-all / allow-all RBAC fallback: its report's message), or PENDING
(not subscribed or not acknowledged yet). READY is ACKs / selected proxies, as `wasmesh get` shows it.
Warnings name L4 plugins (not served by wasmesh proxies) and proxies of the plugin's scope whose node
matches no Workload or Gateway.
"""

from __future__ import annotations

from typing import Any

from wasmesh.api.model import WasmPlugin
from wasmesh.controlplane.generator import MeshSnapshotGenerator
from wasmesh.controlplane.warnings import plugin_warnings, unmatched_proxy_warning
from wasmesh.xds import types
from wasmesh.xds.server import AdsServer, Connection
from wasmesh.xds.snapshot import ProxyNode


class PluginStatus:
    def __init__(self, ads: AdsServer, generator: MeshSnapshotGenerator) -> None:
        self.ads = ads
        self.generator = generator

    def proxy_warnings(self, conn_id: str, proxy: ProxyNode) -> list[str]:
        if self.generator.workload_for(proxy) is None:
            return [unmatched_proxy_warning(conn_id, proxy)]
        return []

    def __call__(self, namespace: str | None, name: str | None) -> list[dict[str, Any]]:
        """Status of every WasmPlugin (in `namespace`), or of the one named; JSON-ready dicts."""
        plugins = [
            plugin
            for plugin in self.generator.store.wasmplugins()
            if (namespace is None or plugin.namespace == namespace) and (name is None or plugin.name == name)
        ]
        connections = list(self.ads.connections.values())
        chains = {conn.conn_id: self.generator.chains_for(conn.proxy) for conn in connections}
        return [self._plugin(plugin, connections, chains) for plugin in plugins]

    def _plugin(
        self,
        plugin: WasmPlugin,
        connections: list[Connection],
        chains: dict[str, dict[str, list[WasmPlugin]]],
    ) -> dict[str, Any]:
        key = (plugin.namespace, plugin.name)
        resource = plugin.ecds_resource_name
        proxies: list[dict[str, Any]] = []
        warnings = plugin_warnings(plugin)
        for conn in connections:
            # Listed for every plugin: a proxy with a wrong --namespace is exactly the one that the
            # plugin of the namespace it should be in does not select.
            if self.generator.workload_for(conn.proxy) is None:
                warnings.append(unmatched_proxy_warning(conn.conn_id, conn.proxy))
            listeners = sorted(
                listener
                for listener, chain in chains[conn.conn_id].items()
                if any((p.namespace, p.name) == key for p in chain)
            )
            if not listeners:
                continue
            current = self.generator.generate(conn.proxy).digest(types.EXTENSION_CONFIG, resource)
            state = self.ads.resource_state(conn, types.EXTENSION_CONFIG, resource, current)
            proxies.append(
                {
                    "proxy": conn.conn_id,
                    "node": conn.proxy.id,
                    "namespace": conn.proxy.namespace,
                    "listeners": listeners,
                    "state": state.state,
                    "error": state.error,
                }
            )
        proxies.sort(key=lambda proxy: (proxy["namespace"], proxy["node"], proxy["proxy"]))
        ready = sum(1 for proxy in proxies if proxy["state"] == "ACK")
        return {
            "namespace": plugin.namespace,
            "name": plugin.name,
            "resource": resource,
            "ready": ready,
            "selected": len(proxies),
            "proxies": proxies,
            "warnings": warnings,
        }
