"""Plugin selection and ordering: Istio's rules, implemented once in wasmesh.api and used here."""

from __future__ import annotations

from wasmesh.api.ordering import order_chain
from wasmesh.api.selection import matches_traffic, selects

__all__ = ["matches_traffic", "order_chain", "selects"]
