"""Sub-commands: control-plane, apply, delete, get, envoy-bootstrap."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from wasmesh.api.load import expand_paths
from wasmesh.controlplane.bootstrap import build_bootstrap, parse_labels, render_bootstrap, split_host_port
from wasmesh.controlplane.security_cli import (
    add_bootstrap_tls_flags,
    add_security_commands,
    bootstrap_tls,
    security_options,
)
from wasmesh.controlplane.server import (
    DEFAULT_API_PORT,
    DEFAULT_SECURE_XDS_PORT,
    DEFAULT_XDS_PORT,
    ControlPlane,
    ControlPlaneOptions,
)
from wasmesh.controlplane.store import canonical_kind
from wasmesh.security.ca import CaError

SERVER_ENV = "WASMESH_CONTROL_PLANE"
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_API_PORT}"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser("control-plane", help="serve WasmPlugins and workloads over xDS")
    serve.add_argument("--config-dir", type=Path, help="directory of YAML/JSON resources to watch")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--xds-port",
        type=int,
        help=f"xDS port (default {DEFAULT_SECURE_XDS_PORT}, mTLS; {DEFAULT_XDS_PORT} with --plaintext)",
    )
    serve.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    serve.add_argument("--root-namespace", default="istio-system")
    serve.add_argument("--debounce", type=float, default=0.1, help="push debounce quiet period, seconds")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(handler=run_control_plane)
    add_security_commands(serve)

    server_help = f"control plane API URL (env {SERVER_ENV}, default {DEFAULT_SERVER})"
    apply = subparsers.add_parser("apply", help="create or update resources on the control plane")
    apply.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="file or directory of YAML/JSON documents ('-' for stdin); repeatable",
    )
    apply.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER), help=server_help)
    apply.set_defaults(handler=run_apply)

    delete = subparsers.add_parser(
        "delete",
        help="delete resources on the control plane (kubectl-like: -f FILE, or RESOURCE NAME..., or --all)",
    )
    delete.add_argument("resource", nargs="?", help="wasmplugins | workloads | gateways | secrets")
    delete.add_argument("names", nargs="*", metavar="NAME")
    delete.add_argument(
        "-f",
        "--filename",
        action="append",
        help="file or directory of YAML/JSON documents ('-' for stdin); repeatable",
    )
    delete.add_argument("-n", "--namespace", help="namespace of the named resources (default: default)")
    delete.add_argument("-A", "--all-namespaces", action="store_true", help="with --all: in every namespace")
    delete.add_argument(
        "--all", action="store_true", help="delete every resource of the type (in the namespace)"
    )
    delete.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER), help=server_help)
    delete.set_defaults(handler=run_delete)

    get = subparsers.add_parser("get", help="list resources on the control plane (kubectl-like)")
    get.add_argument("resource", help="wasmplugins | workloads | gateways | secrets")
    get.add_argument("name", nargs="?")
    get.add_argument("-n", "--namespace", help="namespace (default: default)")
    get.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    get.add_argument("-o", "--output", choices=("table", "wide", "yaml", "json", "name"), default="table")
    get.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER), help=server_help)
    get.set_defaults(handler=run_get)

    describe = subparsers.add_parser(
        "describe", help="show a resource in detail, with per-proxy plugin status (kubectl-like)"
    )
    describe.add_argument("resource", help="wasmplugins | workloads | gateways | secrets")
    describe.add_argument("name", nargs="?", help="default: every resource of the type in the namespace")
    describe.add_argument("-n", "--namespace", help="namespace (default: default)")
    describe.add_argument("-A", "--all-namespaces", action="store_true", help="without NAME: every namespace")
    describe.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER), help=server_help)
    describe.set_defaults(handler=run_describe)

    boot = subparsers.add_parser(
        "envoy-bootstrap", help="print an Envoy bootstrap pointing at the control plane"
    )
    boot.add_argument("--xds", required=True, help="HOST:PORT of the control plane (or agent) xDS server")
    boot.add_argument("--node-id", required=True)
    boot.add_argument("--labels", default="", help="k=v,k2=v2 (the proxy's labels for plugin selection)")
    boot.add_argument("--namespace", default="default")
    boot.add_argument("--workload", help="Workload/Gateway resource name (default: the node id)")
    boot.add_argument("--admin-port", type=int, default=15000)
    boot.set_defaults(handler=run_envoy_bootstrap)
    add_bootstrap_tls_flags(boot)


def run_control_plane(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.config_dir is not None and not args.config_dir.is_dir():
        print(f"--config-dir: {args.config_dir}: not a directory", file=sys.stderr)
        return 2
    try:
        security = security_options(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    default_port = DEFAULT_XDS_PORT if security is None else DEFAULT_SECURE_XDS_PORT
    options = ControlPlaneOptions(
        config_dir=args.config_dir,
        host=args.host,
        security=security,
        xds_port=args.xds_port if args.xds_port is not None else default_port,
        api_port=args.api_port,
        root_namespace=args.root_namespace,
        debounce_after=args.debounce,
    )
    try:
        asyncio.run(ControlPlane(options).serve_forever())
    except (OSError, CaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


class ServerUnreachable(Exception):
    """The control plane API did not answer."""


def _request(server: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{server.rstrip('/')}{path}", data=body, method=method, headers={"Content-Type": "application/yaml"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        payload = exc.read() or b"{}"
        try:
            return exc.code, json.loads(payload)
        except ValueError:
            return exc.code, {"errors": [payload.decode("utf-8", "replace").strip()]}
    except (urllib.error.URLError, OSError) as exc:
        raise ServerUnreachable(f"cannot reach the control plane at {server}: {exc}") from None


# kubectl names a type by its plural and API group in messages ("wasmplugins.extensions.istio.io").
_GROUPS = {
    "WasmPlugin": "extensions.istio.io",
    "Secret": "",
    "Workload": "wasmesh.io",
    "Gateway": "wasmesh.io",
}


def _group(kind: str) -> str:
    return _GROUPS.get(kind, "wasmesh.io") or "v1"


def _singular(kind: str) -> str:
    """`wasmplugin.extensions.istio.io`, `secret`: how kubectl names one object's type."""
    group = _GROUPS.get(kind, "wasmesh.io")
    return f"{kind.lower()}.{group}" if group else kind.lower()


def _plural(kind: str) -> str:
    group = _GROUPS.get(kind, "wasmesh.io")
    return f"{kind.lower()}s.{group}" if group else f"{kind.lower()}s"


def _not_found(kind: str, name: str) -> str:
    return f'Error from server (NotFound): {_plural(kind)} "{name}" not found'


def _print_errors(reply: dict[str, Any]) -> None:
    for error in reply.get("errors", []):
        print(f"error: {error}", file=sys.stderr)


def _send_files(server: str, filenames: list[str], path: str) -> int:
    files, errors = expand_paths(filenames)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    failed = bool(errors)
    for file in files:
        try:
            text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error: {file}: {exc}", file=sys.stderr)
            failed = True
            continue
        try:
            source = "-" if str(file) == "-" else str(file.resolve())
            _status, reply = _request(server, "POST", f"{path}?source={quote(source)}", text.encode())
        except ServerUnreachable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for warning in reply.get("warnings", []):
            print(f"Warning: {warning}", file=sys.stderr)
        for result in reply.get("results", []):
            _print_result(result)
        if reply.get("errors"):
            _print_errors(reply)
            failed = True
    return 1 if failed else 0


def _print_result(result: dict[str, Any]) -> None:
    kind = str(result["kind"])
    if result["action"] == "deleted":  # kubectl: wasmplugin.extensions.istio.io "auth" deleted
        print(f'{_singular(kind)} "{result["name"]}" deleted')
    else:  # kubectl: wasmplugin.extensions.istio.io/auth created
        print(f"{_singular(kind)}/{result['name']} {result['action']}")


def run_apply(args: argparse.Namespace) -> int:
    return _send_files(args.server, args.filename, "/apply")


def run_delete(args: argparse.Namespace) -> int:
    if args.filename:
        if args.resource or args.all:
            print("error: use either -f FILE or RESOURCE NAME / --all, not both", file=sys.stderr)
            return 2
        return _send_files(args.server, args.filename, "/delete")
    if not args.resource:
        print("error: you must specify -f FILE, or a resource type with NAME or --all", file=sys.stderr)
        return 2
    try:
        kind = canonical_kind(args.resource)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.all and args.names:
        print("error: NAME and --all cannot be combined", file=sys.stderr)
        return 2
    if args.all_namespaces and not args.all:
        print(
            "error: a resource cannot be deleted by name across all namespaces (-A needs --all)",
            file=sys.stderr,
        )
        return 2
    if not args.all and not args.names:
        print(
            "error: resource(s) were provided, but no name was specified (give NAME or --all)",
            file=sys.stderr,
        )
        return 2
    namespace = args.namespace or "default"
    try:
        if args.all:
            query = "" if args.all_namespaces else f"?namespace={quote(namespace)}"
            _status, reply = _request(args.server, "DELETE", f"/resources/{kind}{query}")
            results: list[dict[str, Any]] = reply.get("results", [])
            for result in results:
                _print_result(result)
            if not results and not reply.get("errors"):
                where = "" if args.all_namespaces else f" in {namespace} namespace"
                print(f"No resources found{where}.", file=sys.stderr)
            _print_errors(reply)
            return 1 if reply.get("errors") else 0
        failed = False
        for name in args.names:
            status, reply = _request(
                args.server, "DELETE", f"/resources/{kind}/{quote(namespace)}/{quote(name)}"
            )
            for result in reply.get("results", []):
                _print_result(result)
            if status == 404:
                print(_not_found(kind, name), file=sys.stderr)
                failed = True
            elif status != 200:
                _print_errors(reply)
                failed = True
        return 1 if failed else 0
    except ServerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def format_age(created: str, now: datetime | None = None) -> str:
    """kubectl's short age: 45s, 12m, 3h, 5d."""
    try:
        moment = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    seconds = int(((now or datetime.now(UTC)) - moment).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _phase(spec: dict[str, Any]) -> str:
    names = {0: "UNSPECIFIED_PHASE", 1: "AUTHN", 2: "AUTHZ", 3: "STATS"}
    phase = spec.get("phase", "UNSPECIFIED_PHASE")
    return names.get(phase, str(phase)) if isinstance(phase, int) else str(phase)


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    lines = [
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def _ready(status: dict[str, Any] | None) -> str:
    """kubectl's READY: proxies that loaded the plugin / proxies it selects."""
    if status is None:
        return "0/0"
    return f"{status.get('ready', 0)}/{status.get('selected', 0)}"


def render_table(
    kind: str,
    items: list[dict[str, Any]],
    all_namespaces: bool = True,
    statuses: dict[tuple[str, str], dict[str, Any]] | None = None,
    wide: bool = False,
) -> str:
    if kind == "WasmPlugin":
        header = ["NAMESPACE", "NAME", "READY", "PHASE", "PRIORITY", "AGE"] + (["URL"] if wide else [])
    elif kind in ("Workload", "Gateway"):
        header = ["NAMESPACE", "NAME", "LISTENERS", "CLUSTERS", "AGE"]
    else:
        header = ["NAMESPACE", "NAME", "TYPE", "AGE"]
    rows: list[list[str]] = []
    for item in items:
        metadata = item.get("metadata", {})
        spec = item.get("spec") or {}
        namespace, name = str(metadata.get("namespace", "default")), str(metadata.get("name", ""))
        row = [namespace, name]
        if kind == "WasmPlugin":
            priority = spec.get("priority")
            status = (statuses or {}).get((namespace, name))
            row += [_ready(status), _phase(spec), "<unset>" if priority is None else str(priority)]
        elif kind in ("Workload", "Gateway"):
            ports = ",".join(str(listener.get("port")) for listener in spec.get("listeners", []))
            row += [ports or "<none>", str(len(spec.get("clusters", [])))]
        else:
            row += [str(item.get("type", ""))]
        row.append(format_age(str(metadata.get("creationTimestamp", ""))))
        if kind == "WasmPlugin" and wide:
            row.append(str(spec.get("url", "")))
        rows.append(row if all_namespaces else row[1:])
    if not all_namespaces:
        header = header[1:]
    return _columns([header, *rows])


def _plugin_statuses(server: str, namespace: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    query = f"?namespace={quote(namespace)}" if namespace else ""
    status, reply = _request(server, "GET", f"/status/wasmplugins{query}")
    if status != 200:
        return {}
    return {(str(item["namespace"]), str(item["name"])): item for item in reply.get("items", [])}


def _fetch_items(
    server: str, kind: str, name: str | None, namespace: str | None
) -> tuple[list[dict[str, Any]] | None, int]:
    """The stored documents asked for; (None, exit code) after printing the error."""
    if name:
        status, reply = _request(
            server, "GET", f"/resources/{kind}/{quote(namespace or 'default')}/{quote(name)}"
        )
        if status == 404:
            print(_not_found(kind, name), file=sys.stderr)
            return None, 1
        if status != 200:
            _print_errors(reply)
            return None, 1
        return [reply], 0
    query = f"?namespace={quote(namespace)}" if namespace else ""
    status, reply = _request(server, "GET", f"/resources/{kind}{query}")
    if status != 200:
        _print_errors(reply)
        return None, 1
    return list(reply.get("items", [])), 0


def _scope(args: argparse.Namespace) -> tuple[str, str | None] | int:
    """(kind, namespace or None for all) from the arguments, or an exit code after an error."""
    try:
        kind = canonical_kind(args.resource)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.all_namespaces and args.name:
        print("error: a resource cannot be retrieved by name across all namespaces", file=sys.stderr)
        return 2
    return kind, None if args.all_namespaces else (args.namespace or "default")


def run_get(args: argparse.Namespace) -> int:
    scope = _scope(args)
    if isinstance(scope, int):
        return scope
    kind, namespace = scope
    try:
        items, code = _fetch_items(args.server, kind, args.name, namespace)
        if items is None:
            return code
        if args.output == "json":
            payload: Any = items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}
            print(json.dumps(payload, indent=2))
        elif args.output == "yaml":
            payload = items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}
            print(yaml.safe_dump(payload, sort_keys=False), end="")
        elif args.output == "name":
            for item in items:
                print(f"{_singular(kind)}/{item.get('metadata', {}).get('name', '')}")
        elif not items:
            where = f" in {namespace} namespace" if namespace else ""
            print(f"No resources found{where}.", file=sys.stderr)
        else:
            statuses = _plugin_statuses(args.server, namespace) if kind == "WasmPlugin" else None
            print(
                render_table(
                    kind,
                    items,
                    all_namespaces=namespace is None,
                    statuses=statuses,
                    wide=args.output == "wide",
                ),
                end="",
            )
    except ServerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _describe_value(value: Any, indent: int) -> list[str]:
    """kubectl describe's nested `Key:  value` layout for a spec."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return [f"{pad}<empty>"]
        lines: list[str] = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines.extend(_describe_value(item, indent + 1))
            else:
                lines.append(f"{pad}{key}:  {_scalar(item)}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                nested = _describe_value(item, indent + 1)
                lines.append(f"{pad}- {nested[0].strip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return lines
    return [f"{pad}{_scalar(value)}"]


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if value is None:
        return "<none>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _labels(mapping: Any) -> list[str]:
    if not isinstance(mapping, dict) or not mapping:
        return ["<none>"]
    return [f"{key}={value}" for key, value in mapping.items()]


def describe_text(kind: str, item: dict[str, Any], status: dict[str, Any] | None) -> str:
    metadata = item.get("metadata", {})
    lines = [
        f"Name:         {metadata.get('name', '')}",
        f"Namespace:    {metadata.get('namespace', 'default')}",
    ]
    labels = _labels(metadata.get("labels"))
    lines.append(f"Labels:       {labels[0]}")
    lines.extend(f"              {label}" for label in labels[1:])
    annotations = _labels(metadata.get("annotations"))
    lines.append(f"Annotations:  {annotations[0]}")
    lines.extend(f"              {annotation}" for annotation in annotations[1:])
    lines.append(f"API Version:  {item.get('apiVersion', '')}")
    lines.append(f"Kind:         {kind}")
    lines.append("Metadata:")
    lines.append(f"  Creation Timestamp:  {metadata.get('creationTimestamp', '<unknown>')}")
    lines.append(f"  Generation:          {metadata.get('generation', '')}")
    lines.append(f"  Resource Version:    {metadata.get('resourceVersion', '')}")
    if kind == "Secret":
        lines.append(f"Type:  {item.get('type', '')}")
        data = {**(item.get("data") or {}), **(item.get("stringData") or {})}
        lines.append("Data")
        lines.append("====")
        lines.extend(f"{key}:  {len(str(value))} bytes" for key, value in data.items())
    else:
        lines.append("Spec:")
        lines.extend(_describe_value(item.get("spec") or {}, 1))
    if kind == "WasmPlugin":
        lines.extend(_describe_status(status))
    return "\n".join(lines) + "\n"


def _describe_status(status: dict[str, Any] | None) -> list[str]:
    lines = ["Status:", f"  Ready:  {_ready(status)} (proxies that loaded it / proxies it selects)"]
    proxies: list[dict[str, Any]] = list((status or {}).get("proxies", []))
    if not proxies:
        lines.append("  Proxies:  <none>")
    else:
        lines.append("  Proxies:")
        rows = [["PROXY", "NODE", "NAMESPACE", "STATE", "LAST ERROR"]]
        rows += [
            [
                str(proxy.get("proxy", "")),
                str(proxy.get("node", "")),
                str(proxy.get("namespace", "")),
                str(proxy.get("state", "")),
                str(proxy.get("error", "")) or "<none>",
            ]
            for proxy in proxies
        ]
        lines.extend("    " + line for line in _columns(rows).splitlines())
    warnings: list[str] = list((status or {}).get("warnings", []))
    lines.append("Warnings:" + ("  <none>" if not warnings else ""))
    lines.extend(f"  {warning}" for warning in warnings)
    return lines


def run_describe(args: argparse.Namespace) -> int:
    scope = _scope(args)
    if isinstance(scope, int):
        return scope
    kind, namespace = scope
    try:
        items, code = _fetch_items(args.server, kind, args.name, namespace)
        if items is None:
            return code
        if not items:
            where = f" in {namespace} namespace" if namespace else ""
            print(f"No resources found{where}.", file=sys.stderr)
            return 0
        statuses = _plugin_statuses(args.server, namespace) if kind == "WasmPlugin" else {}
        texts = []
        for item in items:
            metadata = item.get("metadata", {})
            key = (str(metadata.get("namespace", "default")), str(metadata.get("name", "")))
            texts.append(describe_text(kind, item, statuses.get(key)))
        print("\n\n".join(text.rstrip("\n") for text in texts))
    except ServerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_envoy_bootstrap(args: argparse.Namespace) -> int:
    try:
        host, port = split_host_port(args.xds)
        labels = parse_labels(args.labels)
        tls = bootstrap_tls(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bootstrap = build_bootstrap(
        host, port, args.node_id, labels, args.namespace, args.admin_port, args.workload, tls
    )
    print(render_bootstrap(bootstrap), end="")
    return 0


__all__ = ["register"]
