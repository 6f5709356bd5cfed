"""Text source: chunks of trace text (trace_pipe, a saved `trace` file) to event batches.

A chunk is parsed in whole-array passes: fastparse turns every
line that has this kernel's fixed-width head into (event, tid, timestamp) columns; the rest take
the per-line parser, which counts malformed lines by reason and finds the LOST lines. A line's comm
and args stay in the text until a label or a span asks (TextRecords).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from kprobe_exporter import fastparse, parser
from kprobe_exporter.events import EV_NONE, I64, REASONS, ArgPicker, EventBatch
from kprobe_exporter.probes import EventSpec, ProbeSet
from kprobe_exporter.tasks import UNKNOWN_COMM, Tasks

_UNKNOWN = UNKNOWN_COMM.encode()
PIECE = 4 << 20  # bytes per columnar pass: ~40k lines, big enough to amortise numpy's per-call cost


class TextRecord:
    """One line, kept for a span: comm, tgid, args and return value are read from it when asked."""

    __slots__ = ("_tgid", "body", "ev", "line", "tasks", "tid")

    def __init__(self, line: bytes, body: int, ev: EventSpec, tid: int, tasks: Tasks | None,
                 tgid: int | None = None) -> None:
        self.line, self.body, self.ev, self.tid, self.tasks, self._tgid = line, body, ev, tid, tasks, tgid

    def comm(self) -> str:
        comm = parser.comm_of(self.line).decode("utf-8", "backslashreplace")
        if comm == UNKNOWN_COMM and self.tasks is not None:
            comm = self.tasks.comm(self.tid)
        return comm

    def tgid(self) -> int:
        # The kernel prints the tgid its table had when it formatted the line: for a thread not yet
        # switched out since it started, a previous holder's of that id. The tgid settled when the
        # batch was read (Tasks.tgids), else a live thread, knows better.
        if self._tgid is not None and self._tgid >= 0:
            return self._tgid
        if self._tgid is None and self.tasks is not None and (t := self.tasks.tgid(self.tid)) >= 0:
            return t
        try:
            return parser.parse_head(self.line)[1]
        except parser.ParseError:
            return -1

    def args(self) -> tuple[tuple[str, str], ...]:
        raw = parser.arg_reader(self.ev)(self.line[self.body:])
        return tuple((k, v.decode("utf-8", "backslashreplace")) for k, v in raw.items())

    def retval(self) -> str | None:
        ret = parser.retval_of(self.ev, self.line[self.body:])
        return ret.decode("ascii", "replace") if ret is not None else None


class TextRecords:
    """A chunk's lines behind an event batch."""

    def __init__(self, buf: bytes, starts: I64, ends: I64, events: Sequence[EventSpec], tasks: Tasks | None) -> None:
        self.buf, self.starts, self.ends = buf, starts, ends
        self.events, self.tasks = events, tasks
        self.body = 0  # body start of lines the columnar parser took
        self.slow_body: dict[int, int] = {}  # body start of the other lines
        self.ev: I64 = np.zeros(0, np.int64)
        self.tid: I64 = np.zeros(0, np.int64)
        self._starts: list[int] | None = None
        self._ends: list[int] | None = None
        self._pickers: dict[tuple[int, tuple[str, ...]], ArgPicker] = {}
        self.tgids: dict[int, int] | None = None  # settled when read (TextSource.settled)

    def _lists(self) -> tuple[list[int], list[int]]:
        if self._starts is None or self._ends is None:
            self._starts, self._ends = self.starts.tolist(), self.ends.tolist()
        return self._starts, self._ends

    def line(self, i: int) -> bytes:
        return self.buf[int(self.starts[i]) : int(self.ends[i])]

    def payloads(self, rows: Sequence[int]) -> list[bytes]:
        buf, (starts, ends) = self.buf, self._lists()
        slow, body = self.slow_body, self.body
        if slow:
            return [buf[starts[i] + slow.get(i, body) : ends[i]] for i in rows]
        return [buf[starts[i] + body : ends[i]] for i in rows]

    def picker(self, ev: int, names: tuple[str, ...]) -> ArgPicker:
        pick = self._pickers.get((ev, names))
        if pick is None:
            pick = self._pickers[(ev, names)] = parser.arg_picker(self.events[ev], names)
        return pick

    def comms(self, rows: Sequence[int]) -> list[bytes]:
        buf, (starts, _) = self.buf, self._lists()
        comms = [buf[starts[i] : starts[i] + 16].lstrip() for i in rows]
        if self.tasks is not None and _UNKNOWN in comms:
            comms = self._name_unknown(rows, comms, self.tasks)
        return comms

    def _name_unknown(self, rows: Sequence[int], comms: list[bytes], tasks: Tasks) -> list[bytes]:
        """`<...>`: the chunk's other lines of that thread, else the live thread or the kernel's tables."""
        tids, evs, (starts, _) = self.tid.tolist(), self.ev.tolist(), self._lists()
        known: dict[int, bytes] = {}
        for i, t in enumerate(tids):  # rare (the kernel's cache missed): the whole chunk may be read
            cm = self.buf[starts[i] : starts[i] + 16].lstrip()
            if cm != _UNKNOWN and evs[i] != EV_NONE:
                known[t] = cm
        out = []
        for i, cm in zip(rows, comms, strict=True):
            if cm == _UNKNOWN:
                t = tids[i]
                cm = known.get(t) or tasks.comm16(t)
            out.append(cm)
        return out

    def column(self, name: str) -> I64:
        if name not in ("cpu", "tgid"):
            raise KeyError(name)
        out = np.full(len(self.ev), -1, np.int64)
        known = self.tgids if name == "tgid" and self.tgids is not None else {}
        tids = self.tid.tolist()
        for i in np.flatnonzero(self.ev != EV_NONE).tolist():
            t = known.get(tids[i], -1)
            if t < 0:
                _, tgid, cpu, _, _ = parser.parse_head(self.line(i))
                t = cpu if name == "cpu" else tgid
            out[i] = t
        return out

    def detach(self, row: int) -> TextRecord:
        tid = int(self.tid[row])
        tgid = self.tgids.get(tid) if self.tgids is not None else None
        return TextRecord(self.line(row), self.slow_body.get(row, self.body), self.events[int(self.ev[row])], tid,
                          self.tasks, tgid)


class TextSource:
    """Parses chunks of complete lines for one probe set; keeps what it learnt of the layout and tokens."""

    # Below this many lines a chunk takes the per-line parser: the columnar passes have a fixed
    # cost per chunk that the per-line parser undercuts on small ones (bench/README.md).
    min_columnar = 128

    def __init__(self, probes: ProbeSet, tasks: Tasks | None = None) -> None:
        # Live agents name the `<...>` the kernel prints when its comm cache lost a thread (from the
        # same chunk's other lines of that thread, saved_cmdlines again, /proc); replay has none.
        self.tasks = tasks
        self.events = probes.events
        self._dispatch: dict[bytes, int] = {ev.key.rstrip(b" "): i for i, ev in enumerate(probes.events)}
        self._table = fastparse.TokenTable()
        self._cls_ev = np.full(1, -1, np.int64)  # token class -> event index
        self._plans: dict[fastparse.Template, fastparse.Plan] = {}

    def batches(self, chunk: bytes) -> Iterator[EventBatch]:
        """Batches of whole-line pieces of about PIECE bytes: a bigger one would only grow the temporaries."""
        if len(chunk) <= 2 * PIECE:
            yield self.batch(chunk)
            return
        start = 0
        while start < len(chunk):
            cut = chunk.find(b"\n", start + PIECE) + 1
            if cut <= 0:
                cut = len(chunk)
            yield self.batch(chunk[start:cut])
            start = cut

    def settled(self, buf: bytes, force: bool) -> tuple[EventBatch, bytes]:
        """A batch of `buf` with its threads' tgids settled now (Tasks.tgids: a live agent with record-tgid
        on), and the lines from the first of a thread that must wait for the next table read on."""
        b = self.batch(buf)
        rec = b.records
        assert isinstance(rec, TextRecords) and self.tasks is not None
        rows = b.ev >= 0
        tgids, wait = self.tasks.tgids(np.unique(b.tid[rows]).tolist(), force)
        rest = b""
        if wait:
            cut = int(np.flatnonzero(rows & np.isin(b.tid, list(wait)))[0])
            at = int(rec.starts[cut])
            b, rest = self.batch(buf[:at]), buf[at:]
            rec = b.records
            assert isinstance(rec, TextRecords)
        rec.tgids = tgids
        return b, rest

    def batch(self, buf: bytes) -> EventBatch:
        starts, ends = fastparse.lines_of(buf)
        n = len(starts)
        rec = TextRecords(buf, starts, ends, self.events, self.tasks)
        b = EventBatch(np.full(n, EV_NONE, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64), rec, [], 0,
                       dict.fromkeys(REASONS, 0))
        rec.ev, rec.tid = b.ev, b.tid
        todo = self._columnar(b, rec)
        self._parse_lines(b, rec, todo)
        return b

    def _columnar(self, b: EventBatch, rec: TextRecords) -> I64:
        """The lines that fit a learnt layout, in whole-array passes; returns the others."""
        buf, starts, ends = rec.buf, rec.starts, rec.ends
        todo = np.arange(len(starts))
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
            b.ev[took] = self._cls_ev[p.cls[p.ok]]
            b.tid[took] = p.tid[p.ok]
            b.ts[took] = p.ts[p.ok]
            if len(used) == 1:
                rec.body = p.body
            elif p.body != rec.body:
                rec.slow_body.update(dict.fromkeys(took.tolist(), p.body))
            todo = todo[~p.ok]
        b.read += len(starts) - len(todo)
        return todo

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
        self._cls_ev = np.concatenate([self._cls_ev, np.array(extra, np.int64)])

    def _resolve(self, token: bytes) -> int:
        dispatch = self._dispatch
        idx = dispatch.get(token)
        if idx is None:
            idx = dispatch.get(parser.dispatch_key(token))
            if idx is None:
                return -1
            if len(dispatch) < 4096:
                dispatch[token] = idx  # learn `sys_x(dfd:` once; the cache stays bounded
        return idx

    def _parse_lines(self, b: EventBatch, rec: TextRecords, todo: I64) -> None:
        """The per-line parser for lines the columnar one left: LOST lines, headers, errors, others."""
        errors = b.errors
        buf, starts, ends = rec.buf, rec.starts, rec.ends
        for i in todo.tolist():
            line = buf[int(starts[i]) : int(ends[i])]
            if not line or line[0] == 0x23:  # blank, or a '#' header of a saved `trace` file
                continue
            b.read += 1
            try:
                tid, _tgid, _cpu, ts, start = parser.parse_head(line)
            except parser.ParseError as e:
                if line.startswith(parser.LOST_PREFIX):
                    try:
                        cpu, n = parser.parse_lost(line)
                        b.lost.append((i, cpu, n))
                    except parser.ParseError as e2:
                        errors[e2.reason] += 1
                else:
                    errors[e.reason] += 1
                continue
            b.ev[i] = self._resolve(parser.event_token(line, start))
            b.tid[i], b.ts[i] = tid, ts
            rec.slow_body[i] = start
