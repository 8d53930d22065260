"""``wasmesh validate``: output lines, summary and exit code."""

# Exact Istio/Kubernetes messages are kept on one line each, so some lines are long.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import io
from pathlib import Path

from wasmplugin_api_helpers import DATA_DIR

from wasmesh.api.cli import register, run_validate


def run(*paths: Path | str) -> tuple[int, list[str]]:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["validate", *(arg for path in paths for arg in ("-f", str(path)))])
    assert args.handler is run_validate
    out = io.StringIO()
    code = run_validate(args, out=out)
    return code, out.getvalue().splitlines()


def test_valid_files_exit_zero_with_summary() -> None:
    code, lines = run(DATA_DIR / "istio-docs-examples.yaml", DATA_DIR / "istio-wasm-valid.yaml")
    assert code == 0
    assert lines == ["10 WasmPlugin(s) checked, 10 valid: 0 error(s), 0 warning(s)"]


def test_errors_warnings_and_load_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a, namespace: ns}\n"
        "spec: {url: 'fake://x', selector: {}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"
    )
    (tmp_path / "b.yaml").write_text("key: [unclosed\n")
    code, lines = run(tmp_path)
    assert code == 1
    prefix = f"{tmp_path / 'a.yaml'}: document 1 (WasmPlugin ns/a): "
    assert lines == [
        f"error: {tmp_path / 'b.yaml'}: line 2 column 1: YAML syntax error: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence)",
        "error: "
        + prefix
        + 'spec.url: Invalid value: "string": url must have schema one of [http, https, file, oci]',
        "error: " + prefix + "spec.url: url contains unsupported scheme: fake",
        "warning: " + prefix + "spec.selector: workload selector specified without labels",
        "1 WasmPlugin(s) checked, 0 valid, 1 other document(s) skipped: 3 error(s), 1 warning(s)",
    ]
