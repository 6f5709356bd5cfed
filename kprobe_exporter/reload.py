"""Reload: a new config diffed against the running one; the counts of kept probes carried across.

On SIGHUP the agent builds the new probe set, and `plan` says which events stay installed untouched,
which go and which come (a changed event goes and comes back). The aggregate is rebuilt for the new
set; what the old one counted for kept events and pairs becomes a `base` snapshot that `merge`
adds to every later scrape, so kept counters continue where they were and never go down.

Pure functions over specs and snapshots: nothing here touches tracefs or the aggregate's insides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from kprobe_exporter import symbols
from kprobe_exporter.aggregate import PairStats, Snapshot
from kprobe_exporter.config import OVERFLOW_VALUE, Config
from kprobe_exporter.kinds import parse_definition
from kprobe_exporter.probes import EventSpec, ProbeSet

# Pending entries of kept pairs that a rebuilt aggregate cannot inherit are counted, not hidden.
RELOAD_EVICT_REASON = "reload"
# Config fields that a running agent cannot change in place: they need a restart.
RESTART_FIELDS = ("instance", "listen_address", "reader", "otlp_metrics")


@dataclass(frozen=True)
class Plan:
    keep: frozenset[str]  # events whose counts carry over (same spec)
    remove: tuple[EventSpec, ...]  # old events to disable and undefine: gone, changed, or re-targeted
    add: tuple[EventSpec, ...]  # new events to define and enable
    keep_pairs: frozenset[str]  # pairs whose histograms carry over
    restart: tuple[str, ...] = ()  # fields that changed but need a restart
    changed: bool = True
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.keep)} kept, {len(self.remove)} removed, {len(self.add)} added"
                + (f" ({'; '.join(self.notes)})" if self.notes else ""))


def file_identity(ev: EventSpec) -> tuple[int, int] | None:
    """(device, inode) of a uprobe's binary: a uprobe sticks to the inode, not to the path."""
    if not ev.probe_kind.user:
        return None
    try:
        st = os.stat(ev.target.rpartition(":")[0])
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _same(a: EventSpec, b: EventSpec) -> bool:
    """Equal specs, a container-bound uprobe's PID aside: a restarted container is the same probe (whether
    its file is another one is the file identity's question)."""
    if a == b:
        return True
    pin = symbols.unpinned
    return (a.definition is not None and b.definition is not None
            and replace(a, target=pin(a.target), definition=pin(a.definition))
            == replace(b, target=pin(b.target), definition=pin(b.definition)))


def plan(old_cfg: Config, old: ProbeSet, new_cfg: Config, new: ProbeSet,
         installed_files: dict[str, tuple[int, int] | None]) -> Plan:
    """What a reload from (old_cfg, old) to (new_cfg, new) changes.

    installed_files: the binary identity each installed uprobe was defined on; a kept uprobe whose
    path now names another file (a package upgrade) is defined again, its counts kept.
    """
    restart = tuple(f for f in RESTART_FIELDS if getattr(old_cfg, f) != getattr(new_cfg, f))
    old_by = {ev.name: ev for ev in old.events}
    new_by = {ev.name: ev for ev in new.events}
    keep = {name for name, ev in new_by.items() if name in old_by and _same(old_by[name], ev)}
    notes = []
    retarget = {name for name in keep
                if new_by[name].probe_kind.user
                and file_identity(new_by[name]) != installed_files.get(name)}
    if retarget:
        notes.append(f"binary replaced under {', '.join(sorted(retarget))}: defined again")
    remove = tuple(ev for ev in old.events if ev.name not in keep or ev.name in retarget)
    add = tuple(ev for ev in new.events if ev.name not in keep or ev.name in retarget)
    old_pairs = {p.name: p for p in old.pairs}
    same_buckets = list(old_cfg.buckets) == list(new_cfg.buckets)
    keep_pairs = {p.name for p in new.pairs
                  if same_buckets and old_pairs.get(p.name) == p and p.entry in keep and p.exit in keep}
    if not same_buckets and old.pairs:
        notes.append("buckets changed: latency histograms start over")
    changed = bool(remove or add) or old_cfg != new_cfg or old.pairs != new.pairs
    return Plan(frozenset(keep), remove, add, frozenset(keep_pairs), restart, changed, notes)


def _add_pairs(a: PairStats, b: PairStats) -> PairStats:
    evicted = dict(a.evicted)
    for reason, n in b.evicted.items():
        evicted[reason] = evicted.get(reason, 0) + n
    return PairStats(b.name, [x + y for x, y in zip(a.buckets, b.buckets, strict=True)], a.sum_ns + b.sum_ns,
                     a.count + b.count, a.unmatched + b.unmatched, evicted, b.pending)


K = TypeVar("K")


def _sum(a: dict[K, int], b: dict[K, int]) -> dict[K, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def merge(base: Snapshot | None, cur: Snapshot, label_limit: int) -> Snapshot:
    """What a scrape shows: the base carried from earlier configs plus the live aggregate.

    Label caps hold across reloads: the base's values of a label count against its cap first; a
    value the live aggregate admitted beyond what is left becomes __overflow__ (first seen first, so
    the choice is stable from scrape to scrape).
    """
    if base is None:
        return cur
    events = dict(base.events)
    overflow = _sum(base.label_overflow, cur.label_overflow)
    admitted: dict[tuple[str, str], set[str]] = {}
    for probe, labels in base.events:
        for label, v in labels:
            admitted.setdefault((probe, label), set()).add(v)
    for (probe, labels), n in cur.events.items():
        if labels:
            folded = []
            for label, v in labels:
                seen = admitted.setdefault((probe, label), set())
                if v != OVERFLOW_VALUE and v not in seen:
                    if len(seen - {OVERFLOW_VALUE}) < label_limit:
                        seen.add(v)
                    else:
                        overflow[(probe, label)] = overflow.get((probe, label), 0) + n
                        v = OVERFLOW_VALUE
                folded.append((label, v))
            labels = tuple(folded)
        events[(probe, labels)] = events.get((probe, labels), 0) + n
    pairs = dict(cur.pairs)
    for name, st in base.pairs.items():
        if name in pairs and len(pairs[name].buckets) == len(st.buckets):
            pairs[name] = _add_pairs(st, pairs[name])
    return Snapshot(events, pairs, base.lines_read + cur.lines_read, _sum(base.parse_errors, cur.parse_errors),
                    _sum(base.lost, cur.lost), overflow, cur.bounds_s)


def carry(base: Snapshot | None, final: Snapshot, label_limit: int, keep: Iterable[str],
          keep_pairs: Iterable[str]) -> Snapshot:
    """The base for the next aggregate: everything counted so far, narrowed to what is kept.

    The agent-wide counters (lines read, parse errors, loss) always carry. Entries still pending in
    kept pairs cannot move to the new aggregate: they are counted as evicted for reason 'reload'.
    """
    total = merge(base, final, label_limit)
    keep, keep_pairs = set(keep), set(keep_pairs)
    events = {k: v for k, v in total.events.items() if k[0] in keep}
    pairs = {}
    for name, st in total.pairs.items():
        if name in keep_pairs:
            evicted = dict(st.evicted)
            evicted[RELOAD_EVICT_REASON] = evicted.get(RELOAD_EVICT_REASON, 0) + st.pending
            pairs[name] = PairStats(name, list(st.buckets), st.sum_ns, st.count, st.unmatched, evicted, 0)
    overflow = {k: v for k, v in total.label_overflow.items() if k[0] in keep}
    return Snapshot(events, pairs, total.lines_read, dict(total.parse_errors), dict(total.lost), overflow,
                    total.bounds_s)


def regroup(events: Iterable[EventSpec], group: str, other: str) -> tuple[EventSpec, ...]:
    """The same events defined in another group (a scratch one): tracepoints stay as they are."""
    out = []
    for ev in events:
        d = parse_definition(ev.definition) if ev.definition is not None and ev.group == group else None
        if d is not None:
            ev = replace(ev, group=other, definition=d.line(group=other))
        out.append(ev)
    return tuple(out)
