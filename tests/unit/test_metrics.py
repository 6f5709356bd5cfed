"""Metrics: the latency histogram's buckets, and which bucket carries a span's exemplar."""

from __future__ import annotations

import pytest
from prometheus_client.samples import Sample

from feeding import feed_text
from kprobe_exporter import config, probes
from kprobe_exporter.aggregate import Aggregate
from kprobe_exporter.metrics import ExporterCollector, Sources

CFG = """
buckets: [0.000005, 0.001, 0.25]
probes:
  - name: f
    uprobe: /bin/x:0x10
    latency: true
"""
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def head(tid: int, ts_us: int) -> bytes:
    return b"%16s-%-7d [000] .....  %5d.%06d: " % (b"app", tid, ts_us // 10**6, ts_us % 10**6)


def buckets(exemplar: tuple[str, float, float] | None) -> list[Sample]:
    cfg = config.load_text(CFG)
    ps = probes.build_probe_set(cfg, resolve=None)
    agg = Aggregate(ps, cfg.buckets, cfg.label_limit, cfg.pending.max_pending, cfg.pending.max_age)
    # calls of exactly 5 µs and exactly 1 ms: each counts in the bucket whose bound it equals (`le`)
    feed_text(agg, b"".join(head(1, t) + body + b"\n" for t, body in (
        (1_000_000, b"f: (0x1)"), (1_000_005, b"f_ret: (0x2 <- 0x1)"),
        (2_000_000, b"f: (0x1)"), (2_001_000, b"f_ret: (0x2 <- 0x1)"))))
    collector = ExporterCollector(Sources(snapshot=agg.snapshot, probes=ps, exemplar=lambda pair: exemplar))
    fam = next(m for m in collector.collect() if m.name == "kprobe_latency_seconds")
    return [s for s in fam.samples if s.name.endswith("_bucket")]


def test_a_duration_equal_to_a_bound_counts_in_that_bucket() -> None:
    got = [(s.labels["le"], s.value) for s in buckets(None)]
    assert got == [("5e-06", 1), ("0.001", 2), ("0.25", 2), ("+Inf", 2)]


@pytest.mark.parametrize(("seconds", "le"), [
    (0.001, "0.001"),  # equal to a bound: that bound's bucket, as the call itself is counted
    (0.0010001, "0.25"),
    (0.000005, "5e-06"),
    (0.0000049, "5e-06"),
    (0.25, "0.25"),
    (0.2500001, "+Inf"),
])
def test_the_exemplar_sits_on_the_bucket_its_span_counts_in(seconds: float, le: str) -> None:
    samples = buckets((TRACE_ID, seconds, 1_700_000_000.0))
    with_exemplar = [(s.labels["le"], s.exemplar.value, s.exemplar.labels) for s in samples if s.exemplar]
    assert with_exemplar == [(le, seconds, {"trace_id": TRACE_ID})]


def test_the_event_series_follow_the_views_as_a_fresh_collector_renders_them() -> None:
    """kprobe_events keeps its last order while the series stay the same; when they change it must render
    what a collector seeing them first renders: new sets in their sorted place, gone ones gone."""
    from kprobe_exporter.aggregate import Snapshot
    from kprobe_exporter.kernelagg import KernelView

    x, w, xn = (("comm", "x"),), (("comm", "w"),), (("comm", "x"), ("n", "1"))
    views = [{("a", x): 1, ("b", ()): 2}, {("a", x): 5, ("b", ()): 7},
             {("a", x): 6, ("b", ()): 7, ("a", w): 1, ("a", xn): 3, ("0", ()): 4}, {("a", x): 6, ("a", xn): 4}, {}]
    empty = Snapshot({}, {}, 0, {}, {}, {}, [1e-6])
    ps = probes.ProbeSet("g", (), ())
    now: list[KernelView] = []

    def sources() -> Sources:
        return Sources(snapshot=lambda: empty, probes=ps, kernel=lambda: now[-1])

    kept = ExporterCollector(sources())
    for events in views:
        now.append(KernelView(events=dict(events)))
        got = next(m for m in kept.collect() if m.name == "kprobe_events").samples
        want = next(m for m in ExporterCollector(sources()).collect() if m.name == "kprobe_events").samples
        assert got == want and sorted(s.value for s in got) == sorted(events.values())
    # the order the exposition has always had: sorted, then grouped by label names as the groups first come
    now.append(KernelView(events=dict(views[2])))
    got = next(m for m in kept.collect() if m.name == "kprobe_events").samples
    assert [s.labels for s in got] == [{"probe": "0"}, {"probe": "b"}, {"probe": "a", "comm": "w"},
                                       {"probe": "a", "comm": "x"}, {"probe": "a", "comm": "x", "n": "1"}]
