"""The 14 Go plugins of PyPI gpustack-higress-plugins, through the PluginHarness (real runtime, real
filter manager): each loads with a documented configuration and does what its README says.

Configurations follow the plugins' READMEs (gpustack/gpustack-higress-plugin extensions/<name>/README.md
and alibaba/higress plugins/wasm-go/extensions/<name>/README.md). Plugins that can also run under
stock Envoy are compared with it in tests/differential/test_differential_higress.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wasmesh.testing import HttpCall, PluginHarness, Upstream


def higress(name: str) -> Path:
    try:
        import gpustack_higress_plugins
    except ImportError:
        pytest.skip("gpustack-higress-plugins is not installed")
    found = sorted((Path(gpustack_higress_plugins.__file__).parent / "plugins" / name).glob("*/plugin.wasm"))
    if not found:
        pytest.skip(f"gpustack-higress-plugins has no {name}")
    return found[-1]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
AUTHZ = {
    "route_match_regexes": ["^default$"],  # the harness's route is named "default"
    "authz": {
        "endpoint": {"path": "/token-auth", "request_method": "GET", "service_name": "auth.svc",
                     "service_port": 80},
        "timeout": 2000,
        "authorization_request": {"allowed_headers": [{"exact": "authorization"}]},
    },
}

# name -> a documented configuration it accepts
DOCUMENTED_CONFIGS: dict[str, Any] = {
    "ai-data-masking": {"deny_words": ["secretword"], "deny_openai": True, "deny_raw": True},
    "ai-statistics": {},
    "gpustack-ai-proxy": {"provider": {"type": "openai", "apiTokens": ["sk-test"]}},
    "gpustack-ext-auth": AUTHZ,
    "gpustack-generic-proxy-router": {},
    "gpustack-ip-acl": {"consumers": {"alice": {"deniedCidrs": ["10.0.0.0/8"]}}},
    "gpustack-lb": {},
    "gpustack-lb-decision-service": {},
    "gpustack-lb-least-load": {},
    "gpustack-lb-session-affinity": {"sessionKeys": [{"header": "session_id"}], "weight": 1},
    "gpustack-rate-limit": {
        "rule_name": "rl",
        "enable_on_path_suffix": ["*"],
        "limit_combinations": [
            {"name": "per-user", "match": [{"source": "header", "name": "x-user", "value": "*"}],
             "query_limits": {"per_minute": 2}},
        ],
    },  # fmt: skip
    "gpustack-set-header-pre-route": {"routeNameHeader": "x-gpustack-route", "enableOnPathSuffix": ["*"]},
    "gpustack-token-usage": {},
    "transformer": {"reqRules": [{"operate": "add", "headers": [{"key": "x-added", "value": "yes"}]}]},
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_CONFIGS))
def test_plugin_loads_with_documented_config_and_serves(name: str) -> None:
    with PluginHarness(higress(name), config=DOCUMENTED_CONFIGS[name], clusters={"*": Upstream(200)}) as h:
        r = h.request("POST", "/v1/chat/completions", {"content-type": "application/json"}, json.dumps(CHAT))
        assert r.status in (200, 401, 403), (name, r.status, r.body[:200])
        assert not r.reset


def test_a_broken_config_is_refused_with_one_line() -> None:
    from wasmesh.runtime import PluginLoadError

    with pytest.raises(PluginLoadError) as refused:
        PluginHarness(higress("gpustack-set-header-pre-route"), config={})  # neither header configured
    assert "\n" not in str(refused.value) and "on_configure" in str(refused.value)


def test_ip_acl_denies_by_consumer_and_cidr() -> None:
    config = {
        "realIPHeader": "x-real-ip",
        "consumers": {"alice": {"deniedCidrs": ["10.0.0.0/8"]}, "bob": {"allowedCidrs": ["192.168.1.0/24"]},
                      "*-ci": {"deniedCidrs": ["203.0.113.0/24"]}},
    }  # fmt: skip
    with PluginHarness(higress("gpustack-ip-acl"), config=config) as h:
        denied = h.request("GET", "/v1/models", {"x-mse-consumer": "alice", "x-real-ip": "10.1.2.3"})
        assert denied.status == 403 and denied.upstream_request is None and denied.local_reply
        assert denied.header("content-type") == "application/json"
        assert h.request("GET", "/", {"x-mse-consumer": "alice", "x-real-ip": "8.8.8.8"}).status == 200
        assert h.request("GET", "/", {"x-mse-consumer": "bob", "x-real-ip": "192.168.1.9"}).status == 200
        assert h.request("GET", "/", {"x-mse-consumer": "bob", "x-real-ip": "192.168.2.9"}).status == 403
        assert h.request("GET", "/", {"x-mse-consumer": "build-ci", "x-real-ip": "203.0.113.5"}).status == 403
        assert h.request("GET", "/", {"x-real-ip": "10.1.2.3"}).status == 200  # no consumer: unrestricted


def test_set_header_pre_route_adds_route_name_on_ai_paths_only() -> None:
    config = {"routeNameHeader": "x-gpustack-route"}  # default suffixes: /completions, /embeddings, ...
    with PluginHarness(higress("gpustack-set-header-pre-route"), config=config) as h:
        r = h.request("POST", "/v1/chat/completions?stream=1", {"content-type": "application/json"}, b"{}")
        assert r.upstream_request is not None and r.upstream_request.header("x-gpustack-route") == "default"
        plain = h.request("GET", "/healthz").upstream_request
        assert plain is not None and plain.header("x-gpustack-route") is None


def test_rate_limit_local_mode_returns_429_past_the_quota() -> None:
    # Local mode keeps counters in shared data, which every VM with the same vm_id shares: own one.
    config = DOCUMENTED_CONFIGS["gpustack-rate-limit"]
    with PluginHarness(higress("gpustack-rate-limit"), config=config, vm_id=f"rl-{uuid.uuid4().hex}") as h:
        statuses = [h.request("GET", "/v1/chat/completions", {"x-user": "u1"}).status for _ in range(3)]
        assert statuses == [200, 200, 429]
        rejected = h.request("GET", "/v1/chat/completions", {"x-user": "u1"})
        assert rejected.details == "gpustack-rate-limit.rejected"
        assert json.loads(rejected.body)["error"]["code"] == 429
        assert h.request("GET", "/v1/chat/completions", {"x-user": "u2"}).status == 200  # its own bucket


@pytest.fixture
def ext_auth() -> Iterator[PluginHarness]:
    def authorize(call: HttpCall) -> Upstream:
        if call.header("authorization") == "Bearer good":
            return Upstream(200, {"x-mse-consumer": "alice"}, b"ok")
        return Upstream(401, {"content-type": "text/plain"}, b"denied")

    # wasm-go names the cluster of service auth.svc port 80 "outbound|80||auth.svc".
    clusters = {"outbound|80||auth.svc": authorize}
    with PluginHarness(higress("gpustack-ext-auth"), config=AUTHZ, clusters=clusters) as h:
        yield h


def test_ext_auth_calls_out_and_relays_a_rejection(ext_auth: PluginHarness) -> None:
    r = ext_auth.request("GET", "/v1/chat/completions", {"authorization": "Bearer bad"})
    assert r.status == 401 and r.body == b"denied" and r.upstream_request is None
    call = ext_auth.http_calls[-1]
    assert call.cluster == "outbound|80||auth.svc" and call.method == "GET" and call.path == "/token-auth"
    assert call.header("authorization") == "Bearer bad" and call.answered
    assert call.header("x-original-uri") == "/v1/chat/completions"


def test_ext_auth_lets_an_authorized_caller_through_with_its_consumer(ext_auth: PluginHarness) -> None:
    headers = {"authorization": "Bearer good", "x-mse-consumer": "evil"}
    r = ext_auth.request("GET", "/v1/chat/completions", headers)
    assert r.status == 200 and r.upstream_request is not None
    assert r.upstream_request.header("x-mse-consumer") == "alice"  # the client's copy is replaced


def test_ext_auth_fails_closed_when_the_auth_server_is_unreachable() -> None:
    with PluginHarness(higress("gpustack-ext-auth"), config=AUTHZ, clusters={"*": lambda call: None}) as h:
        r = h.request("GET", "/v1/chat/completions", {"authorization": "Bearer x"})
        assert r.status == 403 and r.upstream_request is None  # status_on_error defaults to 403


def test_transformer_rewrites_headers_body_and_response() -> None:
    config = {
        "reqRules": [
            {"operate": "remove", "headers": [{"key": "x-remove"}]},
            {"operate": "rename", "headers": [{"oldKey": "x-old", "newKey": "x-new"}]},
            {"operate": "map", "headers": [{"fromKey": "userId", "toKey": "x-user-id"}], "mapSource": "body"},
            {"operate": "add", "body": [{"key": "added", "value": "v"}]},
        ],
        "respRules": [{"operate": "add", "headers": [{"key": "x-resp", "value": "1"}]}],
    }
    with PluginHarness(higress("transformer"), config=config) as h:
        r = h.request("POST", "/x", {"content-type": "application/json", "x-remove": "1", "x-old": "v"},
                      b'{"userId": 12}')  # fmt: skip
        up = r.upstream_request
        assert up is not None and up.header("x-user-id") == "12" and up.header("x-new") == "v"
        assert up.header("x-remove") is None and up.header("x-old") is None
        assert json.loads(up.body) == {"userId": 12, "added": "v"}
        assert r.header("x-resp") == "1"


def test_ai_data_masking_blocks_a_deny_word_with_an_openai_answer() -> None:
    with PluginHarness(higress("ai-data-masking"), config=DOCUMENTED_CONFIGS["ai-data-masking"]) as h:
        bad = {"model": "m", "messages": [{"role": "user", "content": "the secretword here"}]}
        r = h.request("POST", "/v1/chat/completions", {"content-type": "application/json"}, json.dumps(bad))
        assert r.upstream_request is None and r.local_reply
        assert json.loads(r.body)["choices"][0]["message"]["role"] == "assistant"
        assert any("secretword" in m for m in h.log_messages())
        ok = h.request("POST", "/v1/chat/completions", {"content-type": "application/json"}, json.dumps(CHAT))
        assert ok.status == 200 and ok.upstream_request is not None


def test_ai_proxy_rewrites_to_the_provider_with_its_token() -> None:
    with PluginHarness(higress("gpustack-ai-proxy"), config=DOCUMENTED_CONFIGS["gpustack-ai-proxy"]) as h:
        r = h.request("POST", "/v1/chat/completions", {"content-type": "application/json",
                      "authorization": "Bearer user-key"}, json.dumps(CHAT))  # fmt: skip
        up = r.upstream_request
        assert up is not None and up.authority == "api.openai.com"
        assert up.header("authorization") == "Bearer sk-test"
        assert json.loads(up.body)["messages"] == CHAT["messages"]
