"""Istio's WasmPlugin validation: the apiserver's CRD rules and istiod's ``ValidateWasmPlugin``.

Both layers run and every violation is reported, each with Istio's own text:
first the CRD schema and CEL rules (``schema.py``, apiserver message shapes),
then istiod's webhook checks (``pkg/config/validation/validation.go``, Istio
1.29) on the typed model. Some inputs break a rule of both layers (an empty
``url``, say); both messages are then shown, as an apiserver *and* an
``istioctl validate`` user would have seen them. istiod's checks are skipped
when the body is structurally broken (it could not be decoded at all).

Every issue renders as one line:
``<file>: document <n> (WasmPlugin <ns>/<name>): <field path>: <message>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from wasmesh.api import model
from wasmesh.api.gourl import GoURLError, go_quote, parse_reference, parse_request_uri
from wasmesh.api.load import Document, load_all
from wasmesh.api.parse import WasmPluginError, describe, is_wasmplugin, parse_wasmplugin
from wasmesh.api.schema import check_wasmplugin_body


class Severity(Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class ValidationIssue:
    location: str  # "<file>: document <n> (WasmPlugin <ns>/<name>)"
    field_path: str
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        return f"{self.location}: {self.field_path}: {self.message}"


@dataclass
class ValidationResult:
    document: Document
    errors: list[ValidationIssue] = field(default_factory=list)
    warnings: list[ValidationIssue] = field(default_factory=list)
    # The typed plugin, only when there are no errors.
    plugin: model.WasmPlugin | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class ValidationReport:
    results: list[ValidationResult] = field(default_factory=list)
    # Documents of other kinds, returned untouched.
    other_documents: list[Document] = field(default_factory=list)

    @property
    def errors(self) -> list[ValidationIssue]:
        return [issue for result in self.results for issue in result.errors]

    @property
    def warnings(self) -> list[ValidationIssue]:
        return [issue for result in self.results for issue in result.warnings]

    @property
    def plugins(self) -> list[model.WasmPlugin]:
        return [result.plugin for result in self.results if result.plugin is not None]


# --- Kubernetes object metadata -------------------------------------------------------------------

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation "
    "is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
    "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)

Finding = tuple[str, str]  # (field path, message)


def metadata_findings(plugin: model.WasmPlugin) -> list[Finding]:
    findings: list[Finding] = []
    name = plugin.metadata.name
    if name == "":
        findings.append(("metadata.name", "Required value: name or generateName is required"))
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        findings.append(("metadata.name", f"Invalid value: {go_quote(name)}: {_SUBDOMAIN_MESSAGE}"))
    namespace = plugin.metadata.namespace
    if len(namespace) > 63 or not _DNS1123_LABEL.match(namespace):
        findings.append(("metadata.namespace", f"Invalid value: {go_quote(namespace)}: {_LABEL_MESSAGE}"))
    return findings


# --- istiod ValidateWasmPlugin (1.29) -------------------------------------------------------------

# allowedTargetRefs, printed as Go prints []GroupVersionKind.
_ALLOWED_TARGET_REFS = (
    ("core", "v1", "Service"),
    ("networking.istio.io", "v1", "ServiceEntry"),
    ("gateway.networking.k8s.io", "v1", "Gateway"),
    ("gateway.networking.k8s.io", "v1", "GatewayClass"),
)
_ALLOWED_TARGET_REFS_TEXT = "[" + " ".join("/".join(gvk) for gvk in _ALLOWED_TARGET_REFS) + "]"
_VALID_URL_SCHEMES = ("", "file", "http", "https", "oci")
_SHA256_CHARS = set("0123456789abcdef")


def _one_of_selector_type(plugin: model.WasmPlugin) -> list[Finding]:
    present = (plugin.selector is not None) + (plugin.target_ref is not None) + (len(plugin.target_refs) > 0)
    return [("spec", "only one of targetRefs or workloadSelector can be set")] if present > 1 else []


def _workload_selector(plugin: model.WasmPlugin) -> tuple[list[Finding], list[Finding]]:
    errors: list[Finding] = []
    warnings: list[Finding] = []
    if plugin.selector is None:
        return errors, warnings
    labels = plugin.selector.match_labels
    for key in sorted(labels):  # Go iterates a map in random order; sorted is deterministic
        value = labels[key]
        pair = go_quote(f"{key}={value}")
        if key == "":
            errors.append(("spec.selector.matchLabels", f"empty key is not supported in selector: {pair}"))
        if "*" in key or "*" in value:
            errors.append(("spec.selector.matchLabels", f"wildcard is not supported in selector: {pair}"))
    if not labels:
        warnings.append(("spec.selector", "workload selector specified without labels"))
    return errors, warnings


def _policy_target_reference(ref: model.PolicyTargetReference | None, path: str) -> list[Finding]:
    if ref is None:
        return []
    findings: list[Finding] = []
    if ref.name == "":
        findings.append((path, "targetRef name must be set"))
    if ref.namespace != "":
        findings.append(
            (path, "targetRef namespace must not be set; cross namespace referencing is not supported")
        )
    if not any(group == ref.canonical_group and kind == ref.kind for group, _, kind in _ALLOWED_TARGET_REFS):
        findings.append(
            (path, f"targetRef must be to one of {_ALLOWED_TARGET_REFS_TEXT} but was {ref.group}/{ref.kind}")
        )
    return findings


def strict_parse_url(url: str) -> str:
    """istiod's ``strictParseURL``: the scheme Go finds, trying ``http://`` + url as a fallback."""
    try:
        parsed = parse_request_uri(url)
        candidate = url
    except GoURLError as original:
        candidate = "http://" + url
        try:
            parsed = parse_request_uri(candidate)
        except GoURLError:
            raise ValueError(f"failed to parse url: {original}") from None
    try:
        parse_reference(candidate)
    except GoURLError as exc:
        raise ValueError(f"failed to strict parse url: {exc}") from None
    return parsed.scheme


def _url(plugin: model.WasmPlugin) -> list[Finding]:
    if plugin.url == "":
        return [("spec.url", "url field needs to be set")]
    try:
        scheme = strict_parse_url(plugin.url)
    except ValueError as exc:
        return [("spec.url", str(exc))]
    if scheme not in _VALID_URL_SCHEMES:
        return [("spec.url", f"url contains unsupported scheme: {scheme}")]
    return []


def _sha256(plugin: model.WasmPlugin) -> list[Finding]:
    if plugin.sha256 == "":
        return []
    if len(plugin.sha256.encode()) != 64:
        return [("spec.sha256", "sha256 field must be 64 characters long")]
    if not set(plugin.sha256) <= _SHA256_CHARS:
        return [("spec.sha256", "sha256 field must match [a-f0-9]{64} pattern")]
    return []


def _image_pull_secret(plugin: model.WasmPlugin) -> list[Finding]:
    if len(plugin.image_pull_secret.encode()) > 253:
        return [("spec.imagePullSecret", "imagePullSecret field must be less than 253 characters long")]
    return []


def _plugin_name(plugin: model.WasmPlugin) -> list[Finding]:
    # Istio checks > 256 but says 255: the message is reproduced as written.
    if len(plugin.plugin_name.encode()) > 256:
        return [("spec.pluginName", "pluginName field must be less than 255 characters long")]
    return []


def _vm_config(plugin: model.WasmPlugin) -> list[Finding]:
    # istiod returns at the first problem.
    if plugin.vm_config is None:
        return []
    seen: set[str] = set()
    for index, env in enumerate(plugin.vm_config.env):
        path = f"spec.vmConfig.env[{index}]"
        if env.name == "":
            return [(path, "spec.vmConfig.env invalid")]
        if len(env.name.encode()) > 256:
            return [(path, "env.name field must be less than 255 characters long")]
        if env.name in seen:
            return [(path, "duplicate env")]
        seen.add(env.name)
        if env.value_from != model.EnvValueSource.INLINE and env.value != "":
            return [(path, "value may only be set when valueFrom is INLINE")]
    return []


def _match(plugin: model.WasmPlugin) -> list[Finding]:
    # istiod returns at the first problem. (Its "spec.Match[%d] is nil" cannot arise from JSON:
    # a null selector is already a schema type error.)
    for selector_index, selector in enumerate(plugin.match):
        for port_index, port in enumerate(selector.ports):
            if not 0 < port.number <= 65535:
                return [
                    (
                        f"spec.match[{selector_index}].ports[{port_index}].number",
                        f"spec.Match[{selector_index}].Ports[{port_index}] is out of range: {port.number}",
                    )
                ]
    return []


def istiod_findings(plugin: model.WasmPlugin) -> tuple[list[Finding], list[Finding]]:
    """(errors, warnings) of istiod's ValidateWasmPlugin, in istiod's order."""
    selector_errors, warnings = _workload_selector(plugin)
    errors = [
        *_one_of_selector_type(plugin),
        *selector_errors,
        *_policy_target_reference(plugin.target_ref, "spec.targetRef"),
        *(
            finding
            for index, ref in enumerate(plugin.target_refs)
            for finding in _policy_target_reference(ref, f"spec.targetRefs[{index}]")
        ),
        *_url(plugin),
        *_sha256(plugin),
        *_image_pull_secret(plugin),
        *_plugin_name(plugin),
        *_vm_config(plugin),
        *_match(plugin),
    ]
    return errors, warnings


def wasmesh_warnings(plugin: model.WasmPlugin) -> list[Finding]:
    """Things Istio accepts silently that wasmesh points out."""
    warnings: list[Finding] = []
    if plugin.verification_key:
        warnings.append(
            (
                "spec.verificationKey",
                "verificationKey is not implemented (by Istio or wasmesh) and is ignored",
            )
        )
    return warnings


# --- putting it together -----------------------------------------------------------------------------


def validate_document(doc: Document) -> ValidationResult:
    """All errors and warnings for one WasmPlugin document (see module docstring)."""
    result = ValidationResult(document=doc)
    location = describe(doc)

    def error(path: str, message: str) -> None:
        result.errors.append(ValidationIssue(location, path, message))

    def warning(path: str, message: str) -> None:
        result.warnings.append(ValidationIssue(location, path, message, Severity.WARNING))

    if not is_wasmplugin(doc):
        error("kind", f"not a WasmPlugin (apiVersion {doc.apiVersion!r}, kind {doc.kind!r})")
        return result
    if doc.apiVersion != model.API_VERSION:
        error("apiVersion", f"unsupported version {doc.apiVersion!r}, want {model.API_VERSION!r}")
        return result
    schema_issues = check_wasmplugin_body(doc.body)
    for issue in schema_issues:
        error(issue.path, issue.message)
    if any(issue.structural for issue in schema_issues):
        return result
    try:
        plugin = parse_wasmplugin(doc)
    except WasmPluginError as exc:  # not expected after a clean structural check
        error("", str(exc))
        return result
    for path, message in metadata_findings(plugin):
        error(path, message)
    istiod_errors, istiod_warnings = istiod_findings(plugin)
    for path, message in istiod_errors:
        error(path, message)
    for path, message in [*istiod_warnings, *wasmesh_warnings(plugin)]:
        warning(path, message)
    if result.ok:
        result.plugin = plugin
    return result


def validate_documents(documents: Iterable[Document]) -> ValidationReport:
    """Validate every WasmPlugin document; documents of other kinds go to ``other_documents``."""
    report = ValidationReport()
    for doc in documents:
        if is_wasmplugin(doc):
            report.results.append(validate_document(doc))
        else:
            report.other_documents.append(doc)
    return report


def validate_paths(paths: Iterable[Path | str]) -> tuple[ValidationReport, list[str]]:
    """Load and validate files/directories: (report, load error lines)."""
    loaded = load_all(paths)
    return validate_documents(loaded.documents), loaded.errors
