"""Control-plane metrics in the Prometheus text format, named exactly as istiod exports them.

istiod's counters carry no `_total` suffix (OpenTelemetry's WithoutCounterSuffixes), which the
prometheus-client library would always add, so this module renders the few series itself.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# istio/istio PR #17456: "in most cases the time is less than 1 second".
CONVERGENCE_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass
class LabeledCounter:
    name: str
    help: str
    label_names: tuple[str, ...] = ()
    kind: str = "counter"
    _values: dict[tuple[str, ...], float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def set(self, *label_values: str, value: float) -> None:
        with self._lock:
            self._values[label_values] = value

    def value(self, *label_values: str) -> float:
        with self._lock:
            return self._values.get(label_values, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        with self._lock:
            items = sorted(self._values.items())
        for values, number in items:
            yield f"{self.name}{_labels_text(self.label_names, values)} {_number(number)}"


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    _counts: list[int] = field(init=False)
    _sum: float = 0.0
    _count: int = 0
    _observations: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._counts = [0] * len(self.buckets)

    def observe(self, seconds: float) -> None:
        with self._lock:
            index = bisect.bisect_left(self.buckets, seconds)
            if index < len(self._counts):
                self._counts[index] += 1
            self._sum += seconds
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            running = 0
            for bound, count in zip(self.buckets, self._counts, strict=True):
                running += count
                yield f'{self.name}_bucket{{le="{_number(bound)}"}} {running}'
            yield f'{self.name}_bucket{{le="+Inf"}} {self._count}'
            yield f"{self.name}_sum {_number(self._sum)}"
            yield f"{self.name}_count {self._count}"


class XdsMetrics:
    """The istiod series the control plane exposes on /metrics."""

    def __init__(self) -> None:
        self.rejects = LabeledCounter(
            "pilot_total_xds_rejects",
            "Total number of XDS responses from pilot rejected by proxy.",
            ("type",),
        )
        self.pushes = LabeledCounter(
            "pilot_xds_pushes", "Pilot build and send errors for lds, rds, cds and eds.", ("type",)
        )
        self.connected = LabeledCounter(
            "pilot_xds", "Number of endpoints connected to this pilot using XDS.", kind="gauge"
        )
        self.connected.set(value=0)
        self.convergence = Histogram(
            "pilot_proxy_convergence_time",
            "Delay in seconds between config change and a proxy receiving all required configuration.",
            CONVERGENCE_BUCKETS,
        )
        self.config_rejected = LabeledCounter(
            "wasmesh_config_rejected", "Resources rejected by validation and never pushed.", ("kind",)
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.rejects, self.pushes, self.connected, self.config_rejected):
            lines.extend(metric.render())
        lines.extend(self.convergence.render())
        return "\n".join(lines) + "\n"
