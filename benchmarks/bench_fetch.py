"""Module distribution benchmark: single-flight under a thundering herd, and warm cache lookups.

Runs against a real ``docker-registry`` (started here on 127.0.0.1, image pushed by skopeo) behind the
counting proxy of the agent tests, and against a local HTTP server. Prints a small table.

    python benchmarks/bench_fetch.py [--pulls 100] [--lookups 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "agent"))  # the registry/skopeo/proxy helpers of the agent tests

from agent_testsupport import (  # noqa: E402
    FaultProxy,
    ModuleServer,
    real_plugin_wasm,
    skopeo_push,
    solo_oci_image,
    start_registry,
    write_oci_layout,
)

from wasmesh.agent.cache import ModuleCache  # noqa: E402
from wasmesh.agent.options import CacheOptions  # noqa: E402


def herd(cache: ModuleCache, url: str, pulls: int) -> tuple[float, int]:
    async def run() -> set[Path]:
        return set(await asyncio.gather(*(cache.get(url, resource_name=f"ns.p{i}") for i in range(pulls))))

    start = time.perf_counter()
    paths = asyncio.run(run())
    return time.perf_counter() - start, len(paths)


def warm_lookup_us(cache: ModuleCache, url: str, lookups: int) -> tuple[float, float]:
    cache.get_sync(url)
    start = time.perf_counter()
    for _ in range(lookups):
        cache.get_sync(url)
    sync_us = (time.perf_counter() - start) / lookups * 1e6

    async def run() -> float:
        begin = time.perf_counter()
        for _ in range(lookups):
            await cache.get(url)
        return (time.perf_counter() - begin) / lookups * 1e6

    return sync_us, asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pulls", type=int, default=100)
    parser.add_argument("--lookups", type=int, default=20000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    wasm = real_plugin_wasm()
    registry = start_registry(work / "registry")
    proxy = FaultProxy(registry)
    server = ModuleServer()
    rows: list[tuple[str, str]] = []
    try:
        layout = work / "layout"
        write_oci_layout(layout, solo_oci_image(wasm), "v1")
        skopeo_push(layout, "v1", registry, "bench/plugin")
        oci_url = f"oci://{proxy.host}/bench/plugin:v1"
        http_url = server.serve("/plugin.wasm", wasm)

        cache = ModuleCache(
            CacheOptions(
                dir=work / "cache-oci", insecure_registries=frozenset({"*"}), docker_config_dir=work / "none"
            )
        )
        seconds, distinct = herd(cache, oci_url, args.pulls)
        rows.append(
            (
                f"oci: {args.pulls} concurrent cold pulls ({len(wasm) / 2**20:.1f} MiB)",
                f"{seconds * 1e3:.0f} ms, {proxy.blob_gets} blob GET, {proxy.manifest_gets} manifest GET, "
                f"{distinct} path",
            )
        )
        sync_us, async_us = warm_lookup_us(cache, oci_url, args.lookups)
        rows.append(("oci: warm lookup, get_sync", f"{sync_us:.1f} µs"))
        rows.append(("oci: warm lookup, await get", f"{async_us:.1f} µs"))
        cache.close()

        cache = ModuleCache(CacheOptions(dir=work / "cache-http"))
        seconds, distinct = herd(cache, http_url, args.pulls)
        rows.append(
            (
                f"http: {args.pulls} concurrent cold pulls",
                f"{seconds * 1e3:.0f} ms, {server.count('/plugin.wasm')} GET, {distinct} path",
            )
        )
        sync_us, async_us = warm_lookup_us(cache, http_url, args.lookups)
        rows.append(("http: warm lookup, get_sync", f"{sync_us:.1f} µs"))
        rows.append(("http: warm lookup, await get", f"{async_us:.1f} µs"))
        cache.close()

        start = time.perf_counter()
        restarted = ModuleCache(CacheOptions(dir=work / "cache-oci"))
        rows.append(
            ("restart: load + verify index (1 module)", f"{(time.perf_counter() - start) * 1e3:.1f} ms")
        )
        restarted.close()
    finally:
        server.stop()
        proxy.stop()
        registry.stop()

    width = max(len(name) for name, _ in rows)
    print(f"{'measurement':<{width}}  result")
    print(f"{'-' * width}  {'-' * 40}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    ok = proxy.blob_gets == 1 and server.count("/plugin.wasm") == 1
    print("single-flight:", "OK (exactly one download per module)" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
