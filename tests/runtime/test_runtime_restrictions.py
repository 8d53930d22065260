"""cpp-host's restricted phases: inside the allocator and during module initialisation only a few
host calls may run; any other one fails the VM with "restricted_callback" (security_test.cc)."""

from __future__ import annotations

import pytest
import wasmtime
from runtime_support import FakeCallbacks, LogRecorder, run_request

from wasmesh.http.filter import FilterHeadersStatus
from wasmesh.runtime import FailurePolicy, PluginSpec, Runtime
from wasmesh.runtime.plugin import PluginLoadError, WasmHttpFilter
from wasmesh.runtime.runtime import FAILURES_METRIC

# malloc logs, then makes the host call selected by $mode: 0 none, 1 proxy_done (forbidden there).
MODULE = """(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_done" (func $done (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) "malloc")
  (data (i32.const 200) ":path")
  (global $heap (mut i32) (i32.const 0x8000))
  (global $mode (mut i32) (i32.const 0))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (drop (call $log (i32.const 2) (i32.const 100) (i32.const 6)))
    (if (i32.eq (global.get $mode) (i32.const 1)) (then (drop (call $done))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "_initialize") INIT)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32) (param i32) (result i32)
    ;; :path's value is copied out through malloc; the x-mode header is not needed, the path decides.
    (global.set $mode (i32.const MODE))
    (drop (call $get_header (i32.const 0) (i32.const 200) (i32.const 5) (i32.const 16) (i32.const 20)))
    (i32.const 0)))
"""


def module(mode: int, init: str = "") -> bytes:
    return bytes(wasmtime.wat2wasm(MODULE.replace("MODE", str(mode)).replace("INIT", init)))


def run_headers(runtime: Runtime, spec: PluginSpec) -> tuple[FilterHeadersStatus, FakeCallbacks]:
    filt = runtime.load_plugin(spec).create_filter()
    assert isinstance(filt, WasmHttpFilter)
    return run_request(filt)


def test_logging_inside_malloc_is_allowed(runtime: Runtime, logs: LogRecorder) -> None:
    status, callbacks = run_headers(runtime, PluginSpec(name="malloc-logs", module=module(0)))
    assert status == FilterHeadersStatus.CONTINUE
    assert callbacks.local_replies == []
    assert "malloc" in logs.messages()


def test_other_host_call_inside_malloc_fails_the_vm(runtime: Runtime, logs: LogRecorder) -> None:
    spec = PluginSpec(name="malloc-done", module=module(1), failure_policy=FailurePolicy.FAIL_CLOSE)
    status, callbacks = run_headers(runtime, spec)
    assert status == FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK
    assert [(r.status, r.details) for r in callbacks.local_replies] == [(503, "wasm_fail_stream")]
    reason = "restricted_callback"
    failures = runtime.metrics.host_counter(FAILURES_METRIC, plugin="malloc-done", reason=reason)
    assert failures == 1


def test_proxy_call_during_initialisation_refuses_the_plugin(runtime: Runtime) -> None:
    init = "(drop (call $set_tick (i32.const 1000)))"
    with pytest.raises(PluginLoadError) as caught:
        runtime.load_plugin(PluginSpec(name="init-tick", module=module(0, init)))
    message = str(caught.value)
    assert "\n" not in message
    call = "env.proxy_set_tick_period_milliseconds"
    assert f"restricted_callback: {call} called during module initialisation" in message


def test_logging_during_initialisation_is_allowed(runtime: Runtime, logs: LogRecorder) -> None:
    init = "(drop (call $log (i32.const 2) (i32.const 100) (i32.const 6)))"
    status, _ = run_headers(runtime, PluginSpec(name="init-logs", module=module(0, init)))
    assert status == FilterHeadersStatus.CONTINUE
