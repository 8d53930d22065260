"""A tiny WebAssembly export-section rewriter.

Stock Envoy refuses Higress's ``proxy_abi_version_0_2_100`` marker, although
those plugins otherwise speak ABI 0.2.1. Renaming the marker export lets Envoy
load them for differential tests. The new name is shorter than the old one, so
the export section is re-encoded and its size recomputed; every other section
is copied byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "WasmFormatError",
    "WasmExport",
    "read_exports",
    "rename_exports",
    "envoy_compatible_abi",
    "HIGRESS_ABI_EXPORT",
    "ENVOY_ABI_EXPORT",
]

WASM_MAGIC = b"\0asm"
EXPORT_SECTION_ID = 7
HIGRESS_ABI_EXPORT = "proxy_abi_version_0_2_100"
ENVOY_ABI_EXPORT = "proxy_abi_version_0_2_1"


class WasmFormatError(ValueError):
    """The bytes are not a well-formed WebAssembly binary module."""


@dataclass(frozen=True)
class WasmExport:
    name: str
    kind: int  # 0 func, 1 table, 2 memory, 3 global, 4 tag
    index: int


def _read_u32(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """Decode an unsigned LEB128 u32 at ``pos``; return (value, next position)."""
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise WasmFormatError(f"truncated LEB128 while reading {what}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 28:
            raise WasmFormatError(f"LEB128 too long while reading {what}")


def _write_u32(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _sections(module: bytes) -> list[tuple[int, int, int]]:
    """(section id, payload start, payload end) for every section, validated."""
    if len(module) < 8 or module[:4] != WASM_MAGIC:
        raise WasmFormatError("not a WebAssembly module (missing \\0asm magic)")
    if module[4:8] != b"\x01\x00\x00\x00":
        raise WasmFormatError(f"unsupported WebAssembly binary version {module[4:8].hex()}")
    out: list[tuple[int, int, int]] = []
    pos = 8
    while pos < len(module):
        section_id = module[pos]
        size, start = _read_u32(module, pos + 1, f"size of section {section_id}")
        end = start + size
        if end > len(module):
            raise WasmFormatError(f"section {section_id} runs past the end of the module")
        out.append((section_id, start, end))
        pos = end
    return out


def _parse_exports(payload: bytes) -> list[WasmExport]:
    count, pos = _read_u32(payload, 0, "export count")
    exports: list[WasmExport] = []
    for _ in range(count):
        name_len, pos = _read_u32(payload, pos, "export name length")
        raw_name = payload[pos : pos + name_len]
        if len(raw_name) != name_len:
            raise WasmFormatError("export name runs past the end of the export section")
        pos += name_len
        if pos >= len(payload):
            raise WasmFormatError("export entry truncated")
        kind = payload[pos]
        index, pos = _read_u32(payload, pos + 1, "export index")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WasmFormatError(f"export name is not UTF-8: {raw_name!r}") from exc
        exports.append(WasmExport(name, kind, index))
    if pos != len(payload):
        raise WasmFormatError("trailing bytes after the last export")
    return exports


def _encode_exports(exports: list[WasmExport]) -> bytes:
    out = bytearray(_write_u32(len(exports)))
    for export in exports:
        raw = export.name.encode("utf-8")
        out += _write_u32(len(raw)) + raw + bytes([export.kind]) + _write_u32(export.index)
    return bytes(out)


def read_exports(module: bytes) -> list[WasmExport]:
    for section_id, start, end in _sections(module):
        if section_id == EXPORT_SECTION_ID:
            return _parse_exports(module[start:end])
    return []


def rename_exports(module: bytes, renames: dict[str, str]) -> bytes:
    """Return ``module`` with exports renamed per ``renames`` (old name -> new name).

    Raises WasmFormatError when an old name is not exported or a new name clashes.
    """
    sections = _sections(module)
    for index, (section_id, start, end) in enumerate(sections):
        if section_id != EXPORT_SECTION_ID:
            continue
        exports = _parse_exports(module[start:end])
        names = {e.name for e in exports}
        missing = sorted(set(renames) - names)
        if missing:
            raise WasmFormatError(f"module does not export {', '.join(missing)}")
        renamed = [WasmExport(renames.get(e.name, e.name), e.kind, e.index) for e in exports]
        new_names = [e.name for e in renamed]
        if len(set(new_names)) != len(new_names):
            raise WasmFormatError("renaming would create duplicate export names")
        payload = _encode_exports(renamed)
        # The section header (id + size) starts where the previous section ended.
        header_start = sections[index - 1][2] if index > 0 else 8
        new_section = bytes([EXPORT_SECTION_ID]) + _write_u32(len(payload)) + payload
        return module[:header_start] + new_section + module[end:]
    if renames:
        raise WasmFormatError("module has no export section")
    return module


def envoy_compatible_abi(module: bytes) -> bytes:
    """Rename Higress's ABI marker 0_2_100 to 0_2_1 so stock Envoy loads the module.

    A module without the Higress marker is returned unchanged.
    """
    if any(e.name == HIGRESS_ABI_EXPORT for e in read_exports(module)):
        return rename_exports(module, {HIGRESS_ABI_EXPORT: ENVOY_ABI_EXPORT})
    return module
