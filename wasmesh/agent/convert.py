"""ECDS conversion: rewrite remote Wasm module references to verified local files (istio-agent's convert.go).

Given the resources of one ECDS response (``Any``-packed ``TypedExtensionConfig``), every Wasm filter
(HTTP or network, plain or wrapped in a ``TypedStruct``) whose ``vm_config.code`` is remote is fetched
through the :class:`~wasmesh.agent.cache.ModuleCache` and rewritten to ``local.filename``; the
``ISTIO_META_*`` environment keys the control plane added for the agent are consumed and stripped.

When a module cannot be fetched the resource is replaced, under the SAME name, by an RBAC filter:
deny-all (``wasm-default-deny``, clients get 403) unless the plugin's failure policy is FAIL_OPEN, in
which case allow-all (``wasm-default-allow``) — Istio >= 1.25 behaviour. Only resources the agent cannot
even read are reported as errors, which the xDS proxy turns into a NACK.

This module knows nothing of gRPC: the xDS proxy (``wasmesh.agent.xdsproxy``) is the transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeAlias

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.wasm.v3 import wasm_pb2 as network_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import any_pb2, json_format, message
from udpa.type.v1 import typed_struct_pb2 as udpa_typed_struct_pb2
from xds.type.v3 import typed_struct_pb2 as xds_typed_struct_pb2

from wasmesh.agent.errors import FetchError
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.xds import types

log = logging.getLogger("wasmesh.agent.convert")

KNOWN_PULL_POLICIES = ("UNSPECIFIED_POLICY", "IfNotPresent", "Always")

# Istio's fallback when the HttpUri carries no timeout (istiod always sends 30 s).
DEFAULT_FETCH_TIMEOUT_S = 5.0

ALLOW_STAT_PREFIX = "wasm-default-allow"
DENY_STAT_PREFIX = "wasm-default-deny"


class ModuleSource(Protocol):
    """What the converter needs from the module cache (``ModuleCache.get``)."""

    async def get(
        self,
        url: str,
        *,
        sha256: str = "",
        pull_policy: str = "UNSPECIFIED_POLICY",
        pull_secret: bytes = b"",
        resource_name: str = "",
        resource_version: str = "",
        timeout_s: float = ...,
    ) -> Path: ...


class ConversionError(Exception):
    """Resources of one ECDS response the agent could not read; the response must be NACKed."""


class _Unreadable(Exception):
    """One resource is malformed (metric ``unmarshal_failure``; NACK)."""


class _FetchFailed(Exception):
    """One remote module could not be made local (fallback RBAC filter); carries the metric result."""

    def __init__(self, message: str, result: str) -> None:
        super().__init__(message)
        self.result = result


# http_wasm_pb2.Wasm or network_wasm_pb2.Wasm (the generated Envoy protos carry no type stubs).
WasmFilter: TypeAlias = message.Message


def plugin_config(wasm: WasmFilter) -> wasm_pb2.PluginConfig:
    """The ``config`` field both Wasm filter messages have."""
    return getattr(wasm, "config")  # noqa: B009


@dataclass(frozen=True)
class _RemoteWasm:
    """A readable ECDS resource whose Wasm filter loads its module remotely."""

    extension: extension_pb2.TypedExtensionConfig
    wasm: WasmFilter

    @property
    def is_network(self) -> bool:
        return isinstance(self.wasm, network_wasm_pb2.Wasm)


@dataclass(frozen=True)
class ResourceConversion:
    """The outcome for one resource: what to send to Envoy and the conversion-count label."""

    resource: any_pb2.Any
    result: str
    error: str = ""  # non-empty: the resource is unreadable and the response must be NACKed
    # non-empty: the module could not be fetched and ``resource`` is the RBAC fallback; one line naming
    # the resource, for the control plane (see ``wasmesh.agent.xdsproxy``'s fetch-failure report)
    fallback: str = ""


@dataclass(frozen=True)
class ConvertedResponse:
    """The resources to forward to Envoy, and one line per resource served as the RBAC fallback."""

    resources: list[any_pb2.Any]
    fallbacks: list[str]


def fails_open(config: wasm_pb2.PluginConfig) -> bool:
    """FAIL_OPEN from ``failure_policy``, falling back to the deprecated ``fail_open`` bool when unset."""
    if config.failure_policy != wasm_pb2.UNSPECIFIED:
        return bool(config.failure_policy == wasm_pb2.FAIL_OPEN)
    return bool(config.fail_open)


def fallback_rbac(name: str, *, network: bool, allow: bool) -> any_pb2.Any:
    """A TypedExtensionConfig named ``name`` holding allow-all or deny-all RBAC, packed for ECDS."""
    filter_config: message.Message
    if network:
        if allow:
            filter_config = network_rbac_pb2.RBAC(stat_prefix=ALLOW_STAT_PREFIX)  # no rules: allow all
        else:  # empty rules (ALLOW action, no policy): nothing matches, so everything is denied
            filter_config = network_rbac_pb2.RBAC(rules=rbac_config_pb2.RBAC(), stat_prefix=DENY_STAT_PREFIX)
    elif allow:
        filter_config = http_rbac_pb2.RBAC(rules_stat_prefix=ALLOW_STAT_PREFIX)
    else:
        filter_config = http_rbac_pb2.RBAC(rules=rbac_config_pb2.RBAC(), rules_stat_prefix=DENY_STAT_PREFIX)
    return _pack(extension_pb2.TypedExtensionConfig(name=name, typed_config=_pack(filter_config)))


def _pack(item: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(item)
    return packed


def _struct_to_wasm(struct_any: any_pb2.Any, wrapper: message.Message) -> WasmFilter | None:
    """The Wasm filter inside a TypedStruct, or None when it wraps something else."""
    if not struct_any.Unpack(wrapper):
        raise _Unreadable(f"failed to unmarshal typed config {struct_any.type_url} for wasm filter")
    inner_type = str(getattr(wrapper, "type_url"))  # noqa: B009 - both TypedStruct kinds have it
    value = getattr(wrapper, "value")  # noqa: B009
    target: WasmFilter
    if inner_type == types.HTTP_WASM:
        target = http_wasm_pb2.Wasm()
    elif inner_type == types.NETWORK_WASM:
        target = network_wasm_pb2.Wasm()
    else:
        return None
    try:
        json_format.ParseDict(json_format.MessageToDict(value), target)
    except json_format.ParseError as exc:
        raise _Unreadable(f"failed to convert extension config struct to {inner_type}: {exc}") from None
    return target


def parse_resource(resource: any_pb2.Any) -> _RemoteWasm | None:
    """The resource's remote Wasm filter; None when it is not Wasm or loads its module locally.

    Raises ``_Unreadable`` for anything that cannot be decoded, as istio-agent's ``tryUnmarshal``.
    """
    extension = extension_pb2.TypedExtensionConfig()
    if resource.type_url != types.EXTENSION_CONFIG:
        raise _Unreadable(
            f"failed to unmarshal extension config resource: unexpected type {resource.type_url}"
        )
    try:
        resource.Unpack(extension)
    except message.DecodeError as exc:
        raise _Unreadable(f"failed to unmarshal extension config resource: {exc}") from None
    if not extension.HasField("typed_config"):
        raise _Unreadable(f"typed extension config {extension.name!r} does not contain any typed config")
    typed = extension.typed_config
    wasm: WasmFilter | None
    try:
        if typed.type_url == types.HTTP_WASM:
            wasm = http_wasm_pb2.Wasm()
            typed.Unpack(wasm)
        elif typed.type_url == types.NETWORK_WASM:
            wasm = network_wasm_pb2.Wasm()
            typed.Unpack(wasm)
        elif typed.type_url == types.UDPA_TYPED_STRUCT:
            wasm = _struct_to_wasm(typed, udpa_typed_struct_pb2.TypedStruct())
        elif typed.type_url == types.XDS_TYPED_STRUCT:
            wasm = _struct_to_wasm(typed, xds_typed_struct_pb2.TypedStruct())
        else:
            return None
    except message.DecodeError as exc:
        raise _Unreadable(
            f"failed to unmarshal extension config resource {extension.name!r} into {typed.type_url}: {exc}"
        ) from None
    if wasm is None:
        return None
    code = plugin_config(wasm).vm_config.code
    if not code.HasField("remote"):
        if not code.HasField("local"):
            kind = "Network" if isinstance(wasm, network_wasm_pb2.Wasm) else "HTTP"
            raise _Unreadable(f"no remote and local load found in Wasm {kind} filter {extension.name!r}")
        return None
    return _RemoteWasm(extension, wasm)


@dataclass(frozen=True)
class _FetchOrder:
    """What the VM environment and the remote source ask the cache for."""

    url: str
    sha256: str
    pull_policy: str
    pull_secret: bytes
    resource_version: str
    timeout_s: float


def take_fetch_order(vm_config: wasm_pb2.VmConfig, config_name: str) -> _FetchOrder:
    """Read the agent's ISTIO_META_* keys, strip them from ``vm_config`` and describe the fetch."""
    pull_secret = b""
    pull_policy = "UNSPECIFIED_POLICY"
    resource_version = ""
    secret_missing = False
    if vm_config.HasField("environment_variables"):
        env = vm_config.environment_variables
        values = env.key_values
        if types.ENV_PULL_SECRET in values:
            secret_missing = values[types.ENV_PULL_SECRET] == ""
            pull_secret = values[types.ENV_PULL_SECRET].encode()
        if values.get(types.ENV_PULL_POLICY, "") in KNOWN_PULL_POLICIES:
            pull_policy = values[types.ENV_PULL_POLICY]
        resource_version = values.get(types.ENV_RESOURCE_VERSION, "")
        for key in [key for key in values if key.startswith(types.ISTIO_META_PREFIX)]:
            del values[key]
        if not values and not env.host_env_keys:
            vm_config.ClearField("environment_variables")
    if secret_missing:
        raise _FetchFailed(
            f"cannot fetch Wasm module {config_name}: missing image pulling secret", "fetch_failure"
        )
    remote = vm_config.code.remote
    if not remote.HasField("http_uri"):
        raise _FetchFailed(
            f"wasm remote fetch does not have httpUri specified for config {config_name}",
            "miss_remote_fetch_hint",
        )
    timeout_s = DEFAULT_FETCH_TIMEOUT_S
    if remote.http_uri.HasField("timeout"):
        timeout_s = remote.http_uri.timeout.ToTimedelta().total_seconds() or DEFAULT_FETCH_TIMEOUT_S
    return _FetchOrder(
        url=remote.http_uri.uri,
        # istiod may send the magic "nil" for "no checksum" (avoids an unmarshal error upstream).
        sha256="" if remote.sha256 == "nil" else remote.sha256,
        pull_policy=pull_policy,
        pull_secret=pull_secret,
        resource_version=resource_version,
        timeout_s=timeout_s,
    )


class EcdsConverter:
    """Converts the resources of ECDS responses; one instance per agent, shared by all streams."""

    def __init__(self, cache: ModuleSource, metrics: AgentMetrics, *, enabled: bool = True) -> None:
        self.cache = cache
        self.metrics = metrics
        # ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION=false: forward ECDS untouched.
        self.enabled = enabled

    async def convert_response(self, resources: Sequence[any_pb2.Any]) -> list[any_pb2.Any]:
        """The resources to forward to Envoy, in order.

        Raises ``ConversionError`` when the response must be NACKed.
        """
        return (await self.convert_response_reporting(resources)).resources

    async def convert_response_reporting(self, resources: Sequence[any_pb2.Any]) -> ConvertedResponse:
        """Like ``convert_response``, also naming the resources replaced by the RBAC fallback."""
        if not self.enabled:
            return ConvertedResponse(list(resources), [])
        started = time.monotonic()
        try:
            outcomes = await asyncio.gather(*(self.convert_resource(resource) for resource in resources))
        finally:
            # One observation per response, as istio-agent's deferred Record in
            # MaybeConvertWasmExtensionConfig.
            self.metrics.config_conversion_duration.observe((time.monotonic() - started) * 1000.0)
        errors = [outcome.error for outcome in outcomes if outcome.error]
        if errors:
            message_text = "; ".join(errors)
            log.error("error in applying failopen rbac config: %s", message_text)
            raise ConversionError(message_text)
        return ConvertedResponse(
            [outcome.resource for outcome in outcomes],
            [outcome.fallback for outcome in outcomes if outcome.fallback],
        )

    async def convert_resource(self, resource: any_pb2.Any) -> ResourceConversion:
        """Convert one resource and count it in ``istio_agent_wasm_config_conversion_count``."""
        outcome = await self._convert(resource)
        self.metrics.record_conversion(outcome.result)
        return outcome

    async def _convert(self, resource: any_pb2.Any) -> ResourceConversion:
        try:
            remote = parse_resource(resource)
        except _Unreadable as exc:
            return ResourceConversion(resource, "unmarshal_failure", str(exc))
        if remote is None:
            return ResourceConversion(resource, "no_remote_load")
        try:
            path = await self._fetch(remote)
        except _FetchFailed as exc:
            allow = fails_open(plugin_config(remote.wasm))
            log.error(
                "error in converting the wasm config to local: %s. applying %s RBAC filter",
                exc,
                "allow" if allow else "deny",
            )
            fallback = fallback_rbac(remote.extension.name, network=remote.is_network, allow=allow)
            served = "allow-all" if allow else "deny-all"
            report = f"{remote.extension.name}: {exc} (serving the {served} RBAC fallback)"
            return ResourceConversion(fallback, exc.result, fallback=report)
        vm_config = plugin_config(remote.wasm).vm_config
        vm_config.code.CopyFrom(base_pb2.AsyncDataSource(local=base_pb2.DataSource(filename=str(path))))
        remote.extension.typed_config.CopyFrom(_pack(remote.wasm))  # a TypedStruct comes out typed
        return ResourceConversion(_pack(remote.extension), "success")

    async def _fetch(self, remote: _RemoteWasm) -> Path:
        config = plugin_config(remote.wasm)
        order = take_fetch_order(config.vm_config, str(config.name))
        try:
            return await self.cache.get(
                order.url,
                sha256=order.sha256,
                pull_policy=order.pull_policy,
                pull_secret=order.pull_secret,
                resource_name=remote.extension.name,
                resource_version=order.resource_version,
                timeout_s=order.timeout_s,
            )
        except FetchError as exc:
            raise _FetchFailed(
                f"cannot fetch Wasm module {order.url}: {exc.message}", "fetch_failure"
            ) from None
