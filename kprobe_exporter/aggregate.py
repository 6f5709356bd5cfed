"""Aggregate: per-probe counters, label counts and entry/exit pairing per thread into latency histograms.

The hot path. Event batches go in (from either reader: events.EventBatch); plain ints, lists and dicts
come out, under one lock per batch (never per event). No prometheus_client, no logging here.

A batch is digested in whole-array passes. Counting is one
bincount; labels come from label sources (labels.py), one value lookup per distinct key. Pairing is
bracket matching per (pair, thread) (pairing.match), run over segments of the batch cut where the
per-event semantics need an order: a loss marker drops every pending entry, an age sweep runs once
per second of trace time, and a segment that could overflow max_pending is redone event by event,
so capacity evictions happen exactly where a per-event loop would make them.
"""

from __future__ import annotations

import random
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from kprobe_exporter import pairing
from kprobe_exporter.config import OVERFLOW_VALUE
from kprobe_exporter.events import REASONS, UNKNOWN_EVENT, EventBatch, Record
from kprobe_exporter.labels import LabelContext, LabelSource, present, sources_for, span_where
from kprobe_exporter.probes import COMM_ARG, EventSpec, PairSpec, ProbeSet

EVICT_REASONS = ("age", "capacity", "lost")
I64 = npt.NDArray[np.int64]
TID_BITS = 30  # tids (<= 9 digits) fit; (pair << TID_BITS) | tid is one sort key
TID_MASK = (1 << TID_BITS) - 1
SWEEP_NS = 1_000_000_000


class CompletedPair(NamedTuple):
    pair: str  # the pair's name (the span's name)
    function: str  # the probed symbol
    tid: int
    tgid: int  # -1 when unknown
    comm: str
    start_ns: int  # trace clock (CLOCK_MONOTONIC) nanoseconds
    end_ns: int
    args: tuple[tuple[str, str], ...]  # the entry's args as (name, text)
    retval: str | None
    # where the thread ran, under OpenTelemetry's names (cgroups.SPAN_ATTRIBUTES): the cgroup labels the
    # entry probe has, their values as the metrics show them, "" and `unknown` left out
    where: tuple[tuple[str, str], ...] = ()


class SpanSampling(Protocol):
    sample_ratio: float
    min_duration_ns: int


PairSink = Callable[[CompletedPair], None]
Pending = tuple[int, Record | None]  # an open entry: (timestamp ns, its record when spans need it)


@dataclass
class PairStats:
    name: str
    buckets: list[int]  # non-cumulative counts per bound, plus +Inf last
    sum_ns: int = 0
    count: int = 0
    unmatched: int = 0
    evicted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVICT_REASONS, 0))
    pending: int = 0


@dataclass
class Snapshot:
    """A consistent copy of everything the aggregate counts, for one scrape."""

    events: dict[tuple[str, tuple[tuple[str, str], ...]], int]
    pairs: dict[str, PairStats]
    lines_read: int
    parse_errors: dict[str, int]
    lost: dict[int, int]
    label_overflow: dict[tuple[str, str], int]
    bounds_s: list[float]


class _Event:
    """Per-event dispatch record: what the aggregate does for one event."""

    __slots__ = ("count_idx", "ev", "idx", "labels", "pair", "role", "sources")

    def __init__(self, ev: EventSpec, idx: int, ctx: LabelContext) -> None:
        self.ev = ev
        self.idx = idx
        self.count_idx = -1
        self.labels: tuple[str, ...] = present(ev.labels, ctx) if ev.counted else ()
        self.pair: _Pair | None = None
        self.role = 0  # 1 entry, 2 exit
        self.sources: list[tuple[LabelSource, tuple[int, ...]]] = sources_for(ev, idx, self.labels, ctx)


class _Pair:
    __slots__ = ("entry", "exit", "idx", "sampling", "sink", "stack", "stats", "where")

    def __init__(self, idx: int, stats: PairStats, entry: EventSpec, exit_: EventSpec, ctx: LabelContext) -> None:
        self.idx = idx
        self.where = span_where(entry.labels, ctx)  # cgroup and pod labels as span attributes (labels.py)
        self.stats = stats
        self.entry, self.exit = entry, exit_
        self.stack: dict[int, list[Pending]] = {}  # per tid, in the order the stacks were opened
        self.sink: PairSink | None = None
        self.sampling: SpanSampling | None = None


def kernel_span(pair: str, function: str, tid: int, rec: Record) -> CompletedPair | None:
    """A span from a kernel-mode pair's synthetic event (`lat=N ts0=N pid=N`, triggers.SPAN_FIELDS):
    start at the entry's timestamp, the kernel's duration, the return value (`ret=`, decimal there) in hex
    as the return probe prints it; None when a field does not decode."""
    fields = dict(rec.args())
    try:
        lat, ts0 = int(fields["lat"]), int(fields["ts0"])
        ret = f"{int(fields['ret']):#x}" if "ret" in fields else None
    except (KeyError, ValueError):
        return None
    return CompletedPair(pair, function, tid, rec.tgid(), rec.comm(), ts0, ts0 + lat, (), ret)


@dataclass
class _KernelSpans:
    pair: PairSpec
    sampling: SpanSampling | None = None
    sink: PairSink | None = None


class Aggregate:
    # Below this many events a segment's pairs take the per-event loop: the columnar passes have a
    # fixed cost per batch that the loop undercuts on small ones (bench/README.md).
    min_columnar = 128

    def __init__(self, probes: ProbeSet, bounds_s: list[float], label_limit: int = 100,
                 max_pending: int = 65536, max_age_s: float = 60.0, label_context: LabelContext | None = None) -> None:
        self.lock = threading.Lock()
        self.probes = probes
        self.bounds_s = list(bounds_s)
        self._bounds_ns = [round(b * 1e9) for b in bounds_s]
        self._bounds_arr = np.array(self._bounds_ns, np.int64)
        self.label_limit = label_limit
        self.max_pending = max_pending
        self.max_age_ns = int(max_age_s * 1e9)
        self.lines_read = 0
        self.parse_errors = dict.fromkeys(REASONS, 0)
        self.lost: dict[int, int] = {}  # from LOST lines
        self.lost_stats: dict[int, int] = {}  # from per-CPU stats (overrun + dropped)
        self.label_overflow: dict[tuple[str, str], int] = {}
        self._label_seen: dict[tuple[str, str], set[str]] = {}
        self.pending_total = 0
        self._last_ts = 0
        self._next_sweep = 0
        self.counted_names: list[str] = []
        self._counts: list[int] = []
        self._labelled: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._labelled_names: set[str] = set()
        self.pairs: dict[str, _Pair] = {}
        self._events: list[_Event] = []
        by_name: dict[str, _Event] = {}
        self.label_context = label_context if label_context is not None else LabelContext()
        for ev in probes.events:
            rec = _Event(ev, len(self._events), self.label_context)
            self._events.append(rec)
            if ev.counted:
                rec.count_idx = len(self._counts)
                self._counts.append(0)
                self.counted_names.append(ev.name)
                for label in rec.labels:
                    self.label_overflow[(ev.name, label)] = 0
                if rec.labels:
                    self._labelled_names.add(ev.name)
            by_name[ev.name] = rec
        self._pair_list: list[_Pair] = []
        ev_pair = [-1] * len(self._events)
        ev_sign = [0] * len(self._events)
        for ps in probes.pairs:
            entry, exit_ = by_name[ps.entry], by_name[ps.exit]
            pair = _Pair(len(self._pair_list), PairStats(ps.name, [0] * (len(bounds_s) + 1)), entry.ev, exit_.ev,
                         self.label_context)
            entry.pair, entry.role = pair, 1
            exit_.pair, exit_.role = pair, 2
            ev_pair[entry.idx] = ev_pair[exit_.idx] = pair.idx
            ev_sign[entry.idx], ev_sign[exit_.idx] = 1, -1
            self.pairs[ps.name] = pair
            self._pair_list.append(pair)
        self._ev_pair = np.array(ev_pair, np.int64)
        self._ev_sign = np.array(ev_sign, np.int64)
        # kernel-mode pairs' slow calls (their synthetic event's index): spans only, counted in the kernel
        self._kernel_spans: dict[int, _KernelSpans] = {
            by_name[ks.event.name].idx: _KernelSpans(ks.pair) for ks in probes.kernel_spans}

    def set_sink(self, pair: str, sampling: SpanSampling, sink: PairSink) -> None:
        ks = next((k for k in self._kernel_spans.values() if k.pair.name == pair), None)
        p: _Pair | _KernelSpans = ks if ks is not None else self.pairs[pair]
        p.sampling, p.sink = sampling, sink

    # --- the hot path ----------------------------------------------------------------
    def feed(self, batch: EventBatch) -> None:
        """Count and pair one batch (from text lines or from ring-buffer records)."""
        with self.lock:
            self.lines_read += batch.read
            for reason, n in batch.errors.items():
                self.parse_errors[reason] += n
            bc = np.bincount(batch.ev + 2, minlength=len(self._events) + 2).tolist()
            self.parse_errors[UNKNOWN_EVENT] += bc[1]
            for rec in self._events:
                n = bc[rec.idx + 2]
                if n and rec.count_idx >= 0:
                    if rec.labels:
                        self._count_labelled(rec, batch)
                    else:
                        self._counts[rec.count_idx] += n
            if self._pair_list:
                self._pair_chunk(batch)
            for idx, ks in self._kernel_spans.items():
                if bc[idx + 2] and ks.sink is not None:
                    self._kernel_span_rows(ks, batch, idx)

    def _kernel_span_rows(self, ks: _KernelSpans, c: EventBatch, idx: int) -> None:
        """Spans of the slow calls a kernel-mode pair's synthetic event brought (rare: behind `lat >=`)."""
        sampling, sink = ks.sampling, ks.sink
        assert sampling is not None and sink is not None
        for row in np.flatnonzero(c.ev == idx).tolist():
            span = kernel_span(ks.pair.name, ks.pair.function, int(c.tid[row]), c.records.detach(row))
            if span is None:  # min_duration was the kernel's filter (triggers.SpanStream): not again here
                continue
            if sampling.sample_ratio < 1.0 and random.random() >= sampling.sample_ratio:
                continue
            sink(span)

    # --- labels ------------------------------------------------------------------------
    def _count_labelled(self, rec: _Event, c: EventBatch) -> None:
        # Rows are counted by their sources' keys first (Counter runs at C speed) and each source
        # turns a distinct key into values once. A value's fate under the label cap is decided once,
        # in order of first appearance, which is what a per-event loop would do.
        idx = np.flatnonzero(c.ev == rec.idx).tolist()
        sources = rec.sources
        if len(sources) == 1:
            keyed: Counter[tuple[Hashable, ...]] = Counter()
            for k, n in Counter(sources[0][0].keys(c, idx)).items():
                keyed[(k,)] = n
        else:
            keyed = Counter(zip(*(src.keys(c, idx) for src, _ in sources), strict=True))
        combos = list(keyed)
        rows: Counter[tuple[str, ...]] = Counter()
        out = [[""] * len(rec.labels) for _ in combos]
        for j, (src, at) in enumerate(sources):
            distinct = list(dict.fromkeys(combo[j] for combo in combos))
            values = dict(zip(distinct, src.values(c, distinct), strict=True))
            for row, combo in zip(out, combos, strict=True):
                for pos, v in zip(at, values[combo[j]], strict=True):
                    row[pos] = v
        for row, combo in zip(out, combos, strict=True):
            rows[tuple(row)] += keyed[combo]
        self._count_rows(rec, rows)

    def _count_rows(self, rec: _Event, rows: Counter[tuple[str, ...]]) -> None:
        labels, name = rec.labels, rec.ev.name
        keys = [(name, label) for label in labels]
        for raw, n in rows.items():
            values = []
            for key, label, value in zip(keys, labels, raw, strict=True):
                seen = self._label_seen.setdefault(key, set())
                if value not in seen:
                    if len(seen) >= self.label_limit:
                        self.label_overflow[key] += n
                        value = OVERFLOW_VALUE
                    else:
                        seen.add(value)
                values.append((label, value))
            k = (name, tuple(values))
            self._labelled[k] = self._labelled.get(k, 0) + n

    # --- pairing -------------------------------------------------------------------------
    def _pair_chunk(self, c: EventBatch) -> None:
        """Pair in segments: each ends at a LOST line (which drops what is pending) or at a line whose
        timestamp passes the next age sweep (run after that line, as a per-line loop would)."""
        known = np.flatnonzero(c.ev >= 0)
        kts = c.ts[known]
        roles = np.flatnonzero(c.ev >= 0)
        roles = roles[self._ev_pair[c.ev[roles]] >= 0]
        lost = sorted(c.lost)
        lo, k = 0, 0  # next line, next known line
        sweeps = 0
        for barrier, cpu, n in [*lost, (len(c.ev), -1, 0)]:
            kb = int(np.searchsorted(known, barrier))
            while k < kb:
                j = self._next_trigger(kts, k, kb, sweeps)
                if j < 0:
                    break
                line = int(known[j])
                self._pair_segment(c, roles, lo, line + 1)
                self._sweep(int(kts[j]))
                sweeps += 1
                lo, k = line + 1, j + 1
            self._pair_segment(c, roles, lo, barrier)
            lo, k = barrier + 1, kb
            if cpu >= 0:
                self.lost[cpu] = self.lost.get(cpu, 0) + n
                self.drop_pending("lost")

    def _next_trigger(self, kts: I64, k: int, kb: int, sweeps: int) -> int:
        """The first known line from k (before kb) whose timestamp passes the next sweep, or -1."""
        limit = self._next_sweep
        if sweeps < 8:
            over = kts[k:kb] > limit
            j = int(np.argmax(over))
            return k + j if over[j] else -1
        for j, t in enumerate(kts[k:kb].tolist()):  # many sweeps in one chunk: strange clocks; O(n)
            if t > limit:
                return k + j
        return -1

    def _pair_segment(self, c: EventBatch, roles: I64, lo: int, hi: int) -> None:
        a, b = np.searchsorted(roles, [lo, hi]).tolist()
        if a == b:
            return
        pos = roles[a:b]
        if len(pos) < self.min_columnar:
            self._pair_lines(c, pos)
            return
        ev = c.ev[pos]
        m = _SegmentMatch(self, c, pos, self._ev_pair[ev], self._ev_sign[ev])
        if self.pending_total + m.n_entries > self.max_pending and m.peak() > self.max_pending:
            self._pair_lines(c, pos)  # capacity evictions: exactly where the per-line loop makes them
        else:
            m.commit()

    def _pair_lines(self, c: EventBatch, pos: I64) -> None:
        """The per-line pairing loop, for segments that reach max_pending."""
        bounds = self._bounds_ns
        spans: list[tuple[_Pair, int, int, int, Record | None, int]] = []
        for i in pos.tolist():
            rec = self._events[int(c.ev[i])]
            pair = rec.pair
            assert pair is not None
            tid, ts = int(c.tid[i]), int(c.ts[i])
            if rec.role == 1:
                item = (ts, c.records.detach(i) if pair.sink is not None else None)
                stack = pair.stack.get(tid)
                if stack is None:
                    pair.stack[tid] = [item]
                else:
                    stack.append(item)
                pair.stats.pending += 1
                self.pending_total += 1
                if self.pending_total > self.max_pending:
                    self._evict_capacity(pair)
                continue
            stack = pair.stack.get(tid)
            if not stack:
                pair.stats.unmatched += 1
                continue
            start_ts, entry = stack.pop()
            if not stack:
                del pair.stack[tid]
            pair.stats.pending -= 1
            self.pending_total -= 1
            d = ts - start_ts
            st = pair.stats
            st.buckets[bisect_left(bounds, d)] += 1
            st.sum_ns += d
            st.count += 1
            if pair.sink is not None:
                spans.append((pair, tid, start_ts, ts, entry, i))
        for pair, tid, start_ts, ts, entry, i in spans:
            self._span(pair, tid, start_ts, ts, entry, c.records.detach(i))

    # --- the slower paths, taken per span, loss or sweep -----------------------------------
    def _span(self, pair: _Pair, tid: int, start_ts: int, end_ts: int, entry: Record | None, exit_: Record) -> None:
        sampling, sink = pair.sampling, pair.sink
        assert sampling is not None and sink is not None
        if entry is None or end_ts - start_ts < sampling.min_duration_ns:
            return
        if sampling.sample_ratio < 1.0 and random.random() >= sampling.sample_ratio:
            return
        ent = pair.entry
        args = entry.args() if ent.args else ()
        # the comm the probe recorded with the event (probes.COMM_ARG) names a task that has since exited
        recorded = next((v for k, v in args if k == COMM_ARG), "")
        if recorded:
            args = tuple(a for a in args if a[0] != COMM_ARG)
        where = pair.where(tid) if pair.where is not None else ()
        sink(CompletedPair(pair.stats.name, ent.function, tid, exit_.tgid(), recorded or entry.comm(), start_ts,
                           end_ts, args, exit_.retval(), where))

    def set_stats_lost(self, cpu: int, total: int) -> None:
        """Loss the per-CPU stats show; it overlaps the LOST lines, so the larger of the two counts."""
        with self.lock:
            seen = self.lost_stats.get(cpu)
            if seen is None or total > seen:
                self.lost_stats[cpu] = total  # a 0 too: every CPU's series exists from the start
                if total > (seen or 0):
                    self.drop_pending("lost")

    def drop_pending(self, reason: str) -> None:
        for pair in self.pairs.values():
            n = sum(len(s) for s in pair.stack.values())
            if n:
                pair.stats.evicted[reason] += n
                pair.stats.pending -= n
                self.pending_total -= n
                pair.stack.clear()

    def _evict_capacity(self, current: _Pair) -> None:
        # The pair that just grew gives up its oldest thread's stack (dicts keep insertion order).
        victim = current if current.stack else max(self.pairs.values(), key=lambda p: p.stats.pending)
        tid = next(iter(victim.stack))
        n = len(victim.stack.pop(tid))
        victim.stats.evicted["capacity"] += n
        victim.stats.pending -= n
        self.pending_total -= n

    def _sweep(self, now_ns: int) -> None:
        self._last_ts = now_ns
        self._next_sweep = now_ns + SWEEP_NS
        limit = now_ns - self.max_age_ns
        for pair in self.pairs.values():
            stale = []
            for tid, stack in pair.stack.items():
                if stack[0][0] < limit:
                    keep = [x for x in stack if x[0] >= limit]
                    n = len(stack) - len(keep)
                    pair.stats.evicted["age"] += n
                    pair.stats.pending -= n
                    self.pending_total -= n
                    if keep:
                        stack[:] = keep
                    else:
                        stale.append(tid)
            for tid in stale:
                del pair.stack[tid]

    def sweep(self, now_ns: int) -> None:
        """Age eviction when no events arrive to drive it (called by the agent's idle loop)."""
        with self.lock:
            if now_ns > self._last_ts:
                self._sweep(now_ns)

    # --- read side ---------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self.lock:
            events: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {
                (name, ()): self._counts[i] for i, name in enumerate(self.counted_names)
                if name not in self._labelled_names
            }
            events.update(self._labelled)
            pairs = {}
            for name, p in self.pairs.items():
                s = p.stats
                pairs[name] = PairStats(name, list(s.buckets), s.sum_ns, s.count, s.unmatched,
                                        dict(s.evicted), s.pending)
            lost = {cpu: max(self.lost.get(cpu, 0), self.lost_stats.get(cpu, 0))
                    for cpu in self.lost.keys() | self.lost_stats.keys()}
            return Snapshot(events, pairs, self.lines_read, dict(self.parse_errors), lost,
                            dict(self.label_overflow), self.bounds_s)


class _SegmentMatch:
    """The pairing of one segment, computed without side effects, then committed (or thrown away
    when the segment would overflow max_pending and the per-line loop takes it instead)."""

    def __init__(self, agg: Aggregate, c: EventBatch, pos: I64, pair: I64, sign: I64) -> None:
        self.agg, self.c, self.pos = agg, c, pos
        self.n_entries = int(np.count_nonzero(sign > 0))
        key = (pair << TID_BITS) | c.tid[pos]
        order = pairing.stable_order(key)
        keys, signs, src = key[order], sign[order], order
        ts = c.ts[pos][order]
        # Entries still open from earlier chunks go first in their group ("virtual" entries; src < 0),
        # only the top of each stack that the group's exits reach (as deep as its running sum of +1
        # entry, -1 exit falls below zero): the entries below stay where they are, so the work is
        # the segment's, not the pending state's.
        self.virtual: list[Pending] = []
        self.old: dict[int, tuple[int, int]] = {}  # group key -> (entries left below, index in virtual)
        if any(p.stack for p in agg._pair_list):
            first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            run = np.cumsum(signs)
            run -= np.repeat(run[first] - signs[first], np.diff(np.r_[first, len(run)]))
            reach = np.maximum(0, -np.minimum.reduceat(run, first))
            at: list[int] = []
            vkeys: list[int] = []
            for g, k, nx in zip(first.tolist(), keys[first].tolist(), reach.tolist(), strict=True):
                stack = agg._pair_list[k >> TID_BITS].stack.get(k & TID_MASK)
                if stack:
                    below = max(0, len(stack) - nx)
                    self.old[k] = (below, len(self.virtual))
                    top = stack[below:]
                    at.extend([g] * len(top))
                    vkeys.extend([k] * len(top))
                    self.virtual.extend(top)
            if at:
                keys = np.insert(keys, at, vkeys)
                signs = np.insert(signs, at, 1)
                ts = np.insert(ts, at, [t for t, _ in self.virtual])
                src = np.insert(src, at, -1 - np.arange(len(at)))
        self.keys, self.signs, self.ts, self.src = keys, signs, ts, src
        self.m = pairing.match(keys, signs)

    def peak(self) -> int:
        """The most entries pending at any line of the segment, had it been paired line by line."""
        delta = np.zeros(len(self.pos), np.int64)
        delta[self.src[(self.src >= 0) & (self.signs > 0)]] = 1
        delta[self.src[self.m.exits]] = -1
        return self.agg.pending_total + max(0, int(np.cumsum(delta).max()))

    def commit(self) -> None:
        agg, m = self.agg, self.m
        pairs = agg._pair_list
        npairs, nb = len(pairs), len(agg._bounds_ns) + 1
        d = self.ts[m.exits] - self.ts[m.entries]
        which = self.keys[m.exits] >> TID_BITS
        bucket = np.searchsorted(agg._bounds_arr, d, side="left")
        hist = np.bincount(which * nb + bucket, minlength=npairs * nb).reshape(npairs, nb)
        matched = hist.sum(axis=1).tolist()
        unmatched = np.bincount(self.keys[m.unmatched] >> TID_BITS, minlength=npairs).tolist()
        entries = np.bincount(self.keys[(self.src >= 0) & (self.signs > 0)] >> TID_BITS, minlength=npairs).tolist()
        exact = len(d) == 0 or int(np.abs(d).max()) < (1 << 62) // len(d)  # else int64 could overflow
        for p in pairs:
            i = p.idx
            st = p.stats
            if matched[i]:
                for b_i, v in enumerate(hist[i].tolist()):
                    if v:
                        st.buckets[b_i] += v
                sel = d[which == i]
                st.sum_ns += int(sel.sum()) if exact else sum(sel.tolist())
                st.count += matched[i]
            st.unmatched += unmatched[i]
            grown = entries[i] - matched[i]
            st.pending += grown
            agg.pending_total += grown
        self._restack()
        if any(p.sink is not None for p in pairs):
            self._spans(d, which)

    def _restack(self) -> None:
        """Stacks of the groups this segment touched: the entries left open, bottom first."""
        agg, c, m = self.agg, self.c, self.m
        new: dict[int, list[Pending]] = {}
        bottom: dict[int, int] = {}  # group -> src of its new stack's bottom entry
        for k, s, t in zip(self.keys[m.open].tolist(), self.src[m.open].tolist(), self.ts[m.open].tolist(),
                           strict=True):
            if s < 0:
                item = self.virtual[-1 - s]
            else:
                pair = agg._pair_list[k >> TID_BITS]
                item = (t, c.records.detach(int(self.pos[s])) if pair.sink is not None else None)
            lst = new.get(k)
            if lst is None:
                new[k] = [item]
                bottom[k] = s
            else:
                lst.append(item)
        for k, (below, _) in self.old.items():
            if k not in new:
                stacks = agg._pair_list[k >> TID_BITS].stack
                if below:
                    del stacks[k & TID_MASK][below:]
                else:
                    del stacks[k & TID_MASK]
        # A stack that never emptied keeps its place in its dict (capacity eviction takes the oldest);
        # one that emptied and refilled, or is new, goes to the end, in the order of its bottom entry.
        reopened = []
        for k, lst in new.items():
            stacks = agg._pair_list[k >> TID_BITS].stack
            old = self.old.get(k)
            if old is not None and (old[0] > 0 or bottom[k] == -1 - old[1]):
                stacks[k & TID_MASK][old[0]:] = lst
            else:
                stacks.pop(k & TID_MASK, None)
                reopened.append((int(self.pos[bottom[k]]), k, lst))
        for _, k, lst in sorted(reopened, key=lambda r: r[0]):
            agg._pair_list[k >> TID_BITS].stack[k & TID_MASK] = lst

    def _spans(self, d: I64, which: I64) -> None:
        agg, c, m = self.agg, self.c, self.m
        out = []
        for p in agg._pair_list:
            if p.sink is None or p.sampling is None:
                continue
            for j in np.flatnonzero((which == p.idx) & (d >= p.sampling.min_duration_ns)).tolist():
                e, x = int(m.entries[j]), int(m.exits[j])
                s = int(self.src[e])
                entry = self.virtual[-1 - s][1] if s < 0 else c.records.detach(int(self.pos[s]))
                out.append((int(self.pos[self.src[x]]), p, int(self.keys[x]) & TID_MASK, int(self.ts[e]),
                            int(self.ts[x]), entry))
        out.sort(key=lambda o: o[0])  # in the order of the exits, as a per-event loop emits them
        for xi, p, tid, start_ts, end_ts, entry in out:
            agg._span(p, tid, start_ts, end_ts, entry, c.records.detach(xi))
