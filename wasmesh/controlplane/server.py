"""The control plane process: store + config-dir watcher + ADS server + HTTP API, on one loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from wasmesh.controlplane.auth import ApiSecurity
from wasmesh.controlplane.generator import MeshSnapshotGenerator
from wasmesh.controlplane.httpapi import ApiHandler, serve_http
from wasmesh.controlplane.status import PluginStatus
from wasmesh.controlplane.store import ConfigStore
from wasmesh.controlplane.watcher import DirectoryWatcher
from wasmesh.security.ca import (
    DEFAULT_CA_PORT,
    DEFAULT_TRUST_DOMAIN,
    DEFAULT_WORKLOAD_TTL,
    CertificateAuthority,
)
from wasmesh.security.certservice import CertificateService, peer_identity
from wasmesh.security.tokens import identity_for_token
from wasmesh.security.workload import is_loopback
from wasmesh.xds.metrics import XdsMetrics
from wasmesh.xds.server import DEFAULT_DEBOUNCE_AFTER, AdsServer
from wasmesh.xds.snapshot import ProxyNode

log = logging.getLogger("wasmesh.controlplane")

DEFAULT_XDS_PORT = 15010  # istiod's plaintext xDS port
DEFAULT_SECURE_XDS_PORT = 15012  # istiod's mTLS xDS (and CA) port
DEFAULT_API_PORT = 15014  # istiod's monitoring port


@dataclass(frozen=True)
class XdsSecurityOptions:
    """mTLS xDS with the built-in CA. The root lives in `state_dir` (generated on first start)
    unless `ca_cert`/`ca_key` are given; bootstrap tokens are read from `state_dir`/tokens."""

    state_dir: Path
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ca_cert: Path | None = None
    ca_key: Path | None = None
    ca_port: int = DEFAULT_CA_PORT
    workload_ttl: float = DEFAULT_WORKLOAD_TTL


@dataclass
class ControlPlaneOptions:
    config_dir: Path | None = None
    host: str = "127.0.0.1"
    xds_port: int = DEFAULT_XDS_PORT
    api_port: int = DEFAULT_API_PORT
    root_namespace: str = "istio-system"
    debounce_after: float = DEFAULT_DEBOUNCE_AFTER
    poll_interval: float = 0.1
    # None: plain-text xDS (only on a loopback host; proxies are not authenticated and never get
    # pull secrets). The `wasmesh control-plane` command sets it unless given --plaintext.
    security: XdsSecurityOptions | None = None
    # TLS, tokens and audit for the HTTP API (wasmesh.controlplane.auth); None: plain HTTP, no auth.
    api_security: ApiSecurity | None = None


class ControlPlane:
    """`await start()` binds both ports (0 = pick a free one: see `xds_port`/`api_port` after)."""

    def __init__(self, options: ControlPlaneOptions) -> None:
        self.options = options
        self.metrics = XdsMetrics()
        self.store = ConfigStore(options.root_namespace)
        self.generator = MeshSnapshotGenerator(self.store, secrets_need_identity=True)
        self.ca: CertificateAuthority | None = None
        self.ads = AdsServer(
            self.generator,
            self.metrics,
            debounce_after=options.debounce_after,
            authenticate=self._authenticate if options.security is not None else None,
        )
        self.ca_port = 0
        self._ca_server: grpc.aio.Server | None = None
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
        await self._start_xds()
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

    async def _start_xds(self) -> None:
        security = self.options.security
        host = self.options.host
        if security is None:
            if not is_loopback(host):
                raise OSError(f"--host {host}: plain-text xDS is only served on a loopback address")
            self.xds_port = await self.ads.start(host, self.options.xds_port)
            return
        if security.ca_cert is not None and security.ca_key is not None:
            self.ca = CertificateAuthority.load(security.ca_cert, security.ca_key, security.trust_domain)
        else:
            self.ca = CertificateAuthority.load_or_create(security.state_dir, security.trust_domain)
        ca = self.ca
        server_cert, server_key = ca.issue_server([host, "127.0.0.1", "::1"])
        pair = [(server_key, server_cert)]
        mtls = grpc.ssl_server_credentials(pair, root_certificates=ca.root_pem, require_client_auth=True)
        renewal = CertificateService(ca, None, security.workload_ttl, by_certificate=True)
        self.xds_port = await self.ads.start(host, self.options.xds_port, mtls, [renewal.handler()])

        def verify_token(token: str) -> Any:
            return identity_for_token(security.state_dir, token, ca.trust_domain)

        issuing = CertificateService(ca, verify_token, security.workload_ttl, by_certificate=False)
        self._ca_server = grpc.aio.server()
        self._ca_server.add_generic_rpc_handlers((issuing.handler(),))
        self.ca_port = self._ca_server.add_secure_port(
            f"{host}:{security.ca_port}", grpc.ssl_server_credentials(pair)
        )
        if self.ca_port == 0:
            raise OSError(f"CA: cannot listen on {host}:{security.ca_port}")
        await self._ca_server.start()
        log.info("CA: certificates on %s:%d (trust domain %s)", host, self.ca_port, ca.trust_domain)

    def _authenticate(self, proxy: ProxyNode, context: grpc.aio.ServicerContext[Any, Any]) -> ProxyNode:
        """The node must be the workload its certificate names (namespace and Workload/Gateway name)."""
        assert self.ca is not None
        identity = peer_identity(context)
        if identity is None:
            raise PermissionError("the client certificate carries no SPIFFE identity")
        if identity.trust_domain != self.ca.trust_domain:
            raise PermissionError(f"identity {identity.uri} is not in trust domain {self.ca.trust_domain}")
        if (identity.namespace, identity.name) != (proxy.namespace, proxy.workload_name):
            raise PermissionError(
                f"identity {identity.uri} may not act as namespace {proxy.namespace} "
                f"workload {proxy.workload_name}"
            )
        return dataclasses.replace(proxy, identity=identity.uri)

    async def stop(self) -> None:
        self.serving = False
        if self._ca_server is not None:
            await self._ca_server.stop(0.2)
            self._ca_server = None
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
