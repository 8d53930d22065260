"""Cost of one crossing between Python and a wasm guest, both directions, raw vs public API.

    python benchmarks/bench_runtime_crossing.py [--iterations N]

host→wasm: calling a guest export ``add(i32, i32) -> i32``.
wasm→host: a guest loop calling a proxy-wasm-shaped import ``(5 × i32) -> i32`` N times
(the loop's own cost is measured separately with a no-import loop and subtracted).

"c" and "ctypes" are wasmesh.runtime.engine's two crossings over wasmtime's raw entry points
(``wasmtime_func_call_unchecked`` / ``wasmtime_linker_define_func_unchecked``): the C extension
``wasmesh.runtime._fastpath`` and the pure-ctypes fallback; "public" is wasmtime-py's
``Func.__call__`` / ``Linker.define_func``. Absolute numbers are noisy on shared
machines; the ratio is the point.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import wasmtime

from wasmesh.runtime.engine import Crossing, HostFunc, WasmEngine, WasmInstance, available_crossings, sig

WAT = """(module
  (import "env" "host5" (func $host5 (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "call_host") (param $n i32)
    (loop $l
      (drop (call $host5 (i32.const 1) (i32.const 2) (i32.const 3) (i32.const 4) (i32.const 5)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $l (local.get $n))))
  (func (export "empty_loop") (param $n i32)
    (loop $l
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $l (local.get $n)))))
"""


def _host5(a: int, b: int, c: int, d: int, e: int) -> int:
    return a + e


def _per_call_us(start: float, iterations: int) -> float:
    return (time.perf_counter() - start) / iterations * 1e6


def bench_raw(iterations: int, crossing: Crossing) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cache:
        engine = WasmEngine(cache_dir=cache, crossing=crossing)
        try:
            compiled = engine.compile(bytes(wasmtime.wat2wasm(WAT)))
            host = HostFunc("env", "host5", sig("iiiii", "i"), _host5)
            inst = WasmInstance(engine, compiled, {("env", "host5"): host})
            inst.deadline_ms = 60_000
            add = inst.functions["add"]
            start = time.perf_counter()
            for i in range(iterations):
                add(i, 1)
            host_to_wasm = _per_call_us(start, iterations)
            loop, empty = inst.functions["call_host"], inst.functions["empty_loop"]
            start = time.perf_counter()
            loop(iterations)
            with_calls = time.perf_counter() - start
            start = time.perf_counter()
            empty(iterations)
            wasm_to_host = (with_calls - (time.perf_counter() - start)) / iterations * 1e6
            inst.close()
            return host_to_wasm, wasm_to_host
        finally:
            engine.close()


def bench_public(iterations: int) -> tuple[float, float]:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    linker = wasmtime.Linker(engine)
    i32 = wasmtime.ValType.i32()
    linker.define_func("env", "host5", wasmtime.FuncType([i32] * 5, [i32]), _host5)
    instance = linker.instantiate(store, wasmtime.Module(engine, bytes(wasmtime.wat2wasm(WAT))))
    exports = instance.exports(store)
    add, loop, empty = exports["add"], exports["call_host"], exports["empty_loop"]
    assert isinstance(add, wasmtime.Func) and isinstance(loop, wasmtime.Func)
    assert isinstance(empty, wasmtime.Func)
    start = time.perf_counter()
    for i in range(iterations):
        add(store, i, 1)
    host_to_wasm = _per_call_us(start, iterations)
    start = time.perf_counter()
    loop(store, iterations)
    with_calls = time.perf_counter() - start
    start = time.perf_counter()
    empty(store, iterations)
    wasm_to_host = (with_calls - (time.perf_counter() - start)) / iterations * 1e6
    return host_to_wasm, wasm_to_host


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    crossings = available_crossings()
    raw = {crossing: bench_raw(args.iterations, crossing) for crossing in crossings}
    public = bench_public(args.iterations)
    print(f"wasmtime-py crossing cost, {args.iterations} calls each (µs per crossing)")
    print(f"{'direction':<32}" + "".join(f"{c:>10}" for c in crossings) + f"{'public API':>12}{'ratio':>8}")
    for index, label in enumerate(("host→wasm  add(i32,i32)->i32", "wasm→host  (5×i32)->i32")):
        cells = "".join(f"{raw[c][index]:>10.2f}" for c in crossings)
        best = raw[crossings[0]][index]
        print(f"{label:<32}{cells}{public[index]:>12.2f}{public[index] / best:>7.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
