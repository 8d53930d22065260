"""The Prometheus text exposition format (0.0.4), written once for every wasmesh component.

wasmesh exports Istio's and Envoy's series under their exact names. istiod's and istio-agent's
counters carry no ``_total`` suffix (OpenTelemetry's ``WithoutCounterSuffixes``), which the
prometheus-client library always adds, so the few series are kept and rendered here. The
thread-safe metric classes serve the control plane and the agent; the proxy's hot-path stats and
the plugins' own metrics keep their plain counters and use only the formatting helpers.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Protocol


def escape_label(value: str) -> str:
    """A label value as the exposition format quotes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_number(value: float) -> str:
    """Integers without a fraction, infinities as ``+Inf``/``-Inf``, everything else as repr."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def label_text(pairs: Iterable[tuple[str, str]]) -> str:
    """``{a="1",b="2"}``, or the empty string when there are no labels."""
    parts = [f'{name}="{escape_label(value)}"' for name, value in pairs]
    return "{" + ",".join(parts) + "}" if parts else ""


def histogram_lines(
    name: str,
    labels: str,
    buckets: Sequence[float],
    bucket_counts: Sequence[int],
    total: float,
    count: int,
) -> Iterable[str]:
    """The ``_bucket``/``_sum``/``_count`` samples of one histogram series.

    ``labels`` is the series' label text without braces (``a="1",b="2"``, or empty).
    ``bucket_counts[i]`` counts the observations that fell in bucket ``i`` alone (not cumulative);
    observations above the last bound are in ``count`` only.
    """
    sep = "," if labels else ""
    series = f"{{{labels}}}" if labels else ""
    cumulative = 0
    for bound, in_bucket in zip(buckets, bucket_counts, strict=False):
        cumulative += in_bucket
        yield f'{name}_bucket{{{labels}{sep}le="{format_number(bound)}"}} {cumulative}'
    yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {count}'
    yield f"{name}_sum{series} {format_number(total)}"
    yield f"{name}_count{series} {count}"


class Metric(Protocol):
    def render(self) -> Iterable[str]: ...


class Counter:
    """A monotonically increasing sum per combination of label values."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = label_names
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def value(self, *label_values: str) -> float:
        with self._lock:
            return self._values.get(label_values, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help_text}"
        yield f"# TYPE {self.name} {self.kind}"
        with self._lock:
            items = sorted(self._values.items())
        for values, number in items:
            pairs = zip(self.label_names, values, strict=True)
            yield f"{self.name}{label_text(pairs)} {format_number(number)}"


class Gauge(Counter):
    """A value that is set, per combination of label values (none by default: one series at 0)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()) -> None:
        super().__init__(name, help_text, label_names)
        if not label_names:
            self._values[()] = 0.0

    def set(self, value: float, *label_values: str) -> None:
        with self._lock:
            self._values[label_values] = value


class Histogram:
    """Observations counted into fixed buckets, with their sum and count."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help_text = help_text
        self.buckets = buckets
        self._counts = [0] * len(buckets)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            index = bisect.bisect_left(self.buckets, value)
            if index < len(self._counts):
                self._counts[index] += 1
            self._sum += value
            self._count += 1

    def count(self) -> int:
        with self._lock:
            return self._count

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help_text}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        yield from histogram_lines(self.name, "", self.buckets, counts, total, count)


def render(metrics: Iterable[Metric]) -> str:
    """Every metric's samples, one per line, as a /metrics body."""
    lines = [line for metric in metrics for line in metric.render()]
    return "\n".join(lines) + "\n"
