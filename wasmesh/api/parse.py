"""Turning a loaded ``Document`` into the typed ``WasmPlugin``.

Parsing checks structure only (types, unknown fields, enum values): anything
that cannot be represented in the model is a ``WasmPluginError`` with a one-line
message naming the document and field. Istio's semantic rules (lengths,
patterns, CEL, istiod's checks) are ``wasmesh.api.validation``'s job; call
``validate_document`` first when input is untrusted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from wasmesh.api import model
from wasmesh.api.load import Document
from wasmesh.api.schema import check_wasmplugin_body, enum_member, parse_timestamp


class WasmPluginError(ValueError):
    """A document is not a usable WasmPlugin; one line naming the file, document and field."""


def is_wasmplugin(doc: Document) -> bool:
    """Kind WasmPlugin in Istio's API group (Higress' extensions.higress.io WasmPlugin is another kind)."""
    return doc.kind == model.KIND and doc.apiVersion.split("/", 1)[0] == model.API_GROUP


def describe(doc: Document) -> str:
    """``<file>: document <n> (WasmPlugin <ns>/<name>)``."""
    return f"{doc.location} ({doc.kind or 'unknown kind'} {doc.namespace}/{doc.name or '<unnamed>'})"


def _str_map(value: object) -> dict[str, str]:
    return dict(value) if isinstance(value, dict) else {}


def _target_ref(raw: Mapping[str, Any]) -> model.PolicyTargetReference:
    return model.PolicyTargetReference(
        kind=raw.get("kind", ""),
        name=raw.get("name", ""),
        group=raw.get("group", ""),
        namespace=raw.get("namespace", ""),
    )


def _resolve_file_url(url: str, base: Path) -> str:
    """wasmesh extension: ``file://relative/path`` is relative to the YAML file's directory."""
    if not url.startswith("file://"):
        return url
    path = url[len("file://") :]
    if path == "" or os.path.isabs(path):
        return url
    return "file://" + os.path.normpath(os.path.join(os.path.abspath(base), path))


def _metadata(raw: Mapping[str, Any]) -> model.ObjectMeta:
    timestamp = raw.get("creationTimestamp")
    return model.ObjectMeta(
        name=raw.get("name", ""),
        namespace=raw.get("namespace") or "default",
        labels=_str_map(raw.get("labels")),
        annotations=_str_map(raw.get("annotations")),
        creation_timestamp=parse_timestamp(timestamp) if isinstance(timestamp, str) else None,
        resource_version=raw.get("resourceVersion", ""),
        generation=raw.get("generation", 0),
    )


def build_wasmplugin(
    body: Mapping[str, Any], *, source_file: Path | None = None, doc_index: int | None = None
) -> model.WasmPlugin:
    """The model of a body that has no structural schema issues (see ``schema.check_wasmplugin_body``)."""
    spec: Mapping[str, Any] = body.get("spec") or {}
    selector = spec.get("selector")
    vm_config = spec.get("vmConfig")
    plugin_config = spec.get("pluginConfig")
    return model.WasmPlugin(
        metadata=_metadata(body.get("metadata") or {}),
        url=spec.get("url", ""),
        selector=None
        if selector is None
        else model.WorkloadSelector(match_labels=_str_map(selector.get("matchLabels"))),
        target_ref=_target_ref(spec["targetRef"]) if spec.get("targetRef") is not None else None,
        target_refs=tuple(_target_ref(ref) for ref in spec.get("targetRefs") or ()),
        sha256=spec.get("sha256", ""),
        image_pull_policy=model.PullPolicy(
            enum_member(model.PullPolicy, spec.get("imagePullPolicy", "UNSPECIFIED_POLICY"))
        ),
        image_pull_secret=spec.get("imagePullSecret", ""),
        verification_key=spec.get("verificationKey", ""),
        plugin_config=dict(plugin_config) if plugin_config is not None else None,
        plugin_name=spec.get("pluginName", ""),
        phase=model.PluginPhase(enum_member(model.PluginPhase, spec.get("phase", 0))),
        priority=spec.get("priority"),
        fail_strategy=model.FailStrategy(enum_member(model.FailStrategy, spec.get("failStrategy", 0))),
        vm_config=None
        if vm_config is None
        else model.VmConfig(
            env=tuple(
                model.EnvVar(
                    name=env.get("name", ""),
                    value=env.get("value", ""),
                    value_from=model.EnvValueSource(
                        enum_member(model.EnvValueSource, env.get("valueFrom", 0))
                    ),
                )
                for env in vm_config.get("env") or ()
            )
        ),
        match=tuple(
            model.TrafficSelector(
                mode=model.WorkloadMode(enum_member(model.WorkloadMode, selector_raw.get("mode", 0))),
                ports=tuple(
                    model.PortSelector(number=port.get("number", 0))
                    for port in selector_raw.get("ports") or ()
                ),
            )
            for selector_raw in spec.get("match") or ()
        ),
        type=model.PluginType(enum_member(model.PluginType, spec.get("type", 0))),
        source_file=source_file,
        doc_index=doc_index,
    )


def parse_wasmplugin(doc: Document, *, resolve_relative_to: Path | None = None) -> model.WasmPlugin:
    """The typed WasmPlugin of a document. Raises WasmPluginError (one line) for a non-WasmPlugin
    document or a structural problem (wrong type, unknown field, unknown enum value).

    ``resolve_relative_to``: directory that a relative ``file://`` URL is resolved against
    (a wasmesh extension); defaults to the directory of the document's file.
    """
    if not is_wasmplugin(doc):
        raise WasmPluginError(
            f"{describe(doc)}: not a WasmPlugin (apiVersion {doc.apiVersion!r}, kind {doc.kind!r})"
        )
    if doc.apiVersion != model.API_VERSION:
        raise WasmPluginError(
            f"{describe(doc)}: apiVersion: unsupported version {doc.apiVersion!r}, want {model.API_VERSION!r}"
        )
    structural = [issue for issue in check_wasmplugin_body(doc.body) if issue.structural]
    if structural:
        first = structural[0]
        more = f" (and {len(structural) - 1} more)" if len(structural) > 1 else ""
        raise WasmPluginError(f"{describe(doc)}: {first.path}: {first.message}{more}")
    plugin = build_wasmplugin(doc.body, source_file=doc.source_file, doc_index=doc.doc_index)
    base = resolve_relative_to
    if base is None and doc.source_file != Path("-"):
        base = doc.source_file.parent
    if base is not None and plugin.url.startswith("file://"):
        plugin = replace(plugin, url=_resolve_file_url(plugin.url, base))
    return plugin
