"""10,000 requests through a plugin that traps on every call: policy answers, a live worker, flat RSS."""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from proxy_plugins import trap_plugin_wat, wasmplugin_yaml, write_module
from proxy_testsupport import EchoServer, free_port

REQUESTS = 10_000


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _wait_ready(admin: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "proxy exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("not ready")


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "expected"), [("FAIL_CLOSE", 503), ("FAIL_OPEN", 200)])
def test_trap_every_call_10k(echo: EchoServer, tmp_path: Path, strategy: str, expected: int) -> None:
    module = write_module(tmp_path, "trap", trap_plugin_wat())
    (tmp_path / "wp.yaml").write_text(wasmplugin_yaml("trap", module, fail_strategy=strategy))
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wasmesh", "run", "--listen", f"127.0.0.1:{port}", "--upstream",
         f"http://127.0.0.1:{echo.port}", "-f", str(tmp_path / "wp.yaml"), "--admin", f"127.0.0.1:{admin}",
         "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_ready(admin, proc)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        statuses: dict[int, int] = {}
        rss_after_warmup = 0
        for i in range(REQUESTS):
            # A fresh connection now and then, so connection setup/teardown is part of the soak too.
            if i % 500 == 0:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", f"/soak/{i}")
            r = conn.getresponse()
            r.read()
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if i == 2_000:
                rss_after_warmup = _rss_kib(proc.pid)
        conn.close()
        assert statuses == {expected: REQUESTS}
        assert proc.poll() is None
        growth_kib = _rss_kib(proc.pid) - rss_after_warmup
        assert growth_kib < 8 * 1024, f"RSS grew {growth_kib} KiB over {REQUESTS - 2000} requests"
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5) as r:
            stats = r.read().decode()
        assert 'wasmesh_downstream_rq_active{listener="main"} 0' in stats
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
