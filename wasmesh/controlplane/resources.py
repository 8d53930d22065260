"""The resources the control plane serves besides WasmPlugins: `Workload`, `Gateway` and `Secret`.

Format (apiVersion `wasmesh.io/v1alpha1`), documented in docs/control-plane.md::

    kind: Workload            # or Gateway
    metadata: {name: web, namespace: default, labels: {app: web}}
    spec:
      listeners:
      - name: http            # optional, defaults to "<mode>_<port>" lower-case
        port: 10000
        address: 0.0.0.0      # optional
        mode: SERVER          # CLIENT | SERVER (a Gateway is always CLIENT)
        virtualHosts:
        - name: default       # optional
          domains: ["*"]      # optional
          routes:
          - match: {prefix: /}          # or {exact: /x} or {regex: "^/x.*"}
            cluster: backend
      clusters:
      - name: backend
        endpoints: ["127.0.0.1:8080"]
        connectTimeout: 5s    # optional

This module only parses and validates; translation to xDS lives in `translate.py`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

API_VERSION = "wasmesh.io/v1alpha1"
WORKLOAD_KINDS = ("Workload", "Gateway")
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"

TrafficMode = Literal["CLIENT", "SERVER"]
PathMatchKind = Literal["prefix", "exact", "regex"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")


class ResourceError(ValueError):
    """A resource that cannot be served; the message is one line naming the field."""


@dataclass(frozen=True)
class RouteRule:
    match_kind: PathMatchKind
    match_value: str
    cluster: str


@dataclass(frozen=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[RouteRule, ...]


@dataclass(frozen=True)
class ListenerSpec:
    name: str
    port: int
    address: str
    mode: TrafficMode
    virtual_hosts: tuple[VirtualHost, ...]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout_seconds: float


@dataclass(frozen=True)
class Workload:
    """A proxy (sidecar or gateway) the control plane configures; `kind` is Workload or Gateway."""

    kind: str
    name: str
    namespace: str
    labels: Mapping[str, str]
    listeners: tuple[ListenerSpec, ...]
    clusters: tuple[ClusterSpec, ...]
    source: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def gateway_name(self) -> str | None:
        """For a Gateway, the name targetRefs match (Istio reads it from this pod label)."""
        if self.kind != "Gateway":
            return None
        return self.labels.get(GATEWAY_NAME_LABEL, self.name)


@dataclass(frozen=True)
class Secret:
    """A `kubernetes.io/dockerconfigjson` Secret referenced by WasmPlugin.imagePullSecret."""

    name: str
    namespace: str
    docker_config_json: str
    source: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass
class _Path:
    """Tracks where in a document we are, so errors name the field (`spec.listeners[0].port`)."""

    where: str
    parts: list[str] = field(default_factory=list)

    def error(self, path: str, message: str) -> ResourceError:
        return ResourceError(f"{self.where}: {path}: {message}")


def _mapping(value: object, path: str, ctx: _Path) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.error(path, f"must be an object, got {type(value).__name__}")
    return value


def _list(value: object, path: str, ctx: _Path) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.error(path, f"must be a list, got {type(value).__name__}")
    return value


def _string(value: object, path: str, ctx: _Path, *, required: bool = True, default: str = "") -> str:
    if value is None:
        if required:
            raise ctx.error(path, "Required value")
        return default
    if not isinstance(value, str) or (required and not value):
        raise ctx.error(path, f"must be a non-empty string, got {value!r}")
    return value


def _port(value: object, path: str, ctx: _Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(path, f"must be an integer port, got {value!r}")
    if not 1 <= value <= 65535:
        raise ctx.error(path, f"port out of range: {value}")
    return value


def parse_duration(value: object, path: str, where: str = "") -> float:
    """`5s`, `250ms`, `1m` or a number of seconds → seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        found = _DURATION.match(value)
        if found:
            scale = {"ms": 0.001, "s": 1.0, "m": 60.0}[found.group(2)]
            return float(found.group(1)) * scale
    raise ResourceError(f"{where}: {path}: invalid duration {value!r} (want e.g. 5s, 250ms)")


def _metadata(body: Mapping[str, Any], ctx: _Path) -> tuple[str, str, dict[str, str]]:
    metadata = _mapping(body.get("metadata"), "metadata", ctx)
    name = _string(metadata.get("name"), "metadata.name", ctx)
    namespace = _string(
        metadata.get("namespace"), "metadata.namespace", ctx, required=False, default="default"
    )
    labels_raw = _mapping(metadata.get("labels"), "metadata.labels", ctx)
    labels: dict[str, str] = {}
    for key, value in labels_raw.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ctx.error(f"metadata.labels.{key}", f"label values must be strings, got {value!r}")
        labels[key] = value
    return name, namespace, labels


def _route(raw: object, path: str, ctx: _Path) -> RouteRule:
    body = _mapping(raw, path, ctx)
    match = _mapping(body.get("match"), f"{path}.match", ctx) or {"prefix": "/"}
    kinds = [kind for kind in ("prefix", "exact", "regex") if kind in match]
    if len(kinds) != 1:
        raise ctx.error(f"{path}.match", "exactly one of prefix, exact or regex must be set")
    kind: PathMatchKind = kinds[0]  # type: ignore[assignment]
    value = _string(match[kind], f"{path}.match.{kind}", ctx)
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise ctx.error(f"{path}.match.regex", f"invalid regex: {exc}") from None
    cluster = _string(body.get("cluster"), f"{path}.cluster", ctx)
    return RouteRule(kind, value, cluster)


def _virtual_host(raw: object, path: str, index: int, ctx: _Path) -> VirtualHost:
    body = _mapping(raw, path, ctx)
    name = _string(body.get("name"), f"{path}.name", ctx, required=False, default=f"vhost_{index}")
    domains_raw = _list(body.get("domains"), f"{path}.domains", ctx) or ["*"]
    domains = tuple(_string(d, f"{path}.domains[{i}]", ctx) for i, d in enumerate(domains_raw))
    routes = tuple(
        _route(r, f"{path}.routes[{i}]", ctx)
        for i, r in enumerate(_list(body.get("routes"), f"{path}.routes", ctx))
    )
    if not routes:
        raise ctx.error(f"{path}.routes", "at least one route is required")
    return VirtualHost(name, domains, routes)


def _listener(raw: object, path: str, kind: str, ctx: _Path) -> ListenerSpec:
    body = _mapping(raw, path, ctx)
    port = _port(body.get("port"), f"{path}.port", ctx)
    default_mode = "CLIENT" if kind == "Gateway" else "SERVER"
    mode = _string(body.get("mode"), f"{path}.mode", ctx, required=False, default=default_mode).upper()
    if mode not in ("CLIENT", "SERVER"):
        raise ctx.error(f"{path}.mode", f"must be CLIENT or SERVER, got {mode!r}")
    if kind == "Gateway" and mode != "CLIENT":
        raise ctx.error(
            f"{path}.mode", "a Gateway's listeners are CLIENT (Istio treats gateways as outbound)"
        )
    name = _string(body.get("name"), f"{path}.name", ctx, required=False, default=f"{mode.lower()}_{port}")
    address = _string(body.get("address"), f"{path}.address", ctx, required=False, default="0.0.0.0")
    hosts = tuple(
        _virtual_host(v, f"{path}.virtualHosts[{i}]", i, ctx)
        for i, v in enumerate(_list(body.get("virtualHosts"), f"{path}.virtualHosts", ctx))
    )
    if not hosts:
        raise ctx.error(f"{path}.virtualHosts", "at least one virtual host is required")
    return ListenerSpec(name, port, address, mode, hosts)  # type: ignore[arg-type]


def _endpoint(raw: object, path: str, ctx: _Path) -> Endpoint:
    text = _string(raw, path, ctx)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ctx.error(path, f"endpoint must be HOST:PORT, got {text!r}")
    return Endpoint(host.strip("[]"), _port(int(port_text), path, ctx))


def _cluster(raw: object, path: str, ctx: _Path) -> ClusterSpec:
    body = _mapping(raw, path, ctx)
    name = _string(body.get("name"), f"{path}.name", ctx)
    endpoints = tuple(
        _endpoint(e, f"{path}.endpoints[{i}]", ctx)
        for i, e in enumerate(_list(body.get("endpoints"), f"{path}.endpoints", ctx))
    )
    if not endpoints:
        raise ctx.error(f"{path}.endpoints", "at least one endpoint is required")
    timeout = parse_duration(body.get("connectTimeout", "5s"), f"{path}.connectTimeout", ctx.where)
    return ClusterSpec(name, endpoints, timeout)


def parse_workload(body: Mapping[str, Any], where: str = "") -> Workload:
    """A `Workload` or `Gateway` document → Workload; raises ResourceError naming the bad field."""
    kind = str(body.get("kind", ""))
    if kind not in WORKLOAD_KINDS:
        raise ResourceError(f"{where}: kind: expected one of {', '.join(WORKLOAD_KINDS)}, got {kind!r}")
    ctx = _Path(where)
    if body.get("apiVersion") != API_VERSION:
        raise ctx.error("apiVersion", f"expected {API_VERSION}, got {body.get('apiVersion')!r}")
    name, namespace, labels = _metadata(body, ctx)
    ctx.where = f"{where}: {kind} {namespace}/{name}" if where else f"{kind} {namespace}/{name}"
    spec = _mapping(body.get("spec"), "spec", ctx)
    unknown = sorted(set(spec) - {"listeners", "clusters"})
    if unknown:
        raise ctx.error(f"spec.{unknown[0]}", "unknown field")
    listeners = tuple(
        _listener(item, f"spec.listeners[{i}]", kind, ctx)
        for i, item in enumerate(_list(spec.get("listeners"), "spec.listeners", ctx))
    )
    clusters = tuple(
        _cluster(item, f"spec.clusters[{i}]", ctx)
        for i, item in enumerate(_list(spec.get("clusters"), "spec.clusters", ctx))
    )
    _check_unique([item.name for item in listeners], "spec.listeners", "name", ctx)
    _check_unique([str(item.port) for item in listeners], "spec.listeners", "port", ctx)
    _check_unique([item.name for item in clusters], "spec.clusters", "name", ctx)
    known_clusters = {item.name for item in clusters}
    for li, listener in enumerate(listeners):
        for vi, host in enumerate(listener.virtual_hosts):
            for ri, rule in enumerate(host.routes):
                if rule.cluster not in known_clusters:
                    raise ctx.error(
                        f"spec.listeners[{li}].virtualHosts[{vi}].routes[{ri}].cluster",
                        f"unknown cluster {rule.cluster!r}",
                    )
    if kind == "Gateway":
        labels.setdefault(GATEWAY_NAME_LABEL, name)
    return Workload(kind, name, namespace, labels, listeners, clusters, where)


def _check_unique(values: list[str], path: str, field_name: str, ctx: _Path) -> None:
    seen: set[str] = set()
    for index, value in enumerate(values):
        if value in seen:
            raise ctx.error(f"{path}[{index}].{field_name}", f"Duplicate value: {value!r}")
        seen.add(value)


def parse_secret(body: Mapping[str, Any], where: str = "") -> Secret:
    """A v1 Secret of type kubernetes.io/dockerconfigjson (data base64 or stringData plain)."""
    ctx = _Path(where)
    name, namespace, _labels = _metadata(body, ctx)
    ctx.where = f"{where}: Secret {namespace}/{name}" if where else f"Secret {namespace}/{name}"
    secret_type = body.get("type")
    if secret_type != "kubernetes.io/dockerconfigjson":
        raise ctx.error("type", f"must be kubernetes.io/dockerconfigjson, got {secret_type!r}")
    string_data = _mapping(body.get("stringData"), "stringData", ctx)
    data = _mapping(body.get("data"), "data", ctx)
    if ".dockerconfigjson" in string_data:
        text = _string(string_data[".dockerconfigjson"], "stringData[.dockerconfigjson]", ctx)
    elif ".dockerconfigjson" in data:
        encoded = _string(data[".dockerconfigjson"], "data[.dockerconfigjson]", ctx)
        try:
            text = base64.b64decode(encoded, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise ctx.error("data[.dockerconfigjson]", "is not valid base64") from None
    else:
        raise ctx.error("data[.dockerconfigjson]", "Required value")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise ctx.error(".dockerconfigjson", f"is not valid JSON: {exc.msg}") from None
    return Secret(name, namespace, text, where)
