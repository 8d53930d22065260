"""Traps, CPU deadlines and memory caps become the failure policy; the process keeps serving."""

from __future__ import annotations

import pytest
from runtime_support import FakeCallbacks, build_module, request, run_request

from wasmesh.http.filter import FilterHeadersStatus
from wasmesh.runtime import FailurePolicy, PluginSpec, Runtime
from wasmesh.runtime.plugin import FailClosedFilter, WasmHttpFilter, WasmPlugin
from wasmesh.runtime.runtime import FAILURES_METRIC, RELOADS_METRIC

ROOT = """
(global $calls (mut i32) (i32.const 0))
(func (export "proxy_on_context_create") (param i32 i32))
(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
"""

# The first request's headers callback misbehaves; later ones are fine only on a fresh VM
# (the counter is VM state, so a reloaded VM starts misbehaving again from zero).
BEHAVIOURS = {
    "trap": "unreachable",
    "deadline": "(loop $forever (br $forever))",
    "memory_limit": """(block $done (loop $grow
        (br_if $done (i32.eq (memory.grow (i32.const 16)) (i32.const -1))) (br $grow))) unreachable""",
}


def misbehaving_module(behaviour: str) -> bytes:
    body = ROOT + f"""
(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
  (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
  (if (i32.eq (global.get $calls) (i32.const 1)) (then {BEHAVIOURS[behaviour]}))
  (i32.const 0))
"""
    return build_module(body)


def spec(behaviour: str, policy: FailurePolicy) -> PluginSpec:
    return PluginSpec(name=f"bad-{behaviour}", module=misbehaving_module(behaviour), failure_policy=policy,
                      callback_deadline_ms=100, memory_limit_bytes=4 << 20)


@pytest.mark.parametrize("behaviour", ["trap", "deadline", "memory_limit"])
def test_fail_close_answers_503_and_keeps_failing_closed(runtime: Runtime, behaviour: str) -> None:
    factory = runtime.load_plugin(spec(behaviour, FailurePolicy.FAIL_CLOSE))
    status, callbacks = run_request(factory.create_filter())
    assert status == FilterHeadersStatus.STOP_ALL_ITERATION_AND_WATERMARK
    assert [(r.status, r.details) for r in callbacks.local_replies] == [(503, "wasm_fail_stream")]
    assert runtime.metrics.host_counter(FAILURES_METRIC, plugin=factory.name, reason=behaviour) == 1
    status, callbacks = run_request(factory.create_filter())
    assert [(r.status, r.details) for r in callbacks.local_replies] == [(503, "wasm_fail_stream")]
    assert runtime.metrics.host_counter(FAILURES_METRIC, plugin=factory.name, reason=behaviour) == 1
    assert f'{FAILURES_METRIC}{{plugin="{factory.name}",reason="{behaviour}"}} 1' in (
        runtime.metrics.render_prometheus())


def test_fail_open_lets_the_failing_stream_through_then_skips_the_plugin(runtime: Runtime) -> None:
    factory = runtime.load_plugin(spec("trap", FailurePolicy.FAIL_OPEN))
    status, callbacks = run_request(factory.create_filter())
    assert status == FilterHeadersStatus.CONTINUE and callbacks.local_replies == []
    assert factory.create_filter() is None


def test_fail_reload_answers_each_failing_stream_503_and_reloads_before_the_next(runtime: Runtime) -> None:
    factory = runtime.load_plugin(spec("trap", FailurePolicy.FAIL_RELOAD))
    vms, replies = [], []
    for _ in range(3):
        # Each fresh VM's counter starts at zero, so its first request traps too.
        _, callbacks = run_request(factory.create_filter())
        vms.append(factory.vm)
        replies.append([(r.status, r.details) for r in callbacks.local_replies])
    assert replies == [[(503, "wasm_fail_stream")]] * 3
    assert vms[0] is not vms[1] and vms[1] is not vms[2] and vms[0] is not vms[2]
    assert factory.vm.failure is not None and factory.vm.failure.reason == "trap"
    assert runtime.metrics.host_counter(RELOADS_METRIC, plugin=factory.name) == 2  # before requests 2 and 3


TRAP_ON_HEADER = ROOT + """
(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
  ;; trap when the request carries x-trap (0 = WasmResult::Ok, found)
  (if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x1000) (i32.const 6)
                                                 (i32.const 0x1100) (i32.const 0x1104)))
    (then unreachable))
  (i32.const 0))
"""


def request_through(factory: WasmPlugin, extra: list[tuple[bytes, bytes]]) -> tuple[object, FakeCallbacks]:
    filt = factory.create_filter()
    assert isinstance(filt, WasmHttpFilter | FailClosedFilter)
    callbacks = FakeCallbacks()
    filt.set_callbacks(callbacks)
    status = filt.decode_headers(request(extra=extra), True)
    filt.on_log()
    filt.on_destroy()
    return status, callbacks


def test_fail_reload_serves_the_next_request_from_a_fresh_vm(runtime: Runtime) -> None:
    module = build_module(TRAP_ON_HEADER, data={0x1000: b"x-trap"})
    factory = runtime.load_plugin(PluginSpec(name="trap-on-header", module=module,
                                             failure_policy=FailurePolicy.FAIL_RELOAD))  # fmt: skip
    first_vm = factory.vm
    _, callbacks = request_through(factory, [(b"x-trap", b"1")])
    assert [(r.status, r.details) for r in callbacks.local_replies] == [(503, "wasm_fail_stream")]
    assert factory.vm is first_vm and first_vm.failure is not None and first_vm.failure.reason == "trap"
    assert runtime.metrics.host_counter(RELOADS_METRIC, plugin=factory.name) == 0  # reloads are lazy

    status, callbacks = request_through(factory, [])
    assert status == FilterHeadersStatus.CONTINUE and callbacks.local_replies == []
    assert factory.vm is not first_vm and factory.vm.failure is None
    assert runtime.metrics.host_counter(RELOADS_METRIC, plugin=factory.name) == 1

    status, callbacks = request_through(factory, [])
    assert status == FilterHeadersStatus.CONTINUE and callbacks.local_replies == []
    assert runtime.metrics.host_counter(RELOADS_METRIC, plugin=factory.name) == 1  # a healthy VM stays


def test_python_exception_in_a_host_call_becomes_a_trap(runtime: Runtime) -> None:
    def explode(plugin: str, level: int, message: str) -> None:
        raise RuntimeError("log sink down")

    runtime.services.log_handler = explode
    body = ROOT + """
(data (i32.const 0x1000) "hi")
(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
  (drop (call $proxy_log (i32.const 2) (i32.const 0x1000) (i32.const 2))) (i32.const 0))
"""
    factory = runtime.load_plugin(PluginSpec(name="logger", module=build_module(body)))
    _, callbacks = run_request(factory.create_filter())
    assert [r.status for r in callbacks.local_replies] == [503]
    assert factory.vm.failure is not None and factory.vm.failure.reason == "host_error"
    assert "log sink down" in str(factory.vm.failure)


def test_deadline_at_startup_is_a_load_error(tmp_path: object) -> None:
    from wasmesh.runtime import PluginLoadError

    rt = Runtime(compile_cache_dir=str(tmp_path), startup_deadline_ms=100)
    try:
        body = ROOT + '(func (export "_initialize") (loop $l (br $l)))'
        with pytest.raises(PluginLoadError, match=r"start-up failed \(deadline\)"):
            rt.load_plugin(PluginSpec(name="spin", module=build_module(body)))
    finally:
        rt.close()
