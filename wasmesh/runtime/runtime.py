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
    reload_attempts: int = 0
    next_reload_at: float = 0.0


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
    ) -> None:
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
        created = False
        if slot is None or slot.vm.failure is not None:
            vm = self._new_vm(spec)
            if slot is None:
                slot = VmSlot(key, spec, vm)
                created = True
            else:
                self._replace_vm(slot, vm)
        plugin = WasmPlugin(self, spec, slot)
        try:
            self._start_plugin(plugin, slot.vm)
        except PluginLoadError:
            if created:
                slot.vm.close()
            raise
        slot.plugins.append(plugin)
        self._slots[key] = slot
        return plugin

    def unload_plugin(self, factory: WasmPlugin) -> None:
        """Root on_done/on_delete; the VM is freed once no plugin uses it."""
        if factory.unloaded:
            return
        factory.unloaded = True
        slot = factory.slot
        if factory.root is not None:
            try:
                slot.vm.shutdown_root(factory.root)
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
        """Count and log a VM failure once per healthy→failed transition."""
        slot = self._slot_of(vm)
        if slot is None or slot.failure_reported:
            return
        slot.failure_reported = True
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
        old.close()

    def try_reload(self, slot: VmSlot) -> bool:
        """FAIL_RELOAD: start a fresh VM (with backoff like Envoy's ReloadConfig); True if healthy."""
        if slot.vm.failure is None:
            return True
        now = time.monotonic()
        if now < slot.next_reload_at:
            return False
        slot.reload_attempts += 1
        backoff = min(self.reload_backoff_s * (2 ** (slot.reload_attempts - 1)), 10 * self.reload_backoff_s)
        slot.next_reload_at = now + backoff
        try:
            vm = self._new_vm(slot.spec)
            for plugin in slot.plugins:
                self._start_plugin(plugin, vm)
        except PluginLoadError as exc:
            logger.error("reload failed: %s", exc)
            return False
        self._replace_vm(slot, vm)
        for plugin in slot.plugins:
            self.metrics.inc_host_counter(RELOADS_METRIC, {"plugin": plugin.name}, "Plugin VM reloads")
        logger.warning("plugin %s: VM reloaded", ",".join(p.name for p in slot.plugins))
        return True

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
