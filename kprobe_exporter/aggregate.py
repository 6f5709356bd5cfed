"""Aggregate: per-probe counters and entry/exit pairing per thread into latency histograms.

The hot path. Chunks of complete lines go in; plain ints, lists and dicts come out, under one lock
per chunk (never per event). No prometheus_client, no logging here.

A chunk is digested in whole-array passes (bench/README.md has the figures): fastparse turns every
line that has this kernel's fixed-width head into (event, tid, timestamp) columns; the rest take
the per-line parser, which counts malformed lines by reason. Counting is one bincount. Pairing is
bracket matching per (pair, thread) (pairing.match), run over segments of the chunk cut where the
per-line semantics need an order: a LOST line drops every pending entry, an age sweep runs once per
second of trace time, and a segment that could overflow max_pending is redone line by line, so
capacity evictions happen exactly where a per-line loop would make them.
"""

from __future__ import annotations

import random
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from kprobe_exporter import fastparse, pairing, parser, ringbuf
from kprobe_exporter.config import OVERFLOW_VALUE
from kprobe_exporter.probes import COMM_ARG, EventSpec, ProbeSet
from kprobe_exporter.tasks import UNKNOWN_COMM, Tasks

_UNKNOWN = UNKNOWN_COMM.encode()
EV_NONE = -2  # a chunk line that is no event (comment, LOST, unparsable)

EVICT_REASONS = ("age", "capacity", "lost")
I64 = npt.NDArray[np.int64]
PIECE = 4 << 20  # bytes per columnar pass: ~40k lines, big enough to amortise numpy's per-call cost
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


class SpanSampling(Protocol):
    sample_ratio: float
    min_duration_ns: int


PairSink = Callable[[CompletedPair], None]
Pending = tuple[int, bytes | None]  # an open entry: (timestamp ns, its line when spans need it)


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

    __slots__ = ("comm_of", "count_idx", "ev", "idx", "labels", "pair", "pick", "role")

    def __init__(self, ev: EventSpec, idx: int) -> None:
        self.ev = ev
        self.idx = idx
        self.count_idx = -1
        self.labels: tuple[str, ...] = ev.labels if ev.counted else ()
        self.pair: _Pair | None = None
        self.role = 0  # 1 entry, 2 exit
        self.pick = parser.arg_picker(ev, tuple(x for x in self.labels if x != "comm"))
        # a `comm` label takes the comm the probe recorded with the event (COMM_ARG) where a line has it
        recorded = "comm" in self.labels and any(a.name == COMM_ARG for a in ev.args)
        self.comm_of = parser.arg_picker(ev, (COMM_ARG,)) if recorded else None


class _Pair:
    __slots__ = ("entry", "exit", "idx", "sampling", "sink", "stack", "stats")

    def __init__(self, idx: int, stats: PairStats, entry: EventSpec, exit_: EventSpec) -> None:
        self.idx = idx
        self.stats = stats
        self.entry, self.exit = entry, exit_
        self.stack: dict[int, list[Pending]] = {}  # per tid, in the order the stacks were opened
        self.sink: PairSink | None = None
        self.sampling: SpanSampling | None = None


@dataclass
class _Chunk:
    """One chunk's columns: every line's event (-2 none, -1 unknown), tid, timestamp, body start."""

    buf: bytes
    starts: I64
    ends: I64
    ev: I64
    tid: I64
    ts: I64
    body: int  # body start of lines the columnar parser took
    slow_body: dict[int, int]  # body start of lines the per-line parser took
    lost: list[tuple[int, int, int]]  # (line, cpu, events) of LOST lines
    _starts: list[int] | None = None
    _ends: list[int] | None = None

    def line(self, i: int) -> bytes:
        return self.buf[int(self.starts[i]) : int(self.ends[i])]

    def starts_list(self) -> list[int]:
        if self._starts is None:
            self._starts = self.starts.tolist()
        return self._starts

    def ends_list(self) -> list[int]:
        if self._ends is None:
            self._ends = self.ends.tolist()
        return self._ends

    def body_of(self, i: int) -> int:
        return self.slow_body.get(i, self.body)


class Aggregate:
    # Below this many lines a chunk (or a segment's pairs) takes the per-line path: the columnar
    # passes cost ~0.2 ms a chunk whatever its size, the per-line path ~1.5 µs a line.
    min_columnar = 128

    def __init__(self, probes: ProbeSet, bounds_s: list[float], label_limit: int = 100,
                 max_pending: int = 65536, max_age_s: float = 60.0) -> None:
        self.lock = threading.Lock()
        self.bounds_s = list(bounds_s)
        self._bounds_ns = [round(b * 1e9) for b in bounds_s]
        self._bounds_arr = np.array(self._bounds_ns, np.int64)
        self.label_limit = label_limit
        self.max_pending = max_pending
        self.max_age_ns = int(max_age_s * 1e9)
        self.lines_read = 0
        # Live agents name the `<...>` the kernel prints when its comm cache lost a thread (from the
        # same chunk's other lines of that thread, saved_cmdlines again, /proc); replay has none.
        self.tasks: Tasks | None = None
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
        self._events: list[_Event] = []
        self._table = fastparse.TokenTable()
        self._cls_ev = np.full(1, -1, np.int64)  # token class -> event index
        self._plans: dict[fastparse.Template, fastparse.Plan] = {}
        by_name: dict[str, _Event] = {}
        for ev in probes.events:
            rec = _Event(ev, len(self._events))
            self._events.append(rec)
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
        self._pair_list: list[_Pair] = []
        ev_pair = [-1] * len(self._events)
        ev_sign = [0] * len(self._events)
        for ps in probes.pairs:
            entry, exit_ = by_name[ps.entry], by_name[ps.exit]
            pair = _Pair(len(self._pair_list), PairStats(ps.name, [0] * (len(bounds_s) + 1)), entry.ev, exit_.ev)
            entry.pair, entry.role = pair, 1
            exit_.pair, exit_.role = pair, 2
            ev_pair[entry.idx] = ev_pair[exit_.idx] = pair.idx
            ev_sign[entry.idx], ev_sign[exit_.idx] = 1, -1
            self.pairs[ps.name] = pair
            self._pair_list.append(pair)
        self._ev_pair = np.array(ev_pair, np.int64)
        self._ev_sign = np.array(ev_sign, np.int64)

    def set_sink(self, pair: str, sampling: SpanSampling, sink: PairSink) -> None:
        p = self.pairs[pair]
        p.sampling, p.sink = sampling, sink

    # --- the hot path ----------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        """Consume complete lines (a trailing partial line is the reader's to keep)."""
        with self.lock:
            for piece in _pieces(chunk):
                self._feed_chunk(piece)

    def feed_events(self, batch: ringbuf.Batch) -> None:
        """Decoded ring-buffer events (ringbuf.RawReader: every CPU merged in time order), counted and
        paired exactly as feed() counts and pairs lines, with nanosecond timestamps.

        The columns go straight in; text is rendered only for the events whose args or comm are read
        (labelled events, and both ends of pairs that make spans), once per distinct record, so the
        label and span paths are the text path's own.
        """
        ev = batch.ev.astype(np.int64)
        need = np.zeros(len(self._events) + 2, bool)  # by event index + 2 (lost markers, unknown ids)
        sinks = False
        for rec in self._events:
            spans = rec.pair is not None and rec.pair.sink is not None
            need[rec.idx + 2] = bool(rec.labels and rec.count_idx >= 0) or spans
            sinks = sinks or spans
        buf, starts, ends, body, slow = batch.text(need[ev + 2], tgid=sinks)
        at = np.flatnonzero(ev == ringbuf.EV_LOST)
        lost = list(zip(at.tolist(), batch.cpu[at].tolist(), batch.rlen[at].tolist(), strict=True))
        c = _Chunk(buf, starts, ends, ev, batch.tid.astype(np.int64), batch.ts.astype(np.int64), body, slow, lost)
        with self.lock:
            self.lines_read += len(ev) - len(at)
            self._digest(c)

    def _feed_chunk(self, buf: bytes) -> None:
        self._digest(self._parse(buf))

    def _digest(self, c: _Chunk) -> None:
        """Count and pair one chunk's columns (from text lines or from ring-buffer records)."""
        bc = np.bincount(c.ev + 2, minlength=len(self._events) + 2).tolist()
        self.parse_errors[parser.UNKNOWN_EVENT] += bc[1]
        for rec in self._events:
            n = bc[rec.idx + 2]
            if n and rec.count_idx >= 0:
                if rec.labels:
                    self._count_labelled(rec, c)
                else:
                    self._counts[rec.count_idx] += n
        if self._pair_list:
            self._pair_chunk(c)

    def _parse(self, buf: bytes) -> _Chunk:
        starts, ends = fastparse.lines_of(buf)
        n = len(starts)
        c = _Chunk(buf, starts, ends, np.full(n, EV_NONE, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64),
                   0, {}, [])
        todo = np.arange(n)
        if self._table.full:  # a stream of ever new tokens (garbage): start the classes afresh
            self._table = fastparse.TokenTable()
            self._cls_ev = self._cls_ev[:1]
        used: list[fastparse.Plan] = []
        # the chunk's layout, then up to two others (a layout change mid-chunk: record-tgid, seconds' width)
        while len(used) < 3 and len(todo) >= max(1, self.min_columnar if not used else 64):
            plan = self._plan(buf, starts, ends, todo)
            if plan is None or plan in used:
                break
            used.append(plan)
            p = fastparse.parse(buf, starts[todo], ends[todo], plan, self._table)
            if len(self._table.tokens) > len(self._cls_ev):
                self._learn_classes()
            took = todo[p.ok]
            c.ev[took] = self._cls_ev[p.cls[p.ok]]
            c.tid[took] = p.tid[p.ok]
            c.ts[took] = p.ts[p.ok]
            if len(used) == 1:
                c.body = p.body
            elif p.body != c.body:
                c.slow_body.update(dict.fromkeys(took.tolist(), p.body))
            todo = todo[~p.ok]
        return self._parse_lines(c, todo)

    def _plan(self, buf: bytes, starts: I64, ends: I64, todo: I64) -> fastparse.Plan | None:
        for i in todo[:16].tolist():
            line = buf[int(starts[i]) : int(ends[i])]
            if line[:1] not in (b"", b"#"):
                tpl = fastparse.learn(line)
                if tpl is not None:
                    plan = self._plans.get(tpl)
                    if plan is None:
                        plan = self._plans[tpl] = fastparse.Plan.of(tpl)
                    return plan
        return None

    def _learn_classes(self) -> None:
        tokens = self._table.tokens
        extra = [self._resolve(t) for t in tokens[len(self._cls_ev) :]]
        self._cls_ev = np.concatenate([self._cls_ev, np.array([-1 if r is None else r.idx for r in extra], np.int64)])

    def _resolve(self, token: bytes) -> _Event | None:
        dispatch = self._dispatch
        rec = dispatch.get(token)
        if rec is None:
            rec = dispatch.get(parser.dispatch_key(token))
            if rec is not None and len(dispatch) < 4096:
                dispatch[token] = rec  # learn `sys_x(dfd:` once; the cache stays bounded
        return rec

    def _parse_lines(self, c: _Chunk, todo: I64) -> _Chunk:
        """The per-line parser for lines the columnar one left: LOST lines, headers, errors, others."""
        errors = self.parse_errors
        buf, starts, ends = c.buf, c.starts, c.ends
        fast = len(c.ev) - len(todo)
        read = 0
        for i in todo.tolist():
            line = buf[int(starts[i]) : int(ends[i])]
            if not line or line[0] == 0x23:  # blank, or a '#' header of a saved `trace` file
                continue
            read += 1
            try:
                tid, _tgid, _cpu, ts, start = parser.parse_head(line)
            except parser.ParseError as e:
                if line.startswith(parser.LOST_PREFIX):
                    try:
                        cpu, n = parser.parse_lost(line)
                        c.lost.append((i, cpu, n))
                    except parser.ParseError as e2:
                        errors[e2.reason] += 1
                else:
                    errors[e.reason] += 1
                continue
            sp = line.find(b" ", start)
            rec = self._resolve(line[start:sp] if sp >= 0 else line[start:])
            c.ev[i] = -1 if rec is None else rec.idx
            c.tid[i], c.ts[i] = tid, ts
            c.slow_body[i] = start
        self.lines_read += fast + read
        return c

    # --- labels ------------------------------------------------------------------------
    @staticmethod
    def _name_unknown(c: _Chunk, idx: list[int], comms: list[bytes], tasks: Tasks) -> list[bytes]:
        tids, evs, starts = c.tid.tolist(), c.ev.tolist(), c.starts_list()
        known: dict[int, bytes] = {}
        for i, t in enumerate(tids):  # rare (the kernel's cache missed): the whole chunk may be read
            cm = c.buf[starts[i] : starts[i] + 16].lstrip()
            if cm != _UNKNOWN and evs[i] != EV_NONE:
                known[t] = cm
        out = []
        for i, cm in zip(idx, comms, strict=True):
            if cm == _UNKNOWN:
                t = tids[i]
                cm = known.get(t) or tasks.comm(t).encode("utf-8", "backslashreplace")[-16:]
            out.append(cm)
        return out

    def _count_labelled(self, rec: _Event, c: _Chunk) -> None:
        # Bodies are counted first (Counter runs at C speed) and args are read once per distinct
        # body: label values repeat, and so do whole bodies more often than not (the corpus: 0.9 ->
        # 0.2 µs a labelled line). A value's fate under the label cap is decided once, in order of
        # first appearance, which is what a per-line loop would do.
        labels, pick = rec.labels, rec.pick
        buf, starts, ends = c.buf, c.starts_list(), c.ends_list()
        idx = np.flatnonzero(c.ev == rec.idx).tolist()
        slow, body = c.slow_body, c.body
        bodies = [buf[starts[i] + slow.get(i, body) : ends[i]] for i in idx] if slow else \
            [buf[starts[i] + body : ends[i]] for i in idx]
        comm_at = labels.index("comm") if "comm" in labels else -1
        rows: Counter[tuple[bytes, ...]] = Counter()
        if comm_at < 0:
            for b, n in Counter(bodies).items():
                rows[pick(b)] += n
        else:
            comms = [buf[starts[i] : starts[i] + 16].lstrip() for i in idx]
            if rec.comm_of is not None:
                recorded = {b: rec.comm_of(b)[0] for b in set(bodies)}
                comms = [recorded[b] or cm for b, cm in zip(bodies, comms, strict=True)]
            if self.tasks is not None and _UNKNOWN in comms:
                comms = self._name_unknown(c, idx, comms, self.tasks)
            for (comm, b), n in Counter(zip(comms, bodies, strict=True)).items():
                v = pick(b)
                rows[(*v[:comm_at], comm, *v[comm_at:])] += n
        name = rec.ev.name
        keys = [(name, label) for label in labels]
        for raw, n in rows.items():
            values = []
            for key, label, r in zip(keys, labels, raw, strict=True):
                value = r.decode("utf-8", "backslashreplace")
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
    def _pair_chunk(self, c: _Chunk) -> None:
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

    def _pair_segment(self, c: _Chunk, roles: I64, lo: int, hi: int) -> None:
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

    def _pair_lines(self, c: _Chunk, pos: I64) -> None:
        """The per-line pairing loop, for segments that reach max_pending."""
        bounds = self._bounds_ns
        spans: list[tuple[_Pair, int, int, int, bytes | None, int]] = []
        for i in pos.tolist():
            rec = self._events[int(c.ev[i])]
            pair = rec.pair
            assert pair is not None
            tid, ts = int(c.tid[i]), int(c.ts[i])
            if rec.role == 1:
                item = (ts, c.line(i) if pair.sink is not None else None)
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
            start_ts, entry_line = stack.pop()
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
                spans.append((pair, tid, start_ts, ts, entry_line, i))
        for pair, tid, start_ts, ts, entry_line, i in spans:
            self._span(pair, tid, start_ts, ts, entry_line, c.line(i), c.body_of(i))

    # --- the slower paths, taken per span, loss or sweep -----------------------------------
    def _span(self, pair: _Pair, tid: int, start_ts: int, end_ts: int, entry_line: bytes | None,
              exit_line: bytes, exit_start: int) -> None:
        sampling, sink = pair.sampling, pair.sink
        assert sampling is not None and sink is not None
        if entry_line is None or end_ts - start_ts < sampling.min_duration_ns:
            return
        if sampling.sample_ratio < 1.0 and random.random() >= sampling.sample_ratio:
            return
        try:
            _, _, _, _, entry_start = parser.parse_head(entry_line)
            _, tgid, _, _, _ = parser.parse_head(exit_line)
        except parser.ParseError:
            return
        ent = pair.entry
        raw_args = parser.arg_reader(ent)(entry_line[entry_start:]) if ent.args else {}
        recorded = raw_args.pop(COMM_ARG, None)  # the comm at the event, where the probe records it
        args = tuple((k, v.decode("utf-8", "backslashreplace")) for k, v in raw_args.items())
        ret = parser.retval_of(pair.exit, exit_line[exit_start:])
        comm = (recorded or parser.comm_of(entry_line)).decode("utf-8", "backslashreplace")
        if self.tasks is not None:
            if comm == UNKNOWN_COMM:
                comm = self.tasks.comm(tid)
            # The kernel prints the tgid its table had when it formatted the line: for a thread not yet
            # switched out since it started, a previous holder's of that id. A live thread knows better.
            tgid = t if (t := self.tasks.tgid(tid)) >= 0 else tgid
        sink(CompletedPair(pair.stats.name, ent.function, tid, tgid, comm, start_ts, end_ts, args,
                           ret.decode("ascii", "replace") if ret is not None else None))

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


def _pieces(chunk: bytes) -> Iterator[bytes]:
    """Whole-line pieces of about PIECE bytes: a bigger chunk would only grow the temporaries."""
    if len(chunk) <= 2 * PIECE:
        yield chunk
        return
    start = 0
    while start < len(chunk):
        cut = chunk.find(b"\n", start + PIECE) + 1
        if cut <= 0:
            cut = len(chunk)
        yield chunk[start:cut]
        start = cut


class _SegmentMatch:
    """The pairing of one segment, computed without side effects, then committed (or thrown away
    when the segment would overflow max_pending and the per-line loop takes it instead)."""

    def __init__(self, agg: Aggregate, c: _Chunk, pos: I64, pair: I64, sign: I64) -> None:
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
                item = (t, c.line(int(self.pos[s])) if pair.sink is not None else None)
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
                entry_line = self.virtual[-1 - s][1] if s < 0 else c.line(int(self.pos[s]))
                out.append((int(self.pos[self.src[x]]), p, int(self.keys[x]) & TID_MASK, int(self.ts[e]),
                            int(self.ts[x]), entry_line))
        out.sort(key=lambda o: o[0])  # in the order of the exits, as a per-line loop emits them
        for xi, p, tid, start_ts, end_ts, entry_line in out:
            agg._span(p, tid, start_ts, end_ts, entry_line, c.line(xi), c.body_of(xi))
