"""Tasks: the comm and tgid of a thread id, where a trace record or line does not carry them.

The kernel names a task in trace output from a small cache (saved_cmdlines, 128 entries by default):
busy hosts with short-lived threads evict entries before the text is formatted, and `<...>` prints.
"""

from __future__ import annotations

import time
from pathlib import Path

UNKNOWN_COMM = "<...>"


class Tasks:
    """comm and tgid by thread id, for labels and spans (a record carries only the pid).

    As the text path prints them: from tracefs' saved_cmdlines and saved_tgids (the kernel records
    a task's comm there when its events are written, and trace text looks it up when it formats),
    else from /proc while the thread lives, else `<...>` and -1. Answers are kept for TTL_S seconds:
    thread ids are reused and comms change at exec.
    """

    TTL_S = 5.0

    def __init__(self, tracefs_root: Path | None = None) -> None:
        self.root = tracefs_root
        self._comm: dict[int, str] = {}
        self._tgid: dict[int, int] = {}
        self._saved: dict[str, dict[int, str]] = {}
        self._read_at: dict[str, float] = {}
        self._stamp = time.monotonic()

    def _fresh(self) -> None:
        now = time.monotonic()
        if now - self._stamp > self.TTL_S:
            self._comm.clear()
            self._tgid.clear()
            self._saved.clear()
            self._stamp = now

    def comm(self, tid: int) -> str:
        self._fresh()
        c = self._comm.get(tid)
        if c is None:
            c = self._lookup("saved_cmdlines", tid)
            if c is None:
                try:
                    with open(f"/proc/{tid}/comm", "rb") as f:
                        c = f.read().rstrip(b"\n").decode("utf-8", "backslashreplace")
                except OSError:
                    c = UNKNOWN_COMM
            self._comm[tid] = c
        return c

    def tgid(self, tid: int) -> int:
        self._fresh()
        t = self._tgid.get(tid)
        if t is None:
            s = self._lookup("saved_tgids", tid)
            t = int(s) if s is not None and s.isdigit() and s != "0" else -1
            if t < 0:
                try:
                    with open(f"/proc/{tid}/status", "rb") as f:
                        for line in f:
                            if line.startswith(b"Tgid:"):
                                t = int(line.split()[1])
                                break
                except (OSError, ValueError, IndexError):
                    pass
            self._tgid[tid] = t
        return t

    def _lookup(self, name: str, tid: int) -> str | None:
        table = self._saved.get(name)
        now = time.monotonic()
        if table is None or (tid not in table and now - self._read_at.get(name, 0.0) > 0.2):
            table = self._saved[name] = self._read(name)  # a thread it lacks: read again, 5 times a second at most
            self._read_at[name] = now
        return table.get(tid)

    def _read(self, name: str) -> dict[int, str]:
        out: dict[int, str] = {}
        if self.root is None:
            return out
        try:
            text = (self.root / name).read_text("utf-8", "backslashreplace")
        except OSError:
            return out
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k.isdigit():
                out[int(k)] = v
        return out
