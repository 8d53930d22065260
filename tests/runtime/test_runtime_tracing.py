"""At trace level every call between host and VM is logged with its arguments, as cpp-host does;
below it a VM runs the untraced crossing (decided when the VM is created)."""

from __future__ import annotations

import logging

import pytest
from runtime_support import build_module, run_request

from wasmesh.runtime import PluginSpec, Runtime
from wasmesh.runtime import engine as engine_module
from wasmesh.runtime.vm import TRACE

BODY = """
(data (i32.const 0x1000) "hi")
(func (export "proxy_on_context_create") (param i32 i32))
(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
  (drop (call $proxy_log (i32.const 2) (i32.const 0x1000) (i32.const 2))) (i32.const 0))
"""


def test_trace_level_logs_each_guest_call_and_host_call(
    runtime: Runtime, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(TRACE, logger="wasmesh.runtime"):
        factory = runtime.load_plugin(PluginSpec(name="traced", module=build_module(BODY)))
        caplog.clear()
        run_request(factory.create_filter())
    lines = [r.getMessage() for r in caplog.records if r.levelno == TRACE]
    assert lines == [
        "traced: [host->vm] proxy_on_context_create(2, 1)",
        "traced: [host<-vm] proxy_on_context_create return: void",
        "traced: [host->vm] proxy_on_request_headers(2, 4, 1)",
        "traced: [vm->host] env.proxy_log(2, 4096, 2)",
        "traced: [vm<-host] env.proxy_log return: 0",
        "traced: [host<-vm] proxy_on_request_headers return: 0",
    ]


def test_below_trace_level_the_vm_runs_the_untraced_crossing(
    runtime: Runtime, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="wasmesh.runtime"):
        factory = runtime.load_plugin(PluginSpec(name="quiet", module=build_module(BODY)))
        run_request(factory.create_filter())
    vm = factory.vm
    assert vm.traced is False
    c_crossing = runtime.engine.crossing == "c"
    untraced = engine_module._FASTPATH.call if c_crossing else engine_module._call_unchecked
    assert vm.instance.functions
    assert all(fn._call_raw is untraced for fn in vm.instance.functions.values())
    # Each import calls the host implementation itself: HostCalls's (or WASI's) own bound method.
    impls = [item[0] for item in vm.instance._keepalive if isinstance(item, tuple) and len(item) == 6]
    if c_crossing:
        assert impls and all(getattr(impl, "__self__", None) is not None for impl in impls)
        assert vm.hostcalls.proxy_log in impls
    assert [r for r in caplog.records if r.levelno == TRACE] == []


def test_a_vm_created_at_trace_level_traces_its_start_up_calls(
    runtime: Runtime, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(TRACE, logger="wasmesh.runtime"):
        spec = PluginSpec(name="alloc", module=build_module(BODY), configuration=b"{}")
        factory = runtime.load_plugin(spec)
    assert factory.vm.traced is True
    lines = [r.getMessage() for r in caplog.records if r.levelno == TRACE]
    assert "alloc: [host->vm] proxy_on_configure(1, 2)" in lines
