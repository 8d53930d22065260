"""Adapter from wasmesh.api's WasmPlugin model to the translation's PluginView."""

from __future__ import annotations

from collections.abc import Mapping

from wasmesh.api.model import PluginType, PullPolicy, WasmPlugin, plugin_configuration_json
from wasmesh.controlplane.resources import Secret
from wasmesh.controlplane.translate import PluginView


def plugin_view(plugin: WasmPlugin, secrets: Mapping[tuple[str, str], Secret]) -> PluginView:
    """What istiod's convertToWasmPluginWrapper + buildPluginConfig read from a WasmPlugin.

    The pull secret is looked up in the plugin's own namespace (Istio forces that); a missing
    Secret becomes "" so the agent fails the fetch with "missing image pulling secret".
    """
    pull_secret: str | None = None
    if plugin.image_pull_secret:
        secret = secrets.get((plugin.namespace, plugin.image_pull_secret))
        pull_secret = secret.docker_config_json if secret is not None else ""
    policy = (
        "" if plugin.image_pull_policy == PullPolicy.UNSPECIFIED_POLICY else plugin.image_pull_policy.name
    )
    return PluginView(
        namespace=plugin.namespace,
        name=plugin.name,
        resource_version=plugin.metadata.resource_version,
        url=plugin.normalized_url,
        sha256=plugin.sha256,
        pull_policy=policy,
        pull_secret_json=pull_secret,
        plugin_name=plugin.plugin_name,
        configuration_json=plugin_configuration_json(plugin).decode(),
        fail_strategy=plugin.fail_strategy.name,
        env=plugin.inline_env,
        host_env_keys=plugin.host_env_keys,
        plugin_type="NETWORK" if plugin.effective_type == PluginType.NETWORK else "HTTP",
    )
