"""The Runtime: one per worker process. Loads plugins, shares VMs, applies failure policies."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wasmesh.runtime.abi import LogLevel
from wasmesh.runtime.contexts import PluginIdentity
from wasmesh.runtime.engine import Crossing, GuestFailure, ModuleLoadError, WasmEngine
from wasmesh.runtime.metrics import MetricsRegistry
from wasmesh.runtime.plugin import FailurePolicy, PluginLoadError, PluginSpec, WasmPlugin
from wasmesh.runtime.shared import PROCESS_SHARED_DATA, PROCESS_SHARED_QUEUES, SharedData, SharedQueues
from wasmesh.runtime.vm import HttpCaller, LogHandler, PluginVm, RuntimeServices, Scheduler, TimerHandle

logger = logging.getLogger("wasmesh.runtime")
plugin_logger = logging.getLogger("wasmesh.plugin")

FAILURES_METRIC = "wasmesh_plugin_failures_total"
RELOADS_METRIC = "wasmesh_plugin_reloads_total"

# A reloaded VM that serves this many maximum backoffs without failing is healthy again: the next
# failure reloads after the base backoff, not the maximum (Envoy resets its ReloadConfig backoff on
# a healthy VM too).
HEALTHY_RESET_PERIODS = 3
# FAIL_RELOAD waits double from the base backoff up to this many times it (Envoy's ReloadConfig
# default max_interval is 10x its base_interval).
MAX_BACKOFF_FACTOR = 10

_PY_LEVELS = {
    0: 5, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR, 5: logging.CRITICAL,
}


def _default_log_handler(plugin: str, level: int, message: str) -> None:
    plugin_logger.log(_PY_LEVELS.get(level, logging.INFO), "wasm log %s: %s", plugin, message)


class AsyncioScheduler:
    """Timers on the running asyncio loop (or the thread's default loop when none runs yet)."""

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> TimerHandle:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        return loop.call_later(delay_s, fn)


VmKey = tuple[str, str, bytes, tuple[tuple[str, str], ...], int, int]


@dataclass
class VmSlot:
    """A shared VM and the plugins running on it; replaced wholesale on FAIL_RELOAD."""

    key: VmKey
    spec: PluginSpec  # the VM-level settings (module, vm_config, env, limits) of the first plugin
    vm: PluginVm
    plugins: list[WasmPlugin] = field(default_factory=list)
    failure_reported: bool = False
    reload_attempts: int = 0  # FAIL_RELOAD reloads since the VM was last healthy for HEALTHY_RESET_PERIODS
    next_reload_at: float = 0.0
    healthy_since: float = 0.0  # when the current VM started serving (clock time)
    failed_at: float | None = None  # when the current VM failed; None while it is healthy


class Runtime:
    def __init__(
        self,
        http_caller: HttpCaller | None = None,
        scheduler: Scheduler | None = None,
        log_handler: LogHandler | None = None,
        compile_cache_dir: str | None = None,
        node: dict[str, Any] | None = None,
        *,
        log_level: LogLevel = LogLevel.INFO,
        startup_deadline_ms: int = 5000,
        reload_backoff_s: float = 1.0,
        epoch_tick_s: float = 0.05,
        crossing: Crossing | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock  # FAIL_RELOAD backoff and health periods; tests pass a manual clock
        self.engine = WasmEngine(compile_cache_dir, epoch_tick_s=epoch_tick_s, crossing=crossing)
        self.metrics = MetricsRegistry()
        self.shared_data: SharedData = PROCESS_SHARED_DATA
        self.shared_queues: SharedQueues = PROCESS_SHARED_QUEUES
        self.startup_deadline_ms = startup_deadline_ms
        self.reload_backoff_s = reload_backoff_s
        self.services = RuntimeServices(
            log_handler=log_handler or _default_log_handler,
            metrics=self.metrics,
            shared_data=self.shared_data,
            shared_queues=self.shared_queues,
            http_caller=http_caller,
            scheduler=scheduler or AsyncioScheduler(),
            node=dict(node or {}),
            log_level=log_level,
        )
        self._slots: dict[VmKey, VmSlot] = {}

    @property
    def log_level(self) -> LogLevel:
        return self.services.log_level

    @log_level.setter
    def log_level(self, level: LogLevel) -> None:
        self.services.log_level = level

    # -- loading ---------------------------------------------------------------------
    def _vm_key(self, spec: PluginSpec, digest: str) -> VmKey:
        return (spec.vm_id, digest, spec.vm_config, tuple(sorted(spec.env.items())),
                spec.memory_limit_bytes, spec.callback_deadline_ms)

    def _new_vm(self, spec: PluginSpec) -> PluginVm:
        """Compile/instantiate/initialise a VM for ``spec``; raises PluginLoadError (one line)."""
        try:
            compiled = self.engine.compile(spec.module, origin="module")
            vm = PluginVm(
                self.engine, compiled, vm_id=spec.vm_id, vm_config=spec.vm_config, env=spec.env,
                memory_limit_bytes=spec.memory_limit_bytes, services=self.services, label=spec.name,
                startup_deadline_ms=self.startup_deadline_ms, callback_deadline_ms=spec.callback_deadline_ms,
            )
        except ModuleLoadError as exc:
            raise PluginLoadError(f"plugin {spec.name}: {exc}") from None
        except GuestFailure as exc:
            raise PluginLoadError(f"plugin {spec.name}: instantiation failed: {exc}") from None
        try:
            vm.start()
        except GuestFailure as exc:
            vm.close()
            raise PluginLoadError(f"plugin {spec.name}: VM start-up failed ({exc.reason}): {exc}") from None
        vm.on_failure = self.report_failure
        return vm

    def _start_plugin(self, plugin: WasmPlugin, vm: PluginVm) -> None:
        spec = plugin.spec
        identity = PluginIdentity(spec.name, spec.root_id, spec.vm_id, spec.configuration, spec.vm_config)
        root = None
        try:
            root = vm.create_root(identity)
            ok, refused_by = vm.start_root(root)
        except GuestFailure as exc:
            raise PluginLoadError(f"plugin {spec.name}: start failed ({exc.reason}): {exc}") from None
        if not ok:
            try:
                vm.shutdown_root(root)
            except GuestFailure:
                pass
            raise PluginLoadError(f"plugin {spec.name}: {refused_by} returned false")
        plugin.root = root

    def load_plugin(self, spec: PluginSpec) -> WasmPlugin:
        """Load ``spec`` and return its filter factory; raises PluginLoadError (one line)."""
        if not isinstance(spec.module, bytes | bytearray):
            kind = type(spec.module).__name__
            raise PluginLoadError(f"plugin {spec.name}: module must be bytes, got {kind}")

        key = self._vm_key(spec, hashlib.sha256(spec.module).hexdigest())
        slot = self._slots.get(key)
        if slot is None:
            vm = self._new_vm(spec)
            slot = VmSlot(key, spec, vm, healthy_since=self.clock())
            plugin = WasmPlugin(self, spec, slot)
            try:
                self._start_plugin(plugin, vm)
            except PluginLoadError:
                vm.close()
                raise
            self._slots[key] = slot
        elif slot.vm.failure is not None:
            # A new config for a failed shared VM: every plugin on it moves to the fresh VM,
            # not only the new one (the others would keep root contexts of the closed VM).
            plugin = WasmPlugin(self, spec, slot)
            self._restart_slot(slot, [*slot.plugins, plugin])
        else:
            plugin = WasmPlugin(self, spec, slot)
            self._start_plugin(plugin, slot.vm)
        slot.plugins.append(plugin)
        return plugin

    def _restart_slot(self, slot: VmSlot, plugins: list[WasmPlugin]) -> None:
        """Replace the slot's failed VM by a fresh one on which every plugin in ``plugins`` has its
        own new root context; all or nothing: on a PluginLoadError the failed VM stays."""
        vm = self._new_vm(slot.spec)
        previous_roots = [plugin.root for plugin in plugins]
        try:
            for plugin in plugins:
                self._start_plugin(plugin, vm)
        except PluginLoadError:
            for plugin, root in zip(plugins, previous_roots, strict=True):
                plugin.root = root
            vm.close()
            raise
        self._replace_vm(slot, vm)

    def unload_plugin(self, factory: WasmPlugin) -> None:
        """Root on_done/on_delete; the VM is freed once no plugin uses it."""
        if factory.unloaded:
            return
        factory.unloaded = True
        slot = factory.slot
        root = factory.root
        # Only this plugin's own root, on the VM it lives on: a root of a VM since replaced is gone
        # with that VM (its id may be another plugin's on the new one).
        if root is not None and root.vm is slot.vm and not slot.vm.closed:
            try:
                slot.vm.shutdown_root(root)
            except GuestFailure as exc:
                self.report_failure(slot.vm, exc)
        if factory in slot.plugins:
            slot.plugins.remove(factory)
        if not slot.plugins:
            slot.vm.close()
            if self._slots.get(slot.key) is slot:
                del self._slots[slot.key]

    # -- failures ------------------------------------------------------------------------
    def _slot_of(self, vm: PluginVm) -> VmSlot | None:
        for slot in self._slots.values():
            if slot.vm is vm:
                return slot
        return None

    def report_failure(self, vm: PluginVm, failure: GuestFailure) -> None:
        """Count and log a VM failure once per healthy→failed transition, and free the failed VM.

        A failed VM is never called again (every path checks ``vm.failure`` first), so its store
        and linear memory are freed now rather than when it is replaced: a plugin that keeps
        filling its memory and trapping holds at most one VM's memory, whatever its policy.
        """
        if vm.failure is not None and not vm.closed and vm.idle:
            vm.close()
        slot = self._slot_of(vm)
        if slot is None or slot.failure_reported:
            return
        slot.failure_reported = True
        slot.failed_at = self.clock()
        names = [p.name for p in slot.plugins] or [vm.label]
        for name in names:
            self.metrics.inc_host_counter(
                FAILURES_METRIC, {"plugin": name, "reason": failure.reason},
                "Plugin VM failures (trap, deadline, memory_limit, host_error) by plugin",
            )
        policies = sorted({p.spec.failure_policy.value for p in slot.plugins})
        logger.error("plugin %s: VM failed (%s): %s; policy %s", ",".join(names), failure.reason, failure,
                     "/".join(policies))

    def _replace_vm(self, slot: VmSlot, vm: PluginVm) -> None:
        old = slot.vm
        slot.vm = vm
        slot.failure_reported = False
        slot.failed_at = None
        slot.healthy_since = self.clock()
        old.close()

    def try_reload(self, slot: VmSlot) -> bool:
        """FAIL_RELOAD: start a fresh VM (with backoff like Envoy's ReloadConfig); True if healthy."""
        if slot.vm.failure is None:
            return True
        now = self.clock()
        if now < slot.next_reload_at:
            return False
        max_backoff = MAX_BACKOFF_FACTOR * self.reload_backoff_s
        failed_at = slot.failed_at if slot.failed_at is not None else now
        if failed_at - slot.healthy_since >= HEALTHY_RESET_PERIODS * max_backoff:
            slot.reload_attempts = 0  # the VM was healthy long enough: this is a new run of failures
        slot.reload_attempts += 1
        slot.next_reload_at = now + self.reload_backoff(slot.reload_attempts)
        try:
            self._restart_slot(slot, list(slot.plugins))
        except PluginLoadError as exc:
            logger.error("reload failed: %s", exc)
            return False
        for plugin in slot.plugins:
            self.metrics.inc_host_counter(RELOADS_METRIC, {"plugin": plugin.name}, "Plugin VM reloads")
        logger.warning("plugin %s: VM reloaded", ",".join(p.name for p in slot.plugins))
        return True

    def reload_backoff(self, attempt: int) -> float:
        """The wait after the ``attempt``-th reload in a row: the base backoff doubling, at most
        MAX_BACKOFF_FACTOR times it (the exponent is capped first, so no attempt count overflows)."""
        doublings = min(max(attempt - 1, 0), MAX_BACKOFF_FACTOR.bit_length())
        return min(self.reload_backoff_s * (1 << doublings), MAX_BACKOFF_FACTOR * self.reload_backoff_s)

    # -- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        for slot in list(self._slots.values()):
            for plugin in list(slot.plugins):
                try:
                    self.unload_plugin(plugin)
                except Exception:  # closing must not stop at one misbehaving plugin
                    logger.exception("plugin %s: error while unloading", plugin.name)
        self._slots.clear()
        self.engine.close()


__all__ = ["Runtime", "FailurePolicy", "PluginSpec", "PluginLoadError", "VmSlot"]
