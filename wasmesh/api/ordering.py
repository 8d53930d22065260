"""Filter-chain order of WasmPlugins, shared by the proxy and the control plane.

Istio 1.29 (``PushContext.initWasmPlugins`` + ``WasmPluginsByListenerInfo``)
first sorts plugins by ``sortConfigByCreationTime`` (creationTimestamp
ascending, then name, then namespace), then groups them by phase and
stable-sorts each group by priority descending, an unset priority counting as
MinInt32. In the HTTP chain the groups sit at AUTHN, AUTHZ, STATS and, last,
UNSPECIFIED_PHASE (just before the router).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from wasmesh.api.model import PluginPhase, WasmPlugin

# Position of each phase's group in the chain.
PHASE_ORDER: dict[PluginPhase, int] = {
    PluginPhase.AUTHN: 0,
    PluginPhase.AUTHZ: 1,
    PluginPhase.STATS: 2,
    PluginPhase.UNSPECIFIED_PHASE: 3,
}

# Go's zero time.Time: a plugin without creationTimestamp sorts before every stored one.
_ZERO_TIME = datetime.min.replace(tzinfo=UTC)


def creation_order_key(plugin: WasmPlugin) -> tuple[datetime, str, str]:
    """Istio's ``sortConfigByCreationTime`` key."""
    created = plugin.metadata.creation_timestamp or _ZERO_TIME
    return created, plugin.name, plugin.namespace


def sort_by_creation(plugins: Iterable[WasmPlugin]) -> list[WasmPlugin]:
    return sorted(plugins, key=creation_order_key)


def order_chain(plugins: Iterable[WasmPlugin]) -> list[WasmPlugin]:
    """Plugins in filter-chain order: AUTHN, AUTHZ, STATS, UNSPECIFIED; within a phase priority
    descending (unset = MinInt32); ties by creationTimestamp, then name, then namespace."""
    by_creation = sort_by_creation(plugins)
    # Python's sort is stable, like Go's sort.SliceStable over the creation-sorted list.
    return sorted(by_creation, key=lambda plugin: (PHASE_ORDER[plugin.phase], -plugin.sort_priority))


def group_by_phase(plugins: Iterable[WasmPlugin]) -> dict[PluginPhase, list[WasmPlugin]]:
    """``order_chain`` split per phase (every phase present, possibly empty), for chain builders
    that insert the groups around other filters."""
    groups: dict[PluginPhase, list[WasmPlugin]] = {phase: [] for phase in PHASE_ORDER}
    for plugin in order_chain(plugins):
        groups[plugin.phase].append(plugin)
    return groups
