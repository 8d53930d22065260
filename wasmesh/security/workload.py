"""The proxy side of mesh identity: obtain, hold and rotate a workload certificate; dial xDS over mTLS.

A proxy (or the agent) proves who it is once with a bootstrap token — on the CA's TLS port — or
comes with a pre-provisioned certificate. It renews at half life: with its token when it has
one, else with its current certificate over the mTLS xDS port. A renewed certificate is used for
new connections; a live xDS stream keeps its TLS session and is never dropped for a rotation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from wasmesh.security.ca import (
    CONTROL_PLANE_SERVER_NAME,
    DEFAULT_CA_PORT,
    DEFAULT_TRUST_DOMAIN,
    DEFAULT_WORKLOAD_TTL,
    Identity,
    csr_for,
    identity_of,
    key_pem,
    new_key,
)
from wasmesh.security.certservice import request_certificate

log = logging.getLogger("wasmesh.security")

RETRY_INITIAL = 0.5
RETRY_MAX = 10.0


@dataclass(frozen=True)
class XdsTlsOptions:
    """How a proxy authenticates to the control plane (picklable: proxy workers receive it)."""

    root_cert: Path  # the mesh root CA certificate (the control plane's ca-cert.pem)
    identity: Identity
    ca_address: str | None = None  # HOST:PORT of the CA's token port (with `token`)
    token: str | None = None
    cert_path: Path | None = None  # a pre-provisioned certificate and key (instead of a token)
    key_path: Path | None = None
    ttl: float = DEFAULT_WORKLOAD_TTL
    server_name: str = CONTROL_PLANE_SERVER_NAME

    def __post_init__(self) -> None:
        if self.token is None and self.cert_path is None:
            raise ValueError(
                "xDS mTLS: give a bootstrap token (--xds-token-file) or a certificate (--xds-cert)"
            )
        if self.token is not None and self.ca_address is None:
            raise ValueError("xDS mTLS: --xds-token-file needs the CA address (--ca-address HOST:PORT)")
        if (self.cert_path is None) != (self.key_path is None):
            raise ValueError("xDS mTLS: --xds-cert and --xds-key go together")


def _grpc_options(server_name: str) -> list[tuple[str, str | int]]:
    return [("grpc.ssl_target_name_override", server_name), ("grpc.keepalive_time_ms", 30000)]


class WorkloadCertificates:
    """Holds the current workload certificate for one identity and renews it at half life."""

    def __init__(self, options: XdsTlsOptions, xds_target: str) -> None:
        self.options = options
        self.xds_target = xds_target
        self.root_pem = options.root_cert.read_bytes()
        self.cert_pem: bytes | None = None
        self.key_pem: bytes | None = None
        self.not_before = 0.0
        self.not_after = 0.0
        self.rotations = 0
        self._lock = asyncio.Lock()
        if options.cert_path is not None and options.key_path is not None:
            self._install(options.cert_path.read_bytes(), options.key_path.read_bytes())

    def _install(self, cert_pem: bytes, private_pem: bytes, received_at: float | None = None) -> None:
        """Use this certificate from now on. Its life counts from `received_at` (when the CA sent
        it: the CA back-dates notBefore for clock skew) or, for a file, from its notBefore."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        found = identity_of(cert)
        if found != self.options.identity:
            named = found.uri if found is not None else "no SPIFFE identity"
            wanted = self.options.identity.uri
            raise ValueError(f"xDS mTLS: the certificate is for {named}, this proxy is {wanted}")
        self.cert_pem, self.key_pem = cert_pem, private_pem
        self.not_before = max(cert.not_valid_before_utc.timestamp(), received_at or 0.0)
        self.not_after = cert.not_valid_after_utc.timestamp()

    def renew_at(self) -> float:
        """When to renew: half way through the certificate's life (as istio-agent does)."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def credentials(self) -> grpc.ChannelCredentials:
        assert self.cert_pem is not None and self.key_pem is not None, "no workload certificate yet"
        return grpc.ssl_channel_credentials(self.root_pem, self.key_pem, self.cert_pem)

    def _now(self) -> float:
        return datetime.datetime.now(datetime.UTC).timestamp()

    async def ensure(self) -> None:
        """Have a certificate that is not past half life (fetches or renews; raises on failure)."""
        async with self._lock:
            if self.cert_pem is not None and self._now() < self.renew_at():
                return
            await self._renew()

    async def _renew(self) -> None:
        options = self.options
        key = new_key()
        csr = csr_for(options.identity, key)
        if options.token is not None:
            assert options.ca_address is not None
            target, credentials = options.ca_address, grpc.ssl_channel_credentials(self.root_pem)
        else:
            target, credentials = self.xds_target, self.credentials()
        async with grpc.aio.secure_channel(
            target, credentials, options=_grpc_options(options.server_name)
        ) as channel:
            cert = await request_certificate(channel, csr, options.ttl, options.token)
        had = self.cert_pem is not None
        self._install(cert, key_pem(key), received_at=self._now())
        if had:
            self.rotations += 1
        log.info(
            "workload certificate for %s %s, valid %.0f s",
            options.identity.uri,
            "rotated" if had else "issued",
            self.not_after - self.not_before,
        )

    async def channel(self, target: str) -> grpc.aio.Channel:
        """A new mTLS channel to `target` with the current certificate."""
        await self.ensure()
        return grpc.aio.secure_channel(
            target, self.credentials(), options=_grpc_options(self.options.server_name)
        )

    async def run_rotation(self) -> None:
        """Renew at half life, forever; a failed renewal is retried with backoff and logged once per try."""
        delay = RETRY_INITIAL
        while True:
            if self.cert_pem is None:
                wait = 0.0
            else:
                wait = max(0.0, self.renew_at() - self._now())
            await asyncio.sleep(wait)
            try:
                await self.ensure()
                delay = RETRY_INITIAL
            except (grpc.aio.AioRpcError, ValueError, OSError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning(
                    "workload certificate for %s: renewal failed: %s", self.options.identity.uri, detail
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------------- command-line flags


def add_xds_tls_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `wasmesh proxy --xds` and `wasmesh agent` that say how to authenticate to xDS."""
    group = parser.add_argument_group(
        "xDS security", "mTLS to the control plane (the default); give a token or a certificate"
    )
    group.add_argument(
        "--plaintext",
        "--insecure-xds",
        dest="plaintext",
        action="store_true",
        help="plain-text xDS without identity (only to a loopback control plane; no pull secrets)",
    )
    group.add_argument(
        "--xds-root-cert", metavar="FILE", help="the mesh root CA (the control plane's ca-cert.pem)"
    )
    group.add_argument(
        "--xds-token-file",
        metavar="FILE",
        help="bootstrap token (`wasmesh control-plane bootstrap-token create`)",
    )
    group.add_argument(
        "--ca-address",
        metavar="HOST:PORT",
        help=f"the CA's token port (default: the xDS host, port {DEFAULT_CA_PORT})",
    )
    group.add_argument("--xds-cert", metavar="FILE", help="a pre-provisioned workload certificate (PEM)")
    group.add_argument("--xds-key", metavar="FILE", help="its private key (PEM)")
    group.add_argument(
        "--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain (cluster.local)"
    )
    group.add_argument(
        "--cert-ttl",
        type=float,
        default=DEFAULT_WORKLOAD_TTL,
        metavar="SECONDS",
        help="workload cert lifetime",
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def xds_tls_from_args(
    args: argparse.Namespace, target: str, namespace: str, name: str
) -> XdsTlsOptions | None:
    """The TLS options the flags give (None with --plaintext); ValueError naming the flag."""
    host, _, _port = target.rpartition(":")
    host = host.strip("[]")
    if args.plaintext:
        if not is_loopback(host):
            raise ValueError(f"--plaintext: plain-text xDS only to a loopback address, not {host}")
        return None
    if not args.xds_root_cert:
        raise ValueError("--xds-root-cert: required for mTLS xDS (or give --plaintext on loopback)")
    for flag in ("xds_root_cert", "xds_token_file", "xds_cert", "xds_key"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {value}: no such file")
    token = Path(args.xds_token_file).read_text(encoding="utf-8").strip() if args.xds_token_file else None
    if args.xds_token_file and not token:
        raise ValueError(f"--xds-token-file {args.xds_token_file}: empty")
    ca_address = args.ca_address or (f"{target.rpartition(':')[0]}:{DEFAULT_CA_PORT}" if token else None)
    return XdsTlsOptions(
        root_cert=Path(args.xds_root_cert),
        identity=Identity(args.trust_domain, namespace, name),
        ca_address=ca_address,
        token=token,
        cert_path=Path(args.xds_cert) if args.xds_cert else None,
        key_path=Path(args.xds_key) if args.xds_key else None,
        ttl=args.cert_ttl,
    )
