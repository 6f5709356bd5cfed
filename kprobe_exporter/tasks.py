"""Tasks: the comm and tgid of a thread id, where a trace record or line does not carry them.

The kernel names a task in trace output from a bounded cache (saved_cmdlines: 128 entries on older
kernels, a few thousand on newer ones): busy hosts with short-lived threads evict entries before the
text is formatted, and `<...>` prints. Thread ids are reused (pid_max is often 32768), so an entry
is only good if it was read after the event was: the tables keep old incarnations' entries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path

UNKNOWN_COMM = "<...>"


class Tasks:
    """comm and tgid by thread id, for labels and spans.

    A live thread answers for itself (/proc). For one that is gone, the kernel's tables (with a
    tracefs root): saved_cmdlines and saved_tgids, which it fills when a task that wrote events is
    switched out, so a table is consulted only if it was read after the newest batch of events
    (`batch_read`), and read again at most every REREAD_S (saved_tgids is ~10 ms to read with
    32k entries); a thread that no table can vouch for is unknown, `<...>` and -1, rather than
    maybe someone else. Answers are kept for TTL_S seconds (thread ids are reused and comms change
    at exec); unknowns are not.
    """

    TTL_S = 5.0
    REREAD_S = 0.2

    def __init__(self, tracefs_root: Path | None = None) -> None:
        self.root = tracefs_root
        self._comm: dict[int, str] = {}
        self._tgid: dict[int, int] = {}
        self._saved: dict[str, dict[int, str]] = {}
        self._read_at: dict[str, float] = {}
        self._batch_at = 0.0
        self._gone_at: dict[int, float] = {}  # when /proc first had no such thread
        self._stamp = time.monotonic()

    def batch_read(self, at: float | None = None) -> None:
        """Events up to monotonic time `at` (now) have been read: tables older than that may be stale."""
        self._batch_at = time.monotonic() if at is None else at

    def _fresh(self) -> None:
        now = time.monotonic()
        if now - self._stamp > self.TTL_S:
            self._comm.clear()
            self._tgid.clear()
            self._gone_at.clear()
            self._stamp = now

    def comm(self, tid: int) -> str:
        self._fresh()
        c = self._comm.get(tid)
        if c is None:
            try:
                with open(f"/proc/{tid}/comm", "rb") as f:
                    c = f.read().rstrip(b"\n").decode("utf-8", "backslashreplace")
            except OSError:
                c = self._lookup("saved_cmdlines", tid)
                if c is None:
                    return UNKNOWN_COMM  # not kept: a table read a moment later may still know it
            self._comm[tid] = c
        return c

    def comm16(self, tid: int) -> bytes:
        """comm as the trace text's 16 columns show it (the last 16 bytes, leading blanks trimmed)."""
        return self.comm(tid).encode("utf-8", "backslashreplace")[-16:].lstrip()

    def tgids(self, tids: Iterable[int], force: bool = False) -> tuple[dict[int, int], set[int]]:
        """The tgid of each thread of a batch just read (-1: the kernel does not know), and the threads
        that must wait for a later batch.

        With record-tgid on, the kernel saves a thread's tgid in saved_tgids when it switches the
        thread out after it wrote events, so a thread gone from /proc is in the table, unless another
        holder of its id wrote over it since. Before that first switch the entry (and the `(tgid)` of a
        text line formatted then) is a previous holder's or none: the table is only asked about a
        thread if it was read after /proc was seen without the thread. One read serves a batch; reads
        are REREAD_S apart, so a thread gone just after one waits for the next (`force`: read now).
        """
        self._fresh()
        out: dict[int, int] = {}
        gone: list[int] = []
        for tid in tids:
            t = self._tgid.get(tid)
            if t is None:
                t = self._live_tgid(tid)
                if t < 0:
                    gone.append(tid)
                    continue
                self._tgid[tid] = t
            out[tid] = t
        if not gone:
            return out, set()
        now = time.monotonic()
        for tid in gone:
            self._gone_at.setdefault(tid, now)
        read_at = self._read_at.get("saved_tgids", -math.inf)
        stale = {t for t in gone if self._gone_at[t] > read_at}  # seen gone after the last read began
        if stale and self.root is not None:
            if not force and now - read_at < self.REREAD_S:
                out.update(self._from_table([t for t in gone if t not in stale]))
                return out, stale
            self._read_at["saved_tgids"] = now
            self._saved["saved_tgids"] = self._read("saved_tgids")
        out.update(self._from_table(gone))
        return out, set()

    def _from_table(self, tids: list[int]) -> dict[int, int]:
        table = self._saved.get("saved_tgids", {}) if self.root is not None else {}
        out = {}
        for tid in tids:
            s = table.get(tid, "")
            out[tid] = self._tgid[tid] = int(s) if s.isdigit() and s != "0" else -1
        return out

    def _live_tgid(self, tid: int) -> int:
        try:
            with open(f"/proc/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return -1

    def tgid(self, tid: int) -> int:
        self._fresh()
        t = self._tgid.get(tid)
        if t is None:
            t = self._live_tgid(tid)
            if t < 0:
                s = self._lookup("saved_tgids", tid)
                if s is None or not s.isdigit() or s == "0":
                    return -1  # not kept, as for comm
                t = int(s)
            self._tgid[tid] = t
        return t

    def _lookup(self, name: str, tid: int) -> str | None:
        if self.root is None:
            return None
        read_at = self._read_at.get(name, -math.inf)
        if read_at < self._batch_at:  # older than the events: it may hold a previous incarnation
            now = time.monotonic()
            if now - read_at < self.REREAD_S:
                return None
            self._saved[name] = self._read(name)
            self._read_at[name] = now
        return self._saved.get(name, {}).get(tid)

    def _read(self, name: str) -> dict[int, str]:
        out: dict[int, str] = {}
        assert self.root is not None
        try:
            text = (self.root / name).read_text("utf-8", "backslashreplace")
        except OSError:
            return out
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k.isdigit():
                out[int(k)] = v
        return out


def record_tgid(inst: Path) -> bool:
    """Whether an instance has record-tgid on: only then does the kernel keep tgids (saved_tgids, the text's
    `(tgid)` column), and a reader settles each batch's tgids when it reads it (Tasks.tgids)."""
    try:
        return (inst / "options" / "record-tgid").read_text().strip() == "1"
    except OSError:
        return False
