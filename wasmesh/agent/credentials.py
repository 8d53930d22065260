"""Registry credentials from Docker ``config.json`` / ``imagePullSecret`` (dockerconfigjson) bytes.

Parsing only: no network. Supported per-registry fields are ``auth`` (base64 ``user:password``),
``username``/``password``, ``identitytoken`` (OAuth2 refresh token) and ``registrytoken`` (a ready
bearer token). Credential helpers (``credsStore``/``credHelpers``) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

DOCKER_HUB_REGISTRY = "index.docker.io"
# The key `docker login` writes for Docker Hub.
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"


class CredentialsError(ValueError):
    """A config.json or pull secret cannot be understood; the message names the source and field."""


@dataclass(frozen=True)
class RegistryCredential:
    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    @property
    def is_anonymous(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)


ANONYMOUS = RegistryCredential()


def _normalize_registry_key(key: str) -> str:
    """``https://host:5000/v2/`` -> ``host:5000``; Docker Hub's many spellings -> index.docker.io."""
    host = key.strip()
    for prefix in ("https://", "http://"):
        if host.startswith(prefix):
            host = host[len(prefix) :]
    host = host.split("/", 1)[0].lower()
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        return DOCKER_HUB_REGISTRY
    return host


@dataclass(frozen=True)
class DockerConfig:
    credentials_by_registry: dict[str, RegistryCredential]

    def lookup(self, registry: str) -> RegistryCredential:
        """Credentials for ``registry`` (host[:port]); anonymous if the config has none."""
        return self.credentials_by_registry.get(_normalize_registry_key(registry), ANONYMOUS)


EMPTY_CONFIG = DockerConfig({})


def _string_field(entry: dict[str, object], field: str, where: str) -> str:
    value = entry.get(field, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CredentialsError(f"{where}.{field}: expected a string, got {type(value).__name__}")
    return value


def parse_docker_config(data: bytes | str, source: str) -> DockerConfig:
    """Parse config.json / dockerconfigjson content; ``source`` names it in errors."""
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"{source}: invalid JSON: {exc}") from None
    if document is None:
        raise CredentialsError(f"{source}: docker config is null")
    if not isinstance(document, dict):
        raise CredentialsError(f"{source}: expected a JSON object, got {type(document).__name__}")
    auths = document.get("auths", {})
    if auths is None:
        auths = {}
    if not isinstance(auths, dict):
        raise CredentialsError(f"{source}: auths: expected an object, got {type(auths).__name__}")
    credentials: dict[str, RegistryCredential] = {}
    for key, entry in auths.items():
        where = f"{source}: auths.{key}"
        if not isinstance(entry, dict):
            raise CredentialsError(f"{where}: expected an object, got {type(entry).__name__}")
        username = _string_field(entry, "username", where)
        password = _string_field(entry, "password", where)
        encoded = _string_field(entry, "auth", where)
        if encoded:
            try:
                decoded = base64.b64decode(encoded, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise CredentialsError(f"{where}.auth: not valid base64 of user:password") from None
            user, separator, secret = decoded.partition(":")
            if not separator:
                raise CredentialsError(f"{where}.auth: decoded value has no ':' between user and password")
            username, password = user, secret
        credentials[_normalize_registry_key(key)] = RegistryCredential(
            username=username,
            password=password,
            identity_token=_string_field(entry, "identitytoken", where),
            registry_token=_string_field(entry, "registrytoken", where),
        )
    return DockerConfig(credentials)


def default_docker_config_path() -> Path:
    directory = os.environ.get("DOCKER_CONFIG")
    return Path(directory) / "config.json" if directory else Path.home() / ".docker" / "config.json"


def load_docker_config(directory: Path | None = None) -> DockerConfig:
    """The Docker keychain: ``<dir>/config.json`` (default $DOCKER_CONFIG or ~/.docker); empty if absent."""
    path = directory / "config.json" if directory is not None else default_docker_config_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return EMPTY_CONFIG
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_docker_config(data, str(path))
