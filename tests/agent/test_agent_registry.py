"""wasmesh pulls the four image formats from a real registry (pushed by skopeo), with each auth flow."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_testsupport import (
    DOCKER_MANIFEST,
    PASSWORD,
    REFRESH_TOKEN,
    USER,
    FaultProxy,
    ImageSpec,
    Registry,
    cncf_image,
    compat_image,
    registry_manifest,
    solo_oci_image,
    tiny_wasm,
    wasm_to_oci_image,
)

from wasmesh.agent.cache import ModuleCache, ModuleKey, module_name_from_url, module_path
from wasmesh.agent.errors import FetchError
from wasmesh.agent.imagefetch import prepare_image
from wasmesh.agent.imageformats import ImageFormat
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.oci import ImageReference
from wasmesh.agent.options import CacheOptions

pytestmark = pytest.mark.registry

PushImage = Callable[..., str]


def make_cache(tmp_path: Path, **overrides: Any) -> ModuleCache:
    options = CacheOptions(
        dir=tmp_path / "cache",
        insecure_registries=frozenset({"*"}),
        http_initial_backoff_s=0.01,
        docker_config_dir=tmp_path / "no-docker-config",
        **overrides,
    )
    return ModuleCache(options, AgentMetrics())


def docker_config_json(registry: Registry, user: str = USER, password: str = PASSWORD) -> bytes:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {registry.host: {"auth": auth}}}).encode()


FORMATS: dict[str, Callable[[bytes], ImageSpec]] = {
    "compat": compat_image,
    "oci": solo_oci_image,
    "wasm-to-oci": wasm_to_oci_image,
    "cncf": cncf_image,
}


@pytest.mark.parametrize("image_format", sorted(FORMATS))
def test_each_format_pushed_by_skopeo_is_pulled_byte_identical(
    image_format: str, plain_registry: Registry, push_image: PushImage, plugin_wasm: bytes, tmp_path: Path
) -> None:
    spec = FORMATS[image_format](plugin_wasm)
    digest = push_image(plain_registry, f"formats/{image_format}", "v1", spec)
    # skopeo must have kept our manifest (and its custom media types) byte for byte.
    served, _ = registry_manifest(plain_registry, f"formats/{image_format}", "v1", spec.manifest_media_type)
    assert "sha256:" + hashlib.sha256(served).hexdigest() == digest
    assert all(media_type.encode() in served for media_type, _ in spec.layers)

    prepared = prepare_image(
        ImageReference.parse(f"{plain_registry.host}/formats/{image_format}:v1"), insecure=True
    )
    assert prepared.wasm_layer().image_format is ImageFormat(image_format)

    cache = make_cache(tmp_path)
    url = f"oci://{plain_registry.host}/formats/{image_format}:v1"
    path = cache.get_sync(url)
    assert path.read_bytes() == plugin_wasm
    # Istio's layout and checksum: <dir>/<sha256(name)>/<manifest digest hex>.wasm
    assert path == module_path(cache.dir, cache_key_for(url, digest))
    assert cache.metrics.remote_fetch_count.value("success") == 1
    # by digest, and with the manifest digest as the user's sha256: both served from the cache
    by_digest = f"oci://{plain_registry.host}/formats/{image_format}@{digest}"
    assert cache.get_sync(by_digest) == path
    assert cache.get_sync(url, sha256=digest.removeprefix("sha256:")) == path
    assert cache.metrics.remote_fetch_count.value("success") == 1
    cache.close()


def cache_key_for(url: str, digest: str) -> ModuleKey:
    return ModuleKey(module_name_from_url(url), digest.removeprefix("sha256:"))


def test_docker_v2_compat_image_converted_by_skopeo(
    plain_registry: Registry, push_image: PushImage, tmp_path: Path
) -> None:
    wasm = tiny_wasm("docker-v2")
    push_image(
        plain_registry,
        "formats/docker",
        "v1",
        compat_image(wasm, "nested/dir/plugin.wasm"),
        skopeo_args=("--format", "v2s2"),
    )
    served, content_type = registry_manifest(plain_registry, "formats/docker", "v1", DOCKER_MANIFEST)
    assert content_type.startswith(DOCKER_MANIFEST)
    assert b"application/vnd.docker.image.rootfs.diff.tar.gzip" in served
    cache = make_cache(tmp_path)
    assert cache.get_sync(f"oci://{plain_registry.host}/formats/docker:v1").read_bytes() == wasm
    cache.close()


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_authenticated_registry_with_pull_secret_docker_config_and_bad_credentials(
    auth: str, registry_factory: Callable[[str], Registry], push_image: PushImage, tmp_path: Path
) -> None:
    registry = registry_factory(auth)
    wasm = tiny_wasm(f"auth-{auth}")
    digest = push_image(registry, "private/plugin", "v1", solo_oci_image(wasm))
    url = f"oci://{registry.host}/private/plugin:v1"

    anonymous = make_cache(tmp_path / "anonymous")
    with pytest.raises(FetchError) as anonymous_error:
        anonymous.get_sync(url)
    assert anonymous_error.value.metric_result == "manifest_failure"
    assert anonymous.metrics.remote_fetch_count.value("manifest_failure") == 1
    anonymous.close()

    bad = make_cache(tmp_path / "bad")
    with pytest.raises(FetchError) as bad_error:
        bad.get_sync(url, pull_secret=docker_config_json(registry, password="wrong"))
    message = str(bad_error.value)
    assert message.startswith("could not fetch Wasm OCI image: could not fetch manifest:")
    assert "\n" not in message
    assert bad.entry_count() == 0 and not list(bad.dir.rglob("*.wasm"))
    bad.close()

    # imagePullSecret contents (dockerconfigjson bytes)
    with_secret = make_cache(tmp_path / "secret")
    path = with_secret.get_sync(url, pull_secret=docker_config_json(registry))
    assert path.read_bytes() == wasm
    assert path.name == digest.removeprefix("sha256:") + ".wasm"
    # A private module is not handed to a caller who cannot prove access to it.
    with pytest.raises(FetchError):
        with_secret.get_sync(url, pull_secret=docker_config_json(registry, password="wrong"))
    assert with_secret.get_sync(url, pull_secret=docker_config_json(registry)) == path
    with_secret.close()

    # Docker's config.json (username/password fields) as the keychain
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(
        json.dumps({"auths": {f"http://{registry.host}": {"username": USER, "password": PASSWORD}}})
    )
    keychain = ModuleCache(
        CacheOptions(
            dir=tmp_path / "keychain",
            insecure_registries=frozenset({registry.host}),
            docker_config_dir=docker_dir,
        )
    )
    assert keychain.get_sync(url).read_bytes() == wasm
    keychain.close()


def test_async_get_and_single_flight_over_the_registry(
    fault_proxy: FaultProxy, plain_registry: Registry, push_image: PushImage, tmp_path: Path
) -> None:
    wasm = tiny_wasm("single-flight")
    push_image(plain_registry, "flight/plugin", "v1", cncf_image(wasm))
    cache = make_cache(tmp_path)
    fault_proxy.plan.blob_delay_s = 0.3  # keep the download open while the others arrive
    url = f"oci://{fault_proxy.host}/flight/plugin:v1"

    async def pull_many() -> list[Path]:
        return await asyncio.gather(*(cache.get(url, resource_name=f"ns.p{i}") for i in range(20)))

    paths = asyncio.run(pull_many())
    assert len(set(paths)) == 1 and paths[0].read_bytes() == wasm
    assert fault_proxy.blob_gets == 1
    assert fault_proxy.manifest_gets == 1
    assert cache.metrics.remote_fetch_count.value("success") == 1
    cache.close()


def test_token_registry_with_identity_token(
    registry_factory: Callable[[str], Registry], push_image: PushImage, tmp_path: Path
) -> None:
    registry = registry_factory("token")
    wasm = tiny_wasm("identity-token")
    push_image(registry, "private/identity", "v1", wasm_to_oci_image(wasm))
    secret = json.dumps({"auths": {registry.host: {"identitytoken": REFRESH_TOKEN}}}).encode()
    cache = make_cache(tmp_path)
    assert (
        cache.get_sync(f"oci://{registry.host}/private/identity:v1", pull_secret=secret).read_bytes() == wasm
    )
    cache.close()


def test_blob_redirects_are_followed(
    fault_proxy: FaultProxy, plain_registry: Registry, push_image: PushImage, tmp_path: Path
) -> None:
    wasm = tiny_wasm("redirected")
    push_image(plain_registry, "redirect/plugin", "v1", solo_oci_image(wasm))
    fault_proxy.plan.redirect_blobs = True
    cache = make_cache(tmp_path)
    assert cache.get_sync(f"oci://{fault_proxy.host}/redirect/plugin:v1").read_bytes() == wasm
    assert fault_proxy.blob_gets == 1
    cache.close()
