"""Deadlines are CPU time of the thread running the guest: a looping guest fails once it has used
its budget, and a guest whose thread waits for the CPU on a loaded machine is not failed early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import wasmtime

from wasmesh.runtime.engine import GuestFailure, WasmEngine, WasmInstance

SPIN = """(module
  (func (export "spin") (param $n i32)
    (loop $again (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $again (i32.gt_s (local.get $n) (i32.const 0)))))
  (func (export "forever") (loop $l (br $l))))"""


@pytest.mark.parametrize("crossing", ("c", "ctypes"))
def test_a_looping_guest_fails_once_it_has_used_its_cpu_budget(tmp_path: Path, crossing: str) -> None:
    engine = WasmEngine(str(tmp_path / "cc"), crossing=crossing)  # type: ignore[arg-type]
    inst = WasmInstance(engine, engine.compile(wasmtime.wat2wasm(SPIN)), {})
    try:
        inst.deadline_ms = 200
        forever = inst.func("forever")
        assert forever is not None
        cpu_before = time.thread_time()
        with pytest.raises(GuestFailure, match="exceeded its 200 ms CPU deadline") as failure:
            forever()
        used = time.thread_time() - cpu_before
        assert failure.value.reason == "deadline"
        # Not before its budget (200 ms less the one epoch period a lazily armed deadline may lose).
        assert used >= 0.15, used
    finally:
        inst.close()
        engine.close()


# In a fresh interpreter pinned to one CPU: calibrate a spin of ~150 ms CPU time, then run it under a
# 500 ms deadline while five busy processes share that CPU (the guest's thread gets ~1/6 of it, so
# the spin takes ~0.9 s of wall-clock time, well past the deadline and far below the backstop).
PROBE = """
import json, os, subprocess, sys, time
import wasmtime
from wasmesh.runtime.engine import GuestFailure, WasmEngine, WasmInstance
cpu = int(sys.argv[2])
os.sched_setaffinity(0, {cpu})
engine = WasmEngine(sys.argv[1], crossing=sys.argv[3])
inst = WasmInstance(engine, engine.compile(wasmtime.wat2wasm(sys.argv[4])), {})
spin = inst.func("spin")
inst.deadline_ms = 60_000
started = time.thread_time()
spin(20_000_000)
per_iteration = (time.thread_time() - started) / 20_000_000
iterations = min(int(0.15 / per_iteration), 2**31 - 1)
hog = f"import os\\nos.sched_setaffinity(0, {{{cpu}}})\\nwhile True: pass"
hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(5)]
try:
    time.sleep(0.5)
    inst.deadline_ms = 500
    wall, cpu_time = time.monotonic(), time.thread_time()
    try:
        spin(iterations)
        outcome = "ok"
    except GuestFailure as exc:
        outcome = f"{exc.reason}: {exc}"
    wall, cpu_time = time.monotonic() - wall, time.thread_time() - cpu_time
finally:
    for process in hogs:
        process.kill()
        process.wait()
print(json.dumps({"outcome": outcome, "wall_s": wall, "cpu_s": cpu_time}))
"""


@pytest.mark.parametrize("crossing", ("c", "ctypes"))
def test_a_guest_whose_thread_waits_for_the_cpu_is_not_failed_early(tmp_path: Path, crossing: str) -> None:
    root = Path(__file__).parent.parent.parent
    cpu = min(os.sched_getaffinity(0))
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "cc"), str(cpu), crossing, SPIN],
        env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["wall_s"] > 0.5, result  # the scenario: more wall-clock time than the deadline
    assert result["outcome"] == "ok", result


def test_a_guest_on_a_thread_the_engine_does_not_watch_still_fails_by_the_wall_clock_backstop(
    tmp_path: Path,
) -> None:
    engine = WasmEngine(str(tmp_path / "cc"))
    inst = WasmInstance(engine, engine.compile(wasmtime.wat2wasm(SPIN)), {})  # watched: this thread
    inst.deadline_ms = 100
    forever = inst.func("forever")
    assert forever is not None
    outcome: list[str] = []

    def run() -> None:
        try:
            forever()
        except GuestFailure as exc:
            outcome.append(exc.reason)

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(timeout=60)  # the backstop fires after ~10 x the deadline of wall-clock time
    try:
        assert outcome == ["deadline"]
    finally:
        inst.close()
        engine.close()
