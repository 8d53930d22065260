"""istiod's CSR API, `istio.v1.auth.IstioCertificateService/CreateCertificate`, on grpc.aio.

The messages are Istio's (field numbers of security/proto/istioca.proto), built at import time
from a descriptor so the wire format matches istiod's without generated code. A caller proves
its identity with a bootstrap token (`authorization: Bearer <token>` metadata, on the CA's TLS
port) or with its current certificate (on the mTLS xDS port: renewal).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from wasmesh.security.ca import CaError, CertificateAuthority, Identity, identity_of_pem

log = logging.getLogger("wasmesh.security")

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = f"/{SERVICE}/CreateCertificate"


def _message_classes() -> tuple[type[message.Message], type[message.Message]]:
    proto = descriptor_pb2.FileDescriptorProto(name="wasmesh/istioca.proto", package="istio.v1.auth")
    proto.syntax = "proto3"
    field = descriptor_pb2.FieldDescriptorProto
    request = proto.message_type.add(name="IstioCertificateRequest")
    request.field.add(name="csr", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    request.field.add(name="validity_duration", number=3, type=field.TYPE_INT64, label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="IstioCertificateResponse")
    response.field.add(name="cert_chain", number=1, type=field.TYPE_STRING, label=field.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateResponse")),
    )


# Typed Any: the classes are built at run time, their fields are not known to the type checker.
CertificateRequest: Any
CertificateResponse: Any
CertificateRequest, CertificateResponse = _message_classes()

# (bearer token) → the identity it is bound to, or None.
TokenVerifier = Callable[[str], Identity | None]


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> Identity | None:
    """The SPIFFE identity of the verified client certificate of this call (None without one)."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    return identity_of_pem(pems[0]) if pems else None


class CertificateService:
    """Signs CSRs for callers that prove an identity; `handler()` plugs it into a grpc.aio server."""

    def __init__(
        self, ca: CertificateAuthority, tokens: TokenVerifier | None, max_ttl: float, *, by_certificate: bool
    ) -> None:
        self.ca = ca
        self.tokens = tokens
        self.max_ttl = max_ttl
        self.by_certificate = by_certificate

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(
            self.create_certificate,
            request_deserializer=CertificateRequest.FromString,
            response_serializer=CertificateResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"CreateCertificate": method})

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity | None:
        if self.by_certificate:
            identity = peer_identity(context)
            return (
                identity if identity is not None and identity.trust_domain == self.ca.trust_domain else None
            )
        if self.tokens is None:
            return None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                return self.tokens(value.removeprefix("Bearer ").strip())
        return None

    async def create_certificate(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        caller = self._caller(context)
        if caller is None:
            how = "a valid client certificate" if self.by_certificate else "a valid bootstrap token"
            log.warning("CA: refused a CSR from %s: no %s", context.peer(), how)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"CreateCertificate needs {how}")
        assert caller is not None
        ttl = float(request.validity_duration) if request.validity_duration > 0 else self.max_ttl
        try:
            cert = self.ca.sign_csr(str(request.csr).encode(), caller, min(ttl, self.max_ttl))
        except CaError as exc:
            log.warning("CA: refused a CSR for %s: %s", caller.uri, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("CA: issued a certificate for %s (%.0f s)", caller.uri, min(ttl, self.max_ttl))
        return CertificateResponse(cert_chain=[cert.decode(), self.ca.root_pem.decode()])


async def request_certificate(
    channel: grpc.aio.Channel, csr_pem: bytes, ttl: float, token: str | None, timeout: float = 10.0
) -> bytes:
    """Ask the CA to sign `csr_pem`; returns the leaf certificate PEM. Raises grpc.aio.AioRpcError."""
    call = channel.unary_unary(
        METHOD,
        request_serializer=CertificateRequest.SerializeToString,
        response_deserializer=CertificateResponse.FromString,
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    response = await call(
        CertificateRequest(csr=csr_pem.decode(), validity_duration=int(ttl)),
        metadata=metadata,
        timeout=timeout,
    )
    chain = list(response.cert_chain)
    if not chain:
        raise ValueError("CreateCertificate: empty certificate chain")
    return str(chain[0]).encode()
