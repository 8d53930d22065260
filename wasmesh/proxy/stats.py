"""Proxy counters and histograms, rendered in the Prometheus text format.

Plain ints and lists updated on the loop (one worker = one thread), so the hot
path pays an attribute increment, not a registry lookup.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from wasmesh.prometheus import escape_label, format_number, histogram_lines

# Envoy's default histogram buckets (milliseconds).
DEFAULT_BUCKETS_MS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)


class Histogram:
    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS_MS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, labels: str) -> Iterable[str]:
        return histogram_lines(name, labels, self.buckets, self.counts, self.total, self.count)


class ListenerStats:
    __slots__ = (
        "name",
        "cx_total",
        "cx_active",
        "rq_total",
        "rq_active",
        "rq_by_class",
        "rq_time",
        "cx_protocol_error",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.cx_total = 0
        self.cx_active = 0
        self.rq_total = 0
        self.rq_active = 0
        self.cx_protocol_error = 0
        self.rq_by_class = [0, 0, 0, 0, 0, 0]  # index = status // 100 (0 = no response)
        self.rq_time = Histogram()


class UpstreamStats:
    __slots__ = ("rq_by_class", "rq_time", "rq_timeout", "rq_reset")

    def __init__(self) -> None:
        self.rq_by_class = [0, 0, 0, 0, 0, 0]
        self.rq_time = Histogram()
        self.rq_timeout = 0
        self.rq_reset = 0


class ProxyStats:
    def __init__(self) -> None:
        self.listeners: dict[str, ListenerStats] = {}
        self.upstream: dict[str, UpstreamStats] = {}
        self.config_reload_total = 0
        self.config_reload_failed = 0
        self.plugin_chain_swaps = 0

    def listener(self, name: str) -> ListenerStats:
        s = self.listeners.get(name)
        if s is None:
            s = self.listeners[name] = ListenerStats(name)
        return s

    def cluster(self, name: str) -> UpstreamStats:
        s = self.upstream.get(name)
        if s is None:
            s = self.upstream[name] = UpstreamStats()
        return s

    def render(
        self, cluster_gauges: dict[str, tuple[int, int, int, int]] | None = None, worker: str = ""
    ) -> str:
        """Prometheus text; ``cluster_gauges``: cluster -> (cx total, active, connect fails, timeouts)."""
        w = f'worker="{escape_label(worker)}",' if worker else ""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def sample(name: str, labels: str, value: float) -> None:
            out.append(f"{name}{{{w}{labels}}} {format_number(value)}")

        listeners = [(f'listener="{escape_label(s.name)}"', s) for s in self.listeners.values()]
        clusters = [(f'cluster="{escape_label(n)}"', u) for n, u in self.upstream.items()]
        family("wasmesh_downstream_cx_total", "counter", "Downstream connections accepted.")
        for lab, s in listeners:
            sample("wasmesh_downstream_cx_total", lab, s.cx_total)
        family("wasmesh_downstream_cx_active", "gauge", "Open downstream connections.")
        for lab, s in listeners:
            sample("wasmesh_downstream_cx_active", lab, s.cx_active)
        family(
            "wasmesh_downstream_cx_protocol_error_total", "counter", "Connections closed for malformed HTTP."
        )
        for lab, s in listeners:
            sample("wasmesh_downstream_cx_protocol_error_total", lab, s.cx_protocol_error)
        family("wasmesh_downstream_rq_active", "gauge", "Requests in flight.")
        for lab, s in listeners:
            sample("wasmesh_downstream_rq_active", lab, s.rq_active)
        family(
            "wasmesh_downstream_rq_total", "counter", "Completed downstream requests by response code class."
        )
        for lab, s in listeners:
            for cls, n in enumerate(s.rq_by_class):
                if n:
                    code_class = f"{cls}xx" if cls else "none"
                    sample("wasmesh_downstream_rq_total", f'{lab},response_code_class="{code_class}"', n)
        family("wasmesh_downstream_rq_time_ms", "histogram", "Downstream request duration in milliseconds.")
        for lab, s in listeners:
            out.extend(s.rq_time.render("wasmesh_downstream_rq_time_ms", w + lab))
        family("wasmesh_upstream_rq_total", "counter", "Upstream responses by cluster and code class.")
        for lab, u in clusters:
            for cls, n in enumerate(u.rq_by_class):
                if cls and n:
                    sample("wasmesh_upstream_rq_total", f'{lab},response_code_class="{cls}xx"', n)
        family(
            "wasmesh_upstream_rq_time_ms", "histogram", "Upstream request time (sent to response end), ms."
        )
        for lab, u in clusters:
            out.extend(u.rq_time.render("wasmesh_upstream_rq_time_ms", w + lab))
        family(
            "wasmesh_upstream_rq_timeout_total", "counter", "Upstream requests that hit the route timeout."
        )
        for lab, u in clusters:
            sample("wasmesh_upstream_rq_timeout_total", lab, u.rq_timeout)
        family("wasmesh_upstream_rq_reset_total", "counter", "Upstream requests reset by the connection.")
        for lab, u in clusters:
            sample("wasmesh_upstream_rq_reset_total", lab, u.rq_reset)
        gauges = [(f'cluster="{escape_label(n)}"', g) for n, g in (cluster_gauges or {}).items()]
        for index, (name, kind, help_text) in enumerate(
            (
                ("wasmesh_upstream_cx_total", "counter", "Upstream connections opened."),
                ("wasmesh_upstream_cx_active", "gauge", "Open upstream connections."),
                (
                    "wasmesh_upstream_cx_connect_fail_total",
                    "counter",
                    "Failed upstream connects (incl. timeouts).",
                ),
                ("wasmesh_upstream_cx_connect_timeout_total", "counter", "Upstream connects that timed out."),
            )
        ):
            family(name, kind, help_text)
            for lab, g in gauges:
                sample(name, lab, g[index])
        family("wasmesh_config_reload_total", "counter", "Configuration or plugin chain reloads applied.")
        bare = f"{{{w[:-1]}}}" if w else ""
        out.append(f"wasmesh_config_reload_total{bare} {self.config_reload_total}")
        family("wasmesh_config_reload_failed_total", "counter", "Rejected reloads (old configuration kept).")
        out.append(f"wasmesh_config_reload_failed_total{bare} {self.config_reload_failed}")
        return "\n".join(out) + "\n"
