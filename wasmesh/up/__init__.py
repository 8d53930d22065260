"""`wasmesh up`: the embedded demo mesh (control plane, gateway, sample apps, example plugins)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "up",
        help="run the demo mesh on 127.0.0.1: control plane, gateway, sample apps and example plugins",
        description="Start an embedded mesh on 127.0.0.1 and apply the example WasmPlugins from examples/.",
    )
    parser.add_argument(
        "--examples", default=None, help="directory of example WasmPlugins (default: examples/)",
    )
    parser.add_argument("--gateway-port", type=int, default=8080, help="gateway listen port (default 8080)")
    parser.add_argument("--admin-port", type=int, default=15000, help="gateway admin port (default 15000)")
    parser.add_argument(
        "--xds-port", type=int, default=15012, help="control plane xDS port, mTLS (default 15012)"
    )
    parser.add_argument(
        "--ca-port", type=int, default=15013, help="control plane CA token port, TLS (default 15013)"
    )
    parser.add_argument("--api-port", type=int, default=15014, help="control plane API port (default 15014)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from wasmesh.up.mesh import run_demo_mesh

    return run_demo_mesh(args)
