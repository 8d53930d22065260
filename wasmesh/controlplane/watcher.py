"""Watch a config directory by polling file mtimes and keep the store in sync with it.

Each *.yaml/*.yml/*.json file is the source of the resources it defines. A changed file is
reloaded: its valid documents are applied, resources it no longer defines are deleted, and an
invalid document (or a YAML syntax error) is logged as one line and leaves the last good
version in place — it is never pushed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from wasmesh.api.load import DOCUMENT_SUFFIXES, LoadError, load_file
from wasmesh.api.model import WasmPlugin
from wasmesh.controlplane.store import ConfigStore, Key, ResourceRejected
from wasmesh.controlplane.warnings import plugin_warnings

log = logging.getLogger("wasmesh.controlplane")

Signature = tuple[int, int]  # (mtime_ns, size)


class DirectoryWatcher:
    def __init__(
        self,
        directory: Path,
        store: ConfigStore,
        *,
        on_rejected: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        self.directory = directory
        self.store = store
        self.on_rejected = on_rejected
        self._seen: dict[Path, Signature] = {}
        self._keys_by_file: dict[Path, set[Key]] = {}
        self.errors: list[str] = []  # the last error lines, newest last (for tests and /debug)

    def _files(self) -> dict[Path, Signature]:
        found: dict[Path, Signature] = {}
        try:
            children = sorted(self.directory.iterdir())
        except OSError as exc:
            self._error(f"{self.directory}: cannot list config directory: {exc.strerror or exc}")
            return dict(self._seen)
        for child in children:
            if child.suffix not in DOCUMENT_SUFFIXES or child.name.startswith("."):
                continue
            try:
                stat = child.stat()
            except OSError:
                continue  # removed between listing and stat
            if child.is_file():
                found[child] = (stat.st_mtime_ns, stat.st_size)
        return found

    def _error(self, line: str, kind: str = "") -> None:
        log.warning("%s", line)
        self.errors = [*self.errors[-99:], line]
        if self.on_rejected is not None:
            self.on_rejected(kind, [line])

    def scan(self) -> bool:
        """Reload changed files and drop removed ones; True if anything was (re)loaded."""
        current = self._files()
        changed = [path for path, signature in current.items() if self._seen.get(path) != signature]
        removed = [path for path in self._seen if path not in current]
        for path in removed:
            owned = self.store.keys_from_source(str(path))
            for key in self._keys_by_file.pop(path, set()) & owned:
                self.store.delete(*key)
            del self._seen[path]
        for path in changed:
            self._seen[path] = current[path]
            self._load(path)
        return bool(changed or removed)

    def _load(self, path: Path) -> None:
        try:
            documents = load_file(path)
        except LoadError as exc:
            self._error(f"{exc} (keeping the last good config)")
            return
        defined: set[Key] = set()
        for document in documents:
            key: Key = (document.kind, document.namespace, document.name)
            defined.add(key)
            try:
                stored, action = self.store.apply(document, source=str(path))
            except ResourceRejected as exc:
                for line in exc.errors:
                    self._error(f"rejected: {line}", document.kind)
                continue
            if action != "unchanged" and isinstance(stored.parsed, WasmPlugin):
                for warning in plugin_warnings(stored.parsed):
                    log.warning("%s: %s", path, warning)
        owned = self.store.keys_from_source(str(path))
        for key in (self._keys_by_file.get(path, set()) - defined) & owned:
            self.store.delete(*key)
        self._keys_by_file[path] = defined

    async def run(self, interval: float = 0.1) -> None:
        while True:
            self.scan()
            await asyncio.sleep(interval)
