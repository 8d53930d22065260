"""The control plane API as shipped: HTTPS, bearer tokens with roles, redacted Secrets, an audit log.

A real `wasmesh control-plane` process (no --insecure-api) with its self-signed serving cert and
first-start admin token; tokens are made with the real `wasmesh control-plane token` command and
requests go over real HTTPS, from the real CLI or from urllib with the plane's CA.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cp_helpers import ControlPlaneProcess, free_port, plugin_yaml, run_wasmesh

from wasmesh.controlplane.auth import ensure_serving_cert

SECRET_VALUE = "hunter2-registry-password"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


def call(
    plane: ControlPlaneProcess, method: str, path: str, token: str | None = None, body: bytes = b""
) -> Reply:
    """One HTTPS request to the plane's API, verifying its serving cert."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(
        f"{plane.server}{path}", data=body if method == "POST" else None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=plane.ssl_context()) as response:
            return Reply(
                int(response.status), {k.lower(): v for k, v in response.headers.items()}, response.read()
            )
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def audit_lines(plane: ControlPlaneProcess) -> list[dict[str, Any]]:
    path = plane.state_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def create_token(plane: ControlPlaneProcess, *args: str) -> str:
    result = run_wasmesh("control-plane", "token", "create", *args, "--state-dir", str(plane.state_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def token_id(token: str) -> str:
    return token.removeprefix("wmt_").split(".")[0]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    state = tmp_path_factory.mktemp("cp") / "state"
    plane = ControlPlaneProcess(secure=True, state_dir=state)
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def tokens(plane: ControlPlaneProcess) -> dict[str, str]:
    return {
        "admin": plane.admin_token,
        "viewer": create_token(plane, "--user", "victor", "--role", "viewer", "--namespace", "team-a"),
        "editor": create_token(plane, "--user", "alice", "--role", "editor", "--namespace", "team-a"),
    }


def cli(plane: ControlPlaneProcess, token: str | None, *argv: str, stdin: str | None = None) -> Any:
    """The real CLI against the plane, trusting its CA, with `token` (None: none)."""
    auth = ["--token", token] if token is not None else []
    return run_wasmesh(
        *argv, "--server", plane.server, "--certificate-authority", str(plane.ca_file), *auth, stdin=stdin
    )


def forbidden(user: str, verb: str, namespace: str, name: str = "auth") -> str:
    return (
        f'Error from server (Forbidden): wasmplugins.extensions.istio.io "{name}" is forbidden: '
        f'User "{user}" cannot {verb} resource "wasmplugins" in API group "extensions.istio.io" '
        f'in the namespace "{namespace}"\n'
    )


def test_first_start_writes_an_admin_token_file_and_logs_only_its_path(plane: ControlPlaneProcess) -> None:
    admin_file = plane.state_dir / "admin-token"
    assert plane.admin_token.startswith("wmt_")
    for name in ("admin-token", "tokens.json", "api.key", "api.crt"):
        assert stat.S_IMODE((plane.state_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(plane.state_dir.stat().st_mode) == 0o700
    log = plane.log()
    assert f"admin token written to {admin_file} (mode 0600)" in log
    assert plane.admin_token not in log
    assert plane.admin_token not in (plane.state_dir / "tokens.json").read_text()  # stored hashed


def test_anonymous_requests_are_401_except_health(plane: ControlPlaneProcess) -> None:
    for method, path in (
        ("POST", "/apply"),
        ("POST", "/delete"),
        ("GET", "/resources/wasmplugins"),
        ("GET", "/resources/secrets/default/x"),
        ("DELETE", "/resources/wasmplugins/default/x"),
        ("GET", "/status/wasmplugins"),
        ("GET", "/metrics"),
        ("GET", "/debug/connections"),
        ("GET", "/no/such/route"),
    ):
        reply = call(plane, method, path, body=b"x: 1\n")
        assert (reply.status, reply.headers["www-authenticate"]) == (401, 'Bearer realm="wasmesh"'), path
        assert reply.json == {"errors": ["Unauthorized: no bearer token"]}
    assert call(
        plane, "GET", "/resources/wasmplugins", token="wmt_0123456789ab.not-a-real-token-value"
    ).json == {"errors": ["Unauthorized: invalid bearer token"]}
    assert (call(plane, "GET", "/healthz").status, call(plane, "GET", "/readyz").status) == (200, 200)
    applied = cli(plane, None, "apply", "-f", "-", stdin=plugin_yaml("auth", "file:///a.wasm"))
    assert (applied.returncode, applied.stdout, applied.stderr) == (
        1,
        "",
        "error: You must be logged in to the server (Unauthorized): Unauthorized: no bearer token\n",
    )


def test_viewer_reads_its_namespace_and_cannot_change_anything(
    plane: ControlPlaneProcess, tokens: dict[str, str]
) -> None:
    manifest = plugin_yaml("auth", "file:///a.wasm", namespace="team-a")
    assert cli(plane, tokens["admin"], "apply", "-f", "-", stdin=manifest).returncode == 0
    viewer = tokens["viewer"]
    applied = cli(plane, viewer, "apply", "-f", "-", stdin=manifest)
    assert (applied.returncode, applied.stderr) == (1, forbidden("victor", "patch", "team-a"))
    deleted = cli(plane, viewer, "delete", "wasmplugin", "auth", "-n", "team-a")
    assert (deleted.returncode, deleted.stderr) == (1, forbidden("victor", "delete", "team-a"))
    got = cli(plane, viewer, "get", "wasmplugins", "-n", "team-a", "-o", "name")
    assert (got.returncode, got.stdout) == (0, "wasmplugin.extensions.istio.io/auth\n")
    other = cli(plane, viewer, "get", "wasmplugins", "-n", "team-b")
    assert (other.returncode, other.stderr) == (
        1,
        'Error from server (Forbidden): wasmplugins.extensions.istio.io is forbidden: User "victor" cannot '
        'list resource "wasmplugins" in API group "extensions.istio.io" in the namespace "team-b"\n',
    )
    assert call(plane, "GET", "/metrics", viewer).status == 200  # Prometheus scrapes with a viewer token
    debug = call(plane, "GET", "/debug/connections", viewer)
    assert (debug.status, debug.json) == (
        403,
        {"errors": ['forbidden: User "victor" cannot get path "/debug/connections"']},
    )
    assert call(plane, "GET", "/debug/connections", tokens["admin"]).status == 200
    assert cli(plane, tokens["admin"], "delete", "wasmplugin", "auth", "-n", "team-a").returncode == 0


def test_editor_changes_only_its_namespaces_and_admin_changes_any(
    plane: ControlPlaneProcess, tokens: dict[str, str]
) -> None:
    editor = tokens["editor"]
    in_a = cli(
        plane, editor, "apply", "-f", "-", stdin=plugin_yaml("auth", "file:///a.wasm", namespace="team-a")
    )
    assert (in_a.returncode, in_a.stdout) == (0, "wasmplugin.extensions.istio.io/auth created\n")
    in_b = cli(
        plane, editor, "apply", "-f", "-", stdin=plugin_yaml("auth", "file:///a.wasm", namespace="team-b")
    )
    assert (in_b.returncode, in_b.stdout, in_b.stderr) == (1, "", forbidden("alice", "create", "team-b"))
    # All or nothing: a body with one forbidden document applies none of them.
    both = plugin_yaml("second", "file:///a.wasm", namespace="team-a") + "---\n"
    both += plugin_yaml("auth", "file:///a.wasm", namespace="team-b")
    mixed = cli(plane, editor, "apply", "-f", "-", stdin=both)
    assert (mixed.returncode, mixed.stderr) == (1, forbidden("alice", "create", "team-b"))
    every = call(plane, "GET", "/resources/wasmplugins", editor)
    assert every.status == 403
    assert every.json["errors"] == [
        'wasmplugins.extensions.istio.io is forbidden: User "alice" cannot list resource "wasmplugins" '
        'in API group "extensions.istio.io" at the cluster scope'
    ]
    admin = tokens["admin"]
    listed = call(plane, "GET", "/resources/wasmplugins", admin).json["items"]
    assert [(item["metadata"]["namespace"], item["metadata"]["name"]) for item in listed] == [
        ("team-a", "auth")
    ]
    by_admin = cli(
        plane, admin, "apply", "-f", "-", stdin=plugin_yaml("auth", "file:///a.wasm", namespace="team-b")
    )
    assert (by_admin.returncode, by_admin.stdout) == (0, "wasmplugin.extensions.istio.io/auth created\n")
    removed = cli(plane, editor, "delete", "wasmplugin", "auth", "-n", "team-a")
    assert (removed.returncode, removed.stdout) == (0, 'wasmplugin.extensions.istio.io "auth" deleted\n')
    assert cli(plane, admin, "delete", "wasmplugins", "--all", "-A").returncode == 0


def test_expired_and_revoked_tokens_are_refused(plane: ControlPlaneProcess) -> None:
    short = create_token(plane, "--user", "temp", "--role", "viewer", "--namespace", "team-a", "--ttl", "1s")
    revoked = create_token(plane, "--user", "gone", "--role", "editor", "--namespace", "*")
    assert call(plane, "GET", "/resources/wasmplugins", revoked).status == 200  # '*': every namespace
    result = run_wasmesh(
        "control-plane", "token", "revoke", token_id(revoked), "--state-dir", str(plane.state_dir)
    )
    assert (result.returncode, result.stdout) == (0, f'token "{token_id(revoked)}" revoked\n')
    reply = call(plane, "GET", "/resources/wasmplugins", revoked)
    assert (reply.status, reply.json) == (
        401,
        {"errors": [f"Unauthorized: token {token_id(revoked)} is revoked"]},
    )
    time.sleep(1.5)
    reply = call(plane, "GET", "/resources/wasmplugins?namespace=team-a", short)
    assert (reply.status, reply.json) == (
        401,
        {"errors": [f"Unauthorized: token {token_id(short)} is expired"]},
    )
    listed = run_wasmesh("control-plane", "token", "list", "--state-dir", str(plane.state_dir))
    states = {row.split()[1]: row.split()[-1] for row in listed.stdout.splitlines()[1:]}
    assert (states["temp"], states["gone"], states["admin"]) == ("expired", "revoked", "active")
    assert short not in listed.stdout and revoked not in listed.stdout
    missing = run_wasmesh("control-plane", "token", "revoke", "nope", "--state-dir", str(plane.state_dir))
    assert (missing.returncode, missing.stderr) == (1, 'error: token "nope" not found\n')
    invalid = run_wasmesh(
        "control-plane",
        "token",
        "create",
        "--user",
        "x",
        "--role",
        "editor",
        "--state-dir",
        str(plane.state_dir),
    )
    assert (invalid.returncode, invalid.stderr) == (
        1,
        "error: --namespace: a editor token needs at least one namespace (or '*')\n",
    )


def test_a_broken_token_file_keeps_the_tokens_read_before(
    plane: ControlPlaneProcess, tokens: dict[str, str]
) -> None:
    path = plane.state_dir / "tokens.json"
    good = path.read_text()
    try:
        path.write_text('{"tokens": [{"id": ')  # e.g. an editor saving half a file
        assert call(plane, "GET", "/resources/wasmplugins", tokens["admin"]).status == 200
        assert f"{path}: unreadable token file" in plane.log()
    finally:
        path.write_text(good)
    assert call(plane, "GET", "/resources/wasmplugins?namespace=team-a", tokens["viewer"]).status == 200


def test_secret_values_are_never_returned_to_any_role(
    plane: ControlPlaneProcess, tokens: dict[str, str]
) -> None:
    secret = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": "regcred", "namespace": "team-a"},
            "stringData": {".dockerconfigjson": json.dumps({"auths": {"r": {"password": SECRET_VALUE}}})},
            "data": {"extra": "aHVudGVyMi1yZWdpc3RyeS1wYXNzd29yZA=="},
        }
    )
    applied = cli(plane, tokens["admin"], "apply", "-f", "-", stdin=secret)
    assert (applied.returncode, applied.stdout) == (0, "secret/regcred created\n")
    for role in ("admin", "editor", "viewer"):
        one = call(plane, "GET", "/resources/secrets/team-a/regcred", tokens[role])
        assert one.status == 200, role
        assert (one.json["stringData"], one.json["data"]) == (
            {".dockerconfigjson": "<redacted>"},
            {"extra": "<redacted>"},
        ), role
        listed = call(plane, "GET", "/resources/secrets?namespace=team-a", tokens[role])
        assert [item["stringData"] for item in listed.json["items"]] == [{".dockerconfigjson": "<redacted>"}]
        as_yaml = cli(plane, tokens[role], "get", "secret", "regcred", "-n", "team-a", "-o", "yaml")
        described = cli(plane, tokens[role], "describe", "secret", "regcred", "-n", "team-a")
        for text in (one.body.decode(), listed.body.decode(), as_yaml.stdout, described.stdout):
            assert SECRET_VALUE not in text and "aHVudGVy" not in text, role
        assert described.stdout.splitlines()[-2:] == ["extra:  <redacted>", ".dockerconfigjson:  <redacted>"]
    assert SECRET_VALUE not in (plane.state_dir / "audit.log").read_text()
    assert cli(plane, tokens["admin"], "delete", "secret", "regcred", "-n", "team-a").returncode == 0


def test_changes_and_denials_are_audited_without_token_values(
    plane: ControlPlaneProcess, tokens: dict[str, str]
) -> None:
    before = len(audit_lines(plane))
    manifest = plugin_yaml("audited", "file:///a.wasm", namespace="team-a")
    assert cli(plane, tokens["editor"], "apply", "-f", "-", stdin=manifest).returncode == 0
    assert cli(plane, tokens["viewer"], "apply", "-f", "-", stdin=manifest).returncode == 1
    assert call(plane, "POST", "/apply", None, manifest.encode()).status == 401
    assert call(plane, "DELETE", "/resources/wasmplugins/team-a/audited", tokens["editor"]).status == 200
    created = create_token(plane, "--user", "bob", "--role", "viewer", "--namespace", "team-a")
    lines = audit_lines(plane)[before:]
    for line in lines:
        assert set(line) >= {"time", "user", "verb", "kind", "namespace", "name", "code", "source"}
    summary = [
        (line["user"], line["verb"], line["kind"], line["namespace"], line["name"], line["code"])
        for line in lines
    ]
    assert summary[:4] == [
        ("alice", "apply", "WasmPlugin", "team-a", "audited", 200),
        ("victor", "patch", "WasmPlugin", "team-a", "audited", 403),
        ("system:anonymous", "post", "", "", "/apply", 401),
        ("alice", "delete", "WasmPlugin", "team-a", "audited", 200),
    ]
    assert summary[4][1:6] == ("create", "Token", "", token_id(created), 200)
    assert [line["source"].split(":")[0] for line in lines[:4]] == ["127.0.0.1"] * 4
    assert (lines[1]["reason"], lines[2]["reason"]) == ("forbidden", "no bearer token")
    text = (plane.state_dir / "audit.log").read_text()
    for token in (*tokens.values(), created):
        assert token not in text
    assert stat.S_IMODE((plane.state_dir / "audit.log").stat().st_mode) == 0o600


def test_client_config_contexts(
    plane: ControlPlaneProcess, tokens: dict[str, str], client_config: Path
) -> None:
    token_file = plane.state_dir / "admin-token"
    made = run_wasmesh(
        "config", "set-context", "local", "--server", plane.server,
        "--certificate-authority", str(plane.ca_file), "--token-file", str(token_file),
    )  # fmt: skip
    assert (made.returncode, made.stdout) == (0, 'Context "local" created.\n')
    assert stat.S_IMODE(client_config.stat().st_mode) == 0o600
    viewer = run_wasmesh(
        "config", "set-context", "viewer", "--server", plane.server, "--token", tokens["viewer"]
    )
    assert (viewer.returncode, viewer.stdout) == (0, 'Context "viewer" created.\n')
    assert run_wasmesh("config", "current-context").stdout == "local\n"  # the first context is used
    view = run_wasmesh("config", "view")
    assert yaml.safe_load(view.stdout) == {
        "current-context": "local",
        "contexts": [
            {
                "name": "local",
                "server": plane.server,
                "certificate-authority": str(plane.ca_file),
                "token": "REDACTED",
            },
            {"name": "viewer", "server": plane.server, "token": "REDACTED"},
        ],
    }
    manifest = plugin_yaml("ctx", "file:///a.wasm", namespace="team-a")
    applied = run_wasmesh("apply", "-f", "-", stdin=manifest)  # server, CA and token from "local"
    assert (applied.returncode, applied.stdout) == (0, "wasmplugin.extensions.istio.io/ctx created\n")
    # --token overrides the context's token, as kubectl's does.
    overridden = run_wasmesh("delete", "wasmplugin", "ctx", "-n", "team-a", "--token", tokens["viewer"])
    assert (overridden.returncode, overridden.stderr) == (1, forbidden("victor", "delete", "team-a", "ctx"))
    assert run_wasmesh("config", "use-context", "viewer").stdout == 'Switched to context "viewer".\n'
    unverified = run_wasmesh("get", "wasmplugins", "-n", "team-a", "-o", "name")  # no CA in "viewer"
    assert unverified.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in unverified.stderr
    skipped = run_wasmesh("get", "wasmplugins", "-n", "team-a", "-o", "name", "--insecure-skip-tls-verify")
    assert (skipped.returncode, skipped.stdout) == (0, "wasmplugin.extensions.istio.io/ctx\n")
    embedded = run_wasmesh(
        "config", "set-context", "viewer", "--certificate-authority", str(plane.ca_file), "--embed-certs"
    )
    assert (embedded.returncode, embedded.stdout) == (0, 'Context "viewer" modified.\n')
    assert run_wasmesh("get", "wasmplugins", "-n", "team-a", "-o", "name").returncode == 0
    assert (
        run_wasmesh("config", "use-context", "nope").stderr
        == 'error: no context exists with the name: "nope"\n'
    )
    assert tokens["viewer"] not in run_wasmesh("config", "view").stdout
    assert run_wasmesh("delete", "wasmplugin", "ctx", "-n", "team-a", "--context", "local").returncode == 0


def test_a_given_serving_cert_is_used_and_flags_are_checked(tmp_path: Path) -> None:
    cert, key = ensure_serving_cert(tmp_path / "pki", "127.0.0.1")  # stands in for a CA-signed pair
    plane = ControlPlaneProcess(
        "--api-cert",
        str(cert),
        "--api-key",
        str(key),
        secure=True,
        state_dir=tmp_path / "state",
        ca_file=cert,
    )
    try:
        assert call(plane, "GET", "/resources/wasmplugins", plane.admin_token).status == 200
        assert not (plane.state_dir / "api.crt").exists()  # nothing self-signed was made
    finally:
        plane.stop()
    half = subprocess.run(
        [
            sys.executable,
            "-m",
            "wasmesh",
            "control-plane",
            "--api-cert",
            str(cert),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (half.returncode, half.stderr) == (2, "error: --api-cert and --api-key must be given together\n")


def test_insecure_api_only_on_loopback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "wasmesh", "control-plane", "--insecure-api", "--host", "0.0.0.0"),
            *("--api-port", str(free_port()), "--state-dir", str(tmp_path / "state")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (
        2,
        "--insecure-api: only with a loopback --host (127.0.0.1, ::1), not 0.0.0.0\n",
    )
