"""Plugin-defined metrics (proxy_define_metric & co.) and host metrics, with a Prometheus renderer.

Envoy names a plugin metric ``wasmcustom.<name>``. Tag extraction here is one simple
rule instead of Envoy's configurable ``stats_tags`` regexes: every ``_``- or
``.``-separated segment of the form ``key=value`` becomes a label, the rest forms the
name. So ``custom_header_value_counts_value=foo_reporter=wasmgosdk`` renders as
``wasmcustom_custom_header_value_counts{value="foo",reporter="wasmgosdk"}``. Names
are sanitised to Prometheus' ``[a-zA-Z0-9_:]`` charset.
"""

from __future__ import annotations

import bisect
import re
import threading
from dataclasses import dataclass, field

from wasmesh.prometheus import escape_label, histogram_lines
from wasmesh.runtime.abi import MetricType, WasmResult

_U64 = (1 << 64) - 1
_SANITIZE = re.compile(r"[^a-zA-Z0-9_:]")
_TAG_SEGMENT = re.compile(r"^([a-zA-Z_][a-zA-Z0-9_]*)=(.*)$")
# Prometheus' default-ish histogram buckets, in the unit the plugin records (usually ms).
_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000)


@dataclass
class Metric:
    metric_type: MetricType
    name: str
    value: int = 0
    bucket_counts: list[int] = field(default_factory=list)
    sample_sum: int = 0
    sample_count: int = 0


def split_tags(name: str) -> tuple[str, list[tuple[str, str]]]:
    parts = re.split(r"[._]", name)
    base: list[str] = []
    tags: list[tuple[str, str]] = []
    # Re-split keeping separators for the tag values that contain "_" is not worth it:
    # tag values end at the next separator, as with Envoy's simple tag regexes.
    for part in parts:
        match = _TAG_SEGMENT.match(part)
        if match:
            tags.append((match.group(1), match.group(2)))
        else:
            base.append(part)
    return "_".join(p for p in base if p), tags


class MetricsRegistry:
    """Metrics of one Runtime (one worker), by id; plus host counters with labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, Metric] = {}
        self._by_key: dict[tuple[MetricType, str], int] = {}
        self._next_id = 0
        self._host_counters: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._host_help: dict[str, str] = {}

    # -- plugin metrics (proxy_*_metric) ------------------------------------------------
    def define(self, metric_type: int, name: str) -> tuple[WasmResult, int]:
        if metric_type not in (0, 1, 2):
            return WasmResult.BAD_ARGUMENT, 0
        key = (MetricType(metric_type), name)
        with self._lock:
            existing = self._by_key.get(key)
            self._next_id += 1
            if existing is not None:
                # As Envoy: defining a name again hands out a new id for the same stat.
                self._by_id[self._next_id] = self._by_id[existing]
                return WasmResult.OK, self._next_id
            metric = Metric(MetricType(metric_type), name)
            if metric.metric_type == MetricType.HISTOGRAM:
                metric.bucket_counts = [0] * len(_BUCKETS)
            self._by_id[self._next_id] = metric
            self._by_key[key] = self._next_id
            return WasmResult.OK, self._next_id

    def increment(self, metric_id: int, delta: int) -> WasmResult:
        metric = self._by_id.get(metric_id)
        if metric is None:
            return WasmResult.NOT_FOUND
        if metric.metric_type == MetricType.COUNTER:
            if delta <= 0:
                return WasmResult.BAD_ARGUMENT
            metric.value = (metric.value + delta) & _U64
        elif metric.metric_type == MetricType.GAUGE:
            metric.value += delta
        else:
            return WasmResult.BAD_ARGUMENT
        return WasmResult.OK

    def record(self, metric_id: int, value: int) -> WasmResult:
        metric = self._by_id.get(metric_id)
        if metric is None:
            return WasmResult.NOT_FOUND
        value &= _U64
        if metric.metric_type == MetricType.COUNTER:
            metric.value = (metric.value + value) & _U64
        elif metric.metric_type == MetricType.GAUGE:
            metric.value = value
        else:
            metric.sample_count += 1
            metric.sample_sum += value
            index = bisect.bisect_left(_BUCKETS, value)
            if index < len(_BUCKETS):  # above the last bound: counted in +Inf (sample_count) only
                metric.bucket_counts[index] += 1
        return WasmResult.OK

    def get(self, metric_id: int) -> tuple[WasmResult, int]:
        metric = self._by_id.get(metric_id)
        if metric is None:
            return WasmResult.NOT_FOUND, 0
        if metric.metric_type == MetricType.HISTOGRAM:
            return WasmResult.BAD_ARGUMENT, 0
        return WasmResult.OK, metric.value & _U64

    def value_by_name(self, name: str) -> int | None:
        """Counter/gauge value of a plugin metric by its plugin-side name (for tests and harnesses)."""
        for (metric_type, metric_name), metric_id in self._by_key.items():
            if metric_name == name and metric_type != MetricType.HISTOGRAM:
                return self._by_id[metric_id].value
        return None

    # -- host metrics ----------------------------------------------------------------
    def inc_host_counter(self, name: str, labels: dict[str, str], help_text: str = "") -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._host_counters[key] = self._host_counters.get(key, 0) + 1
            if help_text:
                self._host_help[name] = help_text

    def host_counter(self, name: str, **labels: str) -> int:
        return self._host_counters.get((name, tuple(sorted(labels.items()))), 0)

    # -- rendering -------------------------------------------------------------------
    def render_prometheus(self) -> str:
        lines: list[str] = []
        typed: set[str] = set()
        for metric in [self._by_id[metric_id] for metric_id in self._by_key.values()]:
            base, tags = split_tags(metric.name)
            prom = _SANITIZE.sub("_", f"wasmcustom_{base}")
            label_text = ",".join(f'{_SANITIZE.sub("_", k)}="{escape_label(v)}"' for k, v in tags)
            kind = {MetricType.COUNTER: "counter", MetricType.GAUGE: "gauge"}.get(
                metric.metric_type, "histogram"
            )
            if prom not in typed:
                lines.append(f"# TYPE {prom} {kind}")
                typed.add(prom)
            if metric.metric_type != MetricType.HISTOGRAM:
                suffix = f"{{{label_text}}}" if label_text else ""
                lines.append(f"{prom}{suffix} {metric.value}")
                continue
            lines.extend(
                histogram_lines(
                    prom, label_text, _BUCKETS, metric.bucket_counts, metric.sample_sum, metric.sample_count
                )
            )
        for (name, labels), value in sorted(self._host_counters.items()):
            if name not in typed:
                if name in self._host_help:
                    lines.append(f"# HELP {name} {self._host_help[name]}")
                lines.append(f"# TYPE {name} counter")
                typed.add(name)
            label_text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value}")
        return "\n".join(lines) + ("\n" if lines else "")
