"""A trap outside any filter call (on_tick, on_queue_ready, on_http_call_response) fails the VM and
reaches the plugin's failure policy, as a trap in a stream callback does; and vmConfig.env reaches the
plugin through WASI environ_sizes_get/environ_get.

The modules are WAT (runtime_support.build_module); tests/differential/test_differential_callbacks.py
runs the same cases against Envoy 1.40 with tests/plugins/c/callbacks.c.
"""

from __future__ import annotations

import pytest
from runtime_support import (
    FakeCallbacks,
    ManualScheduler,
    RecordingHttpCaller,
    build_module,
    request,
    run_request,
    slot,
)

from wasmesh.http.filter import FilterHeadersStatus
from wasmesh.http.headers import HeaderMap
from wasmesh.runtime import FailurePolicy, HttpCallResponse, PluginSpec, Runtime
from wasmesh.runtime.pairs import encode_pairs
from wasmesh.runtime.plugin import FailClosedFilter, WasmHttpFilter, WasmPlugin
from wasmesh.runtime.runtime import FAILURES_METRIC, RELOADS_METRIC

QUEUE = b"trap-queue"
CALL_HEADERS = encode_pairs([(b":method", b"GET"), (b":path", b"/call"), (b":authority", b"auth")])
CLUSTER = b"auth"  # RecordingHttpCaller's known cluster (conftest)

# Data at 0x400: queue name, cluster name, call headers. Slot 0 counts the requests this VM saw, so a
# fresh VM (FAIL_RELOAD) is visible as a count that restarted.
DATA = {0x400: QUEUE, 0x440: CLUSTER, 0x480: CALL_HEADERS}

COMMON = f"""
(func (export "proxy_on_context_create") (param i32 i32))
(func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
(func (export "proxy_on_configure") (param i32 i32) (result i32)
  (drop (call $proxy_set_tick_period_milliseconds (i32.const 10)))
  (drop (call $proxy_register_shared_queue (i32.const 0x400) (i32.const {len(QUEUE)}) (i32.const 0x300)))
  (i32.const 1))
"""

# Each callback traps; the request path pauses on an http_call for the "http_call" case only.
TRAPS = {
    "on_tick": '(func (export "proxy_on_tick") (param i32) unreachable)',
    "on_queue_ready": '(func (export "proxy_on_queue_ready") (param i32 i32) unreachable)',
    "on_http_call_response": """(func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
      unreachable)""",
}


def module(trap_in: str) -> bytes:
    call = trap_in == "on_http_call_response"
    headers = f"""
(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
  (call $save (i32.const 0) (i32.add (i32.load (i32.const 0x100)) (i32.const 1)))
  {f'''(drop (call $proxy_http_call (i32.const 0x440) (i32.const {len(CLUSTER)}) (i32.const 0x480)
     (i32.const {len(CALL_HEADERS)}) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000)
     (i32.const 0x304)))
  (i32.const 1)''' if call else "(i32.const 0)"})
"""
    return build_module(COMMON + TRAPS[trap_in] + headers, data=DATA)


def load(runtime: Runtime, trap_in: str, policy: FailurePolicy) -> WasmPlugin:
    spec = PluginSpec(name=f"trap-{trap_in}", module=module(trap_in), failure_policy=policy)
    return runtime.load_plugin(spec)


def trap(
    runtime: Runtime, plugin: WasmPlugin, trap_in: str, scheduler: ManualScheduler,
    http_caller: RecordingHttpCaller,
) -> None:  # fmt: skip
    """Make the VM trap in ``trap_in``, from outside any filter call."""
    if trap_in == "on_tick":
        scheduler.advance(0.01)
    elif trap_in == "on_queue_ready":
        token = runtime.shared_queues.resolve("", QUEUE.decode())
        assert token is not None
        runtime.shared_queues.enqueue(token, b"item")
        scheduler.advance(0)
    else:
        http_caller.calls[-1].on_response(HttpCallResponse(HeaderMap([(b":status", b"200")]), b"answer"))


def failures(runtime: Runtime, plugin: WasmPlugin) -> int | None:
    return runtime.metrics.host_counter(FAILURES_METRIC, plugin=plugin.name, reason="trap")


@pytest.mark.parametrize("trap_in", list(TRAPS))
def test_fail_close_after_an_async_trap_answers_503(
    runtime: Runtime, scheduler: ManualScheduler, http_caller: RecordingHttpCaller, trap_in: str
) -> None:
    plugin = load(runtime, trap_in, FailurePolicy.FAIL_CLOSE)
    status, callbacks = run_request(plugin.create_filter())
    paused = trap_in == "on_http_call_response"  # waits for the call's answer
    assert status == (FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK if paused
                      else FilterHeadersStatus.CONTINUE)  # fmt: skip
    assert callbacks.local_replies == []
    trap(runtime, plugin, trap_in, scheduler, http_caller)
    assert plugin.vm.failure is not None and plugin.vm.failure.reason == "trap"
    assert failures(runtime, plugin) == 1
    assert isinstance(plugin.create_filter(), FailClosedFilter)


@pytest.mark.parametrize("trap_in", list(TRAPS))
def test_fail_open_after_an_async_trap_skips_the_plugin(
    runtime: Runtime, scheduler: ManualScheduler, http_caller: RecordingHttpCaller, trap_in: str
) -> None:
    plugin = load(runtime, trap_in, FailurePolicy.FAIL_OPEN)
    run_request(plugin.create_filter())
    trap(runtime, plugin, trap_in, scheduler, http_caller)
    assert failures(runtime, plugin) == 1
    assert plugin.create_filter() is None


@pytest.mark.parametrize("trap_in", list(TRAPS))
def test_fail_reload_after_an_async_trap_serves_from_a_fresh_vm(
    runtime: Runtime, scheduler: ManualScheduler, http_caller: RecordingHttpCaller, trap_in: str
) -> None:
    plugin = load(runtime, trap_in, FailurePolicy.FAIL_RELOAD)
    run_request(plugin.create_filter())
    run_request(plugin.create_filter())
    assert slot(plugin, 0) == 2
    failed_vm = plugin.vm
    trap(runtime, plugin, trap_in, scheduler, http_caller)
    assert failed_vm.failure is not None and failures(runtime, plugin) == 1
    fresh = plugin.create_filter()
    assert isinstance(fresh, WasmHttpFilter) and plugin.vm is not failed_vm and plugin.vm.failure is None
    run_request(fresh)
    assert slot(plugin, 0) == 1
    assert runtime.metrics.host_counter(RELOADS_METRIC, plugin=plugin.name) == 1


def test_a_stream_in_flight_when_the_vm_fails_gets_the_failure_reply(
    runtime: Runtime, scheduler: ManualScheduler, http_caller: RecordingHttpCaller
) -> None:
    """The module exports no response callbacks; the stream still finds its VM failed (cpp-host's
    CHECK_FAIL runs before looking for the callback) and is answered 503 under FAIL_CLOSE."""
    plugin = load(runtime, "on_queue_ready", FailurePolicy.FAIL_CLOSE)
    filt = plugin.create_filter()
    assert isinstance(filt, WasmHttpFilter)
    callbacks = FakeCallbacks()
    filt.set_callbacks(callbacks)
    assert filt.decode_headers(request(), True) == FilterHeadersStatus.CONTINUE
    trap(runtime, plugin, "on_queue_ready", scheduler, http_caller)
    response = HeaderMap([(b":status", b"200")])
    assert filt.encode_headers(response, True) == FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK
    assert [(r.status, r.details) for r in callbacks.local_replies] == [(503, "wasm_fail_stream")]
    filt.on_log()
    filt.on_destroy()
    assert len(callbacks.local_replies) == 1


def test_an_async_trap_under_fail_open_lets_the_stream_in_flight_continue(
    runtime: Runtime, scheduler: ManualScheduler, http_caller: RecordingHttpCaller
) -> None:
    plugin = load(runtime, "on_queue_ready", FailurePolicy.FAIL_OPEN)
    filt = plugin.create_filter()
    assert isinstance(filt, WasmHttpFilter)
    callbacks = FakeCallbacks()
    filt.set_callbacks(callbacks)
    filt.decode_headers(request(), True)
    trap(runtime, plugin, "on_queue_ready", scheduler, http_caller)
    assert filt.encode_headers(HeaderMap([(b":status", b"200")]), True) == FilterHeadersStatus.CONTINUE
    assert callbacks.local_replies == []


# ----------------------------------------------------------------------------------- vmConfig.env

ENVIRON = """
(import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
"""

# on_request_headers: count and size into slots 0 and 1, then the environment block at 0x2000 (the
# pointers at 0x1000) and its first pointer into slot 2, relative to the block.
ENV_READER = """
(func (export "proxy_on_context_create") (param i32 i32))
(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
  (drop (call $environ_sizes_get (i32.const 0x100) (i32.const 0x104)))
  (drop (call $environ_get (i32.const 0x1000) (i32.const 0x2000)))
  (call $save (i32.const 2) (i32.sub (i32.load (i32.const 0x1000)) (i32.const 0x2000)))
  (i32.const 0))
"""


def test_vm_env_reaches_environ_sizes_get_and_environ_get(runtime: Runtime) -> None:
    env = {"GREETING": "hello", "EMPTY": ""}
    spec = PluginSpec(name="env-reader", module=build_module(ENV_READER, wasi_imports=ENVIRON), env=env)
    plugin = runtime.load_plugin(spec)
    run_request(plugin.create_filter())
    block = b"GREETING=hello\0EMPTY=\0"
    assert (slot(plugin, 0), slot(plugin, 1), slot(plugin, 2)) == (2, len(block), 0)
    assert plugin.vm.instance.read(0x2000, len(block)) == block
    second_pointer = plugin.vm.instance.read_u32(0x1004)
    assert second_pointer == 0x2000 + len(b"GREETING=hello\0")


def test_no_vm_env_means_an_empty_environment(runtime: Runtime) -> None:
    spec = PluginSpec(name="env-reader", module=build_module(ENV_READER, wasi_imports=ENVIRON))
    plugin = runtime.load_plugin(spec)
    run_request(plugin.create_filter())
    assert (slot(plugin, 0), slot(plugin, 1)) == (0, 0)
