"""``wasmesh validate -f FILE_OR_DIR [-f ...]``: Istio's WasmPlugin validation, offline."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from wasmesh.api.validation import validate_paths


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="validate WasmPlugin YAML/JSON with Istio's rules",
        description=(
            "Validate WasmPlugin resources (extensions.istio.io/v1alpha1) with the rules of Istio's CRD "
            "schema and of istiod. Prints one line per error and per warning; exits 1 if there is any error."
        ),
    )
    parser.add_argument(
        "-f",
        "--filename",
        dest="paths",
        action="append",
        required=True,
        metavar="FILE_OR_DIR",
        help="a YAML/JSON file, a directory of *.yaml/*.yml/*.json files, or - for stdin (repeatable)",
    )
    parser.set_defaults(handler=run_validate)


def run_validate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    stream = out if out is not None else sys.stdout
    report, load_errors = validate_paths(args.paths)
    for line in load_errors:
        print(f"error: {line}", file=stream)
    for issue in report.errors:
        print(f"error: {issue}", file=stream)
    for issue in report.warnings:
        print(f"warning: {issue}", file=stream)
    error_count = len(load_errors) + len(report.errors)
    plugin_count = len(report.results)
    valid_count = sum(1 for result in report.results if result.ok)
    other = f", {len(report.other_documents)} other document(s) skipped" if report.other_documents else ""
    print(
        f"{plugin_count} WasmPlugin(s) checked, {valid_count} valid{other}: "
        f"{error_count} error(s), {len(report.warnings)} warning(s)",
        file=stream,
    )
    return 1 if error_count else 0
