"""The config-directory watcher: reload on change, keep last good on errors, delete on removal."""

from __future__ import annotations

import os
from pathlib import Path

from cp_helpers import plugin_yaml, workload_yaml

from wasmesh.controlplane.store import ConfigStore
from wasmesh.controlplane.watcher import DirectoryWatcher


def touch_later(path: Path, text: str) -> None:
    """Rewrite and move the mtime forward, so a same-size rewrite within one tick is still seen."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10_000_000, before + 10_000_000))


def test_reload_keep_last_good_and_delete(tmp_path: Path) -> None:
    store = ConfigStore()
    watcher = DirectoryWatcher(tmp_path, store)
    plugins = tmp_path / "plugins.yaml"
    plugins.write_text(plugin_yaml("a", "file:///a.wasm") + "---\n" + plugin_yaml("b", "file:///b.wasm"))
    (tmp_path / "workload.yaml").write_text(workload_yaml("web-1", {"app": "web"}, 10000, 8080))
    (tmp_path / "notes.txt").write_text("ignored")
    assert watcher.scan()
    assert [item.name for item in store.select("WasmPlugin")] == ["a", "b"]
    assert store.get("Workload", "default", "web-1") is not None
    assert not watcher.scan()  # nothing changed, nothing reloaded
    version = store.version

    # A YAML syntax error keeps everything the file defined; one line names file and line.
    touch_later(plugins, "apiVersion: [unclosed\n")
    watcher.scan()
    assert [item.name for item in store.select("WasmPlugin")] == ["a", "b"]
    assert "plugins.yaml: line" in watcher.errors[-1] and "keeping the last good config" in watcher.errors[-1]
    assert store.version == version

    # An invalid document keeps its last good version; a removed document is deleted;
    # an unsupported kind is reported and does not break anything.
    other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n"
    touch_later(plugins, plugin_yaml("a", "fake://x") + "---\n" + other)
    watcher.scan()
    assert [item.name for item in store.select("WasmPlugin")] == ["a"]
    a = store.get("WasmPlugin", "default", "a")
    assert a is not None and a.body["spec"]["url"] == "file:///a.wasm"
    assert any("rejected:" in line and "WasmPlugin default/a" in line for line in watcher.errors)
    assert any("ConfigMap" in line for line in watcher.errors)

    plugins.unlink()
    watcher.scan()
    assert store.select("WasmPlugin") == []
    assert store.get("Workload", "default", "web-1") is not None
