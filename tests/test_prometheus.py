"""The one Prometheus text renderer: exact lines for each metric kind, and the plugins' histograms."""

from __future__ import annotations

from wasmesh import prometheus
from wasmesh.prometheus import Counter, Gauge, Histogram
from wasmesh.runtime.abi import MetricType, WasmResult
from wasmesh.runtime.metrics import MetricsRegistry


def test_each_kind_renders_exact_lines() -> None:
    counter = Counter("c", "A counter.", ("code", "path"))
    counter.inc("200", 'a"b\\c\nd')
    counter.inc("200", 'a"b\\c\nd', amount=2.5)
    gauge = Gauge("g", "A gauge.")
    histogram = Histogram("h", "A histogram.", (1.0, 5.0, 10.0))
    for value in (0.5, 1.0, 3.0, 7.0, 100.0):
        histogram.observe(value)
    assert prometheus.render((counter, gauge, histogram)).splitlines() == [
        "# HELP c A counter.",
        "# TYPE c counter",
        'c{code="200",path="a\\"b\\\\c\\nd"} 3.5',
        "# HELP g A gauge.",
        "# TYPE g gauge",
        "g 0",
        "# HELP h A histogram.",
        "# TYPE h histogram",
        'h_bucket{le="1"} 2',
        'h_bucket{le="5"} 3',
        'h_bucket{le="10"} 4',
        'h_bucket{le="+Inf"} 5',
        "h_sum 111.5",
        "h_count 5",
    ]
    gauge.set(4)
    assert gauge.value() == 4
    assert counter.value("200", 'a"b\\c\nd') == 3.5


def test_numbers_render_as_the_exposition_format_spells_them() -> None:
    assert prometheus.format_number(3.0) == "3"
    assert prometheus.format_number(0.25) == "0.25"
    assert prometheus.format_number(float("inf")) == "+Inf"
    assert prometheus.format_number(float("-inf")) == "-Inf"


def test_plugin_histogram_buckets_are_cumulative_once() -> None:
    registry = MetricsRegistry()
    result, metric_id = registry.define(int(MetricType.HISTOGRAM), "latency.route=a")
    assert result == WasmResult.OK
    for value in (1, 7, 7, 1_000_000):
        assert registry.record(metric_id, value) == WasmResult.OK
    lines = registry.render_prometheus().splitlines()
    buckets = {
        line.split('le="')[1].split('"')[0]: int(line.rsplit(" ", 1)[1])
        for line in lines
        if "_bucket" in line
    }
    assert buckets["0.5"] == 0
    assert buckets["1"] == 1
    assert buckets["5"] == 1
    assert buckets["10"] == 3
    assert buckets["600000"] == 3
    assert buckets["+Inf"] == 4
    assert 'wasmcustom_latency_sum{route="a"} 1000015' in lines
    assert 'wasmcustom_latency_count{route="a"} 4' in lines
