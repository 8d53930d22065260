"""Which registries get plain HTTP, as go-containerregistry (Istio's fetcher) decides it.

Local names (localhost, *.localhost, 127.0.0.1, ::1, RFC 1918) get HTTPS, then plain HTTP, with no flag;
anything else (127.0.0.2 here, a loopback address that is not one of those names) is HTTPS only
until listed insecure, and a plain-HTTP answer there is one line naming the flag that allows it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_testsupport import RawListener, Registry, tiny_wasm, wasm_to_oci_image

from wasmesh.agent.cache import ModuleCache
from wasmesh.agent.errors import FetchError
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.oci import RegistryClient, is_local_registry
from wasmesh.agent.options import CacheOptions

PushImage = Callable[..., str]


@pytest.mark.parametrize(
    ("registry", "local"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("LOCALHOST:5000", True),
        ("registry.localhost", True),
        ("a.b.localhost:5000", True),
        ("127.0.0.1", True),
        ("127.0.0.1:5000", True),
        ("::1", True),
        ("[::1]", True),
        ("[::1]:5000", True),
        ("10.0.0.1", True),
        ("10.255.255.255:5000", True),
        ("172.16.0.1:5000", True),
        ("172.31.255.255", True),
        ("192.168.1.10:5000", True),
        # everything else is HTTPS only
        ("127.0.0.2:5000", False),
        ("127.0.0.10:5000", False),
        ("127.0.0.1.nip.io:5000", False),
        ("[::2]:5000", False),
        ("[fe80::1]:5000", False),
        ("172.32.0.1:5000", False),
        ("172.15.255.255", False),
        ("192.169.0.1", False),
        ("11.0.0.1", False),
        ("localhost.example.com", False),
        ("notlocalhost:5000", False),
        ("mylocalhost", False),
        ("registry.local:5000", False),
        ("ghcr.io", False),
        ("index.docker.io", False),
        ("localhost:", False),
        ("localhost:http", False),
    ],
)
def test_scheme_decision_follows_go_containerregistry(registry: str, local: bool) -> None:
    assert is_local_registry(registry) is local
    client = RegistryClient(registry.lower())
    expected = ["https", "http"] if local else ["https"]
    assert [url.split("://")[0] for url in client.base_urls] == expected
    assert RegistryClient(registry.lower(), insecure=True).plain_http_allowed is True


def cache_without_flags(tmp_path: Path, **overrides: Any) -> ModuleCache:
    options = CacheOptions(
        dir=tmp_path / "cache", http_initial_backoff_s=0.01, docker_config_dir=tmp_path / "none", **overrides
    )
    return ModuleCache(options, AgentMetrics())


@pytest.mark.registry
def test_plain_http_registry_on_127_0_0_1_and_localhost_needs_no_flag(
    plain_registry: Registry, push_image: PushImage, tmp_path: Path
) -> None:
    wasm = tiny_wasm("scheme-local")
    digest = push_image(plain_registry, "scheme/local", "v1", wasm_to_oci_image(wasm))
    port = plain_registry.host.rsplit(":", 1)[1]
    for index, host in enumerate((f"127.0.0.1:{port}", f"localhost:{port}")):
        cache = cache_without_flags(tmp_path / str(index))
        assert cache.options.insecure_registries == frozenset()
        path = cache.get_sync(f"oci://{host}/scheme/local:v1")
        assert path.read_bytes() == wasm
        assert path.name == digest.removeprefix("sha256:") + ".wasm"
        cache.close()


@pytest.mark.registry
def test_plain_http_registry_elsewhere_is_refused_naming_the_flag_then_allowed_by_it(
    other_loopback_registry: Registry, push_image: PushImage, tmp_path: Path
) -> None:
    wasm = tiny_wasm("scheme-listed")
    push_image(other_loopback_registry, "scheme/listed", "v1", wasm_to_oci_image(wasm))
    host = other_loopback_registry.host
    url = f"oci://{host}/scheme/listed:v1"
    strict = cache_without_flags(tmp_path / "strict")
    with pytest.raises(FetchError) as caught:
        strict.get_sync(url)
    assert str(caught.value) == (
        f'could not fetch Wasm OCI image: could not fetch manifest: Get "https://{host}/v2/scheme/listed/'
        f'manifests/v1": registry {host} speaks plain HTTP; add it with --insecure-registry {host} '
        "(or WASM_INSECURE_REGISTRIES)"
    )
    assert caught.value.metric_result == "manifest_failure"
    assert strict.metrics.remote_fetch_count.value("manifest_failure") == 1
    strict.close()

    for name, listed in (("host", frozenset({host})), ("star", frozenset({"*"}))):
        cache = cache_without_flags(tmp_path / name, insecure_registries=listed)
        assert cache.get_sync(url).read_bytes() == wasm
        cache.close()


def test_https_only_registry_is_never_asked_over_plain_http(tmp_path: Path) -> None:
    """One TLS handshake, no retries, no plain-HTTP request: what the listener saw proves it."""
    plain = RawListener("127.0.0.2", answer=b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    try:
        cache = cache_without_flags(tmp_path)
        with pytest.raises(FetchError) as caught:
            cache.get_sync(f"oci://{plain.host}/scheme/none:v1")
        assert f"registry {plain.host} speaks plain HTTP" in str(caught.value)
        assert len(plain.first_bytes) == 1
        assert plain.tls_connections() == 1
        cache.close()
    finally:
        plain.stop()


def test_local_registry_is_asked_over_https_first_then_plain_http(tmp_path: Path) -> None:
    plain = RawListener("127.0.0.1", answer=b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    try:
        cache = cache_without_flags(tmp_path, http_max_retries=1)
        with pytest.raises(FetchError) as caught:
            cache.get_sync(f"oci://{plain.host}/scheme/none:v1")
        assert str(caught.value) == (
            "could not fetch Wasm OCI image: could not fetch manifest: "
            f"GET http://{plain.host}/v2/scheme/none/manifests/v1: unexpected status code 404"
        )
        assert [first[:1] for first in plain.first_bytes] == [b"\x16", b"G"]  # TLS, then "GET"
        cache.close()
    finally:
        plain.stop()
