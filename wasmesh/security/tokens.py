"""Bootstrap tokens: one-identity secrets a proxy trades for its first workload certificate.

`wasmesh control-plane bootstrap-token create --state-dir DIR --namespace NS --name NAME` prints a new
token and appends `sha256(token) NS NAME EXPIRY` to DIR/tokens (0600). Only the digest is kept,
so the file does not give the tokens away; the control plane re-reads it on every CSR, so tokens
created while it runs work at once, and deleting a line revokes that token (certificates already
issued run out at their expiry, 24 h by default).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

from wasmesh.security.ca import Identity, write_private

TOKENS_FILE = "tokens"
DEFAULT_TOKEN_TTL = 365 * 24 * 3600.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    state_dir: Path, namespace: str, name: str, ttl: float = DEFAULT_TOKEN_TTL, now: float | None = None
) -> str:
    """A new token bound to (namespace, name); its digest is appended to the tokens file."""
    for field, value in (("--namespace", namespace), ("--name", name)):
        if not value or any(c.isspace() or c == "/" for c in value):
            raise ValueError(f"{field}: expected a name without spaces or '/', got {value!r}")
    token = secrets.token_urlsafe(32)
    path = state_dir / TOKENS_FILE
    existing = path.read_bytes() if path.exists() else b""
    expiry = int((now if now is not None else time.time()) + ttl)
    write_private(path, existing + f"{_digest(token)} {namespace} {name} {expiry}\n".encode())
    return token


def identity_for_token(
    state_dir: Path, token: str, trust_domain: str, now: float | None = None
) -> Identity | None:
    """The identity a token is bound to, or None (unknown, malformed line or expired)."""
    path = state_dir / TOKENS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    wanted = _digest(token)
    moment = now if now is not None else time.time()
    for line in lines:
        fields = line.split()
        if len(fields) != 4 or not fields[3].isdigit():
            continue
        if hmac.compare_digest(fields[0], wanted) and int(fields[3]) > moment:
            return Identity(trust_domain, fields[1], fields[2])
    return None
