"""raw.reader: a decoded batch as the aggregate's event batch; comm and tgid from the tables, args from
the record (the live reader itself is tests/live/test_raw_reader.py)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np

from kprobe_exporter.events import EV_NONE
from kprobe_exporter.raw import pages as raw_pages
from kprobe_exporter.raw import reader as raw_reader
from kprobe_exporter.tasks import Tasks
from raw_fixtures import K618, load, text_lines


def test_event_batch_columns_loss_and_records(tmp_path: Path) -> None:
    fx = load(K618 / "missed-events")
    b = fx.batch
    (tmp_path / "saved_cmdlines").write_text("".join(f"{t} w{t}\n" for t in set(b.tid.tolist())))
    (tmp_path / "saved_tgids").write_text("".join(f"{t} 77\n" for t in set(b.tid.tolist())))
    tasks = Tasks(tmp_path)
    tasks.batch_read(0.0)  # the tables were read after these events
    eb = raw_reader.event_batch(b, fx.events, tasks)
    lost = np.flatnonzero(b.ev == raw_pages.EV_LOST).tolist()
    assert lost and eb.lost == [(i, int(b.cpu[i]), int(b.rlen[i])) for i in lost]
    assert eb.read == len(b) - len(lost) and np.all(eb.ev[lost] == EV_NONE)
    assert eb.cpu.tolist() == b.cpu.tolist() and eb.ts.tolist() == b.ts.tolist()
    rows = np.flatnonzero(eb.ev >= 0).tolist()[:5]
    gone = [t for t in b.tid[rows].tolist() if not Path(f"/proc/{t}").exists()]
    comms = eb.records.comms(rows)
    tids = b.tid[rows].tolist()
    assert [c for c, t in zip(comms, tids, strict=True) if t in gone] == [f"w{t}".encode() for t in gone]
    assert all(eb.tgid[i] == 77 for i, t in zip(rows, b.tid[rows].tolist(), strict=True) if t in gone)
    assert np.all(eb.tgid[lost] == -1)


def test_records_args_are_the_texts() -> None:
    fx = load(K618 / "uprobes-syscalls")
    b = fx.batch
    eb = raw_reader.event_batch(b, fx.events, Tasks())
    text = text_lines(K618 / "uprobes-syscalls")
    names = [fx.probes.events[e].name for e in b.ev.tolist()]
    o = names.index("open_path")
    rec = eb.records.detach(o)
    assert rec.args() == (("path", "/etc/hostname"), ("flags", "0x0"), ("arr", "{47,101,116,99}"), ("c", "'/'"))
    pick = eb.records.picker(int(b.ev[o]), ("c", "path", "nope"))
    assert pick(eb.records.payloads([o])[0]) == (b"'/'", b"/etc/hostname", b"")
    x = names.index("sys_exit_openat")
    assert eb.records.detach(x).retval() == "0x3"
    r = names.index("open_path_ret")
    want = next(t for t in text if t.token == b"open_path_ret:").body.rsplit(b"=", 1)[1].decode()
    assert eb.records.detach(r).retval() == want


def test_threads_gone_after_the_last_table_read_wait_for_the_next_one(tmp_path: Path) -> None:
    """The reader on a fixture's real pages served from files, as trace_pipe_raw serves them, with its
    threads renamed: one live (this process), the rest gone. With record-tgid on, each batch's tgids are
    settled as it is read (Tasks.tgids): a thread seen gone after the last saved_tgids read waits, with
    every event after its first, for the next read (a flush reads at once)."""
    fx = load(K618 / "uprobes-syscalls")
    b = fx.batch
    old = sorted(set(b.tid[b.ev != raw_pages.EV_LOST].tolist()))
    me = os.getpid()
    new = {t: me if k == 0 else dead_tid() for k, t in enumerate(old)}
    data = bytearray(b"".join(fx.pages.values()))
    for i in np.flatnonzero(b.ev != raw_pages.EV_LOST).tolist():  # common_pid: bytes 4-8 of a record
        o = int(b.rec[i]) + 4
        data[o:o + 4] = new[int.from_bytes(data[o:o + 4], "little")].to_bytes(4, "little")
    inst, off = tmp_path / "inst", 0
    for cpu, pages in fx.pages.items():
        (inst / "per_cpu" / f"cpu{cpu}").mkdir(parents=True)
        (inst / "per_cpu" / f"cpu{cpu}" / "trace_pipe_raw").write_bytes(bytes(data[off:off + len(pages)]))
        off += len(pages)
    (inst / "trace_clock").write_text("local global [mono] boot\n")
    (inst / "options").mkdir()
    (inst / "options" / "record-tgid").write_text("1\n")
    gone = [new[t] for t in old[1:]]
    (tmp_path / "saved_tgids").write_text("".join(f"{t} {t + 1}\n" for t in gone))
    reader = raw_reader.RawReader(inst, fx.events, tracefs_root=tmp_path, layout=fx.layout)
    try:
        reader.tasks.REREAD_S = 1e9  # the next read only when forced, however slow the machine
        reader.tasks._read_at["saved_tgids"] = time.monotonic()  # a read just before: stale for them
        first = reader.read(0)
        rest = reader.flush()
    finally:
        reader.close()
    tids = [new[t] for t in b.tid.tolist() if t in new]
    cut = next(i for i, t in enumerate(tids) if t != me)
    assert first is not None and first.tid.tolist() == tids[:cut] and cut > 0
    assert rest is not None and rest.tid[rest.ev >= 0].tolist() == tids[cut:]
    want = {me: me, **{t: t + 1 for t in gone}}
    for batch in (first, rest):
        rows = np.flatnonzero(batch.ev >= 0).tolist()
        assert batch.tgid[rows].tolist() == [want[t] for t in batch.tid[rows].tolist()]
        assert [batch.records.detach(i).tgid() for i in rows] == [want[t] for t in batch.tid[rows].tolist()]


def dead_tid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid  # reaped: /proc has no such entry
