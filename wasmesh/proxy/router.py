"""Virtual hosts and routes, matched like Envoy's RouteConfiguration.

Virtual host selection by ``:authority`` (case-insensitive): an exact domain wins,
then the longest suffix wildcard (``*.example.com``), then the longest prefix
wildcard (``example.*``), then ``*``. Envoy compares the full Host including a port;
when nothing matches that, we also try the host without its port (Envoy's
``strip_any_host_port``), which is what people expect from a gateway.

Routes are tried in order; the first whose path and header matchers all match wins.
As in Envoy, ``prefix`` compares against the whole ``:path`` (query included) while
``exact`` and ``regex`` (full match) compare against the path with the query removed.
Header matchers see the values of a repeated header joined with ``,``.
Everything works on bytes: no decoding on the hot path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wasmesh.http.headers import HeaderMap
from wasmesh.proxy.config import HeaderMatch, RouteConfig, VirtualHostConfig


@dataclass(frozen=True, slots=True)
class CompiledHeaderMatch:
    name: bytes
    exact: bytes | None
    prefix: bytes | None
    regex: re.Pattern[bytes] | None
    present: bool | None
    invert: bool

    @classmethod
    def build(cls, m: HeaderMatch) -> CompiledHeaderMatch:
        return cls(
            name=m.name.encode(),
            exact=m.exact.encode() if m.exact is not None else None,
            prefix=m.prefix.encode() if m.prefix is not None else None,
            regex=re.compile(m.regex.encode()) if m.regex is not None else None,
            present=m.present,
            invert=m.invert,
        )

    def matches(self, headers: HeaderMap) -> bool:
        values = headers.get_all(self.name)
        if not values:
            result = self.present is False
        else:
            value = values[0] if len(values) == 1 else b",".join(values)
            if self.exact is not None:
                result = value == self.exact
            elif self.prefix is not None:
                result = value.startswith(self.prefix)
            elif self.regex is not None:
                result = self.regex.fullmatch(value) is not None
            else:
                result = self.present is not False
        return result != self.invert


class Route:
    __slots__ = ("config", "name", "cluster", "_prefix", "_exact", "_regex", "_headers", "timeout_s")

    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        self.name = config.name
        self.cluster = config.cluster
        self.timeout_s = config.timeout_s
        m = config.match
        self._prefix = m.prefix.encode() if m.prefix is not None else None
        self._exact = m.exact.encode() if m.exact is not None else None
        self._regex = re.compile(m.regex.encode()) if m.regex is not None else None
        self._headers = tuple(CompiledHeaderMatch.build(h) for h in m.headers)

    @property
    def has_header_matchers(self) -> bool:
        return bool(self._headers)

    def matches(self, path: bytes, headers: HeaderMap) -> bool:
        if self._prefix is not None:
            if not path.startswith(self._prefix):
                return False
        else:
            bare = path.split(b"?", 1)[0]
            if self._exact is not None:
                if bare != self._exact:
                    return False
            elif self._regex is not None and self._regex.fullmatch(bare) is None:
                return False
        for h in self._headers:
            if not h.matches(headers):
                return False
        return True

    def rewrite_path(self, path: bytes) -> bytes:
        """Envoy's prefix_rewrite: replace the matched prefix (or the whole path for exact/regex)."""
        rewrite = self.config.prefix_rewrite
        if rewrite is None:
            return path
        new = rewrite.encode()
        if self._prefix is not None:
            return new + path[len(self._prefix) :]
        _, sep, query = path.partition(b"?")
        return new + sep + query


class VirtualHost:
    __slots__ = ("name", "routes")

    def __init__(self, config: VirtualHostConfig) -> None:
        self.name = config.name
        self.routes = tuple(Route(r) for r in config.routes)

    def select(self, path: bytes, headers: HeaderMap) -> Route | None:
        for r in self.routes:
            if r.matches(path, headers):
                return r
        return None


_VHOST_CACHE_LIMIT = 4096


class Router:
    """Chooses (virtual host, route) for request headers. Immutable after construction."""

    def __init__(self, virtual_hosts: tuple[VirtualHostConfig, ...]) -> None:
        self.virtual_hosts = tuple(VirtualHost(v) for v in virtual_hosts)
        self._exact: dict[bytes, VirtualHost] = {}
        self._suffix: list[tuple[bytes, VirtualHost]] = []  # "*.example.com" stored as ".example.com"
        self._prefix: list[tuple[bytes, VirtualHost]] = []  # "example.*" stored as "example."
        self._default: VirtualHost | None = None
        for vh, cfg in zip(self.virtual_hosts, virtual_hosts, strict=True):
            for domain in cfg.domains:
                d = domain.encode()
                if d == b"*":
                    self._default = self._default or vh
                elif d.startswith(b"*"):
                    self._suffix.append((d[1:], vh))
                elif d.endswith(b"*"):
                    self._prefix.append((d[:-1], vh))
                else:
                    self._exact.setdefault(d, vh)
        # Longest wildcard first, as Envoy does.
        self._suffix.sort(key=lambda e: -len(e[0]))
        self._prefix.sort(key=lambda e: -len(e[0]))
        self._cache: dict[bytes, VirtualHost | None] = {}

    def _match_domain(self, host: bytes) -> VirtualHost | None:
        vh = self._exact.get(host)
        if vh is not None:
            return vh
        for suffix, vh in self._suffix:
            # The wildcard must stand for at least one character.
            if len(host) > len(suffix) and host.endswith(suffix):
                return vh
        for prefix, vh in self._prefix:
            if len(host) > len(prefix) and host.startswith(prefix):
                return vh
        return None

    def virtual_host(self, authority: bytes) -> VirtualHost | None:
        try:
            return self._cache[authority]
        except KeyError:
            pass
        host = authority.lower()
        vh = self._match_domain(host)
        if vh is None:
            colon = host.rfind(b":")
            if colon > 0 and host[colon + 1 :].isdigit() and host.find(b"]", colon) == -1:
                vh = self._match_domain(host[:colon])
        if vh is None:
            vh = self._default
        if len(self._cache) < _VHOST_CACHE_LIMIT:
            self._cache[authority] = vh
        return vh

    def select(self, headers: HeaderMap) -> tuple[VirtualHost, Route] | None:
        authority = headers.get(b":authority") or b""
        vh = self.virtual_host(authority)
        if vh is None:
            return None
        route = vh.select(headers.get(b":path") or b"/", headers)
        if route is None:
            return None
        return vh, route
