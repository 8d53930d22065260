"""The control plane's certificate authority (istiod's built-in CA) and SPIFFE identities.

The root is an ECDSA P-256 self-signed certificate, generated on first start into the state
directory (`ca-cert.pem`, `ca-key.pem`, the key written 0600) or loaded from --ca-cert/--ca-key.
Workload certificates carry exactly one URI SAN, `spiffe://<trust-domain>/ns/<ns>/sa/<name>`,
and live 24 h by default; the CA never copies names from the CSR, it writes the identity the
caller proved (token or current certificate).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_WORKLOAD_TTL = 24 * 3600.0
ROOT_TTL = 10 * 365 * 24 * 3600.0
SERVER_TTL = 365 * 24 * 3600.0
# The name clients verify the control plane's serving certificate against (gRPC's
# ssl_target_name_override), whatever address they dial: istiod's service name.
CONTROL_PLANE_SERVER_NAME = "istiod.istio-system.svc"
CA_CERT_FILE = "ca-cert.pem"
# The control plane's CA token port (server-authenticated TLS): where first certificates are had.
DEFAULT_CA_PORT = 15013
CA_KEY_FILE = "ca-key.pem"


class CaError(Exception):
    """A CA file or CSR that cannot be used (the message names it)."""


@dataclass(frozen=True)
class Identity:
    """A SPIFFE workload identity: spiffe://<trust_domain>/ns/<namespace>/sa/<name>."""

    trust_domain: str
    namespace: str
    name: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """ValueError naming the URI when it is not spiffe://TD/ns/NS/sa/NAME."""
        prefix = "spiffe://"
        parts = uri[len(prefix) :].split("/") if uri.startswith(prefix) else []
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts[i] for i in (0, 2, 4)):
            raise ValueError(f"not a SPIFFE workload identity (spiffe://TD/ns/NS/sa/NAME): {uri!r}")
        return cls(parts[0], parts[2], parts[4])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file created 0600 (never world-readable, not even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_for(identity: Identity, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR asking for `identity` (its URI SAN), signed with `key`."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def identity_of(cert: x509.Certificate) -> Identity | None:
    """The SPIFFE identity in a certificate's URI SAN (None when it has none or a malformed one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [
        uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")
    ]
    if len(uris) != 1:
        return None
    try:
        return Identity.parse(uris[0])
    except ValueError:
        return None


def identity_of_pem(pem: bytes) -> Identity | None:
    try:
        return identity_of(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


class CertificateAuthority:
    """Signs workload and server certificates with the mesh root."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> None:
        self.cert = cert
        self.key = key
        self.trust_domain = trust_domain
        self.root_pem = cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        key = new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "wasmesh root CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(seconds=ROOT_TTL))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain)

    @classmethod
    def load(
        cls, cert_path: Path, key_path: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CaError(f"--ca-cert {cert_path}: not a readable PEM certificate ({exc})") from None
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            raise CaError(f"--ca-key {key_path}: not a readable unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"--ca-key {key_path}: expected an EC private key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise CaError(f"--ca-key {key_path}: does not belong to --ca-cert {cert_path}")
        return cls(cert, key, trust_domain)

    @classmethod
    def load_or_create(
        cls, state_dir: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> CertificateAuthority:
        """The root in `state_dir`, generated there (key 0600) on first start."""
        cert_path, key_path = state_dir / CA_CERT_FILE, state_dir / CA_KEY_FILE
        if cert_path.exists() or key_path.exists():
            return cls.load(cert_path, key_path, trust_domain)
        ca = cls.create(trust_domain)
        write_private(key_path, key_pem(ca.key))
        cert_path.write_bytes(ca.root_pem)
        return ca

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        sans: list[x509.GeneralName],
        ttl: float,
        usages: list[x509.ObjectIdentifier],
    ) -> bytes:
        now = _now()
        not_after = min(now + datetime.timedelta(seconds=ttl), self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=30))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def sign_csr(self, csr_pem: bytes, identity: Identity, ttl: float = DEFAULT_WORKLOAD_TTL) -> bytes:
        """A workload certificate for `identity` (the proven caller), on the CSR's key.

        CaError when the CSR is malformed, badly signed, or asks for another identity."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CaError("CSR: not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise CaError("CSR: signature does not verify")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            asked = set(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            asked = set()
        if asked and asked != {identity.uri}:
            raise CaError(f"CSR: asks for {', '.join(sorted(asked))} but the caller is {identity.uri}")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise CaError("CSR: expected an EC (P-256) key")
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
        return self._issue(public_key, sans, ttl, usages)

    def issue_server(self, hosts: list[str], ttl: float = SERVER_TTL) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for the control plane's own gRPC servers."""
        key = new_key()
        sans: list[x509.GeneralName] = [x509.DNSName(CONTROL_PLANE_SERVER_NAME), x509.DNSName("localhost")]
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        sans.append(x509.UniformResourceIdentifier(Identity(self.trust_domain, "istio-system", "istiod").uri))
        cert = self._issue(key.public_key(), sans, ttl, [ExtendedKeyUsageOID.SERVER_AUTH])
        return cert, key_pem(key)
