"""wasmesh proxies as xDS clients of the real control plane, over real sockets."""

from __future__ import annotations

from pathlib import Path

from pxds_support import (
    ProxyThread,
    api_call,
    chain_of,
    eventually,
    free_port,
    metric_value,
    wasmplugin_yaml,
    workload_yaml,
)

from wasmesh.controlplane.server import ControlPlane


def test_apply_change_reorder_delete_follow_without_restart(
    control_plane: ControlPlane, mark_plugin: Path, echo_port: int
) -> None:
    port = free_port()
    api = control_plane.api_port
    api_call(api, "apply", workload_yaml("web-1", {"app": "web"}, port, echo_port))
    proxy = ProxyThread(control_plane.xds_port, "web-1", {"app": "web"})
    try:
        eventually(lambda: chain_of(port) == [], what="listener serving without plugins")
        url = f"file://{mark_plugin}"
        api_call(
            api, "apply", wasmplugin_yaml("a", url, {"id": "a"}, selector={"matchLabels": {"app": "web"}})
        )
        eventually(lambda: chain_of(port) == ["a"], what="plugin a serving")

        api_call(
            api, "apply", wasmplugin_yaml("a", url, {"id": "a2"}, selector={"matchLabels": {"app": "web"}})
        )
        eventually(lambda: chain_of(port) == ["a2"], what="config change followed")

        api_call(api, "apply", wasmplugin_yaml("b", url, {"id": "b"}, priority=10))
        eventually(lambda: chain_of(port) == ["b", "a2"], what="b first by priority")
        assert proxy.proxy.chain_names("http") == ["default.b", "default.a"]

        api_call(api, "apply", wasmplugin_yaml("a", url, {"id": "a2"}, phase="AUTHN"))
        eventually(lambda: chain_of(port) == ["a2", "b"], what="AUTHN phase moves a first")

        api_call(api, "delete", wasmplugin_yaml("b", url))
        eventually(lambda: chain_of(port) == ["a2"], what="b deleted")
        assert proxy.proxy.server.stats.config_reload_failed == 0
    finally:
        proxy.stop()


def test_plugin_failing_on_configure_is_nacked_and_last_good_config_serves(
    control_plane: ControlPlane, mark_plugin: Path, echo_port: int
) -> None:
    port = free_port()
    api = control_plane.api_port
    url = f"file://{mark_plugin}"
    api_call(api, "apply", workload_yaml("web-1", {"app": "web"}, port, echo_port))
    api_call(api, "apply", wasmplugin_yaml("a", url, {"id": "a"}))
    proxy = ProxyThread(control_plane.xds_port, "web-1", {"app": "web"})
    try:
        eventually(lambda: chain_of(port) == ["a"], what="plugin a serving")
        rejects = 'pilot_total_xds_rejects{type="ecds"}'
        before = metric_value(api, rejects)
        api_call(api, "apply", wasmplugin_yaml("a", url, {"fail": 1}))
        eventually(lambda: metric_value(api, rejects) > before, what="ECDS NACK counted")
        assert chain_of(port) == ["a"]  # the last good chain keeps serving
        assert "on_configure" in proxy.proxy.last_error or "returned false" in proxy.proxy.last_error

        # A new plugin that cannot load: its listener keeps the old version (warming never ends).
        api_call(api, "apply", wasmplugin_yaml("a", url, {"id": "a"}))
        eventually(lambda: chain_of(port) == ["a"], what="recovered")
        before = metric_value(api, rejects)
        api_call(api, "apply", wasmplugin_yaml("bad", url, {"fail": 1}, priority=5))
        eventually(lambda: metric_value(api, rejects) > before, what="second NACK counted")
        assert chain_of(port) == ["a"]

        # The next good change is applied again.
        api_call(api, "delete", wasmplugin_yaml("bad", url))
        api_call(api, "apply", wasmplugin_yaml("a", url, {"id": "a3"}))
        eventually(lambda: chain_of(port) == ["a3"], what="next good config applied")
    finally:
        proxy.stop()


def test_label_selection_across_proxies(
    control_plane: ControlPlane, mark_plugin: Path, echo_port: int
) -> None:
    api = control_plane.api_port
    web_port, api_port = free_port(), free_port()
    api_call(api, "apply", workload_yaml("web-1", {"app": "web"}, web_port, echo_port))
    api_call(api, "apply", workload_yaml("api-1", {"app": "api"}, api_port, echo_port))
    web = ProxyThread(control_plane.xds_port, "web-1", {"app": "web"})
    backend = ProxyThread(control_plane.xds_port, "api-1", {"app": "api"})
    try:
        url = f"file://{mark_plugin}"
        api_call(
            api,
            "apply",
            wasmplugin_yaml("only-api", url, {"id": "api"}, selector={"matchLabels": {"app": "api"}}),
        )
        api_call(api, "apply", wasmplugin_yaml("everyone", url, {"id": "all"}))
        eventually(lambda: sorted(chain_of(api_port) or []) == ["all", "api"], what="api gets both")
        eventually(lambda: chain_of(web_port) == ["all"], what="web gets only the unselective plugin")
        api_call(api, "delete", wasmplugin_yaml("only-api", url))
        eventually(lambda: chain_of(api_port) == ["all"], what="deleted from the selected proxy")
    finally:
        web.stop()
        backend.stop()
