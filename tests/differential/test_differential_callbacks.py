"""Envoy 1.40 vs wasmesh for what happens outside a filter call: ticks, shared-queue deliveries,
http_call answers that never come or break, traps in any of those and the failure policy that follows,
ABI 0.1.0 modules, and the VM environment (vmConfig.env) a plugin reads through WASI.

The plugin is tests/plugins/c/callbacks.c. wasmesh runs through the PluginHarness (a manual clock:
ticks fire when the test advances it) and, where real timers or real sockets are the point, through
`python -m wasmesh run`. Envoy's timing is not asserted, only its semantics: a tick fires on the root
that asked for it and never much sooner than the period; a queue item reaches the root that
registered the queue; a trap reaches the failure policy.

Envoy 1.40's behaviour, as observed here and pinned by these tests:
* Every copy of the VM ticks: the main thread's as well as each worker's (so a shared counter grows
  twice per period with --concurrency 1). A wasmesh worker process has one copy.
* A trapping stream under `failure_policy: FAIL_OPEN` is answered 503 (only later streams skip the
  plugin); under the deprecated `fail_open: true` it continues. wasmesh's FAIL_OPEN does the latter.
* FAIL_RELOAD: streams are answered 503 until the reload backoff (1 s base, jittered) has passed,
  then a fresh VM serves. wasmesh reloads on the first stream after the failure (backoff only between
  repeated failures).
* A stream paused on an http_call whose on_http_call_response traps is never answered, on both.
* An http_call that times out is answered by Envoy's AsyncClient router itself (504, "upstream
  request timeout"); one that cannot connect gets its 503; one whose upstream closes mid-response
  gets no headers and status BrokenConnection "reset".
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from differential_support import (
    DifferentialPair,
    SilentUpstream,
    SocketResponse,
    WasmeshRun,
    assert_same_exchange,
    built_test_plugin,
    need_envoy,
    poll,
    start_pair,
    stop_pair,
    wasmplugin_document,
)

from wasmesh.testing.compare import ObservedExchange
from wasmesh.testing.envoy import EnvoyError, EnvoyResponse, EnvoyRunner, EnvoyWasmPlugin, free_port
from wasmesh.testing.harness import PluginHarness
from wasmesh.testing.upstream import RecordingUpstream

pytestmark = pytest.mark.envoy

CALL_CLUSTER = "cb_call"
TICK_MS = 100


def fresh_key() -> str:
    """Shared data is process-wide in both proxies (and the harness shares one pytest process)."""
    return "k" + uuid.uuid4().hex[:10]


def callbacks_plugin(config: str, name: str = "callbacks", **options: object) -> EnvoyWasmPlugin:
    return EnvoyWasmPlugin(built_test_plugin("callbacks"), configuration=config, name=name, **options)  # type: ignore[arg-type]


@contextmanager
def pair_of(
    plugins: Sequence[EnvoyWasmPlugin], upstream: RecordingUpstream, clusters: Sequence[str] = ()
) -> Iterator[DifferentialPair]:
    need_envoy()
    pair = start_pair(plugins, upstream, cluster_names=clusters)
    try:
        yield pair
    finally:
        stop_pair(pair)


# What the tests send the plugin; every other x-cb-* header on an upstream request is its answer.
PLUGIN_INPUTS = frozenset({"x-cb-report", "x-cb-trap", "x-cb-env", "x-cb-enqueue", "x-cb-queue", "x-cb-call",
                           "x-cb-call-path", "x-cb-call-timeout"})  # fmt: skip


def cb_headers(observed: ObservedExchange | str) -> dict[str, str]:
    """The x-cb-* headers the plugin added to the request the upstream got ({} if none got there)."""
    if isinstance(observed, str) or observed.upstream is None:
        return {}
    return {k: v for k, v in observed.upstream.headers if k.startswith("x-cb-") and k not in PLUGIN_INPUTS}


def status_of(observed: ObservedExchange | str) -> int | str:
    return observed if isinstance(observed, str) else observed.status


REPORT = [("x-cb-report", "1")]


def ticked_three_times(seen: dict[str, str]) -> bool:
    """Three ticks in shared data, and two on the VM that served this request, so it measured a gap.
    Envoy ticks on each copy of the VM (its main thread's too), all counting into the one shared
    counter: the count alone does not say that the serving VM ticked twice."""
    return int(seen["x-cb-ticks"]) >= 3 and seen["x-cb-tick-gap-ms"] != "none"

Sender = Callable[..., EnvoyResponse | SocketResponse]  # EnvoyRunner.request or WasmeshRun.request


# ---------------------------------------------------------------------------------------------- ticks


def test_tick_counts_on_the_root_and_the_request_path_reads_it(recording_upstream: RecordingUpstream) -> None:
    with pair_of([callbacks_plugin(f"key={fresh_key()},tick={TICK_MS}")], recording_upstream) as pair:

        def three_ticks() -> dict[str, str] | None:
            seen = cb_headers(pair.run_envoy("GET", "/", [("host", "example.com"), *REPORT], b""))
            return seen if ticked_three_times(seen) else None

        under_envoy = poll("three ticks under Envoy", three_ticks)
        # The period is honoured: never much sooner than asked (Envoy's timer may fire a few ms early).
        assert int(under_envoy["x-cb-tick-gap-ms"]) >= TICK_MS // 2

        def wasmesh_ticks() -> str:
            seen = cb_headers(pair.run_wasmesh("GET", "/", [("host", "example.com"), *REPORT], b""))
            return seen["x-cb-ticks"]

        assert wasmesh_ticks() == "0"
        pair.harness.advance(0.35)
        assert wasmesh_ticks() == "3"
        pair.harness.advance(0.1)
        assert wasmesh_ticks() == "4"


def test_ticks_and_a_trap_in_on_tick_under_wasmesh_run_as_under_envoy(
    recording_upstream: RecordingUpstream, tmp_path: Path
) -> None:
    """Real timers: `wasmesh run` ticks at the period asked (never much sooner), the request path reads
    the count, and a trap in on_tick turns the following requests into Envoy's FAIL_CLOSE answer."""
    need_envoy()
    module = built_test_plugin("callbacks")
    tokens = f"key={fresh_key()},tick={TICK_MS}"
    document = wasmplugin_document("callbacks", module, plugin_config={"tokens": tokens})
    report = [("host", "example.com"), *REPORT]
    with EnvoyRunner([callbacks_plugin(tokens)], upstream_port=recording_upstream.port) as envoy, WasmeshRun(
        tmp_path, document, recording_upstream.port
    ) as run:  # fmt: skip
        for send in (envoy.request, run.request):

            def three_ticks(send: Sender = send) -> dict[str, str] | None:
                recording_upstream.clear()
                assert send("GET", "/", report).status == 200
                (request,) = recording_upstream.requests
                seen = {k: v for k, v in request.headers if k.startswith("x-cb-") and k not in PLUGIN_INPUTS}
                return seen if ticked_three_times(seen) else None

            assert int(poll("three ticks", three_ticks)["x-cb-tick-gap-ms"]) >= TICK_MS // 2
            recording_upstream.clear()
            assert send("GET", "/", [("host", "example.com"), ("x-cb-trap", "tick")]).status == 200

            def failed_closed(send: Sender = send) -> tuple[int, bytes] | None:
                response = send("GET", "/", report)
                return (response.status, response.body) if response.status != 200 else None

            assert poll("the trap in on_tick to fail the plugin closed", failed_closed) == (503, b"")
            recording_upstream.clear()
            assert send("GET", "/", report).status == 503 and recording_upstream.requests == []


# --------------------------------------------------------------------------------------------- queues


def test_queue_items_reach_the_root_that_registered_the_queue(recording_upstream: RecordingUpstream) -> None:
    """Two plugins on one VM; only `registrar` registers the queue. Both enqueue from the request path;
    every item is delivered to `registrar`'s on_queue_ready, under both proxies."""
    key, queue = fresh_key(), "cb-queue-" + uuid.uuid4().hex[:8]
    plugins = [
        callbacks_plugin(f"key={key},name=registrar,queue={queue}", name="registrar"),
        callbacks_plugin(f"key={key},name=bystander", name="bystander", root_id="bystander"),
    ]
    enqueue = [("host", "example.com"), ("x-cb-enqueue", "hello"), ("x-cb-queue", queue)]
    report = [("host", "example.com"), *REPORT]
    with pair_of(plugins, recording_upstream) as pair:
        envoy, wasmesh = pair.run_envoy("GET", "/", enqueue, b""), pair.run_wasmesh("GET", "/", enqueue, b"")
        assert_same_exchange(envoy, wasmesh)
        assert cb_headers(envoy)["x-cb-enqueue-status"] == "0:0"

        def delivered() -> str | None:
            log = cb_headers(pair.run_envoy("GET", "/", report, b""))["x-cb-queue-log"]
            return None if log == "empty" else log

        assert poll("on_queue_ready under Envoy", delivered) == "registrar:hello;registrar:hello;"
        assert cb_headers(pair.run_wasmesh("GET", "/", report, b""))["x-cb-queue-log"] == (
            "registrar:hello;registrar:hello;")


# ------------------------------------------------------------------------------------ failure policies

# Envoy PluginConfig settings → the label used in test ids. The harness gets the matching policy.
POLICIES: dict[str, dict[str, object]] = {
    "FAIL_CLOSED": {"failure_policy": "FAIL_CLOSED"},
    "FAIL_OPEN": {"failure_policy": "FAIL_OPEN"},
    "fail_open": {"fail_open": True},
    "FAIL_RELOAD": {"failure_policy": "FAIL_RELOAD"},
}


def expect_fresh_vm_under_envoy(pair: DifferentialPair) -> ObservedExchange:
    """FAIL_RELOAD under Envoy: 503 until the reload backoff passes, then a fresh VM (its first report)."""
    statuses: list[int | str] = []

    def fresh() -> ObservedExchange | None:
        observed = pair.run_envoy("GET", "/", [("host", "example.com"), *REPORT], b"")
        if status_of(observed) == 200 and cb_headers(observed).get("x-cb-vm-requests") == "1":
            assert isinstance(observed, ObservedExchange)
            return observed
        statuses.append(status_of(observed))
        return None

    served = poll("a reloaded VM under Envoy", fresh, interval_s=0.1)
    assert set(statuses) <= {503}, f"before the reload Envoy answered {statuses}"
    return served


def without_clock(observed: ObservedExchange | str) -> tuple[object, ...]:
    """An exchange without what depends on how long the proxy's clock ran (tick count and gap)."""
    assert isinstance(observed, ObservedExchange) and observed.upstream is not None
    upstream = [(k, v) for k, v in observed.upstream.headers if k not in ("x-cb-ticks", "x-cb-tick-gap-ms")]
    return observed.status, observed.headers, observed.body, upstream, observed.upstream.body


def after_the_failure(pair: DifferentialPair, policy: str) -> None:
    """What the next streams get once the VM failed: the same under both, per policy."""
    request = [("host", "example.com"), *REPORT]
    if policy == "FAIL_RELOAD":
        under_envoy = expect_fresh_vm_under_envoy(pair)
        under_wasmesh = pair.run_wasmesh("GET", "/", request, b"")  # reloaded at once, no 503 first
        # Envoy's clock ran on through the backoff (ticks, a measured gap); the harness's did not.
        assert without_clock(under_envoy) == without_clock(under_wasmesh)
        assert cb_headers(under_wasmesh)["x-cb-vm-requests"] == "1"
        return
    for _ in range(2):
        envoy, wasmesh = pair.run_envoy("GET", "/", request, b""), pair.run_wasmesh("GET", "/", request, b"")
        assert_same_exchange(envoy, wasmesh)
        if policy == "FAIL_CLOSED":
            assert isinstance(envoy, ObservedExchange)
            assert (envoy.status, envoy.body, envoy.upstream) == (503, b"", None)
        else:  # the plugin is skipped: the request reaches the upstream untouched
            assert status_of(envoy) == 200 and cb_headers(envoy) == {}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_trap_in_on_request_headers_applies_the_policy(
    recording_upstream: RecordingUpstream, policy: str
) -> None:
    plugin = callbacks_plugin(f"key={fresh_key()}", **POLICIES[policy])
    with pair_of([plugin], recording_upstream) as pair:
        envoy, wasmesh = pair.run(headers=[("x-cb-trap", "headers"), *REPORT])
        if policy == "FAIL_OPEN":
            # Envoy 1.40 fails the trapping stream itself closed under failure_policy FAIL_OPEN (its
            # cpp-host plugin keeps fail_open_ = false); wasmesh lets it continue, as `fail_open: true`.
            assert isinstance(envoy, ObservedExchange) and isinstance(wasmesh, ObservedExchange)
            assert (envoy.status, envoy.body, envoy.upstream) == (503, b"", None)
            assert wasmesh.status == 200 and cb_headers(wasmesh) == {}
        else:
            assert_same_exchange(envoy, wasmesh)
            expected = 200 if policy == "fail_open" else 503
            assert status_of(envoy) == expected
        after_the_failure(pair, policy)


ASYNC_POLICIES = ["FAIL_CLOSED", "fail_open", "FAIL_RELOAD"]


def wait_for_envoy_trap(pair: DifferentialPair, callback: str) -> None:
    poll(f"the trap in {callback} under Envoy",
         lambda: True if f"Function: {callback} failed" in pair.envoy.log_text() else None)  # fmt: skip


@pytest.mark.parametrize("policy", ASYNC_POLICIES)
def test_trap_in_on_tick_applies_the_policy(recording_upstream: RecordingUpstream, policy: str) -> None:
    plugin = callbacks_plugin(f"key={fresh_key()},tick={TICK_MS}", **POLICIES[policy])
    with pair_of([plugin], recording_upstream) as pair:
        envoy, wasmesh = pair.run(headers=[("x-cb-trap", "tick"), *REPORT])  # arms the next tick
        assert_same_exchange(envoy, wasmesh)
        assert status_of(envoy) == 200
        wait_for_envoy_trap(pair, "proxy_on_tick")
        pair.harness.advance(TICK_MS / 1000)
        after_the_failure(pair, policy)


@pytest.mark.parametrize("policy", ASYNC_POLICIES)
def test_trap_in_on_queue_ready_applies_the_policy(
    recording_upstream: RecordingUpstream, policy: str
) -> None:
    queue = "cb-queue-" + uuid.uuid4().hex[:8]
    plugin = callbacks_plugin(f"key={fresh_key()},queue={queue}", **POLICIES[policy])
    with pair_of([plugin], recording_upstream) as pair:
        # The delivery (and its trap) comes while this stream waits for the upstream: its response
        # callbacks then find the VM failed.
        arm = [("x-cb-trap", "queue"), ("x-cb-enqueue", "boom"), ("x-cb-queue", queue), *REPORT]
        envoy, wasmesh = pair.run(headers=arm)
        assert_same_exchange(envoy, wasmesh)
        assert isinstance(envoy, ObservedExchange) and envoy.upstream is not None
        assert envoy.status == (200 if policy == "fail_open" else 503)
        wait_for_envoy_trap(pair, "proxy_on_queue_ready")
        after_the_failure(pair, policy)


@pytest.mark.parametrize("policy", ASYNC_POLICIES)
def test_trap_in_on_http_call_response_applies_the_policy(
    recording_upstream: RecordingUpstream, policy: str
) -> None:
    plugin = callbacks_plugin(f"key={fresh_key()}", **POLICIES[policy])
    with pair_of([plugin], recording_upstream, clusters=[CALL_CLUSTER]) as pair:
        arm = [("x-cb-trap", "call"), ("x-cb-call", CALL_CLUSTER)]
        # The stream that waited for the call is never resumed, under either proxy.
        with pytest.raises(TimeoutError):
            pair.envoy.request("GET", "/", arm, timeout_s=3)
        wait_for_envoy_trap(pair, "proxy_on_http_call_response")
        stuck = pair.harness.send("GET", "/", arm)
        assert not stuck.done and stuck.upstream_request is None
        after_the_failure(pair, policy)


# ------------------------------------------------------------------------------- http_call failures


@pytest.fixture(scope="module")
def call_failure_proxies(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EnvoyRunner, WasmeshRun, RecordingUpstream]]:
    """Envoy and `wasmesh run`, each with clusters that never answer, break mid-response, refuse."""
    need_envoy()
    module = built_test_plugin("callbacks")
    with (
        RecordingUpstream() as upstream,
        SilentUpstream("silent") as silent,
        SilentUpstream("reset") as reset,
    ):
        clusters = {"silent": silent.port, "reset": reset.port, "refused": free_port()}
        envoy = EnvoyRunner([EnvoyWasmPlugin(module, configuration="key=calls", name="callbacks")],
                            upstream_port=upstream.port, clusters=clusters)  # fmt: skip
        envoy.start()
        try:
            document = wasmplugin_document("callbacks", module, plugin_config={"tokens": "key=calls"})
            workdir = tmp_path_factory.mktemp("calls")
            with WasmeshRun(workdir, document, upstream.port, clusters=clusters) as run:
                yield envoy, run, upstream
        finally:
            envoy.stop()


CALL_FAILURES: dict[str, tuple[list[tuple[str, str]], dict[str, str]]] = {
    # Envoy's AsyncClient answers a timeout itself: the plugin gets a 504 response, not a failure.
    "timeout": ([("x-cb-call", "silent"), ("x-cb-call-timeout", "300")],
                {"x-cb-call-headers": "3", "x-cb-call-status": "504",
                 "x-cb-call-body": "upstream request timeout"}),
    "reset-mid-response": ([("x-cb-call", "reset")],
                           {"x-cb-call-headers": "0", "x-cb-call-status": "none", "x-cb-call-body": "",
                            "x-cb-call-failure": "0:11:reset"}),
    "connection-refused": ([("x-cb-call", "refused")],
                           {"x-cb-call-headers": "3", "x-cb-call-status": "503",
                            "x-cb-call-body": "upstream connect error or disconnect/reset before headers. "
                                              "reset reason: remote connection failure"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CALL_FAILURES))
def test_http_call_failures_are_answered_as_envoy_answers_them(
    call_failure_proxies: tuple[EnvoyRunner, WasmeshRun, RecordingUpstream], case: str
) -> None:
    envoy, run, upstream = call_failure_proxies
    headers, expected = CALL_FAILURES[case]

    def answered(send: Sender) -> dict[str, str]:
        upstream.clear()
        response = send("GET", "/", [("host", "example.com"), *headers])
        assert response.status == 200
        (request,) = upstream.requests
        return {k: v for k, v in request.headers if k.startswith("x-cb-call-") and k not in PLUGIN_INPUTS}

    assert answered(envoy.request) == expected
    assert answered(run.request) == expected


# --------------------------------------------------------------------------------------- ABI 0.1.0


def test_abi_0_1_0_module_matches_envoy(recording_upstream: RecordingUpstream) -> None:
    """ABI 0.1.0 as the spec writes it: 2-parameter header callbacks (no end_of_stream)."""
    plugin = EnvoyWasmPlugin(built_test_plugin("abi_0_1_0_two_param"), name="abi-0-1-0")
    with pair_of([plugin], recording_upstream) as pair:
        for method, body in [("GET", b""), ("POST", b"a body")]:
            envoy, wasmesh = pair.run(method, "/abi", [("content-type", "text/plain")], body)
            assert_same_exchange(envoy, wasmesh)
            assert isinstance(envoy, ObservedExchange) and envoy.upstream is not None
            assert ("x-wat-abi", "0_1_0") in envoy.upstream.headers
            assert ("x-wat-abi", "0_1_0") in envoy.headers


def test_abi_0_1_0_marker_with_3_parameter_callbacks_envoy_refuses_wasmesh_runs(
    recording_upstream: RecordingUpstream,
) -> None:
    """An intended difference (docs/runtime.md): Envoy checks 0.1.0 callbacks against the 0.1.0
    signatures and refuses the module; wasmesh takes each callback's arity from its export type, as
    some real 0.1.0 binaries (emscripten, old TinyGo) need."""
    need_envoy()
    module = built_test_plugin("abi_0_1_0_three_param")
    envoy = EnvoyRunner([EnvoyWasmPlugin(module, name="three-param")], upstream_port=recording_upstream.port)
    with pytest.raises(EnvoyError) as refused:
        envoy.start()
    assert ("Bad function signature for: proxy_on_request_headers, want: i32 i32 -> i32, but the module "
            "exports: i32 i32 i32 -> i32") in str(refused.value)  # fmt: skip
    with PluginHarness(module) as harness:
        for method, body, eos in [("GET", b"", "1"), ("POST", b"a body", "0")]:
            response = harness.request(method, "/abi", body=body)
            assert response.upstream_request is not None
            assert response.upstream_request.header("x-wat-abi") == "0_1_0-3param"
            assert response.upstream_request.header("x-wat-eos") == eos


# --------------------------------------------------------------------------------- VM environment

ENV_CASES = {"CB_INLINE": "inline-value", "CB_FROM_HOST": "host-value", "CB_NOT_LISTED": "unset"}


def env_requests() -> list[tuple[str, list[tuple[str, str]]]]:
    return [(name, [("host", "example.com"), ("x-cb-env", name)]) for name in ENV_CASES]


def test_vm_env_reaches_environ_get_under_envoy_and_wasmesh_run(
    recording_upstream: RecordingUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vmConfig.env: INLINE values and HOST keys (copied from the proxy's own environment) reach the
    plugin's getenv; a variable the proxy has but the plugin config does not list stays unset."""
    need_envoy()
    module = built_test_plugin("callbacks")
    host_env = {"CB_FROM_HOST": "host-value", "CB_NOT_LISTED": "secret"}
    for name, value in host_env.items():
        monkeypatch.setenv(name, value)  # Envoy inherits the test's environment
    plugin = EnvoyWasmPlugin(module, configuration="key=env", name="callbacks",
                             env={"CB_INLINE": "inline-value"}, host_env_keys=("CB_FROM_HOST",))  # fmt: skip
    document = wasmplugin_document(
        "callbacks", module, plugin_config={"tokens": "key=env"},
        env=[{"name": "CB_INLINE", "value": "inline-value"}, {"name": "CB_FROM_HOST", "valueFrom": "HOST"}],
    )  # fmt: skip
    with EnvoyRunner([plugin], upstream_port=recording_upstream.port) as envoy, WasmeshRun(
        tmp_path, document, recording_upstream.port, env=host_env
    ) as run:  # fmt: skip
        for name, headers in env_requests():
            for send in (envoy.request, run.request):
                recording_upstream.clear()
                assert send("GET", "/", headers).status == 200
                assert recording_upstream.requests[-1].header("x-cb-env-value") == ENV_CASES[name], name


def test_vm_env_reaches_environ_get_under_the_harness(recording_upstream: RecordingUpstream) -> None:
    plugin = callbacks_plugin("key=env", env={"CB_INLINE": "inline-value", "CB_FROM_HOST": "host-value"})
    with pair_of([plugin], recording_upstream) as pair:
        for name, headers in env_requests():
            envoy = pair.run_envoy("GET", "/", headers, b"")
            wasmesh = pair.run_wasmesh("GET", "/", headers, b"")
            assert_same_exchange(envoy, wasmesh)
            assert cb_headers(wasmesh)["x-cb-env-value"] == ENV_CASES[name]
