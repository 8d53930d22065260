"""`wasmesh agent` command-line parsing: options, environment, one-line errors naming the flag."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from wasmesh.agent.agentcmd import build_options
from wasmesh.cli import build_parser, main


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["agent", *argv])


def test_options_from_flags_and_istio_environment(tmp_path: Path) -> None:
    args = parse(
        "--xds", "127.0.0.1:15010", "--plaintext", "--listen", "127.0.0.1:15011", "--metrics-port", "0",
        "--cache-dir", str(tmp_path), "--insecure-registries", "a:5000,b", "--insecure-registries", "c",
    )  # fmt: skip
    env = {"WASM_MODULE_EXPIRY": "2h", "ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION": "false"}
    options = build_options(args, env)
    assert (options.upstream, options.listen_host, options.listen_port) == (
        "127.0.0.1:15010",
        "127.0.0.1",
        15011,
    )
    assert options.metrics_port == 0
    assert options.cache.dir == tmp_path
    assert options.cache.insecure_registries == frozenset({"a:5000", "b", "c"})
    assert options.cache.module_expiry_s == 7200
    assert options.conversion_enabled is False
    plain = parse("--xds", "127.0.0.1:1", "--plaintext", "--metrics-port", "-1")
    assert build_options(plain, {}).metrics_port is None


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (("--xds", "nohost"), {}, "--xds: expected HOST:PORT, got 'nohost'"),
        (("--xds", "a:1", "--listen", "x:99999"), {}, "--listen: expected HOST:PORT"),
        (("--xds", "a:1", "--metrics-port", "70000"), {}, "--metrics-port: expected 0..65535 or -1"),
        (
            ("--xds", "a:1"),
            {"ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION": "maybe"},
            "expected true or false",
        ),
        (("--xds", "a:1"), {"WASM_MODULE_EXPIRY": "soon"}, "WASM_MODULE_EXPIRY: invalid duration"),
    ],
)
def test_bad_input_is_a_one_line_error(argv: tuple[str, ...], env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_options(parse(*argv), env)


def test_cli_exit_code_on_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--xds", "nohost", "--plaintext", "--metrics-port", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --xds: expected HOST:PORT, got 'nohost'"
