"""Review findings on closing a plugin VM (PluginVm.close) after the hot-path work.

* Filters resolve their guest exports once (StreamExports); closing the VM frees the instance's
  host callbacks, so a filter that outlived its VM crashed the process when its callback made a
  host call (before, a lookup by name found nothing once the VM was closed).
* Workers gc.freeze() everything built at start-up, plugin VMs included: a VM that is only freed
  by the cyclic GC then stays in memory (guest memory and all) after it is unloaded.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import wasmtime

from wasmesh.runtime import PluginSpec, Runtime

# on_request_headers makes a host call (proxy_log): that is what reaches a freed callback.
LOGGING_PLUGIN = """(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "hello")
  (global $heap (mut i32) (i32.const 0x8000))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $log (i32.const 2) (i32.const 100) (i32.const 5)))
    (i32.const 0)))
"""


def test_review_filter_outliving_its_vm_does_not_crash_the_process(tmp_path: Path) -> None:
    # In a child process: the failure this guards against is a segmentation fault.
    script = textwrap.dedent(
        f"""
        import gc, sys, wasmtime
        from wasmesh.http.headers import HeaderMap
        from wasmesh.runtime import LogLevel, PluginSpec, Runtime

        class NoTimers:
            def call_later(self, delay, fn):
                raise AssertionError("no timers here")

        runtime = Runtime(scheduler=NoTimers(), log_handler=lambda *a: None,
                          compile_cache_dir={str(tmp_path / "cc")!r}, log_level=LogLevel.TRACE)
        module = bytes(wasmtime.wat2wasm({LOGGING_PLUGIN!r}))
        plugin = runtime.load_plugin(PluginSpec(name="p", module=module))
        late_filter = plugin.create_filter()
        runtime.unload_plugin(plugin)  # the VM is closed: its host callbacks are freed
        gc.collect()
        status = late_filter.decode_headers(HeaderMap([(b":path", b"/")]), True)
        late_filter.on_log()
        late_filter.on_destroy()
        print("survived", int(status))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "survived 0" in done.stdout


def test_review_unloaded_vm_is_freed_without_the_cyclic_gc(runtime: Runtime) -> None:
    plugin = runtime.load_plugin(PluginSpec(name="p", module=bytes(wasmtime.wat2wasm(LOGGING_PLUGIN))))
    vm_ref = weakref.ref(plugin.slot.vm)
    instance_ref = weakref.ref(plugin.slot.vm.instance)
    was_enabled = gc.isenabled()
    gc.disable()  # as for objects a worker froze at start-up: reference counting alone must do
    try:
        runtime.unload_plugin(plugin)
        del plugin
        assert vm_ref() is None, "the closed PluginVm is kept alive by a reference cycle"
        assert instance_ref() is None, "the closed VM's WasmInstance (its store and memory) is kept alive"
    finally:
        if was_enabled:
            gc.enable()
