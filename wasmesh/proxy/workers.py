"""Running the proxy: one worker in this process, or N worker processes sharing ports (SO_REUSEPORT).

Each worker process has its own event loop, clusters and Wasm Runtime (its own VMs,
like Envoy's worker threads). With several workers a supervisor process owns the
admin listener and gathers /stats/prometheus and /config_dump from the workers'
private admin ports. SIGTERM/SIGINT drain in-flight requests, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, Protocol

from wasmesh.proxy.admin import AdminHandlers, apply_level, label_worker, merge_prometheus, start_admin
from wasmesh.proxy.config import ConfigError, ProxyConfig, WasmLimits, load_config
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
        limits=config.wasm,
    )
    server = ProxyServer(config, chain_builder=builder, reuse_port=reuse_port, worker_id=worker_id)
    holder.append(server)
    return server


@dataclass(frozen=True)
class StartupWasmLimitsSource:
    """Reloads through `source`, keeping the ``wasm:`` limits the worker started with.

    The limits belong to the worker's Runtime (its start-up deadline and reload backoff are fixed
    when it is created), so a changed ``wasm:`` section takes effect on restart; until then each
    reload logs a warning, and the served config (and /config_dump) keeps the limits in force.
    """

    source: ConfigSource
    limits: WasmLimits

    def load(self) -> ProxyConfig:
        config = self.source.load()
        if config.wasm == self.limits:
            return config
        log.warning(
            "%s: wasm: changed limits take effect when the proxy restarts (in force: %s)",
            config.source,
            self.limits,
        )
        return replace(config, wasm=self.limits)


def _local_handlers(server: ProxyServer) -> AdminHandlers:
    async def prometheus() -> str:
        return server.render_prometheus()

    async def config_dump() -> object:
        return server.config_dump()

    async def ready() -> bool:
        return server.ready

    return AdminHandlers(prometheus=prometheus, config_dump=config_dump, ready=ready)


class WorkerServe(Protocol):
    """One worker's main coroutine (`serve`, `serve_xds`); module-level, so picklable for spawn."""

    def __call__(
        self,
        payload: Any,
        /,
        *,
        worker_id: int,
        reuse_port: bool,
        admin_address: tuple[str, int] | None,
        report: Connection | None,
    ) -> Coroutine[Any, Any, int]: ...


async def run_worker_until_stopped(
    handlers: AdminHandlers,
    *,
    worker_id: int,
    admin_address: tuple[str, int] | None,
    report: Connection | None,
    announcement: dict[str, object],
    in_flight: Callable[[], int],
) -> None:
    """What every serving worker does until SIGTERM/SIGINT: its admin listener, the ready report to
    the supervisor (with the admin port, where the supervisor gathers stats and dumps), and the
    one JSON line on stdout (single-process mode). Returns with the admin listener closed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    admin_server = None
    if admin_address is not None:
        admin_server = await start_admin(handlers, admin_address[0], admin_address[1])
    # Everything built so far (config, compiled modules, VMs, imported libraries) lives as long
    # as the worker: move it out of the cyclic collector's reach, so collections triggered by
    # request traffic only walk what requests create.
    gc.collect()
    gc.freeze()
    if report is not None:
        admin_port = admin_server.sockets[0].getsockname()[1] if admin_server is not None else 0
        report.send(("ready", worker_id, admin_port))
    if worker_id == 0 and report is None:
        print(json.dumps(announcement), flush=True)
    await stop.wait()
    log.info("worker %d draining (%d in flight)", worker_id, in_flight())
    if admin_server is not None:
        admin_server.close()


async def serve(
    source: ConfigSource,
    /,
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
    addresses = ", ".join(
        f"{n}={h}:{p}" for n, (h, p) in ((n, server.listener_address(n)) for n in server.listeners)
    )
    log.info("worker %d serving %s", worker_id, addresses)
    reload_source = StartupWasmLimitsSource(source, config.wasm)
    watch_task = asyncio.get_running_loop().create_task(ReloadWatcher(reload_source, server).run())
    await run_worker_until_stopped(
        _local_handlers(server),
        worker_id=worker_id,
        admin_address=admin_address,
        report=report,
        announcement={"listeners": {n: list(server.listener_address(n)) for n in server.listeners}},
        in_flight=server.in_flight,
    )
    watch_task.cancel()
    await server.stop()
    return 0


def worker_process_main(
    serve_worker: WorkerServe, payload: object, worker_id: int, report: Connection, log_level: str
) -> None:
    """A worker process's entry point (multiprocessing spawn target)."""
    setup_logging(log_level)
    install_uvloop()
    code = asyncio.run(
        serve_worker(
            payload, worker_id=worker_id, reuse_port=True, admin_address=("127.0.0.1", 0), report=report
        )
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


def _receive_once(conn: Connection) -> object:
    """The worker's one report, or None when it died first; the pipe is closed either way."""
    try:
        return conn.recv()
    except EOFError:
        return None
    finally:
        conn.close()


# A worker that dies after it has served is restarted: at once the first time, then after
# RESTART_BACKOFF_S doubling per consecutive crash up to RESTART_BACKOFF_MAX_S, so a worker that
# keeps crashing (a plugin that kills its process, a config that no longer starts) does not spin.
# A worker that stayed up RESTART_STABLE_S counts as healthy again (the next crash restarts at once).
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
RESTART_STABLE_S = 30.0


def restart_delay(consecutive_crashes: int) -> float:
    """Seconds to wait before restarting a worker that has crashed this many times in a row (>= 1)."""
    if consecutive_crashes <= 1:
        return 0.0
    return min(RESTART_BACKOFF_S * 2.0 ** (consecutive_crashes - 2), RESTART_BACKOFF_MAX_S)


@dataclass
class _WorkerSlot:
    """One worker id's current process and its restart history."""

    process: Any = None
    started_at: float = 0.0
    served: bool = False  # some process of this id has served (so a death is a crash, not bad config)
    restarts: int = 0
    consecutive_crashes: int = 0
    restart_at: float | None = None  # monotonic time of a pending (backed-off) restart
    report: asyncio.Task[None] | None = None  # reading the current process's ready message


class Supervisor:
    """Runs N worker processes, restarts crashed ones, and serves the merged admin endpoints."""

    def __init__(
        self,
        serve_worker: WorkerServe,
        payload: object,
        workers: int,
        admin: tuple[str, int] | None,
        log_level: str,
    ) -> None:
        self.serve_worker = serve_worker
        self.payload = payload
        self.count = workers
        self.admin = admin
        self.log_level = log_level
        self.ctx = multiprocessing.get_context("spawn")
        self.slots: dict[int, _WorkerSlot] = {wid: _WorkerSlot() for wid in range(workers)}
        self.admin_ports: dict[int, int] = {}
        self.stopping = False
        self._reports: list[asyncio.Task[None]] = []

    @property
    def procs(self) -> dict[int, Any]:
        return {wid: slot.process for wid, slot in self.slots.items() if slot.process is not None}

    def _spawn(self, worker_id: int) -> None:
        parent, child = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=worker_process_main,
            args=(self.serve_worker, self.payload, worker_id, child, self.log_level),
            name=f"wasmesh-worker-{worker_id}",
            daemon=False,
        )
        process.start()
        child.close()
        slot = self.slots[worker_id]
        slot.process, slot.restart_at = process, None
        slot.started_at = time.monotonic()
        slot.report = asyncio.create_task(self._wait_report(worker_id, process, parent))
        self._reports.append(slot.report)

    async def _wait_report(self, worker_id: int, process: Any, conn: Connection) -> None:
        msg = await asyncio.get_running_loop().run_in_executor(None, _receive_once, conn)
        slot = self.slots[worker_id]
        if slot.process is not process:  # a late report from a process that has been replaced
            return
        if isinstance(msg, tuple) and msg[0] == "ready":
            self.admin_ports[worker_id] = int(msg[2])
            slot.served = True

    def _check_workers(self, now: float) -> int | None:
        """Restart dead workers (with backoff); an exit code when the proxy cannot start at all."""
        for wid, slot in self.slots.items():
            process = slot.process
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    self._spawn(wid)
                continue
            if process is None or process.is_alive():
                continue
            if not slot.served:
                if slot.report is not None and not slot.report.done():
                    continue  # its ready message (or the pipe's EOF) is still being read
                # Died before any process of this id served: the config cannot start; do not spin.
                code: int = process.exitcode or 1
                return code
            self.admin_ports.pop(wid, None)
            if now - slot.started_at >= RESTART_STABLE_S:
                slot.consecutive_crashes = 0
            slot.consecutive_crashes += 1
            slot.restarts += 1
            delay = restart_delay(slot.consecutive_crashes)
            log.error("worker %d exited with %s; restarting it in %.1fs", wid, process.exitcode, delay)
            slot.restart_at = now + delay
            if delay == 0:
                self._spawn(wid)
        return None

    async def _gather(self, path: str) -> dict[int, bytes]:
        results: dict[int, bytes] = {}
        for wid, port in sorted(self.admin_ports.items()):
            with contextlib.suppress(OSError):
                results[wid] = await _http_get(port, path)
        return results

    def describe(self) -> dict[str, object]:
        """The supervisor's view for /config_dump: each worker's pid, whether it serves, restarts."""
        return {
            "pid": os.getpid(),
            "workers": [
                {
                    "id": wid,
                    "pid": slot.process.pid if slot.process is not None and slot.process.is_alive() else None,
                    "serving": wid in self.admin_ports,
                    "restarts": slot.restarts,
                }
                for wid, slot in sorted(self.slots.items())
            ],
        }

    def handlers(self) -> AdminHandlers:
        async def prometheus() -> str:
            texts = await self._gather("/stats/prometheus")
            return merge_prometheus([label_worker(t.decode(), str(w)) for w, t in texts.items()])

        async def config_dump() -> object:
            texts = await self._gather("/config_dump")
            return {"workers": [json.loads(t) for t in texts.values()], "supervisor": self.describe()}

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
        for wid in range(self.count):
            self._spawn(wid)
        admin_server = None
        if self.admin is not None:
            admin_server = await start_admin(self.handlers(), self.admin[0], self.admin[1])
        exit_code = 0
        while not stop.is_set():
            await asyncio.sleep(0.2)
            if stop.is_set():
                break
            failed = self._check_workers(time.monotonic())
            if failed is not None:
                exit_code = failed
                break
        self.stopping = True
        processes = list(self.procs.values())
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            await loop.run_in_executor(None, process.join)
            if process.exitcode not in (0, None) and exit_code == 0 and process.exitcode != -signal.SIGTERM:
                exit_code = process.exitcode
        for task in self._reports:
            task.cancel()
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
    return asyncio.run(Supervisor(serve, source, workers, admin, log_level).run())
