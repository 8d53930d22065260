"""The two crossings (the C extension and pure ctypes) move every value kind the same way both
directions, report host failures the same way, and the C one is built by the install."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from wasmesh.runtime.engine import (
    Crossing,
    GuestFailure,
    HostFunc,
    WasmEngine,
    WasmInstance,
    available_crossings,
    default_crossing,
    sig,
)

# Each export calls one import with its own arguments and returns what the import returned.
WAT = """
(module
  (import "host" "i32" (func $i32 (param i32 i32) (result i32)))
  (import "host" "i64" (func $i64 (param i64 i32) (result i64)))
  (import "host" "f32" (func $f32 (param f32) (result f32)))
  (import "host" "f64" (func $f64 (param f64 i64) (result f64)))
  (import "host" "none" (func $none (param i32)))
  (func (export "call_i32") (param i32 i32) (result i32) (call $i32 (local.get 0) (local.get 1)))
  (func (export "call_i64") (param i64 i32) (result i64) (call $i64 (local.get 0) (local.get 1)))
  (func (export "call_f32") (param f32) (result f32) (call $f32 (local.get 0)))
  (func (export "call_f64") (param f64 i64) (result f64) (call $f64 (local.get 0) (local.get 1)))
  (func (export "call_none") (param i32) (call $none (local.get 0)))
)
"""


class Host:
    """Imports that record what they were given and answer what the test set."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[object, ...]]] = []
        self.answer: object = None
        self.raise_: BaseException | None = None

    def make(self, name: str):  # type: ignore[no-untyped-def]
        def impl(*args: object) -> object:
            self.seen.append((name, args))
            if self.raise_ is not None:
                raise self.raise_
            return self.answer

        return impl

    def funcs(self) -> dict[tuple[str, str], HostFunc]:
        sigs = {"i32": sig("ii", "i"), "i64": sig("Ii", "I"), "f32": sig("f", "f"),
                "f64": sig("FI", "F"), "none": sig("i")}  # fmt: skip
        return {("host", n): HostFunc("host", n, s, self.make(n)) for n, s in sigs.items()}


@pytest.fixture(params=("c", "ctypes"))
def instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[WasmInstance, Host]]:
    engine = WasmEngine(str(tmp_path / "cc"), crossing=request.param)
    host = Host()
    inst = WasmInstance(engine, engine.compile(wasmtime.wat2wasm(WAT)), host.funcs())
    yield inst, host
    inst.close()
    engine.close()


def call(inst: WasmInstance, name: str, *args: int) -> int:
    fn = inst.func(name)
    assert fn is not None
    return fn(*args)


def test_the_c_crossing_is_built() -> None:
    # pip install builds it wherever a C compiler and Python headers exist, as on CI.
    assert "c" in available_crossings(), "wasmesh.runtime._fastpath was not built by 'pip install -e .'"


def test_default_crossing_honours_the_pure_python_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMESH_PURE_PYTHON", "1")
    assert default_crossing() == "ctypes"
    monkeypatch.delenv("WASMESH_PURE_PYTHON")
    assert default_crossing() == available_crossings()[0]


def test_an_unknown_crossing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="crossing 'asm' is not available"):
        WasmEngine(str(tmp_path), crossing="asm")  # type: ignore[arg-type]


def test_i32_arguments_arrive_unsigned_and_results_are_masked(instance: tuple[WasmInstance, Host]) -> None:
    inst, host = instance
    host.answer = -1  # masked to 0xFFFFFFFF, which the guest returns as i32 -1
    assert call(inst, "call_i32", 0xFFFFFFFF, 7) == -1
    assert host.seen[-1] == ("i32", (0xFFFFFFFF, 7))
    host.answer = (1 << 40) | 5
    assert call(inst, "call_i32", 1, 2) == 5
    host.answer = None  # a None answer is 0
    assert call(inst, "call_i32", 1, 2) == 0


def test_i64_arguments_and_results_are_signed(instance: tuple[WasmInstance, Host]) -> None:
    inst, host = instance
    host.answer = -(1 << 62)
    assert call(inst, "call_i64", -5, 3) == -(1 << 62)
    assert host.seen[-1] == ("i64", (-5, 3))


def test_float_arguments_and_results(instance: tuple[WasmInstance, Host]) -> None:
    inst, host = instance
    f32 = inst.func("call_f32")
    f64 = inst.func("call_f64")
    assert f32 is not None and f64 is not None
    host.answer = 2.5
    assert f32(1) == 2  # GuestFunc returns ints: 2.5 truncated
    name, (value,) = host.seen[-1]
    assert name == "f32" and value == 1.0
    host.answer = 1e300
    assert f64(3, -9) == int(1e300)
    assert host.seen[-1] == ("f64", (3.0, -9))
    host.answer = math.inf
    with pytest.raises(OverflowError):  # the guest got inf back; Python cannot make an int of it
        f64(0, 0)


def test_an_f32_result_out_of_range_is_a_host_error(instance: tuple[WasmInstance, Host]) -> None:
    inst, host = instance
    host.answer = 1e300  # no f32 can hold it: both crossings refuse rather than pass inf
    with pytest.raises(GuestFailure) as failure:
        call(inst, "call_f32", 0)
    assert failure.value.reason == "host_error"


def test_no_result(instance: tuple[WasmInstance, Host]) -> None:
    inst, host = instance
    host.answer = 12345  # ignored: the import returns nothing
    assert call(inst, "call_none", 9) == 0
    assert host.seen[-1] == ("none", (9,))


def test_a_raising_host_call_traps_the_guest_and_keeps_its_exception(
    instance: tuple[WasmInstance, Host],
) -> None:
    inst, host = instance
    host.raise_ = KeyError("boom")
    with pytest.raises(GuestFailure, match="KeyError: 'boom'") as failure:
        call(inst, "call_i32", 1, 2)
    assert failure.value.reason == "host_error"
    host.raise_ = None
    host.answer = 4
    assert call(inst, "call_i32", 1, 2) == 4  # the instance is usable again


def test_a_result_that_does_not_fit_is_a_host_error(instance: tuple[WasmInstance, Host]) -> None:
    inst, host = instance
    host.answer = 1 << 70  # not an i64
    with pytest.raises(GuestFailure) as failure:
        call(inst, "call_i64", 0, 0)
    assert failure.value.reason == "host_error"


def test_restricted_phases_go_through_the_checking_path(instance: tuple[WasmInstance, Host]) -> None:
    inst, host = instance
    host.answer = 1
    previous = inst.restrict(frozenset({"host.i32"}), during="test")
    try:
        assert call(inst, "call_i32", 1, 2) == 1
        with pytest.raises(GuestFailure, match="restricted_callback: host.i64 called during test"):
            call(inst, "call_i64", 1, 2)
    finally:
        inst.restrict(*previous)
    assert call(inst, "call_i64", 1, 2) == 1


@pytest.mark.parametrize("crossing", ("c", "ctypes"))
def test_both_crossings_give_the_same_answers(tmp_path: Path, crossing: Crossing) -> None:
    engine = WasmEngine(str(tmp_path / "cc"), crossing=crossing)
    host = Host()
    inst = WasmInstance(engine, engine.compile(wasmtime.wat2wasm(WAT)), host.funcs())
    try:
        assert inst.crossing == crossing
        host.answer = 0x1_2345_6789
        assert call(inst, "call_i32", 5, 6) == 0x2345_6789
    finally:
        inst.close()
        engine.close()
