"""``wasmesh pull REF -o FILE``: fetch a module through the agent's fetchers and verified cache."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from wasmesh.agent import agentcmd
from wasmesh.agent.cache import ModuleCache
from wasmesh.agent.errors import FetchError
from wasmesh.agent.options import (
    CacheOptions,
    add_allowed_file_dir_flag,
    add_insecure_registry_flag,
    insecure_registries_from,
)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wasmesh" / "modules"


def human_size(count: int) -> str:
    """Bytes below 1 KiB, then KiB below 1 MiB, then MiB: small modules read as what they are."""
    if count < 1 << 10:
        return f"{count} B"
    if count < 1 << 20:
        return f"{count / (1 << 10):.1f} KiB"
    return f"{count / (1 << 20):.1f} MiB"


class ProgressReporter:
    """A redrawn bar on a terminal; a few plain lines (every 25 %) when output is a pipe or a file."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.is_tty = stream.isatty()
        self._next_quarter = 0
        self._last_draw = 0.0
        self.drew = False

    def __call__(self, received: int, total: int | None) -> None:
        if self.is_tty:
            now = time.monotonic()
            if total is not None and received < total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            if total:
                filled = int(30 * received / total)
                bar = "#" * filled + "-" * (30 - filled)
                percent = 100 * received // total
                text = f"\r{self.label} [{bar}] {percent:3d}% {human_size(received)}/{human_size(total)}"
            else:
                text = f"\r{self.label} {human_size(received)}"
            self.stream.write(text)
            self.stream.flush()
            self.drew = True
        elif total:
            quarter = 4 * received // total
            while self._next_quarter <= quarter and self._next_quarter <= 4:
                self.stream.write(f"{self.label}: {25 * self._next_quarter}% of {human_size(total)}\n")
                self._next_quarter += 1

    def finish(self) -> None:
        if self.drew:
            self.stream.write("\n")
            self.stream.flush()


def copy_atomically(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    try:
        with os.fdopen(descriptor, "wb") as target, source.open("rb") as origin:
            shutil.copyfileobj(origin, target)
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, destination)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def run_pull(args: argparse.Namespace) -> int:
    try:
        overrides: dict[str, object] = {
            "dir": Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
            "insecure_registries": insecure_registries_from(args.insecure_registry, os.environ),
            "allowed_file_dirs": tuple(Path(d) for d in args.allowed_file_dir),
        }
        options = CacheOptions.from_env(overrides=overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pull_secret = b""
    if args.pull_secret:
        try:
            pull_secret = Path(args.pull_secret).read_bytes()
        except OSError as exc:
            print(f"error: --pull-secret {args.pull_secret}: {exc.strerror}", file=sys.stderr)
            return 2
    cache = ModuleCache(options)
    progress = ProgressReporter(sys.stderr, f"pulling {args.ref}")
    try:
        path = cache.get_sync(
            args.ref,
            sha256=args.sha256 or "",
            pull_policy=args.pull_policy,
            pull_secret=pull_secret,
            # Always means "re-resolve now": a fresh resource version forces it (the CLI has no resource).
            resource_version=str(time.time_ns()) if args.pull_policy == "Always" else "",
            timeout_s=args.timeout,
            on_progress=progress,
        )
    except FetchError as exc:
        progress.finish()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        cache.close()
    progress.finish()
    output = Path(args.output)
    try:
        copy_atomically(path, output)
    except OSError as exc:
        print(f"error: -o {output}: {exc.strerror}", file=sys.stderr)
        return 1
    module_sha256 = hashlib.sha256(output.read_bytes()).hexdigest()
    print(f"Digest: sha256:{path.stem}")
    if module_sha256 != path.stem:  # OCI: the image digest differs from the module's own hash
        print(f"Module: sha256:{module_sha256}")
    print(f"Wrote {output} ({output.stat().st_size} bytes)")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pull",
        help="fetch a Wasm module (oci://, http(s)://, file://) into a file, through the verified cache",
        description="Fetch a Wasm module the way the agent does and write it to FILE. A reference without a "
        "scheme is an OCI image. Prints the digest the cache keys the module by (the manifest digest for "
        "OCI images, the module's sha256 otherwise).",
    )
    parser.add_argument(
        "ref", metavar="REF", help="oci://registry/repo[:tag|@sha256:...], http(s)://..., file://..."
    )
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the module")
    parser.add_argument("--sha256", help="expected checksum (OCI: manifest digest hex; http: module sha256)")
    add_insecure_registry_flag(parser)
    add_allowed_file_dir_flag(parser)
    parser.add_argument("--cache-dir", help=f"module cache directory (default {default_cache_dir()})")
    parser.add_argument(
        "--pull-secret", metavar="FILE", help="dockerconfigjson file with registry credentials"
    )
    parser.add_argument(
        "--pull-policy",
        default="UNSPECIFIED_POLICY",
        choices=("UNSPECIFIED_POLICY", "IfNotPresent", "Always"),
        help="as WasmPlugin.imagePullPolicy (Always re-resolves the reference on every run)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="overall deadline of the whole pull (every request, retry, redirect and byte); default 300",
    )
    parser.set_defaults(handler=run_pull)
    agentcmd.register(subparsers)  # `wasmesh agent` (owned by agentcmd.py)
