"""Istio's agent Wasm metrics with their exact exported names (pkg/wasm/monitoring.go).

Istio exports counters WITHOUT the ``_total`` suffix (OpenTelemetry's ``WithoutCounterSuffixes``), which
prometheus-client cannot produce, so this module holds a tiny thread-safe registry and renders the
Prometheus text exposition format itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

from wasmesh.agent.errors import FetchResult

PREFIX = "istio_agent_"
# Milliseconds, 1 .. 16384 in powers of two, as Istio's conversion-duration distribution.
CONVERSION_DURATION_BUCKETS_MS: tuple[float, ...] = tuple(float(2**i) for i in range(15))

CONVERSION_RESULTS = (
    "success",
    "no_remote_load",
    "marshal_failure",
    "unmarshal_failure",
    "fetch_failure",
    "miss_remote_fetch_hint",
)


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class LabeledCounter:
    """A monotonically increasing sum per value of one label."""

    def __init__(self, name: str, help_text: str, label: str) -> None:
        self.name = name
        self.help_text = help_text
        self.label = label
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def inc(self, label_value: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[label_value] = self._values.get(label_value, 0.0) + amount

    def value(self, label_value: str) -> float:
        with self._lock:
            return self._values.get(label_value, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help_text}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for label_value, value in items:
            yield f'{self.name}{{{self.label}="{_escape_label(label_value)}"}} {_format_value(value)}'


class Gauge:
    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help_text = help_text
        self._value = 0.0
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def value(self) -> float:
        with self._lock:
            return self._value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help_text}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_format_value(self.value())}"


class Histogram:
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
            self._sum += value
            self._count += 1
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[index] += 1

    def count(self) -> int:
        with self._lock:
            return self._count

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help_text}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        for bound, bucket_count in zip(self.buckets, counts, strict=True):
            yield f'{self.name}_bucket{{le="{_format_value(bound)}"}} {bucket_count}'
        yield f'{self.name}_bucket{{le="+Inf"}} {count}'
        yield f"{self.name}_sum {_format_value(total)}"
        yield f"{self.name}_count {count}"


class AgentMetrics:
    """The five ``istio_agent_wasm_*`` series; one instance per agent (or per test)."""

    def __init__(self) -> None:
        self.cache_entries = Gauge(
            f"{PREFIX}wasm_cache_entries", "number of Wasm remote fetch cache entries."
        )
        self.cache_lookup_count = LabeledCounter(
            f"{PREFIX}wasm_cache_lookup_count", "number of Wasm remote fetch cache lookups.", "hit"
        )
        self.remote_fetch_count = LabeledCounter(
            f"{PREFIX}wasm_remote_fetch_count", "number of Wasm remote fetches and results.", "result"
        )
        self.config_conversion_count = LabeledCounter(
            f"{PREFIX}wasm_config_conversion_count",
            "number of Wasm config conversion count and results, including success, no remote load, "
            "marshal failure, remote fetch failure, miss remote fetch hint.",
            "result",
        )
        self.config_conversion_duration = Histogram(
            f"{PREFIX}wasm_config_conversion_duration",
            "Total time in milliseconds istio-agent spends on converting remote load in Wasm config.",
            CONVERSION_DURATION_BUCKETS_MS,
        )

    def record_lookup(self, hit: bool) -> None:
        self.cache_lookup_count.inc("true" if hit else "false")

    def record_fetch(self, result: FetchResult) -> None:
        self.remote_fetch_count.inc(result.value)

    def record_conversion(self, result: str, duration_ms: float | None = None) -> None:
        """For the ECDS converter: one conversion's result label and (on any result) its duration."""
        if result not in CONVERSION_RESULTS:
            raise ValueError(
                f"conversion result: unknown value {result!r}, expected one of {CONVERSION_RESULTS}"
            )
        self.config_conversion_count.inc(result)
        if duration_ms is not None:
            self.config_conversion_duration.observe(duration_ms)

    def render(self) -> str:
        """All series in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for metric in (
            self.cache_entries,
            self.cache_lookup_count,
            self.remote_fetch_count,
            self.config_conversion_count,
            self.config_conversion_duration,
        ):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
