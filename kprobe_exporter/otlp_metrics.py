"""OTLP metrics push: what /metrics serves, converted to OTLP and pushed every interval.

For hosts without Prometheus. The source is the same registry the scrape reads, so the two never
disagree on names, labels or values; the exporter is opentelemetry-exporter-otlp's, so the
OTEL_EXPORTER_OTLP_[METRICS_]* variables (endpoint, protocol, headers, timeout, TLS) apply.
Counters become cumulative monotonic sums, gauges gauges, histograms explicit-bucket histograms.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric as PromMetric
from prometheus_client.registry import CollectorRegistry

from kprobe_exporter import __version__
from kprobe_exporter.otlp_env import metric_exporter, resource_attributes

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope("kprobe_exporter", __version__)
CUMULATIVE = AggregationTemporality.CUMULATIVE
Labels = frozenset[tuple[str, str]]


class MetricExporter(Protocol):
    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000) -> MetricExportResult: ...

    def shutdown(self, timeout_millis: float = 30_000) -> None: ...


def _number(v: float) -> int | float:
    f = float(v)
    return int(f) if f.is_integer() and abs(f) < 2**63 else f


@dataclass
class _Series:
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative count)
    count: float = 0.0
    sum: float = 0.0


def _histogram(family: PromMetric, start_ns: int, now_ns: int) -> Histogram:
    series: dict[Labels, _Series] = {}
    for s in family.samples:
        one = series.setdefault(frozenset((k, v) for k, v in s.labels.items() if k != "le"), _Series())
        if s.name.endswith("_bucket"):
            one.buckets.append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            one.count = s.value
        elif s.name.endswith("_sum"):
            one.sum = s.value
    points = []
    for attrs, one in series.items():
        cumulative = sorted(one.buckets)
        bounds = [le for le, _ in cumulative if math.isfinite(le)]
        counts, below = [], 0.0
        for _, c in cumulative:  # a Prometheus bucket counts all below its `le`; an OTLP one only its range
            counts.append(int(c - below))
            below = c
        if not cumulative or math.isfinite(cumulative[-1][0]):
            counts.append(int(one.count - below))  # the +Inf bucket
        points.append(HistogramDataPoint(
            attributes=dict(attrs), start_time_unix_nano=start_ns, time_unix_nano=now_ns, count=int(one.count),
            sum=one.sum, bucket_counts=counts, explicit_bounds=bounds,
            min=None, max=None,  # type: ignore[arg-type]  # unknown: Prometheus histograms keep neither
        ))  # fmt: skip
    return Histogram(points, CUMULATIVE)


def to_metrics_data(families: Iterable[PromMetric], resource: Resource, start_ns: int, now_ns: int) -> MetricsData:
    """prometheus-client families as OTLP metrics; every series starts at start_ns (`_created` is dropped)."""
    metrics: list[Metric] = []
    for f in families:
        data: Sum | Gauge | Histogram
        if f.type == "histogram":
            data = _histogram(f, start_ns, now_ns)
        elif f.type == "counter":
            data = Sum([NumberDataPoint(dict(s.labels), start_ns, now_ns, _number(s.value))
                        for s in f.samples if s.name.endswith("_total")], CUMULATIVE, True)
        elif f.type in ("gauge", "info", "unknown", "stateset"):
            data = Gauge([NumberDataPoint(dict(s.labels), start_ns, now_ns, _number(s.value)) for s in f.samples])
        else:
            continue  # summaries and gauge histograms: none in this exporter
        # Names as OTel has them: a counter without `_total`, no unit suffix added (a collector's
        # Prometheus exporter adds `_total` back to a monotonic sum, so the round trip is exact).
        name = f.name + ("_info" if f.type == "info" else "")
        metrics.append(Metric(name, f.documentation, None, data))
    return MetricsData([ResourceMetrics(resource, [ScopeMetrics(SCOPE, metrics, "")], "")])


class OtlpMetricsPush:
    """A thread that pushes the registry every interval_s; a failed push is counted and retried next time."""

    def __init__(self, registry: CollectorRegistry, interval_s: float, exporter: MetricExporter | None = None,
                 resource: Mapping[str, str] | None = None) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.exporter = exporter if exporter is not None else metric_exporter()
        self.resource = Resource.create(dict(resource if resource is not None else resource_attributes()))
        self.start_ns = time.time_ns()
        self.pushed = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kprobe-exporter", daemon=True)

    def push(self, timeout_s: float | None = None) -> bool:
        """One push now; by default it may take half the interval (the exporter retries within that)."""
        data = to_metrics_data(self.registry.collect(), self.resource, self.start_ns, time.time_ns())
        timeout_s = timeout_s if timeout_s is not None else max(1.0, self.interval_s / 2)
        try:
            ok = self.exporter.export(data, timeout_millis=timeout_s * 1000)
        except Exception as e:  # a collector that misbehaves must not stop the pushes
            log.warning("OTLP metrics push failed: %s", e)
            ok = MetricExportResult.FAILURE
        if ok == MetricExportResult.SUCCESS:
            self.pushed += 1
            return True
        self.failed += 1
        return False

    def families(self) -> Iterator[PromMetric]:
        """For /metrics: how the pushes went."""
        c = CounterMetricFamily("kprobe_exporter_otlp_metrics_pushes", "OTLP metrics pushes, by result.",
                                labels=["result"])
        c.add_metric(["ok"], self.pushed)
        c.add_metric(["failed"], self.failed)
        yield c

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.push()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """One last push (what was counted up to the stop), bounded, then the exporter's own shutdown."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(max(1.0, self.interval_s / 2) + 1)  # a push under way ends within its timeout
        self.push(timeout_s)
        try:
            self.exporter.shutdown(timeout_millis=2000)
        except Exception as e:
            log.warning("OTLP metrics exporter shutdown: %s", e)
