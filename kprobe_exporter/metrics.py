"""Metrics: a prometheus-client collector on a dedicated registry that snapshots aggregate state at scrape."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar, Sample

from kprobe_exporter import __version__
from kprobe_exporter.aggmode import ProbeMode
from kprobe_exporter.aggregate import EVICT_REASONS, Snapshot
from kprobe_exporter.kernelagg import KernelView
from kprobe_exporter.probes import ProbeSet
from kprobe_exporter.spans import DROP_REASONS


@dataclass
class SpanCounts:
    exported: int
    dropped: dict[str, int]


@dataclass
class Sources:
    """Where the collector reads from; the agent wires these, each cheap and thread-safe."""

    snapshot: Callable[[], Snapshot]
    probes: ProbeSet
    installed: Callable[[], set[str]] = set
    profile: Callable[[], dict[str, tuple[int, int]]] = dict
    spans: Callable[[], SpanCounts | None] = lambda: None
    # pair -> (trace_id hex, duration seconds, wall time) of a recent exported span
    exemplar: Callable[[str], tuple[str, float, float] | None] = lambda pair: None
    heartbeat: Callable[[], float] = time.time
    extra: list[Callable[[], Iterator[Metric]]] = field(default_factory=list)
    kernel: Callable[[], KernelView | None] = lambda: None  # kernel-mode probes (kernelagg)
    modes: Callable[[], dict[str, ProbeMode]] = dict  # each probe's aggregation mode


def _fmt_le(b: float) -> str:
    return repr(float(b))


EventKey = tuple[str, tuple[tuple[str, str], ...]]  # (probe, ((label, value), ...))
_EVENTS_TOTAL = "kprobe_events_total"


def _event_order(events: dict[EventKey, int]) -> list[tuple[EventKey, dict[str, str]]]:
    """Each series' key and labels in exposition order: sorted by probe and labels, then grouped by label
    names in the order the groups first appear (one family: HELP and TYPE once)."""
    groups: dict[tuple[str, ...], list[tuple[EventKey, dict[str, str]]]] = {}
    for key in sorted(events):
        probe, labels = key
        groups.setdefault(tuple(k for k, _ in labels), []).append((key, {"probe": probe, **dict(labels)}))
    return [row for rows in groups.values() for row in rows]


class ExporterCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self.s = sources
        # the last scrape's series and their order: the label dicts are shared, read-only, between scrapes
        self._event_order: tuple[set[EventKey], list[tuple[EventKey, dict[str, str]]]] = (set(), [])

    def collect(self) -> Iterator[Metric]:
        snap = self.s.snapshot()
        kv = self.s.kernel() or KernelView()
        probes = self.s.probes
        yield from self._events({**snap.events, **kv.events})
        yield from self._latency(snap, kv)
        yield from self._read_metrics(snap)
        yield from self._pair_metrics(snap, {**snap.label_overflow, **kv.label_overflow})
        yield from self._probe_metrics(probes)
        yield from self._kernel_metrics(kv)
        yield from self._span_metrics()
        for extra in self.s.extra:
            yield from extra()

    def _events(self, events: dict[EventKey, int]) -> Iterator[Metric]:
        fam = CounterMetricFamily("kprobe_events", "Events seen per probe.", labels=["probe"])
        keyed, order = self._event_order
        if events.keys() != keyed:  # new or gone series: sort again (the usual scrape has the same ones)
            keyed, order = self._event_order = set(events), _event_order(events)
        fam.samples = [Sample(_EVENTS_TOTAL, labels, events[key]) for key, labels in order]
        yield fam

    def _latency(self, snap: Snapshot, kv: KernelView) -> Iterator[Metric]:
        fam = HistogramMetricFamily("kprobe_latency_seconds", "Time from entry to exit of paired events.",
                                    labels=["probe"])
        bounds = snap.bounds_s
        for name, st in sorted(snap.pairs.items()):
            ex = self.s.exemplar(name)
            ex_idx = -1
            if ex is not None:
                ex_idx = next((i for i, b in enumerate(bounds) if ex[1] <= b), len(bounds))
            cum = 0
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            for i, n in enumerate(st.buckets):
                cum += n
                le = _fmt_le(bounds[i]) if i < len(bounds) else "+Inf"
                if i == ex_idx and ex is not None:
                    buckets.append((le, cum, Exemplar({"trace_id": ex[0]}, ex[1], ex[2])))
                else:
                    buckets.append((le, cum))
            fam.add_metric([name], buckets, st.sum_ns / 1e9)
        for name, kl in sorted(kv.latency.items()):
            # the kernel's own buckets: `~ 2^N` holds (2^(N-1), 2^N] ns, so le is 2^N ns in seconds
            cum, kb = 0, []
            for bound_ns, n in zip(kl.bounds_ns, kl.counts, strict=True):
                cum += n
                kb.append((_fmt_le(bound_ns / 1e9), float(cum)))
            kb.append(("+Inf", float(cum)))
            fam.add_metric([name], kb, kl.sum_ns / 1e9)
        yield fam

    def _read_metrics(self, snap: Snapshot) -> Iterator[Metric]:
        yield CounterMetricFamily("kprobe_exporter_lines_read", "Lines read from trace text.",
                                  value=snap.lines_read)
        pe = CounterMetricFamily("kprobe_exporter_parse_errors", "Lines that could not be parsed, by reason.",
                                 labels=["reason"])
        for reason, n in sorted(snap.parse_errors.items()):
            pe.add_metric([reason], n)
        yield pe
        lost = CounterMetricFamily("kprobe_exporter_lost_events",
                                   "Events the kernel dropped before the agent read them, per CPU.",
                                   labels=["cpu"])
        for cpu, n in sorted(snap.lost.items()):
            lost.add_metric([str(cpu)], n)
        yield lost

    def _pair_metrics(self, snap: Snapshot, label_overflow: dict[tuple[str, str], int]) -> Iterator[Metric]:
        pending = GaugeMetricFamily("kprobe_exporter_pairs_pending", "Entries waiting for their exit.",
                                    labels=["probe"])
        evicted = CounterMetricFamily("kprobe_exporter_pairs_evicted",
                                      "Pending entries dropped unpaired, by reason (age, capacity, lost).",
                                      labels=["probe", "reason"])
        unmatched = CounterMetricFamily("kprobe_exporter_pairs_unmatched", "Exits seen with no pending entry.",
                                        labels=["probe"])
        for name, st in sorted(snap.pairs.items()):
            pending.add_metric([name], st.pending)
            unmatched.add_metric([name], st.unmatched)
            for reason in (*EVICT_REASONS, *sorted(set(st.evicted) - set(EVICT_REASONS))):  # + 'reload'
                evicted.add_metric([name, reason], st.evicted.get(reason, 0))
        yield pending
        yield evicted
        yield unmatched
        overflow = CounterMetricFamily("kprobe_exporter_label_overflow",
                                       "Label values replaced by __overflow__ because the cap was reached.",
                                       labels=["probe", "label"])
        for (probe, label), n in sorted(label_overflow.items()):
            overflow.add_metric([probe, label], n)
        yield overflow

    def _probe_metrics(self, probes: ProbeSet) -> Iterator[Metric]:
        info = GaugeMetricFamily("kprobe_exporter_probe_info", "Configured probes and their targets.",
                                 labels=["probe", "kind", "target"])
        installed_fam = GaugeMetricFamily("kprobe_exporter_probe_installed",
                                          "1 when the probe's events are defined and enabled.", labels=["probe"])
        installed = self.s.installed()
        for ev in probes.events:
            info.add_metric([ev.name, ev.kind, ev.target], 1)
            installed_fam.add_metric([ev.name], 1 if ev.name in installed else 0)
        yield info
        yield installed_fam
        hits = CounterMetricFamily("kprobe_exporter_probe_hits", "Probe hits from kprobe_profile/uprobe_profile.",
                                   labels=["probe"])
        misses = CounterMetricFamily("kprobe_exporter_probe_misses",
                                     "Probe misses (e.g. kretprobe maxactive) from kprobe_profile.",
                                     labels=["probe"])
        for name, (h, m) in sorted(self.s.profile().items()):
            hits.add_metric([name], h)
            misses.add_metric([name], m)
        yield hits
        yield misses

    def _kernel_metrics(self, kv: KernelView) -> Iterator[Metric]:
        mode = GaugeMetricFamily("kprobe_exporter_probe_aggregation",
                                 "1 for the mode each probe is aggregated in: kernel (hist triggers) or stream.",
                                 labels=["probe", "mode"])
        for name, m in sorted(self.s.modes().items()):
            mode.add_metric([name, m.mode], 1)
        yield mode
        dropped = CounterMetricFamily("kprobe_exporter_kernel_dropped",
                                      "Events a full hist table in the kernel refused, per kernel-mode probe.",
                                      labels=["probe"])
        for name, n in sorted(kv.dropped.items()):
            dropped.add_metric([name], n)
        yield dropped
        renewed = CounterMetricFamily("kprobe_exporter_kernel_thread_renewals",
                                      "Times a kernel-mode pair's per-thread tables were replaced by empty ones "
                                      "(calls in flight then lose their latency sample).", labels=["probe"])
        for name, n in sorted(kv.renewals.items()):
            renewed.add_metric([name], n)
        yield renewed

    def _span_metrics(self) -> Iterator[Metric]:
        spans = self.s.spans()
        exported = CounterMetricFamily("kprobe_exporter_spans_exported", "Spans accepted by the OTLP receiver.")
        dropped = CounterMetricFamily("kprobe_exporter_spans_dropped", "Spans not exported, by reason.",
                                      labels=["reason"])
        exported.add_metric([], spans.exported if spans else 0)
        for reason in DROP_REASONS:
            dropped.add_metric([reason], spans.dropped.get(reason, 0) if spans else 0)
        yield exported
        yield dropped
        yield GaugeMetricFamily("kprobe_exporter_last_read_timestamp_seconds",
                                "Wall time of the reader loop's last iteration (liveness).",
                                value=self.s.heartbeat())
        build = GaugeMetricFamily("kprobe_exporter_build_info", "Version of the agent.",
                                  labels=["version", "python_version"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build


def make_registry(sources: Sources) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(sources))
    return registry
