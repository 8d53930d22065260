"""Typed model of Istio's ``extensions.istio.io/v1alpha1`` ``WasmPlugin``.

Every field of the proto (``istio/api extensions/v1alpha1/wasm.proto``) is here,
named in Python style; enums are the proto's enums with the proto's numbers, so a
value parsed from ``phase: AUTHN`` and from ``phase: 1`` is the same member.

The model holds the resource *as written* (after wasmesh's one documented
rewrite: relative ``file://`` paths made absolute, see ``parse.py``). Istio's
defaulting rules, which Istio applies when it *uses* a plugin rather than when it
stores it, are exposed as properties/functions: ``normalized_url`` (no scheme
means ``oci://``), ``sort_priority`` (unset means MinInt32),
``effective_pull_policy`` (the ``:latest`` rule) and ``effective_type``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import TypeAlias
from urllib.parse import urlsplit

from wasmesh.api.gourl import split_scheme

API_GROUP = "extensions.istio.io"
API_VERSION = "extensions.istio.io/v1alpha1"
KIND = "WasmPlugin"

MIN_INT32 = -(2**31)
MAX_INT32 = 2**31 - 1

# The ECDS resource name istiod 1.29 gives a plugin's filter config.
ECDS_RESOURCE_PREFIX = "extensions.istio.io/wasmplugin/"

# JSON as produced by a YAML/JSON document (pluginConfig is arbitrary JSON).
JSONValue: TypeAlias = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]


class PluginPhase(IntEnum):
    UNSPECIFIED_PHASE = 0
    AUTHN = 1
    AUTHZ = 2
    STATS = 3


class PullPolicy(IntEnum):
    UNSPECIFIED_POLICY = 0
    IfNotPresent = 1
    Always = 2


class FailStrategy(IntEnum):
    FAIL_CLOSE = 0
    FAIL_OPEN = 1
    FAIL_RELOAD = 2


class EnvValueSource(IntEnum):
    INLINE = 0
    HOST = 1


class PluginType(IntEnum):
    UNSPECIFIED_PLUGIN_TYPE = 0
    HTTP = 1
    NETWORK = 2


class WorkloadMode(IntEnum):
    UNDEFINED = 0
    CLIENT = 1
    SERVER = 2
    CLIENT_AND_SERVER = 3


@dataclass(frozen=True)
class ObjectMeta:
    name: str
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    # None when the document does not carry one (not yet stored by an apiserver);
    # such plugins sort first, like Go's zero time.Time.
    creation_timestamp: datetime | None = None
    resource_version: str = ""
    generation: int = 0


@dataclass(frozen=True)
class WorkloadSelector:
    match_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyTargetReference:
    kind: str
    name: str
    group: str = ""
    namespace: str = ""

    @property
    def canonical_group(self) -> str:
        """Istio's ``config.CanonicalGroup``: the empty (core) group is spelled ``core``."""
        return self.group or "core"


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str = ""
    value_from: EnvValueSource = EnvValueSource.INLINE


@dataclass(frozen=True)
class VmConfig:
    env: tuple[EnvVar, ...] = ()


@dataclass(frozen=True)
class PortSelector:
    number: int


@dataclass(frozen=True)
class TrafficSelector:
    mode: WorkloadMode = WorkloadMode.UNDEFINED
    ports: tuple[PortSelector, ...] = ()


@dataclass(frozen=True)
class WasmPlugin:
    metadata: ObjectMeta
    url: str
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    sha256: str = ""
    image_pull_policy: PullPolicy = PullPolicy.UNSPECIFIED_POLICY
    image_pull_secret: str = ""
    # Hidden in Istio's docs and not implemented by Istio; accepted and kept.
    verification_key: str = ""
    # None when absent; an empty mapping when written as ``{}``.
    plugin_config: Mapping[str, JSONValue] | None = None
    plugin_name: str = ""
    phase: PluginPhase = PluginPhase.UNSPECIFIED_PHASE
    # None = unset (Istio sorts it as MinInt32, see ``sort_priority``).
    priority: int | None = None
    fail_strategy: FailStrategy = FailStrategy.FAIL_CLOSE
    vm_config: VmConfig | None = None
    match: tuple[TrafficSelector, ...] = ()
    type: PluginType = PluginType.UNSPECIFIED_PLUGIN_TYPE
    # Where the plugin was read from; not part of its identity.
    source_file: Path | None = field(default=None, compare=False)
    doc_index: int | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def sort_priority(self) -> int:
        return MIN_INT32 if self.priority is None else self.priority

    @property
    def effective_target_refs(self) -> tuple[PolicyTargetReference, ...]:
        """Istio's ``GetTargetRefs``: the deprecated singular ``targetRef`` counts when the list is empty."""
        if not self.target_refs and self.target_ref is not None:
            return (self.target_ref,)
        return self.target_refs

    @property
    def url_scheme(self) -> str:
        """The URL's scheme as Istio sees it: lower-case, ``oci`` when none is written."""
        return url_scheme(self.url) or "oci"

    @property
    def normalized_url(self) -> str:
        """The URL with Istio's default scheme applied (``ghcr.io/x:1`` → ``oci://ghcr.io/x:1``)."""
        return normalize_url(self.url)

    @property
    def effective_type(self) -> PluginType:
        """UNSPECIFIED_PLUGIN_TYPE is treated as HTTP."""
        return PluginType.NETWORK if self.type == PluginType.NETWORK else PluginType.HTTP

    @property
    def ecds_resource_name(self) -> str:
        return ecds_resource_name(self)

    @property
    def effective_pull_policy(self) -> PullPolicy:
        return effective_pull_policy(self)

    @property
    def host_env_keys(self) -> tuple[str, ...]:
        """Names of VM env vars taken from the proxy's own environment (valueFrom: HOST)."""
        if self.vm_config is None:
            return ()
        return tuple(e.name for e in self.vm_config.env if e.value_from == EnvValueSource.HOST)

    @property
    def inline_env(self) -> dict[str, str]:
        """VM env vars given inline (valueFrom: INLINE, the default)."""
        if self.vm_config is None:
            return {}
        return {e.name: e.value for e in self.vm_config.env if e.value_from == EnvValueSource.INLINE}


def url_scheme(url: str) -> str:
    """The scheme Go's ``url.Parse`` finds (lower-cased), or "" when there is none.

    Go's rule matters for Istio compatibility: ``ghcr.io/x:1`` has no scheme (a
    ``/`` comes before the ``:``) while ``localhost:5000/x`` has the scheme
    ``localhost``.
    """
    try:
        return split_scheme(url)[0].lower()
    except ValueError:  # starts with ':'
        return ""


def normalize_url(url: str) -> str:
    """Istio's ``convertToWasmPluginWrapper`` default: a URL without scheme is an OCI reference."""
    if url_scheme(url):
        return url
    return "oci:" + url if url.startswith("//") else "oci://" + url


def ecds_resource_name(plugin: WasmPlugin) -> str:
    """``extensions.istio.io/wasmplugin/<namespace>.<name>``, the ECDS name istiod 1.29 uses."""
    return f"{ECDS_RESOURCE_PREFIX}{plugin.namespace}.{plugin.name}"


def effective_pull_policy(plugin: WasmPlugin) -> PullPolicy:
    """Istio agent's ``shouldIgnoreResourceVersion`` rule, resolved to IfNotPresent or Always.

    An explicit policy wins. Unspecified behaves as IfNotPresent, except an ``oci``
    URL whose *path* ends in ``:latest`` (an untagged reference is not "latest").
    """
    if plugin.image_pull_policy != PullPolicy.UNSPECIFIED_POLICY:
        return plugin.image_pull_policy
    normalized = plugin.normalized_url
    if url_scheme(normalized) == "oci" and urlsplit(normalized).path.endswith(":latest"):
        return PullPolicy.Always
    return PullPolicy.IfNotPresent


def _protobuf_struct_number(value: JSONValue) -> JSONValue:
    """google.protobuf.Struct stores every number as a double; integral ones print without ``.0``."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**63:
            return int(value)
        return value
    if isinstance(value, int):
        return value if abs(value) <= 2**53 else float(value)
    if isinstance(value, list):
        return [_protobuf_struct_number(item) for item in value]
    return {key: _protobuf_struct_number(item) for key, item in value.items()}


def plugin_configuration_json(plugin: WasmPlugin) -> bytes:
    """pluginConfig as the JSON bytes the plugin receives in ``proxy_on_configure``.

    Istio marshals the Struct with protojson (keys sorted, numbers as doubles) and
    sends nothing (an empty ``Any``) for an absent or empty struct: here ``b""``.
    """
    if not plugin.plugin_config:
        return b""
    normalized = _protobuf_struct_number(dict(plugin.plugin_config))
    return json.dumps(normalized, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
