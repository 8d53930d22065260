"""kubectl habits of `wasmesh get/describe/delete/apply` against a real control plane process.

Each verb runs once as its own `python -m wasmesh` process (test_every_verb_as_a_process); the rest
call the same entry point, `wasmesh.cli.main`, in this process to keep the suite fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cp_helpers import ControlPlaneProcess, free_port, plugin_yaml, run_wasmesh

from wasmesh.cli import main


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture()
def wasmesh(capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """`wasmesh ARGV` through its entry point in this process, with its exit code and output."""

    def run(*argv: str) -> Ran:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlaneProcess]:
    plane = ControlPlaneProcess()
    yield plane
    plane.stop()


@pytest.fixture()
def plugins(plane: ControlPlaneProcess, tmp_path: Path, wasmesh: Callable[..., Ran]) -> Iterator[Path]:
    """auth + stats in `default`, auth in `prod`, a secret in `default`."""
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(
        "---\n".join(
            [
                plugin_yaml("auth", "file:///plugins/auth.wasm", {"a": 1}, phase="AUTHN", priority=7),
                plugin_yaml("stats", "oci://registry.local/stats:1"),
                plugin_yaml("auth", "file:///plugins/auth.wasm", namespace="prod", selector={"app": "web"}),
                yaml.safe_dump(
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "type": "kubernetes.io/dockerconfigjson",
                        "metadata": {"name": "regcred", "namespace": "default"},
                        "stringData": {".dockerconfigjson": '{"auths": {}}'},
                    }
                ),
            ]
        )
    )
    applied = wasmesh("apply", "-f", str(manifest), "--server", plane.server)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == [
        "wasmplugin.extensions.istio.io/auth created",
        "wasmplugin.extensions.istio.io/stats created",
        "wasmplugin.extensions.istio.io/auth created",
        "secret/regcred created",
    ]
    yield manifest
    for namespace_args in (["-n", "default"], ["-n", "prod"]):
        wasmesh("delete", "wasmplugins", "--all", *namespace_args, "--server", plane.server)
    wasmesh("delete", "secrets", "--all", "--server", plane.server)


def table(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_get_defaults_to_the_default_namespace(
    plane: ControlPlaneProcess, plugins: Path, wasmesh: Callable[..., Ran]
) -> None:
    result = wasmesh("get", "wasmplugins", "--server", plane.server)
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows[0] == ["NAME", "READY", "PHASE", "PRIORITY", "AGE"]
    assert [row[:4] for row in rows[1:]] == [
        ["auth", "0/0", "AUTHN", "7"],
        ["stats", "0/0", "UNSPECIFIED_PHASE", "<unset>"],
    ]
    prod = table(wasmesh("get", "wp", "-n", "prod", "--server", plane.server).stdout)
    assert [row[:4] for row in prod] == [
        ["NAME", "READY", "PHASE", "PRIORITY"],
        ["auth", "0/0", "UNSPECIFIED_PHASE", "<unset>"],
    ]
    every = table(wasmesh("get", "wasmplugins", "-A", "--server", plane.server).stdout)
    assert every[0] == ["NAMESPACE", "NAME", "READY", "PHASE", "PRIORITY", "AGE"]
    assert [row[:2] for row in every[1:]] == [["default", "auth"], ["default", "stats"], ["prod", "auth"]]
    wide = table(wasmesh("get", "wasmplugins", "-o", "wide", "--server", plane.server).stdout)
    assert wide[0] == ["NAME", "READY", "PHASE", "PRIORITY", "AGE", "URL"]
    assert wide[1][-1] == "file:///plugins/auth.wasm"
    names = wasmesh("get", "wasmplugins", "-o", "name", "--server", plane.server)
    assert names.stdout.splitlines() == [
        "wasmplugin.extensions.istio.io/auth",
        "wasmplugin.extensions.istio.io/stats",
    ]
    empty = wasmesh("get", "wasmplugins", "-n", "nowhere", "--server", plane.server)
    assert (empty.returncode, empty.stdout, empty.stderr) == (
        0,
        "",
        "No resources found in nowhere namespace.\n",
    )


def test_get_by_name_and_output_formats(
    plane: ControlPlaneProcess, plugins: Path, wasmesh: Callable[..., Ran]
) -> None:
    as_yaml = wasmesh("get", "wasmplugin", "auth", "-o", "yaml", "--server", plane.server)
    assert as_yaml.returncode == 0, as_yaml.stderr
    document = yaml.safe_load(as_yaml.stdout)
    assert (document["kind"], document["metadata"]["namespace"], document["spec"]["priority"]) == (
        "WasmPlugin",
        "default",
        7,
    )
    as_json = wasmesh("get", "wasmplugin", "auth", "-n", "prod", "-o", "json", "--server", plane.server)
    assert json.loads(as_json.stdout)["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    listed = json.loads(wasmesh("get", "wasmplugins", "-o", "json", "--server", plane.server).stdout)
    assert (listed["kind"], [item["metadata"]["name"] for item in listed["items"]]) == (
        "List",
        ["auth", "stats"],
    )
    missing = wasmesh("get", "wasmplugin", "nope", "--server", plane.server)
    assert (missing.returncode, missing.stderr) == (
        1,
        'Error from server (NotFound): wasmplugins.extensions.istio.io "nope" not found\n',
    )
    across = wasmesh("get", "wasmplugin", "auth", "-A", "--server", plane.server)
    assert (across.returncode, across.stderr) == (
        2,
        "error: a resource cannot be retrieved by name across all namespaces\n",
    )
    secrets = table(wasmesh("get", "secrets", "--server", plane.server).stdout)
    assert [row[:2] for row in secrets] == [["NAME", "TYPE"], ["regcred", "kubernetes.io/dockerconfigjson"]]


def test_describe(plane: ControlPlaneProcess, plugins: Path, wasmesh: Callable[..., Ran]) -> None:
    result = wasmesh("describe", "wasmplugin", "auth", "--server", plane.server)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:7] == [
        "Name:         auth",
        "Namespace:    default",
        "Labels:       <none>",
        "Annotations:  <none>",
        "API Version:  extensions.istio.io/v1alpha1",
        "Kind:         WasmPlugin",
        "Metadata:",
    ]
    spec_at = lines.index("Spec:")
    assert lines[spec_at + 1 : spec_at + 6] == [
        "  url:  file:///plugins/auth.wasm",
        "  pluginConfig:",
        "    a:  1",
        "  phase:  AUTHN",
        "  priority:  7",
    ]
    assert lines[spec_at + 6 :] == [
        "Status:",
        "  Ready:  0/0 (proxies that loaded it / proxies it selects)",
        "  Proxies:  <none>",
        "Warnings:  <none>",
    ]
    every = wasmesh("describe", "wasmplugins", "--server", plane.server)
    assert [line for line in every.stdout.splitlines() if line.startswith("Name:")] == [
        "Name:         auth",
        "Name:         stats",
    ]
    prod = wasmesh("describe", "wp", "auth", "-n", "prod", "--server", plane.server)
    assert "  selector:\n    matchLabels:\n      app:  web\n" in prod.stdout
    missing = wasmesh("describe", "wasmplugin", "auth", "-n", "staging", "--server", plane.server)
    assert (missing.returncode, missing.stderr) == (
        1,
        'Error from server (NotFound): wasmplugins.extensions.istio.io "auth" not found\n',
    )
    secret = wasmesh("describe", "secret", "regcred", "--server", plane.server)
    assert secret.stdout.splitlines()[-4:] == [
        "Type:  kubernetes.io/dockerconfigjson",
        "Data",
        "====",
        ".dockerconfigjson:  <redacted>",
    ]


def test_delete_by_name_namespace_and_all(
    plane: ControlPlaneProcess, plugins: Path, wasmesh: Callable[..., Ran]
) -> None:
    server = ["--server", plane.server]
    deleted = wasmesh("delete", "wasmplugin", "auth", "-n", "prod", *server)
    assert (deleted.returncode, deleted.stdout) == (0, 'wasmplugin.extensions.istio.io "auth" deleted\n')
    again = wasmesh("delete", "wasmplugin", "auth", "-n", "prod", *server)
    assert (again.returncode, again.stderr) == (
        1,
        'Error from server (NotFound): wasmplugins.extensions.istio.io "auth" not found\n',
    )
    # Without -n, the default namespace; several names at once.
    both = wasmesh("delete", "wp", "auth", "stats", *server)
    assert (both.returncode, both.stdout.splitlines()) == (
        0,
        ['wasmplugin.extensions.istio.io "auth" deleted', 'wasmplugin.extensions.istio.io "stats" deleted'],
    )
    assert wasmesh("get", "wasmplugins", "-A", *server).stderr == "No resources found.\n"

    assert wasmesh("apply", "-f", str(plugins), *server).returncode == 0
    in_default = wasmesh("delete", "wasmplugins", "--all", *server)
    assert in_default.stdout.splitlines() == [
        'wasmplugin.extensions.istio.io "auth" deleted',
        'wasmplugin.extensions.istio.io "stats" deleted',
    ]
    remaining = table(wasmesh("get", "wasmplugins", "-A", *server).stdout)
    assert [row[:2] for row in remaining[1:]] == [["prod", "auth"]]
    assert wasmesh("apply", "-f", str(plugins), *server).returncode == 0
    everywhere = wasmesh("delete", "wasmplugins", "--all", "-A", *server)
    assert len(everywhere.stdout.splitlines()) == 3
    nothing = wasmesh("delete", "wasmplugins", "--all", *server)
    assert (nothing.returncode, nothing.stderr) == (0, "No resources found in default namespace.\n")

    assert wasmesh("apply", "-f", str(plugins), *server).returncode == 0
    by_file = wasmesh("delete", "-f", str(plugins), *server)
    assert by_file.stdout.splitlines() == [
        'wasmplugin.extensions.istio.io "auth" deleted',
        'wasmplugin.extensions.istio.io "stats" deleted',
        'wasmplugin.extensions.istio.io "auth" deleted',
        'secret "regcred" deleted',
    ]


def test_delete_usage_errors(plane: ControlPlaneProcess, wasmesh: Callable[..., Ran]) -> None:
    server = ["--server", plane.server]
    cases = {
        (
            "delete",
            "wasmplugins",
        ): "error: resource(s) were provided, but no name was specified (give NAME or --all)",
        (
            "delete",
            "wasmplugin",
            "x",
            "-A",
        ): "error: a resource cannot be deleted by name across all namespaces (-A needs --all)",
        ("delete", "wasmplugin", "x", "--all"): "error: NAME and --all cannot be combined",
        ("delete",): "error: you must specify -f FILE, or a resource type with NAME or --all",
        (
            "delete",
            "pods",
            "x",
        ): "error: unknown resource type 'pods' (known: wasmplugins, workloads, gateways, secrets)",
    }
    for argv, message in cases.items():
        result = wasmesh(*argv, *server)
        assert (result.returncode, result.stderr) == (2, message + "\n"), argv


def test_unreachable_server_is_one_line(tmp_path: Path, wasmesh: Callable[..., Ran]) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    for argv in (("get", "wasmplugins"), ("describe", "wp", "x"), ("delete", "wp", "x")):
        result = wasmesh(*argv, "--server", server)
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: cannot reach the control plane at {server}: "), result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_every_verb_as_a_process(plane: ControlPlaneProcess, tmp_path: Path) -> None:
    manifest = tmp_path / "one.yaml"
    manifest.write_text(plugin_yaml("solo", "file:///plugins/solo.wasm", priority=1))
    server = ["--server", plane.server]
    applied = run_wasmesh("apply", "-f", str(manifest), *server)
    assert (applied.returncode, applied.stdout) == (0, "wasmplugin.extensions.istio.io/solo created\n")
    got = run_wasmesh("get", "wasmplugins", *server)
    assert [row.split()[:4] for row in got.stdout.splitlines()] == [
        ["NAME", "READY", "PHASE", "PRIORITY"],
        ["solo", "0/0", "UNSPECIFIED_PHASE", "1"],
    ]
    described = run_wasmesh("describe", "wasmplugin", "solo", *server)
    assert described.stdout.splitlines()[0] == "Name:         solo"
    deleted = run_wasmesh("delete", "wasmplugin", "solo", *server)
    assert (deleted.returncode, deleted.stdout) == (0, 'wasmplugin.extensions.istio.io "solo" deleted\n')
