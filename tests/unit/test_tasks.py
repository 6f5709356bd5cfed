"""Tasks: a thread id's comm and tgid from /proc while it lives, then from saved_cmdlines / saved_tgids,
never from a table read before the events (thread ids are reused: it may name a previous incarnation)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
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
    assert (t.comm(gone), t.tgid(gone)) == ("old-one", 777)  # no batch yet: the first read stands
    tables(tmp_path, f"{gone} new-one\n", f"{gone} 888\n")  # the thread that wrote the next events
    t.batch_read()  # those events: the tables in hand predate them
    t._comm.clear(), t._tgid.clear()  # (as after TTL_S)
    # read again only after REREAD_S: until then, unknown rather than the old incarnation's name
    assert (t.comm(gone), t.tgid(gone)) == (UNKNOWN_COMM, -1)
    time.sleep(Tasks.REREAD_S + 0.05)
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
    assert t.comm(gone) == "first"
    tables(tmp_path, f"{gone} second\n")
    t.batch_read(time.monotonic() - 1)  # events older than the table read: it stays good
    assert t.comm(gone) == "first"  # and the answer is kept
    t._stamp -= Tasks.TTL_S + 1  # as if TTL_S had passed
    t.batch_read()
    time.sleep(Tasks.REREAD_S + 0.05)
    assert t.comm(gone) == "second"
