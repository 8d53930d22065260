"""The embedded demo mesh behind `wasmesh up`.

Pieces, all on 127.0.0.1:
- the control plane (in this process), watching a state directory;
- the example WasmPlugins, mirrored from examples/*/wasmplugin.yaml into that directory with
  their relative `file://` URLs made absolute — edit an example and the mirror (and so the
  mesh) follows within a fraction of a second;
- a Gateway resource `ingressgateway` (label `istio: ingressgateway`) routing /productpage to
  the productpage sidecar and everything else to the httpbin sidecar;
- two sidecar Workloads, `httpbin` (label `app: httpbin`) and `productpage` (`app: productpage`),
  each a listener in front of its app, as Istio's inbound sidecars are;
- three proxies, each `wasmesh proxy --xds ...` as a child process (the gateway and the two
  sidecars), so their plugin logs stream to this terminal exactly as a real deployment logs them;
  each connects over mTLS with its own SPIFFE identity, from a bootstrap token the mesh creates
  (the CA root and tokens live in a private temporary directory, removed on exit);
- the two sample apps (in this process).

The examples pick their proxies by label: basic-auth and request-tracking the gateway, rate-limit
the httpbin sidecar (so the basic-auth tour on /productpage is never answered 429).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wasmesh.controlplane.auth import ADMIN_TOKEN_FILE, API_CERT_FILE, ApiSecurity, ensure_admin_token
from wasmesh.controlplane.clientconfig import ConfigError, load_config, save_config
from wasmesh.security.ca import CA_CERT_FILE, write_private
from wasmesh.security.tokens import create_token
from wasmesh.up.apps import serve_sample_app

log = logging.getLogger("wasmesh.up")

GATEWAY_NAME = "ingressgateway"
GATEWAY_NAMESPACE = "istio-system"
APP_NAMESPACE = "default"
UP_CONTEXT = "wasmesh-up"  # the client config context `wasmesh up` points the CLI at
SIDECARS = ("httpbin", "productpage")  # Workload name = node id = app label
_FILE_URL = re.compile(r"^(?P<lead>\s*url:\s*[\"']?)file://(?P<path>[^\"'\s#]+)", re.MULTILINE)


@dataclass(frozen=True)
class MeshPorts:
    gateway: int
    admin: int
    xds: int
    ca: int
    api: int
    httpbin: int
    productpage: int
    httpbin_sidecar: int
    productpage_sidecar: int

    def app(self, name: str) -> int:
        return int(getattr(self, name))

    def sidecar(self, name: str) -> int:
        return int(getattr(self, f"{name}_sidecar"))


def find_examples_dir(explicit: str | None) -> Path:
    """examples/ of the checkout wasmesh runs from, else of the current directory."""
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve().parents[2] / "examples",
                                                    Path.cwd() / "examples"]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*/wasmplugin.yaml")):
            return candidate.resolve()
    where = explicit or " or ".join(str(c) for c in candidates)
    raise SystemExit(f"wasmesh up: no example WasmPlugins (*/wasmplugin.yaml) found in {where}")


def mirror_example(source: Path, target: Path) -> None:
    """Copy one example WasmPlugin with its relative file:// URLs resolved against its own directory."""
    text = source.read_text(encoding="utf-8")

    def absolute(match: re.Match[str]) -> str:
        path = match.group("path")
        if not path.startswith("/"):
            path = str((source.parent / path).resolve())
        return f"{match.group('lead')}file://{path}"

    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(_FILE_URL.sub(absolute, text), encoding="utf-8")
    os.replace(tmp, target)


def gateway_resource(ports: MeshPorts) -> str:
    return f"""apiVersion: wasmesh.io/v1alpha1
kind: Gateway
metadata:
  name: {GATEWAY_NAME}
  namespace: {GATEWAY_NAMESPACE}
  labels:
    istio: ingressgateway
spec:
  listeners:
  - name: http
    address: 127.0.0.1
    port: {ports.gateway}
    virtualHosts:
    - name: demo
      domains: ["*"]
      routes:
      - match: {{prefix: /productpage}}
        cluster: productpage
      - match: {{prefix: /}}
        cluster: httpbin
  clusters:
  - name: httpbin
    endpoints: ["127.0.0.1:{ports.httpbin_sidecar}"]
  - name: productpage
    endpoints: ["127.0.0.1:{ports.productpage_sidecar}"]
"""


def sidecar_resource(name: str, ports: MeshPorts) -> str:
    """The inbound sidecar of one app: a SERVER listener in front of it (label `app: <name>`)."""
    return f"""apiVersion: wasmesh.io/v1alpha1
kind: Workload
metadata:
  name: {name}
  namespace: {APP_NAMESPACE}
  labels:
    app: {name}
spec:
  listeners:
  - name: http
    address: 127.0.0.1
    port: {ports.sidecar(name)}
    mode: SERVER
    virtualHosts:
    - name: {name}
      routes:
      - match: {{prefix: /}}
        cluster: {name}
  clusters:
  - name: {name}
    endpoints: ["127.0.0.1:{ports.app(name)}"]
"""


class ExampleMirror:
    """Keeps <state>/<example>.yaml equal to examples/<example>/wasmplugin.yaml (made absolute)."""

    def __init__(self, examples: Path, state: Path) -> None:
        self.examples = examples
        self.state = state
        self._seen: dict[Path, tuple[int, int]] = {}

    def sync(self) -> list[str]:
        changed: list[str] = []
        present: set[Path] = set()
        for source in sorted(self.examples.glob("*/wasmplugin.yaml")):
            target = self.state / f"example-{source.parent.name}.yaml"
            present.add(target)
            st = source.stat()
            signature = (st.st_mtime_ns, st.st_size)
            if self._seen.get(source) != signature:
                self._seen[source] = signature
                mirror_example(source, target)
                changed.append(source.parent.name)
        for stale in self.state.glob("example-*.yaml"):
            if stale not in present:
                stale.unlink()
                changed.append(stale.stem.removeprefix("example-"))
        return changed


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def choose_ports(args: argparse.Namespace) -> MeshPorts:
    wanted = {
        "gateway": args.gateway_port, "admin": args.admin_port, "xds": args.xds_port, "api": args.api_port,
        "ca": args.ca_port,
    }
    for name, port in wanted.items():
        if port != 0 and not _port_free(port):
            raise SystemExit(f"wasmesh up: port {port} (--{name}-port) is already in use on 127.0.0.1")
    chosen = {k: (v or _free_port()) for k, v in wanted.items()}
    return MeshPorts(
        httpbin=_free_port(), productpage=_free_port(), httpbin_sidecar=_free_port(),
        productpage_sidecar=_free_port(), **chosen,
    )


async def _wait_http(port: int, path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
            writer.write(request)
            data = await asyncio.wait_for(reader.read(64), 2)
            writer.close()
            if data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200"):
                return True
        await asyncio.sleep(0.1)
    return False


def _banner(ports: MeshPorts, examples: Path) -> str:
    g = f"http://127.0.0.1:{ports.gateway}"
    api = f"https://127.0.0.1:{ports.api}"
    return f"""
wasmesh demo mesh is up.

  gateway (istio: ingressgateway)  {g}
  gateway admin                    http://127.0.0.1:{ports.admin}/stats/prometheus
  sidecar (app: httpbin)           http://127.0.0.1:{ports.httpbin_sidecar}   (in front of httpbin)
  sidecar (app: productpage)       http://127.0.0.1:{ports.productpage_sidecar}   (in front of productpage)
  control plane API                {api}   (TLS + admin token: client context "{UP_CONTEXT}")
  control plane xDS                127.0.0.1:{ports.xds}   (mTLS: each proxy has its own SPIFFE identity)
  example WasmPlugins              {examples}/*/wasmplugin.yaml  (edit one: the change is live)

Try:
  curl -s {g}/headers                       # request-tracking (gateway) adds X-Request-Id: request-tracking
  curl -si {g}/status/200 | grep -i who-am-i   # rate-limit (httpbin sidecar) tags every response
  for i in 1 2 3; do curl -s -o /dev/null -w '%{{http_code}}\\n' {g}/status/200; done   # 3rd → 429
  curl -si {g}/productpage                  # 401 without credentials (basic-auth, gateway)
  curl -si -u ok:test {g}/productpage       # 200
  curl -si -H 'Authorization: Basic YWRtaW4zOmFkbWluMw==' {g}/productpage   # 200 (admin3:admin3)
  wasmesh get wasmplugins -n {GATEWAY_NAMESPACE}   # READY: proxies running each plugin
  wasmesh describe wasmplugin rate-limit -n {GATEWAY_NAMESPACE}

Plugin logs follow. Ctrl-C stops everything.
"""


def _without_up_context(contexts: list[Any]) -> list[Any]:
    return [c for c in contexts if not (isinstance(c, dict) and c.get("name") == UP_CONTEXT)]


def use_up_context(ports: MeshPorts, pki: Path) -> str:
    """Point the CLI's client config at this mesh's API, as kind writes a kubeconfig context.

    The context holds the API's CA inline and the admin token (0600 file, never printed); it becomes
    the current context, and the previous current context is returned so that stopping restores it.
    """
    admin_token = ensure_admin_token(pki) or pki / ADMIN_TOKEN_FILE
    config = load_config()
    previous = str(config.get("current-context") or "")
    config["contexts"] = _without_up_context(config["contexts"])
    config["contexts"].append({
        "name": UP_CONTEXT,
        "server": f"https://127.0.0.1:{ports.api}",
        "certificate-authority-data": (pki / API_CERT_FILE).read_text(encoding="ascii"),
        "token": admin_token.read_text(encoding="ascii").strip(),
    })
    config["current-context"] = UP_CONTEXT
    save_config(config)
    return "" if previous == UP_CONTEXT else previous


def drop_up_context(previous: str) -> None:
    """Remove this mesh's context again (its token and CA die with the mesh)."""
    with contextlib.suppress(ConfigError, OSError):
        config = load_config()
        config["contexts"] = _without_up_context(config["contexts"])
        if config.get("current-context") == UP_CONTEXT:
            config["current-context"] = previous
        save_config(config)


def issue_bootstrap_token(pki: Path, namespace: str, name: str) -> Path:
    """A bootstrap token for one proxy identity, in a 0600 file the proxy reads (never on argv)."""
    path = pki / f"token-{namespace}-{name}"
    write_private(path, create_token(pki, namespace, name).encode())
    return path


def _start_proxy(
    ports: MeshPorts, pki: Path, node: str, namespace: str, labels: str, *extra: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen([
        sys.executable, "-m", "wasmesh", "proxy",
        "--xds", f"127.0.0.1:{ports.xds}",
        "--node-id", node,
        "--namespace", namespace,
        "--labels", labels,
        "--xds-root-cert", str(pki / CA_CERT_FILE),
        "--xds-token-file", str(issue_bootstrap_token(pki, namespace, node)),
        "--ca-address", f"127.0.0.1:{ports.ca}",
        *extra,
    ])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _run(args: argparse.Namespace) -> int:
    from wasmesh.controlplane.server import ControlPlane, ControlPlaneOptions, XdsSecurityOptions

    examples = find_examples_dir(args.examples)
    ports = choose_ports(args)
    state = Path(tempfile.mkdtemp(prefix="wasmesh-up-"))
    # The CA root, its key and the bootstrap tokens: outside the watched config directory.
    pki = Path(tempfile.mkdtemp(prefix="wasmesh-up-pki-"))
    proxies: dict[str, subprocess.Popen[bytes]] = {}
    control_plane: ControlPlane | None = None
    servers: list[asyncio.AbstractServer] = []
    previous_context: str | None = None
    try:
        (state / "gateway.yaml").write_text(gateway_resource(ports), encoding="utf-8")
        for name in SIDECARS:
            (state / f"sidecar-{name}.yaml").write_text(sidecar_resource(name, ports), encoding="utf-8")
        mirror = ExampleMirror(examples, state)
        mirror.sync()
        servers.append(await serve_sample_app("httpbin", "127.0.0.1", ports.httpbin))
        servers.append(await serve_sample_app("productpage", "127.0.0.1", ports.productpage))
        control_plane = ControlPlane(ControlPlaneOptions(
            config_dir=state, xds_port=ports.xds, api_port=ports.api, root_namespace=GATEWAY_NAMESPACE,
            security=XdsSecurityOptions(state_dir=pki, ca_port=ports.ca),
            api_security=ApiSecurity.from_state_dir(pki, "127.0.0.1"),
        ))
        await control_plane.start()
        previous_context = use_up_context(ports, pki)
        proxies["gateway"] = _start_proxy(
            ports, pki, GATEWAY_NAME, GATEWAY_NAMESPACE, "istio=ingressgateway",
            "--admin", f"127.0.0.1:{ports.admin}",
        )
        for name in SIDECARS:
            proxies[f"{name} sidecar"] = _start_proxy(ports, pki, name, APP_NAMESPACE, f"app={name}")
        # Through the gateway and the httpbin sidecar, then the productpage sidecar directly (the
        # gateway asks for credentials there).
        for port, path in ((ports.gateway, "/headers"), (ports.productpage_sidecar, "/productpage")):
            if not await _wait_http(port, path, timeout=60):
                for role, process in proxies.items():
                    code = process.poll()
                    if code is not None:
                        print(f"wasmesh up: the {role} proxy exited with status {code} (see its log above)",
                              file=sys.stderr)
                        return 1
                print(f"wasmesh up: http://127.0.0.1:{port}{path} is not answering 200 (see the logs above)",
                      file=sys.stderr)
                return 1
        print(_banner(ports, examples), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            for name in mirror.sync():
                log.info("example %s changed: applying", name)
                print(f"[wasmesh up] example {name} changed: pushing it to its proxies", flush=True)
            for role, process in proxies.items():
                if process.poll() is not None:
                    code = process.returncode
                    print(f"wasmesh up: the {role} proxy exited with status {code}", file=sys.stderr)
                    return 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        print("\nwasmesh up: stopping", flush=True)
        return 0
    finally:
        for process in proxies.values():
            _stop(process)
        if control_plane is not None:
            await control_plane.stop()
        for server in servers:
            server.close()
        if previous_context is not None:
            drop_up_context(previous_context)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(pki, ignore_errors=True)


def run_demo_mesh(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        import uvloop

        return uvloop.run(_run(args))
    except KeyboardInterrupt:
        return 0
