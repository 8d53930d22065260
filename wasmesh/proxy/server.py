"""One proxy worker: listeners, clusters, plugin chains, admin, reload and drain.

``ProxyServer`` is what ``wasmesh proxy``/``wasmesh run`` start in each worker
process; file reloads go through ``apply_config``, and ``wasmesh.proxy.xds.XdsProxy``
drives its listeners for ``wasmesh proxy --xds``. Plugin chains are built by a
``ChainBuilder`` (wasmesh.proxy.plugins); a listener without plugins never touches the Wasm runtime.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Any, Protocol

from wasmesh.proxy.chain import PluginChain
from wasmesh.proxy.config import ConfigError, ListenerConfig, PluginResource, ProxyConfig
from wasmesh.proxy.connection import Listener
from wasmesh.proxy.stats import ProxyStats
from wasmesh.proxy.upstream import ClusterManager

log = logging.getLogger("wasmesh.proxy")


class ChainBuilder(Protocol):
    """Turns WasmPlugin resources into a listener's plugin chain (see wasmesh.proxy.plugins)."""

    async def build(
        self, listener: ListenerConfig, resources: Sequence[PluginResource], generation: int
    ) -> PluginChain:
        """Raise an exception with a one-line message when any plugin cannot be loaded."""

    def render_metrics(self) -> str: ...

    def close(self) -> None: ...


class ProxyServer:
    def __init__(
        self,
        config: ProxyConfig,
        *,
        chain_builder: ChainBuilder | None = None,
        reuse_port: bool = False,
        worker_id: int = 0,
        listen_sockets: dict[str, socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.reuse_port = reuse_port
        self.stats = ProxyStats()
        self.chain_builder = chain_builder
        self._listen_sockets = listen_sockets or {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clusters: ClusterManager | None = None
        self.listeners: dict[str, Listener] = {}
        self.generation = 0
        self.ready = False
        self._reload_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind listeners and load plugin chains; raises (one-line message) if the config cannot load."""
        self.loop = asyncio.get_running_loop()
        self.clusters = ClusterManager(self.config.clusters, self.loop)
        chains = await self._build_chains(self.config)
        node = self.config.node
        for lc in self.config.listeners:
            listener = Listener(lc, self.clusters, self.stats, node, self.loop)
            listener.chain = chains[lc.name]
            await listener.start(reuse_port=self.reuse_port, sock=self._listen_sockets.get(lc.name))
            self.listeners[lc.name] = listener
        self.ready = True

    def listener_address(self, name: str | None = None) -> tuple[str, int]:
        listener = self.listeners[name] if name else next(iter(self.listeners.values()))
        return listener.bound_address

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Graceful shutdown: stop accepting, finish in-flight exchanges (up to the timeout), close."""
        self.ready = False
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        for listener in self.listeners.values():
            listener.stop_accepting()
            listener.start_draining()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and any(lst.connections for lst in self.listeners.values()):
            await asyncio.sleep(0.02)
        for listener in self.listeners.values():
            for c in list(listener.connections):
                c.abort()
            listener.chain.retire()
            if listener.server is not None:
                await listener.server.wait_closed()
        if self.clusters is not None:
            self.clusters.close()
        if self.chain_builder is not None:
            self.chain_builder.close()

    def in_flight(self) -> int:
        return sum(lst.stats.rq_active for lst in self.listeners.values())

    # ------------------------------------------------------------------ reload / control plane

    async def apply_config(self, config: ProxyConfig) -> bool:
        """Swap routes, clusters and plugin chains; a bad config leaves the old one serving (logs one line).

        Listener addresses cannot change at runtime: a listener added, removed or moved needs a restart.
        """
        async with self._reload_lock:
            old_by_name = {lc.name: lc for lc in self.config.listeners}
            new_by_name = {lc.name: lc for lc in config.listeners}
            moved = [
                n
                for n in set(old_by_name) | set(new_by_name)
                if n not in old_by_name
                or n not in new_by_name
                or (old_by_name[n].address, old_by_name[n].port, old_by_name[n].tls_mode)
                != (new_by_name[n].address, new_by_name[n].port, new_by_name[n].tls_mode)
            ]
            if moved:
                return self._reject(
                    f"{config.source}: listeners: adding, removing, moving a listener or switching its "
                    f"TLS mode needs a restart ({', '.join(sorted(moved))})"
                )
            try:
                chains = await self._build_chains(config)
            except Exception as exc:  # noqa: BLE001 - any load failure keeps the old chain
                return self._reject(_one_line(exc))
            assert self.clusters is not None
            self.clusters.update(config.clusters)
            for name, listener in self.listeners.items():
                listener.update_routes(new_by_name[name])
                listener.node = config.node
                listener.swap_chain(chains[name])
            self.config = config
            self.stats.config_reload_total += 1
            log.info("configuration %s applied (generation %d)", config.source, self.generation)
            return True

    def _reject(self, message: str) -> bool:
        self.stats.config_reload_failed += 1
        log.error("reload rejected, keeping the current configuration: %s", message)
        return False

    async def _build_chains(self, config: ProxyConfig) -> dict[str, PluginChain]:
        self.generation += 1
        chains: dict[str, PluginChain] = {}
        try:
            for lc in config.listeners:
                chains[lc.name] = await self._build_chain(lc, config.plugins, self.generation)
        except BaseException:
            for c in chains.values():
                c.retire()
            raise
        return chains

    async def _build_chain(
        self, listener: ListenerConfig, resources: Sequence[PluginResource], generation: int
    ) -> PluginChain:
        if not resources:
            return PluginChain(generation=generation)
        if self.chain_builder is None:
            raise ConfigError(f"{resources[0].source}: plugins given but no plugin loader is configured")
        return await self.chain_builder.build(listener, resources, generation)

    # ------------------------------------------------------------------ admin views

    def render_prometheus(self) -> str:
        gauges: dict[str, tuple[int, int, int, int]] = {}
        if self.clusters is not None:
            for name, c in self.clusters.clusters.items():
                s = c.stats
                gauges[name] = (s.cx_total, s.cx_active, s.cx_connect_fail, s.cx_connect_timeout)
        text = self.stats.render(gauges)
        if self.chain_builder is not None:
            text += self.chain_builder.render_metrics()
        return text

    def config_dump(self) -> dict[str, Any]:
        listeners = []
        for name, lst in self.listeners.items():
            lc = lst.config
            listeners.append(
                {
                    "name": name,
                    "address": f"{lst.bound_address[0]}:{lst.bound_address[1]}" if lst.server else None,
                    "virtual_hosts": [
                        {
                            "name": vh.name,
                            "domains": list(vh.domains),
                            "routes": [
                                {
                                    "name": r.name,
                                    "match": {k: v for k, v in vars(r.match).items() if v not in (None, ())},
                                    "cluster": r.cluster,
                                    "timeout_s": r.timeout_s,
                                }
                                for r in vh.routes
                            ],
                        }
                        for vh in lc.virtual_hosts
                    ],
                    "plugin_chain": {
                        "generation": lst.chain.generation,
                        "plugins": lst.chain.description or [{"name": n} for n in lst.chain.names],
                    },
                }
            )
        return {
            "source": self.config.source,
            "worker": self.worker_id,
            "generation": self.generation,
            "listeners": listeners,
            "clusters": [
                {
                    "name": c.name,
                    "endpoints": [f"{h}:{p}" for h, p in c.endpoints],
                    "connect_timeout_s": c.connect_timeout_s,
                }
                for c in self.config.clusters
            ],
        }


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
