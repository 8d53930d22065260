"""The CLI's kubeconfig-like client config: contexts with a server URL, its CA and a token.

`~/.wasmesh/config` (or `$WASMESH_CONFIG`), YAML, mode 0600:

    current-context: local
    contexts:
    - name: local
      server: https://127.0.0.1:15014
      certificate-authority: /path/to/api.crt     # or certificate-authority-data: <PEM>
      token: wmt_...
      insecure-skip-tls-verify: false

Command-line flags (--server, --token, --certificate-authority, --insecure-skip-tls-verify,
--context) override the context, as kubectl's do.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wasmesh.controlplane.auth import write_private

CONFIG_ENV = "WASMESH_CONFIG"


class ConfigError(ValueError):
    """The client config cannot be used; the message is one line naming the file or context."""


def config_path() -> Path:
    configured = os.environ.get(CONFIG_ENV)
    return Path(configured) if configured else Path.home() / ".wasmesh" / "config"


def load_config(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    if not path.exists():
        return {"current-context": "", "contexts": []}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the client config: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("contexts", []), list):
        raise ConfigError(f"{path}: expected a mapping with a `contexts` list")
    loaded.setdefault("contexts", [])
    loaded.setdefault("current-context", "")
    return loaded


def save_config(config: dict[str, Any], path: Path | None = None) -> None:
    write_private(path or config_path(), yaml.safe_dump(config, sort_keys=False))


def find_context(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for context in config["contexts"]:
        if isinstance(context, dict) and context.get("name") == name:
            return context
    return None


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """What `wasmesh config view` prints: tokens hidden, as `kubectl config view` does."""
    contexts = []
    for context in config["contexts"]:
        shown = dict(context)
        if shown.get("token"):
            shown["token"] = "REDACTED"
        if shown.get("certificate-authority-data"):
            shown["certificate-authority-data"] = "DATA+OMITTED"
        contexts.append(shown)
    return {**config, "contexts": contexts}


@dataclass(frozen=True)
class Connection:
    """Where and how the CLI talks to the control plane API."""

    server: str
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None


def connection(
    server: str | None,
    token: str | None,
    certificate_authority: str | None,
    insecure_skip_tls_verify: bool,
    context_name: str | None,
    default_server: str,
) -> Connection:
    """Flags over the (current or named) context over the default."""
    config = load_config()
    name = context_name or config.get("current-context") or ""
    context: dict[str, Any] = {}
    if name:
        found = find_context(config, name)
        if found is None:
            raise ConfigError(f'{config_path()}: context "{name}" not found')
        context = found
    url = server or str(context.get("server") or default_server)
    bearer = token or (str(context["token"]) if context.get("token") else None)
    if not url.startswith("https://"):
        return Connection(url, bearer, None)
    skip = insecure_skip_tls_verify or (server is None and bool(context.get("insecure-skip-tls-verify")))
    tls = ssl.create_default_context()
    if skip:
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        return Connection(url, bearer, tls)
    try:
        if certificate_authority:
            tls = ssl.create_default_context(cafile=certificate_authority)
        elif context.get("certificate-authority-data"):
            tls = ssl.create_default_context(cadata=str(context["certificate-authority-data"]))
        elif context.get("certificate-authority"):
            tls = ssl.create_default_context(cafile=str(context["certificate-authority"]))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"certificate authority: cannot load it: {exc}") from None
    return Connection(url, bearer, tls)
