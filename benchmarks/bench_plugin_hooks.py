"""Socket-less cost per request of a plugin chain: the real FilterManager over the real runtime.

    python benchmarks/bench_plugin_hooks.py [--requests 2000] [--repeats 9] [--no-go]

No sockets, no event loop, no proxy: each request is one FilterManager driven the way the
proxy drives it (request headers as the proxy hands them over, the upstream answers 200 with a
small body, then ``complete()`` for on_log/on_done/on_delete), so the numbers are the cost of the
chain alone — the figure to watch while optimising wasmesh.runtime.

Scenarios: 0, 1 and 3 WAT header plugins (tests/proxy/proxy_plugins.py, ABI 0_2_1: one
add-header host call per direction), and one real Go plugin (gpustack-higress-plugins
``transformer`` adding a request header; Higress Go SDK, ABI 0_2_100) when that package is
installed.

Stability on a shared machine: every scenario is warmed up first, then the scenarios are timed
round-robin (``--repeats`` rounds of ``--requests`` requests each, order reversed every other
round so drift cancels), with a GC collection before each timed batch; the median over rounds is
reported, with the min…max spread.

Guest calls per request = the stream callbacks the ABI makes for this exchange (from each
module's exports, independent of how the runtime is written) + the allocations the host asks the
guest's malloc for (observed in a separate, untimed pass). µs per guest call =
(scenario − 0 plugins) / guest calls per request: the marginal cost of one crossing, including
the host calls made from inside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "proxy"))

from wasmesh.http.filter import HttpFilterFactory, StreamInfo  # noqa: E402
from wasmesh.http.filter_manager import FilterManager  # noqa: E402
from wasmesh.http.headers import HeaderMap  # noqa: E402
from wasmesh.runtime import PluginSpec, Runtime, WasmPlugin  # noqa: E402
from wasmesh.testing.harness import ManualScheduler  # noqa: E402
from wasmesh.testing.wasm_exports import read_exports  # noqa: E402

# What wrk sends, plus what the proxy adds before the chain runs (x-forwarded-proto, x-request-id).
REQUEST_PAIRS: tuple[tuple[bytes, bytes], ...] = (
    (b":method", b"GET"),
    (b":path", b"/"),
    (b":authority", b"127.0.0.1:8080"),
    (b":scheme", b"http"),
    (b"x-forwarded-proto", b"http"),
    (b"x-request-id", b"6f1c2a9e-3b4d-4c5e-8f70-112233445566"),
)
# What bench_proxy.py's echo upstream answers.
RESPONSE_BODY = b"hello from the echo upstream\n"
RESPONSE_PAIRS: tuple[tuple[bytes, bytes], ...] = (
    (b":status", b"200"),
    (b"content-type", b"text/plain"),
    (b"content-length", str(len(RESPONSE_BODY)).encode()),
)

GO_PLUGIN = "transformer"
GO_PLUGIN_CONFIG = {"reqRules": [{"operate": "add", "headers": [{"key": "x-added", "value": "by-wasm"}]}]}


class BenchError(RuntimeError):
    """A scenario cannot be measured (plugin missing, exchange did not complete)."""


# --------------------------------------------------------------------------- one exchange


class BenchSink:
    """The ExchangeSink of one request: only notes what reached the upstream and the client."""

    __slots__ = ("upstream_request_done", "response_done", "reset_details")

    def __init__(self) -> None:
        self.upstream_request_done = False
        self.response_done = False
        self.reset_details: str | None = None

    def upstream_request_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.upstream_request_done = end_stream

    def upstream_request_data(self, data: bytes, end_stream: bool) -> None:
        self.upstream_request_done = end_stream

    def upstream_request_trailers(self, trailers: HeaderMap) -> None:
        self.upstream_request_done = True

    def downstream_response_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        self.response_done = end_stream

    def downstream_response_data(self, data: bytes, end_stream: bool) -> None:
        self.response_done = end_stream

    def downstream_response_trailers(self, trailers: HeaderMap) -> None:
        self.response_done = True

    def reset(self, details: str) -> None:
        self.reset_details = details

    def pause_request_source(self) -> None:
        return

    def resume_request_source(self) -> None:
        return


def stream_info(connection_id: int, node: dict[str, Any]) -> StreamInfo:
    """What the proxy fills in for a request on a plain HTTP/1.1 listener."""
    return StreamInfo(
        connection_id=connection_id,
        downstream_remote_address=("127.0.0.1", 40000),
        downstream_local_address=("127.0.0.1", 8080),
        node=node,
        listener_name="bench",
        route_name="default",
        cluster_name="upstream",
        upstream_address=("127.0.0.1", 9090),
    )


def one_request(factories: list[HttpFilterFactory], node: dict[str, Any], connection_id: int) -> None:
    """Request headers in, upstream answers after the chain let the request through, then complete."""
    sink = BenchSink()
    manager = FilterManager(factories, stream_info(connection_id, node), sink)
    manager.on_request_headers(HeaderMap(REQUEST_PAIRS), True)
    if not sink.upstream_request_done:
        raise BenchError(f"the request did not reach the upstream (reset: {sink.reset_details})")
    manager.on_response_headers(HeaderMap(RESPONSE_PAIRS), False)
    manager.on_response_data(RESPONSE_BODY, True)
    if not sink.response_done:
        raise BenchError(f"the response did not reach the client (reset: {sink.reset_details})")
    manager.complete()


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    label: str
    factories: list[HttpFilterFactory]
    modules: list[bytes]
    guest_calls: dict[str, float] = field(default_factory=dict)  # per request, by export name
    allocations_counted: bool = True
    batches_us: list[float] = field(default_factory=list)  # µs/request of each timed batch

    @property
    def guest_calls_per_request(self) -> float:
        return sum(self.guest_calls.values())

    @property
    def median_us(self) -> float:
        return statistics.median(self.batches_us)


def wat_header_modules(count: int) -> list[tuple[str, bytes]]:
    import wasmtime
    from proxy_plugins import header_plugin_wat

    return [(f"tag{i}", bytes(wasmtime.wat2wasm(header_plugin_wat(f"T{i}")))) for i in range(count)]


def go_plugin_module() -> bytes | None:
    try:
        import gpustack_higress_plugins
    except ImportError:
        return None
    found = sorted(
        (Path(gpustack_higress_plugins.__file__).parent / "plugins" / GO_PLUGIN).glob("*/plugin.wasm")
    )
    return found[-1].read_bytes() if found else None


def load(runtime: Runtime, name: str, module: bytes, configuration: bytes = b"") -> WasmPlugin:
    return runtime.load_plugin(PluginSpec(name=name, module=module, configuration=configuration))


# --------------------------------------------------------------------------- guest-call counting

# The stream callbacks the Proxy-Wasm ABI makes for this exchange (headers-only request, response
# headers then one body chunk ending the stream, no trailers), each only if the module exports it.
# Counted from the module's exports rather than by hooking the runtime, so the count does not
# depend on how the runtime is optimised and cannot silently miss a call.
CALLBACKS_PER_REQUEST = (
    "proxy_on_context_create",
    "proxy_on_request_headers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_log",
    "proxy_on_done",
    "proxy_on_delete",
)


def callbacks_per_request(module: bytes) -> dict[str, float]:
    exported = {export.name for export in read_exports(module)}
    return {name: 1.0 for name in CALLBACKS_PER_REQUEST if name in exported}


def _unwrapper(vm: Any) -> Callable[[], None]:
    def undo() -> None:
        vm.__dict__.pop("allocate", None)  # the wrapper shadows the class's method

    return undo


@contextmanager
def counting_allocations(factories: list[HttpFilterFactory], counter: list[int]) -> Iterator[bool]:
    """Count the guest allocations the host asks for (each is a call into the guest's malloc).

    Best effort: wraps ``PluginVm.allocate`` (what the runtime uses to hand data to the guest)
    for the duration only, so the timed passes run unwrapped. Yields False when the runtime
    no longer exposes it; allocations are then left out of the guest-call count.
    """
    restore: list[Callable[[], None]] = []
    seen: set[int] = set()
    available = True
    try:
        for factory in factories:
            vm = getattr(factory, "vm", None)
            if vm is None or id(vm) in seen:
                continue
            seen.add(id(vm))
            allocate = getattr(vm, "allocate", None)
            if allocate is None or not hasattr(vm, "__dict__"):
                available = False
                continue

            def counted_allocate(size: int, _allocate: Any = allocate) -> Any:
                counter[0] += 1
                return _allocate(size)

            vm.allocate = counted_allocate
            restore.append(_unwrapper(vm))
        yield available
    finally:
        for undo in restore:
            undo()


def count_guest_calls(scenario: Scenario, node: dict[str, Any], requests: int = 20) -> None:
    """Callbacks from the exports; allocations averaged after two uncounted requests."""
    calls: dict[str, float] = {}
    for module in scenario.modules:
        for name, n in callbacks_per_request(module).items():
            calls[name] = calls.get(name, 0.0) + n
    for i in range(2):
        one_request(scenario.factories, node, i + 1)
    counter = [0]
    with counting_allocations(scenario.factories, counter) as available:
        for i in range(requests):
            one_request(scenario.factories, node, i + 1)
    if available and counter[0]:
        calls["(allocations)"] = counter[0] / requests
    scenario.allocations_counted = available
    scenario.guest_calls = calls


# --------------------------------------------------------------------------- timing


def time_batch(scenario: Scenario, node: dict[str, Any], requests: int) -> float:
    """µs per request over one batch, after a full collection so earlier garbage is not billed here."""
    factories = scenario.factories
    gc.collect()
    start = time.perf_counter()
    for i in range(requests):
        one_request(factories, node, i + 1)
    return (time.perf_counter() - start) / requests * 1e6


def run(scenarios: list[Scenario], node: dict[str, Any], requests: int, repeats: int, warmup: int) -> None:
    for scenario in scenarios:
        for i in range(warmup):
            one_request(scenario.factories, node, i + 1)
    for round_index in range(repeats):
        order = scenarios if round_index % 2 == 0 else scenarios[::-1]
        for scenario in order:
            scenario.batches_us.append(time_batch(scenario, node, requests))
        line = ", ".join(f"{s.label} {s.batches_us[-1]:.1f}" for s in scenarios)
        print(f"round {round_index + 1}/{repeats} (µs/request): {line}", file=sys.stderr, flush=True)


def report(scenarios: list[Scenario]) -> list[str]:
    baseline = scenarios[0]
    rows = [
        "| scenario | µs/request (min…max) | added µs | guest calls/request | µs per guest call |",
        "|---|---|---|---|---|",
    ]
    for scenario in scenarios:
        spread = f"{min(scenario.batches_us):.1f}…{max(scenario.batches_us):.1f}"
        calls = scenario.guest_calls_per_request
        if scenario is baseline:
            added, per_call = "—", "—"
        else:
            added_us = scenario.median_us - baseline.median_us
            added = f"{added_us:+.1f}"
            per_call = f"{added_us / calls:.2f}" if calls else "—"
        rows.append(
            f"| {scenario.label} | {scenario.median_us:.1f} ({spread}) | {added} | {calls:g} | {per_call} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per timed batch")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds over all scenarios (median)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed requests per scenario first")
    parser.add_argument("--no-go", action="store_true", help=f"skip the Go plugin ({GO_PLUGIN})")
    args = parser.parse_args()
    if args.requests < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--requests and --repeats must be at least 1, --warmup at least 0")

    node: dict[str, Any] = {"id": "bench", "cluster": "bench"}
    # A manual clock: nothing here sets timers on the request path; the epoch ticker still runs.
    runtime = Runtime(scheduler=ManualScheduler(), node=node, log_handler=lambda plugin, level, msg: None)
    try:
        wat = wat_header_modules(3)
        one: list[HttpFilterFactory] = [load(runtime, "one-" + name, module) for name, module in wat[:1]]
        three: list[HttpFilterFactory] = [load(runtime, "chain-" + name, module) for name, module in wat]
        wat_modules = [module for _, module in wat]
        scenarios = [
            Scenario("0 plugins", [], []),
            Scenario("1 WAT header plugin", one, wat_modules[:1]),
            Scenario("3 WAT header plugins", three, wat_modules),
        ]
        if not args.no_go:
            go_module = go_plugin_module()
            if go_module is None:
                print(f"gpustack-higress-plugins not installed: skipping {GO_PLUGIN}", file=sys.stderr)
            else:
                config = json.dumps(GO_PLUGIN_CONFIG).encode()
                go = load(runtime, GO_PLUGIN, go_module, config)
                scenarios.append(Scenario(f"Go {GO_PLUGIN} (adds a header)", [go], [go_module]))
        for scenario in scenarios:
            count_guest_calls(scenario, node)
        run(scenarios, node, args.requests, args.repeats, args.warmup)
    finally:
        runtime.close()

    print("\n".join(report(scenarios)))
    for scenario in scenarios[1:]:
        calls = ", ".join(f"{name} {n:g}" for name, n in sorted(scenario.guest_calls.items()))
        missing = "" if scenario.allocations_counted else " (allocations not countable: left out)"
        print(f"guest calls per request, {scenario.label}: {calls}{missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
