"""``wasmesh agent``: the istio-agent-style xDS proxy in front of Envoy (ECDS → local Wasm files)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wasmesh.agent.options import (
    CacheOptions,
    add_allowed_file_dir_flag,
    add_insecure_registry_flag,
    insecure_registries_from,
)
from wasmesh.agent.xdsproxy import AgentOptions, AgentServer
from wasmesh.security.workload import XdsTlsOptions, add_xds_tls_flags, is_loopback, xds_tls_from_args

log = logging.getLogger(__name__)

CONVERSION_ENV = "ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION"
DEFAULT_LISTEN = "127.0.0.1:15010"
DEFAULT_METRICS_PORT = 15020


def split_host_port(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) → (host, port); ValueError naming ``flag``."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{flag}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def conversion_enabled(env: Mapping[str, str]) -> bool:
    """Istio's ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION (default true); ValueError when not a bool."""
    value = env.get(CONVERSION_ENV, "true").strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise ValueError(f"{CONVERSION_ENV}: expected true or false, got {env[CONVERSION_ENV]!r}")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wasmesh" / "modules"


def build_options(args: argparse.Namespace, env: Mapping[str, str]) -> AgentOptions:
    """Agent options from the command line and Istio's agent environment variables."""
    split_host_port(args.xds, "--xds")  # validate; grpc takes the text as is
    listen_host, listen_port = split_host_port(args.listen, "--listen")
    overrides: dict[str, object] = {
        "dir": Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
        "insecure_registries": insecure_registries_from(args.insecure_registry, env),
        "allowed_file_dirs": tuple(Path(d) for d in args.allowed_file_dir),
    }
    cache = CacheOptions.from_env(env, overrides=overrides)
    metrics_port: int | None = None if args.metrics_port == -1 else args.metrics_port
    if metrics_port is not None and not 0 <= metrics_port < 65536:
        raise ValueError(f"--metrics-port: expected 0..65535 or -1, got {metrics_port}")
    return AgentOptions(
        upstream=args.xds,
        listen_host=listen_host,
        listen_port=listen_port,
        metrics_host=listen_host,
        metrics_port=metrics_port,
        cache=cache,
        conversion_enabled=conversion_enabled(env),
        tls=_tls(args),
    )


def _tls(args: argparse.Namespace) -> XdsTlsOptions | None:
    """The agent's own identity: the Workload/Gateway its Envoy serves (--namespace, --name)."""
    if not args.plaintext and not args.name:
        raise ValueError("--name: required for mTLS xDS (the Workload/Gateway this Envoy serves)")
    listen_host, _ = split_host_port(args.listen, "--listen")
    if not args.plaintext and not is_loopback(listen_host):
        # Whoever reaches --listen is served as this identity: keep it local to the Envoy.
        raise ValueError(f"--listen {args.listen}: must be a loopback address (it speaks as --name)")
    return xds_tls_from_args(args, args.xds, args.namespace, args.name or "")


def run_agent(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        options = build_options(args, os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve_until_signalled(AgentServer(options)))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve_until_signalled(agent: AgentServer) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly (exit 0), as pilot-agent does on SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    try:
        await stop.wait()
        log.info("agent: stopping")
    finally:
        await agent.stop()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="xDS proxy in front of Envoy: fetches remote Wasm modules for ECDS, as istio-agent",
        description="Serve ADS to Envoy and proxy it to the control plane. ECDS Wasm filters with remote "
        "code are fetched through the verified module cache and rewritten to local files; a module that "
        "cannot be fetched becomes a deny-all RBAC filter (allow-all for FAIL_OPEN). Honours Istio's "
        "WASM_*, BLOCKED_CIDRS_IN_WASM_FETCH and ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION environment "
        "variables.",
    )
    parser.add_argument("--xds", required=True, metavar="HOST:PORT", help="the control plane's ADS server")
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where Envoy connects ({DEFAULT_LISTEN})",
    )
    parser.add_argument("--cache-dir", help=f"module cache directory (default {default_cache_dir()})")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"port of /metrics and /ready on the --listen host (default {DEFAULT_METRICS_PORT}; -1 = off)",
    )
    add_insecure_registry_flag(parser)
    add_allowed_file_dir_flag(parser)
    parser.add_argument("--namespace", default="default", help="namespace of this agent's identity")
    parser.add_argument("--name", help="the Workload/Gateway (identity name) this agent's Envoy serves")
    add_xds_tls_flags(parser)
    parser.add_argument("--log-level", default="info")
    parser.set_defaults(handler=run_agent)
