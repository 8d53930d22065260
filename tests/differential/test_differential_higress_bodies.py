"""Envoy 1.40 vs wasmesh with real Higress Go plugins (PyPI gpustack-higress-plugins, ABI 0_2_100)
that read and rewrite bodies: transformer's request and response body rules, and ai-statistics, which
reads both bodies. Envoy gets each module renamed to ABI 0_2_1 (see test_differential_higress.py);
wasmesh loads the original.

Only configurations whose request-headers callback continues can run under stock Envoy: these
plugins buffer the body in their body callbacks. Those that stop iteration in the headers callback
to wait for the body (transformer's `mapSource: body`, ai-data-masking, gpustack-token-usage) rely on
Higress's 0_2_100 semantics and hang under stock Envoy; tests/realplugins covers them with the harness.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from differential_support import (
    DifferentialPair,
    assert_same_exchange,
    higress_module,
    need_envoy,
    start_pair,
    stop_pair,
)

from wasmesh.testing.compare import ObservedExchange
from wasmesh.testing.envoy import EnvoyWasmPlugin
from wasmesh.testing.upstream import RecordedRequest, RecordingUpstream, Reply

pytestmark = pytest.mark.envoy

COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}  # fmt: skip


def completion_reply(request: RecordedRequest) -> Reply:
    return Reply(200, [("content-type", "application/json")], json.dumps(COMPLETION).encode())


@pytest.fixture(scope="module")
def completion_upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream(completion_reply) as upstream:
        yield upstream


TRANSFORMER = {
    "reqRules": [
        {"operate": "add", "body": [{"key": "added", "value": "v"}]},
        {"operate": "remove", "body": [{"key": "drop"}]},
        {"operate": "add", "headers": [{"key": "x-added", "value": "yes"}]},
    ],
    "respRules": [
        {"operate": "add", "body": [{"key": "served_by", "value": "transformer"}]},
        {"operate": "remove", "body": [{"key": "usage"}]},
    ],
}


@pytest.fixture(scope="module")
def body_chain(completion_upstream: RecordingUpstream) -> Iterator[DifferentialPair]:
    """transformer (rewrites both bodies) → ai-statistics (reads both)."""
    need_envoy()
    plugins = [
        EnvoyWasmPlugin(higress_module("transformer"), configuration=json.dumps(TRANSFORMER),
                        name="transformer"),
        EnvoyWasmPlugin(higress_module("ai-statistics"), configuration="{}", name="ai-statistics"),
    ]
    pair = start_pair(plugins, completion_upstream)
    try:
        yield pair
    finally:
        stop_pair(pair)


JSON = [("content-type", "application/json")]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "drop": "me"}
CASES: dict[str, tuple[str, list[tuple[str, str]], bytes]] = {
    "chat-json": ("POST", JSON, json.dumps(CHAT).encode()),
    "nested-json": ("POST", JSON, json.dumps({"a": {"b": [1, 2, {"c": None}]}, "drop": 1}).encode()),
    "empty-object": ("POST", JSON, b"{}"),
    "no-body": ("GET", [], b""),
    "plain-text": ("POST", [("content-type", "text/plain")], b"not json at all"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_body_rewriting_chain_matches_envoy(body_chain: DifferentialPair, case: str) -> None:
    method, headers, body = CASES[case]
    envoy, wasmesh = body_chain.run(method, "/v1/chat/completions", headers, body)
    assert_same_exchange(envoy, wasmesh)
    if case == "chat-json":
        assert isinstance(envoy, ObservedExchange) and envoy.upstream is not None
        sent = json.loads(envoy.upstream.body)
        assert sent == {"model": "m", "messages": CHAT["messages"], "added": "v"}
        answered = json.loads(envoy.body)
        assert "usage" not in answered and answered["served_by"] == "transformer"
