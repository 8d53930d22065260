"""Helpers shared by the runtime tests: a WAT module builder and small stand-ins for the proxy side.

The stand-ins (callbacks, scheduler, http caller) play the role of the proxy/filter
manager that drive a filter; the Wasm engine and plugins under test are real.
A uniquely named module (not conftest): several test dirs have a conftest.py, and
`from conftest import` picks whichever one pytest imported first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import wasmtime

from wasmesh.http.filter import FilterHeadersStatus, StreamInfo
from wasmesh.http.headers import HeaderMap
from wasmesh.runtime import HttpCallResponse
from wasmesh.runtime.plugin import WasmPlugin
from wasmesh.runtime.vm import PluginVm

SLOTS = 0x100  # guest writes observed values as u32 at SLOTS + 4*n
RET_PTR = 0x200  # *_ptr_ptr / *_size_ptr results land at RET_PTR / RET_PTR + 4


def _wat_string(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def _import_lines() -> str:
    from wasmesh.runtime.hostcalls import HostCalls

    lines = []
    kinds = {"i32": "i32", "i64": "i64"}
    for host in HostCalls.__new__(HostCalls).host_funcs():
        params = " ".join(kinds[k] for k in host.signature.params)
        results = " ".join(kinds[k] for k in host.signature.results)
        lines.append(
            f'(import "env" "{host.name}" (func ${host.name}'
            + (f" (param {params})" if params else "")
            + (f" (result {results})" if results else "")
            + "))"
        )
    return "\n".join(lines)


def build_module(
    body: str,
    abi: str = "0_2_0",
    data: dict[int, bytes] | None = None,
    wasi_imports: str = "",
    allocator: str = "malloc",
    memory_pages: int = 2,
    memory_max: int | None = None,
) -> bytes:
    """A Proxy-Wasm module in WAT: every env import, a bump allocator, ``body`` functions."""
    segments = "\n".join(
        f'(data (i32.const {addr}) "{_wat_string(value)}")' for addr, value in (data or {}).items()
    )
    marker = f'(func (export "proxy_abi_version_{abi}"))' if abi else ""
    max_text = f" {memory_max}" if memory_max is not None else ""
    wat = f"""(module
{wasi_imports}
{_import_lines()}
(memory (export "memory") {memory_pages}{max_text})
(global $heap (mut i32) (i32.const 0x8000))
(func $alloc (export "{allocator}") (param $n i32) (result i32)
  (local $p i32)
  (local.set $p (global.get $heap))
  (global.set $heap (i32.add (global.get $heap) (local.get $n)))
  (local.get $p))
(func $save (param $slot i32) (param $v i32)
  (i32.store (i32.add (i32.const {SLOTS}) (i32.shl (local.get $slot) (i32.const 2))) (local.get $v)))
{marker}
{segments}
{body}
)"""
    return bytes(wasmtime.wat2wasm(wat))


def slot(plugin: WasmPlugin, n: int) -> int:
    value = plugin.vm.instance.read_u32(SLOTS + 4 * n)
    assert value is not None
    return value


def returned_bytes(vm: PluginVm) -> bytes:
    inst = vm.instance
    ptr, size = inst.read_u32(RET_PTR), inst.read_u32(RET_PTR + 4)
    assert ptr is not None and size is not None
    if size == 0:
        return b""
    data = inst.read(ptr, size)
    assert data is not None
    return data


@dataclass
class LocalReply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    details: str
    grpc_status: int | None


@dataclass
class FakeCallbacks:
    """The filter manager side of one stream, recording what the filter asked for."""

    stream_info: StreamInfo = field(default_factory=StreamInfo)
    req_headers: HeaderMap | None = None
    resp_headers: HeaderMap | None = None
    local_replies: list[LocalReply] = field(default_factory=list)
    continued_decoding: int = 0
    continued_encoding: int = 0
    resets: int = 0
    route_cache_cleared: int = 0

    def request_headers(self) -> HeaderMap | None:
        return self.req_headers

    def request_trailers(self) -> HeaderMap | None:
        return None

    def response_headers(self) -> HeaderMap | None:
        return self.resp_headers

    def response_trailers(self) -> HeaderMap | None:
        return None

    def continue_decoding(self) -> None:
        self.continued_decoding += 1

    def continue_encoding(self) -> None:
        self.continued_encoding += 1

    def send_local_reply(
        self, status: int, body: bytes, headers: list[tuple[bytes, bytes]], details: str,
        grpc_status: int | None = None,
    ) -> None:
        self.local_replies.append(LocalReply(status, body, headers, details, grpc_status))

    def reset_stream(self) -> None:
        self.resets += 1

    def clear_route_cache(self) -> None:
        self.route_cache_cleared += 1

    def add_request_trailers(self) -> HeaderMap:
        return HeaderMap()

    def add_response_trailers(self) -> HeaderMap:
        return HeaderMap()


class ManualHandle:
    def __init__(self, scheduler: ManualScheduler, when: float, fn: Callable[[], None]) -> None:
        self.when, self.fn, self.cancelled = when, fn, False
        self._scheduler = scheduler

    def cancel(self) -> None:
        self.cancelled = True


class ManualScheduler:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[ManualHandle] = []

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> ManualHandle:
        handle = ManualHandle(self, self.now + delay_s, fn)
        self.handles.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while True:
            pending = [h for h in self.handles if not h.cancelled and h.when <= target]
            due = sorted(pending, key=lambda h: h.when)
            if not due:
                break
            handle = due[0]
            self.handles.remove(handle)
            self.now = handle.when
            handle.fn()
        self.now = target


@dataclass
class RecordedCall:
    cluster: str
    headers: HeaderMap
    body: bytes
    trailers: HeaderMap
    timeout_ms: int
    on_response: Callable[[HttpCallResponse | None], None]


class RecordingHttpCaller:
    """Knows a fixed set of clusters and keeps the calls so a test can answer them."""

    def __init__(self, clusters: set[str]) -> None:
        self.clusters = clusters
        self.calls: list[RecordedCall] = []

    def dispatch(
        self, cluster: str, headers: HeaderMap, body: bytes, trailers: HeaderMap, timeout_ms: int,
        on_response: Callable[[HttpCallResponse | None], None],
    ) -> bool:
        if cluster not in self.clusters:
            return False
        self.calls.append(RecordedCall(cluster, headers, body, trailers, timeout_ms, on_response))
        return True


@dataclass
class LogRecorder:
    lines: list[tuple[str, int, str]] = field(default_factory=list)

    def __call__(self, plugin: str, level: int, message: str) -> None:
        self.lines.append((plugin, level, message))

    def messages(self) -> list[str]:
        return [m for _, _, m in self.lines]


def request(path: bytes = b"/p?q=1", extra: list[tuple[bytes, bytes]] | None = None) -> HeaderMap:
    return HeaderMap([(b":method", b"GET"), (b":path", path), (b":authority", b"example.com"),
                      (b":scheme", b"http"), *(extra or [])])


def run_request(filt: object) -> tuple[FilterHeadersStatus, FakeCallbacks]:
    """One request's headers through a plugin filter (or its FAIL_CLOSE stand-in), then on_log/on_destroy."""
    from wasmesh.runtime.plugin import FailClosedFilter, WasmHttpFilter

    assert isinstance(filt, WasmHttpFilter | FailClosedFilter)
    callbacks = FakeCallbacks()
    filt.set_callbacks(callbacks)
    status = filt.decode_headers(request(), True)
    filt.on_log()
    filt.on_destroy()
    return status, callbacks
