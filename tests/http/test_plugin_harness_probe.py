"""PluginHarness with a real compiled plugin — the worked example of docs/testing-plugins.md.

The plugin is tests/plugins/c/probe.c (C, wasi-libc): request header `x-probe: <cases>` picks what
it does, and it reports each host call's result in `x-probe-*` response headers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmesh.testing import HarnessError, HttpCall, Plugin, PluginHarness, Upstream

PROBE = Path(__file__).resolve().parents[1] / "plugins" / "build" / "probe.wasm"


@pytest.fixture
def probe() -> Iterator[PluginHarness]:
    if not PROBE.exists():
        pytest.skip("tests/plugins/build/probe.wasm is not built (scripts/build-test-plugins.sh)")
    # A vm_id of its own: shared data and queues are shared by every VM with the same vm_id.
    with PluginHarness(PROBE, config={"tick_ms": 100}, vm_id=f"probe-{uuid.uuid4().hex[:8]}") as harness:
        yield harness


def test_request_reaches_upstream_with_the_plugin_edits(probe: PluginHarness) -> None:
    r = probe.request("POST", "/orders?id=7", headers={"x-probe": "req-headers", "x-probe-in": "hello"},
                      body=b"payload")  # fmt: skip
    assert r.status == 200 and r.body == b"upstream-body"  # the default upstream's answer
    assert r.header("x-probe-get") == "0:hello"  # proxy_get_header_map_value → OK, "hello"
    up = r.upstream_request
    assert up is not None and up.method == "POST" and up.path == "/orders?id=7" and up.body == b"payload"
    assert up.header("x-probe-added") == "added" and up.header("x-probe-replaced") == "replaced"


def test_custom_upstream_and_response_body_edit(probe: PluginHarness) -> None:
    upstream = Upstream(status=201, headers={"content-type": "text/plain"}, body=b"created")
    r = probe.request("GET", "/", headers={"x-probe": "resp-body-append"}, upstream=upstream)
    assert r.status == 201 and r.body == b"created[probe-append]"


def test_local_reply_never_reaches_upstream(probe: PluginHarness) -> None:
    r = probe.request("GET", "/", headers={"x-probe": "local", "x-probe-local-status": "401"})
    assert r.status == 401 and r.local_reply and r.upstream_request is None
    assert r.body == b"probe local reply\n" and r.details == "probe_local_reply"


def test_logs_metrics_and_shared_data(probe: PluginHarness) -> None:
    probe.request("GET", "/", headers={"x-probe": "metrics,shared", "x-probe-key": "k1"})
    assert probe.metrics["probe_counter_k1"] == 5 and probe.metric("probe_gauge_k1") == 12
    assert probe.shared_data[b"probe-shared-k1"] == b"v2"
    assert any("on_configure" in line for line in probe.log_messages())


def test_ticks_follow_the_manual_clock(probe: PluginHarness) -> None:
    assert b"probe-ticks" not in probe.shared_data  # time stands still until the test moves it
    probe.tick(3)  # fires on_tick three times (tick_ms: 100)
    assert probe.shared_data[b"probe-ticks"] == b"3"
    probe.advance(1.0)  # ten more periods
    r = probe.request("GET", "/", headers={"x-probe": "ticks"})
    assert r.header("x-probe-ticks") == "0:13"


def test_http_call_is_answered_by_a_cluster_handler() -> None:
    if not PROBE.exists():
        pytest.skip("probe.wasm is not built")

    def auth_service(call: HttpCall) -> Upstream:
        return Upstream(200, {"x-probe-call-reply": "yes"}, b"call-reply")

    with PluginHarness(PROBE, clusters={"auth": auth_service}) as h:
        r = h.request("GET", "/", headers={"x-probe": "http-call", "x-probe-cluster": "auth"})
        assert r.header("x-probe-call-body") == "0:call-reply"
        assert r.upstream_request is not None and r.upstream_request.header("x-probe-call-status") == "200"
        [call] = h.http_calls
        assert call.cluster == "auth" and call.path == "/probe-call" and call.answered
        # An unknown cluster is refused at dispatch (BadArgument), as Envoy does.
        r = h.request("GET", "/", headers={"x-probe": "http-call", "x-probe-cluster": "nowhere"})
        assert r.header("x-probe-call-dispatch") == "2"


def test_http_call_without_answer_reports_a_failure() -> None:
    if not PROBE.exists():
        pytest.skip("probe.wasm is not built")
    with PluginHarness(PROBE, clusters={"down": lambda call: None}) as h:  # None = reset/timeout
        r = h.request("GET", "/", headers={"x-probe": "http-call", "x-probe-cluster": "down"})
        assert r.header("x-probe-call-has-headers") == "no"


def test_chain_runs_plugins_in_order() -> None:
    if not PROBE.exists():
        pytest.skip("probe.wasm is not built")
    first = Plugin(PROBE, name="first", root_id="", vm_id="chain-a")
    second = Plugin(PROBE, name="second", root_id="", vm_id="chain-b")
    with PluginHarness.chain([first, second]) as h:
        r = h.request("GET", "/", headers={"x-probe": "props"})
        # Both saw the exchange; the response passes the second plugin first, so its headers come first.
        assert r.header_values("x-probe-prop-plugin-name") == ["0:second", "0:first"]


def test_bad_inputs_fail_with_one_line(tmp_path: Path) -> None:
    if not PROBE.exists():
        pytest.skip("probe.wasm is not built")
    from wasmesh.runtime import PluginLoadError

    with pytest.raises(HarnessError, match="cannot read plugin module"):
        PluginHarness(tmp_path / "missing.wasm")
    with pytest.raises(PluginLoadError) as refused:
        PluginHarness(PROBE, config={"fail_configure": True})  # the probe refuses this config
    assert "\n" not in str(refused.value)


def test_trailers_both_ways_and_chunked_body(probe: PluginHarness) -> None:
    upstream = Upstream(200, {"content-type": "text/plain"}, b"streamed", trailers={"x-trailer-in": "up"})
    r = probe.request("POST", "/", headers={"x-probe": "req-trailers,resp-trailers"},
                      chunks=[b"part1-", b"part2"], trailers={"x-trailer-in": "down"}, upstream=upstream)
    up = r.upstream_request
    assert up is not None and up.body == b"part1-part2" and up.trailers is not None
    assert up.trailers.get(b"x-probe-trailer-added") == b"added"
    assert r.header("x-probe-req-trailer-get") == "0:down"
    assert r.trailers is not None and r.trailers.get(b"x-probe-resp-trailer-added") == b"added"
    assert r.trailers.get(b"x-probe-resp-trailer-get") == b"0:up"
