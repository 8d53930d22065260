"""The proxy's YAML configuration: model and validation (no I/O beyond reading the file).

Every validation error is a ``ConfigError`` whose message is one line naming the
file and the field path, e.g. ``proxy.yaml: listeners[0].port: expected an integer 1-65535``.
See docs/proxy-config.md for the documented format.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_ROUTE_TIMEOUT_S = 15.0  # Envoy's default route timeout
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_MAX_IDLE_PER_ENDPOINT = 128
# Header limits: Envoy 1.40's defaults (HCM max_request_headers_kb, the upstream codec's
# max_response_headers_kb, common_http_protocol_options.max_headers_count); Envoy's caps.
DEFAULT_MAX_REQUEST_HEADERS_KB = 60
DEFAULT_MAX_RESPONSE_HEADERS_KB = 80
DEFAULT_MAX_HEADERS_COUNT = 100
MAX_HEADERS_KB_CAP = 8192
# Downstream timeouts. Envoy leaves request_headers_timeout off; wasmesh bounds it so a slow
# client (slowloris) cannot hold a connection forever. idle_timeout is Envoy's HCM default (1h).
DEFAULT_REQUEST_HEADERS_TIMEOUT_S = 10.0
DEFAULT_DOWNSTREAM_IDLE_TIMEOUT_S = 3600.0
# The Wasm runtime's own defaults (wasmesh.runtime PluginSpec / Runtime), repeated here so parsing a
# config does not import wasmtime; tests/proxy/test_proxy_wasm_limits.py keeps the two in step.
DEFAULT_CALLBACK_DEADLINE_MS = 1000
DEFAULT_STARTUP_DEADLINE_MS = 5000
DEFAULT_MEMORY_LIMIT_MIB = 1024  # cpp-host's (Envoy's) 1 GiB cap per VM
DEFAULT_RELOAD_BACKOFF_S = 1.0  # Envoy's ReloadConfig.backoff base interval
MIB = 1 << 20


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is one line naming the file and field."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None
    invert: bool = False


@dataclass(frozen=True)
class RouteMatch:
    prefix: str | None = None
    exact: str | None = None
    regex: str | None = None
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True)
class DirectResponse:
    status: int
    body: str = ""


@dataclass(frozen=True)
class RouteConfig:
    name: str
    match: RouteMatch
    cluster: str | None = None
    timeout_s: float = DEFAULT_ROUTE_TIMEOUT_S  # 0 disables the timeout, as in Envoy
    prefix_rewrite: str | None = None
    host_rewrite: str | None = None
    direct_response: DirectResponse | None = None


@dataclass(frozen=True)
class VirtualHostConfig:
    name: str
    domains: tuple[str, ...]
    routes: tuple[RouteConfig, ...]


@dataclass(frozen=True)
class CertificateNames:
    """What the ``connection.*`` attributes show of a certificate: RFC 2253 subject and SANs."""

    subject: str = ""
    dns_sans: tuple[str, ...] = ()
    uri_sans: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsConfig:
    """A listener's TLS termination (Envoy's DownstreamTlsContext, reduced to what a gateway needs).

    ``context`` is built (files read, PEM checked, key matched) when the config loads, so a bad
    certificate is a config error and never replaces a working configuration on reload.
    """

    certificate: str  # resolved path of the PEM certificate chain
    private_key: str
    context: ssl.SSLContext = field(compare=False, repr=False)
    client_ca: str | None = None  # set: clients must present a certificate this CA verifies (mTLS)
    alpn: tuple[str, ...] = ()
    local: CertificateNames = field(default_factory=CertificateNames)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    address: str
    port: int
    virtual_hosts: tuple[VirtualHostConfig, ...]
    # Names of WasmPlugin resources (metadata.name or namespace/name) to run; None = all that match the port.
    plugins: tuple[str, ...] | None = None
    use_remote_address: bool = True
    generate_request_id: bool = True
    direction: int = 0  # envoy TrafficDirection: 0 unspecified, 1 inbound, 2 outbound
    tls: TlsConfig | None = None  # None: plaintext HTTP/1.1
    max_request_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB
    max_headers_count: int = DEFAULT_MAX_HEADERS_COUNT
    # 0 disables a timeout (as in Envoy); max_connections 0 is unlimited.
    request_headers_timeout_s: float = DEFAULT_REQUEST_HEADERS_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_DOWNSTREAM_IDLE_TIMEOUT_S
    max_connections: int = 0
    accept_http_10: bool = False  # Envoy's default: HTTP/1.0 requests get 426

    @property
    def tls_mode(self) -> str:
        """ "plaintext", "tls" or "mtls": a change of mode needs a new listening socket (restart)."""
        if self.tls is None:
            return "plaintext"
        return "mtls" if self.tls.mutual else "tls"


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    endpoints: tuple[tuple[str, int], ...]
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_idle_per_endpoint: int = DEFAULT_MAX_IDLE_PER_ENDPOINT
    max_response_headers_kb: int = DEFAULT_MAX_RESPONSE_HEADERS_KB
    max_headers_count: int = DEFAULT_MAX_HEADERS_COUNT


@dataclass(frozen=True)
class AdminConfig:
    address: str
    port: int


@dataclass(frozen=True)
class PluginResource:
    """One WasmPlugin document, kept raw; ``wasmesh.proxy.plugins`` parses it with wasmesh.api."""

    body: dict[str, Any]
    source: str  # file it came from (for error messages)
    doc_index: int = 0


@dataclass(frozen=True)
class CacheConfig:
    dir: str | None = None
    insecure_registries: tuple[str, ...] = ()
    allowed_file_dirs: tuple[str, ...] = ()  # file:// modules only from under these (empty = anywhere)


@dataclass(frozen=True)
class WasmLimits:
    """Safety limits every plugin VM of a proxy gets (the ``wasm:`` section; xDS/run: --wasm-* flags)."""

    callback_deadline_ms: int = DEFAULT_CALLBACK_DEADLINE_MS  # CPU time of one plugin callback
    startup_deadline_ms: int = DEFAULT_STARTUP_DEADLINE_MS  # VM start-up, on_vm_start and on_configure
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_MIB * MIB  # one VM's linear memory
    reload_backoff_s: float = DEFAULT_RELOAD_BACKOFF_S  # FAIL_RELOAD: first wait before a new VM


@dataclass(frozen=True)
class ProxyConfig:
    listeners: tuple[ListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    plugins: tuple[PluginResource, ...] = ()
    admin: AdminConfig | None = None
    node: dict[str, Any] = field(default_factory=dict)
    cache: CacheConfig = field(default_factory=CacheConfig)
    wasm: WasmLimits = field(default_factory=WasmLimits)
    reload_poll_s: float = 1.0
    drain_timeout_s: float = 10.0
    source: str = "<inline>"
    # Files whose modification should trigger a reload (the config and plugin files it references).
    watched_files: tuple[str, ...] = ()

    def cluster(self, name: str) -> ClusterConfig | None:
        for c in self.clusters:
            if c.name == name:
                return c
        return None


# --------------------------------------------------------------------------- helpers


class ConfigContext:
    """Field-path bookkeeping so errors name exactly where they are."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: object, ctx: ConfigContext, path: str) -> float:
    """Seconds from ``5``, ``2.5``, ``"250ms"``, ``"5s"``, ``"1m"`` (Envoy durations are non-negative)."""
    if isinstance(value, bool):
        raise ctx.error(path, "expected a duration like 5s or 250ms")
    if isinstance(value, int | float):
        if value < 0:
            raise ctx.error(path, "duration must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
            return float(m.group(1)) * scale
    raise ctx.error(path, f"expected a duration like 5s or 250ms, got {value!r}")


def parse_deadline_ms(value: object, ctx: ConfigContext, path: str) -> int:
    """Whole milliseconds (at least 1) from a duration: a deadline of 0 would fail every call."""
    seconds = parse_duration(value, ctx, path)
    millis = round(seconds * 1000)
    if millis < 1:
        raise ctx.error(path, f"must be at least 1ms, got {value!r}")
    if millis > 3_600_000:
        raise ctx.error(path, f"must be at most 1h, got {value!r}")
    return millis


def parse_memory_mib(value: object, ctx: ConfigContext, path: str) -> int:
    """Bytes from a whole number of MiB, 1 to 4096 (a wasm32 memory cannot grow past 4 GiB)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ctx.error(path, f"expected an integer number of MiB 1-4096, got {value!r}")
    return value * MIB


def parse_wasm_limits(raw: object, ctx: ConfigContext, path: str = "wasm") -> WasmLimits:
    """The ``wasm:`` section; every field optional (absent or null = the runtime's default)."""
    d = _mapping(raw, ctx, path)
    _check_keys(d, {"callback_deadline", "startup_deadline", "memory_limit_mib", "reload_backoff"}, ctx, path)
    defaults = WasmLimits()
    callback, startup = d.get("callback_deadline"), d.get("startup_deadline")
    memory, backoff = d.get("memory_limit_mib"), d.get("reload_backoff")
    return WasmLimits(
        callback_deadline_ms=defaults.callback_deadline_ms
        if callback is None
        else parse_deadline_ms(callback, ctx, f"{path}.callback_deadline"),
        startup_deadline_ms=defaults.startup_deadline_ms
        if startup is None
        else parse_deadline_ms(startup, ctx, f"{path}.startup_deadline"),
        memory_limit_bytes=defaults.memory_limit_bytes
        if memory is None
        else parse_memory_mib(memory, ctx, f"{path}.memory_limit_mib"),
        reload_backoff_s=defaults.reload_backoff_s
        if backoff is None
        else parse_duration(backoff, ctx, f"{path}.reload_backoff"),
    )


def _mapping(value: object, ctx: ConfigContext, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ctx.error(path, f"expected a mapping, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise ctx.error(path, f"keys must be strings, got {k!r}")
    return value


def _list(value: object, ctx: ConfigContext, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ctx.error(path, f"expected a list, got {type(value).__name__}")
    return value


def _str(value: object, ctx: ConfigContext, path: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ctx.error(path, "expected a non-empty string")
    return value


def _bool(value: object, ctx: ConfigContext, path: str) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(path, "expected true or false")
    return value


def _port(value: object, ctx: ConfigContext, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ctx.error(path, f"expected an integer port 0-65535, got {value!r}")
    return value


def _int_in(value: object, low: int, high: int, ctx: ConfigContext, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ctx.error(path, f"expected an integer {low}-{high}, got {value!r}")
    return value


_LISTENER_LIMIT_KEYS = {
    "max_request_headers_kb",
    "max_headers_count",
    "request_headers_timeout",
    "idle_timeout",
    "max_connections",
    "accept_http_10",
}


def _check_keys(d: dict[str, Any], allowed: set[str], ctx: ConfigContext, path: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ctx.error(where, f"unknown field (allowed: {', '.join(sorted(allowed))})")


def parse_host_port(
    value: str, ctx: ConfigContext, path: str, default_port: int | None = None
) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or (with a default) ``host``."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise ctx.error(path, f"bad address {value!r}")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not port_text:
        if default_port is None:
            raise ctx.error(path, f"expected HOST:PORT, got {value!r}")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ctx.error(path, f"bad port in {value!r}")
    if not host:
        raise ctx.error(path, f"missing host in {value!r}")
    return host, int(port_text)


# --------------------------------------------------------------------------- parsing


def _parse_header_match(raw: object, ctx: ConfigContext, path: str) -> HeaderMatch:
    d = _mapping(raw, ctx, path)
    _check_keys(d, {"name", "exact", "prefix", "regex", "present", "invert"}, ctx, path)
    name = _str(d.get("name"), ctx, f"{path}.name").lower()
    kinds = [k for k in ("exact", "prefix", "regex", "present") if k in d]
    if len(kinds) > 1:
        raise ctx.error(path, f"set only one of exact/prefix/regex/present (got {', '.join(kinds)})")
    regex = d.get("regex")
    if regex is not None:
        _compile_regex(_str(regex, ctx, f"{path}.regex"), ctx, f"{path}.regex")
    return HeaderMatch(
        name=name,
        exact=_str(d["exact"], ctx, f"{path}.exact", allow_empty=True) if "exact" in d else None,
        prefix=_str(d["prefix"], ctx, f"{path}.prefix", allow_empty=True) if "prefix" in d else None,
        regex=regex,
        present=_bool(d["present"], ctx, f"{path}.present") if "present" in d else (None if kinds else True),
        invert=_bool(d.get("invert", False), ctx, f"{path}.invert"),
    )


def _compile_regex(pattern: str, ctx: ConfigContext, path: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ctx.error(path, f"invalid regex: {exc}") from None


def _parse_route(raw: object, ctx: ConfigContext, path: str, index: int) -> RouteConfig:
    d = _mapping(raw, ctx, path)
    _check_keys(
        d,
        {"name", "match", "cluster", "timeout", "prefix_rewrite", "host_rewrite", "direct_response"},
        ctx,
        path,
    )
    m = _mapping(d.get("match", {"prefix": "/"}), ctx, f"{path}.match")
    _check_keys(m, {"prefix", "exact", "path", "regex", "headers"}, ctx, f"{path}.match")
    kinds = [k for k in ("prefix", "exact", "path", "regex") if k in m]
    if len(kinds) != 1:
        raise ctx.error(f"{path}.match", "set exactly one of prefix, exact (or path), regex")
    regex = m.get("regex")
    if regex is not None:
        _compile_regex(_str(regex, ctx, f"{path}.match.regex"), ctx, f"{path}.match.regex")
    exact = m.get("exact", m.get("path"))
    headers = tuple(
        _parse_header_match(h, ctx, f"{path}.match.headers[{i}]")
        for i, h in enumerate(_list(m.get("headers", []), ctx, f"{path}.match.headers"))
    )
    match = RouteMatch(
        prefix=_str(m["prefix"], ctx, f"{path}.match.prefix", allow_empty=True) if "prefix" in m else None,
        exact=_str(exact, ctx, f"{path}.match.{kinds[0]}") if exact is not None else None,
        regex=regex,
        headers=headers,
    )
    direct: DirectResponse | None = None
    if "direct_response" in d:
        dr = _mapping(d["direct_response"], ctx, f"{path}.direct_response")
        _check_keys(dr, {"status", "body"}, ctx, f"{path}.direct_response")
        status = dr.get("status")
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ctx.error(f"{path}.direct_response.status", "expected an HTTP status 100-599")
        direct = DirectResponse(
            status, _str(dr.get("body", ""), ctx, f"{path}.direct_response.body", allow_empty=True)
        )
    cluster = d.get("cluster")
    if cluster is None and direct is None:
        raise ctx.error(f"{path}.cluster", "required (or give direct_response)")
    return RouteConfig(
        name=_str(d.get("name", f"route-{index}"), ctx, f"{path}.name"),
        match=match,
        cluster=_str(cluster, ctx, f"{path}.cluster") if cluster is not None else None,
        timeout_s=parse_duration(d.get("timeout", DEFAULT_ROUTE_TIMEOUT_S), ctx, f"{path}.timeout"),
        prefix_rewrite=_str(d["prefix_rewrite"], ctx, f"{path}.prefix_rewrite", allow_empty=True)
        if "prefix_rewrite" in d
        else None,
        host_rewrite=_str(d["host_rewrite"], ctx, f"{path}.host_rewrite") if "host_rewrite" in d else None,
        direct_response=direct,
    )


def _parse_domain(raw: object, ctx: ConfigContext, path: str) -> str:
    domain = _str(raw, ctx, path).lower()
    if domain != "*" and (
        domain.count("*") > 1 or ("*" in domain and not (domain[0] == "*" or domain[-1] == "*"))
    ):
        raise ctx.error(path, f"wildcard must be a prefix or suffix of the domain, got {domain!r}")
    return domain


def _parse_virtual_host(raw: object, ctx: ConfigContext, path: str, index: int) -> VirtualHostConfig:
    d = _mapping(raw, ctx, path)
    _check_keys(d, {"name", "domains", "routes"}, ctx, path)
    domains = tuple(
        _parse_domain(x, ctx, f"{path}.domains[{i}]")
        for i, x in enumerate(_list(d.get("domains", ["*"]), ctx, f"{path}.domains"))
    )
    routes = tuple(
        _parse_route(r, ctx, f"{path}.routes[{i}]", i)
        for i, r in enumerate(_list(d.get("routes"), ctx, f"{path}.routes"))
    )
    return VirtualHostConfig(
        name=_str(d.get("name", f"vhost-{index}"), ctx, f"{path}.name"), domains=domains, routes=routes
    )


# OpenSSL's short names, which Envoy's RFC 2253 subjects use; Python's ssl reports the long ones.
_RDN_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "streetAddress": "street",
    "userId": "UID",
    "givenName": "GN",
    "surname": "SN",
}


def _escape_rdn_value(value: str) -> str:
    escaped = "".join("\\" + ch if ch in ',+"\\<>;' else ch for ch in value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped


def certificate_names(decoded: dict[str, Any]) -> CertificateNames:
    """Subject (RFC 2253: most specific RDN first, e.g. "CN=client,O=example") and SANs of a
    certificate as Python's ssl module decodes it (``getpeercert()``)."""
    rdns = decoded.get("subject", ())
    subject = ",".join(
        "+".join(f"{_RDN_SHORT_NAMES.get(k, k)}={_escape_rdn_value(v)}" for k, v in rdn)
        for rdn in reversed(rdns)
    )
    sans = decoded.get("subjectAltName", ())
    return CertificateNames(
        subject=subject,
        dns_sans=tuple(v for k, v in sans if k == "DNS"),
        uri_sans=tuple(v for k, v in sans if k == "URI"),
    )


_ALPN_SERVED = ("http/1.1", "http/1.0")


def _tls_path(d: dict[str, Any], key: str, ctx: ConfigContext, path: str, base_dir: Path) -> str:
    target = Path(_str(d.get(key), ctx, f"{path}.{key}"))
    if not target.is_absolute():
        target = base_dir / target
    if not target.is_file():
        raise ctx.error(f"{path}.{key}", f"no such file: {target}")
    try:
        with open(target, "rb"):
            pass
    except OSError as exc:
        raise ctx.error(f"{path}.{key}", f"cannot read {target}: {exc.strerror or exc}") from None
    return str(target)


def _decode_certificate(cert_path: str, ctx: ConfigContext, path: str) -> dict[str, Any]:
    # The ssl module has no public PEM decoder; this one (used by CPython's own tests) needs no
    # extra dependency. Without it the local-certificate attributes stay empty.
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # pragma: no cover - present in CPython 3.11-3.13
        return {}
    try:
        decoded = decode(cert_path)
    except (ssl.SSLError, ValueError) as exc:
        raise ctx.error(path, f"not a PEM certificate: {cert_path} ({_one_line(exc)})") from None
    return decoded if isinstance(decoded, dict) else {}


def _parse_tls(raw: object, ctx: ConfigContext, path: str, base_dir: Path) -> TlsConfig:
    d = _mapping(raw, ctx, path)
    _check_keys(d, {"certificate", "private_key", "client_ca", "alpn"}, ctx, path)
    certificate = _tls_path(d, "certificate", ctx, path, base_dir)
    private_key = _tls_path(d, "private_key", ctx, path, base_dir)
    client_ca = _tls_path(d, "client_ca", ctx, path, base_dir) if d.get("client_ca") is not None else None
    alpn = tuple(
        _str(a, ctx, f"{path}.alpn[{i}]") for i, a in enumerate(_list(d.get("alpn", []), ctx, f"{path}.alpn"))
    )
    for i, protocol in enumerate(alpn):
        if protocol not in _ALPN_SERVED:
            raise ctx.error(
                f"{path}.alpn[{i}]", f"{protocol!r} is not served (HTTP/1 only: {', '.join(_ALPN_SERVED)})"
            )
    local = certificate_names(_decode_certificate(certificate, ctx, f"{path}.certificate"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, private_key)
    except (ssl.SSLError, ValueError) as exc:
        raise ctx.error(
            f"{path}.private_key",
            f"{private_key} is not a PEM private key matching {certificate} ({_one_line(exc)})",
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, ValueError) as exc:
            raise ctx.error(
                f"{path}.client_ca", f"no PEM CA certificate in {client_ca} ({_one_line(exc)})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return TlsConfig(
        certificate=certificate,
        private_key=private_key,
        context=context,
        client_ca=client_ca,
        alpn=alpn,
        local=local,
    )


_DIRECTIONS = {"UNSPECIFIED": 0, "INBOUND": 1, "OUTBOUND": 2}


def _parse_listener(
    raw: object, ctx: ConfigContext, path: str, index: int, base_dir: Path | None = None
) -> ListenerConfig:
    d = _mapping(raw, ctx, path)
    _check_keys(
        d,
        {
            "name",
            "address",
            "port",
            "virtual_hosts",
            "plugins",
            "use_remote_address",
            "generate_request_id",
            "direction",
            "tls",
            *_LISTENER_LIMIT_KEYS,
        },
        ctx,
        path,
    )
    if "port" not in d:
        raise ctx.error(f"{path}.port", "required")
    vhosts = tuple(
        _parse_virtual_host(v, ctx, f"{path}.virtual_hosts[{i}]", i)
        for i, v in enumerate(_list(d.get("virtual_hosts"), ctx, f"{path}.virtual_hosts"))
    )
    plugins: tuple[str, ...] | None = None
    if d.get("plugins") is not None:
        plugins = tuple(
            _str(p, ctx, f"{path}.plugins[{i}]")
            for i, p in enumerate(_list(d["plugins"], ctx, f"{path}.plugins"))
        )
    direction = str(d.get("direction", "UNSPECIFIED")).upper()
    if direction not in _DIRECTIONS:
        raise ctx.error(f"{path}.direction", f"expected one of {', '.join(_DIRECTIONS)}")
    return ListenerConfig(
        name=_str(d.get("name", f"listener-{index}"), ctx, f"{path}.name"),
        address=_str(d.get("address", "127.0.0.1"), ctx, f"{path}.address"),
        port=_port(d["port"], ctx, f"{path}.port"),
        virtual_hosts=vhosts,
        plugins=plugins,
        use_remote_address=_bool(d.get("use_remote_address", True), ctx, f"{path}.use_remote_address"),
        generate_request_id=_bool(d.get("generate_request_id", True), ctx, f"{path}.generate_request_id"),
        direction=_DIRECTIONS[direction],
        tls=_parse_tls(d["tls"], ctx, f"{path}.tls", base_dir or Path.cwd())
        if d.get("tls") is not None
        else None,
        max_request_headers_kb=_int_in(
            d.get("max_request_headers_kb", DEFAULT_MAX_REQUEST_HEADERS_KB),
            1,
            MAX_HEADERS_KB_CAP,
            ctx,
            f"{path}.max_request_headers_kb",
        ),  # fmt: skip
        max_headers_count=_int_in(
            d.get("max_headers_count", DEFAULT_MAX_HEADERS_COUNT),
            1,
            1_000_000,
            ctx,
            f"{path}.max_headers_count",
        ),  # fmt: skip
        request_headers_timeout_s=parse_duration(
            d.get("request_headers_timeout", DEFAULT_REQUEST_HEADERS_TIMEOUT_S),
            ctx,
            f"{path}.request_headers_timeout",
        ),  # fmt: skip
        idle_timeout_s=parse_duration(
            d.get("idle_timeout", DEFAULT_DOWNSTREAM_IDLE_TIMEOUT_S), ctx, f"{path}.idle_timeout"
        ),
        max_connections=_int_in(d.get("max_connections", 0), 0, 10_000_000, ctx, f"{path}.max_connections"),
        accept_http_10=_bool(d.get("accept_http_10", False), ctx, f"{path}.accept_http_10"),
    )


def _parse_cluster(raw: object, ctx: ConfigContext, path: str) -> ClusterConfig:
    d = _mapping(raw, ctx, path)
    _check_keys(
        d,
        {
            "name",
            "endpoints",
            "connect_timeout",
            "idle_timeout",
            "max_idle_per_endpoint",
            "max_response_headers_kb",
            "max_headers_count",
        },
        ctx,
        path,
    )
    endpoints: list[tuple[str, int]] = []
    for i, e in enumerate(_list(d.get("endpoints"), ctx, f"{path}.endpoints")):
        epath = f"{path}.endpoints[{i}]"
        if isinstance(e, str):
            endpoints.append(parse_host_port(e, ctx, epath))
        else:
            em = _mapping(e, ctx, epath)
            _check_keys(em, {"address", "port"}, ctx, epath)
            endpoints.append(
                (
                    _str(em.get("address"), ctx, f"{epath}.address"),
                    _port(em.get("port"), ctx, f"{epath}.port"),
                )
            )
    if not endpoints:
        raise ctx.error(f"{path}.endpoints", "at least one endpoint is required")
    max_idle = d.get("max_idle_per_endpoint", DEFAULT_MAX_IDLE_PER_ENDPOINT)
    if isinstance(max_idle, bool) or not isinstance(max_idle, int) or max_idle < 0:
        raise ctx.error(f"{path}.max_idle_per_endpoint", "expected a non-negative integer")
    return ClusterConfig(
        name=_str(d.get("name"), ctx, f"{path}.name"),
        endpoints=tuple(endpoints),
        connect_timeout_s=parse_duration(
            d.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S), ctx, f"{path}.connect_timeout"
        ),
        idle_timeout_s=parse_duration(
            d.get("idle_timeout", DEFAULT_IDLE_TIMEOUT_S), ctx, f"{path}.idle_timeout"
        ),
        max_idle_per_endpoint=max_idle,
        max_response_headers_kb=_int_in(
            d.get("max_response_headers_kb", DEFAULT_MAX_RESPONSE_HEADERS_KB),
            1,
            MAX_HEADERS_KB_CAP,
            ctx,
            f"{path}.max_response_headers_kb",
        ),  # fmt: skip
        max_headers_count=_int_in(
            d.get("max_headers_count", DEFAULT_MAX_HEADERS_COUNT),
            1,
            1_000_000,
            ctx,
            f"{path}.max_headers_count",
        ),  # fmt: skip
    )


def load_plugin_documents(path: Path, ctx: ConfigContext, field_path: str) -> list[PluginResource]:
    """WasmPlugin documents from a YAML file or every *.yaml/*.yml file of a directory."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise ctx.error(field_path, f"no such file or directory: {path}")
    out: list[PluginResource] = []
    for f in files:
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{f}: invalid YAML: {_one_line(exc)}") from None
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ConfigError(f"{f}: document {i}: expected a mapping")
            out.append(PluginResource(body=doc, source=str(f), doc_index=i))
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _parse_plugins(raw: object, ctx: ConfigContext, base_dir: Path) -> tuple[list[PluginResource], list[str]]:
    resources: list[PluginResource] = []
    watched: list[str] = []
    for i, p in enumerate(_list(raw, ctx, "plugins")):
        ppath = f"plugins[{i}]"
        d = _mapping(p, ctx, ppath)
        if set(d) == {"path"}:
            target = Path(_str(d["path"], ctx, f"{ppath}.path"))
            if not target.is_absolute():
                target = base_dir / target
            resources.extend(load_plugin_documents(target, ctx, f"{ppath}.path"))
            watched.append(str(target))
        else:
            if d.get("kind") != "WasmPlugin":
                raise ctx.error(f"{ppath}.kind", "expected WasmPlugin (or give {path: FILE})")
            resources.append(PluginResource(body=d, source=ctx.source, doc_index=i))
    return resources, watched


def parse_config(raw: object, source: str = "<inline>", base_dir: Path | None = None) -> ProxyConfig:
    ctx = ConfigContext(source)
    d = _mapping(raw, ctx, "")
    _check_keys(
        d,
        {"listeners", "clusters", "plugins", "admin", "node", "cache", "wasm", "reload", "drain_timeout"},
        ctx,
        "",
    )
    listeners = tuple(
        _parse_listener(x, ctx, f"listeners[{i}]", i, base_dir)
        for i, x in enumerate(_list(d.get("listeners"), ctx, "listeners"))
    )
    clusters = tuple(
        _parse_cluster(x, ctx, f"clusters[{i}]")
        for i, x in enumerate(_list(d.get("clusters", []), ctx, "clusters"))
    )
    seen: set[str] = set()
    for i, c in enumerate(clusters):
        if c.name in seen:
            raise ctx.error(f"clusters[{i}].name", f"duplicate cluster {c.name!r}")
        seen.add(c.name)
    seen_listeners: set[str] = set()
    for li, lst in enumerate(listeners):
        if lst.name in seen_listeners:
            raise ctx.error(f"listeners[{li}].name", f"duplicate listener {lst.name!r}")
        seen_listeners.add(lst.name)
        for vi, vh in enumerate(lst.virtual_hosts):
            for ri, r in enumerate(vh.routes):
                if r.cluster is not None and r.cluster not in seen:
                    raise ctx.error(
                        f"listeners[{li}].virtual_hosts[{vi}].routes[{ri}].cluster",
                        f"unknown cluster {r.cluster!r}",
                    )
    admin: AdminConfig | None = None
    if d.get("admin") is not None:
        a = _mapping(d["admin"], ctx, "admin")
        _check_keys(a, {"address", "port"}, ctx, "admin")
        admin = AdminConfig(
            _str(a.get("address", "127.0.0.1"), ctx, "admin.address"), _port(a.get("port"), ctx, "admin.port")
        )
    cache = CacheConfig()
    if d.get("cache") is not None:
        cache_raw = _mapping(d["cache"], ctx, "cache")
        _check_keys(cache_raw, {"dir", "insecure_registries", "allowed_file_dirs"}, ctx, "cache")
        cache = CacheConfig(
            dir=_str(cache_raw["dir"], ctx, "cache.dir") if cache_raw.get("dir") is not None else None,
            insecure_registries=tuple(
                _str(r, ctx, f"cache.insecure_registries[{i}]")
                for i, r in enumerate(
                    _list(cache_raw.get("insecure_registries", []), ctx, "cache.insecure_registries")
                )
            ),
            allowed_file_dirs=tuple(
                _str(d, ctx, f"cache.allowed_file_dirs[{i}]")
                for i, d in enumerate(
                    _list(cache_raw.get("allowed_file_dirs", []), ctx, "cache.allowed_file_dirs")
                )
            ),
        )
    reload_poll = 1.0
    if d.get("reload") is not None:
        reload_raw = _mapping(d["reload"], ctx, "reload")
        _check_keys(reload_raw, {"poll_interval"}, ctx, "reload")
        reload_poll = parse_duration(reload_raw.get("poll_interval", 1.0), ctx, "reload.poll_interval")
    wasm = parse_wasm_limits(d["wasm"], ctx) if d.get("wasm") is not None else WasmLimits()
    plugins, watched = _parse_plugins(d.get("plugins", []), ctx, base_dir or Path.cwd())
    node = _mapping(d.get("node", {}), ctx, "node")
    for lst in listeners:  # a renewed certificate on disk is a reload like any config edit
        if lst.tls is not None:
            watched += [lst.tls.certificate, lst.tls.private_key, *filter(None, [lst.tls.client_ca])]
    return ProxyConfig(
        listeners=listeners,
        clusters=clusters,
        plugins=tuple(plugins),
        admin=admin,
        node=dict(node),
        cache=cache,
        wasm=wasm,
        reload_poll_s=reload_poll,
        drain_timeout_s=parse_duration(d.get("drain_timeout", 10.0), ctx, "drain_timeout"),
        source=source,
        watched_files=tuple([source, *watched]) if source != "<inline>" else tuple(watched),
    )


def load_config(path: str | Path) -> ProxyConfig:
    """Read and validate a config file; raises ConfigError (one line) on any problem."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {_one_line(exc)}") from None
    if raw is None:
        raise ConfigError(f"{p}: empty config")
    return parse_config(raw, source=str(p), base_dir=p.parent)
