"""text: trace text to event batches; the columns, loss lines, errors and the records behind them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kprobe_exporter import config, probes
from kprobe_exporter.events import EV_NONE, EV_UNKNOWN
from kprobe_exporter.tasks import Tasks
from kprobe_exporter.text import TextSource

CFG = """
probes:
  - name: f
    uprobe: /bin/x:0x10
    args: {n: "%di:s32", s: "+0(%si):string"}
    labels: [n]
  - name: f_ret
    uretprobe: /bin/x:0x10
    args: {ret: "$retval:s32"}
pairs:
  - {name: p, entry: f, exit: f_ret}
"""


def line(comm: str, tid: int, ts_us: int, body: str, cpu: int = 0, tgid: int | None = None) -> bytes:
    mid = f" ({tgid:>7})" if tgid is not None else ""
    return f"{comm:>16}-{tid:<7}{mid} [{cpu:03d}] ..... {ts_us // 10**6:5d}.{ts_us % 10**6:06d}: {body}".encode()


def source(tasks: Tasks | None = None) -> TextSource:
    return TextSource(probes.build_probe_set(config.load_text(CFG), resolve=None), tasks)


LINES = [
    b"# tracer: nop",
    line("a", 11, 1_000_001, 'f: (0x1) n=5 s="x y"', cpu=1),
    b"CPU:1 [LOST 7 EVENTS]",
    line("<...>", 12, 1_000_002, "f_ret: (0x2 <- 0x1) ret=-3", cpu=0),
    line("b", 13, 1_000_003, "other: (0x1)"),
    b"garbage line",
]


@pytest.mark.parametrize("min_columnar", [0, 1 << 30])  # the columnar parser and the per-line one
def test_columns_loss_and_errors(min_columnar: int) -> None:
    src = source()
    src.min_columnar = min_columnar
    b = src.batch(b"\n".join(LINES) + b"\n")
    assert b.ev.tolist() == [EV_NONE, 0, EV_NONE, 1, EV_UNKNOWN, EV_NONE]
    assert b.tid[[1, 3, 4]].tolist() == [11, 12, 13]
    assert b.ts[[1, 3]].tolist() == [1_000_001_000, 1_000_002_000]
    assert b.lost == [(2, 1, 7)]
    assert b.read == 5 and b.errors["bad_head"] == 1  # the comment is not read; garbage is an error
    assert b.cpu[[1, 3]].tolist() == [1, 0]
    assert b.tgid[[1, 3]].tolist() == [-1, -1]


def test_records_give_payloads_comms_and_span_fields() -> None:
    b = source().batch(b"\n".join(LINES) + b"\n")
    rec = b.records
    assert rec.payloads([1]) == [b'f: (0x1) n=5 s="x y"']
    assert rec.picker(0, ("s", "n"))(rec.payloads([1])[0]) == (b"x y", b"5")
    assert rec.comms([1, 3]) == [b"a", b"<...>"]  # replay: no one to ask
    entry, exit_ = rec.detach(1), rec.detach(3)
    assert entry.comm() == "a" and entry.args() == (("n", "5"), ("s", "x y"))
    assert exit_.retval() == "-3" and exit_.tgid() == -1


def test_unknown_comm_named_from_the_chunk_then_live() -> None:
    me = os.getpid()
    comm = Path("/proc/self/comm").read_text().strip()
    lines = [line("worker", 11, 10, "f: (0x1) n=1"), line("<...>", 11, 11, "f: (0x1) n=1"),
             line("<...>", me, 12, "f: (0x1) n=1"), line("<...>", 999_999_999, 13, "f: (0x1) n=1")]
    b = source(Tasks()).batch(b"\n".join(lines) + b"\n")
    assert b.records.comms([0, 1, 2, 3]) == [b"worker", b"worker", comm.encode(), b"<...>"]
    assert b.records.detach(2).comm() == comm and b.records.detach(3).comm() == "<...>"


def test_tgid_column_from_record_tgid_lines() -> None:
    b = source().batch(line("a", 11, 5, "f: (0x1) n=1", tgid=10) + b"\n")
    assert b.tgid.tolist() == [10]
    assert np.array_equal(b.tgid, b.tgid)  # computed once, kept


def test_big_chunks_are_cut_at_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import kprobe_exporter.text as text_mod

    monkeypatch.setattr(text_mod, "PIECE", 64)
    chunk = b"\n".join(line("a", 11, i, "f: (0x1) n=1") for i in range(20)) + b"\n"
    batches = list(source().batches(chunk))
    assert len(batches) > 1
    assert sum(b.read for b in batches) == 20 and all(np.all(b.ev == 0) for b in batches)


def test_settled_tgids_from_the_table_read_after_the_thread_was_gone_not_the_line(tmp_path: Path) -> None:
    # The `(tgid)` the kernel printed is its table's when it formatted the line: for a thread not yet
    # switched out, a previous holder's (here 1). A thread gone from /proc has its own from a table
    # read after that (Tasks.tgids); a live one answers for itself.
    gone = [dead_tid(), dead_tid()]
    me = os.getpid()
    (tmp_path / "saved_tgids").write_text(f"{gone[0]} 4242\n")
    tasks = Tasks(tmp_path)
    tasks.REREAD_S = 1e9  # no second read but a forced one, however slow the machine
    src = source(tasks)
    text = b"\n".join([line("a", gone[0], 1_000_001, "f: (0x1) n=1 s=\"\"", tgid=1),
                       line("a", me, 1_000_002, "f: (0x1) n=2 s=\"\"", tgid=1),
                       line("a", gone[0], 1_000_003, "f_ret: (0x2 <- 0x1) ret=0", tgid=1)]) + b"\n"
    b, rest = src.settled(text, force=False)
    assert rest == b"" and b.tgid.tolist() == [4242, me, 4242]
    assert [b.records.detach(i).tgid() for i in range(3)] == [4242, me, 4242]
    # a thread seen gone after the last table read waits, with every line after its first, for the next
    later = line("c", me, 1_000_004, "f: (0x1) n=3 s=\"\"", tgid=1) + b"\n"
    held = line("c", gone[1], 1_000_005, "f: (0x1) n=4 s=\"\"", tgid=1) + b"\n"
    (tmp_path / "saved_tgids").write_text(f"{gone[0]} 4242\n{gone[1]} 99\n")
    b, rest = src.settled(later + held + later, force=False)
    assert (len(b), rest) == (1, held + later) and b.tgid.tolist() == [me]
    b, rest = src.settled(rest, force=True)
    assert rest == b"" and b.tgid.tolist() == [99, me]


def dead_tid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid  # reaped: /proc has no such entry
