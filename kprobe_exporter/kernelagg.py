"""Kernel aggregation: the third source. Kernel-mode probes counted and timed by hist triggers in the
agent's instance, read at scrape time into the same series the streaming aggregate exports.

No event of a kernel-mode probe reaches user space: its triggers keep counts per label set and a
`.log2` latency histogram with the sum; `read()` parses the hist files (hist.py). Values never go
back: a trigger replaced by a reload leaves its last values as an offset, and the admitted label
values stay admitted, so `label_limit` folds the same ones into `__overflow__` from scrape to scrape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kprobe_exporter import aggmode, hist, triggers
from kprobe_exporter.aggmode import KeyField, ProbeMode
from kprobe_exporter.config import OVERFLOW_VALUE
from kprobe_exporter.errors import TracefsError
from kprobe_exporter.probes import EventSpec
from kprobe_exporter.tracefs import error_log_entries, kernel_reason, read_text, write_file
from kprobe_exporter.triggers import KernelPlan, Trigger

log = logging.getLogger("kprobe_exporter")

LOG2_MIN_TOP = 34  # le buckets always run 2^0 .. at least 2^34 ns (17 s), so the series stay the same
Labels = tuple[tuple[str, str], ...]


def _event_path(ev: EventSpec) -> str:
    """GROUP/EVENT under the instance's events/: a probe's own name, a tracepoint's SYSTEM/EVENT."""
    return f"{ev.group}/{ev.name}" if ev.dynamic else ev.target


@dataclass(frozen=True)
class ProbeTriggers:
    """A kernel-mode probe's plan and which of its tables answer what."""

    mode: ProbeMode
    plan: KernelPlan
    count: Trigger  # the table whose rows (or totals, without labels) count the probe's events
    latency: Trigger | None  # the `.log2` table on the synthetic event

    @property
    def probe(self) -> str:
        return self.mode.probe


def probe_triggers(group: str, mode: ProbeMode) -> ProbeTriggers:
    """The lines for one kernel-mode probe. A latency probe's count has a table of its own, even without
    labels: the entry's thread table, which would count every entry too, is replaced as threads come and
    go (KernelSource._renew_locked), and a count must never restart. Its cost per call: README, Kernel
    aggregation."""
    ev = mode.event
    assert ev is not None
    where = ev.filter or ""
    entry = _event_path(ev)
    count = triggers.count_trigger(entry, tuple(k.field for k in mode.keys), where)
    if mode.pair is None or mode.exit is None:
        return ProbeTriggers(mode, KernelPlan((), (count,)), count, None)
    spans = mode.pair.spans
    lat = triggers.latency_plan(group, entry, _event_path(mode.exit), mode.pair.name, where, "",
                                spans.min_duration_ns if spans is not None else None, aggmode.span_ret(mode.exit))
    plan = KernelPlan(lat.synthetics, (*lat.triggers, count), lat.streams, lat.threads)
    return ProbeTriggers(mode, plan, count, lat.triggers[-1])


@dataclass(frozen=True)
class KernelLatency:
    """A latency histogram in the kernel's own buckets: counts[i] holds (bounds_ns[i-1], bounds_ns[i]]."""

    bounds_ns: tuple[int, ...]
    counts: tuple[int, ...]
    sum_ns: int

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class KernelView:
    """What kernel-mode probes add to one scrape."""

    events: dict[tuple[str, Labels], int] = field(default_factory=dict)
    latency: dict[str, KernelLatency] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # events a full table refused, per probe
    renewals: dict[str, int] = field(default_factory=dict)  # thread tables replaced by empty ones, per probe
    label_overflow: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class _Raw:
    """One probe's values as the kernel holds them (plus what replaced triggers left), before folding."""

    events: dict[Labels, int] = field(default_factory=dict)
    lat: dict[int, tuple[int, int]] = field(default_factory=dict)  # log2 exponent -> (count, sum ns)
    dropped: int = 0
    threads: int = 0  # rows of the fuller thread table (this read's; never carried as an offset)
    thread_dropped: int = 0  # the part of `dropped` the thread tables refused (this read's)

    def add(self, other: _Raw) -> _Raw:
        small, big = sorted((self.events, other.events), key=len)  # the scrape's 10,000 keys meet no offset
        out = _Raw(dict(big), dict(self.lat), self.dropped + other.dropped)
        for k, n in small.items():
            out.events[k] = out.events.get(k, 0) + n
        for e, (n, s) in other.lat.items():
            n0, s0 = out.lat.get(e, (0, 0))
            out.lat[e] = (n0 + n, s0 + s)
        return out


def _table(tables: list[hist.HistTable], trig: Trigger) -> hist.HistTable | None:
    """Our table on an event: the one keyed as the trigger is (each of ours on an event has its own keys)."""
    want = hist.key_names(trig.line)
    return next((t for t in tables if t.key_names == want), None)


class _Printed(dict[str, tuple[str, str]]):
    """A key field's printed values to their (label, value) pairs, each converted once per scrape."""

    def __init__(self, key: KeyField) -> None:
        super().__init__()
        self.key = key

    def __missing__(self, printed: str) -> tuple[str, str]:
        pair = self[printed] = (self.key.label, self.key.value(printed))
        return pair


@dataclass
class _Memo:
    """What one read of a probe's tables lends the next: hist.parse's rows per event path, and the
    labels of each cut key. Each holds the keys of the last read alone (at most the tables' entries)."""

    rows: dict[str, dict[tuple[str, ...], hist.RowMemo]] = field(default_factory=dict)
    labels: dict[tuple[str, ...], Labels] = field(default_factory=dict)


def _label_counts(keys: tuple[KeyField, ...], table: hist.HistTable, into: dict[Labels, int],
                  memo: dict[tuple[str, ...], Labels]) -> None:
    if table.rows and len(table.key_names) != len(keys):
        raise ValueError(f"the table keyed {table.key_names} is not the probe's {len(keys)} label(s)")
    printed = [_Printed(k) for k in keys]
    get = dict.__getitem__
    known, seen = dict(memo), memo
    seen.clear()
    for row in table.rows:
        labels = known.get(row.keys)
        if labels is None:
            labels = tuple(map(get, printed, row.keys))
        seen[row.keys] = labels
        into[labels] = into.get(labels, 0) + row.values.get("hitcount", 0)


def raw_values(pt: ProbeTriggers, hist_text: dict[str, str], memo: _Memo | None = None) -> _Raw:
    """A probe's values from the hist files' text (event path -> text), unfolded. `memo`, kept from the
    probe's last read, spares the rows whose keys printed the same."""
    out = _Raw()
    keys = pt.mode.keys
    memo = memo or _Memo()
    # rows only of the tables read row by row: the labelled count and the latency; the rest give totals
    rows_of = {hist.key_names(t.line) for t in (pt.count if keys else None, pt.latency) if t is not None}
    tables = {ev: hist.parse(text, rows_of, memo.rows.setdefault(ev, {})) for ev, text in hist_text.items()}
    count = _table(tables.get(pt.count.event, []), pt.count)
    if count is not None:
        if keys:
            _label_counts(keys, count, out.events, memo.labels)
        else:
            out.events[()] = count.events  # every event, the ones a full table refused too
        out.dropped += count.dropped
    for trig in pt.plan.threads:
        if t := _table(tables.get(trig.event, []), trig):
            out.dropped += t.dropped  # a full thread table: calls whose latency was not measured
            out.thread_dropped += t.dropped
            out.threads = max(out.threads, t.entries)
    if pt.latency is not None and (lat := _table(tables.get(pt.latency.event, []), pt.latency)) is not None:
        for row in lat.rows:
            exp = hist.log2_upper_bound(row.keys[0]).bit_length() - 1
            out.lat[exp] = (row.values.get("hitcount", 0), row.values.get("lat", 0))
        out.dropped += lat.dropped
    return out


def latency_of(lat: dict[int, tuple[int, int]]) -> KernelLatency:
    top = max([LOG2_MIN_TOP, *lat])
    bounds = tuple(1 << e for e in range(top + 1))
    counts = tuple(lat.get(e, (0, 0))[0] for e in range(top + 1))
    return KernelLatency(bounds, counts, sum(s for _, s in lat.values()))


@dataclass
class LabelFold:
    """label_limit at export: the first `limit` values of a label stay theirs, the rest are __overflow__."""

    limit: int
    admitted: dict[tuple[str, str], dict[str, None]] = field(default_factory=dict)  # ordered sets
    # per probe, the label sets of its last fold whose values were all admitted (values are never unadmitted)
    passed: dict[str, set[Labels]] = field(default_factory=dict)

    def fold(self, probe: str, events: dict[Labels, int], view: KernelView) -> None:
        out = view.events
        fresh: list[tuple[Labels, int]] = []  # label sets with a value not admitted (yet, or ever)
        was, passed = self.passed.get(probe, set()), set()
        for labels, n in events.items():
            if labels not in was and not self._admitted(probe, labels):
                fresh.append((labels, n))
                continue
            passed.add(labels)  # the usual scrape: every value already has its place
            key = (probe, labels)
            out[key] = out.get(key, 0) + n
        self.passed[probe] = passed
        if not fresh:
            return
        if self._can_admit(probe, fresh):  # most counted first on the first sight: they get the places
            fresh.sort(key=lambda kv: (-kv[1], kv[0]))
        for labels, n in fresh:
            folded = []
            for label, v in labels:
                seen = self.admitted.setdefault((probe, label), {})
                if v not in seen and len(seen) < self.limit:
                    seen[v] = None
                if v not in seen:
                    view.label_overflow[(probe, label)] = view.label_overflow.get((probe, label), 0) + n
                    v = OVERFLOW_VALUE
                folded.append((label, v))
            key = (probe, tuple(folded))
            out[key] = out.get(key, 0) + n

    def _admitted(self, probe: str, labels: Labels) -> bool:
        for label, v in labels:
            seen = self.admitted.get((probe, label))
            if seen is None or v not in seen:
                return False
        return True

    def _can_admit(self, probe: str, fresh: list[tuple[Labels, int]]) -> bool:
        """Whether a place is left for a label of these sets (if none, their order cannot matter)."""
        labels = {label for ls, _ in fresh for label, _ in ls}
        return any(len(self.admitted.get((probe, label), ())) < self.limit for label in labels)


class KernelSource:
    """The kernel-mode probes of one agent: their triggers in its instance, read at scrape."""

    def __init__(self, root: Path, inst: Path, group: str, label_limit: int) -> None:
        self.root, self.inst, self.group = root, inst, group
        self.installed: dict[str, ProbeTriggers] = {}
        self.offsets: dict[str, _Raw] = {}  # what replaced triggers of a kept probe had counted
        self.fold = LabelFold(label_limit)
        self._dropped_logged: set[str] = set()
        self.renewals: dict[str, int] = {}  # per probe, thread tables replaced (KernelSource._renew_locked)
        self._unarmed: dict[str, list[Trigger]] = {}  # a renewal's lines the kernel refused: tried at each read
        self._memos: dict[str, tuple[ProbeTriggers, _Memo]] = {}  # per probe, for the triggers it was read from
        self._done = 0  # reads done
        self._shared: KernelView | None = None  # the last read's view; none after the triggers changed
        self._lock = threading.Lock()  # scrapes read while a reload installs

    # --- install and remove -------------------------------------------------------------
    def install(self, modes: Iterable[ProbeMode]) -> None:
        """Triggers for every kernel-mode probe; on a refusal take this call's back out and raise."""
        added: list[ProbeTriggers] = []
        try:
            for m in modes:
                if m.kernel:
                    pt = probe_triggers(self.group, m)
                    added.append(pt)
                    self._write_plan(pt)
                    with self._lock:
                        self.installed[m.probe] = pt
                        self._shared = None
        except BaseException:
            for pt in reversed(added):
                self._remove_plan(pt)
                with self._lock:
                    self.installed.pop(pt.probe, None)
                    self._shared = None
            raise

    def _write_plan(self, pt: ProbeTriggers) -> None:
        for s in pt.plan.synthetics:
            self._write(self.root / triggers.SYNTHETIC_EVENTS, s.line, pt.probe, self.root)
        for t in pt.plan.triggers:
            self._write(self.inst / t.path, t.line, pt.probe, self.inst)
        for st in pt.plan.streams:  # the filter first: no fast call reaches the buffer in between
            self._write(self.inst / st.path("filter"), st.filter, pt.probe, self.inst)
            self._write(self.inst / st.path("enable"), "1", pt.probe, self.inst)

    def _write(self, path: Path, line: str, probe: str, log_dir: Path, exists_ok: bool = False) -> None:
        before = _error_log(log_dir)
        try:
            write_file(path, line + "\n", append=True)
        except OSError as e:
            if exists_ok and e.errno == 17:  # the same trigger is there already
                return
            new = _error_log(log_dir)[len(before):]
            why = kernel_reason(new[-1]) if new else (e.strerror or str(e))
            raise TracefsError(f"the kernel refused {line!r} in {path.name}: {why}", probe, "aggregation") from None

    def _remove_plan(self, pt: ProbeTriggers) -> list[str]:
        return [p for file, line in pt.plan.removal() if (p := self._remove_line(file, line))]

    def _remove_line(self, file: str, line: str) -> str | None:
        """Write one removal line; the problem, unless what it removes is already gone."""
        path = self.root / file if file == triggers.SYNTHETIC_EVENTS else self.inst / file
        try:
            write_file(path, line + "\n", append=True)
        except OSError as e:
            if not (e.errno == 2 or (file != triggers.SYNTHETIC_EVENTS and e.errno == 22)):  # already gone
                return f"{line} in {file}: {e.strerror}"
        return None

    def remove(self) -> list[str]:
        """Every trigger (newest probe first), then their synthetic events. Problems."""
        problems: list[str] = []
        with self._lock:
            for pt in reversed(list(self.installed.values())):
                problems += self._remove_plan(pt)
            self.installed.clear()
            self._unarmed.clear()
            self._shared = None
        return problems

    # --- thread tables ------------------------------------------------------------------
    def _renew_locked(self, pt: ProbeTriggers, last: _Raw) -> None:
        """Replace a latency pair's thread tables by empty ones (the caller holds the lock). The kernel keeps
        a row per thread that ever called and refuses `:clear` on triggers that define variables, so the
        return's trigger goes (it refers to the entry's variable), then the entry's, then both come back.
        Calls in flight lose their latency sample; counts have tables of their own and are untouched. What
        the old tables refused (`last.thread_dropped`) stays counted."""
        entry, exit_ = pt.plan.threads
        self.offsets[pt.probe] = self.offsets.get(pt.probe, _Raw()).add(_Raw(dropped=last.thread_dropped))
        for t in (exit_, entry):
            if problem := self._remove_line(t.path, t.removal):
                log.warning("probe %s: %s", pt.probe, problem)
        self.renewals[pt.probe] = self.renewals.get(pt.probe, 0) + 1
        log.info("probe %s: its thread tables held %d threads; replaced by empty ones", pt.probe, last.threads)
        self._unarmed[pt.probe] = [entry, exit_]
        self._arm(pt.probe, first=True)

    def _arm(self, probe: str, first: bool = False) -> None:
        """Write a renewal's lines, in order; what the kernel refuses is logged once and tried at each read."""
        lines = self._unarmed[probe]
        while lines:
            try:
                self._write(self.inst / lines[0].path, lines[0].line, probe, self.inst, exists_ok=True)
            except TracefsError as e:
                if first:
                    log.error("probe %s: latency not measured until the kernel takes its thread table back "
                              "(tried at each scrape): %s", probe, e)
                return
            lines.pop(0)
        del self._unarmed[probe]

    # --- reload -------------------------------------------------------------------------
    def retire(self, modes: dict[str, ProbeMode], redefined: Iterable[str], label_limit: int) -> None:
        """A reload's first half, before events go: unchanged probes keep their triggers untouched; a
        changed one (or one whose event is defined again) leaves its last values as an offset; a gone
        one takes its values with it. `install` then adds what is missing."""
        new = {name: probe_triggers(self.group, m) for name, m in modes.items() if m.kernel}
        redefined = set(redefined)
        self.fold.limit = label_limit
        for name, pt in list(self.installed.items()):
            events = {e.name for e in (pt.mode.event, pt.mode.exit) if e is not None}
            if new.get(name) == pt and not events & redefined:
                continue
            with self._lock:  # a scrape's read may be renewing this probe's thread tables
                if name in new:
                    last = raw_values(pt, self._hist_text([pt]))
                    self.offsets[name] = self.offsets.get(name, _Raw()).add(last)
                else:
                    self.offsets.pop(name, None)
                for problem in self._remove_plan(pt):
                    log.warning("reload: %s", problem)
                del self.installed[name]
                self._unarmed.pop(name, None)
                self._shared = None

    def missing(self, modes: dict[str, ProbeMode]) -> list[ProbeMode]:
        return [m for name, m in modes.items() if m.kernel and name not in self.installed]

    # --- scrape -------------------------------------------------------------------------
    def _hist_text(self, pts: Iterable[ProbeTriggers]) -> dict[str, str]:
        out: dict[str, str] = {}
        for pt in pts:
            for t in pt.plan.triggers:
                if t.event not in out:
                    try:
                        out[t.event] = read_text(self.inst / "events" / t.event / "hist")
                    except OSError:
                        out[t.event] = ""
        return out

    def read(self) -> KernelView:
        """Every kernel-mode probe's values now. A scrape that asks while another's read is under way takes
        that read's view when it ends (its values at most one read older than the request) rather than
        reading every hist file again behind it."""
        asked = self._reads_done()
        with self._lock:
            if self._done > asked and self._shared is not None:
                return self._shared
            view = self._read_locked()
            self._shared, self._done = view, self._done + 1
        return view

    def _reads_done(self) -> int:
        return self._done

    def _read_locked(self) -> KernelView:
        pts = list(self.installed.values())
        offsets = dict(self.offsets)
        view = KernelView()
        text = self._hist_text(pts)
        for pt in pts:
            memo = self._memos.get(pt.probe)
            if memo is None or memo[0] is not pt:  # a replaced trigger may key and print otherwise
                memo = self._memos[pt.probe] = (pt, _Memo())
            # text read before a renewal's lines went in shows the old tables: no renewal on it
            fresh = pt.probe not in self._unarmed
            if not fresh:
                self._arm(pt.probe)
            now = raw_values(pt, text, memo[1])
            raw = offsets.get(pt.probe, _Raw()).add(now)
            if fresh and now.threads >= triggers.THREAD_RENEW_AT:
                self._renew_locked(pt, now)
            self.fold.fold(pt.probe, raw.events, view)
            if pt.mode.pair is not None:
                view.latency[pt.mode.pair.name] = latency_of(raw.lat)
            view.dropped[pt.probe] = raw.dropped
            if pt.plan.threads:
                view.renewals[pt.probe] = self.renewals.get(pt.probe, 0)
            if raw.dropped and pt.probe not in self._dropped_logged:
                self._dropped_logged.add(pt.probe)
                log.warning("probe %s: a full hist table in the kernel refused %d events (counted in "
                            "kprobe_exporter_kernel_dropped_total)", pt.probe, raw.dropped)
        for gone in self._memos.keys() - {pt.probe for pt in pts}:
            del self._memos[gone]
        return view


def _error_log(where: Path) -> list[str]:
    try:
        return error_log_entries(read_text(where / "error_log"))
    except OSError:
        return []
