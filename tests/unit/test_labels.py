"""labels: the label-source registry; what the aggregate counts comes from its entries, comm included."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import ClassVar

import pytest

from feeding import feed_text
from kprobe_exporter import config, labels, probes
from kprobe_exporter.aggregate import Aggregate
from kprobe_exporter.events import EventBatch
from kprobe_exporter.probes import EventSpec

CFG = """
probes:
  - name: f
    uprobe: /bin/x:0x10
    args: {n: "%di:s32", m: "%si:s32"}
    labels: [m, comm, n]
"""


def line(comm: str, tid: int, ts_us: int, body: str) -> bytes:
    return f"{comm:>16}-{tid:<7} [000] ..... {ts_us // 10**6:5d}.{ts_us % 10**6:06d}: {body}".encode()


def make() -> Aggregate:
    cfg = config.load_text(CFG)
    return Aggregate(probes.build_probe_set(cfg, resolve=None), cfg.buckets, label_limit=2)


def counts(agg: Aggregate) -> dict[tuple[tuple[str, str], ...], int]:
    return {lbls: v for (_, lbls), v in agg.snapshot().events.items()}


def test_sources_split_an_events_labels() -> None:
    ev = make().probes.events[0]
    got = [(type(s).__name__, s.labels, at) for s, at in labels.sources_for(ev, 0, ev.labels)]
    assert got == [("ArgSource", ("m", "n"), (0, 2)), ("CommSource", ("comm",), (1,))]
    assert labels.arg_labels(ev) == ("m", "n")


@pytest.mark.parametrize("repeat", [1, 200])  # the per-line parse and the columnar one
def test_values_land_in_label_order_and_the_cap_applies(repeat: int) -> None:
    agg = make()
    feed_text(agg, b"\n".join(repeat * [
        line("a", 1, 10, "f: (0x1) n=1 m=2"), line("b", 2, 11, "f: (0x1) n=1 m=2"),
        line("a", 1, 12, "f: (0x1) n=3 m=4"), line("c", 3, 13, "f: (0x1) n=5 m=6"),
    ]) + b"\n")
    assert counts(agg) == {
        (("m", "2"), ("comm", "a"), ("n", "1")): repeat,
        (("m", "2"), ("comm", "b"), ("n", "1")): repeat,
        (("m", "4"), ("comm", "a"), ("n", "3")): repeat,
        (("m", config.OVERFLOW_VALUE), ("comm", config.OVERFLOW_VALUE), ("n", config.OVERFLOW_VALUE)): repeat,
    }
    assert agg.snapshot().label_overflow == {("f", "m"): repeat, ("f", "comm"): repeat, ("f", "n"): repeat}


class ByThread:
    """A source keyed by thread id, as a cgroup source would be: an entry in the registry is all it takes."""

    labels: tuple[str, ...] = ("comm",)
    asked: ClassVar[list[list[Hashable]]] = []

    def __init__(self, ev: EventSpec, ev_idx: int, names: tuple[str, ...]) -> None:
        pass

    def keys(self, batch: EventBatch, rows: Sequence[int]) -> Sequence[Hashable]:
        return batch.tid[list(rows)].tolist()

    def values(self, batch: EventBatch, keys: Sequence[Hashable]) -> list[tuple[str, ...]]:
        ByThread.asked.append(list(keys))
        return [(f"t{k}",) for k in keys]


def test_a_registry_entry_fills_its_label(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(labels.SOURCES, "comm", ByThread)
    ByThread.asked = []
    agg = make()
    feed_text(agg, b"\n".join([line("a", 1, 10, "f: (0x1) n=1 m=2"), line("a", 1, 11, "f: (0x1) n=1 m=2"),
                               line("a", 7, 12, "f: (0x1) n=1 m=2")]) + b"\n")
    assert counts(agg) == {(("m", "2"), ("comm", "t1"), ("n", "1")): 2, (("m", "2"), ("comm", "t7"), ("n", "1")): 1}
    assert ByThread.asked == [[1, 7]]  # once per distinct key
