"""`wasmesh proxy --workers 2`: a worker killed with SIGKILL is replaced while the other keeps serving;
and the supervisor's restart backoff for a worker that keeps crashing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_plugins import header_plugin_wat, wasmplugin_yaml, write_module
from proxy_testsupport import EchoServer, free_port, request

from wasmesh.proxy.workers import (
    RESTART_BACKOFF_MAX_S,
    RESTART_BACKOFF_S,
    RESTART_STABLE_S,
    Supervisor,
    restart_delay,
    serve,
)


def _admin_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _worker_pids(admin_port: int) -> dict[int, int | None]:
    dump = json.loads(_admin_get(admin_port, "/config_dump")[1])
    return {w["id"]: w["pid"] for w in dump["supervisor"]["workers"]}


def _reaped(pid: int) -> bool:
    """The process is gone from /proc: reaped by the supervisor, so all its threads have exited and
    its sockets are closed. (A zombie main thread is not enough: other threads may still hold the
    listening socket open, and connections the kernel queues on it then are reset.)"""
    return not Path(f"/proc/{pid}").exists()


def _served_by(metrics: str, worker: int) -> int:
    labels = rf'worker="{worker}",[^}}]*response_code_class="2xx"[^}}]*'
    pattern = rf"^wasmesh_downstream_rq_total{{{labels}}} (\d+)"
    return sum(int(m) for m in re.findall(pattern, metrics, re.MULTILINE))


@pytest.fixture
def proxy_process(echo: EchoServer, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    port, admin = free_port(), free_port()
    write_module(tmp_path, "tag", header_plugin_wat("T"))
    (tmp_path / "plugins.yaml").write_text(wasmplugin_yaml("tagger", tmp_path / "tag.wasm"))
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"admin: {{port: {admin}}}\n"
        f"listeners:\n  - name: main\n    port: {port}\n    virtual_hosts:\n      - domains: ['*']\n"
        f"        routes: [{{match: {{prefix: /}}, cluster: echo}}]\n"
        f"clusters: [{{name: echo, endpoints: ['127.0.0.1:{echo.port}']}}]\n"
        f"plugins: [{{path: plugins.yaml}}]\n"
    )
    # stderr is inherited: pytest's fd capture shows the supervisor's and workers' logs on failure.
    proc = subprocess.Popen(
        [sys.executable, "-m", "wasmesh", "proxy", "--config", str(config), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield proc, port, admin
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait(condition: Any, what: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited early with {proc.returncode}")
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def _ready(admin: int) -> bool:
    try:
        return _admin_get(admin, "/ready")[0] == 200
    except OSError:
        return False


def _assert_serves(port: int) -> None:
    status, headers, _ = request(port)
    assert (status, headers.get("x-resp-chain")) == (200, "T")


def test_killed_worker_is_replaced_while_the_other_serves(
    proxy_process: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, port, admin = proxy_process
    _wait(lambda: _ready(admin), "the proxy is ready", proc)
    pids = _worker_pids(admin)
    assert sorted(pids) == [0, 1] and all(pids.values())
    for _ in range(10):
        _assert_serves(port)

    victim_pid = pids[1]
    assert victim_pid is not None
    os.kill(victim_pid, signal.SIGKILL)
    _wait(lambda: _reaped(victim_pid), "the killed worker is reaped", proc, timeout=10)

    # Every request (a new connection each) succeeds while the worker is restarted: the kernel
    # sends connections only to the surviving worker's socket until the new one binds.
    for _ in range(5):
        _assert_serves(port)
    deadline = time.monotonic() + 60
    while not (_worker_pids(admin).get(1) not in (None, victim_pid) and _ready(admin)):
        assert proc.poll() is None, "the supervisor exited"
        assert time.monotonic() < deadline, "no replacement worker became ready"
        _assert_serves(port)

    new_pids = _worker_pids(admin)
    assert new_pids[0] == pids[0], "the surviving worker must not be restarted"
    assert new_pids[1] not in (None, victim_pid)
    workers = json.loads(_admin_get(admin, "/config_dump")[1])["supervisor"]["workers"]
    assert [w["restarts"] for w in workers] == [0, 1]

    # The replacement serves: with SO_REUSEPORT new connections spread over both workers' sockets.
    for _ in range(60):
        _assert_serves(port)
    assert _served_by(_admin_get(admin, "/stats/prometheus")[1], 1) > 0

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


# ------------------------------------------------------------------ restart backoff (no processes)


def test_restart_delay_backs_off_and_is_capped() -> None:
    assert restart_delay(1) == 0.0  # the first crash restarts at once
    assert restart_delay(2) == RESTART_BACKOFF_S
    assert restart_delay(3) == 2 * RESTART_BACKOFF_S
    assert restart_delay(50) == RESTART_BACKOFF_MAX_S


class _ExitedProcess:
    """What the supervisor sees of a worker process that has exited."""

    def __init__(self, exitcode: int) -> None:
        self.exitcode = exitcode
        self.pid = None

    def is_alive(self) -> bool:
        return False


def test_crash_loop_is_restarted_with_backoff_and_bad_start_stops() -> None:
    supervisor = Supervisor(serve, None, 1, None, "info")
    spawned: list[float] = []
    now = 1000.0

    def fake_spawn(worker_id: int) -> None:
        slot = supervisor.slots[worker_id]
        slot.process, slot.restart_at, slot.started_at = _ExitedProcess(-9), None, now
        spawned.append(now)

    supervisor._spawn = fake_spawn  # type: ignore[method-assign]
    slot = supervisor.slots[0]
    slot.served = True
    slot.process, slot.started_at = _ExitedProcess(-9), now

    assert supervisor._check_workers(now) is None and spawned == [now]  # first crash: at once
    now += 0.2
    assert supervisor._check_workers(now) is None and len(spawned) == 1  # second: backed off
    assert slot.restart_at == pytest.approx(now + RESTART_BACKOFF_S)
    now += RESTART_BACKOFF_S
    assert supervisor._check_workers(now) is None and spawned[-1] == now
    now += 0.2
    supervisor._check_workers(now)
    assert slot.restart_at == pytest.approx(now + 2 * RESTART_BACKOFF_S) and slot.restarts == 3

    # A worker that stayed up long enough is healthy again: its next crash restarts at once.
    assert slot.restart_at is not None
    now = slot.restart_at + RESTART_STABLE_S
    supervisor._check_workers(now)  # the pending restart
    now += RESTART_STABLE_S
    count = len(spawned)
    supervisor._check_workers(now)
    assert len(spawned) == count + 1 and slot.consecutive_crashes == 1

    # A worker id that never served dies: the configuration cannot start, so the proxy stops.
    fresh = Supervisor(serve, None, 1, None, "info")
    fresh.slots[0].process = _ExitedProcess(2)
    assert fresh._check_workers(now) == 2


def test_a_death_seen_before_the_ready_message_is_read_waits_for_it() -> None:
    """A worker that reported ready and died at once is a crash, not a configuration that cannot start."""

    async def scenario() -> None:
        supervisor = Supervisor(serve, None, 1, None, "info")
        slot = supervisor.slots[0]
        slot.process = _ExitedProcess(-9)
        ready_read = asyncio.Event()

        async def reading_the_ready_message() -> None:
            await ready_read.wait()
            slot.served = True

        slot.report = asyncio.create_task(reading_the_ready_message())
        supervisor._spawn = lambda worker_id: None  # type: ignore[method-assign]
        assert supervisor._check_workers(1000.0) is None  # undecided while the message is in flight
        ready_read.set()
        await slot.report
        assert supervisor._check_workers(1000.0) is None and slot.restarts == 1  # restarted, proxy kept

    asyncio.run(scenario())
