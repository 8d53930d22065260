"""Cache and fetch options, with Istio's defaults and environment variable names (pkg/wasm/options.go)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wasmesh.agent.ssrf import BLOCKED_CIDRS_ENV, AddressPolicy, IPNetwork, parse_blocked_cidrs

DEFAULT_MODULE_EXPIRY_S = 24 * 3600.0
DEFAULT_PURGE_INTERVAL_S = 3600.0
DEFAULT_HTTP_TIMEOUT_S = 15.0
DEFAULT_HTTP_MAX_RETRIES = 5
DEFAULT_MAX_MODULE_BYTES = 256 << 20
# What a single get() may take in total when the caller gives no deadline; istiod always sets
# the HttpUri timeout to 30 s and the agent uses that as the overall fetch deadline.
DEFAULT_GET_TIMEOUT_S = 30.0
DEFAULT_CACHE_DIR = Path("/var/lib/istio/data")

PULL_POLICIES = ("UNSPECIFIED_POLICY", "IfNotPresent", "Always")
INSECURE_REGISTRIES_ENV = "WASM_INSECURE_REGISTRIES"


def split_hosts(values: Iterable[str]) -> frozenset[str]:
    """Hosts of repeatable, comma-separated values (``["a:5000,b", "c"]``); blanks are dropped."""
    return frozenset(host.strip() for value in values for host in value.split(",") if host.strip())


def insecure_registries_from(flag_values: Iterable[str], env: Mapping[str, str]) -> frozenset[str]:
    """``--insecure-registry`` values together with istio-agent's ``WASM_INSECURE_REGISTRIES``.

    Both are allow-lists, so they add up (a flag never narrows what the environment allows).
    """
    return split_hosts(flag_values) | split_hosts([env.get(INSECURE_REGISTRIES_ENV, "")])


def add_allowed_file_dir_flag(parser: argparse.ArgumentParser) -> None:
    """``--allowed-file-dir DIR`` (repeatable), spelled the same by every command that fetches modules."""
    parser.add_argument(
        "--allowed-file-dir",
        dest="allowed_file_dir",
        action="append",
        default=[],
        metavar="DIR",
        help="only read file:// modules from under DIR (repeatable; symlinks and .. are resolved "
        "first). Default: any readable file, as Istio",
    )


def add_insecure_registry_flag(parser: argparse.ArgumentParser) -> None:
    """``--insecure-registry HOST[,HOST...]`` (repeatable), spelled the same by every command."""
    parser.add_argument(
        "--insecure-registry",
        "--insecure-registries",  # the agent's earlier spelling, kept as an alias
        dest="insecure_registry",
        action="append",
        default=[],
        metavar="HOST",
        help="registry reached over plain HTTP or unverified TLS (repeatable, comma lists, '*' = all; "
        f"adds to ${INSECURE_REGISTRIES_ENV}). localhost, 127.0.0.1, ::1 and RFC 1918 addresses "
        "need none: they get plain HTTP after HTTPS",
    )


@dataclass(frozen=True)
class CacheOptions:
    """Everything the module cache and its fetchers can be tuned with.

    Zero or negative numbers mean "use Istio's default" (Istio's ``cacheOptions.sanitize``).
    """

    dir: Path = DEFAULT_CACHE_DIR
    insecure_registries: frozenset[str] = field(default_factory=frozenset)
    module_expiry_s: float = DEFAULT_MODULE_EXPIRY_S
    purge_interval_s: float = DEFAULT_PURGE_INTERVAL_S
    http_timeout_s: float = DEFAULT_HTTP_TIMEOUT_S
    http_max_retries: int = DEFAULT_HTTP_MAX_RETRIES
    max_module_bytes: int = DEFAULT_MAX_MODULE_BYTES
    # First retry delay of the http fetcher; tests shrink it, production keeps Istio's 500 ms.
    http_initial_backoff_s: float = 0.5
    # Where Docker credentials are read when a request carries no pull secret; None = $DOCKER_CONFIG
    # or ~/.docker, resolved at request time.
    docker_config_dir: Path | None = None
    # Base of relative ``file://`` URLs (``file://plugins/x.wasm``); None rejects relative file URLs.
    file_base_dir: Path | None = None
    # ``file://`` modules must resolve (symlinks, ``..``) to a path under one of these; empty = any
    # file, as Istio.
    allowed_file_dirs: tuple[Path, ...] = ()
    # Refused on top of the always-blocked link-local and cloud-metadata ranges. None = read
    # BLOCKED_CIDRS_IN_WASM_FETCH from the process environment.
    blocked_cidrs: tuple[IPNetwork, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))
        object.__setattr__(self, "insecure_registries", frozenset(self.insecure_registries))
        object.__setattr__(self, "allowed_file_dirs", tuple(Path(d) for d in self.allowed_file_dirs))
        if self.blocked_cidrs is None:
            object.__setattr__(
                self, "blocked_cidrs", parse_blocked_cidrs(os.environ.get(BLOCKED_CIDRS_ENV, ""))
            )
        defaults = {
            "module_expiry_s": DEFAULT_MODULE_EXPIRY_S,
            "purge_interval_s": DEFAULT_PURGE_INTERVAL_S,
            "http_timeout_s": DEFAULT_HTTP_TIMEOUT_S,
            "http_max_retries": DEFAULT_HTTP_MAX_RETRIES,
            "max_module_bytes": DEFAULT_MAX_MODULE_BYTES,
        }
        for name, default in defaults.items():
            if getattr(self, name) <= 0:
                object.__setattr__(self, name, default)

    @property
    def address_policy(self) -> AddressPolicy:
        """Where module fetches may connect: never link-local/metadata, nor ``blocked_cidrs``."""
        return AddressPolicy(self.blocked_cidrs or ())

    def allow_insecure(self, host: str) -> bool:
        """Whether ``host`` (``name`` or ``name:port``) may be reached over plain HTTP / unverified TLS."""
        return "*" in self.insecure_registries or host in self.insecure_registries

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None
    ) -> CacheOptions:
        """Options from Istio's agent variables (WASM_INSECURE_REGISTRIES, WASM_MODULE_EXPIRY, ...).

        Durations accept Go syntax (``24h``, ``500ms``, ``1h30m``) or plain seconds.
        """
        source = os.environ if env is None else env
        values: dict[str, object] = {"blocked_cidrs": parse_blocked_cidrs(source.get(BLOCKED_CIDRS_ENV, ""))}
        if INSECURE_REGISTRIES_ENV in source:
            values["insecure_registries"] = split_hosts([source[INSECURE_REGISTRIES_ENV]])
        durations = {
            "WASM_MODULE_EXPIRY": "module_expiry_s",
            "WASM_PURGE_INTERVAL": "purge_interval_s",
            "WASM_HTTP_REQUEST_TIMEOUT": "http_timeout_s",
        }
        for variable, attribute in durations.items():
            if source.get(variable):
                values[attribute] = parse_duration_s(source[variable], variable)
        for variable, attribute in (
            ("WASM_HTTP_REQUEST_MAX_RETRIES", "http_max_retries"),
            ("ISTIO_WASM_MAX_BINARY_SIZE_BYTES", "max_module_bytes"),
        ):
            if source.get(variable):
                try:
                    values[attribute] = int(source[variable])
                except ValueError:
                    raise ValueError(f"{variable}: not an integer: {source[variable]!r}") from None
        values.update(overrides or {})
        return cls(**values)  # type: ignore[arg-type]


_DURATION_UNITS_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(text: str, what: str = "duration") -> float:
    """Seconds in a Go duration string (``1h30m``, ``500ms``) or a bare number of seconds."""
    stripped = text.strip()
    try:
        return float(stripped)
    except ValueError:
        pass
    total = 0.0
    position = 0
    while position < len(stripped):
        start = position
        while position < len(stripped) and (stripped[position].isdigit() or stripped[position] == "."):
            position += 1
        number = stripped[start:position]
        unit_start = position
        while position < len(stripped) and not (stripped[position].isdigit() or stripped[position] == "."):
            position += 1
        unit = stripped[unit_start:position]
        if not number or unit not in _DURATION_UNITS_S:
            raise ValueError(f"{what}: invalid duration {text!r} (examples: 24h, 90s, 500ms)")
        total += float(number) * _DURATION_UNITS_S[unit]
    if position == 0:
        raise ValueError(f"{what}: invalid duration {text!r} (examples: 24h, 90s, 500ms)")
    return total
