"""One test per Istio validation rule: the CRD schema/CEL rules and istiod's ValidateWasmPlugin."""

# Exact Istio/Kubernetes messages are kept on one line each, so some lines are long.
# ruff: noqa: E501

from __future__ import annotations

from collections.abc import Callable

import pytest
from wasmplugin_api_helpers import DATA_DIR, spec_document

from wasmesh.api.load import load_documents
from wasmesh.api.validation import ValidationResult, validate_document, validate_documents

Validate = Callable[[str], ValidationResult]
PREFIX = "test.yaml: document 1 (WasmPlugin default/test): "


def error_lines(result: ValidationResult) -> list[str]:
    return [str(issue) for issue in result.errors]


def test_minimal_plugin_is_valid(validate_spec: Validate) -> None:
    result = validate_spec("url: oci://ghcr.io/acme/plugin:1.0")
    assert result.ok and not result.warnings
    assert result.plugin is not None and result.plugin.name == "test"


def test_error_line_names_file_document_plugin_and_field(validate_spec: Validate) -> None:
    result = validate_spec("url: http://test\nsha256: foo")
    assert error_lines(result) == [
        PREFIX
        + "spec.sha256: Invalid value: \"foo\": spec.sha256 in body should match '(^$|^[a-f0-9]{64}$)'",
        PREFIX + "spec.sha256: sha256 field must be 64 characters long",
    ]
    assert result.plugin is None


# --- CRD (apiserver) rules -------------------------------------------------------------------------

CRD_CASES = [
    ("spec: required url", "phase: AUTHN", "spec.url: Required value"),
    (
        "url minLength",
        'url: ""',
        'spec.url: Invalid value: "": spec.url in body should be at least 1 chars long',
    ),
    (
        "url CEL scheme",
        "url: fake://example.com",
        'spec.url: Invalid value: "string": url must have schema one of [http, https, file, oci]',
    ),
    (
        "sha256 pattern (uppercase)",
        "url: http://test\nsha256: " + "A" * 64,
        'spec.sha256: Invalid value: "'
        + "A" * 64
        + "\": spec.sha256 in body should match '(^$|^[a-f0-9]{64}$)'",
    ),
    (
        "imagePullSecret minLength",
        'url: http://test\nimagePullSecret: ""',
        'spec.imagePullSecret: Invalid value: "": spec.imagePullSecret in body should be at least 1 chars long',
    ),
    (
        "imagePullSecret maxLength",
        "url: http://test\nimagePullSecret: " + "s" * 254,
        "spec.imagePullSecret: Too long: may not be more than 253 bytes",
    ),
    (
        "pluginName minLength",
        'url: http://test\npluginName: ""',
        'spec.pluginName: Invalid value: "": spec.pluginName in body should be at least 1 chars long',
    ),
    (
        "pluginName maxLength",
        "url: http://test\npluginName: " + "p" * 257,
        "spec.pluginName: Too long: may not be more than 256 bytes",
    ),
    (
        "phase enum",
        "url: http://test\nphase: AUTH",
        'spec.phase: Unsupported value: "AUTH": supported values: '
        '"UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"',
    ),
    (
        "failStrategy enum number",
        "url: http://test\nfailStrategy: 9",
        'spec.failStrategy: Unsupported value: 9: supported values: "FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"',
    ),
    (
        "imagePullPolicy enum is case-sensitive",
        "url: http://test\nimagePullPolicy: always",
        'spec.imagePullPolicy: Unsupported value: "always": supported values: '
        '"UNSPECIFIED_POLICY", "IfNotPresent", "Always"',
    ),
    (
        "type enum",
        "url: http://test\ntype: TCP",
        'spec.type: Unsupported value: "TCP": supported values: "UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"',
    ),
    (
        "priority type",
        'url: http://test\npriority: "10"',
        'spec.priority: Invalid value: "string": spec.priority in body must be of type integer: "string"',
    ),
    (
        "priority int32",
        "url: http://test\npriority: 2147483648",
        "spec.priority: Invalid value: 2147483648: spec.priority in body must be a 32-bit integer",
    ),
    (
        "selector and targetRefs (CEL)",
        "url: http://test\nselector: {matchLabels: {a: b}}\n"
        "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]",
        'spec: Invalid value: "object": only one of targetRefs or selector can be set',
    ),
    (
        "label key wildcard (CEL)",
        'url: http://test\nselector: {matchLabels: {"app*": b}}',
        'spec.selector.matchLabels: Invalid value: "object": wildcard not allowed in label key match',
    ),
    (
        "label key empty (CEL)",
        'url: http://test\nselector: {matchLabels: {"": b}}',
        'spec.selector.matchLabels: Invalid value: "object": key must not be empty',
    ),
    (
        "label value wildcard (CEL)",
        'url: http://test\nselector: {matchLabels: {app: "b*"}}',
        'spec.selector.matchLabels[app]: Invalid value: "string": wildcard not allowed in label value match',
    ),
    (
        "label value maxLength",
        "url: http://test\nselector: {matchLabels: {app: " + "v" * 64 + "}}",
        "spec.selector.matchLabels[app]: Too long: may not be more than 63 bytes",
    ),
    (
        "targetRef kind required",
        "url: http://test\ntargetRef: {name: gw}",
        "spec.targetRef.kind: Required value",
    ),
    (
        "targetRef kind pattern",
        "url: http://test\ntargetRefs: [{kind: 9Gateway, name: gw}]",
        'spec.targetRefs[0].kind: Invalid value: "9Gateway": spec.targetRefs[0].kind in body should match '
        "'^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$'",
    ),
    (
        "targetRef namespace (CEL)",
        "url: http://test\ntargetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw, namespace: x}]",
        'spec.targetRefs[0].namespace: Invalid value: "string": cross namespace referencing is not currently '
        "supported",
    ),
    (
        "targetRefs maxItems",
        "url: http://test\ntargetRefs: ["
        + ", ".join(f"{{group: gateway.networking.k8s.io, kind: Gateway, name: g{i}}}" for i in range(17))
        + "]",
        "spec.targetRefs: Too many: 17: must have at most 16 items",
    ),
    (
        "env name required",
        "url: http://test\nvmConfig: {env: [{value: x}]}",
        "spec.vmConfig.env[0].name: Required value",
    ),
    (
        "env value maxLength",
        "url: http://test\nvmConfig: {env: [{name: a, value: " + "v" * 2049 + "}]}",
        "spec.vmConfig.env[0].value: Too long: may not be more than 2048 bytes",
    ),
    (
        "env valueFrom HOST with empty value (CEL has())",
        'url: http://test\nvmConfig: {env: [{name: a, valueFrom: HOST, value: ""}]}',
        'spec.vmConfig.env[0]: Invalid value: "object": value may only be set when valueFrom is INLINE',
    ),
    (
        "port number maximum",
        "url: http://test\nmatch: [{ports: [{number: 65536}]}]",
        "spec.match[0].ports[0].number: Invalid value: 65536: spec.match[0].ports[0].number in body should be "
        "less than or equal to 65535",
    ),
    (
        "duplicate port (list-map key)",
        "url: http://test\nmatch: [{ports: [{number: 80}, {number: 80}]}]",
        'spec.match[0].ports[1]: Duplicate value: map[string]interface {}{"number":80}',
    ),
    (
        "match mode enum",
        "url: http://test\nmatch: [{mode: INBOUND}]",
        'spec.match[0].mode: Unsupported value: "INBOUND": supported values: '
        '"UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"',
    ),
    (
        "pluginConfig must be an object",
        "url: http://test\npluginConfig: [1, 2]",
        'spec.pluginConfig: Invalid value: "array": spec.pluginConfig in body must be of type object: "array"',
    ),
    ("unknown spec field", "url: http://test\nrootID: x", 'spec.rootID: unknown field "rootID"'),
    (
        "snake_case field names are hinted",
        "url: http://test\nplugin_config: {}",
        'spec.plugin_config: unknown field "plugin_config" (did you mean "pluginConfig"? '
        "Kubernetes uses the JSON names)",
    ),
]


@pytest.mark.parametrize(("rule", "spec", "expected"), CRD_CASES, ids=[case[0] for case in CRD_CASES])
def test_crd_rule(validate_spec: Validate, rule: str, spec: str, expected: str) -> None:
    assert PREFIX + expected in error_lines(validate_spec(spec)), rule


# --- istiod ValidateWasmPlugin rules -------------------------------------------------------------------

ISTIOD_CASES = [
    (
        "one of selector/targetRef/targetRefs",
        "url: http://test\nselector: {matchLabels: {a: b}}\ntargetRef: {kind: Service, name: s}",
        "spec: only one of targetRefs or workloadSelector can be set",
    ),
    (
        "empty selector key",
        'url: http://test\nselector: {matchLabels: {"": b}}',
        'spec.selector.matchLabels: empty key is not supported in selector: "=b"',
    ),
    (
        "wildcard in selector",
        'url: http://test\nselector: {matchLabels: {app: "b*"}}',
        'spec.selector.matchLabels: wildcard is not supported in selector: "app=b*"',
    ),
    (
        "targetRef name",
        'url: http://test\ntargetRef: {kind: Service, name: ""}',
        "spec.targetRef: targetRef name must be set",
    ),
    (
        "targetRef namespace",
        "url: http://test\ntargetRef: {kind: Service, name: s, namespace: other}",
        "spec.targetRef: targetRef namespace must not be set; cross namespace referencing is not supported",
    ),
    (
        "targetRef kind",
        "url: http://test\ntargetRefs: [{kind: Deployment, group: apps, name: d}]",
        "spec.targetRefs[0]: targetRef must be to one of [core/v1/Service networking.istio.io/v1/ServiceEntry "
        "gateway.networking.k8s.io/v1/Gateway gateway.networking.k8s.io/v1/GatewayClass] but was apps/Deployment",
    ),
    ("url needs to be set", 'url: ""', "spec.url: url field needs to be set"),
    ("url scheme", "url: fake://example.com", "spec.url: url contains unsupported scheme: fake"),
    (
        "host:port without scheme parses as a scheme (Go's rule)",
        "url: localhost:5000/plugin",
        "spec.url: url contains unsupported scheme: localhost",
    ),
    (
        "url parse failure",
        'url: "#%blah$#@"',
        'spec.url: failed to parse url: parse "#%blah$#@": invalid URI for request',
    ),
    (
        "url bad escape",
        'url: "http://x/%zz"',
        'spec.url: failed to parse url: parse "http://x/%zz": invalid URL escape "%zz"',
    ),
    (
        "sha256 length",
        "url: http://test\nsha256: abc",
        "spec.sha256: sha256 field must be 64 characters long",
    ),
    (
        "sha256 pattern",
        "url: http://test\nsha256: " + "g" * 64,
        "spec.sha256: sha256 field must match [a-f0-9]{64} pattern",
    ),
    (
        "imagePullSecret length",
        "url: http://test\nimagePullSecret: " + "s" * 254,
        "spec.imagePullSecret: imagePullSecret field must be less than 253 characters long",
    ),
    (
        "pluginName length (Istio checks >256, says 255)",
        "url: http://test\npluginName: " + "p" * 257,
        "spec.pluginName: pluginName field must be less than 255 characters long",
    ),
    (
        "env name empty",
        'url: http://test\nvmConfig: {env: [{name: ""}]}',
        "spec.vmConfig.env[0]: spec.vmConfig.env invalid",
    ),
    (
        "env name length",
        "url: http://test\nvmConfig: {env: [{name: " + "n" * 257 + "}]}",
        "spec.vmConfig.env[0]: env.name field must be less than 255 characters long",
    ),
    (
        "duplicate env",
        "url: http://test\nvmConfig: {env: [{name: a}, {name: a}]}",
        "spec.vmConfig.env[1]: duplicate env",
    ),
    (
        "env value with HOST",
        "url: http://test\nvmConfig: {env: [{name: a, valueFrom: 1, value: v}]}",
        "spec.vmConfig.env[0]: value may only be set when valueFrom is INLINE",
    ),
    (
        "port out of range",
        "url: http://test\nmatch: [{ports: [{number: 0}]}]",
        "spec.match[0].ports[0].number: spec.Match[0].Ports[0] is out of range: 0",
    ),
]


@pytest.mark.parametrize(("rule", "spec", "expected"), ISTIOD_CASES, ids=[case[0] for case in ISTIOD_CASES])
def test_istiod_rule(validate_spec: Validate, rule: str, spec: str, expected: str) -> None:
    assert PREFIX + expected in error_lines(validate_spec(spec)), rule


def test_empty_selector_is_a_warning_not_an_error(validate_spec: Validate) -> None:
    result = validate_spec("url: http://test\nselector: {}")
    assert result.ok
    assert [str(issue) for issue in result.warnings] == [
        PREFIX + "spec.selector: workload selector specified without labels"
    ]


def test_verification_key_is_accepted_with_a_warning(validate_spec: Validate) -> None:
    result = validate_spec("url: http://test\nverificationKey: abc")
    assert result.ok and result.plugin is not None and result.plugin.verification_key == "abc"
    assert "verificationKey" in str(result.warnings[0])


def test_structural_errors_skip_istiod_checks(validate_spec: Validate) -> None:
    result = validate_spec('url: http://test\nsha256: abc\nphase: "NOPE"')
    lines = error_lines(result)
    assert any("Unsupported value" in line for line in lines)
    assert not any("sha256 field must be 64" in line for line in lines)


def test_metadata_name_and_namespace() -> None:
    text = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  namespace: Bad_NS\nspec:\n  url: x\n"
    from pathlib import Path

    from wasmesh.api.load import parse_yaml_stream

    (document,) = parse_yaml_stream(text, Path("m.yaml"))
    lines = [str(issue) for issue in validate_document(document).errors]
    assert lines[0] == (
        "m.yaml: document 1 (WasmPlugin Bad_NS/<unnamed>): metadata.name: "
        "Required value: name or generateName is required"
    )
    assert 'metadata.namespace: Invalid value: "Bad_NS": a lowercase RFC 1123 label' in lines[1]


def test_wrong_api_version_is_an_error() -> None:
    document = spec_document("url: http://test")
    document = type(document)(
        kind="WasmPlugin",
        apiVersion="extensions.istio.io/v1beta1",
        body=document.body,
        source_file=document.source_file,
        doc_index=1,
    )
    (issue,) = validate_document(document).errors
    assert str(issue).endswith(
        "apiVersion: unsupported version 'extensions.istio.io/v1beta1', want 'extensions.istio.io/v1alpha1'"
    )


# --- Istio's own test data ----------------------------------------------------------------------------


def test_istio_invalid_examples_are_rejected_with_istio_messages() -> None:
    documents = load_documents([DATA_DIR / "istio-wasm-invalid.yaml"])
    assert len(documents) == 14
    for result in validate_documents(documents).results:
        expected = result.document.body["metadata"]["annotations"]["expect"]
        lines = [str(issue) for issue in result.errors]
        assert any(expected in line for line in lines), (result.document.name, lines)


def test_istio_valid_examples_and_docs_examples_are_accepted() -> None:
    documents = load_documents([DATA_DIR / "istio-wasm-valid.yaml", DATA_DIR / "istio-docs-examples.yaml"])
    report = validate_documents(documents)
    assert [str(issue) for issue in report.errors] == []
    assert len(report.plugins) == 10


def test_istio_112_docs_typo_selector_labels_is_rejected(validate_spec: Validate) -> None:
    # istio.io's 1.12-1.14 docs wrote `selector: labels:`; the apiserver rejects the unknown field.
    result = validate_spec("url: oci://r/x:1\nselector:\n  labels:\n    istio: ingressgateway")
    assert error_lines(result) == [PREFIX + 'spec.selector.labels: unknown field "labels"']
