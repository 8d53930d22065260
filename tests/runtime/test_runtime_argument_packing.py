"""Guest calls whose arguments do not fit the one-``pack_into`` fast path (an i32 below 0, a u64
at or past 2**63) are packed value by value, each by its declared type, on both crossings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from wasmesh.runtime.engine import Crossing, HostFunc, WasmEngine, WasmInstance, sig

# Each export hands its arguments unchanged to an import, which records them.
WAT = """
(module
  (import "host" "seen_i32_f32" (func $seen_i32_f32 (param i32 f32)))
  (import "host" "seen_i64_f32" (func $seen_i64_f32 (param i64 f32)))
  (func (export "i32_f32") (param i32 f32) (call $seen_i32_f32 (local.get 0) (local.get 1)))
  (func (export "i64_f32") (param i64 f32) (call $seen_i64_f32 (local.get 0) (local.get 1)))
  (func (export "echo_f32") (param i32 f32) (result f32) (local.get 1))
)
"""


@pytest.fixture(params=("c", "ctypes"))
def recorded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[WasmInstance, list[object]]]:
    crossing: Crossing = request.param
    engine = WasmEngine(str(tmp_path / "cc"), crossing=crossing)
    seen: list[object] = []
    funcs = {
        ("host", "seen_i32_f32"): HostFunc("host", "seen_i32_f32", sig("if"), lambda *a: seen.append(a)),
        ("host", "seen_i64_f32"): HostFunc("host", "seen_i64_f32", sig("If"), lambda *a: seen.append(a)),
    }
    inst = WasmInstance(engine, engine.compile(wasmtime.wat2wasm(WAT)), funcs)
    assert inst.crossing == crossing
    yield inst, seen
    inst.close()
    engine.close()


def test_an_f32_beside_a_negative_i32_arrives_as_an_f32(recorded: tuple[WasmInstance, list[object]]) -> None:
    inst, seen = recorded
    fn = inst.func("i32_f32")
    assert fn is not None
    fn(-1, 2.5)  # type: ignore[arg-type]  # -1 does not fit the fast path's unsigned slot
    fn(7, 2.5)  # type: ignore[arg-type]  # the fast path, for comparison
    assert seen == [(0xFFFFFFFF, 2.5), (7, 2.5)]


def test_an_f32_beside_a_u64_past_2_63_arrives_as_an_f32(recorded: tuple[WasmInstance, list[object]]) -> None:
    inst, seen = recorded
    fn = inst.func("i64_f32")
    assert fn is not None
    fn((1 << 63) + 5, -0.75)  # type: ignore[arg-type]  # does not fit the fast path's signed i64
    assert seen == [(-(1 << 63) + 5, -0.75)]


def test_the_guest_echoes_the_f32_it_was_given(recorded: tuple[WasmInstance, list[object]]) -> None:
    inst, _ = recorded
    fn = inst.func("echo_f32")
    assert fn is not None
    assert fn(-3, 42.0) == 42  # type: ignore[arg-type]  # results are ints: 42.0 → 42
