"""ChainFeeder: pushed chains reach the proxy's apply_chain; a rejected chain is NACKed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from wasmesh.api.load import parse_yaml_stream
from wasmesh.controlplane.server import ControlPlane, ControlPlaneOptions
from wasmesh.xds.client import XdsClient
from wasmesh.xds.feeder import ChainFeeder

WORKLOAD = """
apiVersion: wasmesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, labels: {app: web}}
spec:
  listeners:
  - {name: http, port: 10000, virtualHosts: [{routes: [{cluster: up}]}]}
  clusters:
  - {name: up, endpoints: ["127.0.0.1:8080"]}
"""


def plugin(name: str, config: str) -> str:
    return f"""
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}}}
spec: {{url: "file:///opt/{name}.wasm", pluginConfig: {config}}}
"""


def test_feeder_applies_and_nacks() -> None:
    applied: list[tuple[str, list[str]]] = []

    async def apply_chain(listener: str, documents: list[dict[str, Any]]) -> bool:
        if any(d["spec"].get("pluginConfig", {}).get("reject") for d in documents):
            return False
        applied.append((listener, [d["metadata"]["name"] for d in documents]))
        return True

    async def wait(predicate: Any) -> None:
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def body() -> None:
        control_plane = ControlPlane(ControlPlaneOptions(xds_port=0, api_port=0, debounce_after=0.01))
        await control_plane.start()
        store = control_plane.store

        def apply(text: str) -> None:
            for document in parse_yaml_stream(text, Path("test.yaml")):
                store.apply(document)

        apply(WORKLOAD + "---\n" + plugin("one", "{a: 1}"))
        client = XdsClient(f"127.0.0.1:{control_plane.xds_port}", "web-1", {"app": "web"})
        ChainFeeder(apply_chain).attach(client)
        task = asyncio.create_task(client.run())
        try:
            await wait(lambda: applied and applied[-1] == ("http", ["one"]))
            apply(plugin("two", "{a: 2}"))
            await wait(lambda: applied[-1] == ("http", ["one", "two"]))
            count = len(applied)
            apply(plugin("two", "{reject: true}"))
            await wait(lambda: control_plane.metrics.rejects.value("ecds") == 1)
            assert len(applied) == count and client.nacks_sent == 1
            store.delete("WasmPlugin", "default", "one")
            store.delete("WasmPlugin", "default", "two")
            await wait(lambda: applied[-1] == ("http", []))
        finally:
            client.request_stop()
            task.cancel()
            await control_plane.stop()

    asyncio.run(asyncio.wait_for(body(), 30))
