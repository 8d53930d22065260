"""Each example plugin is published as an OCI image (issue 6): both Istio image formats are pushed by
skopeo to a real registry, pulled back through wasmesh's module cache, compared byte for byte with the
committed ``plugin.wasm``, and the pulled module is run in the plugin harness with its own pluginConfig.

The registry and OCI-layout helpers are the agent tests' (tests/agent/agent_testsupport.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

AGENT_TEST_DIR = Path(__file__).resolve().parents[1] / "agent"
if str(AGENT_TEST_DIR) not in sys.path:
    sys.path.insert(0, str(AGENT_TEST_DIR))

from agent_testsupport import (  # noqa: E402 - found through the sys.path entry above
    OCI_MANIFEST,
    ImageSpec,
    Registry,
    compat_image,
    registry_manifest,
    skopeo_push,
    solo_oci_image,
    start_registry,
    write_oci_layout,
)

from wasmesh.agent.cache import ModuleCache  # noqa: E402
from wasmesh.agent.options import CacheOptions  # noqa: E402
from wasmesh.testing import PluginHarness  # noqa: E402

pytestmark = pytest.mark.registry

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_NAMES = ("request-tracking", "rate-limit", "basic-auth")

# variant -> (image builder, media type the wasm-carrying layer must have in the served manifest)
VARIANTS: dict[str, tuple[Callable[[bytes], ImageSpec], str]] = {
    "compat": (compat_image, "application/vnd.oci.image.layer.v1.tar+gzip"),
    "solo-oci": (solo_oci_image, "application/vnd.module.wasm.content.layer.v1+wasm"),
}
# Both variants of one example live in the same repository, so the variant picks the tag.
TAGS = {"compat": "v1", "solo-oci": "v1-oci"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    for binary in ("docker-registry", "skopeo"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is not installed (run scripts/install-test-deps.sh)")
    started = start_registry(tmp_path_factory.mktemp("examples-registry"), "none")
    yield started
    started.stop()


def plugin_config(name: str) -> dict[str, Any]:
    spec = yaml.safe_load((EXAMPLES_DIR / name / "wasmplugin.yaml").read_text())["spec"]
    config: dict[str, Any] = spec.get("pluginConfig", {})
    return config


# ------------------------------------------------------------------------ one behaviour each


def check_request_tracking(harness: PluginHarness) -> None:
    header = str(plugin_config("request-tracking")["tracking_header"])
    response = harness.request("GET", "/headers", headers={header: "client-value"})
    assert response.status == 200
    assert response.upstream_request is not None
    assert response.upstream_request.headers.get_all(header.lower().encode()) == [b"request-tracking"]


def check_basic_auth(harness: PluginHarness) -> None:
    anonymous = harness.request("GET", "/productpage")
    assert anonymous.status == 401
    assert anonymous.upstream_request is None
    allowed = harness.request("GET", "/productpage", headers={"authorization": "Basic b2s6dGVzdA=="})
    assert allowed.status == 200  # ok:test


def check_rate_limit(harness: PluginHarness) -> None:
    # Burst 2 at 2 tokens/s: back-to-back requests (well under the 0.5 s refill of one token).
    answers = [harness.request("GET", "/status/200") for _ in range(3)]
    assert [answer.status for answer in answers] == [200, 200, 429]
    assert answers[2].header("powered-by") == "proxy-wasm"


BEHAVIOURS: dict[str, Callable[[PluginHarness], None]] = {
    "request-tracking": check_request_tracking,
    "basic-auth": check_basic_auth,
    "rate-limit": check_rate_limit,
}


# -------------------------------------------------------------------------------------- test


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_published_as_oci_image(name: str, variant: str, registry: Registry, tmp_path: Path) -> None:
    committed = (EXAMPLES_DIR / name / "plugin.wasm").read_bytes()
    build_image, wasm_layer_media_type = VARIANTS[variant]
    repository, tag = f"examples/{name}", TAGS[variant]

    layout = tmp_path / "layout"
    digest = write_oci_layout(layout, build_image(committed), tag)
    skopeo_push(layout, tag, registry, repository)

    # skopeo kept the image as written: same manifest digest, wasm layer of the variant's media type.
    served, content_type = registry_manifest(registry, repository, tag, OCI_MANIFEST)
    assert content_type.startswith(OCI_MANIFEST)
    assert registry_manifest(registry, repository, digest, OCI_MANIFEST)[0] == served
    layer_media_types = [layer["mediaType"] for layer in json.loads(served)["layers"]]
    assert layer_media_types[-1] == wasm_layer_media_type

    cache = ModuleCache(
        CacheOptions(
            dir=tmp_path / "cache",
            insecure_registries=frozenset({registry.host}),
            docker_config_dir=tmp_path / "no-docker-config",
        )
    )
    try:
        pulled_path = cache.get_sync(f"oci://{registry.host}/{repository}:{tag}")
    finally:
        cache.close()
    pulled = pulled_path.read_bytes()
    assert pulled == committed
    assert pulled_path.name == digest.removeprefix("sha256:") + ".wasm"

    # Shared data is process-wide per VM id (as in Envoy): a VM id of its own keeps this case's
    # rate-limit bucket apart from the other variant's run in the same process.
    with PluginHarness(pulled, config=plugin_config(name), name=name, vm_id=f"{name}-{variant}") as harness:
        BEHAVIOURS[name](harness)
