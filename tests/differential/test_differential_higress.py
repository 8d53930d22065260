"""Envoy 1.40 vs wasmesh with real Higress Go plugins (PyPI gpustack-higress-plugins, ABI 0_2_100).

Envoy gets each module with its ABI marker renamed to 0_2_1 (wasmesh.testing.wasm_exports);
wasmesh loads the original. Same configuration, same requests, same normalised results.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import (  # type: ignore[import-not-found]
    DifferentialPair,
    assert_same_exchange,
    higress_module,
    require_envoy,
    start_pair,
    stop_pair,
)

from wasmesh.testing.envoy import EnvoyWasmPlugin
from wasmesh.testing.upstream import RecordedRequest, RecordingUpstream, Reply

pytestmark = pytest.mark.envoy

AUTH_CLUSTER = "outbound|80||auth.svc"  # how wasm-go names the cluster of service auth.svc:80


def auth_reply(request: RecordedRequest) -> Reply:
    """The authorization server behind ext-auth: `Bearer good` passes, anything else is 401."""
    if request.path.startswith("/token-auth"):
        if request.header("authorization") == "Bearer good":
            return Reply(200, [("content-type", "text/plain"), ("x-mse-consumer", "alice")], b"ok")
        return Reply(401, [("content-type", "text/plain"), ("x-auth-reason", "bad key")], b"denied")
    return Reply()


def plugin(name: str, config: object) -> EnvoyWasmPlugin:
    return EnvoyWasmPlugin(higress_module(name), configuration=json.dumps(config), name=name)


@pytest.fixture(scope="module")
def higress_upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream(auth_reply) as upstream:
        yield upstream


def _pair(plugins: list[EnvoyWasmPlugin], upstream: RecordingUpstream, clusters: list[str]) -> DifferentialPair:
    require_envoy()
    return start_pair(plugins, upstream, cluster_names=clusters)


@pytest.fixture(scope="module")
def gateway_chain(higress_upstream: RecordingUpstream) -> Iterator[DifferentialPair]:
    """A 4-plugin chain as GPUStack deploys them: ext-auth → ip-acl → set-header → transformer."""
    plugins = [
        plugin(
            "gpustack-ext-auth",
            {
                "route_match_regexes": ["^default$"],
                "authz": {
                    "endpoint": {"path": "/token-auth", "request_method": "GET", "service_name": "auth.svc",
                                 "service_port": 80},
                    "timeout": 2000,
                    "authorization_request": {"allowed_headers": [{"exact": "authorization"}]},
                },
            },
        ),
        plugin("gpustack-ip-acl", {"consumers": {"mallory": {"deniedCidrs": ["127.0.0.0/8"]},
                                                 "alice": {"allowedCidrs": ["127.0.0.1/32"]}}}),
        plugin("gpustack-set-header-pre-route", {"routeNameHeader": "x-gpustack-route",
                                                 "clusterNameHeader": "x-gpustack-cluster"}),
        plugin(
            "transformer",
            {
                "reqRules": [
                    {"operate": "remove", "headers": [{"key": "x-remove"}]},
                    {"operate": "rename", "headers": [{"oldKey": "x-old", "newKey": "x-new"}]},
                    {"operate": "add", "headers": [{"key": "x-added", "value": "yes"}]},
                    {"operate": "map", "headers": [{"fromKey": "userId", "toKey": "x-user-id"}],
                     "mapSource": "body"},
                ],
                "respRules": [{"operate": "add", "headers": [{"key": "x-resp-added", "value": "1"}]}],
            },
        ),
    ]  # fmt: skip
    pair = _pair(plugins, higress_upstream, [AUTH_CLUSTER])
    try:
        yield pair
    finally:
        stop_pair(pair)


SCENARIOS: dict[str, tuple[str, str, list[tuple[str, str]], bytes]] = {
    "authorized": ("POST", "/v1/chat/completions", [("authorization", "Bearer good"),
                   ("content-type", "application/json"), ("x-remove", "1"), ("x-old", "v")],
                   b'{"userId": 12, "model": "m"}'),
    "unauthorized": ("GET", "/v1/chat/completions", [("authorization", "Bearer bad")], b""),
    "no-credential": ("GET", "/v1/models", [], b""),
    "spoofed-consumer": ("GET", "/v1/embeddings", [("authorization", "Bearer good"),
                         ("x-mse-consumer", "mallory")], b""),
    "other-route-path": ("GET", "/healthz", [("x-old", "v")], b""),
}  # fmt: skip


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_gateway_chain_matches_envoy(gateway_chain: DifferentialPair, scenario: str) -> None:
    method, path, headers, body = SCENARIOS[scenario]
    envoy, wasmesh = gateway_chain.run(method, path, headers, body)
    assert_same_exchange(envoy, wasmesh)


@pytest.fixture(scope="module")
def rate_limited(higress_upstream: RecordingUpstream) -> Iterator[DifferentialPair]:
    config = {
        "rule_name": "diff-rule",
        "enable_on_path_suffix": ["*"],
        "limit_combinations": [
            {"name": "per-user", "match": [{"source": "header", "name": "x-user", "value": "*"}],
             "query_limits": {"per_minute": 2}},
        ],
    }  # fmt: skip
    pair = _pair([plugin("gpustack-rate-limit", config)], higress_upstream, [])
    try:
        yield pair
    finally:
        stop_pair(pair)


def test_rate_limit_local_mode_matches_envoy(rate_limited: DifferentialPair) -> None:
    results = [rate_limited.run("GET", "/v1/chat/completions", [("x-user", "u1")]) for _ in range(3)]
    results.append(rate_limited.run("GET", "/v1/chat/completions", [("x-user", "u2")]))
    for envoy, wasmesh in results:
        assert_same_exchange(envoy, wasmesh)
    statuses = [envoy.status for envoy, _ in results if not isinstance(envoy, str)]
    assert statuses == [200, 200, 429, 200]
