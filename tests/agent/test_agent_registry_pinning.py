"""Digest pinning (``oci://host/repo@sha256:...``) and image indexes, on a real registry and a hostile one.

The hostile registry is the fault proxy in front of the real registry, serving another (valid) manifest
for a digest: the fetch must be refused before any layer is downloaded, as go-containerregistry does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_testsupport import (
    OCI_INDEX,
    FaultProxy,
    Registry,
    cncf_image,
    compat_image,
    registry_manifest,
    solo_oci_image,
    tiny_wasm,
)

from wasmesh.agent.cache import ModuleCache
from wasmesh.agent.errors import FetchError
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.options import CacheOptions

pytestmark = pytest.mark.registry

PushImage = Callable[..., str]
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LINUX = {"architecture": "amd64", "os": "linux"}
WASI = {"architecture": "wasm", "os": "wasip1"}


def fresh_cache(tmp_path: Path, **overrides: Any) -> ModuleCache:
    options = CacheOptions(
        dir=tmp_path / "cache", http_initial_backoff_s=0.01, docker_config_dir=tmp_path / "none", **overrides
    )
    return ModuleCache(options, AgentMetrics())


def stored_files(cache: ModuleCache) -> list[Path]:
    return [p for p in cache.dir.rglob("*") if p.is_file() and p.name != "index.json"]


@pytest.fixture(scope="module")
def images(plain_registry: Registry, push_image: PushImage) -> dict[str, str]:
    """Two single images and one two-platform index; name -> digest as pushed."""
    return {
        "a": push_image(plain_registry, "pin/a", "v1", solo_oci_image(tiny_wasm("pinned-a"))),
        "b": push_image(plain_registry, "pin/b", "v1", solo_oci_image(tiny_wasm("pinned-b"))),
        "index": push_image(
            plain_registry,
            "pin/multi",
            "v1",
            [(compat_image(tiny_wasm("linux-entry")), LINUX), (cncf_image(tiny_wasm("wasi-entry")), WASI)],
        ),
    }


def index_entries(registry: Registry, repository: str, reference: str) -> list[dict[str, Any]]:
    body, content_type = registry_manifest(registry, repository, reference, OCI_INDEX)
    assert content_type.startswith(OCI_INDEX)
    return list(json.loads(body)["manifests"])


def test_pinned_digest_is_fetched_and_keyed_by_that_digest(
    plain_registry: Registry, images: dict[str, str], tmp_path: Path
) -> None:
    cache = fresh_cache(tmp_path)
    url = f"oci://{plain_registry.host}/pin/a@{images['a']}"
    path = cache.get_sync(url)
    assert path.read_bytes() == tiny_wasm("pinned-a")
    assert path.name == images["a"].removeprefix("sha256:") + ".wasm"
    assert cache.metrics.remote_fetch_count.value("success") == 1
    cache.close()


def test_index_pushed_by_skopeo_resolves_to_its_wasm_entry(
    plain_registry: Registry, images: dict[str, str], tmp_path: Path
) -> None:
    entries = index_entries(plain_registry, "pin/multi", "v1")
    assert [entry["platform"] for entry in entries] == [LINUX, WASI]
    served, _ = registry_manifest(plain_registry, "pin/multi", images["index"], OCI_INDEX)
    assert "sha256:" + hashlib.sha256(served).hexdigest() == images["index"]  # kept byte for byte

    cache = fresh_cache(tmp_path)
    tagged = cache.get_sync(f"oci://{plain_registry.host}/pin/multi:v1")
    # The wasm/wasip1 entry, not the first one; keyed by the index digest, which the tag names.
    assert tagged.read_bytes() == tiny_wasm("wasi-entry")
    assert tagged.name == images["index"].removeprefix("sha256:") + ".wasm"
    # Pinned to the index digest: the same module, already cached.
    assert cache.get_sync(f"oci://{plain_registry.host}/pin/multi@{images['index']}") == tagged
    assert cache.metrics.remote_fetch_count.value("success") == 1
    # Pinned to one entry's manifest: that entry, whatever its platform.
    linux = cache.get_sync(f"oci://{plain_registry.host}/pin/multi@{entries[0]['digest']}")
    assert linux.read_bytes() == tiny_wasm("linux-entry")
    assert cache.metrics.remote_fetch_count.value("success") == 2
    cache.close()


def test_hostile_registry_serving_another_manifest_for_a_digest_is_refused(
    fault_proxy: FaultProxy, plain_registry: Registry, images: dict[str, str], tmp_path: Path
) -> None:
    other, _ = registry_manifest(plain_registry, "pin/b", "v1", "application/vnd.oci.image.manifest.v1+json")
    fault_proxy.plan.manifest_overrides[images["a"]] = other
    cache = fresh_cache(tmp_path)
    url = f"oci://{fault_proxy.host}/pin/a@{images['a']}"
    with pytest.raises(FetchError) as caught:
        cache.get_sync(url)
    assert str(caught.value) == (
        f"could not fetch Wasm OCI image: could not fetch manifest: manifest digest {images['b']} "
        f"does not match requested digest {images['a']} for {fault_proxy.host}/pin/a@{images['a']}"
    )
    assert caught.value.metric_result == "manifest_failure"
    assert cache.metrics.remote_fetch_count.value("manifest_failure") == 1
    assert cache.metrics.remote_fetch_count.value("checksum_mismatched") == 0
    assert cache.metrics.remote_fetch_count.value("success") == 0
    assert fault_proxy.blob_gets == 0  # refused before any layer was downloaded
    assert cache.entry_count() == 0 and stored_files(cache) == []
    cache.close()


def test_hostile_registry_serving_another_manifest_for_an_index_entry_is_refused(
    fault_proxy: FaultProxy, plain_registry: Registry, images: dict[str, str], tmp_path: Path
) -> None:
    entries = index_entries(plain_registry, "pin/multi", "v1")
    wasi_digest = entries[1]["digest"]
    other, _ = registry_manifest(plain_registry, "pin/b", "v1", "application/vnd.oci.image.manifest.v1+json")
    fault_proxy.plan.manifest_overrides[wasi_digest] = other  # the tag and the index stay genuine
    cache = fresh_cache(tmp_path)
    with pytest.raises(FetchError) as caught:
        cache.get_sync(f"oci://{fault_proxy.host}/pin/multi:v1")
    assert str(caught.value) == (
        f"could not fetch Wasm OCI image: could not fetch manifest: manifest digest {images['b']} "
        f"does not match requested digest {wasi_digest} for {fault_proxy.host}/pin/multi@{wasi_digest}"
    )
    assert caught.value.metric_result == "manifest_failure"
    assert cache.metrics.remote_fetch_count.value("manifest_failure") == 1
    assert fault_proxy.manifest_gets == 2 and fault_proxy.blob_gets == 0
    assert cache.entry_count() == 0 and stored_files(cache) == []
    cache.close()


def test_docker_manifest_list_converted_by_skopeo_resolves_to_its_wasm_entry(
    plain_registry: Registry, push_image: PushImage, tmp_path: Path
) -> None:
    entries = [(compat_image(tiny_wasm("list-linux")), LINUX), (compat_image(tiny_wasm("list-wasi")), WASI)]
    push_image(plain_registry, "pin/list", "v1", entries, skopeo_args=("--format", "v2s2"))
    served, content_type = registry_manifest(plain_registry, "pin/list", "v1", DOCKER_MANIFEST_LIST)
    assert content_type.startswith(DOCKER_MANIFEST_LIST)  # skopeo converted the index
    assert [entry["platform"] for entry in json.loads(served)["manifests"]] == [LINUX, WASI]
    list_digest = "sha256:" + hashlib.sha256(served).hexdigest()
    cache = fresh_cache(tmp_path)
    path = cache.get_sync(f"oci://{plain_registry.host}/pin/list:v1")
    assert path.read_bytes() == tiny_wasm("list-wasi")
    assert path.name == list_digest.removeprefix("sha256:") + ".wasm"
    assert cache.get_sync(f"oci://{plain_registry.host}/pin/list@{list_digest}") == path
    assert cache.metrics.remote_fetch_count.value("success") == 1
    cache.close()
