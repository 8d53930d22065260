"""ECDS → WasmPlugin documents, so a wasmesh proxy can install pushed chains with its own loader.

The proxy builds chains from WasmPlugin documents (`wasmesh.proxy.config.PluginResource`). Over
xDS it receives the listener's filter order plus, per filter, an ECDS `TypedExtensionConfig`
holding `envoy.extensions.filters.http.wasm.v3.Wasm`. `chain_documents` turns an ordered chain
back into WasmPlugin bodies whose (phase, priority) reproduce the pushed order exactly under
Istio's ordering, because the control plane already applied phases and priorities.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import wrappers_pb2

from wasmesh.xds import types
from wasmesh.xds.client import FilterRef

_FAIL_STRATEGY = {
    wasm_pb2.FAIL_CLOSED: "FAIL_CLOSE",
    wasm_pb2.UNSPECIFIED: "FAIL_CLOSE",
    wasm_pb2.FAIL_OPEN: "FAIL_OPEN",
    wasm_pb2.FAIL_RELOAD: "FAIL_RELOAD",
}
_ISTIO_META_PREFIX = "ISTIO_META_"


class BridgeError(ValueError):
    """An ECDS resource that cannot be expressed as a WasmPlugin (one line, names the resource)."""


def plugin_config(extension: extension_pb2.TypedExtensionConfig) -> wasm_pb2.PluginConfig:
    if extension.typed_config.type_url != types.HTTP_WASM:
        raise BridgeError(
            f"{extension.name}: typed_config is {extension.typed_config.type_url}, not HTTP Wasm"
        )
    wasm = http_wasm_pb2.Wasm()
    extension.typed_config.Unpack(wasm)
    return wasm.config


def wasmplugin_document(extension: extension_pb2.TypedExtensionConfig, priority: int) -> dict[str, Any]:
    """One WasmPlugin body equivalent to the ECDS resource, with the given priority."""
    config = plugin_config(extension)
    namespace, _, name = config.name.partition(".")
    if not name:
        namespace, name = "default", config.name or extension.name.rsplit("/", 1)[-1]
    code = config.vm_config.code
    if code.HasField("local"):
        if not code.local.filename:
            raise BridgeError(f"{extension.name}: vm_config.code.local has no filename")
        url = "file://" + code.local.filename
        sha256 = ""
    elif code.HasField("remote"):
        url = code.remote.http_uri.uri
        sha256 = code.remote.sha256
    else:
        raise BridgeError(f"{extension.name}: vm_config.code has neither local nor remote")
    spec: dict[str, Any] = {
        "url": url,
        "priority": priority,
        "failStrategy": _FAIL_STRATEGY.get(config.failure_policy, "FAIL_CLOSE"),
    }
    if sha256:
        spec["sha256"] = sha256
    if config.root_id:
        spec["pluginName"] = config.root_id
    if config.configuration.value:
        holder = wrappers_pb2.StringValue()
        config.configuration.Unpack(holder)
        try:
            spec["pluginConfig"] = json.loads(holder.value) if holder.value else {}
        except json.JSONDecodeError as exc:
            raise BridgeError(f"{extension.name}: configuration is not JSON: {exc.msg}") from None
    env = config.vm_config.environment_variables
    variables = [
        {"name": k, "value": v}
        for k, v in sorted(env.key_values.items())
        if not k.startswith(_ISTIO_META_PREFIX)
    ]
    variables += [{"name": k, "valueFrom": "HOST"} for k in env.host_env_keys]
    if variables:
        spec["vmConfig"] = {"env": variables}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    resource_version = env.key_values.get("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION")
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": metadata,
        "spec": spec,
    }


def chain_documents(chain: Sequence[FilterRef]) -> list[dict[str, Any]]:
    """WasmPlugin bodies for the discovered filters of a chain, in chain order.

    Raises BridgeError if a referenced ECDS resource has not arrived yet (the chain is not ready,
    as an Envoy listener would still be warming).
    """
    discovered = [ref for ref in chain if ref.discovered]
    documents = []
    for index, ref in enumerate(discovered):
        if ref.config is None:
            raise BridgeError(f"{ref.name}: extension config not received yet")
        documents.append(wasmplugin_document(ref.config, priority=len(discovered) - index))
    return documents
