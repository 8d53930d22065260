"""Convergence: `apply` of a new WasmPlugin → every one of N xDS clients serves it.

Each client is an in-process `wasmesh.xds.client.XdsClient` (its own ADS stream; streams share a
few HTTP/2 connections) subscribed like Envoy: CDS+LDS wildcard, then RDS/ECDS by the names the
listener references. A round applies a new plugin over the HTTP API (as `wasmesh apply` does) and
measures, per client, the time until its listener chain references the plugin *and* the ECDS
resource has arrived — two round trips, after the control plane's 100 ms debounce (included, as in
Istio's pilot_proxy_convergence_time). The control plane runs in a separate process by default so
the clients do not steal its interpreter.

    python benchmarks/bench_convergence.py [--sizes 10,100,1000] [--rounds 5]

Target: p99 ≤ 200 ms at 100 clients (Istio's published convergence: p90 1.5 s at Airbnb).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wasmesh.xds.client import ClientSnapshot, XdsClient  # noqa: E402
from wasmesh.xds.types import EXTENSION_CONFIG  # noqa: E402

STREAMS_PER_CHANNEL = 50
SERVER_CODE = """
import asyncio, logging, sys
from wasmesh.controlplane.server import ControlPlane, ControlPlaneOptions
logging.basicConfig(level=logging.WARNING)
xds_port, api_port, debounce = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
options = ControlPlaneOptions(xds_port=xds_port, api_port=api_port, debounce_after=debounce)
asyncio.run(ControlPlane(options).serve_forever())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(api: str, path: str, document: dict[str, object]) -> None:
    request = urllib.request.Request(f"{api}{path}", data=yaml.safe_dump(document).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = json.loads(response.read())
    if reply.get("errors"):
        raise RuntimeError(f"{path} failed: {reply['errors']}")


def workload() -> dict[str, object]:
    return {
        "apiVersion": "wasmesh.io/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": "bench", "namespace": "default", "labels": {"app": "bench"}},
        "spec": {
            "listeners": [{"name": "http", "port": 18080, "virtualHosts": [{"routes": [{"cluster": "up"}]}]}],
            "clusters": [{"name": "up", "endpoints": ["127.0.0.1:18081"]}],
        },
    }


def plugin(name: str) -> dict[str, object]:
    return {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "url": "file:///opt/bench.wasm",
            "selector": {"matchLabels": {"app": "bench"}},
            "pluginConfig": {"plugin": name},
        },
    }


def serving(name: str) -> Callable[[ClientSnapshot], bool]:
    resource = f"extensions.istio.io/wasmplugin/default.{name}"

    def check(snapshot: ClientSnapshot) -> bool:
        # The client subscribes ECDS only to names its listeners reference, so the resource's
        # arrival means the listener chain references it and its config is resolved.
        return resource in snapshot.of(EXTENSION_CONFIG)

    return check


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def measure(size: int, rounds: int, xds: str, api: str) -> list[float]:
    channels = [
        grpc.aio.insecure_channel(xds) for _ in range((size + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)
    ]
    target: dict[str, str] = {"name": ""}
    started = {"at": 0.0}
    arrivals: dict[int, float] = {}

    def on_update_for(index: int) -> Callable[[ClientSnapshot], None]:
        def on_update(snapshot: ClientSnapshot) -> None:
            if index not in arrivals and target["name"] and serving(target["name"])(snapshot):
                arrivals[index] = time.perf_counter() - started["at"]

        return on_update

    clients = [
        XdsClient(
            xds,
            f"bench-{i}",
            {"app": "bench"},
            metadata={"WORKLOAD_NAME": "bench"},
            on_update=on_update_for(i),
            channel=channels[i // STREAMS_PER_CHANNEL],
        )
        for i in range(size)
    ]
    tasks = [asyncio.create_task(client.run()) for client in clients]
    samples: list[float] = []
    try:
        deadline = time.monotonic() + 120
        while not all("http" in c.snapshot.listeners() for c in clients):
            if time.monotonic() > deadline:
                raise TimeoutError("clients did not all connect")
            await asyncio.sleep(0.05)
        previous = ""
        for round_index in range(rounds):
            name = f"bench-{size}-{round_index}"
            arrivals.clear()
            target["name"] = name
            started["at"] = time.perf_counter()
            await asyncio.to_thread(post, api, "/apply", plugin(name))
            deadline = time.monotonic() + 60
            while len(arrivals) < size:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(arrivals)}/{size} clients converged")
                await asyncio.sleep(0.005)
            samples.extend(arrivals.values())
            if previous:
                await asyncio.to_thread(post, api, "/delete", plugin(previous))
            previous = name
            await asyncio.sleep(0.3)  # let the delete push settle outside the measurement
        if previous:
            await asyncio.to_thread(post, api, "/delete", plugin(previous))
    finally:
        for client in clients:
            client.request_stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--debounce", type=float, default=0.1)
    args = parser.parse_args()
    xds_port, api_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, str(xds_port), str(api_port), str(args.debounce)], env=env
    )
    api = f"http://127.0.0.1:{api_port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{api}/healthz", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        post(api, "/apply", workload())
        print(f"debounce {args.debounce * 1000:.0f} ms (included); times from POST /apply to plugin served")
        print(f"{'clients':>8} {'samples':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for size in (int(s) for s in args.sizes.split(",")):
            rounds = args.rounds if size < 1000 else max(2, args.rounds // 2)
            samples = asyncio.run(measure(size, rounds, f"127.0.0.1:{xds_port}", api))
            row = [percentile(samples, q) * 1000 for q in (0.5, 0.9, 0.99)] + [max(samples) * 1000]
            print(f"{size:>8} {len(samples):>8} " + " ".join(f"{value:>8.1f}" for value in row), flush=True)
            print(f"{'':>8} mean {statistics.mean(samples) * 1000:.1f} ms", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
