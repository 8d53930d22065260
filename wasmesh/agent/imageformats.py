"""Which layer of an image holds the Wasm module, and how to get it out (pure; no network).

Four layouts are understood; Istio reads only the first two:

* ``compat``      Docker/OCI image whose LAST layer is tar+gzip containing ``plugin.wasm`` at any depth.
* ``oci``         solo.io/Istio variant: exactly 2 layers, one of them
                  ``application/vnd.module.wasm.content.layer.v1+wasm``.
* ``wasm-to-oci`` a single ``application/vnd.wasm.content.layer.v1+wasm`` layer.
* ``cncf``        CNCF Wasm artifact: ``application/wasm`` layers (the first one is the module), config
                  ``application/vnd.wasm.config.v0+json``.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass
from enum import StrEnum

from wasmesh.agent.errors import FetchError, FetchResult
from wasmesh.agent.oci import DOCKER_MANIFEST, Descriptor, Manifest
from wasmesh.agent.unbox import MAX_TAR_MEMBERS_SCANNED, gunzip_limited, too_large_error

DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
SOLO_WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
SOLO_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_TO_OCI_LAYER = "application/vnd.wasm.content.layer.v1+wasm"
WASM_TO_OCI_CONFIG = "application/vnd.wasm.config.v1+json"
CNCF_WASM_LAYER = "application/wasm"
CNCF_WASM_CONFIG = "application/vnd.wasm.config.v0+json"
COMPAT_FILE_NAME = "plugin.wasm"


class ImageFormat(StrEnum):
    COMPAT = "compat"
    SOLO_OCI = "oci"
    WASM_TO_OCI = "wasm-to-oci"
    CNCF = "cncf"


@dataclass(frozen=True)
class WasmLayer:
    descriptor: Descriptor
    image_format: ImageFormat

    @property
    def is_tar_gzip(self) -> bool:
        return self.image_format is ImageFormat.COMPAT


def _invalid(message: str) -> FetchError:
    # Counted as download_failure: Istio reports format errors from its binary fetcher.
    return FetchError(message, FetchResult.DOWNLOAD_FAILURE)


def locate_wasm_layer(manifest: Manifest) -> WasmLayer:
    """The layer to download for ``manifest``, or Istio's format error listing why each layout failed."""
    layers = manifest.layers
    if manifest.media_type == DOCKER_MANIFEST:
        if layers and layers[-1].media_type == DOCKER_LAYER_TAR_GZIP:
            return WasmLayer(layers[-1], ImageFormat.COMPAT)
        got = layers[-1].media_type if layers else "<no layers>"
        raise _invalid(
            "the given image is in invalid format as a docker image: "
            f"invalid media type {got} (expect {DOCKER_LAYER_TAR_GZIP})"
        )
    reasons: list[str] = []
    if layers and layers[-1].media_type == OCI_LAYER_TAR_GZIP:
        return WasmLayer(layers[-1], ImageFormat.COMPAT)
    got = layers[-1].media_type if layers else "<no layers>"
    reasons.append(
        f"could not parse as compat variant: invalid media type {got} (expect {OCI_LAYER_TAR_GZIP})"
    )
    if len(layers) == 2:
        for layer in layers:
            if layer.media_type == SOLO_WASM_LAYER:
                return WasmLayer(layer, ImageFormat.SOLO_OCI)
        reasons.append(f"could not parse as oci variant: no layer of media type {SOLO_WASM_LAYER}")
    else:
        reasons.append(f"could not parse as oci variant: number of layers must be 2 but got {len(layers)}")
    wasm_to_oci = [layer for layer in layers if layer.media_type == WASM_TO_OCI_LAYER]
    if len(layers) == 1 and wasm_to_oci:
        return WasmLayer(wasm_to_oci[0], ImageFormat.WASM_TO_OCI)
    reasons.append(
        f"could not parse as wasm-to-oci artifact: expect exactly 1 layer of media type {WASM_TO_OCI_LAYER}"
    )
    for layer in layers:
        if layer.media_type == CNCF_WASM_LAYER:
            return WasmLayer(layer, ImageFormat.CNCF)
    reasons.append(f"could not parse as CNCF wasm artifact: no layer of media type {CNCF_WASM_LAYER}")
    raise _invalid("the given image is in invalid format as an OCI image: " + "; ".join(reasons))


def extract_plugin_from_tar_gzip(blob: bytes, limit: int) -> bytes:
    """``plugin.wasm`` (matched by base name, any depth) from a gzipped tar layer."""
    archive_bytes = gunzip_limited(blob, limit, "compat image layer")
    try:
        with tarfile.open(fileobj=io.BytesIO(archive_bytes), mode="r:") as archive:
            for scanned, member in enumerate(archive):
                if scanned == MAX_TAR_MEMBERS_SCANNED:  # a hostile layer of empty entries: bounded work
                    bound = MAX_TAR_MEMBERS_SCANNED
                    raise _invalid(f"{COMPAT_FILE_NAME} not among the first {bound} entries of the archive")
                if member.isfile() and posixpath.basename(member.name) == COMPAT_FILE_NAME:
                    if member.size > limit:
                        raise too_large_error(f"{member.name} in the image layer", limit)
                    extracted = archive.extractfile(member)
                    return extracted.read() if extracted is not None else b""
    except tarfile.TarError as exc:
        raise _invalid(f"compat image layer is not a valid tar archive: {exc}") from None
    raise _invalid(f"{COMPAT_FILE_NAME} not found in the archive")


def extract_wasm(layer: WasmLayer, blob: bytes, limit: int) -> bytes:
    """The module bytes inside a downloaded (already digest-verified) layer blob."""
    if layer.is_tar_gzip:
        return extract_plugin_from_tar_gzip(blob, limit)
    return blob  # the raw layouts store the module itself (solo's layer is named +wasm, not gzipped)
