"""The http(s)/file fetchers and the cache semantics (pull policies, persistence, expiry, single-flight)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
from agent_testsupport import ModuleServer, tiny_wasm

from wasmesh.agent.cache import INDEX_FILE, ModuleCache, should_ignore_resource_version
from wasmesh.agent.errors import FetchError
from wasmesh.agent.httpfetch import HttpFetcher, backoff_delays, is_retryable_status
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.options import CacheOptions


def make_cache(directory: Path, **overrides: Any) -> ModuleCache:
    options = CacheOptions(dir=directory, http_initial_backoff_s=0.001, **overrides)
    return ModuleCache(options, AgentMetrics())


def tar_of(name: str, data: bytes) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return raw.getvalue()


# ---------------------------------------------------------------------------------- http fetcher


def fetcher(**overrides: Any) -> HttpFetcher:
    return HttpFetcher(**{"initial_backoff_s": 0.001, **overrides})


@pytest.mark.parametrize(
    "boxing",
    ["raw", "gzip", "tar", "tar.gz", "gzip-of-tar-of-gzip"],
)
def test_http_fetch_unboxes_like_istio(boxing: str, module_server: ModuleServer) -> None:
    wasm = tiny_wasm(boxing)
    body = {
        "raw": wasm,
        "gzip": gzip.compress(wasm),
        "tar": tar_of("dir/any-name.wasm", wasm),
        "tar.gz": gzip.compress(tar_of("x.wasm", wasm)),
        "gzip-of-tar-of-gzip": gzip.compress(tar_of("x.wasm.gz", gzip.compress(wasm))),
    }[boxing]
    assert fetcher().fetch(module_server.serve("/m", body)) == wasm


def test_http_retries_500s_then_recovers(module_server: ModuleServer) -> None:
    url = module_server.serve("/flaky", tiny_wasm("flaky"), statuses=[500, 503, 502])
    assert fetcher().fetch(url) == tiny_wasm("flaky")
    assert module_server.count("/flaky") == 4


def test_http_gives_up_after_five_attempts_with_istios_message(module_server: ModuleServer) -> None:
    url = module_server.serve("/down", b"", statuses=[500] * 10)
    with pytest.raises(FetchError) as caught:
        fetcher().fetch(url)
    assert str(caught.value) == (
        "wasm module download failed after 5 attempts, last error: "
        "wasm module download request failed: status code 500"
    )
    assert caught.value.metric_result == "download_failure"
    assert module_server.count("/down") == 5


@pytest.mark.parametrize("status", [404, 401, 501, 505, 511])
def test_http_non_retryable_statuses_stop_at_once(status: int, module_server: ModuleServer) -> None:
    url = module_server.serve("/s", b"", statuses=[status] * 10)
    with pytest.raises(FetchError, match=f"after 1 attempts, last error: .*status code {status}$"):
        fetcher().fetch(url)
    assert module_server.count("/s") == 1


def test_http_transport_errors_are_retried() -> None:
    from agent_testsupport import free_port

    with pytest.raises(
        FetchError, match=r"^wasm module download failed after 3 attempts, last error: Get \""
    ):
        fetcher(max_attempts=3).fetch(f"http://127.0.0.1:{free_port()}/nothing-listens")


def test_http_size_limit_is_an_error_not_a_truncation(module_server: ModuleServer) -> None:
    url = module_server.serve("/big", tiny_wasm("big") + b"\x00" * 5000)
    with pytest.raises(FetchError, match="exceeds the size limit of 4096 bytes"):
        fetcher(max_body_bytes=4096).fetch(url)
    bomb = module_server.serve("/bomb", gzip.compress(tiny_wasm("bomb") + b"\x00" * 100_000))
    with pytest.raises(FetchError, match="decompressed gzip stream exceeds the size limit of 4096 bytes"):
        fetcher(max_body_bytes=4096).fetch(bomb)


def test_http_per_request_timeout(module_server: ModuleServer) -> None:
    url = module_server.serve("/slow", tiny_wasm("slow"), delay_s=1.0)
    with pytest.raises(FetchError, match="after 2 attempts, last error: .*deadline exceeded"):
        fetcher(request_timeout_s=0.2, max_attempts=2).fetch(url)


def test_backoff_schedule_and_retryable_statuses() -> None:
    delays = backoff_delays(0.5, 5)
    assert len(delays) == 4
    for index, delay in enumerate(delays):
        nominal = 0.5 * 1.5**index
        assert nominal * 0.5 <= delay <= nominal * 1.5
    assert [s for s in (500, 501, 502, 503, 504, 505, 511, 404, 429) if is_retryable_status(s)] == [
        500,
        502,
        503,
        504,
    ]


# ------------------------------------------------------------------------------------ cache: http


def test_http_checksum_is_of_the_unboxed_bytes(module_server: ModuleServer, tmp_path: Path) -> None:
    wasm = tiny_wasm("checksum")
    url = module_server.serve("/g.wasm.gz", gzip.compress(wasm))
    cache = make_cache(tmp_path)
    path = cache.get_sync(url, sha256=hashlib.sha256(wasm).hexdigest())
    assert path.read_bytes() == wasm
    assert path.parent.name == hashlib.sha256(url.encode()).hexdigest()  # name = verbatim URL
    assert path.name == hashlib.sha256(wasm).hexdigest() + ".wasm"
    with pytest.raises(FetchError) as caught:
        make_cache(tmp_path / "other").get_sync(url, sha256="f" * 64)
    assert caught.value.metric_result == "checksum_mismatched"
    cache.close()


def test_invalid_wasm_is_a_fetch_failure(module_server: ModuleServer, tmp_path: Path) -> None:
    url = module_server.serve("/not-wasm", b"<html>not wasm</html>")
    cache = make_cache(tmp_path)
    with pytest.raises(FetchError, match=f"^fetched Wasm binary from {url} is invalid$"):
        cache.get_sync(url)
    assert cache.metrics.remote_fetch_count.value("fetch_failure") == 1
    assert cache.entry_count() == 0 and not list(tmp_path.rglob("*.wasm"))
    cache.close()


def test_if_not_present_keeps_the_first_module(module_server: ModuleServer, tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    url = module_server.serve("/p.wasm", tiny_wasm("v1"))
    first = cache.get_sync(url, pull_policy="IfNotPresent", resource_name="ns.p", resource_version="1")
    module_server.serve("/p.wasm", tiny_wasm("v2"))
    again = cache.get_sync(url, pull_policy="IfNotPresent", resource_name="ns.p", resource_version="2")
    assert again == first and again.read_bytes() == tiny_wasm("v1")
    assert module_server.count("/p.wasm") == 0  # served from cache: no request since the re-route
    assert cache.metrics.cache_lookup_count.value("true") == 1
    cache.close()


def test_always_repulls_when_the_resource_version_changes(
    module_server: ModuleServer, tmp_path: Path
) -> None:
    cache = make_cache(tmp_path)
    url = module_server.serve("/a.wasm", tiny_wasm("v1"))
    first = cache.get_sync(url, pull_policy="Always", resource_name="ns.a", resource_version="1")
    module_server.serve("/a.wasm", tiny_wasm("v2"))
    same_version = cache.get_sync(url, pull_policy="Always", resource_name="ns.a", resource_version="1")
    assert same_version == first and module_server.count("/a.wasm") == 0
    new_version = cache.get_sync(url, pull_policy="Always", resource_name="ns.a", resource_version="2")
    assert new_version.read_bytes() == tiny_wasm("v2") and module_server.count("/a.wasm") == 1
    # another resource pointing at the same URL tracks its own version
    other = cache.get_sync(url, pull_policy="Always", resource_name="ns.b", resource_version="7")
    assert other == new_version
    assert cache.entry_count() == 2
    cache.close()


def test_latest_rule_for_unspecified_policy() -> None:
    assert should_ignore_resource_version("UNSPECIFIED_POLICY", "oci://r.io/x:v1")
    assert not should_ignore_resource_version("UNSPECIFIED_POLICY", "oci://r.io/x:latest")
    assert should_ignore_resource_version("UNSPECIFIED_POLICY", "oci://r.io/x")  # implicit latest: no
    assert should_ignore_resource_version("UNSPECIFIED_POLICY", "https://h/x:latest")
    assert not should_ignore_resource_version("Always", "https://h/x")
    assert should_ignore_resource_version("IfNotPresent", "oci://r.io/x:latest")


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    cases: tuple[tuple[dict[str, Any], str], ...] = (
        ({"url": "ftp://h/x.wasm"}, "unsupported Wasm module downloading URL scheme: ftp"),
        ({"url": "oci://r.io/UPPER:v1"}, "invalid repository"),
        ({"url": "https://h/x", "sha256": "xyz"}, "sha256: expected 64 lower-case hex characters"),
        ({"url": "https://h/x", "pull_policy": "Sometimes"}, "pull_policy: unknown value 'Sometimes'"),
    )
    for kwargs, fragment in cases:
        url = str(kwargs.pop("url"))
        with pytest.raises(FetchError, match=fragment):
            cache.get_sync(url, **kwargs)
    cache.close()


# -------------------------------------------------------------------------------- cache: file://


def test_file_urls_are_read_verified_and_cached(tmp_path: Path) -> None:
    module = tmp_path / "plugin.wasm.gz"
    module.write_bytes(gzip.compress(tiny_wasm("file")))
    cache = make_cache(tmp_path / "cache")
    path = cache.get_sync(f"file://{module}")
    assert path.read_bytes() == tiny_wasm("file")
    with pytest.raises(FetchError, match="cannot read wasm module file .*missing.wasm"):
        cache.get_sync(f"file://{tmp_path}/missing.wasm")
    cache.close()


# ------------------------------------------------------------------ cache: concurrency, persistence


def test_async_single_flight_one_download_for_many_waiters(
    module_server: ModuleServer, tmp_path: Path
) -> None:
    url = module_server.serve("/shared.wasm", tiny_wasm("shared"), delay_s=0.3)
    cache = make_cache(tmp_path)

    async def many() -> list[Path]:
        return await asyncio.gather(*(cache.get(url) for _ in range(50)))

    paths = asyncio.run(many())
    assert len(set(paths)) == 1
    assert module_server.count("/shared.wasm") == 1
    assert cache.metrics.remote_fetch_count.value("success") == 1
    cache.close()


def test_a_closed_cache_serves_hits_but_starts_no_background_fetch(
    module_server: ModuleServer, tmp_path: Path
) -> None:
    cached = module_server.serve("/cached.wasm", tiny_wasm("cached"))
    other = module_server.serve("/other.wasm", tiny_wasm("other"))
    cache = make_cache(tmp_path)
    path = asyncio.run(cache.get(cached))
    cache.close()
    assert asyncio.run(cache.get(cached)) == path
    with pytest.raises(FetchError) as caught:
        asyncio.run(cache.get(other))
    assert str(caught.value) == f"cannot fetch Wasm module {other}: the module cache is closed"
    assert module_server.count("/other.wasm") == 0


def test_threads_share_one_download_and_errors(module_server: ModuleServer, tmp_path: Path) -> None:
    url = module_server.serve("/gone.wasm", b"", statuses=[404], delay_s=0.3)
    cache = make_cache(tmp_path)
    errors: list[str] = []

    def pull() -> None:
        try:
            cache.get_sync(url)
        except FetchError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 8 and len(set(errors)) == 1
    assert module_server.count("/gone.wasm") == 1
    assert cache.metrics.remote_fetch_count.value("download_failure") == 1
    cache.close()


def test_cache_survives_a_restart_without_network(module_server: ModuleServer, tmp_path: Path) -> None:
    url = module_server.serve("/r.wasm", tiny_wasm("restart"))
    first = make_cache(tmp_path)
    path = first.get_sync(url, resource_name="ns.r", resource_version="1")
    first.close()
    module_server.stop()  # no network from here on
    (path.parent / f".{path.name}.tmp-crashed").write_bytes(b"\x00asm partial")  # a crash mid-write

    second = make_cache(tmp_path)
    assert second.entry_count() == 1
    assert second.get_sync(url, resource_name="ns.r", resource_version="1") == path
    assert second.metrics.cache_lookup_count.value("true") == 1
    assert not list(path.parent.glob(".*tmp-*"))
    second.close()


def test_tampered_files_are_dropped_on_load(module_server: ModuleServer, tmp_path: Path) -> None:
    url = module_server.serve("/t.wasm", tiny_wasm("tamper"))
    cache = make_cache(tmp_path)
    path = cache.get_sync(url)
    cache.close()
    path.write_bytes(tiny_wasm("evil"))
    reloaded = make_cache(tmp_path)
    assert reloaded.entry_count() == 0
    assert reloaded.get_sync(url).read_bytes() == tiny_wasm("tamper")  # fetched again, rewritten
    reloaded.close()
    (tmp_path / INDEX_FILE).write_text("{not json")
    assert make_cache(tmp_path).entry_count() == 0


def test_expiry_purges_unused_but_keeps_claimed_modules(module_server: ModuleServer, tmp_path: Path) -> None:
    cache = make_cache(tmp_path, module_expiry_s=60)
    claimed = cache.get_sync(module_server.serve("/c.wasm", tiny_wasm("claimed")), resource_name="ns.c")
    unclaimed = cache.get_sync(module_server.serve("/u.wasm", tiny_wasm("unclaimed")))
    future = os.path.getmtime(claimed) + 3600
    import time

    assert cache.purge_expired(now=time.time() + 30) == []
    assert cache.purge_expired(now=future) == [unclaimed]
    assert claimed.exists() and not unclaimed.exists()
    assert cache.metrics.cache_entries.value() == 1
    cache.release("ns.c")
    assert cache.purge_expired(now=future) == [claimed]
    assert cache.entry_count() == 0
    cache.close()


def test_followers_of_a_shared_download_record_their_own_resource_versions(
    module_server: ModuleServer, tmp_path: Path
) -> None:
    url = module_server.serve("/always.wasm", tiny_wasm("always"), delay_s=0.2)
    cache = make_cache(tmp_path)

    async def pull(version: str) -> list[Path]:
        return await asyncio.gather(
            *(
                cache.get(url, pull_policy="Always", resource_name=f"ns.r{i}", resource_version=version)
                for i in range(5)
            )
        )

    first = asyncio.run(pull("1"))
    again = asyncio.run(pull("1"))  # same versions: every resource is served from the cache
    assert set(first) == set(again) and module_server.count("/always.wasm") == 1
    cache.close()


def test_relative_file_urls_need_a_base_dir(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "rel.wasm").write_bytes(tiny_wasm("relative"))
    with pytest.raises(FetchError, match="relative file URL file://plugins/rel.wasm needs a base directory"):
        make_cache(tmp_path / "c1").get_sync("file://plugins/rel.wasm")
    cache = make_cache(tmp_path / "c2", file_base_dir=tmp_path)
    assert cache.get_sync("file://plugins/rel.wasm").read_bytes() == tiny_wasm("relative")
    cache.close()
