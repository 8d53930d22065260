"""Registry faults: each gives the right metric label, a one-line error, and a cache holding nothing bad."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_testsupport import FaultProxy, ImageSpec, Registry, solo_oci_image, tiny_wasm

from wasmesh.agent.cache import ModuleCache
from wasmesh.agent.errors import FetchError
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.options import CacheOptions

pytestmark = pytest.mark.registry

PushImage = Callable[..., str]


@pytest.fixture(scope="module")
def pushed(plain_registry: Registry, push_image: PushImage) -> dict[str, str]:
    """repository -> manifest digest, for the images the fault tests pull."""
    images: dict[str, ImageSpec] = {
        "faults/good": solo_oci_image(tiny_wasm("faults-good")),
        "faults/unknown": ImageSpec(
            "application/vnd.oci.image.config.v1+json",
            b"{}",
            [("application/x-unknown-layer", tiny_wasm("unknown"))],
        ),
        "faults/notwasm": ImageSpec(
            "application/vnd.wasm.config.v0+json", b"{}", [("application/wasm", b"this is not a wasm module")]
        ),
    }
    big_payload = bytes(range(256)) * 8192  # 2 MiB of incompressible-ish bytes
    images["faults/big"] = ImageSpec(
        "application/vnd.wasm.config.v1+json",
        b"{}",
        [("application/vnd.wasm.content.layer.v1+wasm", tiny_wasm("big") + big_payload)],
    )
    return {
        repository: push_image(plain_registry, repository, "v1", spec) for repository, spec in images.items()
    }


def fresh_cache(tmp_path: Path, **overrides: Any) -> ModuleCache:
    options = CacheOptions(
        dir=tmp_path / "cache",
        insecure_registries=frozenset({"*"}),
        http_initial_backoff_s=0.01,
        docker_config_dir=tmp_path / "none",
        **overrides,
    )
    return ModuleCache(options, AgentMetrics())


def expect_failure(cache: ModuleCache, url: str, label: str, fragment: str, **kwargs: Any) -> FetchError:
    with pytest.raises(FetchError) as caught:
        cache.get_sync(url, **kwargs)
    error = caught.value
    assert error.metric_result == label, str(error)
    assert cache.metrics.remote_fetch_count.value(label) == 1
    assert cache.metrics.remote_fetch_count.value("success") == 0
    assert "\n" not in str(error)
    assert fragment in str(error), str(error)
    assert cache.entry_count() == 0
    assert not [p for p in cache.dir.rglob("*") if p.is_file() and p.name != "index.json"]
    return error


def test_500s_then_recovery(fault_proxy: FaultProxy, pushed: dict[str, str], tmp_path: Path) -> None:
    cache = fresh_cache(tmp_path)
    fault_proxy.plan.fail_manifests_with_500 = 2
    fault_proxy.plan.fail_blobs_with_500 = 3
    path = cache.get_sync(f"oci://{fault_proxy.host}/faults/good:v1")
    assert path.read_bytes() == tiny_wasm("faults-good")
    assert fault_proxy.manifest_gets == 3 and fault_proxy.blob_gets == 4
    assert cache.metrics.remote_fetch_count.value("success") == 1
    cache.close()


def test_500s_forever_on_blob_is_a_download_failure(
    fault_proxy: FaultProxy, pushed: dict[str, str], tmp_path: Path
) -> None:
    cache = fresh_cache(tmp_path)
    fault_proxy.plan.fail_blobs_with_500 = 100
    expect_failure(
        cache, f"oci://{fault_proxy.host}/faults/good:v1", "download_failure", "could not fetch Wasm binary:"
    )
    assert fault_proxy.blob_gets == 5
    cache.close()


def test_500s_forever_on_manifest_is_a_manifest_failure(
    fault_proxy: FaultProxy, pushed: dict[str, str], tmp_path: Path
) -> None:
    cache = fresh_cache(tmp_path)
    fault_proxy.plan.fail_manifests_with_500 = 100
    expect_failure(
        cache,
        f"oci://{fault_proxy.host}/faults/good:v1",
        "manifest_failure",
        "could not fetch Wasm OCI image: could not fetch manifest:",
    )
    cache.close()


def test_corrupted_blob_fails_digest_verification(
    fault_proxy: FaultProxy, pushed: dict[str, str], tmp_path: Path
) -> None:
    cache = fresh_cache(tmp_path, http_max_retries=1)
    fault_proxy.plan.corrupt_blobs = True
    expect_failure(
        cache, f"oci://{fault_proxy.host}/faults/good:v1", "download_failure", "content has digest"
    )
    cache.close()


def test_truncated_blob_is_rejected(fault_proxy: FaultProxy, pushed: dict[str, str], tmp_path: Path) -> None:
    cache = fresh_cache(tmp_path, http_max_retries=2)
    fault_proxy.plan.truncate_blobs = True
    expect_failure(cache, f"oci://{fault_proxy.host}/faults/big:v1", "download_failure", "unexpected EOF")
    assert fault_proxy.blob_gets == 2  # a cut transfer is a transport error, retried
    cache.close()


def test_wrong_user_sha256_is_checksum_mismatched(
    plain_registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    cache = fresh_cache(tmp_path)
    url = f"oci://{plain_registry.host}/faults/good:v1"
    error = expect_failure(
        cache, url, "checksum_mismatched", "which does not match: " + "0" * 64, sha256="0" * 64
    )
    assert str(error) == (
        f"module downloaded from {url} has checksum {pushed['faults/good'].removeprefix('sha256:')}, "
        f"which does not match: {'0' * 64}"
    )
    cache.close()


def test_oversize_blob_is_an_error_not_a_truncation(
    plain_registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    cache = fresh_cache(tmp_path, max_module_bytes=1 << 20)
    expect_failure(
        cache,
        f"oci://{plain_registry.host}/faults/big:v1",
        "download_failure",
        "exceeds the size limit of 1048576 bytes",
    )
    cache.close()


def test_slow_registry_times_out(fault_proxy: FaultProxy, pushed: dict[str, str], tmp_path: Path) -> None:
    cache = fresh_cache(tmp_path, http_timeout_s=0.3, http_max_retries=1)
    fault_proxy.plan.manifest_delay_s = 1.5
    expect_failure(cache, f"oci://{fault_proxy.host}/faults/good:v1", "manifest_failure", "deadline exceeded")
    cache.close()


def test_unknown_media_type_lists_every_layout_tried(
    plain_registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    cache = fresh_cache(tmp_path)
    error = expect_failure(
        cache,
        f"oci://{plain_registry.host}/faults/unknown:v1",
        "download_failure",
        "could not fetch Wasm binary: the given image is in invalid format as an OCI image: "
        "could not parse as compat variant: invalid media type application/x-unknown-layer "
        "(expect application/vnd.oci.image.layer.v1.tar+gzip); "
        "could not parse as oci variant: number of layers must be 2 but got 1",
    )
    assert "CNCF" in str(error)
    cache.close()


def test_layer_that_is_not_wasm_is_a_fetch_failure(
    plain_registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    cache = fresh_cache(tmp_path)
    url = f"oci://{plain_registry.host}/faults/notwasm:v1"
    error = expect_failure(cache, url, "fetch_failure", "is invalid")
    assert str(error) == f"fetched Wasm binary from {url} is invalid"
    cache.close()


def test_unknown_repository_is_a_manifest_failure(plain_registry: Registry, tmp_path: Path) -> None:
    cache = fresh_cache(tmp_path)
    expect_failure(
        cache, f"oci://{plain_registry.host}/faults/missing:v1", "manifest_failure", "MANIFEST_UNKNOWN"
    )
    cache.close()
