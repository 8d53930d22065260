"""The control plane's resource store: validated WasmPlugins, Workloads, Gateways and Secrets.

Applying stamps metadata the way the Kubernetes apiserver does (creationTimestamp kept across
updates, a store-wide increasing resourceVersion, generation bumped only when the spec changes).
Invalid resources raise `ResourceRejected` and never reach the store, so the last good version
keeps being served. Listeners registered with `subscribe` run after every change (the xDS server
debounces them into pushes).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from wasmesh.api.load import Document
from wasmesh.api.model import WasmPlugin
from wasmesh.controlplane.resources import (
    API_VERSION,
    WORKLOAD_KINDS,
    ResourceError,
    Secret,
    Workload,
    parse_secret,
    parse_workload,
)
from wasmesh.controlplane.validation import PluginRejected, validate_wasmplugin

KIND_ALIASES: Mapping[str, str] = {
    "wasmplugin": "WasmPlugin",
    "wasmplugins": "WasmPlugin",
    "wp": "WasmPlugin",
    "workload": "Workload",
    "workloads": "Workload",
    "gateway": "Gateway",
    "gateways": "Gateway",
    "secret": "Secret",
    "secrets": "Secret",
}
REDACTED = "<redacted>"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
SUPPORTED_KINDS = ("WasmPlugin", "Workload", "Gateway", "Secret")

Parsed = WasmPlugin | Workload | Secret
Key = tuple[str, str, str]  # (kind, namespace, name)


class ResourceRejected(ValueError):
    """Validation failed; `errors` holds one line per problem (Istio's messages)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def canonical_kind(text: str) -> str:
    """`wasmplugins`, `wp`, `WasmPlugin` ... → `WasmPlugin`; raises ValueError for unknown kinds."""
    if text in SUPPORTED_KINDS:
        return text
    kind = KIND_ALIASES.get(text.lower())
    if kind is None:
        raise ValueError(f"unknown resource type {text!r} (known: wasmplugins, workloads, gateways, secrets)")
    return kind


@dataclass(frozen=True)
class StoredResource:
    kind: str
    namespace: str
    name: str
    body: Mapping[str, Any]  # the document with apiserver-style metadata filled in
    parsed: Parsed
    source: str  # "api" or the file it was read from
    created: datetime

    @property
    def key(self) -> Key:
        return (self.kind, self.namespace, self.name)

    @property
    def resource_version(self) -> str:
        return str(self.body["metadata"]["resourceVersion"])

    def public_body(self) -> dict[str, Any]:
        """The document as the API returns it: a Secret's values are never readable back."""
        body = copy.deepcopy(dict(self.body))
        if self.kind != "Secret":
            return body
        for field_name in ("data", "stringData"):
            values = body.get(field_name)
            if isinstance(values, Mapping):
                body[field_name] = {key: REDACTED for key in values}
        annotations = (body.get("metadata") or {}).get("annotations")
        if isinstance(annotations, dict) and LAST_APPLIED in annotations:  # kubectl's copy of the data
            annotations[LAST_APPLIED] = REDACTED
        return body


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _identity(body: Mapping[str, Any]) -> tuple[str, str]:
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping):
        return "", "default"
    name = metadata.get("name")
    namespace = metadata.get("namespace") or "default"
    return (name if isinstance(name, str) else ""), str(namespace)


def _content(body: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    """What decides "unchanged" on re-apply: spec (and Secret data), labels, annotations."""
    metadata = body.get("metadata") or {}
    return (
        body.get("spec"),
        {k: body.get(k) for k in ("data", "stringData", "type")},
        metadata.get("labels"),
        metadata.get("annotations"),
    )


class ConfigStore:
    """Thread-safe store; `version` increases with every accepted change."""

    def __init__(self, root_namespace: str = "istio-system") -> None:
        self.root_namespace = root_namespace
        self._items: dict[Key, StoredResource] = {}
        self._lock = threading.RLock()
        self._resource_version = 0
        self.version = 0
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        self.version += 1
        for listener in list(self._listeners):
            listener()

    # ---- writes ----------------------------------------------------------------------------

    def apply(self, document: Document, source: str = "api") -> tuple[StoredResource, str]:
        """Validate and store; returns (resource, "created" | "configured" | "unchanged")."""
        kind = document.kind
        name, namespace = _identity(document.body)
        where = document.location
        if kind not in SUPPORTED_KINDS:
            raise ResourceRejected(
                [f"{where}: kind {kind!r} is not served (want one of {', '.join(SUPPORTED_KINDS)})"]
            )
        if not name:
            raise ResourceRejected([f"{where}: metadata.name: Required value"])
        with self._lock:
            key = (kind, namespace, name)
            existing = self._items.get(key)
            if existing is not None and _content(existing.body) == _content(document.body):
                self._parse(kind, dict(existing.body), document, where)  # still validate the new text
                return existing, "unchanged"
            body = copy.deepcopy(dict(document.body))
            metadata = dict(body.get("metadata") or {})
            created = existing.created if existing is not None else _now()
            self._resource_version += 1
            generation = 1
            if existing is not None:
                old_generation = int(existing.body["metadata"].get("generation", 1))
                same_spec = existing.body.get("spec") == body.get("spec")
                generation = old_generation if same_spec else old_generation + 1
            metadata.update(
                namespace=namespace,
                creationTimestamp=_timestamp(created),
                resourceVersion=str(self._resource_version),
                generation=generation,
            )
            body["metadata"] = metadata
            parsed = self._parse(kind, body, document, where)
            stored = StoredResource(kind, namespace, name, body, parsed, source, created)
            self._items[key] = stored
        self._changed()
        return stored, "created" if existing is None else "configured"

    def _parse(self, kind: str, body: dict[str, Any], document: Document, where: str) -> Parsed:
        if kind == "WasmPlugin":
            stamped = Document(
                kind, document.apiVersion, body, document.source_file, document.doc_index, document.line
            )
            try:
                return validate_wasmplugin(stamped)
            except PluginRejected as exc:
                raise ResourceRejected(exc.errors) from None
        try:
            if kind in WORKLOAD_KINDS:
                return parse_workload(body, where)
            return parse_secret(body, where)
        except ResourceError as exc:
            raise ResourceRejected([str(exc)]) from None

    def delete(self, kind: str, namespace: str, name: str) -> StoredResource | None:
        with self._lock:
            removed = self._items.pop((canonical_kind(kind), namespace, name), None)
        if removed is not None:
            self._changed()
        return removed

    # ---- reads -----------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> StoredResource | None:
        with self._lock:
            return self._items.get((canonical_kind(kind), namespace, name))

    def select(self, kind: str | None = None, namespace: str | None = None) -> list[StoredResource]:
        wanted = canonical_kind(kind) if kind else None
        with self._lock:
            items = list(self._items.values())
        return sorted(
            (
                item
                for item in items
                if (wanted is None or item.kind == wanted)
                and (namespace is None or item.namespace == namespace)
            ),
            key=lambda item: (item.kind, item.namespace, item.name),
        )

    def keys_from_source(self, source: str) -> set[Key]:
        with self._lock:
            return {key for key, item in self._items.items() if item.source == source}

    def wasmplugins(self) -> list[WasmPlugin]:
        return [item.parsed for item in self.select("WasmPlugin") if isinstance(item.parsed, WasmPlugin)]

    def workloads(self) -> dict[tuple[str, str], Workload]:
        found: dict[tuple[str, str], Workload] = {}
        for item in self.select():
            if isinstance(item.parsed, Workload):
                found[item.parsed.key] = item.parsed
        return found

    def secrets(self) -> dict[tuple[str, str], Secret]:
        return {
            item.parsed.key: item.parsed for item in self.select("Secret") if isinstance(item.parsed, Secret)
        }


__all__ = [
    "API_VERSION",
    "ConfigStore",
    "ResourceRejected",
    "StoredResource",
    "canonical_kind",
]
