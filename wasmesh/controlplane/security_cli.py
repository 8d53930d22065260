"""The control plane's security flags and `wasmesh control-plane token|cert create`.

Secure by default: `wasmesh control-plane` serves xDS over mTLS with its built-in CA (the root in
--state-dir, generated on first start, or --ca-cert/--ca-key) and a token port for first
certificates; `--plaintext` serves plain-text xDS, on a loopback host only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from wasmesh.controlplane.bootstrap import BootstrapTls
from wasmesh.controlplane.server import XdsSecurityOptions
from wasmesh.security.ca import (
    DEFAULT_CA_PORT,
    DEFAULT_TRUST_DOMAIN,
    DEFAULT_WORKLOAD_TTL,
    CaError,
    CertificateAuthority,
    Identity,
    csr_for,
    key_pem,
    new_key,
    write_private,
)
from wasmesh.security.tokens import DEFAULT_TOKEN_TTL, create_token


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "wasmesh" / "control-plane"


def _state_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"the CA root, tokens, audit log and API cert (default {default_state_dir()})",
    )


def add_security_flags(serve: argparse.ArgumentParser) -> None:
    """The control plane's CA and mTLS flags, and the --state-dir every security file lives in."""
    group = serve.add_argument_group("xDS security (mTLS with the built-in CA unless --plaintext)")
    group.add_argument(
        "--plaintext",
        "--insecure-xds",
        dest="plaintext",
        action="store_true",
        help="plain-text xDS, no CA, no identities, no pull secrets (only on a loopback --host)",
    )
    _state_dir_flag(group)  # type: ignore[arg-type]
    group.add_argument("--ca-cert", type=Path, help="the root CA certificate to sign with (PEM)")
    group.add_argument("--ca-key", type=Path, help="its private key (PEM, unencrypted EC)")
    group.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain")
    group.add_argument(
        "--ca-port",
        type=int,
        default=DEFAULT_CA_PORT,
        help=f"the CA's token port (default {DEFAULT_CA_PORT})",
    )
    group.add_argument(
        "--cert-ttl",
        type=float,
        default=DEFAULT_WORKLOAD_TTL,
        metavar="SECONDS",
        help="longest workload certificate lifetime (default 86400)",
    )



def add_security_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bootstrap-token create` (a proxy's first credential) and `cert create` (pre-provisioned)."""
    token = commands.add_parser(
        "bootstrap-token", help="bootstrap tokens proxies trade for a certificate"
    ).add_subparsers(dest="bootstrap_token_command")
    create = token.add_parser("create", help="print a new bootstrap token for one identity")
    _identity_flags(create)
    create.add_argument("--ttl", type=float, default=DEFAULT_TOKEN_TTL, metavar="SECONDS")
    create.set_defaults(handler=run_token_create)

    cert = commands.add_parser("cert", help="pre-provisioned workload certificates").add_subparsers(
        dest="cert_command"
    )
    issue = cert.add_parser("create", help="write a workload certificate and key signed by the CA")
    _identity_flags(issue)
    issue.add_argument("--ca-cert", type=Path, help="the root CA certificate (default: in --state-dir)")
    issue.add_argument("--ca-key", type=Path, help="its private key (default: in --state-dir)")
    issue.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    issue.add_argument("--ttl", type=float, default=DEFAULT_WORKLOAD_TTL, metavar="SECONDS")
    issue.add_argument("--cert-out", type=Path, required=True, help="where to write the certificate")
    issue.add_argument("--key-out", type=Path, required=True, help="where to write the key (0600)")
    issue.set_defaults(handler=run_cert_create)


def add_bootstrap_tls_flags(boot: argparse.ArgumentParser) -> None:
    group = boot.add_argument_group("mTLS straight to the control plane (omit behind `wasmesh agent`)")
    group.add_argument("--xds-root-cert", metavar="FILE", help="the mesh root CA (ca-cert.pem)")
    group.add_argument("--xds-cert", metavar="FILE", help="Envoy's workload certificate (`cert create`)")
    group.add_argument("--xds-key", metavar="FILE", help="its private key")


def bootstrap_tls(args: argparse.Namespace) -> BootstrapTls | None:
    """None without the flags; ValueError naming the missing one when only some are given."""
    given = {flag: getattr(args, flag) for flag in ("xds_root_cert", "xds_cert", "xds_key")}
    if not any(given.values()):
        return None
    for flag, value in given.items():
        if not value:
            raise ValueError(f"--{flag.replace('_', '-')}: required with the other mTLS flags")
    return BootstrapTls(
        root_cert=str(Path(args.xds_root_cert).resolve()),
        cert=str(Path(args.xds_cert).resolve()),
        key=str(Path(args.xds_key).resolve()),
    )


def _identity_flags(parser: argparse.ArgumentParser) -> None:
    _state_dir_flag(parser)
    parser.add_argument("--namespace", required=True, help="the identity's namespace")
    parser.add_argument("--name", required=True, help="the Workload/Gateway (service account) name")


def security_options(args: argparse.Namespace) -> XdsSecurityOptions | None:
    """None with --plaintext; ValueError naming the flag when the flags do not fit together."""
    if args.plaintext:
        for flag in ("ca_cert", "ca_key"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')}: no CA with --plaintext")
        return None
    if (args.ca_cert is None) != (args.ca_key is None):
        raise ValueError("--ca-cert and --ca-key go together")
    if args.cert_ttl <= 0:
        raise ValueError(f"--cert-ttl: expected a positive number of seconds, got {args.cert_ttl}")
    return XdsSecurityOptions(
        state_dir=args.state_dir or default_state_dir(),
        trust_domain=args.trust_domain,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
        ca_port=args.ca_port,
        workload_ttl=args.cert_ttl,
    )


def run_token_create(args: argparse.Namespace) -> int:
    try:
        token = create_token(args.state_dir or default_state_dir(), args.namespace, args.name, args.ttl)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def run_cert_create(args: argparse.Namespace) -> int:
    state = args.state_dir or default_state_dir()
    try:
        if (args.ca_cert is None) != (args.ca_key is None):
            raise ValueError("--ca-cert and --ca-key go together")
        if args.ca_cert is not None:
            ca = CertificateAuthority.load(args.ca_cert, args.ca_key, args.trust_domain)
        else:
            ca = CertificateAuthority.load_or_create(state, args.trust_domain)
        identity = Identity(args.trust_domain, args.namespace, args.name)
        key = new_key()
        cert = ca.sign_csr(csr_for(identity, key), identity, args.ttl)
        write_private(args.key_out, key_pem(key))
        args.cert_out.write_bytes(cert)
    except (ValueError, OSError, CaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{identity.uri}: certificate {args.cert_out}, key {args.key_out}")
    return 0
