"""Label sources: where a counted event's label values come from, one registry entry per kind of label.

A source names the labels it fills, takes from a batch one hashable key per row (what the values
depend on: a comm, an args payload, a thread id), and turns the distinct keys into values. The
aggregate counts rows by key first (at C speed) and asks for values once per distinct key: label
values repeat, and so do whole keys more often than not.

Adding a kind of label is one entry in SOURCES: a class with `labels`, `keys`, `values`; the labels
an entry claims (cgroup's four) are filled by one instance of it. What sources share per agent (the
tid -> cgroup cache) comes in a LabelContext. Labels no entry claims are the event's args.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np

from kprobe_exporter.cgroups import LABELS as CGROUP_LABELS
from kprobe_exporter.cgroups import SPAN_ATTRIBUTES, UNKNOWN, CgroupLabels, CgroupOf, Rewrite
from kprobe_exporter.events import EventBatch
from kprobe_exporter.kube import KUBE_LABELS, KubeLabels, PodMetadata
from kprobe_exporter.probes import COMM_ARG, EventSpec


class LabelSource(Protocol):
    labels: tuple[str, ...]  # the labels it fills, in this order in each values tuple

    def keys(self, batch: EventBatch, rows: Sequence[int]) -> Sequence[Hashable]: ...

    def values(self, batch: EventBatch, keys: Sequence[Hashable]) -> list[tuple[str, ...]]: ...


@dataclass
class LabelContext:
    """What the label sources of one agent share: one tid -> cgroup cache, the config's rewrite rule."""

    cgroup_of: CgroupOf = field(default_factory=CgroupOf)
    rewrite: Rewrite | None = None
    pods: PodMetadata | None = None  # the node's pod list; None outside Kubernetes: pod labels absent


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


class CommSource:
    """`comm`: the thread's name as the probe recorded it with the event (probes.COMM_ARG), else as the
    trace shows it (named live where the kernel printed `<...>`): the text names a task from the kernel's
    bounded comm cache when it is read, by then `<...>` for one that has exited."""

    labels: tuple[str, ...] = ("comm",)

    def __init__(self, ev: EventSpec, ev_idx: int, labels: tuple[str, ...], ctx: LabelContext) -> None:
        self.recorded = any(a.name == COMM_ARG for a in ev.args)
        self.ev_idx = ev_idx

    def keys(self, batch: EventBatch, rows: Sequence[int]) -> Sequence[Hashable]:
        if not self.recorded:
            return batch.records.comms(rows)
        pick, seen = batch.records.picker(self.ev_idx, (COMM_ARG,)), dict[bytes, bytes]()
        comms = [seen[p] if p in seen else seen.setdefault(p, pick(p)[0]) for p in batch.records.payloads(rows)]
        if missing := [i for i, c in enumerate(comms) if not c]:  # text of a config without it (replay)
            for i, c in zip(missing, batch.records.comms([rows[i] for i in missing]), strict=True):
                comms[i] = c
        return comms  # the trace's comm asked for only where none was recorded

    def values(self, batch: EventBatch, keys: Sequence[Hashable]) -> list[tuple[str, ...]]:
        return [(_text(k),) for k in keys]  # type: ignore[arg-type]


class ArgSource:
    """The event's args named as labels, read from each distinct payload once."""

    def __init__(self, ev: EventSpec, ev_idx: int, labels: tuple[str, ...], ctx: LabelContext) -> None:
        self.labels = labels
        self.ev_idx = ev_idx

    def keys(self, batch: EventBatch, rows: Sequence[int]) -> Sequence[Hashable]:
        return batch.records.payloads(rows)

    def values(self, batch: EventBatch, keys: Sequence[Hashable]) -> list[tuple[str, ...]]:
        pick = batch.records.picker(self.ev_idx, self.labels)
        return [tuple(_text(v) for v in pick(k)) for k in keys]  # type: ignore[arg-type]


class CgroupSource:
    """`cgroup`, `container_id`, `pod_uid`, `systemd_unit`: where the thread ran (cgroups.py), from the
    thread, not the record, on every kind of probe. One lookup for all four.

    Keyed by the thread's cgroup path, looked up per distinct tid in `keys` (numpy spreads it back per
    row): a host has a few dozen cgroups for hundreds of threads, so the aggregate's combinations of
    keys stay few (bench/bench_labels.py: keyed by tid, each combination of tid and the other labels'
    keys was one more Python step)."""

    def __init__(self, ev: EventSpec, ev_idx: int, labels: tuple[str, ...], ctx: LabelContext) -> None:
        self.labels = labels
        self.cgroups = CgroupLabels(labels, ctx.cgroup_of, ctx.rewrite)

    def keys(self, batch: EventBatch, rows: Sequence[int]) -> Sequence[Hashable]:
        return self.cgroups.of.values(batch.tid[np.asarray(rows, dtype=np.int64)])

    def values(self, batch: EventBatch, keys: Sequence[Hashable]) -> list[tuple[str, ...]]:
        return [self.cgroups.row(cast(str, p)) for p in keys]


class KubeSource:
    """`pod`, `namespace`, `container`: names from the node's pod list (kube.py) by the thread's cgroup.
    Only in Kubernetes: elsewhere `present` leaves them out of an event's labels (absent, not "")."""

    def __init__(self, ev: EventSpec, ev_idx: int, labels: tuple[str, ...], ctx: LabelContext) -> None:
        if ctx.pods is None:
            raise ValueError("pod labels outside Kubernetes: labels.present leaves them out")
        self.labels = labels
        self.kube = KubeLabels(labels, ctx.cgroup_of, ctx.pods)

    def keys(self, batch: EventBatch, rows: Sequence[int]) -> Sequence[Hashable]:
        return self.kube.of.values(batch.tid[np.asarray(rows, dtype=np.int64)])  # by path, as CgroupSource

    def values(self, batch: EventBatch, keys: Sequence[Hashable]) -> list[tuple[str, ...]]:
        index = self.kube.meta.index
        return [self.kube.row(cast(str, p), index) for p in keys]


def present(labels: tuple[str, ...], ctx: LabelContext) -> tuple[str, ...]:
    """The labels an event has here: the pod labels only where there is a pod list."""
    return labels if ctx.pods is not None else tuple(lb for lb in labels if lb not in KUBE_LABELS)


SourceFactory = Callable[[EventSpec, int, tuple[str, ...], LabelContext], LabelSource]

# label name -> its source; labels naming the same source share one instance of it. The labels left
# over are args (one ArgSource for all of an event's).
SOURCES: dict[str, SourceFactory] = {"comm": CommSource, **dict.fromkeys(CGROUP_LABELS, CgroupSource),
                                     **dict.fromkeys(KUBE_LABELS, KubeSource)}


def sources_for(ev: EventSpec, ev_idx: int, labels: tuple[str, ...],
                ctx: LabelContext | None = None) -> list[tuple[LabelSource, tuple[int, ...]]]:
    """The sources that fill `labels` of an event, each with the positions of its labels among them."""
    ctx = ctx if ctx is not None else LabelContext()
    out: list[tuple[LabelSource, tuple[int, ...]]] = []
    args = tuple(i for i, lb in enumerate(labels) if lb not in SOURCES)
    if args:
        out.append((ArgSource(ev, ev_idx, tuple(labels[i] for i in args), ctx), args))
    by_source: dict[SourceFactory, list[int]] = {}
    for i, lb in enumerate(labels):
        if lb in SOURCES:
            by_source.setdefault(SOURCES[lb], []).append(i)
    for factory, at in by_source.items():
        out.append((factory(ev, ev_idx, tuple(labels[i] for i in at), ctx), tuple(at)))
    return out


class SpanWhere:
    """Where a pair's thread ran, as span attributes under OpenTelemetry's names (cgroups.SPAN_ATTRIBUTES):
    the entry probe's cgroup labels and, in Kubernetes, its pod labels (k8s.pod.name, k8s.namespace.name,
    k8s.container.name, once the pod list knows the pod). "" and `unknown` are left out. Per span, not
    per event: a span is the slow path."""

    def __init__(self, labels: Sequence[str], ctx: LabelContext) -> None:
        cg = [n for n in labels if n in CGROUP_LABELS and n in SPAN_ATTRIBUTES]
        kube = [n for n in labels if n in KUBE_LABELS] if ctx.pods is not None else []
        self.parts: list[CgroupLabels | KubeLabels] = []
        if cg:
            self.parts.append(CgroupLabels(cg, ctx.cgroup_of, ctx.rewrite))
        if kube and ctx.pods is not None:
            self.parts.append(KubeLabels(kube, ctx.cgroup_of, ctx.pods))

    def __call__(self, tid: int) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        for part in self.parts:
            vals = part.by_tid([tid])[tid]
            out += [(SPAN_ATTRIBUTES[n], v) for n, v in zip(part.names, vals, strict=True) if v not in ("", UNKNOWN)]
        return tuple(out)


def span_where(labels: Sequence[str], ctx: LabelContext) -> SpanWhere | None:
    """The span attributes of an entry probe with these labels; None when it has none of them."""
    w = SpanWhere(labels, ctx)
    return w if w.parts else None


def needs_tgid(events: Sequence[EventSpec]) -> bool:
    """Whether label sources ask for a thread's process: the cgroup of a thread gone before its first
    lookup is its process's, found in the kernel's saved_tgids (filled only with record-tgid on)."""
    return any(lb in CGROUP_LABELS or lb in KUBE_LABELS for ev in events for lb in ev.labels)


def arg_labels(ev: EventSpec) -> tuple[str, ...]:
    """The labels of an event that are its args (what a reader must be able to decode)."""
    return tuple(lb for lb in ev.labels if lb not in SOURCES)
