"""Feed pushed plugin chains from an XdsClient into a proxy, NACKing what the proxy rejects.

    feeder = ChainFeeder(apply_chain)     # async (listener_name, [WasmPlugin bodies]) -> bool
    client = XdsClient(target, node_id, labels, namespace=ns, validate=feeder.validate)

For each listener the chain is applied once every ECDS resource it references has arrived (like
an Envoy listener warming), and again whenever its order or any referenced resource changes. If
`apply_chain` returns False (the proxy could not load a module, say), the xDS update is NACKed,
the control plane counts it in pilot_total_xds_rejects, and the proxy keeps its running chain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from google.protobuf import message

from wasmesh.xds import types
from wasmesh.xds.bridge import BridgeError, chain_documents
from wasmesh.xds.client import ClientSnapshot, RejectUpdate, XdsClient

log = logging.getLogger("wasmesh.xds.feeder")

ApplyChain = Callable[[str, list[dict[str, Any]]], Awaitable[bool]]


class ChainFeeder:
    def __init__(self, apply_chain: ApplyChain, client: XdsClient | None = None) -> None:
        self.apply_chain = apply_chain
        self.client = client
        self.applied: dict[str, str] = {}  # listener → JSON of the documents last applied

    def attach(self, client: XdsClient) -> None:
        self.client = client
        client.validate = self.validate

    async def validate(self, type_url: str, resources: Mapping[str, message.Message]) -> None:
        if type_url not in (types.LISTENER, types.EXTENSION_CONFIG) or self.client is None:
            return
        current = self.client.snapshot
        prospective = {k: dict(v) for k, v in current.resources.items()}
        if type_url == types.LISTENER:
            prospective[type_url] = dict(resources)
        else:
            prospective.setdefault(type_url, {}).update(resources)
        await self._apply(ClientSnapshot(resources=prospective))

    async def _apply(self, snapshot: ClientSnapshot) -> None:
        for listener, chain in snapshot.http_filter_chains().items():
            try:
                documents = chain_documents(chain)
            except BridgeError as exc:
                log.debug("listener %s not ready: %s", listener, exc)
                continue  # warming: wait for the ECDS resources
            encoded = json.dumps(documents, sort_keys=True)
            if self.applied.get(listener) == encoded:
                continue
            if not await self.apply_chain(listener, documents):
                raise RejectUpdate(f"listener {listener}: the proxy rejected the plugin chain")
            self.applied[listener] = encoded
