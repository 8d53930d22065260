"""What the ADS server serves: a per-proxy snapshot of xDS resources, and the proxy identity.

A `Snapshot` maps type URL → resource name → packed resource (`google.protobuf.Any`). Versions are
content hashes, so a push that would not change a proxy's resources is never sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2
from google.protobuf import any_pb2, json_format


@dataclass(frozen=True)
class ProxyNode:
    """The identity an xDS client announces in `DiscoveryRequest.node`.

    Labels come from node.metadata.LABELS (Istio's key) or node.metadata.labels; the namespace from
    node.metadata.NAMESPACE (or `namespace`), defaulting to "default". node.metadata.WORKLOAD_NAME
    names the Workload/Gateway resource to serve; without it the node id is used. `identity` is
    the SPIFFE URI the control plane verified from the client certificate ("" over plain text).
    """

    id: str
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    workload_name: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    identity: str = ""

    @classmethod
    def from_node(cls, node: base_pb2.Node) -> ProxyNode:
        metadata: dict[str, Any] = (
            json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        )
        raw_labels = metadata.get("LABELS", metadata.get("labels", {}))
        labels = {str(k): str(v) for k, v in raw_labels.items()} if isinstance(raw_labels, dict) else {}
        namespace = str(metadata.get("NAMESPACE", metadata.get("namespace", "")) or "default")
        workload = str(metadata.get("WORKLOAD_NAME", metadata.get("workload", "")) or node.id)
        return cls(id=node.id, namespace=namespace, labels=labels, workload_name=workload, metadata=metadata)

    def cache_key(self) -> tuple[str, str, tuple[tuple[str, str], ...], bool]:
        """Proxies with equal keys get identical snapshots (the generator caches on this)."""
        return (self.namespace, self.workload_name, tuple(sorted(self.labels.items())), bool(self.identity))


def _digest(resource: any_pb2.Any) -> bytes:
    return hashlib.sha256(resource.SerializeToString(deterministic=True)).digest()


class Snapshot:
    """Immutable per-proxy resources with content digests for cheap version computation."""

    def __init__(self, resources: Mapping[str, Mapping[str, any_pb2.Any]]) -> None:
        self._resources = {type_url: dict(items) for type_url, items in resources.items()}
        self._digests = {
            type_url: {name: _digest(res) for name, res in items.items()}
            for type_url, items in self._resources.items()
        }
        self._selections: dict[tuple[str, frozenset[str] | None], tuple[str, list[any_pb2.Any]]] = {}

    def names(self, type_url: str) -> list[str]:
        return sorted(self._resources.get(type_url, {}))

    def get(self, type_url: str, name: str) -> any_pb2.Any | None:
        return self._resources.get(type_url, {}).get(name)

    def digest(self, type_url: str, name: str) -> bytes | None:
        """The content digest of one resource (None when the snapshot does not have it)."""
        return self._digests.get(type_url, {}).get(name)

    def digests(self, type_url: str, names: Iterable[str] | None) -> dict[str, bytes]:
        """Name → content digest of what `select(type_url, names)` sends."""
        available = self._digests.get(type_url, {})
        if names is None:
            return dict(available)
        return {name: available[name] for name in names if name in available}

    def select(self, type_url: str, names: Iterable[str] | None) -> tuple[str, list[any_pb2.Any]]:
        """(version, resources) for a subscription; `names=None` means wildcard (all).

        Memoised: many proxies share one snapshot and subscribe to the same names."""
        key = (type_url, None if names is None else frozenset(names))
        cached = self._selections.get(key)
        if cached is None:
            cached = self._selections[key] = self._select(type_url, names)
        return cached

    def _select(self, type_url: str, names: Iterable[str] | None) -> tuple[str, list[any_pb2.Any]]:
        available = self._resources.get(type_url, {})
        digests = self._digests.get(type_url, {})
        wanted = sorted(available) if names is None else sorted(n for n in set(names) if n in available)
        hasher = hashlib.sha256()
        for name in wanted:
            hasher.update(name.encode())
            hasher.update(digests[name])
        return hasher.hexdigest()[:16], [available[name] for name in wanted]


class SnapshotGenerator(Protocol):
    """Builds the snapshot for a proxy from the current configuration."""

    def generate(self, proxy: ProxyNode) -> Snapshot: ...
