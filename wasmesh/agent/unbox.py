"""Wasm binary checks and Istio's gzip/tar "unboxing" of downloaded bodies (pure byte functions)."""

from __future__ import annotations

import io
import tarfile
import zlib

from wasmesh.agent.errors import FetchError, FetchResult

WASM_MAGIC = b"\x00asm"
GZIP_MAGIC = b"\x1f\x8b"
_TAR_MAGIC_OFFSET = 257


def is_valid_wasm(data: bytes) -> bool:
    """Istio's ``isValidWasmBinary``: the 8-byte header (magic + version) is present."""
    return len(data) >= 8 and data[:4] == WASM_MAGIC


def too_large_error(what: str, limit: int) -> FetchError:
    return FetchError(f"{what} exceeds the size limit of {limit} bytes", FetchResult.DOWNLOAD_FAILURE)


def gunzip_limited(data: bytes, limit: int, what: str = "gzip stream") -> bytes:
    """Decompress a (possibly multi-member) gzip stream, failing instead of truncating past ``limit``."""
    output = bytearray()
    remaining = data
    while remaining:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            output += decompressor.decompress(remaining, limit + 1 - len(output))
            if len(output) > limit:
                raise too_large_error(f"decompressed {what}", limit)
            if not decompressor.eof:
                # Output room ran out exactly at the limit, or the stream is cut short.
                output += decompressor.decompress(decompressor.unconsumed_tail, 1)
                if len(output) > limit:
                    raise too_large_error(f"decompressed {what}", limit)
                if not decompressor.eof:
                    raise FetchError(f"{what}: unexpected end of gzip data", FetchResult.DOWNLOAD_FAILURE)
        except zlib.error as exc:
            raise FetchError(f"{what}: invalid gzip data: {exc}", FetchResult.DOWNLOAD_FAILURE) from None
        remaining = decompressor.unused_data.lstrip(b"\x00")
        if remaining[:2] != GZIP_MAGIC:
            break
    return bytes(output)


def is_posix_tar(data: bytes) -> bool:
    return data[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar"


def first_tar_file(data: bytes, limit: int) -> bytes | None:
    """The contents of the first regular file of a tar archive (None if it has none)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    if member.size > limit:
                        raise too_large_error(f"tar entry {member.name}", limit)
                    extracted = archive.extractfile(member)
                    return extracted.read() if extracted is not None else b""
    except tarfile.TarError as exc:
        raise FetchError(f"invalid tar archive: {exc}", FetchResult.DOWNLOAD_FAILURE) from None
    return None


def unbox_if_possible(data: bytes, limit: int) -> bytes:
    """Peel gzip and tar wrappers until a Wasm binary appears or nothing more can be unwrapped.

    Like Istio, a tar yields its first file; anything unrecognised is returned as it is (the caller's
    Wasm check then rejects it).
    """
    while not is_valid_wasm(data):
        if data[:2] == GZIP_MAGIC:
            data = gunzip_limited(data, limit)
        elif is_posix_tar(data):
            inner = first_tar_file(data, limit)
            if inner is None:
                return data
            data = inner
        else:
            return data
    return data
