"""Fetch a Wasm module from an OCI registry in two steps, as Istio's cache needs them.

``prepare()`` fetches only the manifest (cheap; gives the digest the cache is keyed by), and the
returned ``PreparedImage.fetch_binary()`` downloads, verifies and extracts the Wasm layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wasmesh.agent.credentials import CredentialsError, DockerConfig, load_docker_config, parse_docker_config
from wasmesh.agent.errors import FetchError, FetchResult
from wasmesh.agent.imageformats import WasmLayer, extract_wasm, locate_wasm_layer
from wasmesh.agent.oci import ImageReference, Manifest, RegistryClient, resolve_manifest
from wasmesh.agent.ssrf import AddressPolicy

ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True)
class PreparedImage:
    reference: ImageReference
    manifest: Manifest
    client: RegistryClient
    max_bytes: int

    @property
    def digest_hex(self) -> str:
        """The checksum Istio compares a user's ``sha256`` with: the manifest digest, hex only."""
        return self.manifest.digest.removeprefix("sha256:")

    def wasm_layer(self) -> WasmLayer:
        return locate_wasm_layer(self.manifest)

    def fetch_binary(
        self, deadline: float | None = None, on_progress: ProgressCallback | None = None
    ) -> bytes:
        layer = self.wasm_layer()
        blob = self.client.get_blob(
            self.reference.repository,
            layer.descriptor,
            max_bytes=self.max_bytes,
            deadline=deadline,
            on_progress=on_progress,
        )
        return extract_wasm(layer, blob, self.max_bytes)


def docker_config_for(pull_secret: bytes, docker_config_dir: Path | None) -> DockerConfig:
    """The keychain for one request: the pull secret's contents if given, else Docker's config.json."""
    try:
        if pull_secret:
            return parse_docker_config(pull_secret, "imagePullSecret")
        return load_docker_config(docker_config_dir)
    except CredentialsError as exc:
        raise FetchError(str(exc), FetchResult.MANIFEST_FAILURE) from None


def prepare_image(
    reference: ImageReference,
    *,
    pull_secret: bytes = b"",
    insecure: bool = False,
    request_timeout_s: float = 15.0,
    max_attempts: int = 5,
    initial_backoff_s: float = 0.5,
    max_bytes: int = 256 << 20,
    docker_config_dir: Path | None = None,
    deadline: float | None = None,
    policy: AddressPolicy | None = None,
) -> PreparedImage:
    """Resolve ``reference`` to its manifest; FetchError(manifest_failure) if that fails."""
    credential = docker_config_for(pull_secret, docker_config_dir).lookup(reference.registry)
    client = RegistryClient(
        reference.registry,
        credential,
        insecure=insecure,
        request_timeout_s=request_timeout_s,
        max_attempts=max_attempts,
        initial_backoff_s=initial_backoff_s,
        policy=policy,
    )
    manifest = resolve_manifest(client, reference, deadline)
    return PreparedImage(reference, manifest, client, max_bytes)
