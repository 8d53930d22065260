"""Serve what an upstream XdsClient accepted to downstream proxies: the shape of istio-agent.

    relay = RelayGenerator()
    downstream = AdsServer(relay, debounce_after=0)        # Envoy connects here
    async def on_update(snapshot: ClientSnapshot) -> None:
        relay.update(await convert(snapshot))                # e.g. rewrite remote Wasm to local files
        downstream.config_changed()
    upstream = XdsClient(control_plane, node_id, labels, on_update=on_update)

Every downstream proxy gets the same resources (the agent serves the one Envoy it sits next to).
"""

from __future__ import annotations

from google.protobuf import any_pb2

from wasmesh.xds.client import ClientSnapshot
from wasmesh.xds.snapshot import ProxyNode, Snapshot


class RelayGenerator:
    def __init__(self) -> None:
        self._snapshot = Snapshot({})

    def update(self, snapshot: ClientSnapshot) -> None:
        packed: dict[str, dict[str, any_pb2.Any]] = {}
        for type_url, resources in snapshot.resources.items():
            items: dict[str, any_pb2.Any] = {}
            for name, resource in resources.items():
                holder = any_pb2.Any()
                holder.Pack(resource)
                items[name] = holder
            packed[type_url] = items
        self._snapshot = Snapshot(packed)

    def generate(self, proxy: ProxyNode) -> Snapshot:
        return self._snapshot
