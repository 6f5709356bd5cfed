"""Raw reader: the instance's per-CPU ring buffers (`per_cpu/cpuN/trace_pipe_raw`) page by page, in
binary, yielding the same event batches as the text reader.

The text path lets the kernel format every event inside our read() of `trace_pipe`; that caps even
`cat` (bench/README.md) and keeps only microseconds. The raw pages carry the events as the
probes wrote them, with nanosecond timestamps, and cost the kernel one page swap per read. A
record's args are decoded from its fields (raw.args) only where a label or a span asks; comm and
tgid, which records do not carry, come from the live threads and the kernel's tables (tasks.py):
with record-tgid on, each batch's tgids are settled when it is read, as the text's are.
"""

from __future__ import annotations

import errno
import os
import re
import select
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kprobe_exporter.events import I64, EventBatch
from kprobe_exporter.probes import EventSpec, ProbeSet
from kprobe_exporter.raw.args import RawEvents, args_needed, check_probes
from kprobe_exporter.raw.formats import PageLayout, RawUnsupported, load_layout
from kprobe_exporter.raw.pages import (
    EV_LOST,
    Batch,
    batch_from_pages,
    compact_batch,
    empty_batch,
    merge_batches,
    slice_batch,
)
from kprobe_exporter.reader import ReaderError
from kprobe_exporter.tasks import Tasks, record_tgid

# Instance clocks with a userspace clock to compare against (for the cross-CPU merge watermark).
CLOCKS = {"mono": time.CLOCK_MONOTONIC, "mono_raw": time.CLOCK_MONOTONIC_RAW, "boot": time.CLOCK_BOOTTIME}
if hasattr(time, "CLOCK_TAI"):
    CLOCKS["tai"] = time.CLOCK_TAI


class RawRecord:
    """One record, kept for a span: its args decoded through its format's fields when asked."""

    __slots__ = ("_tgid", "ev", "events", "rec", "tasks", "tid")

    def __init__(self, events: RawEvents, ev: int, rec: bytes, tid: int, tasks: Tasks, tgid: int | None) -> None:
        self.events, self.ev, self.rec, self.tid, self.tasks, self._tgid = events, ev, rec, tid, tasks, tgid

    def comm(self) -> str:
        return self.tasks.comm16(self.tid).decode("utf-8", "backslashreplace")

    def tgid(self) -> int:
        return self._tgid if self._tgid is not None else self.tasks.tgid(self.tid)

    def args(self) -> tuple[tuple[str, str], ...]:
        values = self.events.args(self.ev, self.rec)
        spec = self.events.probes.events[self.ev]
        names = [a.name for a in spec.args] if spec.dynamic else list(values)
        return tuple((n, values[n].decode("utf-8", "backslashreplace")) for n in names if n in values)

    def retval(self) -> str | None:
        """What the text's return-value reader takes: a probe's `ret` (else `arg1`, else its first arg), a
        syscall exit's value."""
        spec = self.events.probes.events[self.ev]
        values = self.events.args(self.ev, self.rec)
        if not spec.dynamic:
            ret = values.get("ret") if spec.target.partition("/")[2].startswith("sys_exit_") else None
        else:
            ret = next((values[n] for n in ("ret", "arg1") if n in values), next(iter(values.values()), None))
        return ret.decode("ascii", "replace") if ret is not None else None


class RawRecords:
    """A batch's records behind an event batch: args from the record through its format's fields,
    comm and tgid from the live threads and the kernel's tables (records carry neither); `tgids`, the
    tgids settled when the batch was read (Tasks.tgids), where they were."""

    def __init__(self, b: Batch, events: RawEvents, tasks: Tasks, tgids: dict[int, int] | None = None) -> None:
        self.b, self.events, self.tasks, self.tgids = b, events, tasks, tgids

    def payloads(self, rows: Sequence[int]) -> list[bytes]:
        # the common fields never print, so records equal past them have equal args
        data, recs, lens = self.b.data, self.b.rec, self.b.rlen
        offs, ns = recs[rows].tolist(), lens[rows].tolist()
        return [data[o + 8:o + n] for o, n in zip(offs, ns, strict=True)]

    def picker(self, ev: int, names: tuple[str, ...]) -> Callable[[bytes], tuple[bytes, ...]]:
        args, pad = self.events.args, bytes(8)
        return lambda payload: tuple(args(ev, pad + payload).get(n, b"") for n in names)

    def comms(self, rows: Sequence[int]) -> list[bytes]:
        tasks, seen = self.tasks, dict[int, bytes]()
        out = []
        for t in self.b.tid[rows].tolist():
            c = seen.get(t)
            if c is None:
                c = seen[t] = tasks.comm16(t)
            out.append(c)
        return out

    def column(self, name: str) -> I64:
        if name != "tgid":
            raise KeyError(name)
        tids = self.b.tid.astype(np.int64)
        uniq, inv = np.unique(tids, return_inverse=True)
        known = self.tgids or {}
        tg = np.array([known[t] if t in known else self.tasks.tgid(t) for t in uniq.tolist()], np.int64)
        return np.where(self.b.ev != EV_LOST, tg[inv], -1).astype(np.int64)

    def detach(self, row: int) -> RawRecord:
        tid = int(self.b.tid[row])
        tgid = self.tgids.get(tid) if self.tgids is not None else None
        return RawRecord(self.events, int(self.b.ev[row]), self.b.record(row), tid, self.tasks, tgid)


def event_batch(b: Batch, events: RawEvents, tasks: Tasks, tgids: dict[int, int] | None = None) -> EventBatch:
    """The aggregate's view of a batch: its columns, its loss markers, its records behind them."""
    ev = b.ev.astype(np.int64)
    at = np.flatnonzero(ev == EV_LOST)
    lost = list(zip(at.tolist(), b.cpu[at].tolist(), b.rlen[at].tolist(), strict=True))
    return EventBatch(ev, b.tid.astype(np.int64), b.ts.astype(np.int64), RawRecords(b, events, tasks, tgids), lost,
                      len(ev) - len(at), cpu=b.cpu.astype(np.int64))


class RawReader:
    """Drains `per_cpu/cpuN/trace_pipe_raw` of an instance, one page per read, all CPUs from one thread.

    One thread polls every CPU's file: against a reader thread per CPU handing pages to the decoding
    thread it delivers as much or more under overload (the reads are short syscalls and decoding
    holds the GIL), and the threads' small saving at moderate rates would leave the CPUs unmerged
    (bench/raw_threads.py; figures in bench/README.md).

    Cross-CPU order: a batch is cut at a watermark, the earliest of each CPU's "nothing older can still
    come" time (when its file answered EAGAIN: the clock at the start of its drain, less a margin for
    writes in flight; when its share of the buffer filled first: its last event). Events after the
    watermark wait for the next batch, so a thread that migrates between CPUs keeps its entry before
    its exit, as in trace_pipe's merge.
    """

    HOLD_MARGIN_NS = 200_000
    SHORT_PAGES = 16

    def __init__(self, inst: Path, events: RawEvents, *, tracefs_root: Path | None = None,
                 event_dir: Callable[[EventSpec], Path] | None = None, max_pages_per_cpu: int = 256,
                 layout: PageLayout | None = None, buffer_percent: int = 25) -> None:
        self.inst = inst
        self.events = events
        self.root = tracefs_root
        self.event_dir = event_dir or (lambda ev: inst / "events" / (ev.target if not ev.dynamic else
                                                                    f"{ev.group}/{ev.name}"))
        self.tasks = Tasks(tracefs_root)
        self.layout = layout or load_layout(inst, tracefs_root)
        self.clock = read_clock(inst)
        per_cpu = sorted((int(d.name[3:]), d / "trace_pipe_raw") for d in (inst / "per_cpu").glob("cpu[0-9]*"))
        if not per_cpu:
            raise RawUnsupported(f"{inst}/per_cpu has no CPUs")
        self.fds: list[tuple[int, int]] = []
        try:
            for cpu, path in per_cpu:
                try:
                    self.fds.append((cpu, os.open(path, os.O_RDONLY | os.O_NONBLOCK)))
                except OSError as e:
                    raise RawUnsupported(f"cannot open {path}: {e.strerror}") from None
        except BaseException:
            self.close()
            raise
        self.poll = select.poll()
        for _, fd in self.fds:
            self.poll.register(fd, select.POLLIN)
        # poll() on trace_pipe_raw wakes when a CPU's buffer is this full (trace_pipe ignores it). The
        # kernel's 50 leaves half the buffer for the time it takes to be scheduled and drain: at one
        # core's full event rate, 20 ms of a 4 MiB buffer. 25 leaves three quarters.
        try:
            (inst / "buffer_percent").write_text(str(buffer_percent))
        except OSError:
            pass
        ps = self.layout.page_size
        self.max_pages = max_pages_per_cpu
        self.buf = bytearray(ps * max_pages_per_cpu * len(self.fds))
        view = memoryview(self.buf)
        self.pages = [view[i * ps:(i + 1) * ps] for i in range(max_pages_per_cpu * len(self.fds))]
        self.held = empty_batch()
        self._short = False
        self.settle_tgids = record_tgid(inst)

    @classmethod
    def open(cls, inst: Path, root: Path, probes: ProbeSet, event_dir: Callable[[EventSpec], Path],
             spans: bool) -> RawReader:
        """The raw reader of an installed probe set, or RawUnsupported saying why it cannot serve it."""
        check_byteorder()
        check_probes(probes, root, spans=spans)
        events = RawEvents.load([event_dir(ev) for ev in probes.events], probes)
        events.require_decoders(args_needed(probes, spans=spans))
        return cls(inst, events, tracefs_root=root, event_dir=event_dir)

    def check(self, probes: ProbeSet, spans: bool) -> None:
        """RawUnsupported when a new probe set's args could not be decoded (judged before a reload)."""
        if self.root is not None:
            check_probes(probes, self.root, spans=spans)

    def read(self, timeout_s: float = 0.1) -> EventBatch | None:
        """Every event up to the watermark.

        After a short drain (under SHORT_PAGES pages) it first lets events gather: poll() until the
        instance's buffer_percent of a CPU's buffer is filled, or up to timeout_s. Reading again at
        once would hand over a few events at a time for the same fixed cost per batch (ten times the
        CPU per event at moderate rates: bench/README.md).
        """
        if self._short and timeout_s > 0:
            try:
                self.poll.poll(int(timeout_s * 1000))
            except InterruptedError:
                pass
        return self._events(self._read(flush=False), flush=False)

    def _events(self, b: Batch, flush: bool) -> EventBatch | None:
        tgids = None
        if self.settle_tgids and len(b):
            # each thread's tgid as it was when read (Tasks.tgids); the events from the first of a
            # thread that must wait for the next table read on are held over with those past the watermark
            is_rec = b.ev != EV_LOST
            tgids, wait = self.tasks.tgids(np.unique(b.tid[is_rec]).tolist(), force=flush)
            if wait:
                cut = int(np.flatnonzero(is_rec & np.isin(b.tid, list(wait)))[0])
                self.held = compact_batch(merge_batches(slice_batch(b, cut, len(b)), self.held))
                b = slice_batch(b, 0, cut)
        return event_batch(b, self.events, self.tasks, tgids) if len(b) else None

    def set_events(self, probes: ProbeSet) -> None:
        """A new probe set's ids (after a reload); events held over are re-dispatched by their ids.
        RawUnsupported when the new events cannot be decoded."""
        events = RawEvents.load([self.event_dir(ev) for ev in probes.events], probes, strict=False)
        if len(self.held):
            types = np.array([int.from_bytes(self.held.record(i)[:2], "little") if self.held.ev[i] != EV_LOST
                              else 0 for i in range(len(self.held))], np.int64)
            self.held.ev = np.where(self.held.ev == EV_LOST, EV_LOST, events.lut[types]).astype(np.int32)
        self.events = events
        self.settle_tgids = record_tgid(self.inst)

    def flush(self) -> EventBatch | None:
        """Everything buffered, held events included (at stop, or before a reload); None when nothing is."""
        return self._events(self._read(flush=True), flush=True)

    def _read(self, flush: bool) -> Batch:
        ps = self.layout.page_size
        runs = []
        marks = []
        slot = 0
        for cpu, fd in self.fds:
            t0 = time.clock_gettime_ns(self.clock)
            first = slot
            limit = first + self.max_pages
            drained = False
            while slot < limit:
                try:
                    n = os.readv(fd, [self.pages[slot]])
                except BlockingIOError:
                    drained = True
                    break
                except OSError as e:
                    if e.errno == errno.EINTR:
                        continue
                    raise ReaderError(f"reading {self.inst}/per_cpu/cpu{cpu}/trace_pipe_raw failed: "
                                      f"{os.strerror(e.errno or 0)}") from None
                if n == 0:
                    drained = True
                    break
                if n != ps:
                    # a short page: keep what the page header says is there, zero the rest
                    self.buf[slot * ps + n:(slot + 1) * ps] = bytes(ps - n)
                slot += 1
            runs.append((cpu, first * ps, slot - first))
            marks.append((cpu, drained, t0))
        self.tasks.batch_read()  # every event below was written before now: older table reads may be stale
        self._short = slot < self.SHORT_PAGES
        new = batch_from_pages(bytes(memoryview(self.buf)[:slot * ps]), runs, self.layout, self.events.lut)
        merged = merge_batches(self.held, new)
        if flush:
            self.held = empty_batch()
            out = merged
        else:
            water = None
            for cpu, drained, t0 in marks:
                if drained:
                    w = t0 - self.HOLD_MARGIN_NS
                else:
                    mine = new.ts[new.cpu == cpu]
                    w = int(mine[-1]) if len(mine) else t0
                water = w if water is None else min(water, w)
            cut = int(np.searchsorted(merged.ts, water, side="right")) if water is not None else len(merged)
            out = slice_batch(merged, 0, cut)
            self.held = compact_batch(slice_batch(merged, cut, len(merged)))
        return out

    def close(self) -> None:
        for _, fd in self.fds:
            try:
                self.poll.unregister(fd)
            except (KeyError, ValueError, AttributeError):
                pass
            os.close(fd)
        self.fds = []


def read_clock(inst: Path) -> int:
    try:
        text = (inst / "trace_clock").read_text()
    except OSError as e:
        raise RawUnsupported(f"cannot read {inst}/trace_clock: {e.strerror}") from None
    m = re.search(r"\[(\w+)\]", text)
    name = m.group(1) if m else "?"
    if name not in CLOCKS:
        raise RawUnsupported(f"the instance's trace clock {name!r} has no userspace clock to merge CPUs by")
    return CLOCKS[name]


def check_byteorder() -> None:
    if sys.byteorder != "little":
        raise RawUnsupported("the raw decoder reads little-endian pages; this machine is big-endian")
