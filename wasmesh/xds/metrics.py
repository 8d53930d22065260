"""Control-plane metrics in the Prometheus text format, named exactly as istiod exports them.

istiod's counters carry no `_total` suffix (see wasmesh.prometheus).
"""

from __future__ import annotations

from wasmesh import prometheus
from wasmesh.prometheus import Counter, Gauge, Histogram

# istio/istio PR #17456: "in most cases the time is less than 1 second".
CONVERGENCE_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0)


class XdsMetrics:
    """The istiod series the control plane exposes on /metrics."""

    def __init__(self) -> None:
        self.rejects = Counter(
            "pilot_total_xds_rejects",
            "Total number of XDS responses from pilot rejected by proxy.",
            ("type",),
        )
        self.pushes = Counter(
            "pilot_xds_pushes", "Pilot build and send errors for lds, rds, cds and eds.", ("type",)
        )
        self.connected = Gauge("pilot_xds", "Number of endpoints connected to this pilot using XDS.")
        self.convergence = Histogram(
            "pilot_proxy_convergence_time",
            "Delay in seconds between config change and a proxy receiving all required configuration.",
            CONVERGENCE_BUCKETS,
        )
        self.config_rejected = Counter(
            "wasmesh_config_rejected", "Resources rejected by validation and never pushed.", ("kind",)
        )

    def render(self) -> str:
        return prometheus.render(
            (self.rejects, self.pushes, self.connected, self.config_rejected, self.convergence)
        )
