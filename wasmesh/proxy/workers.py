"""Running the proxy: one worker in this process, or N worker processes sharing ports (SO_REUSEPORT).

Each worker process has its own event loop, clusters and Wasm Runtime (its own VMs,
like Envoy's worker threads). With several workers a supervisor process owns the
admin listener and gathers /stats/prometheus and /config_dump from the workers'
private admin ports. SIGTERM/SIGINT drain in-flight requests, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from wasmesh.proxy.admin import AdminHandlers, apply_level, label_worker, merge_prometheus, start_admin
from wasmesh.proxy.config import ConfigError, ProxyConfig, load_config
from wasmesh.proxy.plugins import WasmChainBuilder
from wasmesh.proxy.reload import ConfigSource, ReloadWatcher
from wasmesh.proxy.server import ProxyServer

log = logging.getLogger("wasmesh.proxy")


@dataclass(frozen=True)
class FileConfigSource:
    path: str

    def load(self) -> ProxyConfig:
        return load_config(self.path)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    apply_level(level)


def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass


def make_server(config: ProxyConfig, worker_id: int, reuse_port: bool) -> ProxyServer:
    holder: list[ProxyServer] = []
    builder = WasmChainBuilder(
        node=config.node,
        cache=config.cache,
        clusters=lambda: holder[0].clusters if holder else None,
        compile_cache_dir=os.environ.get("WASMESH_COMPILE_CACHE") or None,
    )
    server = ProxyServer(config, chain_builder=builder, reuse_port=reuse_port, worker_id=worker_id)
    holder.append(server)
    return server


def _local_handlers(server: ProxyServer) -> AdminHandlers:
    async def prometheus() -> str:
        return server.render_prometheus()

    async def config_dump() -> object:
        return server.config_dump()

    async def ready() -> bool:
        return server.ready

    return AdminHandlers(prometheus=prometheus, config_dump=config_dump, ready=ready)


async def serve(
    source: ConfigSource,
    *,
    worker_id: int = 0,
    reuse_port: bool = False,
    admin_address: tuple[str, int] | None = None,
    report: Connection | None = None,
) -> int:
    """Run one worker until SIGTERM/SIGINT; returns the exit code."""
    try:
        config = await asyncio.to_thread(source.load)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = make_server(config, worker_id, reuse_port)
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001 - startup failures are one line and a non-zero exit
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        await server.stop(0)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    admin_server = None
    if admin_address is not None:
        admin_server = await start_admin(_local_handlers(server), admin_address[0], admin_address[1])
    if report is not None:
        admin_port = admin_server.sockets[0].getsockname()[1] if admin_server is not None else 0
        report.send(("ready", worker_id, admin_port))
    addresses = ", ".join(
        f"{n}={h}:{p}" for n, (h, p) in ((n, server.listener_address(n)) for n in server.listeners)
    )
    log.info("worker %d serving %s", worker_id, addresses)
    if worker_id == 0 and report is None:
        print(
            json.dumps({"listeners": {n: list(server.listener_address(n)) for n in server.listeners}}),
            flush=True,
        )
    watcher = ReloadWatcher(source, server)
    watch_task = loop.create_task(watcher.run())
    await stop.wait()
    log.info("worker %d draining (%d in flight)", worker_id, server.in_flight())
    watch_task.cancel()
    if admin_server is not None:
        admin_server.close()
    await server.stop()
    return 0


def _worker_process_main(source: ConfigSource, worker_id: int, report: Connection, log_level: str) -> None:
    setup_logging(log_level)
    install_uvloop()
    code = asyncio.run(
        serve(source, worker_id=worker_id, reuse_port=True, admin_address=("127.0.0.1", 0), report=report)
    )
    sys.exit(code)


async def _http_get(port: int, path: str, method: str = "GET") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
    _, _, body = data.partition(b"\r\n\r\n")
    return body


class Supervisor:
    def __init__(
        self, source: ConfigSource, workers: int, admin: tuple[str, int] | None, log_level: str
    ) -> None:
        self.source = source
        self.count = workers
        self.admin = admin
        self.log_level = log_level
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.admin_ports: dict[int, int] = {}
        self.stopping = False

    def _spawn(self, worker_id: int) -> Connection:
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_worker_process_main,
            args=(self.source, worker_id, child, self.log_level),
            name=f"wasmesh-worker-{worker_id}",
            daemon=False,
        )
        proc.start()
        child.close()
        self.procs[worker_id] = proc
        return parent

    async def _wait_report(self, worker_id: int, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            msg = await loop.run_in_executor(None, conn.recv)
        except EOFError:
            return
        if isinstance(msg, tuple) and msg[0] == "ready":
            self.admin_ports[worker_id] = int(msg[2])

    async def _gather(self, path: str) -> dict[int, bytes]:
        results: dict[int, bytes] = {}
        for wid, port in sorted(self.admin_ports.items()):
            with contextlib.suppress(OSError):
                results[wid] = await _http_get(port, path)
        return results

    def handlers(self) -> AdminHandlers:
        async def prometheus() -> str:
            texts = await self._gather("/stats/prometheus")
            return merge_prometheus([label_worker(t.decode(), str(w)) for w, t in texts.items()])

        async def config_dump() -> object:
            texts = await self._gather("/config_dump")
            return {"workers": [json.loads(t) for t in texts.values()]}

        async def ready() -> bool:
            if self.stopping or len(self.admin_ports) < self.count:
                return False
            texts = await self._gather("/ready")
            return len(texts) == self.count

        async def set_level(level: str) -> None:
            for port in self.admin_ports.values():
                with contextlib.suppress(OSError):
                    await _http_get(port, f"/logging?level={level}", method="POST")

        return AdminHandlers(prometheus=prometheus, config_dump=config_dump, ready=ready, set_level=set_level)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reports = [loop.create_task(self._wait_report(i, self._spawn(i))) for i in range(self.count)]
        admin_server = None
        if self.admin is not None:
            admin_server = await start_admin(self.handlers(), self.admin[0], self.admin[1])
        exit_code = 0
        while not stop.is_set():
            await asyncio.sleep(0.2)
            for wid, proc in list(self.procs.items()):
                if not proc.is_alive() and not stop.is_set():
                    if not self.admin_ports.get(wid):
                        # Died before serving: the config cannot start; do not spin.
                        exit_code = proc.exitcode or 1
                        stop.set()
                        break
                    log.error("worker %d exited with %s; restarting it", wid, proc.exitcode)
                    self.admin_ports.pop(wid, None)
                    reports.append(loop.create_task(self._wait_report(wid, self._spawn(wid))))
        self.stopping = True
        for proc in self.procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            await loop.run_in_executor(None, proc.join)
            if proc.exitcode not in (0, None) and exit_code == 0 and proc.exitcode != -signal.SIGTERM:
                exit_code = proc.exitcode
        for t in reports:
            t.cancel()
        if admin_server is not None:
            admin_server.close()
        return exit_code


def run_proxy(
    source: ConfigSource, *, workers: int = 1, admin: tuple[str, int] | None = None, log_level: str = "info"
) -> int:
    """Blocking entry point used by the CLI. Reads the config once up front to report errors early."""
    setup_logging(log_level)
    try:
        config = source.load()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    admin = admin or ((config.admin.address, config.admin.port) if config.admin else None)
    install_uvloop()
    if workers <= 1:
        return asyncio.run(serve(source, admin_address=admin))
    if any(lc.port == 0 for lc in config.listeners):
        print(
            "error: --workers > 1 needs fixed listener ports (port 0 would give each worker its own)",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(Supervisor(source, workers, admin, log_level).run())
