"""``wasmesh proxy --config FILE`` and the dev loop ``wasmesh run --listen ... --upstream ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from wasmesh.agent.options import (
    add_allowed_file_dir_flag,
    add_insecure_registry_flag,
    insecure_registries_from,
)
from wasmesh.proxy.config import (
    ConfigContext,
    ConfigError,
    ProxyConfig,
    WasmLimits,
    parse_config,
    parse_deadline_ms,
    parse_duration,
    parse_host_port,
    parse_memory_mib,
)
from wasmesh.proxy.workers import FileConfigSource, run_proxy
from wasmesh.security.workload import add_xds_tls_flags, xds_tls_from_args

if TYPE_CHECKING:
    from collections.abc import Mapping

    from wasmesh.proxy.xds import XdsOptions


@dataclass(frozen=True)
class RunConfigSource:
    """The configuration ``wasmesh run`` describes with flags (re-read on reload: plugin files may change)."""

    listen: str
    upstream: str
    plugin_files: tuple[str, ...] = ()
    plugin_url: str | None = None
    plugin_config: str | None = None
    root_id: str = ""
    fail_strategy: str = "FAIL_CLOSE"
    clusters: tuple[str, ...] = ()
    timeout: str = "15s"
    wasm: WasmLimits = field(default_factory=WasmLimits)  # from the --wasm-* flags

    def raw(self) -> dict[str, Any]:
        ctx = ConfigContext("wasmesh run")
        host, port = parse_host_port(self.listen, ctx, "--listen")
        parts = urlsplit(self.upstream if "://" in self.upstream else f"http://{self.upstream}")
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"wasmesh run: --upstream: expected http://HOST[:PORT], got {self.upstream!r}")
        try:
            upstream_port = parts.port or 80
        except ValueError:
            raise ConfigError(f"wasmesh run: --upstream: bad port in {self.upstream!r}") from None
        clusters: list[dict[str, Any]] = [
            {"name": "upstream", "endpoints": [{"address": parts.hostname, "port": upstream_port}]}
        ]
        for spec in self.clusters:
            name, sep, address = spec.partition("=")
            if not sep or not name:
                raise ConfigError(f"wasmesh run: --cluster: expected NAME=HOST:PORT, got {spec!r}")
            h, p = parse_host_port(address, ctx, "--cluster")
            clusters.append({"name": name, "endpoints": [{"address": h, "port": p}]})
        plugins: list[dict[str, Any]] = [{"path": f} for f in self.plugin_files]
        if self.plugin_url:
            spec_body: dict[str, Any] = {"url": self.plugin_url, "failStrategy": self.fail_strategy}
            if self.plugin_config is not None:
                try:
                    cfg = json.loads(self.plugin_config)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"wasmesh run: --config: invalid JSON: {exc}") from None
                if not isinstance(cfg, dict):
                    raise ConfigError("wasmesh run: --config: expected a JSON object")
                spec_body["pluginConfig"] = cfg
            if self.root_id:
                spec_body["pluginName"] = self.root_id
            plugins.append(
                {
                    "apiVersion": "extensions.istio.io/v1alpha1",
                    "kind": "WasmPlugin",
                    "metadata": {"name": "cli-plugin", "namespace": "default"},
                    "spec": spec_body,
                }
            )
        return {
            "listeners": [
                {
                    "name": "main",
                    "address": host,
                    "port": port,
                    "virtual_hosts": [
                        {
                            "name": "upstream",
                            "domains": ["*"],
                            "routes": [
                                {
                                    # Envoy's static configs conventionally call the catch-all "default";
                                    # plugins that match on route names see the same name here.
                                    "name": "default",
                                    "match": {"prefix": "/"},
                                    "cluster": "upstream",
                                    "timeout": self.timeout,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": clusters,
            "plugins": plugins,
        }

    def load(self) -> ProxyConfig:
        return replace(parse_config(self.raw(), source="wasmesh run"), wasm=self.wasm)


def _host_port(value: str) -> tuple[str, int]:
    try:
        return parse_host_port(value, ConfigContext("wasmesh"), "--admin")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


# ---- the Wasm runtime's safety limits as flags (a --config file has its wasm: section instead).

_WASM_FLAGS = {
    "wasm_callback_deadline": "--wasm-callback-deadline",
    "wasm_startup_deadline": "--wasm-startup-deadline",
    "wasm_memory_limit_mib": "--wasm-memory-limit-mib",
    "wasm_reload_backoff": "--wasm-reload-backoff",
}


def _wasm_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("Wasm safety limits (for every plugin VM)")
    group.add_argument(
        "--wasm-callback-deadline",
        metavar="DURATION",
        help="CPU time one plugin callback may use before the VM fails (default 1s; e.g. 250ms)",
    )
    group.add_argument(
        "--wasm-startup-deadline",
        metavar="DURATION",
        help="CPU time for VM start-up, on_vm_start and on_configure (default 5s)",
    )
    group.add_argument(
        "--wasm-memory-limit-mib",
        type=int,
        metavar="MIB",
        help="linear memory limit of each VM in MiB, 1-4096 (default 1024)",
    )
    group.add_argument(
        "--wasm-reload-backoff",
        metavar="DURATION",
        help="FAIL_RELOAD: wait before the first new VM, doubling per failure up to 10x (default 1s)",
    )


def wasm_limits_from_flags(args: argparse.Namespace, command: str) -> WasmLimits:
    """The limits the --wasm-* flags ask for (defaults for those not given); ConfigError naming the flag."""
    ctx = ConfigContext(command)
    defaults = WasmLimits()
    callback, startup = args.wasm_callback_deadline, args.wasm_startup_deadline
    memory, backoff = args.wasm_memory_limit_mib, args.wasm_reload_backoff
    return WasmLimits(
        callback_deadline_ms=defaults.callback_deadline_ms
        if callback is None
        else parse_deadline_ms(callback, ctx, _WASM_FLAGS["wasm_callback_deadline"]),
        startup_deadline_ms=defaults.startup_deadline_ms
        if startup is None
        else parse_deadline_ms(startup, ctx, _WASM_FLAGS["wasm_startup_deadline"]),
        memory_limit_bytes=defaults.memory_limit_bytes
        if memory is None
        else parse_memory_mib(memory, ctx, _WASM_FLAGS["wasm_memory_limit_mib"]),
        reload_backoff_s=defaults.reload_backoff_s
        if backoff is None
        else parse_duration(backoff, ctx, _WASM_FLAGS["wasm_reload_backoff"]),
    )


def _proxy(args: argparse.Namespace) -> int:
    if args.xds is not None or args.config is None:
        return _proxy_xds(args)
    given = [flag for attr, flag in _WASM_FLAGS.items() if getattr(args, attr) is not None]
    if given:
        reason = "only with --xds (a --config file sets limits in its wasm: section)"
        print(f"error: wasmesh proxy: {given[0]}: {reason}", file=sys.stderr)
        return 2
    if args.insecure_registry:
        reason = "only with --xds (a --config file lists them in cache.insecure_registries)"
        print(f"error: wasmesh proxy: --insecure-registry: {reason}", file=sys.stderr)
        return 2
    if args.allowed_file_dir:
        reason = "only with --xds (a --config file lists them in cache.allowed_file_dirs)"
        print(f"error: wasmesh proxy: --allowed-file-dir: {reason}", file=sys.stderr)
        return 2
    return run_proxy(
        FileConfigSource(args.config), workers=args.workers, admin=args.admin, log_level=args.log_level
    )


def _run(args: argparse.Namespace) -> int:
    try:
        wasm = wasm_limits_from_flags(args, "wasmesh run")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source = RunConfigSource(
        listen=args.listen,
        upstream=args.upstream,
        plugin_files=tuple(args.file or ()),
        plugin_url=args.plugin_url,
        plugin_config=args.config,
        root_id=args.root_id or "",
        fail_strategy=args.fail_strategy,
        clusters=tuple(args.cluster or ()),
        timeout=args.timeout,
        wasm=wasm,
    )
    return run_proxy(source, workers=args.workers, admin=args.admin, log_level=args.log_level)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers", type=_positive, default=1, help="worker processes sharing the ports (SO_REUSEPORT)"
    )
    p.add_argument(
        "--admin", type=_host_port, default=None, metavar="HOST:PORT", help="admin listener address"
    )
    p.add_argument(
        "--log-level", default="info", choices=["trace", "debug", "info", "warning", "error", "critical"]
    )


def register(subparsers: Any) -> None:
    proxy = subparsers.add_parser(
        "proxy",
        help="run the HTTP proxy from a YAML config",
        description="Run the wasmesh HTTP/1.1 proxy "
        "(listeners, routes, clusters, WasmPlugin chains) from a YAML config; see docs/proxy-config.md.",
    )
    proxy.add_argument("--config", "-c", metavar="FILE", help="proxy YAML config (or give --xds)")
    _xds_flags(proxy)
    _wasm_flags(proxy)
    _common(proxy)
    proxy.set_defaults(handler=_proxy)

    run = subparsers.add_parser(
        "run",
        help="proxy everything to one upstream through WasmPlugins (dev loop)",
        description="Proxy all traffic from --listen to --upstream through the WasmPlugin resources given "
        "with -f (files or directories, multi-document YAML) and/or one PLUGIN_URL.",
    )
    run.add_argument("--listen", required=True, metavar="HOST:PORT")
    run.add_argument("--upstream", required=True, metavar="URL", help="http://HOST:PORT")
    run.add_argument("-f", "--file", action="append", metavar="WASMPLUGIN_YAML_OR_DIR")
    run.add_argument(
        "plugin_url", nargs="?", metavar="PLUGIN_URL", help="file://, http(s):// or oci:// module"
    )
    run.add_argument("--config", metavar="JSON", help="pluginConfig for PLUGIN_URL (a JSON object)")
    run.add_argument("--root-id", metavar="NAME", help="pluginName (root id) for PLUGIN_URL")
    run.add_argument(
        "--fail-strategy", default="FAIL_CLOSE", choices=["FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"]
    )
    run.add_argument(
        "--cluster", action="append", metavar="NAME=HOST:PORT", help="extra cluster for http_call"
    )
    run.add_argument("--timeout", default="15s", help="route timeout (default 15s, as Envoy)")
    _wasm_flags(run)
    _common(run)
    run.set_defaults(handler=_run)


# ---- xDS mode (wasmesh.proxy.xds): listeners, routes, clusters and chains come from a control plane.


def _xds_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--xds", metavar="HOST:PORT", help="control plane ADS address (instead of --config)")
    p.add_argument(
        "--node-id", metavar="ID", help="xDS node id (also the Workload name); required with --xds"
    )
    p.add_argument(
        "--labels", default="", metavar="k=v,...", help="this proxy's labels for WasmPlugin selectors"
    )
    p.add_argument("--namespace", default="default", metavar="NS", help="this proxy's namespace")
    p.add_argument("--cache-dir", metavar="DIR", help="module cache for remote (http/oci) plugins")
    add_insecure_registry_flag(p)
    add_allowed_file_dir_flag(p)
    add_xds_tls_flags(p)


def _proxy_xds(args: argparse.Namespace) -> int:
    from wasmesh.proxy.xds import run_xds_proxy

    if args.xds is None:
        print("error: wasmesh proxy: give --config FILE or --xds HOST:PORT", file=sys.stderr)
        return 2
    if args.config is not None:
        print("error: wasmesh proxy: --config and --xds are exclusive", file=sys.stderr)
        return 2
    if not args.node_id:
        print("error: wasmesh proxy: --node-id: required with --xds", file=sys.stderr)
        return 2
    try:
        options = build_xds_options(args, os.environ)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_xds_proxy(options, workers=args.workers, admin=args.admin, log_level=args.log_level)


def build_xds_options(args: argparse.Namespace, env: Mapping[str, str]) -> XdsOptions:
    """`wasmesh proxy --xds` options from its flags and WASM_INSECURE_REGISTRIES (as istio-agent reads it)."""
    from wasmesh.proxy.xds import XdsOptions, parse_labels

    parse_host_port(args.xds, ConfigContext("wasmesh proxy"), "--xds")
    return XdsOptions(
        target=args.xds,
        node_id=args.node_id,
        labels=parse_labels(args.labels),
        namespace=args.namespace,
        cache_dir=args.cache_dir,
        insecure_registries=tuple(sorted(insecure_registries_from(args.insecure_registry, env))),
        allowed_file_dirs=tuple(args.allowed_file_dir),
        wasm_limits=wasm_limits_from_flags(args, "wasmesh proxy"),
        tls=xds_tls_from_args(args, args.xds, args.namespace, args.node_id),
    )
