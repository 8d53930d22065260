"""The export-section rewriter that lets stock Envoy load Higress (ABI 0_2_100) plugins."""

from __future__ import annotations

import pytest
import wasmtime

from wasmesh.testing.wasm_exports import (
    ENVOY_ABI_EXPORT,
    HIGRESS_ABI_EXPORT,
    WasmFormatError,
    envoy_compatible_abi,
    read_exports,
    rename_exports,
)

MODULE = bytes(wasmtime.wat2wasm(
    """
    (module
      (memory (export "memory") 1)
      (func (export "proxy_abi_version_0_2_100"))
      (func $f (result i32) i32.const 7)
      (export "answer" (func $f))
      (data (i32.const 0) "kept"))
    """
))


def test_marker_renamed_and_everything_else_kept() -> None:
    out = envoy_compatible_abi(MODULE)
    names = [e.name for e in read_exports(out)]
    assert ENVOY_ABI_EXPORT in names and HIGRESS_ABI_EXPORT not in names
    assert [(e.kind, e.index) for e in read_exports(out)] == [(e.kind, e.index) for e in read_exports(MODULE)]
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    instance = wasmtime.Instance(store, wasmtime.Module(engine, out), [])
    answer = instance.exports(store)["answer"]
    assert isinstance(answer, wasmtime.Func) and answer(store) == 7


def test_module_without_marker_is_unchanged() -> None:
    plain = bytes(wasmtime.wat2wasm('(module (func (export "proxy_abi_version_0_2_1")))'))
    assert envoy_compatible_abi(plain) == plain


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(WasmFormatError, match="not a WebAssembly module"):
        envoy_compatible_abi(b"not wasm at all")
    with pytest.raises(WasmFormatError, match="does not export nope"):
        rename_exports(MODULE, {"nope": "x"})
    with pytest.raises(WasmFormatError, match="duplicate"):
        rename_exports(MODULE, {"answer": "memory"})
    with pytest.raises(WasmFormatError, match="runs past the end"):
        envoy_compatible_abi(MODULE[:-3])
