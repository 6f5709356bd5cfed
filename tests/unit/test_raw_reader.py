"""raw.reader: a decoded batch as the aggregate's event batch; comm and tgid from the tables, args from
the record (the live reader itself is tests/live/test_raw_reader.py)."""

from __future__ import annotations

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
