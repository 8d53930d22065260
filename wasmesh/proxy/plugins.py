"""WasmPlugin resources → a listener's ordered chain of runtime filter factories.

The thin adapter between the proxy and its neighbours: ``wasmesh.api`` parses and
orders the resources (Istio's order: AUTHN, AUTHZ, STATS, UNSPECIFIED; priority
descending; creation time; name), ``wasmesh.agent`` fetches modules into the
verified cache (file://, http(s)://, oci://), ``wasmesh.runtime`` loads them.
Also home of ``ClusterHttpCaller``, the runtime's HttpCaller over the proxy's clusters.

Decisions where Istio is silent for a standalone proxy: a plugin's ``match`` ports are
compared with the listener port (mode is ignored); ``selector``/``targetRefs`` are
ignored (every listener is "the workload"); NETWORK plugins are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from wasmesh.http.filter_manager import upstream_failure_body
from wasmesh.http.headers import HeaderMap
from wasmesh.proxy.chain import PluginChain
from wasmesh.proxy.config import CacheConfig, ListenerConfig, PluginResource, WasmLimits
from wasmesh.proxy.http1 import encode_request_head
from wasmesh.proxy.upstream import ClusterManager, UpstreamConnection

if TYPE_CHECKING:
    from wasmesh.agent.cache import ModuleCache
    from wasmesh.api.model import WasmPlugin
    from wasmesh.http.filter import HttpFilterFactory
    from wasmesh.runtime.plugin import PluginSpec
    from wasmesh.runtime.plugin import WasmPlugin as WasmFilterFactory
    from wasmesh.runtime.runtime import Runtime

log = logging.getLogger("wasmesh.proxy.plugins")
plugin_log = logging.getLogger("wasmesh.plugin")

# Proxy-Wasm log levels (trace..critical) → Python logging levels.
_LEVELS = (5, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


class PluginChainError(Exception):
    """A chain could not be built; the message is one line naming the plugin (and file) at fault."""


def plugin_log_handler(plugin: str, level: int, message: str) -> None:
    plugin_log.log(_LEVELS[level] if 0 <= level < len(_LEVELS) else logging.INFO, "[%s] %s", plugin, message)


def parse_resources(resources: Sequence[PluginResource]) -> list[WasmPlugin]:
    """Typed WasmPlugins from raw documents; PluginChainError (one line) on the first bad one."""
    from wasmesh.api.load import Document
    from wasmesh.api.parse import parse_wasmplugin

    out: list[WasmPlugin] = []
    for r in resources:
        source = Path(r.source)
        doc = Document(
            kind=str(r.body.get("kind", "")),
            apiVersion=str(r.body.get("apiVersion", "")),
            body=r.body,
            source_file=source,
            doc_index=r.doc_index + 1,
        )
        try:
            out.append(
                parse_wasmplugin(doc, resolve_relative_to=source.parent if r.source != "<inline>" else None)
            )
        except ValueError as exc:
            raise PluginChainError(" ".join(str(exc).split())) from None
    return out


def select_for_listener(plugins: Sequence[WasmPlugin], listener: ListenerConfig) -> list[WasmPlugin]:
    """The listener's plugins in Istio's chain order."""
    from wasmesh.api.model import PluginType
    from wasmesh.api.ordering import order_chain

    chosen: list[WasmPlugin] = []
    for p in plugins:
        if p.effective_type == PluginType.NETWORK:
            continue
        if (
            listener.plugins is not None
            and p.name not in listener.plugins
            and (f"{p.namespace}/{p.name}" not in listener.plugins)
        ):
            continue
        if p.match and not any(
            not sel.ports or any(port.number == listener.port for port in sel.ports) for sel in p.match
        ):
            continue
        chosen.append(p)
    return order_chain(chosen)


def one_line(exc: BaseException) -> str:
    """An exception's message folded onto one line (its type name when it has no message)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def vm_env(inline: Iterable[tuple[str, str]], host_env_keys: Iterable[str]) -> dict[str, str]:
    """A VM's environment: the inline values, plus the listed keys copied from the proxy's own env."""
    env = dict(inline)
    for key in host_env_keys:
        if key in os.environ:
            env[key] = os.environ[key]
    return env


class RuntimeChainBuilder:
    """What every chain builder shares: one worker's Runtime (its own VMs) and verified module cache,
    http_call over the proxy's clusters, and a chain's plugins loaded and unloaded as one unit.
    `limits` (the proxy's ``wasm:`` section / --wasm-* flags) bound every VM it starts: the Runtime's
    start-up deadline and FAIL_RELOAD backoff here, each PluginSpec's deadline and memory in subclasses.

    Subclasses turn their own input (WasmPlugin documents, xDS filter specs) into PluginSpecs
    and hand the loaded factories to `assemble_chain`.
    """

    def __init__(
        self,
        *,
        node: dict[str, Any],
        cache: CacheConfig | None,
        clusters: Callable[[], ClusterManager | None],
        compile_cache_dir: str | None = None,
        limits: WasmLimits | None = None,
    ) -> None:
        self._node = node
        self.limits = limits or WasmLimits()
        self._cache_config = cache or CacheConfig()
        self._compile_cache_dir = compile_cache_dir
        self.http_caller = ClusterHttpCaller(clusters)
        self._runtime: Runtime | None = None
        self._module_cache: ModuleCache | None = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            from wasmesh.runtime.runtime import Runtime

            self._runtime = Runtime(
                http_caller=self.http_caller,
                log_handler=plugin_log_handler,
                compile_cache_dir=self._compile_cache_dir,
                node=self._node,
                startup_deadline_ms=self.limits.startup_deadline_ms,
                reload_backoff_s=self.limits.reload_backoff_s,
            )
        return self._runtime

    def module_cache(self) -> ModuleCache:
        if self._module_cache is None:
            from wasmesh.agent.cache import ModuleCache
            from wasmesh.agent.options import CacheOptions

            insecure = frozenset(self._cache_config.insecure_registries)
            allowed = tuple(Path(d) for d in self._cache_config.allowed_file_dirs)
            options = (
                CacheOptions(
                    dir=Path(self._cache_config.dir), insecure_registries=insecure, allowed_file_dirs=allowed
                )
                if self._cache_config.dir is not None
                else CacheOptions(insecure_registries=insecure, allowed_file_dirs=allowed)
            )
            self._module_cache = ModuleCache(options)
        return self._module_cache

    def load_plugin(self, spec: PluginSpec, on_error: Callable[[str], Exception]) -> HttpFilterFactory:
        """The runtime's factory for `spec`; a load failure (or a plugin bug we must not crash on)
        becomes `on_error(one-line reason)`."""
        try:
            return self.runtime.load_plugin(spec)
        except Exception as exc:  # noqa: BLE001 - PluginLoadError or anything a plugin start raises
            raise on_error(one_line(exc)) from None

    def assemble_chain(
        self,
        factories: Iterable[HttpFilterFactory],
        generation: int,
        description: Sequence[dict[str, object]],
    ) -> PluginChain:
        """A chain of `factories` in order. They may be produced lazily (a generator that loads
        plugins): if producing one raises, those already loaded are unloaded before re-raising."""
        loaded: list[HttpFilterFactory] = []
        try:
            for factory in factories:
                loaded.append(factory)
        except BaseException:
            self._unload_all(loaded)
            raise
        return PluginChain(
            loaded,
            generation=generation,
            on_drained=lambda chain: self._unload_all(chain.factories),
            description=description,
        )

    def _unload_all(self, factories: Iterable[HttpFilterFactory]) -> None:
        for factory in factories:
            self._unload(factory)

    def _unload(self, factory: HttpFilterFactory) -> None:
        try:
            self.runtime.unload_plugin(cast("WasmFilterFactory", factory))
        except Exception:
            log.exception("unloading plugin %s failed", factory.name)

    def render_metrics(self) -> str:
        if self._runtime is None:
            return ""
        return self._runtime.metrics.render_prometheus()

    def close(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None


class WasmChainBuilder(RuntimeChainBuilder):
    """Builds plugin chains from WasmPlugin documents for one worker (`ProxyServer`'s ChainBuilder)."""

    async def fetch_module(self, plugin: WasmPlugin) -> bytes:
        url = plugin.normalized_url
        where = f"{plugin.source_file}: " if plugin.source_file else ""
        try:
            if url.startswith("file://") and not plugin.sha256 and not self._cache_config.allowed_file_dirs:
                # Local development loop: read the file directly (no cache copy needed). With
                # cache.allowed_file_dirs the fetcher reads it, so the directory check applies.
                return await asyncio.to_thread(Path(url[len("file://") :]).read_bytes)
            path = await self.module_cache().get(
                url,
                sha256=plugin.sha256,
                pull_policy=plugin.effective_pull_policy.name,
                resource_name=plugin.ecds_resource_name,
            )
            return await asyncio.to_thread(Path(path).read_bytes)
        except Exception as exc:  # noqa: BLE001 - any fetch failure is reported as one line
            name = f"{plugin.namespace}.{plugin.name}"
            raise PluginChainError(f"{where}plugin {name}: cannot fetch {url}: {one_line(exc)}") from None

    def _spec(self, plugin: WasmPlugin, module: bytes) -> PluginSpec:
        from wasmesh.api.model import plugin_configuration_json
        from wasmesh.runtime.plugin import FailurePolicy, PluginSpec

        return PluginSpec(
            name=f"{plugin.namespace}.{plugin.name}",
            module=module,
            root_id=plugin.plugin_name,
            configuration=plugin_configuration_json(plugin),
            env=vm_env(plugin.inline_env.items(), plugin.host_env_keys),
            failure_policy=FailurePolicy[plugin.fail_strategy.name],
            callback_deadline_ms=self.limits.callback_deadline_ms,
            memory_limit_bytes=self.limits.memory_limit_bytes,
        )

    async def build(
        self, listener: ListenerConfig, resources: Sequence[PluginResource], generation: int
    ) -> PluginChain:
        plugins = select_for_listener(parse_resources(resources), listener)
        modules = await asyncio.gather(*(self.fetch_module(p) for p in plugins))

        def load_error(plugin: WasmPlugin) -> Callable[[str], Exception]:
            where = f"{plugin.source_file}: " if plugin.source_file else ""
            return lambda reason: PluginChainError(f"{where}{reason}")

        description: list[dict[str, object]] = [
            {
                "name": f"{p.namespace}.{p.name}",
                "url": p.url,
                "phase": p.phase.name,
                "priority": p.priority,
                "root_id": p.plugin_name,
                "fail_strategy": p.fail_strategy.name,
            }
            for p in plugins
        ]
        return self.assemble_chain(
            (
                self.load_plugin(self._spec(plugin, module), load_error(plugin))
                for plugin, module in zip(plugins, modules, strict=True)
            ),
            generation,
            description,
        )


# --------------------------------------------------------------------------- http_call


class ClusterHttpCaller:
    """The runtime's HttpCaller: one request to a named cluster, the whole answer delivered at once."""

    def __init__(self, clusters: Callable[[], ClusterManager | None]) -> None:
        self._clusters = clusters

    def dispatch(
        self,
        cluster: str,
        headers: HeaderMap,
        body: bytes,
        trailers: HeaderMap,
        timeout_ms: int,
        on_response: Callable[[Any], None],
    ) -> bool:
        manager = self._clusters()
        target = manager.get(cluster) if manager is not None else None
        if target is None:
            return False
        call = _HttpCall(headers, body, timeout_ms, on_response)
        target.acquire(call)
        return True


# Envoy's words for a connect failure in "reset reason: ..." (StreamResetReason names).
_ENVOY_CONNECT_FAILURE = {
    "connection_refused": "remote connection failure",
    "connection_failure": "remote connection failure",
    "connect_timeout": "connection timeout",
}


def _reset_before_headers_body(reason: str) -> bytes:
    return b"upstream connect error or disconnect/reset before headers. reset reason: " + reason.encode()


def _local_answer(status: int, body: bytes) -> Any:
    """An http_call answer Envoy's AsyncClient makes up itself (its router's local reply)."""
    from wasmesh.runtime.contexts import HttpCallResponse

    headers = HeaderMap([(b":status", b"%d" % status), (b"content-length", b"%d" % len(body)),
                         (b"content-type", b"text/plain")])  # fmt: skip
    return HttpCallResponse(headers=headers, body=body)


class _HttpCall:
    """An UpstreamStream that buffers the whole response (Envoy's AsyncClient for http_call)."""

    def __init__(
        self, headers: HeaderMap, body: bytes, timeout_ms: int, on_response: Callable[[Any], None]
    ) -> None:
        out = headers.copy()
        out.remove(b"transfer-encoding")
        if body or out.get(b":method") in (b"POST", b"PUT", b"PATCH"):
            out.set(b"content-length", b"%d" % len(body))
        self._request = encode_request_head(out, chunked=False) + body
        self._head = out.get(b":method") == b"HEAD"
        self._on_response = on_response
        self._conn: UpstreamConnection | None = None
        self._headers: HeaderMap | None = None
        self._body = bytearray()
        self._done = False
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(timeout_ms / 1000, self._timeout) if timeout_ms > 0 else None

    def _finish(self, response: Any, clean: bool) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release() if clean else conn.close()
        try:
            self._on_response(response)
        except Exception:
            log.exception("http_call response callback failed")

    def _timeout(self) -> None:
        # Envoy's AsyncClient router answers a timed-out call itself: a 504 the plugin receives as a
        # response (3 headers, body "upstream request timeout"), not as a failure.
        self._timer = None
        self._finish(_local_answer(504, upstream_failure_body(504, "upstream_response_timeout")), clean=False)

    def on_upstream_ready(self, conn: UpstreamConnection) -> None:
        if self._done:
            conn.release()
            return
        self._conn = conn
        if self._head:
            conn.expect_no_body()
        conn.write(self._request)

    def on_upstream_connect_failure(self, reason: str) -> None:
        # As Envoy's router: a 503 local answer, delivered to the plugin as a response.
        body = _reset_before_headers_body(_ENVOY_CONNECT_FAILURE.get(reason, reason))
        self._finish(_local_answer(503, body), clean=False)

    def on_response_headers(self, headers: HeaderMap, end_stream: bool, keep_alive: bool) -> None:
        self._headers = headers

    def on_response_body(self, data: bytes) -> None:
        self._body += data

    def on_response_complete(self) -> None:
        from wasmesh.runtime.contexts import HttpCallResponse

        headers = self._headers or HeaderMap([(b":status", b"502")])
        self._finish(HttpCallResponse(headers=headers, body=bytes(self._body)), clean=True)

    def on_response_batch_end(self) -> None:
        pass

    def on_upstream_reset(self, reason: str) -> None:
        self._conn = None
        if self._headers is None:  # before the response started: Envoy's router answers 503 itself
            body = _reset_before_headers_body(reason.replace("_", " "))
            self._finish(_local_answer(503, body), clean=False)
        else:  # mid-response: the plugin gets a failure (no headers, status BrokenConnection "reset")
            self._finish(None, clean=False)

    def on_upstream_writable(self, writable: bool) -> None:
        pass
