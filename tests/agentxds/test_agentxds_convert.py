"""ECDS conversion with the real module cache fetching from a local HTTP server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentxds_support import ModuleServer, tagged_plugin
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.wasm.v3 import wasm_pb2 as network_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import any_pb2, json_format, struct_pb2
from udpa.type.v1 import typed_struct_pb2

from wasmesh.agent.cache import ModuleCache
from wasmesh.agent.convert import ConversionError, EcdsConverter
from wasmesh.agent.metrics import AgentMetrics
from wasmesh.agent.options import CacheOptions
from wasmesh.controlplane.translate import PluginView, build_extension_config

HTTP_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"


@pytest.fixture
def converter(tmp_path: Path) -> Iterator[EcdsConverter]:
    metrics = AgentMetrics()
    cache = ModuleCache(CacheOptions(dir=tmp_path / "cache", http_max_retries=1), metrics)
    yield EcdsConverter(cache, metrics)
    cache.close()


def pack(item: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(item)
    return packed


def istiod_resource(url: str, **fields: object) -> any_pb2.Any:
    """An ECDS resource exactly as the control plane builds it for a WasmPlugin."""
    view = PluginView(namespace="default", name="p", resource_version="7", url=url, **fields)  # type: ignore[arg-type]
    return pack(build_extension_config(view))


def unpack_extension(resource: any_pb2.Any) -> extension_pb2.TypedExtensionConfig:
    extension = extension_pb2.TypedExtensionConfig()
    assert resource.Unpack(extension)
    return extension


def test_remote_module_becomes_local_file_and_agent_env_is_stripped(
    converter: EcdsConverter, module_server: ModuleServer
) -> None:
    url, sha = module_server.add("/convert-ok.wasm", tagged_plugin("convert-ok"))
    resource = istiod_resource(url, sha256=sha, env={"USER_KEY": "kept"}, pull_policy="Always")
    (converted,) = asyncio.run(converter.convert_response([resource]))

    extension = unpack_extension(converted)
    assert extension.name == "extensions.istio.io/wasmplugin/default.p"
    wasm = http_wasm_pb2.Wasm()
    assert extension.typed_config.Unpack(wasm)
    vm = wasm.config.vm_config
    assert vm.code.WhichOneof("specifier") == "local"
    local = Path(vm.code.local.filename)
    assert local.read_bytes() == module_server.modules["/convert-ok.wasm"]
    assert local.stem == sha
    assert dict(vm.environment_variables.key_values) == {"USER_KEY": "kept"}
    assert converter.metrics.config_conversion_count.value("success") == 1
    assert converter.metrics.config_conversion_duration.count() == 1


def test_only_agent_env_means_no_environment_left(
    converter: EcdsConverter, module_server: ModuleServer
) -> None:
    url, _ = module_server.add("/convert-noenv.wasm", tagged_plugin("convert-noenv"))
    (converted,) = asyncio.run(converter.convert_response([istiod_resource(url)]))
    wasm = http_wasm_pb2.Wasm()
    unpack_extension(converted).typed_config.Unpack(wasm)
    assert not wasm.config.vm_config.HasField("environment_variables")


@pytest.mark.parametrize(
    ("fail_strategy", "allow"), [("FAIL_CLOSE", False), ("FAIL_OPEN", True), ("FAIL_RELOAD", False)]
)
def test_fetch_failure_becomes_rbac_of_the_same_name(
    converter: EcdsConverter,
    module_server: ModuleServer,
    caplog: pytest.LogCaptureFixture,
    fail_strategy: str,
    allow: bool,
) -> None:
    resource = istiod_resource(module_server.url("/absent.wasm"), fail_strategy=fail_strategy)
    with caplog.at_level(logging.ERROR, logger="wasmesh.agent.convert"):
        (converted,) = asyncio.run(converter.convert_response([resource]))
    extension = unpack_extension(converted)
    assert extension.name == "extensions.istio.io/wasmplugin/default.p"
    assert extension.typed_config.type_url == HTTP_RBAC_TYPE
    rbac = http_rbac_pb2.RBAC()
    extension.typed_config.Unpack(rbac)
    if allow:
        assert not rbac.HasField("rules") and rbac.rules_stat_prefix == "wasm-default-allow"
    else:
        assert rbac.HasField("rules") and not rbac.rules.policies
        assert rbac.rules_stat_prefix == "wasm-default-deny"
    verdict = "allow" if allow else "deny"
    assert "error in converting the wasm config to local: cannot fetch Wasm module" in caplog.text
    assert f". applying {verdict} RBAC filter" in caplog.text
    assert converter.metrics.config_conversion_count.value("fetch_failure") == 1


def test_missing_pull_secret_and_checksum_mismatch_fail_closed(
    converter: EcdsConverter, module_server: ModuleServer
) -> None:
    url, _ = module_server.add("/convert-sum.wasm", tagged_plugin("convert-sum"))
    secretless = istiod_resource("oci://127.0.0.1:1/never:1", pull_secret_json="")
    mismatched = istiod_resource(url, sha256="0" * 64)
    converted = asyncio.run(converter.convert_response([secretless, mismatched]))
    for item in converted:
        assert unpack_extension(item).typed_config.type_url == HTTP_RBAC_TYPE
    assert converter.metrics.config_conversion_count.value("fetch_failure") == 2
    assert module_server.requests.count("/convert-sum.wasm") == 1  # the secretless one never fetched


def test_network_wasm_fails_to_network_rbac(converter: EcdsConverter, module_server: ModuleServer) -> None:
    resource = istiod_resource(module_server.url("/absent-net.wasm"), plugin_type="NETWORK")
    (converted,) = asyncio.run(converter.convert_response([resource]))
    extension = unpack_extension(converted)
    rbac = network_rbac_pb2.RBAC()
    assert extension.typed_config.Unpack(rbac)
    assert rbac.stat_prefix == "wasm-default-deny" and rbac.HasField("rules")


def test_typed_struct_wrapped_wasm_is_converted(
    converter: EcdsConverter, module_server: ModuleServer
) -> None:
    url, _ = module_server.add("/convert-struct.wasm", tagged_plugin("convert-struct"))
    wasm = http_wasm_pb2.Wasm(
        config=wasm_pb2.PluginConfig(name="s", vm_config=wasm_pb2.VmConfig(runtime="envoy.wasm.runtime.v8"))
    )
    wasm.config.vm_config.code.remote.http_uri.uri = url
    wasm.config.vm_config.code.remote.http_uri.cluster = "_"
    wasm.config.vm_config.code.remote.sha256 = "nil"  # istiod's "no checksum" marker
    value = struct_pb2.Struct()
    value.update(json_format.MessageToDict(wasm))
    typed_struct = typed_struct_pb2.TypedStruct(type_url=wasm.DESCRIPTOR.full_name, value=value)
    typed_struct.type_url = "type.googleapis.com/" + typed_struct.type_url
    resource = pack(extension_pb2.TypedExtensionConfig(name="wrapped", typed_config=pack(typed_struct)))

    (converted,) = asyncio.run(converter.convert_response([resource]))
    extension = unpack_extension(converted)
    out = http_wasm_pb2.Wasm()
    assert extension.typed_config.Unpack(out)  # comes back as a typed Wasm filter
    assert (
        Path(out.config.vm_config.code.local.filename).read_bytes()
        == module_server.modules["/convert-struct.wasm"]
    )


def test_local_and_non_wasm_resources_pass_through(converter: EcdsConverter, tmp_path: Path) -> None:
    local = istiod_resource(f"file://{tmp_path}/x.wasm")
    other = pack(extension_pb2.TypedExtensionConfig(name="rbac", typed_config=pack(http_rbac_pb2.RBAC())))
    network_local = istiod_resource(f"file://{tmp_path}/n.wasm", plugin_type="NETWORK")
    resources = [local, other, network_local]
    assert asyncio.run(converter.convert_response(resources)) == resources
    assert converter.metrics.config_conversion_count.value("no_remote_load") == 3


def test_unreadable_resources_raise_for_a_nack(converter: EcdsConverter) -> None:
    no_code = pack(
        extension_pb2.TypedExtensionConfig(
            name="nocode", typed_config=pack(network_wasm_pb2.Wasm(config=wasm_pb2.PluginConfig()))
        )
    )
    no_typed_config = pack(extension_pb2.TypedExtensionConfig(name="empty"))
    garbage = any_pb2.Any(type_url=no_code.type_url, value=b"\xff\xff\xff")
    for resource, message in (
        (no_code, "no remote and local load found in Wasm Network filter 'nocode'"),
        (no_typed_config, "typed extension config 'empty' does not contain any typed config"),
        (garbage, "failed to unmarshal extension config resource"),
    ):
        with pytest.raises(ConversionError, match=message):
            asyncio.run(converter.convert_response([resource]))
    assert converter.metrics.config_conversion_count.value("unmarshal_failure") == 3


def test_conversion_can_be_disabled(tmp_path: Path, module_server: ModuleServer) -> None:
    metrics = AgentMetrics()
    cache = ModuleCache(CacheOptions(dir=tmp_path), metrics)
    try:
        converter = EcdsConverter(cache, metrics, enabled=False)
        resource = istiod_resource(module_server.url("/whatever.wasm"))
        assert asyncio.run(converter.convert_response([resource])) == [resource]
        assert metrics.config_conversion_duration.count() == 0
    finally:
        cache.close()


def test_many_resources_of_one_response_keep_their_order(
    converter: EcdsConverter, module_server: ModuleServer
) -> None:
    urls = [module_server.add(f"/par-{i}.wasm", tagged_plugin(f"par-{i}"))[0] for i in range(4)]
    resources = [
        pack(
            extension_pb2.TypedExtensionConfig(
                name=f"r{i}", typed_config=unpack_extension(istiod_resource(url)).typed_config
            )
        )
        for i, url in enumerate(urls)
    ]
    converted = asyncio.run(converter.convert_response(resources))
    assert [unpack_extension(item).name for item in converted] == ["r0", "r1", "r2", "r3"]
    assert converter.metrics.config_conversion_count.value("success") == 4
