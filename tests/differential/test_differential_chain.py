"""Envoy 1.40 vs wasmesh with a 3-plugin chain from two languages: AssemblyScript (solo-io SDK,
ABI 0_2_0) header edits → AssemblyScript http_call (request paused until the callout answers) →
the C probe. Order matters: each plugin sees what the previous one did.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from differential_support import (
    TEST_PLUGINS,
    DifferentialPair,
    assert_same_exchange,
    require_envoy,
    require_module,
    start_pair,
    stop_pair,
)

from wasmesh.testing.envoy import EnvoyWasmPlugin
from wasmesh.testing.upstream import RecordingUpstream

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def mixed_chain(recording_upstream: RecordingUpstream) -> Iterator[DifferentialPair]:
    require_envoy()
    plugins = [
        EnvoyWasmPlugin(require_module(TEST_PLUGINS / "as-headers.wasm"), configuration="from-config",
                        root_id="as_headers", name="as-headers"),
        EnvoyWasmPlugin(require_module(TEST_PLUGINS / "as-http_call.wasm"), configuration="probe_call",
                        root_id="as_http_call", name="as-http-call"),
        EnvoyWasmPlugin(require_module(TEST_PLUGINS / "probe.wasm"), configuration="{}", name="probe"),
    ]  # fmt: skip
    pair = start_pair(plugins, recording_upstream, cluster_names=["probe_call"])
    try:
        yield pair
    finally:
        stop_pair(pair)


CASES: dict[str, tuple[str, list[tuple[str, str]], bytes]] = {
    # The probe (third) reports request headers the AssemblyScript plugins added before it.
    "edits-then-callout": ("GET", [("x-as-remove", "1"), ("x-probe", "req-headers"), ("x-probe-in", "v")],
                           b""),
    "with-body": ("POST", [("x-probe", "req-body-read,resp-headers"), ("content-type", "text/plain")], b"hi"),
    "denied-first": ("GET", [("x-as-deny", "1"), ("x-probe", "req-headers")], b""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_language_chain_matches_envoy(mixed_chain: DifferentialPair, case: str) -> None:
    method, headers, body = CASES[case]
    envoy, wasmesh = mixed_chain.run(method, "/chain", headers, body)
    assert_same_exchange(envoy, wasmesh)
