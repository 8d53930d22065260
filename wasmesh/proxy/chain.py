"""A listener's plugin chain as one swappable, reference-counted unit.

Every exchange pins the chain it started with; a reload installs a new chain and
retires the old one, whose plugins are unloaded once its last exchange completes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from wasmesh.http.filter import HttpFilterFactory


class PluginChain:
    __slots__ = ("factories", "names", "generation", "in_flight", "retired", "_on_drained", "description")

    def __init__(
        self,
        factories: Sequence[HttpFilterFactory] = (),
        *,
        generation: int = 0,
        on_drained: Callable[[PluginChain], None] | None = None,
        description: Sequence[dict[str, object]] = (),
    ) -> None:
        self.factories: tuple[HttpFilterFactory, ...] = tuple(factories)
        self.names = tuple(f.name for f in self.factories)
        self.generation = generation
        self.in_flight = 0
        self.retired = False
        self._on_drained = on_drained
        # What /config_dump shows for this chain (plugin name, url, phase, priority, ...).
        self.description = list(description)

    def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self._drained()

    def retire(self) -> None:
        """No new exchange will use this chain; release its plugins when the last one ends."""
        if self.retired:
            return
        self.retired = True
        if self.in_flight == 0:
            self._drained()

    def _drained(self) -> None:
        cb, self._on_drained = self._on_drained, None
        if cb is not None:
            cb(self)
