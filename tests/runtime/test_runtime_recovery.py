"""Recovering from a failed VM: a new config for a shared VM moves every plugin on it to the fresh
VM, and FAIL_RELOAD's backoff stays bounded and resets once a VM has been healthy for a while."""

from __future__ import annotations

from pathlib import Path

from runtime_support import FakeCallbacks, build_module, request, slot

from wasmesh.http.filter import FilterHeadersStatus
from wasmesh.runtime import FailurePolicy, PluginSpec, Runtime
from wasmesh.runtime.plugin import FailClosedFilter, WasmHttpFilter, WasmPlugin
from wasmesh.runtime.runtime import RELOADS_METRIC

# Slot <root id> = the size of that root's plugin configuration (saved by on_configure); slot 8 = the
# root id the last stream context was created under. A stream created under a root this VM never
# configured traps, as SDKs do (Rust's proxy-wasm panics on an unknown root context).
SHARED = """
(func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32)
  (if (i32.eqz (local.get $parent)) (then (return)))
  (if (i32.eqz (i32.load (i32.add (i32.const 0x100) (i32.shl (local.get $parent) (i32.const 2)))))
    (then unreachable))
  (call $save (i32.const 8) (local.get $parent)))
(func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
  (call $save (local.get $root) (local.get $size)) (i32.const 1))
(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
  ;; trap when the request carries x-trap (0 = WasmResult::Ok, found)
  (if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x1000) (i32.const 6)
                                                 (i32.const 0x1100) (i32.const 0x1104)))
    (then unreachable))
  (i32.const 0))
"""
MODULE = build_module(SHARED, data={0x1000: b"x-trap"})


def serve(factory: WasmPlugin, trap: bool = False) -> tuple[FilterHeadersStatus, FakeCallbacks]:
    filt = factory.create_filter()
    assert isinstance(filt, WasmHttpFilter | FailClosedFilter)
    callbacks = FakeCallbacks()
    filt.set_callbacks(callbacks)
    status = filt.decode_headers(request(extra=[(b"x-trap", b"1")] if trap else []), True)
    filt.on_log()
    filt.on_destroy()
    return status, callbacks


def assert_serves_from_its_own_root(factory: WasmPlugin) -> None:
    status, callbacks = serve(factory)
    assert (status, callbacks.local_replies) == (FilterHeadersStatus.CONTINUE, [])
    root = factory.root
    assert root is not None and root.vm is factory.vm and factory.vm.contexts[root.id] is root
    assert root.identity.root_id == factory.spec.root_id
    assert root.identity.configuration == factory.spec.configuration
    assert slot(factory, 8) == root.id  # the guest created the stream under this plugin's root
    assert slot(factory, root.id) == len(factory.spec.configuration)  # … which it configured


def shared(name: str, root_id: str, configuration: bytes) -> PluginSpec:
    return PluginSpec(name=name, module=MODULE, root_id=root_id, vm_id="shared", configuration=configuration)


def test_a_new_config_for_a_failed_shared_vm_restarts_every_plugin_on_it(runtime: Runtime) -> None:
    first = runtime.load_plugin(shared("first", "first", b"1"))
    second = runtime.load_plugin(shared("second", "second", b"22"))
    failed_vm = first.vm
    assert second.vm is failed_vm
    _, callbacks = serve(first, trap=True)
    assert [r.status for r in callbacks.local_replies] == [503]
    assert failed_vm.failure is not None

    # The xDS update: "first" gets a new configuration; its old factory drains, then is unloaded.
    updated = runtime.load_plugin(shared("first", "first", b"333"))
    fresh_vm = updated.vm
    assert fresh_vm is not failed_vm and fresh_vm.failure is None and failed_vm.closed
    assert first.vm is fresh_vm and second.vm is fresh_vm
    roots = [p.root for p in (first, second, updated)]
    assert len({root.id for root in roots if root is not None}) == 3
    for factory in (updated, second, first):
        assert_serves_from_its_own_root(factory)

    runtime.unload_plugin(first)
    assert fresh_vm.failure is None and first.root is not None and first.root.id not in fresh_vm.contexts
    for factory in (updated, second):
        assert_serves_from_its_own_root(factory)


def test_unloading_a_plugin_whose_vm_was_replaced_touches_no_other_root(runtime: Runtime) -> None:
    # "first" stays on the failed VM if the fresh one refuses it; either way its unload must not
    # reach a root of another VM.
    first = runtime.load_plugin(shared("first", "first", b"1"))
    stale_root = first.root
    assert stale_root is not None
    _, _ = serve(first, trap=True)
    updated = runtime.load_plugin(shared("first", "first", b"4444"))
    assert updated.root is not None and first.root is not None
    assert stale_root.id in updated.vm.contexts  # the same id names another root on the fresh VM
    contexts_before = dict(updated.vm.contexts)
    first.root = stale_root  # as if "first" had not moved: its root is one of the closed VM
    runtime.unload_plugin(first)
    assert updated.vm.failure is None and updated.vm.contexts == contexts_before
    assert_serves_from_its_own_root(updated)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fail_reload_backoff_is_capped_and_recovers_after_1100_failures(tmp_path: Path) -> None:
    # The backoff is the same on both crossings: one is enough for 1,100 VMs.
    clock = ManualClock()
    runtime = Runtime(compile_cache_dir=str(tmp_path / "cc"), reload_backoff_s=1.0, clock=clock)
    try:
        factory = runtime.load_plugin(PluginSpec(name="flaky", module=MODULE, configuration=b"{}",
                                                 failure_policy=FailurePolicy.FAIL_RELOAD))  # fmt: skip
        for _ in range(1100):
            _, callbacks = serve(factory, trap=True)
            assert [r.status for r in callbacks.local_replies] == [503]
            clock.now += 10.0  # the cap: 10 x the 1 s base
        assert runtime.metrics.host_counter(RELOADS_METRIC, plugin="flaky") == 1099
        assert factory.slot.reload_attempts == 1099
        assert runtime.reload_backoff(factory.slot.reload_attempts) == 10.0
        assert runtime.reload_backoff(10**6) == 10.0

        # The cause is gone (no more x-trap): the plugin serves again.
        status, callbacks = serve(factory)
        assert (status, callbacks.local_replies) == (FilterHeadersStatus.CONTINUE, [])
        assert runtime.metrics.host_counter(RELOADS_METRIC, plugin="flaky") == 1100

        # Healthy for 3 maximum backoffs: the next failure reloads after the base backoff again.
        clock.now += 30.0
        serve(factory, trap=True)
        clock.now += 1.0
        status, callbacks = serve(factory)
        assert (status, callbacks.local_replies) == (FilterHeadersStatus.CONTINUE, [])
        assert factory.slot.reload_attempts == 1
    finally:
        runtime.close()


def test_reload_backoff_doubles_from_the_base_up_to_ten_times_it(tmp_path: Path) -> None:
    runtime = Runtime(compile_cache_dir=str(tmp_path / "cc"), reload_backoff_s=0.5)
    try:
        assert [runtime.reload_backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    finally:
        runtime.close()
