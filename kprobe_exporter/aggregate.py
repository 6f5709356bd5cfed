"""Aggregate: per-probe counters and entry/exit pairing per thread into latency histograms.

The hot path. Chunks of complete lines go in; plain ints, lists and dicts come out, snapshotted
under one lock per chunk (never per event). No prometheus_client, no logging here.
"""

from __future__ import annotations

import random
import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from kprobe_exporter import parser
from kprobe_exporter.config import OVERFLOW_VALUE
from kprobe_exporter.probes import EventSpec, ProbeSet

EVICT_REASONS = ("age", "capacity", "lost")


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


class SpanSampling(Protocol):
    sample_ratio: float
    min_duration_ns: int


PairSink = Callable[[CompletedPair], None]


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
    """Per-event dispatch record: what the hot loop does for one event key."""

    __slots__ = ("count_idx", "ev", "labels", "pair", "read_args", "role")

    def __init__(self, ev: EventSpec) -> None:
        self.ev = ev
        self.count_idx = -1
        self.labels: tuple[str, ...] = ev.labels if ev.counted else ()
        self.pair: _Pair | None = None
        self.role = 0  # 1 entry, 2 exit
        self.read_args = parser.arg_reader(ev)


class _Pair:
    __slots__ = ("entry", "exit", "sampling", "sink", "stack", "stats")

    def __init__(self, stats: PairStats, entry: EventSpec, exit_: EventSpec) -> None:
        self.stats = stats
        self.entry, self.exit = entry, exit_
        self.stack: dict[int, list[tuple[int, bytes | None]]] = {}
        self.sink: PairSink | None = None
        self.sampling: SpanSampling | None = None


class Aggregate:
    def __init__(self, probes: ProbeSet, bounds_s: list[float], label_limit: int = 100,
                 max_pending: int = 65536, max_age_s: float = 60.0) -> None:
        self.lock = threading.Lock()
        self.bounds_s = list(bounds_s)
        self._bounds_ns = [round(b * 1e9) for b in bounds_s]
        self.label_limit = label_limit
        self.max_pending = max_pending
        self.max_age_ns = int(max_age_s * 1e9)
        self.lines_read = 0
        self.parse_errors = dict.fromkeys(parser.REASONS, 0)
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
        self._dispatch: dict[bytes, _Event] = {}
        self._labelled_names: set[str] = set()
        self.pairs: dict[str, _Pair] = {}
        by_name: dict[str, _Event] = {}
        for ev in probes.events:
            rec = _Event(ev)
            if ev.counted:
                rec.count_idx = len(self._counts)
                self._counts.append(0)
                self.counted_names.append(ev.name)
                for label in rec.labels:
                    self.label_overflow[(ev.name, label)] = 0
                if rec.labels:
                    self._labelled_names.add(ev.name)
            self._dispatch[ev.key.rstrip(b" ")] = rec
            by_name[ev.name] = rec
        for ps in probes.pairs:
            entry, exit_ = by_name[ps.entry], by_name[ps.exit]
            pair = _Pair(PairStats(ps.name, [0] * (len(bounds_s) + 1)), entry.ev, exit_.ev)
            entry.pair, entry.role = pair, 1
            exit_.pair, exit_.role = pair, 2
            self.pairs[ps.name] = pair

    def set_sink(self, pair: str, sampling: SpanSampling, sink: PairSink) -> None:
        p = self.pairs[pair]
        p.sampling, p.sink = sampling, sink

    # --- the hot path ----------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        """Consume complete lines (a trailing partial line is the reader's to keep)."""
        lines = chunk.split(b"\n")
        with self.lock:
            self._feed_lines(lines)

    def _feed_lines(self, lines: list[bytes]) -> None:
        dispatch = self._dispatch
        parse_head = parser.parse_head
        counts = self._counts
        errors = self.parse_errors
        n = 0
        for line in lines:
            if not line or line[0] == 0x23:  # blank, or a '#' header of a saved `trace` file
                continue
            n += 1
            try:
                tid, tgid, _cpu, ts, start = parse_head(line)
            except parser.ParseError as e:
                if line.startswith(parser.LOST_PREFIX):
                    self._lost_line(line)
                else:
                    errors[e.reason] += 1
                continue
            sp = line.find(b" ", start)
            token = line[start:sp] if sp >= 0 else line[start:]
            rec = dispatch.get(token)
            if rec is None:
                rec = dispatch.get(parser.dispatch_key(token))
                if rec is None:
                    errors[parser.UNKNOWN_EVENT] += 1
                    continue
                if len(dispatch) < 4096:
                    dispatch[token] = rec  # learn `sys_x(dfd:` once; the cache stays bounded
            if rec.count_idx >= 0:
                if rec.labels:
                    self._count_labelled(rec, line, start)
                else:
                    counts[rec.count_idx] += 1
            pair = rec.pair
            if pair is None:
                continue
            if rec.role == 1:
                stack = pair.stack.get(tid)
                item = (ts, line if pair.sink is not None else None)
                if stack is None:
                    pair.stack[tid] = [item]
                else:
                    stack.append(item)
                pair.stats.pending += 1
                self.pending_total += 1
                if self.pending_total > self.max_pending:
                    self._evict_capacity(pair)
            else:
                stack = pair.stack.get(tid)
                if not stack:
                    pair.stats.unmatched += 1
                    continue
                start_ts, entry_line = stack.pop()
                if not stack:
                    del pair.stack[tid]
                pair.stats.pending -= 1
                self.pending_total -= 1
                d = ts - start_ts
                st = pair.stats
                st.buckets[bisect_left(self._bounds_ns, d)] += 1
                st.sum_ns += d
                st.count += 1
                if entry_line is not None:
                    self._maybe_span(pair, tid, tgid, start_ts, ts, entry_line, line, start)
            if ts > self._next_sweep:
                self._sweep(ts)
        self.lines_read += n

    # --- the slower paths, taken per labelled event, span, loss or sweep -----------------
    def _count_labelled(self, rec: _Event, line: bytes, start: int) -> None:
        args = rec.read_args(line[start:]) if any(x != "comm" for x in rec.labels) else {}
        values = []
        for label in rec.labels:
            raw = parser.comm_of(line) if label == "comm" else args.get(label, b"")
            value = raw.decode("utf-8", "backslashreplace")
            key = (rec.ev.name, label)
            seen = self._label_seen.setdefault(key, set())
            if value not in seen:
                if len(seen) >= self.label_limit:
                    self.label_overflow[key] += 1
                    value = OVERFLOW_VALUE
                else:
                    seen.add(value)
            values.append((label, value))
        k = (rec.ev.name, tuple(values))
        self._labelled[k] = self._labelled.get(k, 0) + 1

    def _maybe_span(self, pair: _Pair, tid: int, tgid: int, start_ts: int, end_ts: int,
                    entry_line: bytes, exit_line: bytes, exit_start: int) -> None:
        sampling, sink = pair.sampling, pair.sink
        assert sampling is not None and sink is not None
        if end_ts - start_ts < sampling.min_duration_ns:
            return
        if sampling.sample_ratio < 1.0 and random.random() >= sampling.sample_ratio:
            return
        try:
            _, _, _, _, entry_start = parser.parse_head(entry_line)
        except parser.ParseError:
            return
        ent = pair.entry
        raw_args = parser.arg_reader(ent)(entry_line[entry_start:]) if ent.args else {}
        args = tuple((k, v.decode("utf-8", "backslashreplace")) for k, v in raw_args.items())
        ret = parser.retval_of(pair.exit, exit_line[exit_start:])
        comm = parser.comm_of(entry_line).decode("utf-8", "backslashreplace")
        sink(CompletedPair(pair.stats.name, ent.function, tid, tgid, comm, start_ts, end_ts, args,
                           ret.decode("ascii", "replace") if ret is not None else None))

    def _lost_line(self, line: bytes) -> None:
        try:
            cpu, n = parser.parse_lost(line)
        except parser.ParseError as e:
            self.parse_errors[e.reason] += 1
            return
        self.lost[cpu] = self.lost.get(cpu, 0) + n
        self.drop_pending("lost")

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
        self._next_sweep = now_ns + 1_000_000_000
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
