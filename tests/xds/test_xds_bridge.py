"""Control plane → XdsClient → WasmPlugin documents a wasmesh proxy can load (order preserved)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from wasmesh.api.load import Document
from wasmesh.api.ordering import order_chain
from wasmesh.api.validation import validate_document
from wasmesh.controlplane.server import ControlPlane, ControlPlaneOptions
from wasmesh.xds.bridge import chain_documents
from wasmesh.xds.client import ClientSnapshot, XdsClient

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

PLUGINS = """
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: stats}
spec: {url: "file:///opt/stats.wasm", phase: STATS, pluginConfig: {k: 1}}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: auth}
spec:
  url: oci://registry.local/auth:1
  phase: AUTHN
  pluginName: basic_auth
  failStrategy: FAIL_OPEN
  vmConfig: {env: [{name: A, value: b}, {name: HOME, valueFrom: HOST}]}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: last}
spec: {url: "file:///opt/last.wasm", priority: -5}
"""


def test_pushed_chain_round_trips_to_wasmplugins(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(WORKLOAD + "---\n" + PLUGINS)

    async def body() -> list[dict[str, object]]:
        control_plane = ControlPlane(ControlPlaneOptions(config_dir=tmp_path, xds_port=0, api_port=0))
        await control_plane.start()
        client = XdsClient(f"127.0.0.1:{control_plane.xds_port}", "web-1", {"app": "web"})
        task = asyncio.create_task(client.run())

        def ready(snapshot: ClientSnapshot) -> bool:
            chain = snapshot.http_filter_chains().get("http", [])
            return len(chain) == 4 and all(ref.config is not None for ref in chain if ref.discovered)

        try:
            snapshot = await client.wait_for(ready, timeout=10)
            return chain_documents(snapshot.http_filter_chains()["http"])
        finally:
            client.request_stop()
            task.cancel()
            await control_plane.stop()

    documents = asyncio.run(body())
    assert [d["metadata"]["name"] for d in documents] == ["auth", "stats", "last"]  # type: ignore[index]
    plugins = []
    for index, document in enumerate(documents):
        doc = Document("WasmPlugin", "extensions.istio.io/v1alpha1", document, Path("xds"), index + 1)
        result = validate_document(doc)
        assert result.plugin is not None, [str(e) for e in result.errors]
        plugins.append(result.plugin)
    assert [p.name for p in order_chain(reversed(plugins))] == ["auth", "stats", "last"]
    auth = plugins[0]
    assert auth.url == "oci://registry.local/auth:1"
    assert auth.plugin_name == "basic_auth"
    assert auth.fail_strategy.name == "FAIL_OPEN"
    assert auth.inline_env == {"A": "b"} and auth.host_env_keys == ("HOME",)
    assert plugins[1].plugin_config == {"k": 1}
    assert yaml.safe_dump(documents)  # plain data, ready for PluginResource(body=...)
