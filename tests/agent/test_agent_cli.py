"""The one insecure-registry flag of `wasmesh pull`, `wasmesh agent` and `wasmesh proxy --xds`, the
WASM_INSECURE_REGISTRIES variable they all read, and the pull progress line."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_testsupport import Registry, tiny_wasm, wasm_to_oci_image

from wasmesh.agent.agentcmd import build_options
from wasmesh.agent.cli import ProgressReporter, human_size
from wasmesh.cli import build_parser, main
from wasmesh.proxy.cli import build_xds_options

PushImage = Callable[..., str]


@pytest.mark.registry
def test_pull_from_a_registry_that_needs_the_flag(
    other_loopback_registry: Registry,
    push_image: PushImage,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wasm = tiny_wasm("cli-insecure")
    digest = push_image(other_loopback_registry, "cli/insecure", "v1", wasm_to_oci_image(wasm))
    host = other_loopback_registry.host
    ref = f"oci://{host}/cli/insecure:v1"
    monkeypatch.delenv("WASM_INSECURE_REGISTRIES", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))

    def pull(run: str, *flags: str) -> int:
        output = tmp_path / run / "plugin.wasm"
        code = main(["pull", ref, "-o", str(output), "--cache-dir", str(tmp_path / run / "cache"), *flags])
        if code == 0:
            assert output.read_bytes() == wasm
        return code

    assert pull("no-flag") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'error: could not fetch Wasm OCI image: could not fetch manifest: Get "https://{host}/v2/cli/'
        f'insecure/manifests/v1": registry {host} speaks plain HTTP; add it with --insecure-registry '
        f"{host} (or WASM_INSECURE_REGISTRIES)"
    )
    assert pull("flag", "--insecure-registry", host) == 0
    assert f"Digest: {digest}" in capsys.readouterr().out
    assert pull("comma-list", "--insecure-registry", f"other.io,{host}") == 0
    assert pull("old-spelling", "--insecure-registries", host) == 0
    monkeypatch.setenv("WASM_INSECURE_REGISTRIES", f"other.io, {host}")
    assert pull("environment") == 0
    monkeypatch.setenv("WASM_INSECURE_REGISTRIES", "*")
    assert pull("environment-star") == 0


def test_agent_flag_spellings_and_environment_add_up(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["agent", "--xds", "127.0.0.1:15010", "--plaintext", "--cache-dir", str(tmp_path),
         "--insecure-registry", "a:5000,b", "--insecure-registries", "c", "--insecure-registry", "d"]
    )  # fmt: skip
    options = build_options(args, {"WASM_INSECURE_REGISTRIES": "e, f:1"})
    assert options.cache.insecure_registries == frozenset({"a:5000", "b", "c", "d", "e", "f:1"})
    only_env = build_parser().parse_args(
        ["agent", "--xds", "127.0.0.1:15010", "--plaintext", "--cache-dir", str(tmp_path)]
    )
    star = build_options(only_env, {"WASM_INSECURE_REGISTRIES": "*"}).cache
    assert star.insecure_registries == frozenset({"*"})
    assert star.allow_insecure("any.registry.io:443") is True
    assert build_options(only_env, {}).cache.insecure_registries == frozenset()


def test_proxy_xds_flag_spellings_and_environment_add_up() -> None:
    args = build_parser().parse_args(
        ["proxy", "--xds", "127.0.0.1:15010", "--plaintext", "--node-id", "web-1",
         "--insecure-registry", "a:5000,b", "--insecure-registries", "c"]
    )  # fmt: skip
    options = build_xds_options(args, {"WASM_INSECURE_REGISTRIES": "d"})
    assert options.insecure_registries == ("a:5000", "b", "c", "d")
    # the worker's module cache is built from them
    assert options.proxy().builder.module_cache().options.insecure_registries == frozenset(
        {"a:5000", "b", "c", "d"}
    )
    bare = build_parser().parse_args(
        ["proxy", "--xds", "127.0.0.1:15010", "--plaintext", "--node-id", "web-1"]
    )
    assert build_xds_options(bare, {"WASM_INSECURE_REGISTRIES": "*"}).insecure_registries == ("*",)
    assert build_xds_options(bare, {}).insecure_registries == ()


def test_proxy_config_mode_refuses_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text("listeners: []\n")
    assert main(["proxy", "--config", str(config), "--insecure-registry", "r.io"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: wasmesh proxy: --insecure-registry: only with --xds "
        "(a --config file lists them in cache.insecure_registries)"
    )


def test_every_command_spells_the_flag_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("pull", "agent", "proxy"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--insecure-registry HOST, --insecure-registries HOST" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (20_000, "19.5 KiB"), (5 << 20, "5.0 MiB")],
)
def test_human_size(count: int, text: str) -> None:
    assert human_size(count) == text


def test_progress_lines_of_a_small_module_in_a_pipe() -> None:
    stream = io.StringIO()
    progress = ProgressReporter(stream, "pulling oci://r.io/p:v1")
    for received in (8192, 16384, 20000):
        progress(received, 20000)
    progress.finish()
    assert stream.getvalue().splitlines() == [
        "pulling oci://r.io/p:v1: 0% of 19.5 KiB",
        "pulling oci://r.io/p:v1: 25% of 19.5 KiB",
        "pulling oci://r.io/p:v1: 50% of 19.5 KiB",
        "pulling oci://r.io/p:v1: 75% of 19.5 KiB",
        "pulling oci://r.io/p:v1: 100% of 19.5 KiB",
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_of_a_small_module_on_a_terminal() -> None:
    stream = Terminal()
    progress = ProgressReporter(stream, "pulling p")
    progress(20000, 20000)
    progress.finish()
    assert stream.getvalue() == "\rpulling p [" + "#" * 30 + "] 100% 19.5 KiB/19.5 KiB\n"
    unknown = Terminal()
    ProgressReporter(unknown, "pulling p")(700, None)  # no Content-Length: the bytes so far
    assert unknown.getvalue() == "\rpulling p 700 B"
