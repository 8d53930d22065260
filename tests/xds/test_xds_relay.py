"""Control plane → relay (agent-shaped: client upstream, ADS server downstream) → proxy client."""

from __future__ import annotations

import asyncio
from pathlib import Path

from wasmesh.api.load import parse_yaml_stream
from wasmesh.controlplane.server import ControlPlane, ControlPlaneOptions
from wasmesh.xds.client import ClientSnapshot, XdsClient
from wasmesh.xds.relay import RelayGenerator
from wasmesh.xds.server import AdsServer

DOCS = """
apiVersion: wasmesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, labels: {app: web}}
spec:
  listeners:
  - {name: http, port: 10000, virtualHosts: [{routes: [{cluster: up}]}]}
  clusters:
  - {name: up, endpoints: ["127.0.0.1:8080"]}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: p}
spec: {url: "file:///opt/p.wasm"}
"""


def test_relay_serves_upstream_state_and_follows_changes() -> None:
    async def body() -> None:
        control_plane = ControlPlane(ControlPlaneOptions(xds_port=0, api_port=0, debounce_after=0.01))
        await control_plane.start()
        for document in parse_yaml_stream(DOCS, Path("docs.yaml")):
            control_plane.store.apply(document)
        relay = RelayGenerator()
        downstream = AdsServer(relay, debounce_after=0.0)
        port = await downstream.start()

        def on_update(snapshot: ClientSnapshot) -> None:
            relay.update(snapshot)
            downstream.config_changed()

        upstream = XdsClient(
            f"127.0.0.1:{control_plane.xds_port}", "web-1", {"app": "web"}, on_update=on_update
        )
        proxy = XdsClient(f"127.0.0.1:{port}", "envoy-next-to-agent", {})
        tasks = [asyncio.create_task(upstream.run()), asyncio.create_task(proxy.run())]
        name = "extensions.istio.io/wasmplugin/default.p"
        try:
            snapshot = await proxy.wait_for(lambda s: name in s.extension_configs())
            assert [ref.name for ref in snapshot.http_filter_chains()["http"]] == [
                name,
                "envoy.filters.http.router",
            ]
            control_plane.store.delete("WasmPlugin", "default", "p")
            snapshot = await proxy.wait_for(lambda s: len(s.http_filter_chains()["http"]) == 1)
            assert name not in snapshot.extension_configs()
        finally:
            for client in (upstream, proxy):
                client.request_stop()
            for task in tasks:
                task.cancel()
            await downstream.stop()
            await control_plane.stop()

    asyncio.run(asyncio.wait_for(body(), 30))
