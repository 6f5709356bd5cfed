"""Tasks: a thread id's comm and tgid from /proc while it lives, then from saved_cmdlines / saved_tgids,
never from a table read before the events (thread ids are reused: it may name a previous incarnation)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from kprobe_exporter.tasks import UNKNOWN_COMM, Tasks


def own_comm() -> str:
    return Path("/proc/self/comm").read_text().strip()


def dead_tid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid  # reaped: /proc has no such entry (pid reuse within the test is vanishingly unlikely)


def tables(root: Path, cmdlines: str, tgids: str = "") -> None:
    # the files as tracefs prints them: "PID COMM" and "PID TGID" lines
    (root / "saved_cmdlines").write_text(cmdlines)
    (root / "saved_tgids").write_text(tgids)


def test_a_live_thread_answers_for_itself(tmp_path: Path) -> None:
    # The tables hold what a previous holder of the id left until the kernel next switches the new
    # one out: they are not asked about a thread /proc knows.
    me = os.getpid()
    tables(tmp_path, f"1 init\n{me} previous\n", f"{me} 4242\n")
    t = Tasks(tmp_path)
    assert (t.comm(me), t.tgid(me)) == (own_comm(), me)


def test_gone_threads_come_from_tables_read_after_their_events(tmp_path: Path) -> None:
    gone = dead_tid()
    tables(tmp_path, f"{gone} old-one\n", f"{gone} 777\n")  # a previous incarnation of that tid
    t = Tasks(tmp_path)
    t.REREAD_S = 1e9  # the reads below come "too soon" however slow the machine
    assert (t.comm(gone), t.tgid(gone)) == ("old-one", 777)  # no batch yet: the first read stands
    tables(tmp_path, f"{gone} new-one\n", f"{gone} 888\n")  # the thread that wrote the next events
    t.batch_read()  # those events: the tables in hand predate them
    t._comm.clear(), t._tgid.clear()  # (as after TTL_S)
    # read again only after REREAD_S: until then, unknown rather than the old incarnation's name
    assert (t.comm(gone), t.tgid(gone)) == (UNKNOWN_COMM, -1)
    for name in ("saved_cmdlines", "saved_tgids"):
        t._read_at[name] -= t.REREAD_S  # (as after REREAD_S)
    assert (t.comm(gone), t.tgid(gone)) == ("new-one", 888)


def test_proc_names_live_threads_the_tables_lack(tmp_path: Path) -> None:
    tables(tmp_path, "1 init\n")
    t = Tasks(tmp_path)
    tids: list[int] = []
    ready, done = threading.Event(), threading.Event()

    def worker() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    th = threading.Thread(target=worker)
    th.start()
    try:
        ready.wait(10)
        assert t.comm(tids[0]) == Path(f"/proc/{tids[0]}/comm").read_text().strip()
        assert t.tgid(tids[0]) == os.getpid()  # a thread's tgid is its process
    finally:
        done.set()
        th.join()


def test_without_tables_only_proc(tmp_path: Path) -> None:
    # the text path: the kernel looked in its tables already and printed `<...>`
    t = Tasks()
    assert (t.comm(os.getpid()), t.tgid(os.getpid())) == (own_comm(), os.getpid())
    gone = dead_tid()
    assert (t.comm(gone), t.tgid(gone)) == (UNKNOWN_COMM, -1)


def test_answers_expire(tmp_path: Path) -> None:
    # tids are reused and comms change at exec: an answer is good for TTL_S only
    gone = dead_tid()
    tables(tmp_path, f"{gone} first\n")
    t = Tasks(tmp_path)
    t.TTL_S = 1e9  # expiry only as the test says, however slow the machine
    assert t.comm(gone) == "first"
    tables(tmp_path, f"{gone} second\n")
    t.batch_read(t._read_at["saved_cmdlines"] - 1)  # events older than the table read: it stays good
    assert t.comm(gone) == "first"  # and the answer is kept
    t._stamp -= t.TTL_S + 1  # as if TTL_S had passed
    t.batch_read()
    t._read_at["saved_cmdlines"] -= t.REREAD_S  # (as after REREAD_S)
    assert t.comm(gone) == "second"


def test_a_batch_s_gone_threads_come_from_one_table_read_after_they_were_seen_gone(tmp_path: Path) -> None:
    # record-tgid: the kernel saves a thread's tgid when it switches it out after its events; before
    # that, the table holds a previous holder's of the id. A table read before the thread was seen gone
    # from /proc may be that; one read after it is the thread's own.
    gone, other = dead_tid(), dead_tid()
    tables(tmp_path, "", f"{gone} 777\n")
    t = Tasks(tmp_path)
    t.REREAD_S = 1e9  # however slow the machine, the second call comes "too soon"
    me = os.getpid()
    assert t.tgids([me, gone]) == ({me: me, gone: 777}, set())  # seen gone now: the table is read now
    tables(tmp_path, "", f"{gone} 777\n{other} 888\n")  # `other` was switched out since
    got, wait = t.tgids([gone, other])  # `other` seen gone after that read: it waits for the next
    assert (got, wait) == ({gone: 777}, {other})
    t._read_at["saved_tgids"] -= t.REREAD_S  # (as after REREAD_S)
    assert t.tgids([other]) == ({other: 888}, set())
    tables(tmp_path, "", "")
    assert t.tgids([gone, other]) == ({gone: 777, other: 888}, set())  # answers kept for TTL_S


def test_force_reads_the_table_at_once_and_unknown_is_minus_one(tmp_path: Path) -> None:
    gone, other = dead_tid(), dead_tid()
    tables(tmp_path, "", f"{gone} 0\n")  # 0: no tgid saved for it
    t = Tasks(tmp_path)
    t.REREAD_S = 1e9
    assert t.tgids([gone]) == ({gone: -1}, set())
    tables(tmp_path, "", f"{other} 5\n")
    assert t.tgids([other])[1] == {other}
    assert t.tgids([other], force=True) == ({other: 5}, set())  # a flush: nothing left to wait for
    assert Tasks().tgids([dead_tid()])[1] == set()  # without tables nothing can be waited for
