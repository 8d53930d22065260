"""mTLS xDS against a real `wasmesh control-plane` process: who gets what.

The xDS clients are wasmesh's own (`XdsClient` with a `WorkloadCertificates`), over real sockets;
the control plane runs secure (its CA in a fresh state directory) unless a test says --plaintext.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cp_helpers import ControlPlaneProcess, free_port, plugin_yaml, run_wasmesh, workload_yaml
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2

from wasmesh.security.ca import CertificateAuthority, Identity, csr_for, key_pem, new_key
from wasmesh.security.certservice import request_certificate
from wasmesh.security.workload import WorkloadCertificates, XdsTlsOptions
from wasmesh.xds.client import ClientSnapshot, XdsClient

DOCKER_CONFIG = '{"auths":{"registry.example:5000":{"auth":"dXNlcjpwYXNz"}}}'
SECRET_YAML = f"""apiVersion: v1
kind: Secret
type: kubernetes.io/dockerconfigjson
metadata: {{name: regcred, namespace: default}}
data:
  .dockerconfigjson: {base64.b64encode(DOCKER_CONFIG.encode()).decode()}
"""
PLUGIN = "extensions.istio.io/wasmplugin/default.auth"
ROOT_PLUGIN = "extensions.istio.io/wasmplugin/istio-system.root-auth"
# How long a client that must get nothing is given to get something anyway.
GRACE_S = 4.0


@dataclass
class SecureMesh:
    plane: ControlPlaneProcess
    state: Path
    config: Path
    ca_port: int

    @property
    def root(self) -> Path:
        return self.state / "ca-cert.pem"

    def token(self, namespace: str, name: str) -> str:
        created = run_wasmesh(
            "control-plane", "bootstrap-token", "create", "--state-dir", str(self.state),
            "--namespace", namespace, "--name", name,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        return created.stdout.strip()

    def tls(self, name: str, token: str | None = None, ttl: float = 3600.0, **files: Path) -> XdsTlsOptions:
        return XdsTlsOptions(
            root_cert=self.root,
            identity=Identity("cluster.local", "default", name),
            ca_address=f"127.0.0.1:{self.ca_port}",
            token=token if token is not None or files else self.token("default", name),
            ttl=ttl,
            **files,
        )


def _write_config(config: Path, echo_port: int) -> None:
    config.mkdir()
    (config / "web-1.yaml").write_text(workload_yaml("web-1", {"app": "web"}, free_port(), echo_port))
    (config / "other.yaml").write_text(workload_yaml("other", {"app": "other"}, free_port(), echo_port))
    plugin = plugin_yaml("auth", "oci://registry.example:5000/auth:v1", selector={"app": "web"})
    (config / "auth.yaml").write_text(plugin.replace("spec:\n", "spec:\n  imagePullSecret: regcred\n", 1))
    (config / "secret.yaml").write_text(SECRET_YAML)
    # A root-namespace plugin selecting the same proxy, with a pull secret of the root namespace.
    root = plugin_yaml("root-auth", "oci://registry.example:5000/root:v1", namespace="istio-system")
    (config / "root-auth.yaml").write_text(root.replace("spec:\n", "spec:\n  imagePullSecret: rootcred\n", 1))
    (config / "root-secret.yaml").write_text(
        SECRET_YAML.replace("name: regcred, namespace: default", "name: rootcred, namespace: istio-system")
    )


@pytest.fixture
def secure_mesh(tmp_path: Path) -> Iterator[SecureMesh]:
    state, config, ca_port = tmp_path / "state", tmp_path / "config", free_port()
    _write_config(config, free_port())
    plane = ControlPlaneProcess(
        "--state-dir", str(state), "--ca-port", str(ca_port), "--config-dir", str(config),
        "--cert-ttl", "3600", log_path=tmp_path / "control-plane.log",
    )  # fmt: skip
    try:
        yield SecureMesh(plane, state, config, ca_port)
    finally:
        plane.stop()


def _pull_secret(snapshot: ClientSnapshot, name: str = PLUGIN) -> str:
    extension = snapshot.extension_configs()[name]
    wasm = http_wasm_pb2.Wasm()
    extension.typed_config.Unpack(wasm)
    config: wasm_pb2.PluginConfig = wasm.config
    return str(config.vm_config.environment_variables.key_values["ISTIO_META_WASM_IMAGE_PULL_SECRET"])


async def _session(
    xds_port: int, node: str, tls: XdsTlsOptions | None, wait_s: float
) -> tuple[XdsClient, ClientSnapshot | None]:
    """Run one client for up to `wait_s` s; the snapshot once it has the plugin's ECDS, else None."""
    certificates = WorkloadCertificates(tls, f"127.0.0.1:{xds_port}") if tls is not None else None
    client = XdsClient(f"127.0.0.1:{xds_port}", node, {"app": "web"}, tls=certificates, reconnect_max=0.5)
    task = asyncio.create_task(client.run())
    try:
        return client, await client.wait_for(lambda s: PLUGIN in s.extension_configs(), timeout=wait_s)
    except TimeoutError:
        return client, None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_verified_proxy_gets_its_config_and_its_namespace_pull_secret(secure_mesh: SecureMesh) -> None:
    tls = secure_mesh.tls("web-1")
    _client, snapshot = asyncio.run(_session(secure_mesh.plane.xds_port, "web-1", tls, 30))
    assert snapshot is not None, secure_mesh.plane.log()[-3000:]
    assert _pull_secret(snapshot) == DOCKER_CONFIG
    # The root namespace's secret is not for an identity of namespace default.
    assert _pull_secret(snapshot, ROOT_PLUGIN) == ""
    log = secure_mesh.plane.log()
    assert "CA: issued a certificate for spiffe://cluster.local/ns/default/sa/web-1 (3600 s)" in log


def test_a_proxy_without_certificate_gets_nothing(secure_mesh: SecureMesh) -> None:
    client, snapshot = asyncio.run(_session(secure_mesh.plane.xds_port, "web-1", None, GRACE_S))
    assert (snapshot, client.connected, dict(client.snapshot.resources)) == (None, False, {})
    assert "ADS: new connection" not in secure_mesh.plane.log()


def test_a_proxy_with_a_wrong_token_gets_no_certificate_and_nothing(secure_mesh: SecureMesh) -> None:
    tls = secure_mesh.tls("web-1", token="not-a-token")
    client, snapshot = asyncio.run(_session(secure_mesh.plane.xds_port, "web-1", tls, GRACE_S))
    assert (snapshot, client.connected, dict(client.snapshot.resources)) == (None, False, {})
    assert client.last_refusal == "CreateCertificate needs a valid bootstrap token"
    assert "ADS: new connection" not in secure_mesh.plane.log()


def test_a_certificate_from_another_ca_is_refused_in_the_handshake(
    secure_mesh: SecureMesh, tmp_path: Path
) -> None:
    impostor = CertificateAuthority.create()
    identity = Identity("cluster.local", "default", "web-1")
    key = new_key()
    (tmp_path / "cert.pem").write_bytes(impostor.sign_csr(csr_for(identity, key), identity, 3600))
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    tls = secure_mesh.tls("web-1", cert_path=tmp_path / "cert.pem", key_path=tmp_path / "key.pem")
    client, snapshot = asyncio.run(_session(secure_mesh.plane.xds_port, "web-1", tls, GRACE_S))
    assert (snapshot, client.connected, dict(client.snapshot.resources)) == (None, False, {})
    # Refused by TLS itself: no stream was ever opened, so the ADS layer had nothing to refuse.
    assert client.last_refusal == ""
    log = secure_mesh.plane.log()
    assert ("ADS: new connection" in log, "ADS: refused node" in log) == (False, False)


def test_a_valid_certificate_for_a_claiming_b_is_refused(secure_mesh: SecureMesh) -> None:
    tls = secure_mesh.tls("web-1")
    client, snapshot = asyncio.run(_session(secure_mesh.plane.xds_port, "other", tls, GRACE_S))
    assert (snapshot, client.connected, dict(client.snapshot.resources)) == (None, False, {})
    expected = (
        "identity spiffe://cluster.local/ns/default/sa/web-1 may not act as namespace default workload other"
    )
    assert client.last_refusal == expected
    refusals = [line for line in secure_mesh.plane.log().splitlines() if "ADS: refused node other" in line]
    assert refusals[0].endswith(expected)
    assert "ADS: new connection" not in secure_mesh.plane.log()


def test_a_pre_provisioned_certificate_is_enough(secure_mesh: SecureMesh, tmp_path: Path) -> None:
    made = run_wasmesh(
        "control-plane", "cert", "create", "--state-dir", str(secure_mesh.state), "--namespace", "default",
        "--name", "web-1", "--cert-out", str(tmp_path / "c.pem"), "--key-out", str(tmp_path / "k.pem"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    tls = secure_mesh.tls("web-1", cert_path=tmp_path / "c.pem", key_path=tmp_path / "k.pem")
    assert tls.token is None
    _client, snapshot = asyncio.run(_session(secure_mesh.plane.xds_port, "web-1", tls, 30))
    assert snapshot is not None and _pull_secret(snapshot) == DOCKER_CONFIG


def test_the_ca_key_is_private_and_never_logged(secure_mesh: SecureMesh) -> None:
    key = (secure_mesh.state / "ca-key.pem").read_text()
    assert (secure_mesh.state / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    token = secure_mesh.token("default", "web-1")
    assert (secure_mesh.state / "tokens").stat().st_mode & 0o777 == 0o600
    asyncio.run(_session(secure_mesh.plane.xds_port, "web-1", secure_mesh.tls("web-1", token=token), 30))
    log = secure_mesh.plane.log()
    assert ("PRIVATE KEY" in log, key.splitlines()[1] in log, token in log) == (False, False, False)
    assert token not in (secure_mesh.state / "tokens").read_text()


def test_plain_text_serves_no_pull_secret_and_only_on_loopback(tmp_path: Path) -> None:
    config = tmp_path / "config"
    _write_config(config, free_port())
    plane = ControlPlaneProcess("--config-dir", str(config))
    try:
        _client, snapshot = asyncio.run(_session(plane.xds_port, "web-1", None, 30))
        assert snapshot is not None
        assert _pull_secret(snapshot) == ""
    finally:
        plane.stop()
    refused = run_wasmesh(
        "control-plane", "--plaintext", "--host", "0.0.0.0", "--xds-port", "0", "--api-port", "0"
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: --host 0.0.0.0: plain-text xDS is only served on a loopback address"
    )


def test_rotation_under_a_live_stream_keeps_pushes_coming(secure_mesh: SecureMesh) -> None:
    """10 s certificates renew at 5 s; pushes made after two rotations (and after the first
    certificate expired) still arrive on the one stream opened with it."""

    async def scenario() -> tuple[int, list[str]]:
        tls = secure_mesh.tls("web-1", ttl=10)
        certificates = WorkloadCertificates(tls, f"127.0.0.1:{secure_mesh.plane.xds_port}")
        client = XdsClient(f"127.0.0.1:{secure_mesh.plane.xds_port}", "web-1", tls=certificates)
        task = asyncio.create_task(client.run())
        seen: list[str] = []
        try:
            await client.wait_for(lambda s: PLUGIN in s.extension_configs(), timeout=30)
            for round_ in range(1, 4):
                deadline = asyncio.get_running_loop().time() + 40
                while certificates.rotations < round_ and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.2)
                name = f"after-rotation-{round_}"
                (secure_mesh.config / f"{name}.yaml").write_text(plugin_yaml(name, "file:///p.wasm"))
                wanted = f"extensions.istio.io/wasmplugin/default.{name}"
                await client.wait_for(lambda s, wanted=wanted: wanted in s.extension_configs(), timeout=30)
                seen.append(name)
            return certificates.rotations, seen
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    rotations, seen = asyncio.run(scenario())
    assert rotations >= 3
    assert seen == ["after-rotation-1", "after-rotation-2", "after-rotation-3"]
    log = secure_mesh.plane.log()
    assert log.count("ADS: new connection web-1") == 1, log[-3000:]
    assert log.count("CA: issued a certificate for spiffe://cluster.local/ns/default/sa/web-1 (10 s)") >= 4


def test_token_and_cert_commands_give_one_line_errors(tmp_path: Path) -> None:
    bad = run_wasmesh("control-plane", "bootstrap-token", "create", "--state-dir", str(tmp_path),
                      "--namespace", "a b", "--name", "x")  # fmt: skip
    assert (bad.returncode, bad.stderr.strip()) == (
        2, "error: --namespace: expected a name without spaces or '/', got 'a b'"
    )
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == "[]"


def test_the_ca_signs_only_the_identity_the_token_proves(secure_mesh: SecureMesh) -> None:
    token = secure_mesh.token("default", "web-1")

    async def ask(identity: Identity) -> str:
        credentials = grpc.ssl_channel_credentials(secure_mesh.root.read_bytes())
        options = [("grpc.ssl_target_name_override", "istiod.istio-system.svc")]
        target = f"127.0.0.1:{secure_mesh.ca_port}"
        async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
            try:
                await request_certificate(channel, csr_for(identity, new_key()), 60, token)
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
        return "issued"

    assert asyncio.run(ask(Identity("cluster.local", "default", "web-1"))) == "issued"
    assert asyncio.run(ask(Identity("cluster.local", "default", "other"))) == (
        "INVALID_ARGUMENT: CSR: asks for spiffe://cluster.local/ns/default/sa/other but the caller is "
        "spiffe://cluster.local/ns/default/sa/web-1"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["proxy", "--xds", "10.0.0.1:15012", "--node-id", "web-1", "--plaintext"],
            "error: --plaintext: plain-text xDS only to a loopback address, not 10.0.0.1",
        ),
        (
            ["proxy", "--xds", "127.0.0.1:15012", "--node-id", "web-1"],
            "error: --xds-root-cert: required for mTLS xDS (or give --plaintext on loopback)",
        ),
        (
            ["proxy", "--xds", "127.0.0.1:15012", "--node-id", "w", "--xds-root-cert", "/nonexistent.pem"],
            "error: --xds-root-cert /nonexistent.pem: no such file",
        ),
        (
            ["agent", "--xds", "127.0.0.1:15012", "--metrics-port", "-1"],
            "error: --name: required for mTLS xDS (the Workload/Gateway this Envoy serves)",
        ),
        (
            ["agent", "--xds", "127.0.0.1:15012", "--name", "web-1", "--listen", "0.0.0.0:15010"],
            "error: --listen 0.0.0.0:15010: must be a loopback address (it speaks as --name)",
        ),
    ],
)
def test_clients_are_secure_unless_told_and_say_why(argv: list[str], message: str) -> None:
    result = run_wasmesh(*argv)
    assert (result.returncode, result.stderr.strip()) == (2, message)
