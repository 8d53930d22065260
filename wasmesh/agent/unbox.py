"""Wasm binary checks and Istio's gzip/tar "unboxing" of downloaded bodies (pure byte functions)."""

from __future__ import annotations

import io
import re
import tarfile
import zlib

from wasmesh.agent.errors import FetchError, FetchResult

WASM_MAGIC = b"\x00asm"
GZIP_MAGIC = b"\x1f\x8b"
_TAR_MAGIC_OFFSET = 257
_FEED_BYTES = 64 * 1024
_NOT_NUL = re.compile(rb"[^\x00]")
# Bounds on the work a hostile body can cause, besides the size limit on every layer's output:
# gzip(tar(gzip(wasm))) is the deepest real packaging (3 layers); a gzip quine (a file that
# decompresses to itself) otherwise unwraps forever.
MAX_ARCHIVE_LAYERS = 4
MAX_GZIP_MEMBERS = 10_000
MAX_TAR_MEMBERS_SCANNED = 1_000


def is_valid_wasm(data: bytes) -> bool:
    """Istio's ``isValidWasmBinary``: the 8-byte header (magic + version) is present."""
    return len(data) >= 8 and data[:4] == WASM_MAGIC


def too_large_error(what: str, limit: int) -> FetchError:
    return FetchError(f"{what} exceeds the size limit of {limit} bytes", FetchResult.DOWNLOAD_FAILURE)


def gunzip_limited(data: bytes, limit: int, what: str = "gzip stream") -> bytes:
    """Decompress a (possibly multi-member) gzip stream, failing instead of truncating past ``limit``.

    Work is bounded as well as output: input is fed in 64 KiB slices of a memoryview (so finishing a
    member never copies the rest of the input, which made many tiny members quadratic), and at most
    ``MAX_GZIP_MEMBERS`` members are read.
    """
    output = bytearray()
    view = memoryview(data)
    position = 0
    members = 0
    while position < len(data):
        if members == MAX_GZIP_MEMBERS:
            raise FetchError(
                f"{what}: more than {MAX_GZIP_MEMBERS} gzip members", FetchResult.DOWNLOAD_FAILURE
            )
        members += 1
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            while not decompressor.eof:
                if position >= len(data):
                    raise FetchError(f"{what}: unexpected end of gzip data", FetchResult.DOWNLOAD_FAILURE)
                piece = view[position : position + _FEED_BYTES]
                # The room left is never 0 (0 would mean "unlimited"): overflowing raises first.
                output += decompressor.decompress(piece, limit + 1 - len(output))
                if len(output) > limit:
                    raise too_large_error(f"decompressed {what}", limit)
                position += len(piece) - len(decompressor.unused_data)
        except zlib.error as exc:
            raise FetchError(f"{what}: invalid gzip data: {exc}", FetchResult.DOWNLOAD_FAILURE) from None
        padding = _NOT_NUL.search(data, position)  # NUL padding may separate members
        if padding is None or data[padding.start() : padding.start() + 2] != GZIP_MAGIC:
            break  # trailing bytes that are not another member are ignored, as before
        position = padding.start()
    return bytes(output)


def is_posix_tar(data: bytes) -> bool:
    return data[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar"


def first_tar_file(data: bytes, limit: int) -> bytes | None:
    """The contents of the first regular file of a tar archive (None if it has none)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for scanned, member in enumerate(archive):
                if scanned == MAX_TAR_MEMBERS_SCANNED:
                    raise FetchError(
                        f"tar archive: no regular file among its first {MAX_TAR_MEMBERS_SCANNED} entries",
                        FetchResult.DOWNLOAD_FAILURE,
                    )
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
    Wasm check then rejects it). Unlike Istio, at most ``MAX_ARCHIVE_LAYERS`` wrappers are peeled, and
    each one's output is bounded by ``limit``.
    """
    layers = 0
    while not is_valid_wasm(data):
        if data[:2] != GZIP_MAGIC and not is_posix_tar(data):
            return data
        if layers == MAX_ARCHIVE_LAYERS:
            raise FetchError(
                f"more than {MAX_ARCHIVE_LAYERS} nested gzip/tar layers (a gzip quine or an archive bomb)",
                FetchResult.DOWNLOAD_FAILURE,
            )
        layers += 1
        if data[:2] == GZIP_MAGIC:
            data = gunzip_limited(data, limit)
        else:
            inner = first_tar_file(data, limit)
            if inner is None:
                return data
            data = inner
    return data
