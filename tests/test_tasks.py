"""Tasks: a thread id's comm and tgid from saved_cmdlines / saved_tgids, else /proc, else `<...>` and -1."""

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


def test_the_kernels_tables_come_first(tmp_path: Path) -> None:
    # The files as tracefs prints them ("PID COMM" / "PID TGID"); a thread the kernel names differently
    # from /proc (comm changed since) shows what the trace would have shown.
    me = os.getpid()
    (tmp_path / "saved_cmdlines").write_text(f"1 init\n{me} as-traced\n")
    (tmp_path / "saved_tgids").write_text(f"{me} 4242\n")
    t = Tasks(tmp_path)
    assert t.comm(me) == "as-traced"
    assert t.tgid(me) == 4242


def test_proc_names_live_threads_the_tables_lack(tmp_path: Path) -> None:
    (tmp_path / "saved_cmdlines").write_text("1 init\n")
    (tmp_path / "saved_tgids").write_text("")
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
    assert Tasks(None).comm(os.getpid()) == own_comm()


def test_gone_threads_are_unknown(tmp_path: Path) -> None:
    (tmp_path / "saved_cmdlines").write_text("")
    tid = dead_tid()
    t = Tasks(tmp_path)
    assert t.comm(tid) == UNKNOWN_COMM
    assert t.tgid(tid) == -1


def test_answers_expire(tmp_path: Path) -> None:
    # tids are reused and comms change at exec: an answer is good for TTL_S only
    me = os.getpid()
    (tmp_path / "saved_cmdlines").write_text(f"{me} first\n")
    t = Tasks(tmp_path)
    assert t.comm(me) == "first"
    (tmp_path / "saved_cmdlines").write_text(f"{me} second\n")
    assert t.comm(me) == "first"  # cached
    t._stamp -= Tasks.TTL_S + 1  # as if TTL_S had passed
    assert t.comm(me) == "second"
