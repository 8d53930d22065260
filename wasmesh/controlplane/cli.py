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
from wasmesh.controlplane.server import DEFAULT_API_PORT, DEFAULT_XDS_PORT, ControlPlane, ControlPlaneOptions
from wasmesh.controlplane.store import canonical_kind

SERVER_ENV = "WASMESH_CONTROL_PLANE"
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_API_PORT}"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser("control-plane", help="serve WasmPlugins and workloads over xDS")
    serve.add_argument("--config-dir", type=Path, help="directory of YAML/JSON resources to watch")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--xds-port", type=int, default=DEFAULT_XDS_PORT)
    serve.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    serve.add_argument("--root-namespace", default="istio-system")
    serve.add_argument("--debounce", type=float, default=0.1, help="push debounce quiet period, seconds")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(handler=run_control_plane)

    for name, verb in (("apply", "create or update"), ("delete", "delete")):
        parser = subparsers.add_parser(name, help=f"{verb} resources on the control plane")
        parser.add_argument(
            "-f",
            "--filename",
            action="append",
            required=True,
            help="file or directory of YAML/JSON documents ('-' for stdin); repeatable",
        )
        parser.add_argument(
            "--server",
            default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
            help=f"control plane API URL (env {SERVER_ENV}, default {DEFAULT_SERVER})",
        )
        parser.set_defaults(handler=run_apply if name == "apply" else run_delete)

    get = subparsers.add_parser("get", help="list resources on the control plane (kubectl-like)")
    get.add_argument("resource", help="wasmplugins | workloads | gateways | secrets")
    get.add_argument("name", nargs="?")
    get.add_argument("-n", "--namespace")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    get.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_SERVER))
    get.set_defaults(handler=run_get)

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


def run_control_plane(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.config_dir is not None and not args.config_dir.is_dir():
        print(f"--config-dir: {args.config_dir}: not a directory", file=sys.stderr)
        return 2
    options = ControlPlaneOptions(
        config_dir=args.config_dir,
        host=args.host,
        xds_port=args.xds_port,
        api_port=args.api_port,
        root_namespace=args.root_namespace,
        debounce_after=args.debounce,
    )
    asyncio.run(ControlPlane(options).serve_forever())
    return 0


def _request(server: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{server.rstrip('/')}{path}", data=body, method=method, headers={"Content-Type": "application/yaml"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _send_files(args: argparse.Namespace, path: str) -> int:
    files, errors = expand_paths(args.filename)
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
            _status, reply = _request(args.server, "POST", f"{path}?source={quote(source)}", text.encode())
        except (urllib.error.URLError, OSError) as exc:
            print(f"error: cannot reach the control plane at {args.server}: {exc}", file=sys.stderr)
            return 1
        for result in reply.get("results", []):
            print(f"{result['kind'].lower()}.{_group(result['kind'])}/{result['name']} {result['action']}")
        for error in reply.get("errors", []):
            print(f"error: {error}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def _group(kind: str) -> str:
    return {"WasmPlugin": "extensions.istio.io", "Secret": "v1"}.get(kind, "wasmesh.io")


def run_apply(args: argparse.Namespace) -> int:
    return _send_files(args, "/apply")


def run_delete(args: argparse.Namespace) -> int:
    return _send_files(args, "/delete")


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


def render_table(kind: str, items: list[dict[str, Any]], all_namespaces: bool = True) -> str:
    if kind == "WasmPlugin":
        header = ["NAMESPACE", "NAME", "PHASE", "PRIORITY", "AGE"]
    elif kind in ("Workload", "Gateway"):
        header = ["NAMESPACE", "NAME", "LISTENERS", "CLUSTERS", "AGE"]
    else:
        header = ["NAMESPACE", "NAME", "TYPE", "AGE"]
    rows: list[list[str]] = []
    for item in items:
        metadata = item.get("metadata", {})
        spec = item.get("spec") or {}
        row = [str(metadata.get("namespace", "default")), str(metadata.get("name", ""))]
        if kind == "WasmPlugin":
            priority = spec.get("priority")
            row += [_phase(spec), "<unset>" if priority is None else str(priority)]
        elif kind in ("Workload", "Gateway"):
            ports = ",".join(str(listener.get("port")) for listener in spec.get("listeners", []))
            row += [ports or "<none>", str(len(spec.get("clusters", [])))]
        else:
            row += [str(item.get("type", ""))]
        row.append(format_age(str(metadata.get("creationTimestamp", ""))))
        rows.append(row if all_namespaces else row[1:])
    if not all_namespaces:
        header = header[1:]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = [
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def run_get(args: argparse.Namespace) -> int:
    try:
        kind = canonical_kind(args.resource)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    namespace = None if args.all_namespaces else args.namespace
    query = f"?namespace={namespace}" if namespace else ""
    try:
        status, reply = _request(args.server, "GET", f"/resources/{kind}{query}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot reach the control plane at {args.server}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        for error in reply.get("errors", []):
            print(f"error: {error}", file=sys.stderr)
        return 1
    items: list[dict[str, Any]] = reply.get("items", [])
    if args.name:
        items = [item for item in items if item.get("metadata", {}).get("name") == args.name]
        if not items:
            print(f'Error from server (NotFound): {args.resource} "{args.name}" not found', file=sys.stderr)
            return 1
    if args.output == "json":
        payload: Any = items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}
        print(json.dumps(payload, indent=2))
    elif args.output == "yaml":
        payload = items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}
        print(yaml.safe_dump(payload, sort_keys=False), end="")
    elif not items:
        where = f" in {namespace} namespace" if namespace else ""
        print(f"No resources found{where}.", file=sys.stderr)
    else:
        print(render_table(kind, items, all_namespaces=namespace is None), end="")
    return 0


def run_envoy_bootstrap(args: argparse.Namespace) -> int:
    try:
        host, port = split_host_port(args.xds)
        labels = parse_labels(args.labels)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bootstrap = build_bootstrap(
        host, port, args.node_id, labels, args.namespace, args.admin_port, args.workload
    )
    print(render_bootstrap(bootstrap), end="")
    return 0


__all__ = ["register"]
