"""Pure parts of the agent: references, credentials, image layouts, unboxing, metrics, options, the CLI."""

from __future__ import annotations

import argparse
import base64
import gzip
import json
from pathlib import Path

import pytest
from agent_testsupport import ModuleServer, tar_gzip, tiny_wasm

from wasmesh.agent import cli
from wasmesh.agent.cache import module_name_from_url
from wasmesh.agent.credentials import CredentialsError, parse_docker_config
from wasmesh.agent.errors import FetchError
from wasmesh.agent.imageformats import ImageFormat, extract_wasm, locate_wasm_layer
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.oci import Descriptor, ImageReference, Manifest, pick_index_entry
from wasmesh.agent.options import CacheOptions, parse_duration_s
from wasmesh.agent.unbox import gunzip_limited, is_valid_wasm, unbox_if_possible

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("oci://ghcr.io/org/plugin:1.0", "ghcr.io", "org/plugin", "1.0", ""),
        ("localhost:5000/plugin", "localhost:5000", "plugin", "latest", ""),
        ("docker.io/istio/plugin", "index.docker.io", "istio/plugin", "latest", ""),
        ("ubuntu", "index.docker.io", "library/ubuntu", "latest", ""),
        (f"r.io/a/b@{DIGEST}", "r.io", "a/b", "latest", DIGEST),
        (f"r.io/a/b:v2@{DIGEST}", "r.io", "a/b", "v2", DIGEST),
    ],
)
def test_image_references_parse_like_go_containerregistry(
    text: str, registry: str, repository: str, tag: str, digest: str
) -> None:
    reference = ImageReference.parse(text)
    assert (reference.registry, reference.repository, reference.tag, reference.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert reference.reference == (digest or tag)


@pytest.mark.parametrize("text", ["", "r.io/Upper/x", "r.io/x@sha256:short", "r.io/x:bad tag"])
def test_bad_image_references(text: str) -> None:
    with pytest.raises(ValueError, match="image reference"):
        ImageReference.parse(text)


def test_module_name_strips_tag_and_digest_only_for_oci() -> None:
    assert module_name_from_url("oci://r.io/a/b:v1") == "oci://r.io/a/b"
    assert module_name_from_url(f"oci://r.io/a/b@{DIGEST}") == "oci://r.io/a/b"
    assert module_name_from_url("https://h/x.wasm?v=1") == "https://h/x.wasm?v=1"


def test_docker_config_credentials() -> None:
    config = parse_docker_config(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw:with:colons").decode()},
                    "r.io:5000": {"username": "u", "password": "p"},
                    "https://tok.io": {"identitytoken": "refresh"},
                    "bearer.io": {"registrytoken": "ready"},
                }
            }
        ),
        "config.json",
    )
    hub = config.lookup("index.docker.io")
    assert (hub.username, hub.password) == ("hub", "pw:with:colons")
    assert config.lookup("docker.io") == hub
    assert config.lookup("r.io:5000").password == "p"
    assert config.lookup("tok.io").identity_token == "refresh"
    assert config.lookup("bearer.io").registry_token == "ready"
    assert config.lookup("elsewhere.io").is_anonymous


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"null", "imagePullSecret: docker config is null"),
        (b"{bad", "imagePullSecret: invalid JSON"),
        (b'{"auths": {"r.io": {"auth": "!!"}}}', r"imagePullSecret: auths.r.io.auth: not valid base64"),
        (b'{"auths": {"r.io": {"username": 5}}}', r"auths.r.io.username: expected a string"),
        (b'{"auths": []}', "auths: expected an object"),
    ],
)
def test_bad_docker_configs_name_the_field(data: bytes, message: str) -> None:
    with pytest.raises(CredentialsError, match=message):
        parse_docker_config(data, "imagePullSecret")


def descriptor(media_type: str, data: bytes = b"x") -> dict[str, object]:
    import hashlib

    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def manifest(
    layers: list[dict[str, object]],
    media_type: str = "application/vnd.oci.image.manifest.v1+json",
    config_type: str = "application/vnd.oci.image.config.v1+json",
) -> Manifest:
    raw = json.dumps(
        {"schemaVersion": 2, "mediaType": media_type, "config": descriptor(config_type), "layers": layers}
    ).encode()
    return Manifest.parse(raw, DIGEST, "")


def test_locate_wasm_layer_for_each_layout() -> None:
    tgz = "application/vnd.oci.image.layer.v1.tar+gzip"
    solo = "application/vnd.module.wasm.content.layer.v1+wasm"
    assert locate_wasm_layer(manifest([descriptor(tgz, b"a"), descriptor(tgz, b"b")])).descriptor.size == 1
    assert (
        locate_wasm_layer(manifest([descriptor("cfg"), descriptor(solo)])).image_format
        is ImageFormat.SOLO_OCI
    )
    wasm_to_oci = manifest([descriptor("application/vnd.wasm.content.layer.v1+wasm")])
    assert locate_wasm_layer(wasm_to_oci).image_format is ImageFormat.WASM_TO_OCI
    cncf = manifest([descriptor("application/wasm")], config_type="application/vnd.wasm.config.v0+json")
    assert locate_wasm_layer(cncf).image_format is ImageFormat.CNCF
    docker = manifest([descriptor(tgz)], media_type="application/vnd.docker.distribution.manifest.v2+json")
    with pytest.raises(
        FetchError, match="invalid media type .* \\(expect application/vnd.docker.image.rootfs"
    ):
        locate_wasm_layer(docker)
    with pytest.raises(FetchError, match="number of layers must be 2 but got 3"):
        locate_wasm_layer(manifest([descriptor("a"), descriptor("b"), descriptor("c")]))


def test_compat_extraction_finds_plugin_wasm_at_any_depth() -> None:
    wasm = tiny_wasm("deep")
    layer = locate_wasm_layer(manifest([descriptor("application/vnd.oci.image.layer.v1.tar+gzip")]))
    blob = tar_gzip({"a/other.wasm": tiny_wasm("other"), "a/b/plugin.wasm": wasm})
    assert extract_wasm(layer, blob, 1 << 20) == wasm
    with pytest.raises(FetchError, match="^plugin.wasm not found in the archive$"):
        extract_wasm(layer, tar_gzip({"filter.wasm": wasm}), 1 << 20)


def test_compat_extraction_scans_a_bounded_number_of_entries() -> None:
    """A hostile compat layer of many empty entries is refused after the first 1,000, not scanned whole."""
    wasm = tiny_wasm("late")
    layer = locate_wasm_layer(manifest([descriptor("application/vnd.oci.image.layer.v1.tar+gzip")]))
    at_the_bound = {f"pad/{index}": b"" for index in range(999)}
    assert extract_wasm(layer, tar_gzip({**at_the_bound, "plugin.wasm": wasm}), 1 << 20) == wasm
    past_the_bound = {f"pad/{index}": b"" for index in range(1000)}
    with pytest.raises(FetchError, match="^plugin.wasm not among the first 1000 entries of the archive$"):
        extract_wasm(layer, tar_gzip({**past_the_bound, "plugin.wasm": wasm}), 1 << 20)


def test_index_entry_prefers_wasm_platform() -> None:
    index = json.dumps(
        {
            "manifests": [
                {**descriptor("m", b"1"), "platform": {"architecture": "amd64", "os": "linux"}},
                {**descriptor("m", b"2"), "platform": {"architecture": "wasm", "os": "wasip1"}},
            ]
        }
    ).encode()
    assert pick_index_entry(index).size == 1 and pick_index_entry(index).platform["architecture"] == "wasm"
    with pytest.raises(FetchError, match="index.manifests"):
        pick_index_entry(b'{"manifests": []}')
    with pytest.raises(FetchError, match=r"manifest.layers\[0\].digest"):
        Descriptor.from_json({"digest": "md5:x", "size": 1}, "manifest.layers[0]")


def test_unbox_and_wasm_checks() -> None:
    wasm = tiny_wasm("u")
    assert is_valid_wasm(wasm) and not is_valid_wasm(wasm[:7]) and not is_valid_wasm(b"\x00asx" + wasm[4:])
    assert unbox_if_possible(gzip.compress(gzip.compress(wasm)), 1 << 20) == wasm
    assert unbox_if_possible(b"plain text", 1 << 20) == b"plain text"
    assert (
        gunzip_limited(gzip.compress(b"a" * 100) + gzip.compress(b"b" * 100), 200) == b"a" * 100 + b"b" * 100
    )
    with pytest.raises(FetchError, match="exceeds the size limit of 199 bytes"):
        gunzip_limited(gzip.compress(b"a" * 100) + gzip.compress(b"b" * 100), 199)
    with pytest.raises(FetchError, match="unexpected end of gzip data"):
        gunzip_limited(gzip.compress(b"a" * 1000)[:20], 1 << 20)


def test_metrics_render_istios_names_without_total_suffix() -> None:
    metrics = AgentMetrics()
    metrics.record_lookup(True)
    metrics.record_lookup(False)
    metrics.remote_fetch_count.inc("checksum_mismatched")
    metrics.cache_entries.set(3)
    metrics.record_conversion("success", 3.0)
    text = metrics.render()
    assert 'istio_agent_wasm_cache_lookup_count{hit="true"} 1' in text
    assert 'istio_agent_wasm_cache_lookup_count{hit="false"} 1' in text
    assert 'istio_agent_wasm_remote_fetch_count{result="checksum_mismatched"} 1' in text
    assert "istio_agent_wasm_cache_entries 3" in text
    assert 'istio_agent_wasm_config_conversion_count{result="success"} 1' in text
    assert 'istio_agent_wasm_config_conversion_duration_bucket{le="2"} 0' in text
    assert 'istio_agent_wasm_config_conversion_duration_bucket{le="4"} 1' in text
    assert 'istio_agent_wasm_config_conversion_duration_bucket{le="16384"} 1' in text
    assert "istio_agent_wasm_config_conversion_duration_count 1" in text
    assert "_total" not in text
    with pytest.raises(ValueError, match="conversion result: unknown value 'nope'"):
        metrics.record_conversion("nope")


def test_options_from_istio_environment() -> None:
    options = CacheOptions.from_env(
        {
            "WASM_INSECURE_REGISTRIES": "a.io, b.io:5000",
            "WASM_MODULE_EXPIRY": "1h30m",
            "WASM_PURGE_INTERVAL": "90s",
            "WASM_HTTP_REQUEST_TIMEOUT": "500ms",
            "WASM_HTTP_REQUEST_MAX_RETRIES": "3",
            "ISTIO_WASM_MAX_BINARY_SIZE_BYTES": "1024",
        },
        overrides={"dir": Path("/tmp/x")},
    )
    assert options.insecure_registries == frozenset({"a.io", "b.io:5000"})
    assert (options.module_expiry_s, options.purge_interval_s, options.http_timeout_s) == (5400, 90, 0.5)
    assert (options.http_max_retries, options.max_module_bytes) == (3, 1024)
    assert options.allow_insecure("a.io") and not options.allow_insecure("c.io")
    assert CacheOptions(insecure_registries=frozenset({"*"})).allow_insecure("anything")
    assert CacheOptions(module_expiry_s=0, http_max_retries=0).module_expiry_s == 24 * 3600
    with pytest.raises(ValueError, match="WASM_MODULE_EXPIRY: invalid duration 'soon'"):
        CacheOptions.from_env({"WASM_MODULE_EXPIRY": "soon"})
    assert parse_duration_s("2m3s") == 123


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_cli_pull_writes_the_module_and_prints_the_digest(
    module_server: ModuleServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    wasm = tiny_wasm("cli") + b"\x00" * 300_000
    url = module_server.serve("/cli.wasm", wasm)
    output = tmp_path / "out" / "plugin.wasm"
    assert run_cli(["pull", url, "-o", str(output), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert output.read_bytes() == wasm
    captured = capsys.readouterr()
    assert f"Digest: sha256:{hashlib.sha256(wasm).hexdigest()}" in captured.out
    assert "100% of 293.0 KiB" in captured.err  # plain progress lines when not on a terminal
    assert (
        run_cli(
            ["pull", url, "-o", str(output), "--cache-dir", str(tmp_path / "cache"), "--sha256", "0" * 64]
        )
        == 1
    )
    assert "which does not match" in capsys.readouterr().err
