"""Istio's agent Wasm metrics with their exact exported names (pkg/wasm/monitoring.go).

Counters are exported WITHOUT the ``_total`` suffix, as Istio does (see wasmesh.prometheus).
"""

from __future__ import annotations

from wasmesh import prometheus
from wasmesh.agent.errors import FetchResult
from wasmesh.prometheus import Counter, Gauge, Histogram

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


class AgentMetrics:
    """The five ``istio_agent_wasm_*`` series; one instance per agent (or per test)."""

    def __init__(self) -> None:
        self.cache_entries = Gauge(
            f"{PREFIX}wasm_cache_entries", "number of Wasm remote fetch cache entries."
        )
        self.cache_lookup_count = Counter(
            f"{PREFIX}wasm_cache_lookup_count", "number of Wasm remote fetch cache lookups.", ("hit",)
        )
        self.remote_fetch_count = Counter(
            f"{PREFIX}wasm_remote_fetch_count", "number of Wasm remote fetches and results.", ("result",)
        )
        self.config_conversion_count = Counter(
            f"{PREFIX}wasm_config_conversion_count",
            "number of Wasm config conversion count and results, including success, no remote load, "
            "marshal failure, remote fetch failure, miss remote fetch hint.",
            ("result",),
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
        return prometheus.render(
            (
                self.cache_entries,
                self.cache_lookup_count,
                self.remote_fetch_count,
                self.config_conversion_count,
                self.config_conversion_duration,
            )
        )
