"""Header maps as Envoy presents them to filters.

Names are stored lower-cased (HTTP/1 names are case-insensitive and Proxy-Wasm
plugins see lower-case names, as in Envoy). Request pseudo-headers ``:method``,
``:path``, ``:authority``, ``:scheme`` and response ``:status`` live in the same
map, first, exactly as Envoy serialises them to plugins.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class HeaderMap:
    """An ordered multi-map of ``bytes`` name/value pairs with lower-case names."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._pairs: list[tuple[bytes, bytes]] = [(k.lower(), v) for k, v in pairs]

    @classmethod
    def from_lowercase(cls, pairs: list[tuple[bytes, bytes]]) -> HeaderMap:
        """Adopt ``pairs`` whose names are already lower-case, without copying (hot path)."""
        hm = cls.__new__(cls)
        hm._pairs = pairs
        return hm

    # -- reading ---------------------------------------------------------------
    def get(self, name: bytes) -> bytes | None:
        """First value of ``name`` (Envoy's getHeaderMapValue semantics)."""
        name = name.lower()
        for k, v in self._pairs:
            if k == name:
                return v
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [v for k, v in self._pairs if k == name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, bytes):
            return False
        return self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def pairs(self) -> list[tuple[bytes, bytes]]:
        """The live list of pairs (do not mutate unless you own the map)."""
        return self._pairs

    def byte_size(self) -> int:
        """Sum of name and value lengths, as Envoy's ``HeaderMap::byteSize()``."""
        return sum(len(k) + len(v) for k, v in self._pairs)

    # -- writing ---------------------------------------------------------------
    def add(self, name: bytes, value: bytes) -> None:
        self._pairs.append((name.lower(), value))

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every value of ``name`` with one value, keeping the first position."""
        name = name.lower()
        out: list[tuple[bytes, bytes]] = []
        placed = False
        for k, v in self._pairs:
            if k == name:
                if not placed:
                    out.append((k, value))
                    placed = True
            else:
                out.append((k, v))
        if not placed:
            out.append((name, value))
        self._pairs = out

    def remove(self, name: bytes) -> None:
        name = name.lower()
        self._pairs = [(k, v) for k, v in self._pairs if k != name]

    def replace_all(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        self._pairs = [(k.lower(), v) for k, v in pairs]

    def copy(self) -> HeaderMap:
        return HeaderMap.from_lowercase(list(self._pairs))

    def __repr__(self) -> str:
        return f"HeaderMap({self._pairs!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderMap) and other._pairs == self._pairs
