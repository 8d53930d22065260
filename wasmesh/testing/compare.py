"""Normalised views of an exchange, so runs under Envoy and under wasmesh compare equal.

What is ignored, and why:

* response headers ``date``, ``server`` and every ``x-envoy-*`` header: added by
  Envoy's codec/router, not by plugins;
* ``content-length``/``transfer-encoding``/``connection`` on both sides: framing,
  which Envoy rewrites (e.g. chunked after a plugin edits a body) and the harness,
  having no wire, does not;
* ``x-request-id``: random per request on both sides.

Header order is not compared (multisets of (name, value)); names are lower-cased.
Values that differ per run by nature (ports, connection ids, timestamps) are
masked by the ``mask`` function the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ObservedExchange",
    "ObservedUpstreamRequest",
    "normalize_headers",
    "observe_envoy",
    "observe_harness",
    "FRAMING_HEADERS",
]

FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_RESPONSE_IGNORED = FRAMING_HEADERS | {"date", "server", "x-request-id"}
_UPSTREAM_IGNORED = FRAMING_HEADERS | {"x-request-id"}

Mask = Callable[[str, str], str]


def _no_mask(name: str, value: str) -> str:
    return value


def normalize_headers(
    pairs: Iterable[tuple[str, str]], ignored: frozenset[str] | set[str], mask: Mask = _no_mask
) -> list[tuple[str, str]]:
    out = []
    for name, value in pairs:
        name = name.lower()
        if name in ignored or name.startswith("x-envoy-") or name.startswith(":"):
            continue
        out.append((name, mask(name, value)))
    return sorted(out)


@dataclass(frozen=True)
class ObservedUpstreamRequest:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    trailers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ObservedExchange:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    upstream: ObservedUpstreamRequest | None
    trailers: tuple[tuple[str, str], ...] = ()


class _EnvoyResponseLike(Protocol):
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]]


class _RecordedRequestLike(Protocol):
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]]


def _decoded(pairs: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in pairs]


def observe_envoy(
    response: _EnvoyResponseLike,
    upstream_requests: Sequence[_RecordedRequestLike],
    mask: Mask = _no_mask,
) -> ObservedExchange:
    """``upstream_requests``: what the upstream recorded for this exchange (at most one expected)."""
    if len(upstream_requests) > 1:
        raise AssertionError(f"expected at most one upstream request, got {len(upstream_requests)}")
    upstream = None
    if upstream_requests:
        req = upstream_requests[0]
        upstream = ObservedUpstreamRequest(
            req.method,
            req.path,
            tuple(normalize_headers(req.headers, _UPSTREAM_IGNORED, mask)),
            req.body,
            tuple(normalize_headers(req.trailers, frozenset(), mask)),
        )
    return ObservedExchange(
        response.status,
        tuple(normalize_headers(response.headers, _RESPONSE_IGNORED, mask)),
        response.body,
        upstream,
        tuple(normalize_headers(response.trailers, frozenset(), mask)),
    )


def observe_harness(response: object, mask: Mask = _no_mask) -> ObservedExchange:
    """From a ``wasmesh.testing.HarnessResponse``: pseudo-headers dropped, ``:authority`` as ``host``."""
    from wasmesh.testing.harness import HarnessResponse

    assert isinstance(response, HarnessResponse)
    upstream = None
    req = response.upstream_request
    if req is not None:
        pairs = _decoded(req.headers)
        pairs = [("host", v) if k == ":authority" else (k, v) for k, v in pairs]
        upstream = ObservedUpstreamRequest(
            req.method,
            req.path,
            tuple(normalize_headers(pairs, _UPSTREAM_IGNORED, mask)),
            req.body,
            tuple(normalize_headers(_decoded(req.trailers or ()), frozenset(), mask)),
        )
    return ObservedExchange(
        response.status,
        tuple(normalize_headers(_decoded(response.headers), _RESPONSE_IGNORED, mask)),
        response.body,
        upstream,
        tuple(normalize_headers(_decoded(response.trailers or ()), frozenset(), mask)),
    )
