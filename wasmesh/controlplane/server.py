"""The control plane process: store + config-dir watcher + ADS server + HTTP API, on one loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from wasmesh.controlplane.auth import ApiSecurity
from wasmesh.controlplane.generator import MeshSnapshotGenerator
from wasmesh.controlplane.httpapi import ApiHandler, serve_http
from wasmesh.controlplane.status import PluginStatus
from wasmesh.controlplane.store import ConfigStore
from wasmesh.controlplane.watcher import DirectoryWatcher
from wasmesh.xds.metrics import XdsMetrics
from wasmesh.xds.server import DEFAULT_DEBOUNCE_AFTER, AdsServer

log = logging.getLogger("wasmesh.controlplane")

DEFAULT_XDS_PORT = 15010  # istiod's plaintext xDS port
DEFAULT_API_PORT = 15014  # istiod's monitoring port


@dataclass
class ControlPlaneOptions:
    config_dir: Path | None = None
    host: str = "127.0.0.1"
    xds_port: int = DEFAULT_XDS_PORT
    api_port: int = DEFAULT_API_PORT
    root_namespace: str = "istio-system"
    debounce_after: float = DEFAULT_DEBOUNCE_AFTER
    poll_interval: float = 0.1
    # TLS, tokens and audit for the HTTP API (wasmesh.controlplane.auth); None: plain HTTP, no auth.
    api_security: ApiSecurity | None = None


class ControlPlane:
    """`await start()` binds both ports (0 = pick a free one: see `xds_port`/`api_port` after)."""

    def __init__(self, options: ControlPlaneOptions) -> None:
        self.options = options
        self.metrics = XdsMetrics()
        self.store = ConfigStore(options.root_namespace)
        self.generator = MeshSnapshotGenerator(self.store)
        self.ads = AdsServer(self.generator, self.metrics, debounce_after=options.debounce_after)
        self.status = PluginStatus(self.ads, self.generator)
        self.ads.proxy_warnings = self.status.proxy_warnings
        self.watcher: DirectoryWatcher | None = None
        if options.config_dir is not None:
            self.watcher = DirectoryWatcher(
                options.config_dir,
                self.store,
                on_rejected=lambda kind, _lines: self.metrics.config_rejected.inc(kind or "unknown"),
            )
        self.xds_port = 0
        self.api_port = 0
        self._http: asyncio.Server | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # /readyz: the config directory is loaded and xDS is served (false again while stopping).
        self.serving = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        loop = self._loop
        # Store changes may come from other threads (tests); the ADS server lives on this loop.

        def on_store_change() -> None:
            loop.call_soon_threadsafe(self.ads.config_changed)

        self.store.subscribe(on_store_change)
        if self.watcher is not None:
            self.watcher.scan()  # serve the directory's content from the first connection on
        self.xds_port = await self.ads.start(self.options.host, self.options.xds_port)
        security = self.options.api_security
        handler = ApiHandler(
            self.store,
            self.metrics,
            self.ads.describe,
            plugin_status=self.status,
            ready=lambda: self.serving,
            tokens=security.tokens if security is not None else None,
            audit=security.audit if security is not None else None,
        )
        tls = security.ssl_context if security is not None else None
        self._http = await serve_http(handler, self.options.host, self.options.api_port, tls)
        self.api_port = int(self._http.sockets[0].getsockname()[1])
        if self.watcher is not None:
            self._watch_task = asyncio.create_task(self.watcher.run(self.options.poll_interval))
        self.serving = True
        log.info(
            "control plane: xDS on %s:%d, API on %s://%s:%d (root namespace %s)",
            self.options.host,
            self.xds_port,
            "https" if tls is not None else "http",
            self.options.host,
            self.api_port,
            self.options.root_namespace,
        )

    async def stop(self) -> None:
        self.serving = False
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
        await self.ads.stop(grace=0.2)

    async def serve_forever(self) -> None:
        """Serve until SIGTERM/SIGINT (or cancellation), then stop cleanly."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
            log.info("control plane: shutting down")
        finally:
            await self.stop()


class ControlPlaneThread:
    """Runs a ControlPlane on its own event loop in a background thread (tests, embedding)."""

    def __init__(self, options: ControlPlaneOptions) -> None:
        self.control_plane = ControlPlane(options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="control-plane", daemon=True)

    def start(self) -> ControlPlane:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.control_plane.start(), self._loop).result(30)
        return self.control_plane

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.control_plane.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
