"""``PluginHarness``: test a compiled Proxy-Wasm plugin (any language) from pytest.

It loads the plugin into the real wasmesh runtime and drives HTTP exchanges
through the real ``FilterManager`` — no sockets, no event loop. Time only moves
when the test says so (``tick``/``advance``); http_call answers come from
Python handlers standing in for clusters and are delivered after the calling
callback returns, as a proxy would deliver them.

    with PluginHarness("plugin.wasm", config={"k": "v"}) as h:
        r = h.request("GET", "/path", headers={"x-a": "1"}, upstream=Upstream(status=200, body=b"hi"))
        assert r.status == 200 and r.upstream_request is not None
"""

from __future__ import annotations

import heapq
import itertools
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from wasmesh.http.filter import HttpFilterFactory, StreamInfo
from wasmesh.http.filter_manager import FilterManager
from wasmesh.http.headers import HeaderMap
from wasmesh.runtime import FailurePolicy, HttpCallResponse, PluginSpec, Runtime

__all__ = [
    "Exchange",
    "PluginHarness",
    "Plugin",
    "Upstream",
    "UpstreamRequest",
    "HarnessResponse",
    "HttpCall",
    "LogRecord",
    "HarnessError",
    "ManualScheduler",
]

HeadersLike = Mapping[str, str] | Sequence[tuple[str, str]] | HeaderMap | None
ConfigLike = Mapping[str, Any] | Sequence[Any] | str | bytes | None


class HarnessError(RuntimeError):
    """The harness cannot do what was asked (bad plugin path, exchange stuck, ...)."""


def _to_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _header_pairs(headers: HeadersLike) -> list[tuple[bytes, bytes]]:
    if headers is None:
        return []
    if isinstance(headers, HeaderMap):
        return list(headers.pairs())
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(_to_bytes(k).lower(), _to_bytes(v)) for k, v in items]


def _config_bytes(config: ConfigLike, what: str) -> bytes:
    """dict/list → JSON; str → UTF-8; bytes as is; None → empty."""
    if config is None:
        return b""
    if isinstance(config, bytes):
        return config
    if isinstance(config, str):
        return config.encode()
    try:
        return json.dumps(config).encode()
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"{what}: not JSON-serialisable: {exc}") from exc


def _name_from_path(path: Path) -> str:
    """``.../ip-acl/1.0.0/plugin.wasm`` → ``ip-acl``: skip generic file and version names."""
    for part in [path.stem, *(p.name for p in path.parents)]:
        if part and part != "plugin" and not part[0].isdigit():
            return part
    return path.stem


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


# --------------------------------------------------------------------------------- public data


@dataclass
class Upstream:
    """The upstream's answer to the request that reaches it."""

    status: int = 200
    headers: HeadersLike = None
    body: bytes | str = b""
    trailers: HeadersLike = None

    def response_headers(self) -> HeaderMap:
        """As an HTTP/1.1 upstream sends them: content-length added unless chunked (trailers)."""
        headers = HeaderMap([(b":status", str(self.status).encode())])
        for name, value in _header_pairs(self.headers):
            headers.add(name, value)
        framed = b"content-length" in headers or b"transfer-encoding" in headers
        if not framed and self.trailers is None:
            headers.add(b"content-length", str(len(_to_bytes(self.body))).encode())
        return headers


@dataclass
class UpstreamRequest:
    """The request as it left the chain towards the upstream."""

    method: str
    path: str
    authority: str
    headers: HeaderMap  # including the pseudo-headers
    body: bytes
    trailers: HeaderMap | None = None

    def header(self, name: str) -> str | None:
        return _text(self.headers.get(name.encode()))


@dataclass
class HarnessResponse:
    """What the client got back."""

    status: int
    headers: HeaderMap  # including :status
    body: bytes
    trailers: HeaderMap | None
    upstream_request: UpstreamRequest | None
    local_reply: bool  # the chain answered itself (send_local_response, failure policy, 413...)
    details: str | None  # Envoy's response code details, e.g. "via_upstream"
    reset: bool = False  # the stream was reset (proxy_close_stream, late local reply)

    def header(self, name: str) -> str | None:
        return _text(self.headers.get(name.encode()))

    def header_values(self, name: str) -> list[str]:
        return [v.decode("utf-8", "replace") for v in self.headers.get_all(name.encode())]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class HttpCall:
    """One proxy_http_call the plugin made, and the answer it was given."""

    cluster: str
    headers: HeaderMap
    body: bytes
    trailers: HeaderMap
    timeout_ms: int
    response: HttpCallResponse | None = None
    answered: bool = False

    @property
    def method(self) -> str | None:
        return _text(self.headers.get(b":method"))

    @property
    def path(self) -> str | None:
        return _text(self.headers.get(b":path"))

    @property
    def authority(self) -> str | None:
        return _text(self.headers.get(b":authority"))

    def header(self, name: str) -> str | None:
        return _text(self.headers.get(name.encode()))


# Where the harness's (socketless) upstream "is": upstream.address once the request leaves the chain.
HARNESS_UPSTREAM_ADDRESS = ("127.0.0.1", 8080)

# What RecordingUpstream answers by default too, so harness and Envoy runs compare equal.
DEFAULT_UPSTREAM = Upstream(status=200, headers=[("content-type", "text/plain")], body=b"upstream-body")

UpstreamLike = Upstream | Callable[[UpstreamRequest], Upstream]
ClusterReply = Upstream | HttpCallResponse | None
ClusterHandler = Callable[[HttpCall], ClusterReply] | Upstream | HttpCallResponse


@dataclass
class LogRecord:
    plugin: str
    level: int  # 0 trace, 1 debug, 2 info, 3 warn, 4 error, 5 critical
    message: str


@dataclass
class Plugin:
    """One plugin of a chain (``PluginHarness.chain``)."""

    module: str | Path | bytes
    config: ConfigLike = None
    root_id: str = ""
    vm_id: str = ""
    vm_config: ConfigLike = None
    env: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    failure_policy: FailurePolicy | None = None


# ------------------------------------------------------------------------------------ clock


class _Timer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualScheduler:
    """The runtime's Scheduler on a manual clock: nothing fires until the harness advances time."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self._heap: list[tuple[float, int, _Timer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer()
        heapq.heappush(self._heap, (self.now_s + max(0.0, delay_s), next(self._seq), timer, fn))
        return timer

    def _pop_due(self) -> Callable[[], None] | None:
        while self._heap and self._heap[0][0] <= self.now_s:
            _, _, timer, fn = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.cancelled = True
                return fn
        return None

    def run_due(self) -> bool:
        """Run everything due now (including what that schedules for now); True if anything ran."""
        ran = False
        while (fn := self._pop_due()) is not None:
            fn()
            ran = True
        return ran

    def next_due(self) -> float | None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def advance(self, seconds: float) -> None:
        target = self.now_s + seconds
        while (due := self.next_due()) is not None and due <= target:
            self.now_s = due
            self.run_due()
        self.now_s = target


# --------------------------------------------------------------------------------- exchange


class Exchange:
    """One request through the chain (what ``PluginHarness.send`` returns): ``done``,
    ``response()``; it is also the ExchangeSink the FilterManager talks to."""

    def __init__(self, harness: PluginHarness, upstream: UpstreamLike) -> None:
        self._harness = harness
        self._upstream = upstream
        self.manager: FilterManager | None = None
        self.upstream_request: UpstreamRequest | None = None
        self._upstream_body = bytearray()
        self._upstream_answered = False
        self.response_headers: HeaderMap | None = None
        self.response_body = bytearray()
        self.response_trailers: HeaderMap | None = None
        self.done = False
        self.reset_details: str | None = None

    # ExchangeSink: towards the upstream
    def upstream_request_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        info = self.manager.stream_info if self.manager is not None else None
        if info is not None and info.upstream_address is None:
            info.upstream_address = HARNESS_UPSTREAM_ADDRESS  # as a proxy knows it once it picked the host
        self.upstream_request = UpstreamRequest(
            method=_text(headers.get(b":method")) or "",
            path=_text(headers.get(b":path")) or "",
            authority=_text(headers.get(b":authority")) or "",
            headers=headers.copy(),
            body=b"",
        )
        if end_stream:
            self._upstream_request_complete()

    def upstream_request_data(self, data: bytes, end_stream: bool) -> None:
        self._upstream_body += data
        if end_stream:
            self._upstream_request_complete()

    def upstream_request_trailers(self, trailers: HeaderMap) -> None:
        if self.upstream_request is not None:
            self.upstream_request.trailers = trailers.copy()
        self._upstream_request_complete()

    def _upstream_request_complete(self) -> None:
        request = self.upstream_request
        if request is None or self._upstream_answered:
            return
        self._upstream_answered = True
        request.body = bytes(self._upstream_body)
        info = self.manager.stream_info if self.manager is not None else None
        if info is not None and info.upstream_local_address is None:
            # The connection's own address: known once connected, which the whole request waited for.
            info.upstream_local_address = ("127.0.0.1", 30000 + info.connection_id % 20000)
        # The upstream answers "later": after the current filter callback has returned.
        self._harness.scheduler.call_later(0, self._answer_from_upstream)

    def _answer_from_upstream(self) -> None:
        manager = self.manager
        request = self.upstream_request
        if manager is None or request is None or self.done or manager.upstream_abandoned:
            return
        reply = self._upstream(request) if callable(self._upstream) else self._upstream
        body = _to_bytes(reply.body)
        trailers = _header_pairs(reply.trailers)
        headers_only = not body and not trailers
        manager.on_response_headers(reply.response_headers(), headers_only)
        if body:
            manager.on_response_data(body, not trailers)
        if trailers:
            manager.on_response_trailers(HeaderMap(trailers))

    # ExchangeSink: towards the downstream
    def downstream_response_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.response_headers = headers.copy()
        if end_stream:
            self._finish()

    def downstream_response_data(self, data: bytes, end_stream: bool) -> None:
        self.response_body += data
        if end_stream:
            self._finish()

    def downstream_response_trailers(self, trailers: HeaderMap) -> None:
        self.response_trailers = trailers.copy()
        self._finish()

    def reset(self, details: str) -> None:
        self.reset_details = details
        self.done = True

    def pause_request_source(self) -> None:
        return  # the whole request body is already in memory

    def resume_request_source(self) -> None:
        return

    def _finish(self) -> None:
        self.done = True
        if self.manager is not None:
            # The proxy completes the exchange once the response is written: on_log, on_done.
            self._harness.scheduler.call_later(0, self.manager.complete)

    def response(self) -> HarnessResponse:
        manager = self.manager
        assert manager is not None
        if self.response_headers is None:
            if self.reset_details is None:
                raise HarnessError("the exchange produced no response")
            return HarnessResponse(
                status=0,
                headers=HeaderMap(),
                body=b"",
                trailers=None,
                upstream_request=self.upstream_request,
                local_reply=manager.local_reply_sent,
                details=self.reset_details,
                reset=True,
            )
        status = self.response_headers.get(b":status") or b"0"
        return HarnessResponse(
            status=int(status) if status.isdigit() else 0,
            headers=self.response_headers,
            body=bytes(self.response_body),
            trailers=self.response_trailers,
            upstream_request=self.upstream_request,
            local_reply=manager.local_reply_sent,
            details=manager.stream_info.response_code_details,
            reset=self.reset_details is not None,
        )


class _HarnessHttpCaller:
    """The runtime's HttpCaller: clusters are Python handlers; answers arrive asynchronously."""

    def __init__(self, harness: PluginHarness) -> None:
        self._harness = harness

    def dispatch(
        self,
        cluster: str,
        headers: HeaderMap,
        body: bytes,
        trailers: HeaderMap,
        timeout_ms: int,
        on_response: Callable[[HttpCallResponse | None], None],
    ) -> bool:
        clusters = self._harness.clusters
        handler = clusters.get(cluster, clusters.get("*"))
        if handler is None:
            return False
        call = HttpCall(cluster, headers.copy(), bytes(body), trailers.copy(), timeout_ms)
        self._harness.http_calls.append(call)

        def answer() -> None:
            reply = handler(call) if callable(handler) else handler
            if isinstance(reply, Upstream):
                reply = HttpCallResponse(
                    headers=reply.response_headers(),
                    body=_to_bytes(reply.body),
                    trailers=HeaderMap(_header_pairs(reply.trailers)),
                )
            call.response = reply
            call.answered = True
            on_response(reply)

        self._harness.scheduler.call_later(0, answer)
        return True


# ---------------------------------------------------------------------------------- harness


class PluginHarness:
    """Load plugin(s) into the real runtime and drive exchanges through the real filter manager."""

    def __init__(
        self,
        plugin: str | Path | bytes,
        *,
        config: ConfigLike = None,
        root_id: str = "",
        vm_id: str = "",
        vm_config: ConfigLike = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        failure_policy: FailurePolicy | None = None,
        clusters: Mapping[str, ClusterHandler] | None = None,
        node: Mapping[str, Any] | None = None,
        stream_info: Callable[[], StreamInfo] | None = None,
        envoy_request_headers: bool = True,
        buffer_limit: int = 1 << 20,
    ) -> None:
        self._init(
            [Plugin(plugin, config, root_id, vm_id, vm_config, dict(env or {}), name, failure_policy)],
            clusters=clusters,
            node=node,
            stream_info=stream_info,
            envoy_request_headers=envoy_request_headers,
            buffer_limit=buffer_limit,
        )

    @classmethod
    def chain(
        cls,
        plugins: Sequence[Plugin],
        *,
        clusters: Mapping[str, ClusterHandler] | None = None,
        node: Mapping[str, Any] | None = None,
        stream_info: Callable[[], StreamInfo] | None = None,
        envoy_request_headers: bool = True,
        buffer_limit: int = 1 << 20,
    ) -> PluginHarness:
        """Several plugins in chain order (the first sees the request first, the response last)."""
        harness = cls.__new__(cls)
        harness._init(
            list(plugins),
            clusters=clusters,
            node=node,
            stream_info=stream_info,
            envoy_request_headers=envoy_request_headers,
            buffer_limit=buffer_limit,
        )
        return harness

    def _init(
        self,
        plugins: list[Plugin],
        *,
        clusters: Mapping[str, ClusterHandler] | None,
        node: Mapping[str, Any] | None,
        stream_info: Callable[[], StreamInfo] | None,
        envoy_request_headers: bool,
        buffer_limit: int,
    ) -> None:
        if not plugins:
            raise HarnessError("PluginHarness needs at least one plugin")
        self.clusters: dict[str, ClusterHandler] = dict(clusters or {})
        self.http_calls: list[HttpCall] = []
        self.logs: list[LogRecord] = []
        self.scheduler = ManualScheduler()
        self.node: dict[str, Any] = dict(node or {"id": "wasmesh-harness", "cluster": "wasmesh-harness"})
        self._stream_info_factory = stream_info
        self._envoy_request_headers = envoy_request_headers
        self._buffer_limit = buffer_limit
        self._connection_ids = itertools.count(1)
        self._exchanges: list[Exchange] = []
        self._closed = False
        self.runtime = Runtime(
            http_caller=_HarnessHttpCaller(self),
            scheduler=self.scheduler,
            log_handler=self._on_log,
            node=self.node,
        )
        self.plugins = plugins
        self.factories: list[HttpFilterFactory] = []
        try:
            for index, plugin in enumerate(plugins):
                self.factories.append(self.runtime.load_plugin(self._spec(plugin, index)))
            self.run_until_idle()
        except BaseException:
            self.close()
            raise

    def _spec(self, plugin: Plugin, index: int) -> PluginSpec:
        module = plugin.module
        if not isinstance(module, bytes):
            path = Path(module)
            try:
                module = path.read_bytes()
            except OSError as exc:
                raise HarnessError(f"{path}: cannot read plugin module: {exc.strerror}") from exc
            default_name = _name_from_path(path)
        else:
            default_name = f"plugin-{index}"
        kwargs: dict[str, Any] = {}
        if plugin.failure_policy is not None:
            kwargs["failure_policy"] = plugin.failure_policy
        return PluginSpec(
            name=plugin.name or default_name,
            module=module,
            root_id=plugin.root_id,
            vm_id=plugin.vm_id,
            vm_config=_config_bytes(plugin.vm_config, "vm_config"),
            configuration=_config_bytes(plugin.config, "config"),
            env=dict(plugin.env),
            **kwargs,
        )

    def _on_log(self, plugin: str, level: int, message: str) -> None:
        self.logs.append(LogRecord(plugin, level, message))

    # -- exchanges ---------------------------------------------------------------------
    def send(
        self,
        method: str = "GET",
        path: str = "/",
        headers: HeadersLike = None,
        body: bytes | str = b"",
        *,
        trailers: HeadersLike = None,
        upstream: UpstreamLike | None = None,
        authority: str = "example.com",
        scheme: str = "http",
        chunks: Sequence[bytes] | None = None,
    ) -> Exchange:
        """Start an exchange and run until nothing more can happen now; see ``request``."""
        if self._closed:
            raise HarnessError("the harness is closed")
        exchange = Exchange(self, upstream if upstream is not None else DEFAULT_UPSTREAM)
        info = self._stream_info_factory() if self._stream_info_factory else self._default_stream_info(scheme)
        manager = FilterManager(self.factories, info, exchange, buffer_limit=self._buffer_limit)
        exchange.manager = manager
        # Only unfinished exchanges need resetting at close(): a long test must not keep every one.
        self._exchanges = [e for e in self._exchanges if e.manager is not None and not e.manager.completed]
        self._exchanges.append(exchange)

        request_headers = HeaderMap(
            [(b":authority", authority.encode()), (b":path", path.encode()), (b":method", method.encode()),
             (b":scheme", scheme.encode())]
        )  # fmt: skip
        for name, value in _header_pairs(headers):
            if name == b"host":
                request_headers.set(b":authority", value)
            else:
                request_headers.add(name, value)
        payload = _to_bytes(body)
        body_chunks = [c for c in (chunks if chunks is not None else [payload]) if c]
        trailer_pairs = _header_pairs(trailers)
        # With trailers the body goes chunked, as on the wire: no content-length (Envoy's codec then
        # strips transfer-encoding before the filters, so the filters see neither).
        if body_chunks and b"content-length" not in request_headers and chunks is None and not trailer_pairs:
            request_headers.add(b"content-length", str(len(payload)).encode())
        if self._envoy_request_headers:
            # What Envoy's connection manager adds before any filter runs.
            if b"x-forwarded-proto" not in request_headers:
                request_headers.add(b"x-forwarded-proto", scheme.encode())
            if b"x-request-id" not in request_headers:
                request_headers.add(b"x-request-id", str(uuid.uuid4()).encode())
        headers_only = not body_chunks and not trailer_pairs
        manager.on_request_headers(request_headers, headers_only)
        self.run_until_idle()
        for index, chunk in enumerate(body_chunks):
            manager.on_request_data(chunk, index == len(body_chunks) - 1 and not trailer_pairs)
            self.run_until_idle()
        if trailer_pairs:
            manager.on_request_trailers(HeaderMap(trailer_pairs))
            self.run_until_idle()
        return exchange

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: HeadersLike = None,
        body: bytes | str = b"",
        *,
        trailers: HeadersLike = None,
        upstream: UpstreamLike | None = None,
        authority: str = "example.com",
        scheme: str = "http",
        chunks: Sequence[bytes] | None = None,
    ) -> HarnessResponse:
        """One complete exchange. The default upstream answers 200 ``upstream-body``.

        Raises HarnessError if the chain is still waiting (a plugin paused the stream
        and nothing pending resumes it); use ``send`` + ``tick`` for timer-driven plugins.
        """
        exchange = self.send(
            method, path, headers, body, trailers=trailers, upstream=upstream, authority=authority,
            scheme=scheme, chunks=chunks,
        )  # fmt: skip
        if not exchange.done:
            raise HarnessError(
                "the exchange did not complete: a plugin stopped iteration and nothing resumed it "
                "(use send() and tick() when a timer resumes it)"
            )
        return exchange.response()

    def _default_stream_info(self, scheme: str) -> StreamInfo:
        connection_id = next(self._connection_ids)
        return StreamInfo(
            connection_id=connection_id,
            downstream_remote_address=("127.0.0.1", 40000 + connection_id % 20000),
            downstream_local_address=("127.0.0.1", 10000),
            scheme=scheme,
            node=self.node,
            listener_name="harness",
            virtual_host_name="all",
            route_name="default",
            cluster_name="upstream",
        )

    # -- time --------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        """Deliver everything due now: http_call answers, upstream answers, zero-delay timers."""
        for _ in range(100_000):
            if not self.scheduler.run_due():
                return
        raise HarnessError("run_until_idle: the plugin keeps scheduling work for now (livelock?)")

    def advance(self, seconds: float) -> None:
        """Move the manual clock forward, firing timers (on_tick) that fall due on the way."""
        self.scheduler.advance(seconds)
        self.run_until_idle()

    def tick(self, n: int = 1) -> None:
        """Fire the next ``n`` timer events (each plugin's on_tick at its own period)."""
        for _ in range(n):
            due = self.scheduler.next_due()
            if due is None:
                return
            self.scheduler.advance(due - self.scheduler.now_s)
            self.run_until_idle()

    # -- observations ------------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, int]:
        """Plugin-defined counters and gauges by the name the plugin gave them."""
        registry = self.runtime.metrics
        snapshot = getattr(registry, "snapshot", None)
        if callable(snapshot):
            return dict(snapshot())
        values: dict[str, int] = {}
        for key in getattr(registry, "_by_key", {}):
            value = registry.value_by_name(key[1])
            if value is not None:
                values[key[1]] = value
        return values

    def metric(self, name: str) -> int | None:
        value = self.runtime.metrics.value_by_name(name)
        return None if value is None else int(value)

    @property
    def shared_data(self) -> dict[bytes, bytes]:
        """The shared-data store of the (first) plugin's VM id."""
        vm_id = self.plugins[0].vm_id
        store = self.runtime.shared_data
        out: dict[bytes, bytes] = {}
        for key in store.keys(vm_id):
            entry = store.get(vm_id, key)
            if entry is not None:
                out[key] = entry[0]
        return out

    def log_messages(self, min_level: int = 0) -> list[str]:
        return [r.message for r in self.logs if r.level >= min_level]

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for exchange in self._exchanges:
            if exchange.manager is not None and not exchange.manager.completed:
                exchange.manager.on_downstream_reset()
        try:
            self.run_until_idle()
        except HarnessError:
            pass
        close = getattr(getattr(self, "runtime", None), "close", None)
        if callable(close):
            close()

    def __enter__(self) -> PluginHarness:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
