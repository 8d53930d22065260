"""Hot reload from files: poll modification times, rebuild, swap (bad config → old one keeps serving)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

from wasmesh.proxy.config import ConfigError, ProxyConfig
from wasmesh.proxy.server import ProxyServer

log = logging.getLogger("wasmesh.proxy.reload")


class ConfigSource(Protocol):
    """Where a worker's configuration comes from; picklable so worker processes can re-load it."""

    def load(self) -> ProxyConfig:
        """Raise ConfigError (one line naming file and field) when the configuration is bad."""


def watched_paths(config: ProxyConfig) -> list[Path]:
    """The config file, plugin YAML files/dirs, and local (file://) modules the config uses."""
    paths = [Path(p) for p in config.watched_files]
    for r in config.plugins:
        spec = r.body.get("spec")
        url = spec.get("url") if isinstance(spec, dict) else None
        if isinstance(url, str) and url.startswith("file://"):
            p = Path(unquote(url[len("file://") :]))
            if not p.is_absolute() and r.source != "<inline>":
                p = Path(r.source).parent / p
            paths.append(p)
    return paths


def _stamp(paths: list[Path]) -> dict[str, tuple[float, int]]:
    out: dict[str, tuple[float, int]] = {}
    for p in paths:
        targets = [p]
        if p.is_dir():
            targets += sorted(c for c in p.iterdir() if c.suffix in (".yaml", ".yml"))
        for t in targets:
            try:
                st = os.stat(t)
                out[str(t)] = (st.st_mtime, st.st_size)
            except OSError:
                out[str(t)] = (-1.0, -1)
    return out


class ReloadWatcher:
    def __init__(self, source: ConfigSource, server: ProxyServer, interval_s: float | None = None) -> None:
        self.source = source
        self.server = server
        self.interval_s = interval_s if interval_s is not None else server.config.reload_poll_s
        self._stamps = _stamp(watched_paths(server.config))

    async def check_once(self) -> bool | None:
        """Reload if a watched file changed: True applied, False rejected, None nothing changed."""
        stamps = _stamp(watched_paths(self.server.config))
        if stamps == self._stamps:
            return None
        self._stamps = stamps
        try:
            config = await asyncio.to_thread(self.source.load)
        except ConfigError as exc:
            self.server.stats.config_reload_failed += 1
            log.error("reload rejected, keeping the current configuration: %s", exc)
            return False
        ok = await self.server.apply_config(config)
        self._stamps = _stamp(watched_paths(self.server.config))
        return ok

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_once()
            except Exception:
                log.exception("reload check failed")
