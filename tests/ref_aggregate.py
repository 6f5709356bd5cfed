"""The aggregate's semantics as the simplest per-line loop: the oracle of the differential tests.

Everything a line does happens when the line is read: it is counted (label caps decided in order of
first appearance), an entry is pushed on its thread's stack (and the oldest thread's stack of the
pair that grew is evicted past max_pending), an exit pops or counts as unmatched, a LOST line drops
every pending entry, and after any line of a known event whose timestamp passes the next sweep time,
entries older than max_age are evicted from the stacks whose bottom entry is that old (sweeps at
most once a second of trace time).
"""

from __future__ import annotations

import random
from bisect import bisect_left

from kprobe_exporter import parser
from kprobe_exporter.aggregate import EVICT_REASONS, CompletedPair, PairStats, Snapshot
from kprobe_exporter.config import OVERFLOW_VALUE
from kprobe_exporter.probes import ProbeSet


class RefAggregate:
    def __init__(self, probes: ProbeSet, bounds_s: list[float], label_limit: int = 100,
                 max_pending: int = 65536, max_age_s: float = 60.0) -> None:
        self.bounds_s = list(bounds_s)
        self.bounds = [round(b * 1e9) for b in bounds_s]
        self.label_limit, self.max_pending, self.max_age = label_limit, max_pending, int(max_age_s * 1e9)
        self.events = {ev.key.rstrip(b" "): ev for ev in probes.events}
        self.role: dict[str, tuple[str, int]] = {}
        self.stats: dict[str, PairStats] = {}
        self.stack: dict[str, dict[int, list[tuple[int, bytes]]]] = {}
        self.specs = {p.name: p for p in probes.pairs}
        self.by_name = {ev.name: ev for ev in probes.events}
        for p in probes.pairs:
            self.role[p.entry] = (p.name, 1)
            self.role[p.exit] = (p.name, 2)
            self.stats[p.name] = PairStats(p.name, [0] * (len(bounds_s) + 1))
            self.stack[p.name] = {}
        self.counts = {(ev.name, ()): 0 for ev in probes.events if ev.counted and not ev.labels}
        self.labelled: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self.overflow = {(ev.name, lb): 0 for ev in probes.events if ev.counted for lb in ev.labels}
        self.seen: dict[tuple[str, str], set[str]] = {}
        self.errors = dict.fromkeys(parser.REASONS, 0)
        self.lost: dict[int, int] = {}
        self.lines_read = 0
        self.pending = 0
        self.next_sweep = 0
        self.sinks: dict[str, tuple[object, object]] = {}

    def set_sink(self, pair: str, sampling: object, sink: object) -> None:
        self.sinks[pair] = (sampling, sink)

    def feed(self, chunk: bytes) -> None:
        for line in chunk.split(b"\n"):
            if line and line[0] != 0x23:
                self.lines_read += 1
                self.line(line)

    def resolve(self, token: bytes):  # type: ignore[no-untyped-def]
        return self.events.get(token) or self.events.get(parser.dispatch_key(token))

    def line(self, line: bytes) -> None:
        try:
            tid, _, _, ts, start = parser.parse_head(line)
        except parser.ParseError as e:
            if line.startswith(parser.LOST_PREFIX):
                try:
                    cpu, n = parser.parse_lost(line)
                except parser.ParseError as e2:
                    self.errors[e2.reason] += 1
                    return
                self.lost[cpu] = self.lost.get(cpu, 0) + n
                self.drop("lost")
            else:
                self.errors[e.reason] += 1
            return
        ev = self.resolve(parser.event_token(line, start))
        if ev is None:
            self.errors[parser.UNKNOWN_EVENT] += 1
            return
        if ev.counted:
            if ev.labels:
                self.count_labelled(ev, line, start)
            else:
                self.counts[(ev.name, ())] += 1
        if ev.name in self.role:
            self.pair(ev.name, tid, ts, line, start)
        if ts > self.next_sweep:
            self.sweep(ts)

    def count_labelled(self, ev, line: bytes, start: int) -> None:  # type: ignore[no-untyped-def]
        args = parser.arg_reader(ev)(line[start:])
        values = []
        for label in ev.labels:
            raw = parser.comm_of(line) if label == "comm" else args.get(label, b"")
            value = raw.decode("utf-8", "backslashreplace")
            seen = self.seen.setdefault((ev.name, label), set())
            if value not in seen:
                if len(seen) >= self.label_limit:
                    self.overflow[(ev.name, label)] += 1
                    value = OVERFLOW_VALUE
                else:
                    seen.add(value)
            values.append((label, value))
        k = (ev.name, tuple(values))
        self.labelled[k] = self.labelled.get(k, 0) + 1

    def pair(self, name: str, tid: int, ts: int, line: bytes, start: int) -> None:
        pname, role = self.role[name]
        st, stacks = self.stats[pname], self.stack[pname]
        if role == 1:
            stacks.setdefault(tid, []).append((ts, line))
            st.pending += 1
            self.pending += 1
            if self.pending > self.max_pending:
                victim = pname if stacks else max(self.stats, key=lambda p: self.stats[p].pending)
                vst = self.stack[victim]
                n = len(vst.pop(next(iter(vst))))
                self.stats[victim].evicted["capacity"] += n
                self.stats[victim].pending -= n
                self.pending -= n
            return
        stack = stacks.get(tid)
        if not stack:
            st.unmatched += 1
            return
        t0, entry_line = stack.pop()
        if not stack:
            del stacks[tid]
        st.pending -= 1
        self.pending -= 1
        d = ts - t0
        st.buckets[bisect_left(self.bounds, d)] += 1
        st.sum_ns += d
        st.count += 1
        if pname in self.sinks:
            self.span(pname, tid, t0, ts, entry_line, line, start)

    def span(self, pname: str, tid: int, t0: int, t1: int, entry: bytes, exit_line: bytes, start: int) -> None:
        sampling, sink = self.sinks[pname]
        if t1 - t0 < sampling.min_duration_ns:  # type: ignore[attr-defined]
            return
        if sampling.sample_ratio < 1.0 and random.random() >= sampling.sample_ratio:  # type: ignore[attr-defined]
            return
        spec = self.specs[pname]
        ent, ext = self.by_name[spec.entry], self.by_name[spec.exit]
        _, _, _, _, es = parser.parse_head(entry)
        _, tgid, _, _, _ = parser.parse_head(exit_line)
        raw = parser.arg_reader(ent)(entry[es:]) if ent.args else {}
        ret = parser.retval_of(ext, exit_line[start:])
        sink(CompletedPair(pname, ent.function, tid, tgid, parser.comm_of(entry).decode("utf-8", "backslashreplace"),  # type: ignore[operator]
                           t0, t1, tuple((k, v.decode("utf-8", "backslashreplace")) for k, v in raw.items()),
                           ret.decode("ascii", "replace") if ret is not None else None))

    def drop(self, reason: str) -> None:
        for pname, stacks in self.stack.items():
            n = sum(len(s) for s in stacks.values())
            self.stats[pname].evicted[reason] += n
            self.stats[pname].pending -= n
            self.pending -= n
            stacks.clear()

    def sweep(self, now: int) -> None:
        self.next_sweep = now + 1_000_000_000
        limit = now - self.max_age
        for pname, stacks in self.stack.items():
            for tid in list(stacks):
                if stacks[tid][0][0] >= limit:  # a stack is looked at when its bottom (oldest) entry is old
                    continue
                keep = [x for x in stacks[tid] if x[0] >= limit]
                n = len(stacks[tid]) - len(keep)
                self.stats[pname].evicted["age"] += n
                self.stats[pname].pending -= n
                self.pending -= n
                if keep:
                    stacks[tid] = keep
                else:
                    del stacks[tid]

    def snapshot(self) -> Snapshot:
        events = dict(self.counts)
        events.update(self.labelled)
        return Snapshot(events, {k: PairStats(k, list(v.buckets), v.sum_ns, v.count, v.unmatched, dict(v.evicted),
                                              v.pending) for k, v in self.stats.items()},
                        self.lines_read, dict(self.errors), dict(self.lost), dict(self.overflow), self.bounds_s)


assert EVICT_REASONS == ("age", "capacity", "lost")
