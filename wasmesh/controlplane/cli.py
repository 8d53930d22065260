"""Sub-commands: control-plane (and its token management), apply, delete, get, describe, config,
envoy-bootstrap."""

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
from wasmesh.controlplane.audit import AUDIT_FILE, AuditLog
from wasmesh.controlplane.auth import (
    ApiSecurity,
    AuthError,
    TokenStore,
    api_group,
    describe_record,
    ensure_admin_token,
    parse_ttl,
)
from wasmesh.controlplane.bootstrap import build_bootstrap, parse_labels, render_bootstrap, split_host_port
from wasmesh.controlplane.clientconfig import (
    CONFIG_ENV,
    ConfigError,
    Connection,
    connection,
    find_context,
    load_config,
    redacted,
    save_config,
)
from wasmesh.controlplane.security_cli import (
    add_bootstrap_tls_flags,
    add_security_commands,
    add_security_flags,
    bootstrap_tls,
    default_state_dir,
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
DEFAULT_SERVER = f"https://127.0.0.1:{DEFAULT_API_PORT}"
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    """kubectl's connection flags; each overrides the client config's current context."""
    parser.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV),
        help=f"control plane API URL (env {SERVER_ENV}; default: the context's, else {DEFAULT_SERVER})",
    )
    parser.add_argument("--token", help="bearer token (default: the context's)")
    parser.add_argument("--certificate-authority", help="CA file to verify the API's serving cert")
    parser.add_argument(
        "--insecure-skip-tls-verify", action="store_true", help="do not verify the serving cert (unsafe)"
    )
    parser.add_argument(
        "--context", help=f"client config context to use (config: ${CONFIG_ENV} or ~/.wasmesh/config)"
    )


def _register_server_security(serve: argparse.ArgumentParser) -> None:
    """The API's TLS and tokens, the mesh CA's flags (security_cli), and their management commands."""
    add_security_flags(serve)
    serve.add_argument(
        "--api-cert", type=Path, help="API serving cert (PEM; default: self-signed in --state-dir)"
    )
    serve.add_argument("--api-key", type=Path, help="API serving key (PEM), with --api-cert")
    serve.add_argument(
        "--insecure-api",
        action="store_true",
        help="serve the API over plain HTTP without authentication (loopback --host only)",
    )
    commands = serve.add_subparsers(dest="control_plane_command", metavar="{token,bootstrap-token,cert}")
    add_security_commands(commands)
    token = commands.add_parser("token", help="manage API bearer tokens in the state dir")
    token_commands = token.add_subparsers(dest="token_command", metavar="{create,list,revoke}", required=True)
    create = token_commands.add_parser("create", help="create a token; prints its value once")
    create.add_argument(
        "--user", required=True, help="who the token authenticates (in audit lines and errors)"
    )
    create.add_argument("--role", required=True, choices=("admin", "editor", "viewer"))
    create.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="namespace the token may act in (repeatable or comma-separated; '*' = all); not for admin",
    )
    create.add_argument("--ttl", help="lifetime, e.g. 30m, 24h, 7d (default: no expiry)")
    token_commands.add_parser("list", help="list tokens (never their values)")
    revoke = token_commands.add_parser("revoke", help="revoke a token by ID (effective immediately)")
    revoke.add_argument("id")
    for command in (create, token_commands.choices["list"], revoke):
        command.add_argument(
            "--state-dir",
            dest="token_state_dir",
            metavar="STATE_DIR",
            type=Path,
            help=f"the control plane's --state-dir (default {default_state_dir()})",
        )
    token.set_defaults(handler=run_token)


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
    _register_server_security(serve)
    apply = subparsers.add_parser("apply", help="create or update resources on the control plane")
    apply.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="file or directory of YAML/JSON documents ('-' for stdin); repeatable",
    )
    _add_client_flags(apply)
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
    _add_client_flags(delete)
    delete.set_defaults(handler=run_delete)

    get = subparsers.add_parser("get", help="list resources on the control plane (kubectl-like)")
    get.add_argument("resource", help="wasmplugins | workloads | gateways | secrets")
    get.add_argument("name", nargs="?")
    get.add_argument("-n", "--namespace", help="namespace (default: default)")
    get.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    get.add_argument("-o", "--output", choices=("table", "wide", "yaml", "json", "name"), default="table")
    _add_client_flags(get)
    get.set_defaults(handler=run_get)

    describe = subparsers.add_parser(
        "describe", help="show a resource in detail, with per-proxy plugin status (kubectl-like)"
    )
    describe.add_argument("resource", help="wasmplugins | workloads | gateways | secrets")
    describe.add_argument("name", nargs="?", help="default: every resource of the type in the namespace")
    describe.add_argument("-n", "--namespace", help="namespace (default: default)")
    describe.add_argument("-A", "--all-namespaces", action="store_true", help="without NAME: every namespace")
    _add_client_flags(describe)
    describe.set_defaults(handler=run_describe)

    _register_config(subparsers)

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
        xds_security = security_options(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    default_port = DEFAULT_XDS_PORT if xds_security is None else DEFAULT_SECURE_XDS_PORT
    if args.insecure_api and args.host not in _LOOPBACK_HOSTS:
        print(
            f"--insecure-api: only with a loopback --host (127.0.0.1, ::1), not {args.host}", file=sys.stderr
        )
        return 2
    state_dir = args.state_dir or default_state_dir()
    try:
        api_security = ApiSecurity.from_state_dir(
            state_dir, args.host, args.api_cert, args.api_key, insecure=args.insecure_api
        )
        admin_token = None if args.insecure_api else ensure_admin_token(state_dir)
    except (AuthError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if admin_token is not None:  # the path only: token values never reach a log
        print(
            f"control plane: first start; admin token written to {admin_token} (mode 0600)", file=sys.stderr
        )
    options = ControlPlaneOptions(
        config_dir=args.config_dir,
        host=args.host,
        security=xds_security,
        xds_port=args.xds_port if args.xds_port is not None else default_port,
        api_port=args.api_port,
        root_namespace=args.root_namespace,
        debounce_after=args.debounce,
        api_security=api_security,
    )
    try:
        asyncio.run(ControlPlane(options).serve_forever())
    except (OSError, CaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


class ServerUnreachable(Exception):
    """The control plane API did not answer."""


class ServerRefused(ServerUnreachable):
    """The control plane refused the caller (401) or the verb (403); the message is kubectl's."""


def _connection(args: argparse.Namespace) -> Connection:
    return connection(
        args.server,
        args.token,
        args.certificate_authority,
        args.insecure_skip_tls_verify,
        args.context,
        DEFAULT_SERVER,
    )


def _report(exc: ServerUnreachable) -> None:
    print(str(exc) if isinstance(exc, ServerRefused) else f"error: {exc}", file=sys.stderr)


def _request(
    server: Connection, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/yaml"}
    if server.token:
        headers["Authorization"] = f"Bearer {server.token}"
    request = urllib.request.Request(
        f"{server.server.rstrip('/')}{path}", data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30, context=server.ssl_context) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        payload = exc.read() or b"{}"
        try:
            reply: dict[str, Any] = json.loads(payload)
        except ValueError:
            reply = {"errors": [payload.decode("utf-8", "replace").strip()]}
        if exc.code == 401:  # kubectl's words
            raise ServerRefused(
                "error: You must be logged in to the server (Unauthorized): "
                + "; ".join(str(error) for error in reply.get("errors", []))
            ) from None
        if exc.code == 403:
            raise ServerRefused(
                "\n".join(f"Error from server (Forbidden): {error}" for error in reply.get("errors", []))
            ) from None
        return exc.code, reply
    except (urllib.error.URLError, OSError) as exc:
        raise ServerUnreachable(f"cannot reach the control plane at {server.server}: {exc}") from None


def _singular(kind: str) -> str:
    """`wasmplugin.extensions.istio.io`, `secret`: how kubectl names one object's type."""
    group = api_group(kind)
    return f"{kind.lower()}.{group}" if group else kind.lower()


def _plural(kind: str) -> str:
    group = api_group(kind)
    return f"{kind.lower()}s.{group}" if group else f"{kind.lower()}s"


def _not_found(kind: str, name: str) -> str:
    return f'Error from server (NotFound): {_plural(kind)} "{name}" not found'


def _print_errors(reply: dict[str, Any]) -> None:
    for error in reply.get("errors", []):
        print(f"error: {error}", file=sys.stderr)


def _send_files(server: Connection, filenames: list[str], path: str) -> int:
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
            _report(exc)
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
    try:
        return _send_files(_connection(args), args.filename, "/apply")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_delete(args: argparse.Namespace) -> int:
    if args.filename:
        if args.resource or args.all:
            print("error: use either -f FILE or RESOURCE NAME / --all, not both", file=sys.stderr)
            return 2
        try:
            return _send_files(_connection(args), args.filename, "/delete")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
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
        server = _connection(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.all:
            query = "" if args.all_namespaces else f"?namespace={quote(namespace)}"
            _status, reply = _request(server, "DELETE", f"/resources/{kind}{query}")
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
            status, reply = _request(server, "DELETE", f"/resources/{kind}/{quote(namespace)}/{quote(name)}")
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
        _report(exc)
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


def _plugin_statuses(server: Connection, namespace: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    query = f"?namespace={quote(namespace)}" if namespace else ""
    status, reply = _request(server, "GET", f"/status/wasmplugins{query}")
    if status != 200:
        return {}
    return {(str(item["namespace"]), str(item["name"])): item for item in reply.get("items", [])}


def _fetch_items(
    server: Connection, kind: str, name: str | None, namespace: str | None
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


def _scoped_connection(args: argparse.Namespace) -> tuple[str, str | None, Connection] | int:
    """The resource kind, namespace and API connection `get`/`describe` act on, or an exit code."""
    scope = _scope(args)
    if isinstance(scope, int):
        return scope
    try:
        return (*scope, _connection(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_get(args: argparse.Namespace) -> int:
    target = _scoped_connection(args)
    if isinstance(target, int):
        return target
    kind, namespace, server = target
    try:
        items, code = _fetch_items(server, kind, args.name, namespace)
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
            statuses = _plugin_statuses(server, namespace) if kind == "WasmPlugin" else None
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
        _report(exc)
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
        lines.extend(f"{key}:  {value}" for key, value in data.items())  # the API redacts values
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
    target = _scoped_connection(args)
    if isinstance(target, int):
        return target
    kind, namespace, server = target
    try:
        items, code = _fetch_items(server, kind, args.name, namespace)
        if items is None:
            return code
        if not items:
            where = f" in {namespace} namespace" if namespace else ""
            print(f"No resources found{where}.", file=sys.stderr)
            return 0
        statuses = _plugin_statuses(server, namespace) if kind == "WasmPlugin" else {}
        texts = []
        for item in items:
            metadata = item.get("metadata", {})
            key = (str(metadata.get("namespace", "default")), str(metadata.get("name", "")))
            texts.append(describe_text(kind, item, statuses.get(key)))
        print("\n\n".join(text.rstrip("\n") for text in texts))
    except ServerUnreachable as exc:
        _report(exc)
        return 1
    return 0


def _local_user() -> str:
    """Who ran a token command, for the audit log (the state dir's owner runs them locally)."""
    try:
        return f"local:{os.getlogin()}"
    except OSError:
        return f"local:uid={os.getuid()}"


def run_token(args: argparse.Namespace) -> int:
    state_dir: Path = args.token_state_dir or args.state_dir or default_state_dir()
    tokens = TokenStore(state_dir)
    audit = AuditLog(state_dir / AUDIT_FILE)
    try:
        if args.token_command == "create":
            namespaces = [
                part.strip() for value in args.namespace for part in value.split(",") if part.strip()
            ]
            ttl = parse_ttl(args.ttl) if args.ttl else None
            record, value = tokens.create(args.user, args.role, namespaces, ttl)
            scope = ",".join(record.namespaces) or "*"
            audit.record(
                user=_local_user(),
                verb="create",
                kind="Token",
                name=record.id,
                code=200,
                source="cli",
                reason=f"user={record.user} role={record.role} namespaces={scope}",
            )
            print(f'token "{record.id}" created for user "{record.user}" ({record.role})', file=sys.stderr)
            print(value)  # the only time the value is shown; it is stored hashed
            return 0
        if args.token_command == "revoke":
            record = tokens.revoke(args.id)
            audit.record(
                user=_local_user(), verb="delete", kind="Token", name=record.id, code=200, source="cli"
            )
            print(f'token "{record.id}" revoked')
            return 0
        now = datetime.now(UTC).timestamp()
        rows = [["ID", "USER", "ROLE", "NAMESPACES", "EXPIRES", "STATE"]]
        rows += [list(describe_record(record, now).values()) for record in tokens.records()]
        print(_columns(rows), end="")
        return 0
    except AuthError as exc:
        if args.token_command == "revoke":
            audit.record(
                user=_local_user(), verb="delete", kind="Token", name=args.id, code=404, source="cli"
            )
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _register_config(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = subparsers.add_parser(
        "config", help=f"client contexts: server, CA and token (${CONFIG_ENV} or ~/.wasmesh/config, 0600)"
    )
    commands = config.add_subparsers(
        dest="config_command", metavar="{set-context,use-context,current-context,view}", required=True
    )
    set_context = commands.add_parser(
        "set-context", help="create or update a context (and use it if none is)"
    )
    set_context.add_argument("name")
    set_context.add_argument("--server", help="control plane API URL, e.g. https://127.0.0.1:15014")
    set_context.add_argument("--certificate-authority", help="CA file that signed the API's serving cert")
    set_context.add_argument(
        "--embed-certs", action="store_true", help="store the CA file's PEM in the config instead of its path"
    )
    set_context.add_argument("--token", help="bearer token")
    set_context.add_argument("--token-file", type=Path, help="read the bearer token from this file")
    set_context.add_argument(
        "--insecure-skip-tls-verify", action="store_true", default=None, help="do not verify the serving cert"
    )
    use = commands.add_parser("use-context", help="make a context the current one")
    use.add_argument("name")
    commands.add_parser("current-context", help="print the current context's name")
    commands.add_parser("view", help="print the client config (tokens redacted)")
    config.set_defaults(handler=run_config)


def run_config(args: argparse.Namespace) -> int:
    try:
        config = load_config()
        if args.config_command == "view":
            print(yaml.safe_dump(redacted(config), sort_keys=False), end="")
            return 0
        if args.config_command == "current-context":
            if not config["current-context"]:
                print("error: current-context is not set", file=sys.stderr)
                return 1
            print(config["current-context"])
            return 0
        if args.config_command == "use-context":
            if find_context(config, args.name) is None:
                print(f'error: no context exists with the name: "{args.name}"', file=sys.stderr)
                return 1
            config["current-context"] = args.name
            save_config(config)
            print(f'Switched to context "{args.name}".')
            return 0
        context = find_context(config, args.name)
        created = context is None
        if context is None:
            context = {"name": args.name}
            config["contexts"].append(context)
        if args.server:
            context["server"] = args.server
        if args.certificate_authority:
            ca = Path(args.certificate_authority)
            if args.embed_certs:
                context["certificate-authority-data"] = ca.read_text(encoding="utf-8")
                context.pop("certificate-authority", None)
            else:
                context["certificate-authority"] = str(ca.resolve())
                context.pop("certificate-authority-data", None)
        if args.token_file is not None:
            context["token"] = args.token_file.read_text(encoding="utf-8").strip()
        elif args.token:
            context["token"] = args.token
        if args.insecure_skip_tls_verify is not None:
            context["insecure-skip-tls-verify"] = bool(args.insecure_skip_tls_verify)
        if not config["current-context"]:
            config["current-context"] = args.name
        save_config(config)
        print(f'Context "{args.name}" {"created" if created else "modified"}.')
        return 0
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


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
