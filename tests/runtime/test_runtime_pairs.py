"""Pair serialisation: round trips and strict rejection of malformed input (cpp-host toPairs)."""

from __future__ import annotations

import struct

import pytest

from wasmesh.runtime.pairs import PairsError, decode_pairs, decode_property_path, encode_pairs


def test_spec_example_bytes() -> None:
    encoded = encode_pairs([(b"a", b"1"), (b"b", b"22")])
    assert encoded.hex() == "02000000" "01000000" "01000000" "01000000" "02000000" "6100310062003232" "00"


@pytest.mark.parametrize("pairs", [[], [(b"", b"")], [(b":path", b"/"), (b"x", b"\0binary\0")]])
def test_round_trip(pairs: list[tuple[bytes, bytes]]) -> None:
    assert decode_pairs(encode_pairs(pairs)) == pairs


def test_empty_forms() -> None:
    assert decode_pairs(b"") == [] and decode_pairs(b"\0") == []


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<I", 2) + struct.pack("<II", 1, 1), "size bytes"),
        (encode_pairs([(b"a", b"1")])[:-1], "value 0"),
        (encode_pairs([(b"a", b"1")]).replace(b"a\0", b"aX"), "key 0"),
        (encode_pairs([(b"a", b"1")]) + b"zz", "trailing"),
        (struct.pack("<I", 1025) + b"\0" * 8 * 1025, "1024-pair limit"),
        (struct.pack("<I", 1) + b"\0" * (1 << 20), "byte limit"),
    ],
)
def test_malformed_input_rejected(raw: bytes, reason: str) -> None:
    with pytest.raises(PairsError, match=reason):
        decode_pairs(raw)


def test_property_paths() -> None:
    assert decode_property_path(b"request\0headers\0x-a") == [b"request", b"headers", b"x-a"]
    assert decode_property_path(b"plugin_name\0") == [b"plugin_name"]
    assert decode_property_path(b"") == []
