"""Hostile module bodies for the fetcher tests: a real gzip quine, a gzip bomb, deep nesting.

The quine follows Russ Cox's construction ("Zip Files All The Way Down", 2010) in a variant built
here: every DEFLATE "op" is exactly ``UNIT`` bytes, ``L(n)`` is a stored block printing the next ``n``
bytes literally and ``R(n)`` a fixed-Huffman block copying the last ``n`` bytes of output. The op
sequence prints the gzip header, then itself, then the gzip trailer, so ``gunzip(quine) == quine``;
the trailer's CRC32 (which appears twice in the file) is found by solving the affine CRC equation
over GF(2).
"""

from __future__ import annotations

import gzip
import struct
import zlib

UNIT = 10  # bytes of every op; the gzip header (the prefix the quine prints first) is 10 bytes too


class _Bits:
    """DEFLATE's bit order: values LSB first, Huffman codes MSB first."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def value(self, number: int, width: int) -> None:
        self.bits += [(number >> i) & 1 for i in range(width)]

    def code(self, number: int, width: int) -> None:
        self.bits += [(number >> i) & 1 for i in reversed(range(width))]

    def to_bytes(self) -> bytes:
        assert len(self.bits) % 8 == 0
        return bytes(
            sum(bit << i for i, bit in enumerate(self.bits[offset : offset + 8]))
            for offset in range(0, len(self.bits), 8)
        )


_LENGTH_CODES = [  # (code, base length, extra bits)
    (257, 3, 0), (258, 4, 0), (259, 5, 0), (260, 6, 0), (261, 7, 0), (262, 8, 0), (263, 9, 0),
    (264, 10, 0), (265, 11, 1), (266, 13, 1), (267, 15, 1), (268, 17, 1), (269, 19, 2), (270, 23, 2),
    (271, 27, 2), (272, 31, 2), (273, 35, 3), (274, 43, 3), (275, 51, 3), (276, 59, 3), (277, 67, 4),
]  # fmt: skip
_DISTANCE_CODES = [  # (code, base distance, extra bits)
    (0, 1, 0), (1, 2, 0), (2, 3, 0), (3, 4, 0), (4, 5, 1), (5, 7, 1), (6, 9, 2), (7, 13, 2),
    (8, 17, 3), (9, 25, 3), (10, 33, 4), (11, 49, 4), (12, 65, 5), (13, 97, 5),
]  # fmt: skip


def _lookup(table: list[tuple[int, int, int]], value: int) -> tuple[int, int, int]:
    for code, base, extra in reversed(table):
        if value >= base:
            assert value < base + (1 << extra) or extra == 0 and value == base
            return code, value - base, extra
    raise ValueError(value)


def _fixed_literal_length_code(bits: _Bits, symbol: int) -> None:
    if symbol < 144:
        bits.code(0x30 + symbol, 8)
    elif symbol < 256:
        bits.code(0x190 + symbol - 144, 9)
    elif symbol < 280:
        bits.code(symbol - 256, 7)
    else:
        bits.code(0xC0 + symbol - 280, 8)


def _empty_fixed_block(bits: _Bits) -> None:
    bits.value(0, 1)  # BFINAL
    bits.value(1, 2)  # BTYPE = fixed Huffman
    _fixed_literal_length_code(bits, 256)  # end of block


def _stored_header(bits: _Bits, length: int, final: bool) -> None:
    bits.value(int(final), 1)
    bits.value(0, 2)  # BTYPE = stored
    bits.bits += [0] * (-len(bits.bits) % 8)
    bits.value(length, 16)
    bits.value(length ^ 0xFFFF, 16)


def literal_op(length: int) -> bytes:
    """``L(length)``: four empty fixed blocks pad a stored-block header to exactly UNIT bytes."""
    bits = _Bits()
    for _ in range(4):
        _empty_fixed_block(bits)
    _stored_header(bits, length, final=False)
    op = bits.to_bytes()
    assert len(op) == UNIT, len(op)
    return op


def repeat_op(length: int, final: bool = False) -> bytes:
    """``R(length)``: copy the last ``length`` bytes, then an empty stored block re-aligns to a byte."""
    for pieces in ([length], [length // 2, length - length // 2]):
        for padding_blocks in range(4):
            bits = _Bits()
            for _ in range(padding_blocks):
                _empty_fixed_block(bits)
            bits.value(0, 1)
            bits.value(1, 2)
            for piece in pieces:
                code, extra_value, extra_bits = _lookup(_LENGTH_CODES, piece)
                _fixed_literal_length_code(bits, code)
                bits.value(extra_value, extra_bits)
                code, extra_value, extra_bits = _lookup(_DISTANCE_CODES, length)
                bits.code(code, 5)
                bits.value(extra_value, extra_bits)
            _fixed_literal_length_code(bits, 256)
            _stored_header(bits, 0, final)
            op = bits.to_bytes()
            if len(op) == UNIT:
                return op
    raise ValueError(f"no {UNIT}-byte encoding for R({length})")


def _assemble(header: bytes, trailer: bytes) -> bytes:
    """header + the op stream + trailer; the stream prints header + itself + trailer."""
    assert len(header) == UNIT and len(trailer) == 8
    l10, l0, l40, l18 = literal_op(10), literal_op(0), literal_op(40), literal_op(18)
    r40, r18_final = repeat_op(40), repeat_op(18, final=True)
    prefix = l10 + header + l0  # prints the header; a no-op keeps the group 3 units long
    stream = (
        prefix
        + l40 + prefix + l40  # print "prefix L40"
        + r40  # ... and again: now the output has reproduced the stream's first 8 units
        + l40 + r40 + l40 + r40 + l40  # print "R40 L40 R40 L40"
        + r40  # ... and again
        + l40 + r40 + l0 + l0 + l18  # print the tail's first 4 units
        + r40 + l0 + l0 + l18  # repeat them; L18 prints the last op and the trailer
        + r18_final + trailer
        + r18_final  # copies "R18 trailer": the output ends with the stream, then the trailer
    )  # fmt: skip
    return header + stream + trailer


def gzip_quine() -> bytes:
    """A gzip file that decompresses to exactly itself (CRC32 and length check out)."""
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff"
    size = len(_assemble(header, bytes(8)))

    def crc_of(candidate: int) -> int:
        trailer = struct.pack("<II", candidate, size)
        return zlib.crc32(_assemble(header, trailer))

    # crc_of is affine in the candidate's bits over GF(2): crc_of(x) = A x + b. Solve (A + I) x = b.
    base = crc_of(0)
    columns = [crc_of(1 << i) ^ base ^ (1 << i) for i in range(32)]
    rows = [(sum(((columns[j] >> r) & 1) << j for j in range(32)), (base >> r) & 1) for r in range(32)]
    solution = _solve_gf2(rows)
    data = _assemble(header, struct.pack("<II", solution, size))
    assert gzip.decompress(data) == data
    return data


def _solve_gf2(rows: list[tuple[int, int]]) -> int:
    """x with parity(mask & x) == rhs for every (mask, rhs); raises when there is none."""
    pivots: list[tuple[int, int, int]] = []  # (pivot bit, mask, rhs)
    for mask, rhs in rows:
        for bit, pivot_mask, pivot_rhs in pivots:
            if (mask >> bit) & 1:
                mask ^= pivot_mask
                rhs ^= pivot_rhs
        if mask == 0:
            if rhs:
                raise ValueError("no solution")
            continue
        bit = mask.bit_length() - 1
        pivots = [(b, m ^ mask, r ^ rhs) if (m >> bit) & 1 else (b, m, r) for b, m, r in pivots] + [
            (bit, mask, rhs)
        ]
    solution = 0
    for bit, _mask, rhs in pivots:
        if rhs:
            solution |= 1 << bit
    return solution


def gzip_bomb(decompressed_bytes: int) -> bytes:
    """A small gzip body that expands to ``decompressed_bytes`` zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = []
    for _ in range(decompressed_bytes // len(block)):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(bytes(decompressed_bytes % len(block))))
    parts.append(compressor.flush())
    return b"".join(parts)


def nested_gzip(data: bytes, depth: int) -> bytes:
    for _ in range(depth):
        data = gzip.compress(data, mtime=0)
    return data
