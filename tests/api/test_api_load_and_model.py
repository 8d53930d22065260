"""Loading edge cases, parsing into the typed model, and the conversion helpers."""

# Exact Istio/Kubernetes messages are kept on one line each, so some lines are long.
# ruff: noqa: E501

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wasmplugin_api_helpers import DATA_DIR, spec_document

from wasmesh.api import (
    FailStrategy,
    LoadError,
    PluginPhase,
    PluginType,
    PullPolicy,
    WasmPluginError,
    WorkloadMode,
    ecds_resource_name,
    effective_pull_policy,
    load_all,
    load_documents,
    parse_wasmplugin,
    plugin_configuration_json,
)
from wasmesh.api.model import MIN_INT32, EnvValueSource, normalize_url

PLUGIN = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\nspec:\n  url: {url}\n"


def test_multi_document_yaml_with_empty_documents_and_other_kinds(tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text(
        "---\n"
        + PLUGIN.format(name="a", url="oci://r/a:1")
        + "---\n---\n# only a comment\n---\n"
        + "apiVersion: v1\nkind: Secret\nmetadata:\n  name: pull\n"
        + "---\n"
        + PLUGIN.format(name="b", url="oci://r/b:1")
    )
    documents = load_documents([path])
    assert [(d.kind, d.name, d.doc_index) for d in documents] == [
        ("WasmPlugin", "a", 1),
        ("Secret", "pull", 4),
        ("WasmPlugin", "b", 5),
    ]
    assert documents[2].line == 17


def test_json_file_and_sorted_directory(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(PLUGIN.format(name="from-yaml", url="oci://r/b:1"))
    body = {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "from-json"},
        "spec": {"url": "oci://r/a:1", "phase": 2},
    }
    (tmp_path / "a.json").write_text(json.dumps(body))
    (tmp_path / "c.yml").write_text(PLUGIN.format(name="from-yml", url="oci://r/c:1"))
    (tmp_path / "notes.txt").write_text("not: a plugin")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.yaml").write_text(PLUGIN.format(name="nested", url="oci://r/d:1"))
    documents = load_documents([tmp_path])
    assert [d.name for d in documents] == ["from-json", "from-yaml", "from-yml"]
    assert parse_wasmplugin(documents[0]).phase == PluginPhase.AUTHZ


def test_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(PLUGIN.format(name="ok", url="oci://r/a:1") + "  phase: [AUTHN\n")
    with pytest.raises(LoadError) as caught:
        load_documents([path])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line 8 column 1: YAML syntax error: ")


def test_a_non_printable_character_is_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    """YAML's reader refuses it while the loader is made, before any document is read."""
    path = tmp_path / "control.yaml"
    path.write_text("apiVersion: extensions.istio.io/v1alpha1\x1f\n")
    with pytest.raises(LoadError) as caught:
        load_documents([path])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: YAML syntax error: unacceptable character #x001f")


def test_json_syntax_error_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"kind": "WasmPlugin",}')
    result = load_all([tmp_path / "bad.json", tmp_path / "absent.yaml"])
    assert result.errors == [
        f"{tmp_path / 'absent.yaml'}: no such file or directory",
        f"{tmp_path / 'bad.json'}: line 1 column 23: JSON syntax error: Expecting property name enclosed in double "
        "quotes",
    ]


def test_non_mapping_document_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(
        LoadError, match=r"document 1: line 1: expected a mapping with apiVersion and kind, got list"
    ):
        load_documents([path])


def test_every_field_parses_into_the_model() -> None:
    document = spec_document(
        """
selector:
  matchLabels: {app: web}
url: oci://ghcr.io/acme/plugin:2.0
sha256: 1ef0c9a92b0420cf25f7fe5d481b231464bc88f486ca3b9c83ed5cc21d2f6210
imagePullPolicy: Always
imagePullSecret: pull
verificationKey: key
pluginConfig: {b: 1, a: [true, null, 1.5]}
pluginName: root
phase: 3
priority: -5
failStrategy: FAIL_RELOAD
vmConfig:
  env:
  - {name: POD_NAME, valueFrom: HOST}
  - {name: TRUST_DOMAIN, value: cluster.local}
match:
- mode: SERVER
  ports: [{number: 8080}]
type: NETWORK
"""
    )
    plugin = parse_wasmplugin(document)
    assert plugin.selector is not None and dict(plugin.selector.match_labels) == {"app": "web"}
    assert plugin.image_pull_policy == PullPolicy.Always and plugin.image_pull_secret == "pull"
    assert plugin.verification_key == "key" and plugin.plugin_name == "root"
    assert plugin.phase == PluginPhase.STATS and plugin.priority == -5
    assert plugin.fail_strategy == FailStrategy.FAIL_RELOAD and plugin.type == PluginType.NETWORK
    assert plugin.vm_config is not None and plugin.vm_config.env[0].value_from == EnvValueSource.HOST
    assert plugin.host_env_keys == ("POD_NAME",) and plugin.inline_env == {"TRUST_DOMAIN": "cluster.local"}
    assert plugin.match[0].mode == WorkloadMode.SERVER and plugin.match[0].ports[0].number == 8080
    assert plugin.metadata.namespace == "default"
    assert plugin_configuration_json(plugin) == b'{"a":[true,null,1.5],"b":1}'


def test_defaults_of_an_unset_plugin() -> None:
    plugin = parse_wasmplugin(spec_document("url: ghcr.io/acme/plugin:1"))
    assert plugin.priority is None and plugin.sort_priority == MIN_INT32
    assert plugin.phase == PluginPhase.UNSPECIFIED_PHASE and plugin.fail_strategy == FailStrategy.FAIL_CLOSE
    assert plugin.effective_type == PluginType.HTTP
    assert plugin.normalized_url == "oci://ghcr.io/acme/plugin:1" and plugin.url_scheme == "oci"
    assert plugin_configuration_json(plugin) == b""
    assert ecds_resource_name(plugin) == "extensions.istio.io/wasmplugin/default.test"


def test_creation_timestamp_is_parsed_from_unquoted_yaml() -> None:
    body = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: t\n"
    body += "  creationTimestamp: 2024-05-01T10:00:00Z\n  resourceVersion: '42'\n  generation: 3\nspec:\n  url: x\n"
    from wasmesh.api.load import parse_yaml_stream

    (document,) = parse_yaml_stream(body, Path("t.yaml"))
    plugin = parse_wasmplugin(document)
    assert plugin.metadata.creation_timestamp is not None
    assert plugin.metadata.creation_timestamp.isoformat() == "2024-05-01T10:00:00+00:00"
    assert plugin.metadata.resource_version == "42" and plugin.metadata.generation == 3


def test_empty_plugin_config_sends_nothing_and_integral_floats_print_as_integers() -> None:
    assert plugin_configuration_json(parse_wasmplugin(spec_document("url: x\npluginConfig: {}"))) == b""
    plugin = parse_wasmplugin(spec_document("url: x\npluginConfig: {rate: 2.0, name: é}"))
    assert plugin_configuration_json(plugin) == '{"name":"é","rate":2}'.encode()


@pytest.mark.parametrize(
    ("url", "policy", "expected"),
    [
        ("oci://r/x:latest", "", PullPolicy.Always),
        ("r/x:latest", "", PullPolicy.Always),
        ("oci://r/x", "", PullPolicy.IfNotPresent),  # implicit latest is not "latest"
        ("oci://r/x:1.0", "", PullPolicy.IfNotPresent),
        ("https://h/x:latest", "", PullPolicy.IfNotPresent),
        ("oci://r/x:latest", "IfNotPresent", PullPolicy.IfNotPresent),
        ("oci://r/x:1.0", "Always", PullPolicy.Always),
    ],
)
def test_effective_pull_policy(url: str, policy: str, expected: PullPolicy) -> None:
    spec = f"url: {url}" + (f"\nimagePullPolicy: {policy}" if policy else "")
    assert effective_pull_policy(parse_wasmplugin(spec_document(spec))) == expected


def test_normalize_url_follows_go_scheme_rules() -> None:
    assert normalize_url("ghcr.io/a/b:1") == "oci://ghcr.io/a/b:1"
    assert normalize_url("file:///x.wasm") == "file:///x.wasm"
    assert normalize_url("HTTP://h/x") == "HTTP://h/x"


def test_relative_file_url_resolves_against_the_yaml_directory(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    path = tmp_path / "plugins" / "p.yaml"
    path.write_text(PLUGIN.format(name="p", url="file://build/p.wasm"))
    (document,) = load_documents([path])
    assert parse_wasmplugin(document).url == f"file://{tmp_path}/plugins/build/p.wasm"
    assert parse_wasmplugin(document, resolve_relative_to=Path("/srv")).url == "file:///srv/build/p.wasm"
    absolute = spec_document("url: file:///opt/p.wasm", source=str(path))
    assert parse_wasmplugin(absolute).url == "file:///opt/p.wasm"


def test_parse_rejects_structural_problems_with_one_line() -> None:
    with pytest.raises(WasmPluginError) as caught:
        parse_wasmplugin(spec_document("url: x\nphase: LATE\npriority: high"))
    assert str(caught.value) == (
        'test.yaml: document 1 (WasmPlugin default/test): spec.phase: Unsupported value: "LATE": supported '
        'values: "UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS" (and 1 more)'
    )


def test_parse_rejects_other_kinds() -> None:
    (document,) = load_documents([DATA_DIR / "istio-wasm-valid.yaml"])[:1]
    other = type(document)(
        kind="WasmPlugin",
        apiVersion="extensions.higress.io/v1alpha1",
        body={},
        source_file=Path("h.yaml"),
        doc_index=1,
    )
    with pytest.raises(WasmPluginError, match="not a WasmPlugin"):
        parse_wasmplugin(other)
