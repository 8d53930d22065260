"""WasmPlugin validation for the store: wasmesh.api's parser and Istio's rules, errors as lines."""

from __future__ import annotations

import logging

from wasmesh.api.load import Document
from wasmesh.api.model import WasmPlugin
from wasmesh.api.validation import validate_document

log = logging.getLogger("wasmesh.controlplane")


class PluginRejected(ValueError):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def validate_wasmplugin(document: Document) -> WasmPlugin:
    """The typed plugin, or PluginRejected with one line per error (Istio's messages).

    Warnings (e.g. "workload selector specified without labels") are logged, not fatal, as
    istiod's webhook admits the resource and prints them.
    """
    result = validate_document(document)
    for warning in result.warnings:
        log.warning("warning: %s", warning)
    if result.plugin is None:
        raise PluginRejected([str(issue) for issue in result.errors] or [f"{document.location}: invalid"])
    return result.plugin
