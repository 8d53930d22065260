"""Serialisation of header pairs and property paths (Proxy-Wasm spec "Serialization").

Layout: u32 count, then count × (u32 key_len, u32 value_len), then
count × (key, NUL, value, NUL). Decoding is strict, like proxy-wasm-cpp-host's
``toPairs``: any malformed input is rejected, as is input above 1 MiB or 1024 pairs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from wasmesh.runtime.abi import PAIRS_MAX_BYTES, PAIRS_MAX_COUNT

_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")


class PairsError(ValueError):
    """A pair-serialised map was malformed; the message names what was wrong."""


def encode_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    items = list(pairs)
    sizes = bytearray(_U32.pack(len(items)))
    data = bytearray()
    for key, value in items:
        sizes += _U32X2.pack(len(key), len(value))
        data += key
        data += b"\0"
        data += value
        data += b"\0"
    return bytes(sizes + data)


def decode_pairs(buf: bytes) -> list[tuple[bytes, bytes]]:
    """Decode a serialised map; raises PairsError with a one-line reason on malformed input."""
    size = len(buf)
    # The spec allows an empty map to be sent as nothing or as a single NUL byte.
    if size == 0 or buf == b"\0":
        return []
    if size > PAIRS_MAX_BYTES:
        raise PairsError(f"pairs: {size} bytes exceeds the {PAIRS_MAX_BYTES}-byte limit")
    if size < 4:
        raise PairsError(f"pairs: {size} bytes is too short for the pair count")
    (count,) = _U32.unpack_from(buf, 0)
    if count > PAIRS_MAX_COUNT:
        raise PairsError(f"pairs: count {count} exceeds the {PAIRS_MAX_COUNT}-pair limit")
    pos = 4
    if pos + 8 * count > size:
        raise PairsError(f"pairs: count {count} needs {8 * count} size bytes, only {size - pos} left")
    sizes = [_U32X2.unpack_from(buf, pos + 8 * i) for i in range(count)]
    pos += 8 * count
    out: list[tuple[bytes, bytes]] = []
    view = memoryview(buf)
    for index, (key_len, value_len) in enumerate(sizes):
        key_end = pos + key_len
        if key_end + 1 > size or buf[key_end] != 0:
            raise PairsError(f"pairs: key {index} is truncated or not NUL-terminated")
        value_start = key_end + 1
        value_end = value_start + value_len
        if value_end + 1 > size or buf[value_end] != 0:
            raise PairsError(f"pairs: value {index} is truncated or not NUL-terminated")
        out.append((bytes(view[pos:key_end]), bytes(view[value_start:value_end])))
        pos = value_end + 1
    if pos != size:
        raise PairsError(f"pairs: {size - pos} trailing bytes after {count} pairs")
    return out


def pairs_count(buf: bytes) -> int:
    return len(decode_pairs(buf))


def decode_property_path(raw: bytes) -> list[bytes]:
    """Split a NUL-joined property path; a trailing NUL is tolerated as Envoy does."""
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return raw.split(b"\0") if raw else []


def encode_property_path(segments: Iterable[bytes]) -> bytes:
    return b"\0".join(segments)
