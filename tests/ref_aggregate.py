"""The aggregate's semantics as the simplest per-line loop: the oracle of the differential tests.

Written from the kernel's trace format alone (DESIGN.md, "Kernel facts"; the fixtures' bodies) and
sharing no code with kprobe_exporter, so that a fault in the package's parser, arg reader, event
dispatch or return-value reading shows up as a difference. Its only input from the package is the
ProbeSet, read as data: event names, kinds, targets, definition lines, fetchargs, labels and pairs.

What a line does happens when it is read: it is counted (label caps decided in order of first
appearance), an entry is pushed on its thread's stack (and the oldest thread's stack of the pair that
grew is evicted past max_pending), an exit pops or counts as unmatched, a LOST line drops every
pending entry, and after any line of a known event whose timestamp passes the next sweep time,
entries older than max_age are evicted from the stacks whose bottom entry is that old (sweeps at
most once a second of trace time).

The line head (kernel/trace/trace_output.c): `%16s-%-7d` comm and pid, an optional `(%7d)` tgid
column (record-tgid), `[%03d]` CPU, optional irq-info flags, `%5lu.%06lu: ` seconds and microseconds,
then the event's body. Numbers are plain ASCII digits, at most 9 of them for pid, CPU and seconds.
"""

from __future__ import annotations

import random
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, NamedTuple

REASONS = ("bad_head", "bad_timestamp", "unknown_event", "bad_lost_line")
EVICT_REASONS = ("age", "capacity", "lost")
OVERFLOW = "__overflow__"
STRING_TYPES = ("string", "ustring", "symstr")  # fetcharg types the kernel prints quoted, raw

NUMBER = re.compile(rb"[0-9]{1,9}")
STAMP = re.compile(rb"([0-9]{1,9})\.([0-9]{6})")
TGID = re.compile(rb"[^(]*\(\s*([0-9]+)\s*\)")  # the first '(' before the CPU column, if any
LOST = re.compile(rb"CPU:([0-9]+) \[LOST ([0-9]+) EVENTS\]")
DEFINED_AS = re.compile(r"[pr][0-9]*:(?:[^/ ]+/)?(\S+)\s")  # `p:GROUP/EVENT TARGET ...`
FETCH_TYPE = re.compile(r":([A-Za-z][\w@/\[\]]*)$")


class Head(NamedTuple):
    tid: int
    tgid: int
    ts_ns: int
    body: int  # where the body starts


def head(line: bytes) -> Head | str:
    """The line head, or the reason it is not an event line."""
    if len(line) < 30 or line[16:17] != b"-":
        return "bad_head"
    pid, space, rest = line[17:].partition(b" ")
    before_cpu, bracket, rest = rest.partition(b"[")
    cpu, close, rest = rest.partition(b"]")
    stamp_area, colon, _ = rest.partition(b": ")
    if not (space and bracket and close and colon and NUMBER.fullmatch(pid) and NUMBER.fullmatch(cpu)):
        return "bad_head"
    m = TGID.match(before_cpu)
    words = stamp_area.rsplit(b" ", 1)
    stamp = STAMP.fullmatch(words[1]) if len(words) == 2 else None
    if stamp is None:
        return "bad_timestamp"
    body = len(line) - len(rest) + len(stamp_area) + 2
    return Head(int(pid), int(m.group(1)) if m else -1, int(stamp.group(1)) * 10**9 + int(stamp.group(2)) * 1000,
                body)


class Arg(NamedTuple):
    name: str
    quoted: bool  # a string: printed raw between quotes


class Event:
    """What the trace shows of one event of the ProbeSet."""

    def __init__(self, ev: Any) -> None:
        self.name: str = ev.name
        self.kind: str = ev.kind
        self.function: str = ev.function
        self.counted: bool = ev.counted
        self.labels: tuple[str, ...] = tuple(ev.labels)
        self.args = [Arg(a.name, is_quoted(a.fetch)) for a in ev.args]
        self.tracepoint = ev.kind == "tracepoint"
        if self.tracepoint:
            event = ev.target.rpartition("/")[2]
            # syscall tracepoints print the syscall: `sys_openat(dfd: ...)`, `sys_openat -> 0x3`
            if event.startswith("sys_enter_"):
                self.token = ("sys_" + event[len("sys_enter_"):] + "(").encode()
            elif event.startswith("sys_exit_"):
                self.token = ("sys_" + event[len("sys_exit_"):]).encode()
            else:
                self.token = (event + ":").encode()
        else:
            m = DEFINED_AS.match(ev.definition or "")
            self.token = ((m.group(1) if m else ev.name) + ":").encode()

    def read_args(self, body: bytes) -> dict[str, bytes]:
        return tracepoint_fields(body) if self.tracepoint else probe_args(self.args, body)

    def retval(self, body: bytes) -> bytes | None:
        if self.tracepoint:
            at = body.find(b" -> ")
            return body[at + 4 :].strip() if at >= 0 else None
        values = probe_args(self.args, body)
        for name in ("ret", "arg1"):
            if name in values:
                return values[name]
        return next(iter(values.values()), None)


def is_quoted(fetch: str) -> bool:
    m = FETCH_TYPE.search(fetch)
    return (m is not None and m.group(1).split("[")[0] in STRING_TYPES) or fetch == "$comm"


def probe_args(args: list[Arg], body: bytes) -> dict[str, bytes]:
    """`name: (0xip) a=1 s="raw text" b=0x2`: the args in their defined order, each ` NAME=` once. A
    number holds no space, so a quoted string ends at the last `"` that the next ` NAME=` follows.
    Reading stops at the first arg that is not there."""
    out: dict[str, bytes] = {}
    paren = body.find(b") ")
    pos = paren + 1 if paren >= 0 else 0
    for i, arg in enumerate(args):
        marker = b" " + arg.name.encode() + b"="
        at = body.find(marker, pos)
        if at < 0:
            break
        start = at + len(marker)
        end = len(body)
        if i + 1 < len(args):
            following = b" " + args[i + 1].name.encode() + b"="
            q = body.rfind(b'"' + following, start + 1) if arg.quoted else -1
            end = q + 1 if q >= 0 else body.find(following, start)
            if end < 0:
                end = len(body)
        value = body[start:end]
        if arg.quoted and len(value) >= 2 and value.startswith(b'"') and value.endswith(b'"'):
            value = value[1:-1]
        out[arg.name] = value
        pos = end
    return out


def tracepoint_fields(body: bytes) -> dict[str, bytes]:
    """`sys_x(a: 1, b: 2)`, `sys_x -> 0x3`, or `name: f=v f2=v2`."""
    if body.startswith(b"sys_"):
        if b" -> " in body:
            return {"ret": body.split(b" -> ", 1)[1].strip()}
        inner = body[body.find(b"(") + 1 : body.rfind(b")")]
        return {k.decode("ascii", "replace"): v for k, sep, v in (p.partition(b": ") for p in inner.split(b", "))
                if sep}
    fields = body[body.find(b": ") + 2 :].split(b" ")
    return {k.decode("ascii", "replace"): v for k, sep, v in (f.partition(b"=") for f in fields) if sep}


class RefPair(NamedTuple):
    """Equal, as a tuple, to the package's CompletedPair of the same call."""

    pair: str
    function: str
    tid: int
    tgid: int
    comm: str
    start_ns: int
    end_ns: int
    args: tuple[tuple[str, str], ...]
    retval: str | None
    where: tuple[tuple[str, str], ...] = ()  # cgroup attributes: none without cgroup labels, as here


@dataclass
class RefPairStats:
    name: str
    buckets: list[int]
    sum_ns: int = 0
    count: int = 0
    unmatched: int = 0
    evicted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVICT_REASONS, 0))
    pending: int = 0


@dataclass
class RefSnapshot:
    events: dict[tuple[str, tuple[tuple[str, str], ...]], int]
    pairs: dict[str, RefPairStats]
    lines_read: int
    parse_errors: dict[str, int]
    lost: dict[int, int]
    label_overflow: dict[tuple[str, str], int]
    bounds_s: list[float]


Open = tuple[int, bytes, int]  # an entry waiting for its exit: (timestamp ns, its line, its body start)


class RefAggregate:
    def __init__(self, probes: Any, bounds_s: list[float], label_limit: int = 100,
                 max_pending: int = 65536, max_age_s: float = 60.0) -> None:
        self.bounds_s = list(bounds_s)
        self.bounds = [round(b * 1e9) for b in bounds_s]
        self.label_limit, self.max_pending, self.max_age = label_limit, max_pending, int(max_age_s * 1e9)
        self.by_name = {ev.name: Event(ev) for ev in probes.events}
        self.by_token = {e.token: e for e in self.by_name.values()}
        self.role: dict[str, tuple[str, int]] = {}
        self.stats: dict[str, RefPairStats] = {}
        self.stack: dict[str, dict[int, list[Open]]] = {}
        self.ends = {p.name: (p.entry, p.exit) for p in probes.pairs}
        for p in probes.pairs:
            self.role[p.entry] = (p.name, 1)
            self.role[p.exit] = (p.name, 2)
            self.stats[p.name] = RefPairStats(p.name, [0] * (len(bounds_s) + 1))
            self.stack[p.name] = {}
        events = self.by_name.values()
        self.counts = {(e.name, ()): 0 for e in events if e.counted and not e.labels}
        self.labelled: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self.overflow = {(e.name, lb): 0 for e in events if e.counted for lb in e.labels}
        self.seen: dict[tuple[str, str], set[str]] = {}
        self.errors = dict.fromkeys(REASONS, 0)
        self.lost: dict[int, int] = {}
        self.lines_read = 0
        self.pending = 0
        self.next_sweep = 0
        self.sinks: dict[str, tuple[Any, Any]] = {}

    def set_sink(self, pair: str, sampling: Any, sink: Any) -> None:
        self.sinks[pair] = (sampling, sink)

    def feed(self, chunk: bytes) -> None:
        for line in chunk.split(b"\n"):
            if line and line[0] != 0x23:  # '#': the header of a saved `trace` file
                self.lines_read += 1
                self.line(line)

    def event_of(self, body: bytes) -> Event | None:
        """The event a body belongs to, by its first word: `name:`, `sys_x(a:`, `sys_x()` or `sys_x`."""
        word = body.split(b" ", 1)[0]
        paren = word.find(b"(")
        return self.by_token.get(word) or (self.by_token.get(word[: paren + 1]) if paren >= 0 else None)

    def line(self, line: bytes) -> None:
        h = head(line)
        if isinstance(h, str):
            if line.startswith(b"CPU:"):
                m = LOST.match(line)
                if m is None:
                    self.errors["bad_lost_line"] += 1
                    return
                cpu = int(m.group(1))
                self.lost[cpu] = self.lost.get(cpu, 0) + int(m.group(2))
                self.drop("lost")
            else:
                self.errors[h] += 1
            return
        ev = self.event_of(line[h.body :])
        if ev is None:
            self.errors["unknown_event"] += 1
            return
        if ev.counted:
            if ev.labels:
                self.count_labelled(ev, line, h.body)
            else:
                self.counts[(ev.name, ())] += 1
        if ev.name in self.role:
            self.pair(ev.name, h, line)
        if h.ts_ns > self.next_sweep:
            self.sweep(h.ts_ns)

    def count_labelled(self, ev: Event, line: bytes, body: int) -> None:
        args = ev.read_args(line[body:])
        values = []
        for label in ev.labels:
            raw = line[:16].lstrip() if label == "comm" else args.get(label, b"")
            value = raw.decode("utf-8", "backslashreplace")
            seen = self.seen.setdefault((ev.name, label), set())
            if value not in seen:
                if len(seen) >= self.label_limit:
                    self.overflow[(ev.name, label)] += 1
                    value = OVERFLOW
                else:
                    seen.add(value)
            values.append((label, value))
        k = (ev.name, tuple(values))
        self.labelled[k] = self.labelled.get(k, 0) + 1

    def pair(self, name: str, h: Head, line: bytes) -> None:
        pname, role = self.role[name]
        st, stacks = self.stats[pname], self.stack[pname]
        if role == 1:
            stacks.setdefault(h.tid, []).append((h.ts_ns, line, h.body))
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
        stack = stacks.get(h.tid)
        if not stack:
            st.unmatched += 1
            return
        entry = stack.pop()
        if not stack:
            del stacks[h.tid]
        st.pending -= 1
        self.pending -= 1
        d = h.ts_ns - entry[0]
        st.buckets[bisect_left(self.bounds, d)] += 1
        st.sum_ns += d
        st.count += 1
        if pname in self.sinks:
            self.span(pname, entry, h, line)

    def span(self, pname: str, entry: Open, h: Head, exit_line: bytes) -> None:
        sampling, sink = self.sinks[pname]
        t0, entry_line, entry_body = entry
        if h.ts_ns - t0 < sampling.min_duration_ns:
            return
        if sampling.sample_ratio < 1.0 and random.random() >= sampling.sample_ratio:
            return
        ent, ext = (self.by_name[n] for n in self.ends[pname])
        raw = ent.read_args(entry_line[entry_body:]) if ent.args else {}
        ret = ext.retval(exit_line[h.body :])
        sink(RefPair(pname, ent.function, h.tid, h.tgid, entry_line[:16].lstrip().decode("utf-8", "backslashreplace"),
                     t0, h.ts_ns, tuple((k, v.decode("utf-8", "backslashreplace")) for k, v in raw.items()),
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

    def snapshot(self) -> RefSnapshot:
        events = dict(self.counts)
        events.update(self.labelled)
        return RefSnapshot(events, {k: RefPairStats(k, list(v.buckets), v.sum_ns, v.count, v.unmatched,
                                                    dict(v.evicted), v.pending) for k, v in self.stats.items()},
                           self.lines_read, dict(self.errors), dict(self.lost), dict(self.overflow), self.bounds_s)

