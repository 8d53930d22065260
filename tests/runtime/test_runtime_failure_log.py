"""A failed callback is logged as cpp-host logs it: ``Function: <export> failed: <cause>``, in one line."""

from __future__ import annotations

import logging
import re

import pytest
from runtime_support import build_module, run_request
from test_runtime_failures import spec

from wasmesh.runtime import FailurePolicy, PluginLoadError, PluginSpec, Runtime


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "wasmesh.runtime" and r.levelno == logging.ERROR]


def test_a_trap_is_logged_with_the_export_that_failed(
    runtime: Runtime, caplog: pytest.LogCaptureFixture,
) -> None:
    factory = runtime.load_plugin(spec("trap", FailurePolicy.FAIL_CLOSE))
    with caplog.at_level(logging.ERROR, logger="wasmesh.runtime"):
        run_request(factory.create_filter())
    [line] = failure_lines(caplog)
    assert re.fullmatch(
        r"plugin bad-trap: VM failed \(trap\): Function: proxy_on_request_headers failed: wasm trap: wasm"
        r" `unreachable` instruction executed \(in <unknown>!<wasm function \d+>\); policy FAIL_CLOSE",
        line,
    ), line
    assert factory.vm.failure is not None and factory.vm.failure.function == "proxy_on_request_headers"


def test_a_deadline_is_logged_with_the_export_that_failed(
    runtime: Runtime, caplog: pytest.LogCaptureFixture,
) -> None:
    factory = runtime.load_plugin(spec("deadline", FailurePolicy.FAIL_RELOAD))
    with caplog.at_level(logging.ERROR, logger="wasmesh.runtime"):
        run_request(factory.create_filter())
    assert failure_lines(caplog) == [
        "plugin bad-deadline: VM failed (deadline): Function: proxy_on_request_headers failed:"
        " exceeded its 100 ms CPU deadline; policy FAIL_RELOAD"
    ]


def test_a_refused_start_names_the_export_that_trapped(runtime: Runtime) -> None:
    body = '(func (export "proxy_on_context_create") (param i32 i32))\n' \
           '(func (export "proxy_on_configure") (param i32 i32) (result i32) unreachable)'
    expected = (r"^plugin cfg: start failed \(trap\): Function: proxy_on_configure failed: wasm trap:"
                r" wasm `unreachable`")
    with pytest.raises(PluginLoadError, match=expected):
        runtime.load_plugin(PluginSpec(name="cfg", module=build_module(body)))
