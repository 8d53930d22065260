"""wasmesh.runtime: a Proxy-Wasm host on wasmtime.

    rt = Runtime(http_caller=..., scheduler=..., log_handler=..., compile_cache_dir=..., node=...)
    factory = rt.load_plugin(PluginSpec(name="p", module=wasm_bytes, configuration=b"{}"))
    filt = factory.create_filter()      # an HttpFilter, or None (FAIL_OPEN skip)
    rt.unload_plugin(factory); rt.close()

Layers: engine (the only wasmtime user) → wasi + hostcalls (imports, written once
against contexts) → vm (lifecycle of one VM) → plugin (filters, failure policy) →
runtime (VM sharing, reloads, metrics).
"""

from wasmesh.runtime.abi import AbiVersion, LogLevel, WasmResult
from wasmesh.runtime.contexts import HttpCallResponse
from wasmesh.runtime.plugin import FailurePolicy, PluginLoadError, PluginSpec, WasmHttpFilter, WasmPlugin
from wasmesh.runtime.runtime import AsyncioScheduler, Runtime
from wasmesh.runtime.vm import HttpCaller, Scheduler, TimerHandle

__all__ = [
    "AbiVersion",
    "AsyncioScheduler",
    "FailurePolicy",
    "HttpCallResponse",
    "HttpCaller",
    "LogLevel",
    "PluginLoadError",
    "PluginSpec",
    "Runtime",
    "Scheduler",
    "TimerHandle",
    "WasmHttpFilter",
    "WasmPlugin",
    "WasmResult",
]
