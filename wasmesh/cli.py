"""The `wasmesh` command.

Each package owns its sub-commands in its own ``cli`` module, which exposes
``register(subparsers)``; this file only wires them together so packages never
edit a shared command table.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from wasmesh import __version__

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "wasmesh.up",
    "wasmesh.proxy.cli",
    "wasmesh.api.cli",
    "wasmesh.agent.cli",
    "wasmesh.controlplane.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wasmesh",
        description="Extend a service mesh with WebAssembly (Proxy-Wasm) plugins.",
    )
    parser.add_argument("--version", action="version", version=f"wasmesh {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the package has no commands yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
