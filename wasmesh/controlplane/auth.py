"""Who may call the control plane API: bearer tokens with roles, and the API's TLS serving cert.

Roles (kubectl-like, one per token):
    admin   every verb on every route, in every namespace
    editor  get/list/create/patch/delete in the token's namespaces (`*` = every namespace)
    viewer  get/list in the token's namespaces; /metrics

Tokens are random (32 bytes, `wmt_<id>.<secret>` in URL-safe base64); the state dir's
`tokens.json` (mode 0600) holds only their sha256, compared in constant time, with expiry and
revocation. The file is re-read when it changes, so `wasmesh control-plane token revoke` takes
effect on a running control plane at its next request.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wasmesh.controlplane.audit import AUDIT_FILE, AuditLog

log = logging.getLogger("wasmesh.controlplane")

ROLES = ("admin", "editor", "viewer")
READ_VERBS = frozenset({"get", "list"})
WRITE_VERBS = frozenset({"create", "patch", "delete"})
ALL_NAMESPACES = "*"
TOKENS_FILE = "tokens.json"
ADMIN_TOKEN_FILE = "admin-token"
API_CERT_FILE = "api.crt"
API_KEY_FILE = "api.key"
_TOKEN_FORMAT = re.compile(r"^wmt_([A-Za-z0-9_-]{8,64})\.([A-Za-z0-9_-]{16,256})$")


class AuthError(ValueError):
    """A token operation cannot be done; the message is one line."""


@dataclass(frozen=True)
class Identity:
    """The authenticated caller of one request."""

    user: str
    role: str
    namespaces: tuple[str, ...] = ()
    token_id: str = ""

    def may(self, verb: str, namespace: str | None) -> bool:
        """Whether this caller may do `verb` in `namespace` (None: across every namespace)."""
        if self.role == "admin":
            return True
        allowed = READ_VERBS | (WRITE_VERBS if self.role == "editor" else frozenset())
        if verb not in allowed:
            return False
        if ALL_NAMESPACES in self.namespaces:
            return True
        return namespace is not None and namespace in self.namespaces


# The control plane started with --insecure-api: every caller is an admin nobody authenticated.
ANONYMOUS_ADMIN = Identity("system:anonymous", "admin", (ALL_NAMESPACES,))


@dataclass
class TokenRecord:
    id: str
    user: str
    role: str
    namespaces: list[str]
    created: float
    expires: float | None
    revoked: float | None = None
    sha256: str = field(default="", repr=False)

    def state(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def identity(self) -> Identity:
        return Identity(self.user, self.role, tuple(self.namespaces), self.id)


def parse_ttl(text: str) -> float:
    """`90s`, `15m`, `24h`, `7d` (or a combination like `1h30m`) → seconds."""
    match = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if not text.strip() or match is None:
        raise AuthError(f"--ttl: invalid duration {text!r} (use e.g. 30m, 24h, 7d)")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise AuthError(f"--ttl: duration {text!r} must be positive")
    return float(total)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by the owner only (0600) from the first byte."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


class TokenStore:
    """The state dir's tokens.json: create, list, revoke, authenticate."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / TOKENS_FILE
        self._records: list[TokenRecord] = []
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()  # GETs authenticate on the loop, POSTs in worker threads

    def exists(self) -> bool:
        return self.path.exists()

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._records, self._seen = [], None
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
            records = [TokenRecord(**item) for item in payload.get("tokens", [])]
        except (OSError, ValueError, TypeError) as exc:
            self._seen = seen  # report a broken file once, not on every request
            raise AuthError(f"{self.path}: unreadable token file: {exc}") from None
        self._records, self._seen = records, seen

    def _save(self) -> None:
        payload = {"tokens": [asdict(record) for record in self._records]}
        write_private(self.path, json.dumps(payload, indent=2) + "\n")
        self._seen = None

    def records(self) -> list[TokenRecord]:
        self._reload()
        return list(self._records)

    def create(
        self, user: str, role: str, namespaces: Iterable[str] = (), ttl: float | None = None
    ) -> tuple[TokenRecord, str]:
        """A new token; returns its record and its value (shown once, never stored)."""
        if not user or not re.fullmatch(r"[A-Za-z0-9@._:-]{1,128}", user):
            raise AuthError(f"--user: invalid user name {user!r} (letters, digits, @ . _ : -)")
        if role not in ROLES:
            raise AuthError(f"--role: unknown role {role!r} (one of {', '.join(ROLES)})")
        spaces = sorted(set(namespaces))
        if role != "admin" and not spaces:
            raise AuthError(f"--namespace: a {role} token needs at least one namespace (or '*')")
        if role == "admin" and spaces:
            raise AuthError("--namespace: an admin token is valid in every namespace; omit --namespace")
        self._reload()
        token_id = secrets.token_hex(6)
        value = f"wmt_{token_id}.{secrets.token_urlsafe(32)}"
        now = time.time()
        record = TokenRecord(
            token_id, user, role, spaces, now, None if ttl is None else now + ttl, None, _digest(value)
        )
        self._records.append(record)
        self._save()
        return record, value

    def revoke(self, token_id: str) -> TokenRecord:
        self._reload()
        for record in self._records:
            if record.id == token_id:
                if record.revoked is None:
                    record.revoked = time.time()
                    self._save()
                return record
        raise AuthError(f'token "{token_id}" not found')

    def authenticate(self, value: str) -> tuple[Identity | None, str]:
        """(identity, "") for a valid token, else (None, why) — why never repeats the token."""
        with self._lock:
            try:
                self._reload()
            except AuthError as exc:  # a half-edited file must not lock everyone out: keep the last good
                log.warning("%s; still using the tokens read before", exc)
            records = list(self._records)
        if _TOKEN_FORMAT.match(value) is None:
            return None, "invalid bearer token"
        presented = _digest(value)
        found: TokenRecord | None = None
        for record in records:  # compare every record, in constant time each
            if hmac.compare_digest(presented, record.sha256):
                found = record
        if found is None:
            return None, "invalid bearer token"
        state = found.state(time.time())
        if state != "active":
            return None, f"token {found.id} is {state}"
        return found.identity(), ""


def ensure_admin_token(state_dir: Path) -> Path | None:
    """On first start (no token file yet), create an admin token into a 0600 file; returns its path."""
    store = TokenStore(state_dir)
    if store.exists():
        return None
    _record, value = store.create("admin", "admin")
    path = state_dir / ADMIN_TOKEN_FILE
    write_private(path, value + "\n")
    return path


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def ensure_serving_cert(state_dir: Path, host: str) -> tuple[Path, Path]:
    """A self-signed serving cert for the API (kept in the state dir, made once) for `host`."""
    cert_path, key_path = state_dir / API_CERT_FILE, state_dir / API_KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for address in {"127.0.0.1", "::1", host}:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wasmesh-control-plane")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(key_path, key_pem.decode())
    write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM).decode())
    return cert_path, key_path


def server_ssl_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """The API's TLS (1.2+) context for a serving cert and key (PEM files)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_path), str(key_path))
    except (OSError, ssl.SSLError) as exc:
        raise AuthError(f"--api-cert/--api-key: cannot load {cert_path} / {key_path}: {exc}") from None
    return context


def describe_record(record: TokenRecord, now: float) -> dict[str, Any]:
    """A token as `token list` shows it (never its value or hash)."""

    def moment(value: float | None) -> str:
        if value is None:
            return "<never>"
        return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    return {
        "id": record.id,
        "user": record.user,
        "role": record.role,
        "namespaces": ",".join(record.namespaces) or "*",
        "expires": moment(record.expires),
        "state": record.state(now),
    }


# kubectl names a type by its plural and API group ("wasmplugins.extensions.istio.io"); Secrets
# are in the core group ("").
API_GROUPS = {
    "WasmPlugin": "extensions.istio.io",
    "Secret": "",
    "Workload": "wasmesh.io",
    "Gateway": "wasmesh.io",
}


def api_group(kind: str) -> str:
    return API_GROUPS.get(kind, "wasmesh.io")


def plural(kind: str) -> str:
    return f"{kind.lower()}s"


def forbidden_message(identity: Identity, verb: str, kind: str, namespace: str | None, name: str = "") -> str:
    """The Kubernetes API server's RBAC denial, word for word."""
    group = api_group(kind)
    qualified = f"{plural(kind)}.{group}" if group else plural(kind)
    subject = f'{qualified} "{name}"' if name else qualified
    where = f'in the namespace "{namespace}"' if namespace is not None else "at the cluster scope"
    return (
        f'{subject} is forbidden: User "{identity.user}" cannot {verb} resource "{plural(kind)}" '
        f'in API group "{group}" {where}'
    )


@dataclass
class ApiSecurity:
    """How the API is served: TLS context (None: plain HTTP), tokens (None: no authentication), audit."""

    ssl_context: ssl.SSLContext | None
    tokens: TokenStore | None
    audit: AuditLog | None

    @classmethod
    def from_state_dir(
        cls,
        state_dir: Path,
        host: str,
        cert: Path | None = None,
        key: Path | None = None,
        insecure: bool = False,
    ) -> ApiSecurity:
        """TLS (the given cert, else a self-signed one in the state dir) + tokens + audit; or, with
        `insecure`, plain HTTP without authentication (still audited)."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        audit = AuditLog(state_dir / AUDIT_FILE)
        if insecure:
            return cls(None, None, audit)
        if (cert is None) != (key is None):
            raise AuthError("--api-cert and --api-key must be given together")
        if cert is None or key is None:
            cert, key = ensure_serving_cert(state_dir, host)
        return cls(server_ssl_context(cert, key), TokenStore(state_dir), audit)
