"""Store, selection and translation to xDS protos (no network)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cp_helpers import plugin_yaml, workload_yaml
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import wrappers_pb2

from wasmesh.api.load import parse_yaml_stream
from wasmesh.controlplane.generator import MeshSnapshotGenerator
from wasmesh.controlplane.resources import ResourceError, parse_workload
from wasmesh.controlplane.store import ConfigStore, ResourceRejected
from wasmesh.xds import types
from wasmesh.xds.client import http_connection_manager
from wasmesh.xds.snapshot import ProxyNode

SOURCE = Path("/tmp/test.yaml")


def apply(store: ConfigStore, text: str) -> list[str]:
    return [store.apply(doc)[1] for doc in parse_yaml_stream(text, SOURCE)]


def wasm_config(generator: MeshSnapshotGenerator, proxy: ProxyNode, name: str) -> wasm_pb2.PluginConfig:
    packed = generator.generate(proxy).get(types.EXTENSION_CONFIG, f"extensions.istio.io/wasmplugin/{name}")
    assert packed is not None, name
    typed = extension_pb2.TypedExtensionConfig()
    packed.Unpack(typed)
    assert typed.typed_config.type_url == types.HTTP_WASM
    wasm = http_wasm_pb2.Wasm()
    typed.typed_config.Unpack(wasm)
    return wasm.config


def chain(generator: MeshSnapshotGenerator, proxy: ProxyNode, listener: str = "http") -> list[str]:
    packed = generator.generate(proxy).get(types.LISTENER, listener)
    assert packed is not None
    decoded = listener_pb2.Listener()
    packed.Unpack(decoded)
    manager = http_connection_manager(decoded)
    assert manager is not None
    for item in manager.http_filters[:-1]:
        source = item.config_discovery
        assert list(source.type_urls) == [types.HTTP_WASM, types.HTTP_RBAC]
        assert source.config_source.HasField("ads")
        assert source.config_source.initial_fetch_timeout.ToSeconds() == 0
        assert source.config_source.HasField("initial_fetch_timeout")
    assert manager.http_filters[-1].name == "envoy.filters.http.router"
    return [item.name.rsplit("/", 1)[-1] for item in manager.http_filters[:-1]]


WEB = ProxyNode(id="web-1", namespace="default", labels={"app": "web"}, workload_name="web-1")


@pytest.fixture
def store() -> ConfigStore:
    store = ConfigStore("istio-system")
    apply(store, workload_yaml("web-1", {"app": "web"}, 10000, 8080))
    return store


def test_plugin_config_fields_match_istio(store: ConfigStore) -> None:
    apply(
        store,
        """
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: auth, namespace: default}
spec:
  url: ghcr.io/example/auth:1.0
  sha256: "SHA"
  imagePullPolicy: Always
  imagePullSecret: regcred
  pluginName: basic_auth
  failStrategy: FAIL_OPEN
  pluginConfig: {realm: test, n: 2}
  vmConfig:
    env:
    - {name: INLINE_KEY, value: v}
    - {name: HOME, valueFrom: HOST}
---
apiVersion: v1
kind: Secret
type: kubernetes.io/dockerconfigjson
metadata: {name: regcred, namespace: default}
data:
  .dockerconfigjson: DOCKERCONFIG
""".replace("SHA", "a" * 64).replace("DOCKERCONFIG", base64.b64encode(b'{"auths":{}}').decode()),
    )
    generator = MeshSnapshotGenerator(store)
    config = wasm_config(generator, WEB, "default.auth")
    assert config.name == "default.auth"
    assert config.root_id == "basic_auth"
    assert config.failure_policy == wasm_pb2.FAIL_OPEN
    value = wrappers_pb2.StringValue()
    config.configuration.Unpack(value)
    assert json.loads(value.value) == {"n": 2, "realm": "test"}
    vm = config.vm_config
    assert vm.runtime == "envoy.wasm.runtime.v8"
    assert vm.code.remote.http_uri.uri == "oci://ghcr.io/example/auth:1.0"
    assert vm.code.remote.http_uri.cluster == "_"
    assert vm.code.remote.http_uri.timeout.ToSeconds() == 30
    assert vm.code.remote.sha256 == "a" * 64
    env = dict(vm.environment_variables.key_values)
    stored = store.get("WasmPlugin", "default", "auth")
    assert stored is not None
    assert env["ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION"] == stored.resource_version
    assert env["ISTIO_META_WASM_IMAGE_PULL_POLICY"] == "Always"
    assert env["ISTIO_META_WASM_IMAGE_PULL_SECRET"] == '{"auths":{}}'
    assert env["INLINE_KEY"] == "v"
    assert list(vm.environment_variables.host_env_keys) == ["HOME"]


def test_local_file_and_failure_policy_default(store: ConfigStore) -> None:
    apply(store, plugin_yaml("local", "file:///opt/plugin.wasm"))
    config = wasm_config(MeshSnapshotGenerator(store), WEB, "default.local")
    assert config.vm_config.code.local.filename == "/opt/plugin.wasm"
    assert config.failure_policy == wasm_pb2.FAIL_CLOSED
    assert config.configuration.ByteSize() == 0  # absent pluginConfig → empty Any
    assert "ISTIO_META_WASM_IMAGE_PULL_POLICY" not in config.vm_config.environment_variables.key_values


def test_selection_and_order(store: ConfigStore) -> None:
    apply(store, plugin_yaml("unspecified-low", "file:///p.wasm", priority=1))
    apply(store, plugin_yaml("unspecified-high", "file:///p.wasm", priority=5))
    apply(store, plugin_yaml("stats", "file:///p.wasm", phase="STATS", priority=100))
    apply(store, plugin_yaml("authn", "file:///p.wasm", phase="AUTHN"))
    apply(store, plugin_yaml("authz", "file:///p.wasm", phase="AUTHZ"))
    apply(store, plugin_yaml("other-app", "file:///p.wasm", selector={"app": "db"}))
    apply(
        store, plugin_yaml("mesh-wide", "file:///p.wasm", namespace="istio-system", phase="AUTHN", priority=9)
    )
    apply(store, plugin_yaml("elsewhere", "file:///p.wasm", namespace="prod"))
    generator = MeshSnapshotGenerator(store)
    assert chain(generator, WEB) == [
        "istio-system.mesh-wide",
        "default.authn",
        "default.authz",
        "default.stats",
        "default.unspecified-high",
        "default.unspecified-low",
    ]
    # ECDS serves the proxy's namespace and the root namespace by name, nothing else.
    names = generator.generate(WEB).names(types.EXTENSION_CONFIG)
    assert "extensions.istio.io/wasmplugin/default.other-app" in names
    assert "extensions.istio.io/wasmplugin/istio-system.mesh-wide" in names
    assert "extensions.istio.io/wasmplugin/prod.elsewhere" not in names
    # Node labels override the Workload's labels.
    as_db = ProxyNode(id="web-1", namespace="default", labels={"app": "db"}, workload_name="web-1")
    assert "default.other-app" in chain(generator, as_db)


def test_match_mode_and_port(store: ConfigStore) -> None:
    text = plugin_yaml("client-only", "file:///p.wasm").rstrip() + "\n  match:\n  - mode: CLIENT\n"
    apply(store, text)
    text = plugin_yaml("port-10000", "file:///p.wasm").rstrip() + "\n  match:\n  - ports: [{number: 10000}]\n"
    apply(store, text)
    generator = MeshSnapshotGenerator(store)
    assert chain(generator, WEB) == ["default.port-10000"]  # the listener is SERVER on 10000


def test_gateway_target_refs() -> None:
    store = ConfigStore()
    gateway = yaml.safe_load(workload_yaml("ingress", {"istio": "ingress"}, 8443, 8080))
    gateway["kind"] = "Gateway"
    gateway["spec"]["listeners"][0]["mode"] = "CLIENT"
    apply(store, yaml.safe_dump(gateway))
    targeted = plugin_yaml("gw", "file:///p.wasm").rstrip() + (
        "\n  targetRefs:\n  - {group: gateway.networking.k8s.io, kind: Gateway, name: ingress}\n"
    )
    apply(store, targeted)
    other = plugin_yaml("gw-other", "file:///p.wasm").rstrip() + (
        "\n  targetRefs:\n  - {group: gateway.networking.k8s.io, kind: Gateway, name: other}\n"
    )
    apply(store, other)
    generator = MeshSnapshotGenerator(store)
    proxy = ProxyNode(id="ingress", namespace="default", labels={}, workload_name="ingress")
    assert chain(generator, proxy) == ["default.gw"]
    # A sidecar ignores targetRefs plugins.
    apply(store, workload_yaml("web-1", {"app": "web"}, 10000, 8080))
    assert chain(generator, WEB) == []


def test_store_metadata_like_apiserver(store: ConfigStore) -> None:
    assert apply(store, plugin_yaml("p", "file:///p.wasm", {"a": 1})) == ["created"]
    first = store.get("wasmplugins", "default", "p")
    assert first is not None
    metadata: dict[str, Any] = dict(first.body["metadata"])
    assert metadata["generation"] == 1 and metadata["creationTimestamp"].endswith("Z")
    version = store.version
    assert apply(store, plugin_yaml("p", "file:///p.wasm", {"a": 1})) == ["unchanged"]
    assert store.version == version  # no change, no push
    assert apply(store, plugin_yaml("p", "file:///p.wasm", {"a": 2})) == ["configured"]
    second = store.get("WasmPlugin", "default", "p")
    assert second is not None
    assert second.body["metadata"]["generation"] == 2
    assert int(second.resource_version) > int(first.resource_version)
    assert second.body["metadata"]["creationTimestamp"] == metadata["creationTimestamp"]


def test_invalid_plugin_rejected_with_istio_message(store: ConfigStore) -> None:
    with pytest.raises(ResourceRejected) as caught:
        apply(store, plugin_yaml("bad", "fake://x"))
    assert any("url" in line and "WasmPlugin default/bad" in line for line in caught.value.errors)
    assert store.get("WasmPlugin", "default", "bad") is None


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"listeners": [{"port": 70000}]}, "spec.listeners[0].port: port out of range: 70000"),
        ({"listeners": [{"port": 80, "mode": "BOTH", "virtualHosts": []}]}, "spec.listeners[0].mode"),
        ({"clusters": [{"name": "c", "endpoints": ["nohost"]}]}, "spec.clusters[0].endpoints[0]"),
        ({"bogus": 1}, "spec.bogus: unknown field"),
    ],
)
def test_workload_errors_name_the_field(patch: dict[str, Any], message: str) -> None:
    body = yaml.safe_load(workload_yaml("w", {}, 80, 81))
    body["spec"].update(patch)
    with pytest.raises(ResourceError) as caught:
        parse_workload(body, "w.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("w.yaml: Workload default/w: ")


def test_route_to_unknown_cluster_is_rejected() -> None:
    body = yaml.safe_load(workload_yaml("w", {}, 80, 81))
    body["spec"]["clusters"][0]["name"] = "other"
    with pytest.raises(ResourceError, match=r"routes\[0\]\.cluster: unknown cluster 'echo'"):
        parse_workload(body)
