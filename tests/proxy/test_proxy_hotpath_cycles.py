"""A finished exchange is freed by reference counting alone: no cyclic garbage per request.

Every scenario runs a few hundred exchanges with the cyclic collector disabled, then asks the
collector what it would have had to free: through the real FilterManager (Python filters, and
a real Wasm header plugin in the real runtime) with sinks that keep their manager as the proxy's
exchange and the plugin harness do, and through the real proxy over sockets. No timing here.
"""

from __future__ import annotations

import gc
import http.client
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from proxy_plugins import header_plugin_wat, wasmplugin_yaml, write_module
from proxy_testsupport import EchoServer, StartProxy, request, simple_config

from wasmesh.http.filter import (
    FilterCallbacks,
    FilterDataStatus,
    FilterHeadersStatus,
    FilterTrailersStatus,
    HttpFilter,
    HttpFilterFactory,
    StreamInfo,
)
from wasmesh.http.filter_manager import FilterManager
from wasmesh.http.headers import HeaderMap
from wasmesh.http.local_reply import LocalReplyFilter
from wasmesh.testing import PluginHarness

EXCHANGES = 300


def _is_ours(obj: object) -> bool:
    """An object of a wasmesh type, or a bound method of one (what our own cycles are made of)."""
    if type(obj).__module__.startswith("wasmesh"):
        return True
    bound_to = getattr(obj, "__self__", None)
    return bound_to is not None and type(bound_to).__module__.startswith("wasmesh")


def cyclic_garbage_of(run: Callable[[], None]) -> list[object]:
    """What the cyclic collector would free after ``run`` (which runs with the collector off)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        run()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    return found


def assert_no_cycles_of_ours(garbage: list[object]) -> None:
    ours = Counter(type(o).__qualname__ for o in garbage if _is_ours(o))
    assert not ours, f"{EXCHANGES} exchanges left cyclic garbage of wasmesh types: {dict(ours)}"


# ------------------------------------------------------------------------------ sinks, filters


class ManagerHoldingSink:
    """An ExchangeSink that, like the proxy's exchange, keeps its manager (a cycle until completion)."""

    def __init__(self) -> None:
        self.manager: FilterManager | None = None
        self.finished = False
        self.reset_details: str | None = None

    def upstream_request_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        pass

    def upstream_request_data(self, data: bytes, end_stream: bool) -> None:
        pass

    def upstream_request_trailers(self, trailers: HeaderMap) -> None:
        pass

    def downstream_response_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.finished = self.finished or end_stream

    def downstream_response_data(self, data: bytes, end_stream: bool) -> None:
        self.finished = self.finished or end_stream

    def downstream_response_trailers(self, trailers: HeaderMap) -> None:
        self.finished = True

    def reset(self, details: str) -> None:
        self.reset_details = details

    def pause_request_source(self) -> None:
        pass

    def resume_request_source(self) -> None:
        pass


class CallbackKeepingFilter:
    """A sloppy filter: keeps its callbacks (and so the manager) after on_destroy."""

    def __init__(self, reset_on_request: bool = False) -> None:
        self.callbacks: FilterCallbacks | None = None
        self.reset_on_request = reset_on_request

    def set_callbacks(self, callbacks: FilterCallbacks) -> None:
        self.callbacks = callbacks

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        if self.reset_on_request and self.callbacks is not None:
            self.callbacks.reset_stream()
        return FilterHeadersStatus.CONTINUE

    def decode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        return FilterDataStatus.CONTINUE

    def decode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        return FilterTrailersStatus.CONTINUE

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterHeadersStatus:
        return FilterHeadersStatus.CONTINUE

    def encode_data(self, data: bytearray, end_stream: bool) -> FilterDataStatus:
        return FilterDataStatus.CONTINUE

    def encode_trailers(self, trailers: HeaderMap) -> FilterTrailersStatus:
        return FilterTrailersStatus.CONTINUE

    def on_log(self) -> None:
        pass

    def on_destroy(self) -> None:
        pass  # deliberately keeps self.callbacks


class Factory:
    def __init__(self, name: str, make: Callable[[], HttpFilter]) -> None:
        self.name = name
        self._make = make

    def create_filter(self) -> HttpFilter | None:
        return self._make()


# ------------------------------------------------------------------------------ exchanges


def _request_headers(method: bytes = b"GET", **extra: bytes) -> HeaderMap:
    pairs = [(b":method", method), (b":path", b"/"), (b":authority", b"example.com"), (b":scheme", b"http")]
    pairs += [(name.replace("_", "-").encode(), value) for name, value in extra.items()]
    return HeaderMap.from_lowercase(pairs)


def _response_headers(**extra: bytes) -> HeaderMap:
    pairs = [(b":status", b"200"), *((n.replace("_", "-").encode(), v) for n, v in extra.items())]
    return HeaderMap.from_lowercase(pairs)


def _start(factories: Sequence[HttpFilterFactory]) -> tuple[FilterManager, ManagerHoldingSink]:
    sink = ManagerHoldingSink()
    manager = FilterManager(factories, StreamInfo(node={"id": "cycles"}), sink)
    sink.manager = manager
    return manager, sink


def get_with_body(factories: Sequence[HttpFilterFactory]) -> None:
    manager, sink = _start(factories)
    manager.on_request_headers(_request_headers(user_agent=b"cycles"), True)
    manager.on_response_headers(_response_headers(content_length=b"5"), False)
    manager.on_response_data(b"hello", True)
    assert sink.finished
    manager.complete()


def post_with_trailers(factories: Sequence[HttpFilterFactory]) -> None:
    manager, sink = _start(factories)
    manager.on_request_headers(_request_headers(b"POST", transfer_encoding=b"chunked"), False)
    manager.on_request_data(b"first ", False)
    manager.on_request_data(b"second", False)
    manager.on_request_trailers(HeaderMap([(b"x-checksum", b"1")]))
    manager.on_response_headers(_response_headers(transfer_encoding=b"chunked"), False)
    manager.on_response_data(b"partial", False)
    manager.on_response_trailers(HeaderMap([(b"grpc-status", b"0")]))
    assert sink.finished
    manager.complete()


def upstream_failure(factories: Sequence[HttpFilterFactory]) -> None:
    manager, sink = _start(factories)
    manager.on_request_headers(_request_headers(), True)
    manager.on_upstream_failure(503, "upstream_reset_before_response_started{connection_refused}")
    assert sink.finished
    manager.complete()


def downstream_gone(factories: Sequence[HttpFilterFactory]) -> None:
    manager, _ = _start(factories)
    manager.on_request_headers(_request_headers(), True)
    manager.on_response_headers(_response_headers(content_length=b"10"), False)
    manager.on_downstream_reset()  # completes the exchange itself
    assert manager.completed


def abandoned_without_complete_call(factories: Sequence[HttpFilterFactory]) -> None:
    """A transport that forgets ``complete``: the cycle stays, and this shows the test can see it."""
    manager, _ = _start(factories)
    manager.on_request_headers(_request_headers(), True)


SCENARIOS: dict[str, Callable[[Sequence[HttpFilterFactory]], None]] = {
    "get_with_body": get_with_body,
    "post_with_trailers": post_with_trailers,
    "upstream_failure": upstream_failure,
    "downstream_gone": downstream_gone,
}


def _run_many(
    scenario: Callable[[Sequence[HttpFilterFactory]], None], factories: Sequence[HttpFilterFactory]
) -> Callable[[], None]:
    def run() -> None:
        for _ in range(EXCHANGES):
            scenario(factories)

    return run


# ------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def wasm_header_plugin() -> Iterator[PluginHarness]:
    """One real Wasm header plugin loaded into the real runtime; its factories feed our managers."""
    with PluginHarness(bytes(wasmtime.wat2wasm(header_plugin_wat("cycles"))), name="cycles") as harness:
        yield harness


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_empty_chain_leaves_no_cycles(scenario: str) -> None:
    assert_no_cycles_of_ours(cyclic_garbage_of(_run_many(SCENARIOS[scenario], [])))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_python_filters_leave_no_cycles_even_when_they_keep_callbacks(scenario: str) -> None:
    factories = [
        Factory("keeper", CallbackKeepingFilter),
        Factory("second-keeper", CallbackKeepingFilter),
    ]
    assert_no_cycles_of_ours(cyclic_garbage_of(_run_many(SCENARIOS[scenario], factories)))


def test_local_reply_and_filter_reset_leave_no_cycles() -> None:
    local_reply = [Factory("deny", lambda: LocalReplyFilter(403, b"denied", "rbac_access_denied"))]
    resetting = [Factory("reset", lambda: CallbackKeepingFilter(reset_on_request=True))]

    def run() -> None:
        for _ in range(EXCHANGES // 2):
            manager, sink = _start(local_reply)
            manager.on_request_headers(_request_headers(), True)
            assert sink.finished and manager.local_reply_sent
            manager.complete()
            manager, sink = _start(resetting)
            manager.on_request_headers(_request_headers(), True)
            assert sink.reset_details == "filter_reset_stream" and manager.completed

    assert_no_cycles_of_ours(cyclic_garbage_of(run))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_wasm_plugin_leaves_no_cycles(scenario: str, wasm_header_plugin: PluginHarness) -> None:
    garbage = cyclic_garbage_of(_run_many(SCENARIOS[scenario], wasm_header_plugin.factories))
    assert_no_cycles_of_ours(garbage)


def test_wasm_plugin_through_the_harness_leaves_no_cycles(wasm_header_plugin: PluginHarness) -> None:
    """The plugin harness's own exchange is a sink holding its manager too."""

    def run() -> None:
        for _ in range(EXCHANGES):
            exchange = wasm_header_plugin.send("GET", "/", headers={"x-a": "1"})
            assert exchange.done
            response = exchange.response()
            assert response.status == 200 and response.header("x-resp-chain") == "cycles"

    assert_no_cycles_of_ours(cyclic_garbage_of(run))


def test_the_check_sees_a_cycle_when_an_exchange_is_never_completed() -> None:
    """Guards the test itself: an uncompleted exchange keeps its cycle, and it is reported."""
    factories = [Factory("keeper", CallbackKeepingFilter)]
    garbage = cyclic_garbage_of(_run_many(abandoned_without_complete_call, factories))
    kinds = {type(o).__qualname__ for o in garbage}
    assert {"FilterManager", "ManagerHoldingSink", "CallbackKeepingFilter"} <= kinds
    with pytest.raises(AssertionError, match="FilterManager"):
        assert_no_cycles_of_ours(garbage)


# ------------------------------------------------------------------------------ the real proxy


@pytest.mark.parametrize("with_plugin", [False, True], ids=["no-plugin", "wasm-header-plugin"])
def test_proxy_requests_leave_no_cycles(
    with_plugin: bool, start_proxy: StartProxy, echo: EchoServer, tmp_path: Path
) -> None:
    """Keep-alive requests through the proxy (downstream and pooled upstream connection reused)."""
    raw: dict[str, Any] = simple_config(echo.port)
    if with_plugin:
        module = write_module(tmp_path, "tagger", header_plugin_wat("hot"))
        plugins = tmp_path / "plugins.yaml"
        plugins.write_text(wasmplugin_yaml("tagger", module))
        raw["plugins"] = [{"path": str(plugins)}]
    proxy = start_proxy(raw)
    port = proxy.listener_address()[1]
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        request(port, conn=client)  # connections and pools are set up outside the measurement

        def run() -> None:
            for _ in range(EXCHANGES):
                status, headers, _ = request(port, conn=client)
                assert status == 200
                assert headers.get("x-resp-chain") == ("hot" if with_plugin else None)

        garbage = cyclic_garbage_of(run)
    finally:
        client.close()
    assert_no_cycles_of_ours(garbage)
