"""The 14 plugins of PyPI gpustack-higress-plugins through the PluginHarness (real runtime, real filter
manager), each doing exactly what its README says.

13 are Go (Go 1.24 ``GOOS=wasip1`` reactors on higress-group/proxy-wasm-go-sdk and wasm-go, ABI 0_2_100);
ai-data-masking is Rust (rustc 1.80, proxy-wasm-rust-sdk with higress's wasm-rust wrapper), as each
module's ``producers`` section says. Configurations and expected behaviour follow the READMEs:
gpustack/gpustack-higress-plugin extensions/<name>/README.md and alibaba/higress
plugins/wasm-{go,rust}/extensions/<name>/README.md. Plugins that can also run under stock Envoy are
compared with it in tests/differential/test_differential_higress.py.
"""

from __future__ import annotations

import functools
import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from real_parts import higress_plugin

from wasmesh.http.filter import StreamInfo
from wasmesh.runtime import PluginLoadError, Runtime
from wasmesh.testing import HarnessResponse, HttpCall, Plugin, PluginHarness, Upstream, UpstreamRequest
from wasmesh.testing import harness as harness_module

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
JSON = {"content-type": "application/json"}
AUTHZ = {
    "route_match_regexes": ["^default$"],  # the harness's route is named "default"
    "authz": {
        "endpoint": {"path": "/token-auth", "request_method": "GET", "service_name": "auth.svc",
                     "service_port": 80},
        "timeout": 2000,
        "authorization_request": {"allowed_headers": [{"exact": "authorization"}]},
    },
}  # fmt: skip

# name -> a documented configuration it accepts (every plugin the package ships is listed)
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


def post_chat(
    h: PluginHarness,
    body: object = CHAT,
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
    upstream: Upstream | Callable[[UpstreamRequest], Upstream] | None = None,
) -> HarnessResponse:
    return h.request("POST", path, {**JSON, **(headers or {})}, json.dumps(body), upstream=upstream)


def sent(r: HarnessResponse) -> UpstreamRequest:
    """What reached the upstream (the test fails here when the chain answered itself)."""
    assert r.upstream_request is not None, (r.status, r.details, r.body[:200])
    return r.upstream_request


def shipped_plugins() -> list[Path]:
    return sorted(higress_plugin("transformer").parents[2].glob("*/*/plugin.wasm"))


def test_every_plugin_the_package_ships_is_covered() -> None:
    assert {p.parent.parent.name for p in shipped_plugins()} == set(DOCUMENTED_CONFIGS)


@pytest.mark.parametrize("name", sorted(DOCUMENTED_CONFIGS))
def test_plugin_with_documented_config_passes_an_ordinary_request_to_the_upstream(name: str) -> None:
    # An authenticated, in-quota, non-sensitive chat request: no plugin has a reason to stop it.
    with PluginHarness(higress_plugin(name), config=DOCUMENTED_CONFIGS[name],
                       clusters={"*": Upstream(200)}) as h:  # fmt: skip
        r = post_chat(h)
        outcome = (r.status, r.details, r.body, r.local_reply, r.reset)
        assert outcome == (200, "via_upstream", b"upstream-body", False, False)
        assert json.loads(sent(r).body)["messages"] == CHAT["messages"]


def test_a_broken_config_is_refused_with_one_line() -> None:
    with pytest.raises(PluginLoadError) as refused:
        PluginHarness(higress_plugin("gpustack-set-header-pre-route"), config={})  # neither header configured
    assert "\n" not in str(refused.value) and "on_configure" in str(refused.value)


# ------------------------------------------------------------------------------------ gpustack-ip-acl


def test_ip_acl_denies_by_consumer_and_cidr() -> None:
    config = {
        "realIPHeader": "x-real-ip",
        "consumers": {"alice": {"deniedCidrs": ["10.0.0.0/8"]}, "bob": {"allowedCidrs": ["192.168.1.0/24"]},
                      "*-ci": {"deniedCidrs": ["203.0.113.0/24"]}},
    }  # fmt: skip
    with PluginHarness(higress_plugin("gpustack-ip-acl"), config=config) as h:
        denied = h.request("GET", "/v1/models", {"x-mse-consumer": "alice", "x-real-ip": "10.1.2.3"})
        assert denied.status == 403 and denied.upstream_request is None and denied.local_reply
        assert denied.header("content-type") == "application/json"
        assert h.request("GET", "/", {"x-mse-consumer": "alice", "x-real-ip": "8.8.8.8"}).status == 200
        assert h.request("GET", "/", {"x-mse-consumer": "bob", "x-real-ip": "192.168.1.9"}).status == 200
        assert h.request("GET", "/", {"x-mse-consumer": "bob", "x-real-ip": "192.168.2.9"}).status == 403
        assert h.request("GET", "/", {"x-mse-consumer": "build-ci", "x-real-ip": "203.0.113.5"}).status == 403
        assert h.request("GET", "/", {"x-real-ip": "10.1.2.3"}).status == 200  # no consumer: unrestricted


# ------------------------------------------------------------------------ gpustack-set-header-pre-route


def test_set_header_pre_route_adds_route_name_on_ai_paths_only() -> None:
    config = {"routeNameHeader": "x-gpustack-route"}  # default suffixes: /completions, /embeddings, ...
    with PluginHarness(higress_plugin("gpustack-set-header-pre-route"), config=config) as h:
        r = h.request("POST", "/v1/chat/completions?stream=1", JSON, b"{}")
        assert sent(r).header("x-gpustack-route") == "default"
        assert sent(h.request("GET", "/healthz")).header("x-gpustack-route") is None


# ---------------------------------------------------------------------------------- gpustack-rate-limit


def test_rate_limit_local_mode_returns_429_past_the_quota() -> None:
    # Local mode keeps counters in shared data, which every VM with the same vm_id shares: own one.
    config = DOCUMENTED_CONFIGS["gpustack-rate-limit"]
    vm_id = f"rl-{uuid.uuid4().hex}"
    with PluginHarness(higress_plugin("gpustack-rate-limit"), config=config, vm_id=vm_id) as h:
        statuses = [h.request("GET", "/v1/chat/completions", {"x-user": "u1"}).status for _ in range(3)]
        assert statuses == [200, 200, 429]
        rejected = h.request("GET", "/v1/chat/completions", {"x-user": "u1"})
        assert rejected.details == "gpustack-rate-limit.rejected"
        assert json.loads(rejected.body)["error"]["code"] == 429
        assert h.request("GET", "/v1/chat/completions", {"x-user": "u2"}).status == 200  # its own bucket


# ------------------------------------------------------------------------------------ gpustack-ext-auth


@pytest.fixture
def ext_auth() -> Iterator[PluginHarness]:
    def authorize(call: HttpCall) -> Upstream:
        if call.header("authorization") == "Bearer good":
            return Upstream(200, {"x-mse-consumer": "alice"}, b"ok")
        return Upstream(401, {"content-type": "text/plain"}, b"denied")

    # wasm-go names the cluster of service auth.svc port 80 "outbound|80||auth.svc".
    clusters = {"outbound|80||auth.svc": authorize}
    with PluginHarness(higress_plugin("gpustack-ext-auth"), config=AUTHZ, clusters=clusters) as h:
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
    assert r.status == 200 and sent(r).header("x-mse-consumer") == "alice"  # the client's copy is replaced


def test_ext_auth_fails_closed_when_the_auth_server_is_unreachable() -> None:
    unreachable = {"*": lambda call: None}
    with PluginHarness(higress_plugin("gpustack-ext-auth"), config=AUTHZ, clusters=unreachable) as h:
        r = h.request("GET", "/v1/chat/completions", {"authorization": "Bearer x"})
        assert r.status == 403 and r.upstream_request is None  # status_on_error defaults to 403


# ---------------------------------------------------------------------------------------- transformer


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
    with PluginHarness(higress_plugin("transformer"), config=config) as h:
        r = h.request("POST", "/x", {**JSON, "x-remove": "1", "x-old": "v"}, b'{"userId": 12}')
        up = sent(r)
        assert up.header("x-user-id") == "12" and up.header("x-new") == "v"
        assert up.header("x-remove") is None and up.header("x-old") is None
        assert json.loads(up.body) == {"userId": 12, "added": "v"}
        assert r.header("x-resp") == "1"


# ------------------------------------------------------------------------------ ai-data-masking (Rust)

MASKING = {
    "deny_words": ["secretword"],
    "deny_openai": True,
    "deny_code": 403,
    "deny_message": "blocked: sensitive",
    "replace_roles": [
        {"regex": "%{EMAILLOCALPART}@%{HOSTNAME:domain}", "type": "replace", "restore": True,
         "value": "****@$domain"}
    ],
}


@pytest.fixture
def patient_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    """ai-data-masking compiles its GROK patterns in on_configure (about 2 s of CPU here). The runtime's
    start-up deadline counts wall-clock time, so on a loaded 2-core machine 5 s can run out; give it room."""
    monkeypatch.setattr(harness_module, "Runtime", functools.partial(Runtime, startup_deadline_ms=60_000))


@pytest.mark.usefixtures("patient_startup")
def test_ai_data_masking_blocks_a_deny_word_with_its_configured_code_and_openai_answer() -> None:
    with PluginHarness(higress_plugin("ai-data-masking"), config=MASKING) as h:
        r = post_chat(h, {"model": "m", "messages": [{"role": "user", "content": "the secretword here"}]})
        assert (r.status, r.local_reply, r.upstream_request) == (403, True, None)
        assert r.header("content-type") == "application/json"
        assert json.loads(r.body) == {
            "choices": [{"index": 0, "message": {"content": "blocked: sensitive", "role": "assistant"}}],
            "usage": {},
        }
        matched = "[ai-data-masking] custom deny word secretword matched from the secretword here"
        assert h.log_messages() == [matched]


@pytest.mark.usefixtures("patient_startup")
def test_ai_data_masking_masks_an_email_towards_the_model_and_restores_it_in_the_answer() -> None:
    def model(request: UpstreamRequest) -> Upstream:
        message = {"role": "assistant", "content": "I wrote to ****@example.com"}
        answer = {"choices": [{"index": 0, "message": message}]}
        return Upstream(200, JSON, json.dumps(answer))

    with PluginHarness(higress_plugin("ai-data-masking"), config=MASKING) as h:
        r = post_chat(h, {"model": "m", "messages": [{"role": "user", "content": "mail bob@example.com"}]},
                      upstream=model)  # fmt: skip
        assert json.loads(sent(r).body)["messages"] == [{"content": "mail ****@example.com", "role": "user"}]
        assert r.status == 200
        assert json.loads(r.body)["choices"][0]["message"]["content"] == "I wrote to bob@example.com"


# ---------------------------------------------------------------------------------- gpustack-ai-proxy


def test_ai_proxy_rewrites_to_the_provider_with_its_token() -> None:
    config = DOCUMENTED_CONFIGS["gpustack-ai-proxy"]
    with PluginHarness(higress_plugin("gpustack-ai-proxy"), config=config) as h:
        up = sent(post_chat(h, headers={"authorization": "Bearer user-key"}))
        assert up.authority == "api.openai.com"
        assert up.header("authorization") == "Bearer sk-test"
        assert json.loads(up.body)["messages"] == CHAT["messages"]


# ------------------------------------------------------------------------------------- ai-statistics

USAGE_ANSWER = Upstream(200, JSON, json.dumps({
    "id": "chatcmpl-1", "model": "qwen3",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}))  # fmt: skip


def test_ai_statistics_counts_tokens_by_route_upstream_model_and_consumer_on_its_paths_only() -> None:
    config = {"enable_path_suffixes": ["/v1/chat/completions"]}
    with PluginHarness(higress_plugin("ai-statistics"), config=config) as h:
        for consumer in ("alice", "alice", "bob"):
            assert post_chat(h, headers={"x-mse-consumer": consumer}, upstream=USAGE_ANSWER).status == 200
        assert post_chat(h, path="/healthz", upstream=USAGE_ANSWER).status == 200  # not an enabled path
        # llm_service_duration is a time in ms: not a fixed value
        counted = {name: n for name, n in h.metrics.items() if not name.endswith("llm_service_duration")}
        prefix = "route.default.upstream.upstream.model.qwen3.consumer"
        assert counted == {
            f"{prefix}.alice.metric.input_token": 10,
            f"{prefix}.alice.metric.output_token": 14,
            f"{prefix}.alice.metric.total_token": 24,
            f"{prefix}.alice.metric.llm_duration_count": 2,
            f"{prefix}.bob.metric.input_token": 5,
            f"{prefix}.bob.metric.output_token": 7,
            f"{prefix}.bob.metric.total_token": 12,
            f"{prefix}.bob.metric.llm_duration_count": 1,
        }


# ------------------------------------------------------------------------ gpustack-generic-proxy-router

ROUTER = {
    "prefix": "/model/proxy/",
    "addProviderHeader": "x-higress-llm-provider",
    "modelToHeader": "x-higress-llm-model-final",
    "aliasNameMapping": {"qwen-alias": "qwen2.5-7b-instruct", "openai-alias": "openai/gpt-4"},
    "autoRouting": {"enable": True, "defaultModel": "qwen2.5-7b-instruct",
                    "rules": [{"pattern": "(?i)\\bcode\\b", "model": "qwen2.5-coder-7b"}]},
}  # fmt: skip
ROUTING_HEADERS = ("x-higress-llm-model", "x-higress-llm-provider", "x-higress-llm-model-final")


def auto(content: str) -> dict[str, Any]:
    return {"model": "higress/auto", "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("path", "body", "headers", "upstream_body"),
    [
        # path-driven: the alias from the path, headers only, body untouched
        ("/model/proxy/qwen-alias/v1/chat/completions", {"model": "foo"},
         ("qwen2.5-7b-instruct", None, "qwen2.5-7b-instruct"), {"model": "foo"}),
        ("/model/proxy/openai-alias/v1/chat/completions", {"model": "foo"},
         ("openai/gpt-4", "openai", "gpt-4"), {"model": "foo"}),
        # body-driven: provider/model split rewrites the body's model
        ("/v1/chat/completions", {"model": "openai/gpt-4o"},
         ("openai/gpt-4o", "openai", "gpt-4o"), {"model": "gpt-4o"}),
        # higress/auto: first matching rule, else defaultModel
        ("/v1/chat/completions", auto("write some code"),
         ("qwen2.5-coder-7b", None, "qwen2.5-coder-7b"),
         {**auto("write some code"), "model": "qwen2.5-coder-7b"}),
        ("/v1/chat/completions", auto("hello"),
         ("qwen2.5-7b-instruct", None, "qwen2.5-7b-instruct"),
         {**auto("hello"), "model": "qwen2.5-7b-instruct"}),
        # not an AI path: body never read
        ("/healthz", {"model": "openai/gpt-4o"}, (None, None, None), {"model": "openai/gpt-4o"}),
    ],
    ids=["path-alias", "path-alias-split", "body-split", "auto-rule", "auto-default", "other-path"],
)  # fmt: skip
def test_generic_proxy_router_writes_the_routing_headers_its_readme_lists(
    path: str, body: dict[str, Any], headers: tuple[str | None, ...], upstream_body: dict[str, Any]
) -> None:
    with PluginHarness(higress_plugin("gpustack-generic-proxy-router"), config=ROUTER) as h:
        up = sent(post_chat(h, body, path=path))
        assert tuple(up.header(name) for name in ROUTING_HEADERS) == headers
        assert json.loads(up.body) == upstream_body


# --------------------------------------------------------------------------- the gpustack-lb framework

SMALL, CODER = "outbound|80||model-2-12.static", "outbound|80||model-2-13.static"
LB_CONTEXT = {
    "mode": "context",
    "candidates": [{"cluster": SMALL, "targetId": "2", "kind": "instance"},
                   {"cluster": CODER, "targetId": "3", "kind": "instance"}],
    "modelMappers": {"2": {"gpt-*": "qwen3-small"}, "3": {"gpt-*": "qwen3-coder"}},
}  # fmt: skip
MODEL_OF = {SMALL: "qwen3-small", CODER: "qwen3-coder"}
ROUTED = {**JSON, "x-higress-llm-model": "gpt-4o"}  # as model-router leaves it
GPT_CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}


def lb_band(*capabilities: Plugin, clusters: dict[str, Any] | None = None) -> PluginHarness:
    """gpustack-lb context (publishes the candidates) -> capability plugins -> gpustack-lb finisher."""
    lb = higress_plugin("gpustack-lb")
    chain = [Plugin(lb, LB_CONTEXT, name="lb-context"), *capabilities,
             Plugin(lb, {"mode": "finisher"}, name="lb-finisher")]  # fmt: skip
    return PluginHarness.chain(chain, clusters=clusters)


def lb_pick(h: PluginHarness, headers: dict[str, str], body: object = None) -> str:
    return routed(h.request("POST", "/v1/chat/completions", headers, json.dumps(body or GPT_CHAT)))


def routed(r: HarnessResponse) -> str:
    """The candidate the finisher picked; the body's model is rewritten to that candidate's target."""
    up = sent(r)
    cluster = up.header("x-higress-target-cluster")
    assert cluster in MODEL_OF, (cluster, up.headers)
    assert json.loads(up.body)["model"] == MODEL_OF[cluster]
    return cluster


def test_lb_without_capability_plugins_round_robins_and_rewrites_the_model_per_candidate() -> None:
    with lb_band() as h:
        picks = [lb_pick(h, ROUTED) for _ in range(4)]
        assert picks[0] != picks[1] and picks[0::2] == [picks[0]] * 2 and picks[1::2] == [picks[1]] * 2


def session_affinity() -> Plugin:
    config = DOCUMENTED_CONFIGS["gpustack-lb-session-affinity"]
    return Plugin(higress_plugin("gpustack-lb-session-affinity"), config, name="session-affinity")


def in_session(session: str | None) -> dict[str, str]:
    return {**ROUTED, "session_id": session} if session else ROUTED


def test_lb_session_affinity_keeps_a_session_on_one_candidate() -> None:
    with lb_band(session_affinity()) as h:
        def pick(session: str | None) -> str:
            return lb_pick(h, in_session(session))

        by_session = {s: [pick(s) for _ in range(3)] for s in ("a", "b", "c", "d")}
        assert all(len(set(picks)) == 1 for picks in by_session.values()), by_session
        assert {picks[0] for picks in by_session.values()} == {SMALL, CODER}  # sessions spread over both
        sessionless = [pick(None) for _ in range(2)]  # no key, no opinion: round-robin decides
        assert sessionless[0] != sessionless[1]


@pytest.mark.parametrize(
    ("least_load", "inner_goes_to"),
    [
        ({"weight": 2}, "the other"),  # a real load gap outweighs stickiness
        ({"weight": 0.5}, "the owner"),  # stickiness holds through a small say for load
        ({"weight": 2, "enabled": False}, "the owner"),  # switched off per config
    ],
    ids=["weight-2", "weight-0.5", "disabled"],
)
def test_lb_least_load_sends_a_session_off_its_busy_owner_when_load_weighs_more(
    least_load: dict[str, Any], inner_goes_to: str
) -> None:
    ll = Plugin(higress_plugin("gpustack-lb-least-load"), least_load, name="least-load")
    with lb_band(session_affinity(), ll) as h:
        picks: list[str] = []

        def owner_answers_after_a_second_request(request: UpstreamRequest) -> Upstream:
            # While the first request is still in flight on the session's owner, the same session asks again.
            picks.append(str(request.header("x-higress-target-cluster")))
            picks.append(lb_pick(h, in_session("a")))
            return Upstream(200)

        first = h.request("POST", "/v1/chat/completions", in_session("a"), json.dumps(GPT_CHAT),
                          upstream=owner_answers_after_a_second_request)  # fmt: skip
        owner = routed(first)
        assert picks[0] == owner
        other = next(c for c in MODEL_OF if c != owner)
        assert picks[1] == (owner if inner_goes_to == "the owner" else other)
        again = lb_pick(h, in_session("a"))
        assert again == owner  # the first request's in-flight count was released at stream end


DECISION = {
    "provider": {"endpoint": "http://jev.svc:8010", "apiToken": "jev-token"},
    "modelSelection": {"criteria": {"qwen3-small": "fast and cheap", "qwen3-coder": "strong for code"}},
}


def jev_answer(choice: str) -> Callable[[HttpCall], Upstream]:
    other = next(m for m in MODEL_OF.values() if m != choice)
    answer = {"answers": {"model_selection": {"choice": choice, "probabilities": {choice: 0.95, other: 0.05},
                                              "confidence": 0.9}}}  # fmt: skip
    return lambda call: Upstream(200, JSON, json.dumps(answer))


@pytest.mark.parametrize("choice", ["qwen3-coder", "qwen3-small"])
def test_lb_decision_service_asks_jev_and_routes_every_request_to_its_choice(choice: str) -> None:
    ds = Plugin(higress_plugin("gpustack-lb-decision-service"), DECISION, name="decision-service")
    with lb_band(ds, clusters={"outbound|8010||jev.svc": jev_answer(choice)}) as h:
        task = {"model": "gpt-4o", "messages": [{"role": "user", "content": "write code"}]}
        picks = [lb_pick(h, ROUTED, task) for _ in range(3)]
        assert [MODEL_OF[p] for p in picks] == [choice] * 3
        assert len(h.http_calls) == 3
        call = h.http_calls[0]
        assert (call.cluster, call.method, call.path, call.authority) == (
            "outbound|8010||jev.svc", "POST", "/v1/systemone", "jev.svc:8010")  # fmt: skip
        assert call.header("authorization") == "Bearer jev-token"
        question = json.loads(call.body)
        assert json.loads(question["state"]) == task
        assert question["questions"]["model_selection"]["type"] == "choice"
        assert question["questions"]["model_selection"]["criteria"] == DECISION["modelSelection"]["criteria"]


def test_lb_decision_service_degrades_to_the_finishers_own_choice_when_jev_is_down() -> None:
    ds = Plugin(higress_plugin("gpustack-lb-decision-service"), DECISION, name="decision-service")
    with lb_band(ds, clusters={"outbound|8010||jev.svc": lambda call: None}) as h:
        picks = [lb_pick(h, ROUTED) for _ in range(2)]
        assert picks[0] != picks[1]  # no verdict, no opinion: round-robin
        assert len(h.http_calls) == 2


# ---------------------------------------------------------------------------------- gpustack-token-usage

TOKEN_USAGE = {
    "endpoint": {"service_name": "gpustack-server.svc", "service_port": 80,
                 "path": "/v2/usage/gateway-metrics"},
    "realIPHeader": "x-gpustack-real-ip",
    "header_add": {"x-gpustack-internal-token": "shared-secret"},
}


def routed_to(cluster: str) -> Callable[[], StreamInfo]:
    connections = itertools.count(1)

    def info() -> StreamInfo:
        n = next(connections)
        return StreamInfo(
            connection_id=n, downstream_remote_address=("203.0.113.7", 40000 + n),
            downstream_local_address=("127.0.0.1", 10000), listener_name="harness",
            route_name="ai-route-route-7.internal", cluster_name=cluster,
            upstream_address=("127.0.0.1", 8080),
        )  # fmt: skip

    return info


def token_usage(cluster: str) -> PluginHarness:
    plugin = higress_plugin("gpustack-token-usage")
    clusters = {"*": Upstream(200)}
    return PluginHarness(plugin, config=TOKEN_USAGE, clusters=clusters, stream_info=routed_to(cluster))


def test_token_usage_trusts_a_gpustack_model_cluster_and_reports_the_usage() -> None:
    with token_usage("outbound|80||model-3-9.static") as h:
        client = {"x-mse-consumer": "mykey.gpustack-42", "x-gpustack-real-ip": "6.6.6.6"}
        r = post_chat(h, {**CHAT, "model": "qwen3"}, headers=client, upstream=USAGE_ANSWER)
        assert r.status == 200
        up = sent(r)
        assert up.header("x-gpustack-real-ip") == "203.0.113.7"  # the client's own value is replaced
        assert up.header("x-gpustack-internal-token") == "shared-secret"
        [report] = h.http_calls
        assert (report.cluster, report.method, report.path) == (
            "outbound|80||gpustack-server.svc", "POST", "/v2/usage/gateway-metrics")  # fmt: skip
        assert report.header("x-gpustack-internal-token") == "shared-secret"
        payload = json.loads(report.body)
        fixed = ("model", "input_token", "output_token", "total_token", "request_count", "completed",
                 "model_id", "model_route_id", "user_id", "access_key")  # the rest are timestamps and ids
        assert {k: payload[k] for k in fixed} == {
            "model": "qwen3", "input_token": 5, "output_token": 7, "total_token": 12, "request_count": 1,
            "completed": True, "model_id": 3, "model_route_id": 7, "user_id": 42, "access_key": "mykey",
        }  # fmt: skip


def test_token_usage_leaves_a_third_party_upstream_untouched_and_unreported() -> None:
    with token_usage("outbound|443||api.openai.com") as h:
        r = post_chat(h, headers={"x-gpustack-real-ip": "6.6.6.6"}, upstream=USAGE_ANSWER)
        up = sent(r)
        assert up.header("x-gpustack-real-ip") == "6.6.6.6" and up.header("x-gpustack-internal-token") is None
        assert h.http_calls == []


def test_the_shipped_plugins_are_go_and_rust_builds_as_the_docs_say() -> None:
    # docs/runtime.md and README.md state which SDKs the suite covers; keep them honest.
    languages = {p.parent.parent.name: producers_language(p) for p in shipped_plugins()}
    assert languages.pop("ai-data-masking") == "Rust"
    assert set(languages.values()) == {"Go"} and len(languages) == 13


def producers_language(path: Path) -> str:
    """The ``language`` field of a module's ``producers`` custom section (tool-conventions)."""
    data = path.read_bytes()

    def leb(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, at

    def name(at: int) -> tuple[str, int]:
        size, at = leb(at)
        return data[at : at + size].decode(), at + size

    at = 8
    while at < len(data):
        section, at = data[at], at + 1
        size, at = leb(at)
        end = at + size
        if section == 0:
            title, inner = name(at)
            if title == "producers":
                fields, inner = leb(inner)
                for _ in range(fields):
                    field, inner = name(inner)
                    count, inner = leb(inner)
                    first, inner = name(inner)
                    if field == "language" and count:
                        return first
                    _, inner = name(inner)
                    for _ in range(count - 1):
                        _, inner = name(inner)
                        _, inner = name(inner)
        at = end
    raise AssertionError(f"{path}: no producers language")
