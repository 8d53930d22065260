"""Real-registry helpers for the agent tests (fixtures that use them live in conftest.py).

* ``docker-registry`` (Debian's build of distribution) on 127.0.0.1 with a temp storage dir, started
  with no auth, htpasswd Basic auth (bcrypt via ``htpasswd -B``), or token auth backed by a small
  RS256 token issuer written here;
* OCI image layouts of the four Wasm image formats, pushed by ``skopeo`` (an independent client);
* a fault-injecting HTTP proxy placed in front of a registry, which also counts blob downloads.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

USER = "wasm-user"
PASSWORD = "wasm-secret-pw"
TOKEN_SERVICE = "wasmesh-test-registry"
TOKEN_ISSUER = "wasmesh-test-issuer"
REFRESH_TOKEN = "wasmesh-refresh-token"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


class QuietHTTPServer(ThreadingHTTPServer):
    """Clients that give up early (timeouts under test) are expected: no tracebacks for broken pipes."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 15.0, host: str = "127.0.0.1") -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout_s} s")


def real_plugin_wasm() -> bytes:
    """A real Proxy-Wasm plugin from PyPI gpustack-higress-plugins."""
    import gpustack_higress_plugins

    base = Path(gpustack_higress_plugins.__file__).parent / "plugins"
    candidates = sorted(base.glob("gpustack-ip-acl/*/plugin.wasm")) or sorted(base.glob("*/*/plugin.wasm"))
    return candidates[0].read_bytes()


def tiny_wasm(tag: str) -> bytes:
    """A valid, distinct Wasm module: the header plus a custom section named ``tag``."""
    name = tag.encode()
    payload = bytes([len(name)]) + name
    return b"\x00asm\x01\x00\x00\x00" + b"\x00" + bytes([len(payload)]) + payload


# ---------------------------------------------------------------------------------- token issuer


class TokenIssuer:
    """Issues distribution-style RS256 JWTs for correct Basic credentials (or anonymously if allowed)."""

    def __init__(self, work_dir: Path) -> None:
        self.key = work_dir / "issuer.key"
        self.cert = work_dir / "issuer.crt"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
                "-days",
                "2",
                "-subj",
                f"/CN={TOKEN_ISSUER}",
            ],
            check=True,
            capture_output=True,
        )
        public_der = subprocess.run(
            ["openssl", "pkey", "-in", str(self.key), "-pubout", "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        # libtrust key id: base32 of the first 30 bytes of sha256(DER SPKI), in groups of 4.
        encoded = base64.b32encode(hashlib.sha256(public_der).digest()[:30]).decode().rstrip("=")
        self.kid = ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))
        self.requests = 0
        self.port = free_port()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                issuer.requests += 1
                query = parse_qs(urlsplit(self.path).query)
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                access = []
                for scope in query.get("scope", []):
                    kind, name, actions = scope.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                token = issuer.sign(access)
                body = json.dumps({"access_token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # OAuth2 refresh-token grant (docker identity tokens)
                issuer.requests += 1
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [
                    REFRESH_TOKEN
                ]:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                access = []
                for scope in form.get("scope", []):
                    kind, name, actions = scope.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                body = json.dumps({"access_token": issuer.sign(access)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = QuietHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, access: list[dict[str, Any]]) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).decode().rstrip("=")

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": USER,
            "aud": TOKEN_SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{b64(signature)}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -------------------------------------------------------------------------------------- registry


@dataclass
class Registry:
    host: str  # address:port, 127.0.0.1 unless started on another loopback address
    auth: str  # "none" | "basic" | "token"
    process: subprocess.Popen[bytes]
    token_issuer: TokenIssuer | None = None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.token_issuer is not None:
            self.token_issuer.stop()


def start_registry(work_dir: Path, auth: str = "none", address: str = "127.0.0.1") -> Registry:
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {work_dir / 'storage'}",
        "http:",
        f"  addr: {address}:{port}",
        "  secret: wasmesh-test-secret",
    ]
    issuer: TokenIssuer | None = None
    if auth == "basic":
        htpasswd = subprocess.run(
            ["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True
        ).stdout
        (work_dir / "htpasswd").write_bytes(htpasswd)
        lines += ["auth:", "  htpasswd:", "    realm: wasmesh-basic", f"    path: {work_dir / 'htpasswd'}"]
    elif auth == "token":
        issuer = TokenIssuer(work_dir)
        lines += [
            "auth:",
            "  token:",
            f"    realm: {issuer.realm}",
            f"    service: {TOKEN_SERVICE}",
            f"    issuer: {TOKEN_ISSUER}",
            f"    rootcertbundle: {issuer.cert}",
        ]
    config = work_dir / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log = open(work_dir / "registry.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        wait_for_port(port, host=address)
    except RuntimeError:
        process.kill()
        raise RuntimeError((work_dir / "registry.log").read_text()) from None
    return Registry(f"{address}:{port}", auth, process, issuer)


# ------------------------------------------------------------------------------ images and skopeo


@dataclass
class ImageSpec:
    """An image as written to an OCI layout: config and layers as (media type, bytes)."""

    config_media_type: str
    config: bytes
    layers: list[tuple[str, bytes]]
    manifest_media_type: str = OCI_MANIFEST
    annotations: dict[str, str] = field(default_factory=dict)


def tar_gzip(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def compat_image(wasm: bytes, path: str = "plugin.wasm") -> ImageSpec:
    runtime_config = b'{"type":"envoy_proxy","abiVersions":["v0-4d576b8e8"],"config":{"rootIds":["x"]}}'
    return ImageSpec(
        "application/vnd.oci.image.config.v1+json",
        b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}',
        [
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                tar_gzip({"runtime-config.json": runtime_config, path: wasm}),
            )
        ],
        annotations={"module.wasm.image/variant": "compat"},
    )


def solo_oci_image(wasm: bytes) -> ImageSpec:
    runtime_config = b'{"type":"envoy_proxy","abiVersions":["v0-4d576b8e8"],"config":{"rootIds":["x"]}}'
    return ImageSpec(
        "application/vnd.module.wasm.config.v1+json",
        runtime_config,
        [
            ("application/vnd.module.wasm.config.v1+json", runtime_config),
            ("application/vnd.module.wasm.content.layer.v1+wasm", wasm),
        ],
    )


def wasm_to_oci_image(wasm: bytes) -> ImageSpec:
    return ImageSpec(
        "application/vnd.wasm.config.v1+json", b"{}", [("application/vnd.wasm.content.layer.v1+wasm", wasm)]
    )


def cncf_image(wasm: bytes) -> ImageSpec:
    layer_digest = "sha256:" + hashlib.sha256(wasm).hexdigest()
    config = json.dumps(
        {
            "created": "2024-05-02T00:00:00Z",
            "architecture": "wasm",
            "os": "wasip1",
            "layerDigests": [layer_digest],
        }
    ).encode()
    return ImageSpec("application/vnd.wasm.config.v0+json", config, [("application/wasm", wasm)])


def _put_blob(directory: Path, data: bytes) -> dict[str, Any]:
    """Store ``data`` in an OCI layout's blobs; its digest and size, as a descriptor has them."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _put_manifest(directory: Path, spec: ImageSpec) -> dict[str, Any]:
    """Store ``spec``'s blobs and manifest; the manifest's descriptor."""

    def put(data: bytes) -> dict[str, Any]:
        return _put_blob(directory, data)

    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": spec.manifest_media_type,
        "config": {"mediaType": spec.config_media_type, **put(spec.config)},
        "layers": [{"mediaType": media_type, **put(data)} for media_type, data in spec.layers],
    }
    if spec.annotations:
        manifest["annotations"] = spec.annotations
    return {"mediaType": spec.manifest_media_type, **put(json.dumps(manifest, indent=2).encode())}


def _write_layout_index(directory: Path, descriptor: dict[str, Any], tag: str) -> None:
    tagged = {**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}}
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [tagged]}))
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def write_oci_layout(directory: Path, spec: ImageSpec, tag: str) -> str:
    """Write ``spec`` as an OCI image layout; returns the manifest digest (sha256:...)."""
    descriptor = _put_manifest(directory, spec)
    _write_layout_index(directory, descriptor, tag)
    return str(descriptor["digest"])


def write_oci_index_layout(
    directory: Path, entries: list[tuple[ImageSpec, dict[str, str]]], tag: str
) -> tuple[str, list[str]]:
    """An OCI layout whose ``tag`` is an image index (multi-platform) of ``(image, platform)`` entries.

    Returns the index digest and the entries' manifest digests, in order. Push it with
    ``skopeo copy --multi-arch all``.
    """
    descriptors = [{**_put_manifest(directory, spec), "platform": platform} for spec, platform in entries]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    index_descriptor = {"mediaType": OCI_INDEX, **_put_blob(directory, json.dumps(index, indent=2).encode())}
    _write_layout_index(directory, index_descriptor, tag)
    return str(index_descriptor["digest"]), [str(d["digest"]) for d in descriptors]


def skopeo_push(
    layout: Path, tag: str, registry: Registry, repository: str, *, extra: tuple[str, ...] = ()
) -> None:
    args = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if registry.auth != "none":
        args.append(f"--dest-creds={USER}:{PASSWORD}")
    args += [*extra, f"oci:{layout}:{tag}", f"docker://{registry.host}/{repository}:{tag}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy failed: {result.stderr.strip()}")


def registry_manifest(registry: Registry, repository: str, reference: str, accept: str) -> tuple[bytes, str]:
    """What the registry serves (no auth registries only): body and its Content-Type."""
    connection = http.client.HTTPConnection(registry.host, timeout=10)
    connection.request("GET", f"/v2/{repository}/manifests/{reference}", headers={"Accept": accept})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return body, response.getheader("Content-Type", "")


# -------------------------------------------------------------------------------- fault proxy


@dataclass
class FaultPlan:
    """What the proxy does to the requests it forwards (mutated by tests between calls)."""

    fail_blobs_with_500: int = 0  # the next N blob GETs answer 500
    fail_manifests_with_500: int = 0
    corrupt_blobs: bool = False  # flip the last byte (same length)
    truncate_blobs: bool = False  # announce the full length, send half, close
    manifest_delay_s: float = 0.0
    blob_delay_s: float = 0.0
    redirect_blobs: bool = False  # answer 307 to the registry itself, as blob stores do
    # A hostile registry: manifest GETs of these references (tag or digest) get this body instead.
    manifest_overrides: dict[str, bytes] = field(default_factory=dict)


class FaultProxy:
    """An HTTP proxy in front of one registry that injects faults and counts blob downloads."""

    def __init__(self, upstream: Registry) -> None:
        self.upstream = upstream.host
        self.plan = FaultPlan()
        self.blob_gets = 0
        self.manifest_gets = 0
        self._lock = threading.Lock()
        self.port = free_port()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

        self.server = QuietHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.plan = FaultPlan()
            self.blob_gets = 0
            self.manifest_gets = 0

    def _take(self, attribute: str) -> bool:
        with self._lock:
            remaining = int(getattr(self.plan, attribute))
            if remaining > 0:
                setattr(self.plan, attribute, remaining - 1)
                return True
            return False

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        is_blob = "/blobs/" in request.path
        is_manifest = "/manifests/" in request.path
        with self._lock:
            if is_blob:
                self.blob_gets += 1
            if is_manifest:
                self.manifest_gets += 1
            plan = self.plan
        if is_manifest and plan.manifest_delay_s:
            time.sleep(plan.manifest_delay_s)
        if is_blob and plan.blob_delay_s:
            time.sleep(plan.blob_delay_s)
        if (is_blob and self._take("fail_blobs_with_500")) or (
            is_manifest and self._take("fail_manifests_with_500")
        ):
            self._reply(
                request,
                500,
                {"Content-Type": "application/json"},
                b'{"errors":[{"code":"UNKNOWN","message":"injected failure"}]}',
            )
            return
        if is_manifest and request.path.rsplit("/", 1)[1] in plan.manifest_overrides:
            body = plan.manifest_overrides[request.path.rsplit("/", 1)[1]]
            media_type = json.loads(body).get("mediaType", OCI_MANIFEST)
            self._reply(request, 200, {"Content-Type": media_type}, body)
            return
        if is_blob and plan.redirect_blobs:
            self._reply(request, 307, {"Location": f"http://{self.upstream}{request.path}"}, b"")
            return
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "authorization")}
        try:
            upstream.request("GET", request.path, headers=headers)
            response = upstream.getresponse()
            body = response.read()
        except OSError:  # the registry went away (end of session) while a delayed request slept
            self._reply(request, 502, {}, b"")
            return
        finally:
            upstream.close()
        reply_headers = {
            k: v
            for k, v in response.getheaders()
            if k.lower() not in ("content-length", "connection", "transfer-encoding")
        }
        if is_blob and response.status == 200:
            if plan.corrupt_blobs and body:
                body = body[:-1] + bytes([body[-1] ^ 0xFF])
            if plan.truncate_blobs:
                request.send_response(200)
                for name, value in reply_headers.items():
                    request.send_header(name, value)
                request.send_header("Content-Length", str(len(body)))
                request.send_header("Connection", "close")
                request.end_headers()
                request.wfile.write(body[: len(body) // 2])
                request.wfile.flush()
                request.close_connection = True
                return
        self._reply(request, response.status, reply_headers, body)

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------- module server


@dataclass
class Route:
    body: bytes
    statuses: list[int] = field(default_factory=list)  # answered (in order) before the body is served
    delay_s: float = 0.0
    location: str = ""  # answer 302 with this Location instead of the body
    trickle_s: float = 0.0  # send the response one byte per this many seconds...
    trickle_headers: bool = (
        True  # ...from the status line (and 300 bytes of padding headers) on, or the body only
    )


class _IPv6HTTPServer(QuietHTTPServer):
    address_family = socket.AF_INET6


class ModuleServer:
    """A plain HTTP server for the http(s) fetcher tests: routes, scripted failures, request counts.

    ``address`` is any loopback address (``127.0.0.2``, ``::1``); ``url()`` brackets IPv6 literals.
    """

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.routes: dict[str, Route] = {}
        self.requests: dict[str, int] = {}
        self._lock = threading.Lock()
        self.port = free_port() if ":" not in address else 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.requests[self.path] = server.requests.get(self.path, 0) + 1
                    route = server.routes.get(self.path)
                    status = route.statuses.pop(0) if route is not None and route.statuses else 200
                if route is None:
                    status = 404
                elif route.delay_s:
                    time.sleep(route.delay_s)
                if route is not None and route.location:
                    self.send_response(302)
                    self.send_header("Location", route.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = route.body if route is not None and status == 200 else b"failure"
                if route is not None and route.trickle_s:
                    head = f"HTTP/1.1 {status} OK\r\nContent-Length: {len(body)}\r\n".encode()
                    if route.trickle_headers:
                        head += b"X-Padding: " + b"p" * 300 + b"\r\n\r\n"
                        trickled = head + body
                    else:
                        self.wfile.write(head + b"\r\n")
                        self.wfile.flush()
                        trickled = body
                    for offset in range(len(trickled)):
                        self.wfile.write(trickled[offset : offset + 1])
                        self.wfile.flush()
                        time.sleep(route.trickle_s)
                    return
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server_class = _IPv6HTTPServer if ":" in address else QuietHTTPServer
        self.server = server_class((address, self.port), Handler)
        self.port = int(self.server.server_address[1])
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}{path}"

    def serve(
        self,
        path: str,
        body: bytes,
        statuses: list[int] | None = None,
        delay_s: float = 0.0,
        location: str = "",
        trickle_s: float = 0.0,
        trickle_headers: bool = True,
    ) -> str:
        with self._lock:
            self.routes[path] = Route(
                body, list(statuses or []), delay_s, location, trickle_s, trickle_headers
            )
            self.requests.pop(path, None)
        return self.url(path)

    def redirect(self, path: str, location: str) -> str:
        return self.serve(path, b"", location=location)

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests.get(path, 0)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------- raw listener


class RawListener:
    """A TCP listener that records how each connection starts and answers with fixed bytes.

    ``answer=None`` never answers: a registry that stalls. Otherwise every connection gets
    ``answer`` and is closed, whatever it sent (a plain-HTTP server answering a TLS ClientHello).
    """

    TLS_HANDSHAKE = 0x16  # first byte of a TLS ClientHello record

    def __init__(self, address: str = "127.0.0.1", answer: bytes | None = None) -> None:
        self.answer = answer
        self.first_bytes: list[bytes] = []  # what each connection sent first, in order
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._socket = socket.create_server((address, 0))
        self.host = f"{address}:{self._socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(10)
        try:
            first = connection.recv(5)
        except OSError:
            first = b""
        with self._lock:
            self.first_bytes.append(first)
            self._held.append(connection)
        self._connected.set()
        if self.answer is not None:
            with contextlib.suppress(OSError):
                connection.sendall(self.answer)
            connection.close()

    def wait_for_connection(self, timeout_s: float = 30.0) -> None:
        if not self._connected.wait(timeout_s):
            raise AssertionError(f"nothing connected to {self.host} within {timeout_s} s")

    def tls_connections(self) -> int:
        with self._lock:
            return sum(1 for first in self.first_bytes if first[:1] == bytes([self.TLS_HANDSHAKE]))

    def stop(self) -> None:
        self._socket.close()
        with self._lock:
            for connection in self._held:
                connection.close()
