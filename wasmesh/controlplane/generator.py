"""Per-proxy snapshots from the store: Istio's plugin selection, ordering and the translation.

Snapshots are cached per (store version, proxy identity), so a push to many identical proxies
builds and serialises the resources once.
"""

from __future__ import annotations

import dataclasses
import threading

from wasmesh.api.model import WasmPlugin
from wasmesh.controlplane.plugins import plugin_view
from wasmesh.controlplane.resources import Workload
from wasmesh.controlplane.selection import matches_traffic, order_chain, selects
from wasmesh.controlplane.store import ConfigStore
from wasmesh.controlplane.translate import PluginView, build_resources
from wasmesh.security.ca import Identity
from wasmesh.xds.snapshot import ProxyNode, Snapshot


class MeshSnapshotGenerator:
    def __init__(self, store: ConfigStore, *, secrets_need_identity: bool = False) -> None:
        """`secrets_need_identity`: a pull secret reaches only a proxy whose verified identity
        (ProxyNode.identity) is in the secret's namespace; others get "" in its place (the agent
        then fails the fetch with "missing image pulling secret"). The control plane sets it."""
        self.store = store
        self.secrets_need_identity = secrets_need_identity
        self._lock = threading.Lock()
        self._cache_version = -1
        self._snapshots: dict[object, Snapshot] = {}
        self._views: dict[tuple[str, str], PluginView] = {}

    def _view(self, plugin: WasmPlugin, proxy: ProxyNode) -> PluginView:
        key = (plugin.namespace, plugin.name)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = plugin_view(plugin, self.store.secrets())
        if view.pull_secret_json and self.secrets_need_identity and not self._may_see_secrets(proxy, plugin):
            return dataclasses.replace(view, pull_secret_json="")
        return view

    @staticmethod
    def _may_see_secrets(proxy: ProxyNode, plugin: WasmPlugin) -> bool:
        """A verified identity in the plugin's (so the secret's) namespace."""
        if not proxy.identity:
            return False
        try:
            return Identity.parse(proxy.identity).namespace == plugin.namespace
        except ValueError:
            return False

    def workload_for(self, proxy: ProxyNode) -> Workload | None:
        workloads = self.store.workloads()
        return workloads.get((proxy.namespace, proxy.workload_name))

    def chains_for(self, proxy: ProxyNode) -> dict[str, list[WasmPlugin]]:
        """Listener name → ordered plugins, selected as istiod's WasmPluginsByListenerInfo does."""
        workload = self.workload_for(proxy)
        if workload is None:
            return {}
        # A verified proxy is what its Workload resource says (as istiod takes pod labels from the
        # cluster, not from the proxy); only an unauthenticated plain-text node adds its own claims.
        labels = dict(workload.labels) if proxy.identity else {**workload.labels, **proxy.labels}
        root = self.store.root_namespace
        plugins = [
            plugin
            for plugin in self.store.wasmplugins()
            if selects(plugin, labels, proxy.namespace, root, workload.gateway_name)
        ]
        return {
            listener.name: order_chain(
                [p for p in plugins if matches_traffic(p, listener.mode, listener.port)]
            )
            for listener in workload.listeners
        }

    def generate(self, proxy: ProxyNode) -> Snapshot:
        with self._lock:
            if self._cache_version != self.store.version:
                self._cache_version = self.store.version
                self._snapshots.clear()
                self._views.clear()
            key = proxy.cache_key()
            cached = self._snapshots.get(key)
            if cached is not None:
                return cached
            root = self.store.root_namespace
            chains = {
                name: [self._view(p, proxy) for p in plugins]
                for name, plugins in self.chains_for(proxy).items()
            }
            visible = [
                self._view(plugin, proxy)
                for plugin in self.store.wasmplugins()
                if plugin.namespace in (proxy.namespace, root)
            ]
            snapshot = Snapshot(build_resources(self.workload_for(proxy), chains, visible))
            self._snapshots[key] = snapshot
            return snapshot
