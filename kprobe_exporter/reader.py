"""Reader: drain trace_pipe into a preallocated buffer; hand on complete lines only, in big chunks.

A read() of trace_pipe returns at most two pages (~8 KB): the kernel formats events into a
page-sized buffer per call. A chunk is digested in whole-array passes with a fixed cost per chunk,
so read_chunk keeps reading until trace_pipe is empty or the buffer is nearly full, and when a
drain came up short (a quiet moment), it lets events gather for `batch_s` before the next one.
Under overload every drain fills the buffer, so it never waits. (splice() into a pipe was tried:
it formats the same text and copies it twice; bench/README.md has the figures.)
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from typing import Any, Protocol

from kprobe_exporter.events import EventBatch
from kprobe_exporter.probes import ProbeSet
from kprobe_exporter.tasks import Tasks, record_tgid
from kprobe_exporter.text import TextSource

MIN_FREE = 16 << 10  # stop filling when less than this is free: a read takes up to ~8 KB


class ReaderError(Exception):
    """trace_pipe failed in a way that retrying will not fix (tracefs gone, instance removed)."""


class TracePipeReader:
    """Non-blocking reads of a trace_pipe; a partial last line is carried to the next read."""

    def __init__(self, path: str, bufsize: int = 1 << 20, batch_s: float = 0.02,
                 batch_bytes: int = 256 << 10) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._buf = bytearray(max(bufsize, 2 * MIN_FREE))
        self._view = memoryview(self._buf)
        self._have = 0  # bytes of a partial line kept at the buffer's start
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        self.batch_s = batch_s
        self.batch_bytes = batch_bytes
        self._quiet_until = 0.0

    def read_chunk(self, timeout_s: float = 0.1) -> bytes:
        """Complete lines read now, or b'' after waiting up to timeout_s for any."""
        wait = self._quiet_until - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, timeout_s))
        start = self._have
        end, drained = self._fill()
        got = end - start
        if drained and got < self.batch_bytes:
            self._quiet_until = time.monotonic() + self.batch_s
        if got == 0 and drained:
            self._readable(timeout_s)  # wait here; the next call reads what arrived
            return b""
        view = self._view
        cut = self._buf.rfind(b"\n", 0, end) + 1
        if cut == 0:
            if end >= len(self._buf) - MIN_FREE:  # a line longer than the buffer: pass it on as is
                self._have = 0
                return bytes(view[:end])
            self._have = end
            return b""
        chunk = bytes(view[:cut])
        rest = end - cut
        if rest:
            self._buf[:rest] = view[cut:end]
        self._have = rest
        return chunk

    def _fill(self) -> tuple[int, bool]:
        """Read until trace_pipe is empty or the buffer nearly full: (bytes held, whether emptied)."""
        view, end, size = self._view, self._have, len(self._buf)
        while size - end >= MIN_FREE:
            try:
                n = os.readv(self.fd, [view[end:]])
            except BlockingIOError:
                return end, True
            except OSError as e:
                # EINTR is retried by Python itself (PEP 475); the rest means tracefs went away.
                raise ReaderError(f"reading {self.path} failed: {os.strerror(e.errno or 0)}") from None
            if n == 0:
                return end, True
            end += n
        return end, False

    def _readable(self, timeout_s: float) -> bool:
        try:
            events = self._poll.poll(int(timeout_s * 1000))
        except InterruptedError:
            return False
        for _, mask in events:
            if mask & (select.POLLERR | select.POLLNVAL):
                raise ReaderError(f"{self.path}: poll error")
        return bool(events)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self._poll.unregister(self.fd)
            except (KeyError, ValueError):
                pass
            os.close(self.fd)
            self.fd = -1


class EventReader(Protocol):
    """What the agent drives, whichever reader it is (TextReader here, raw.RawReader)."""

    def read(self, timeout_s: float = 0.1) -> EventBatch | None:
        """The events read now, or None after waiting up to timeout_s for any."""
        ...

    def flush(self) -> EventBatch | None:
        """What is buffered, without waiting (at a reload or a stop); None when nothing is."""
        ...

    def set_events(self, probes: ProbeSet) -> None:
        """Read for a new probe set from here on (after a reload)."""
        ...

    def check(self, probes: ProbeSet, spans: bool) -> None:
        """Raise if this reader could not serve `probes` (judged before a reload changes anything)."""
        ...

    def close(self) -> None: ...


class TextReader:
    """trace_pipe's lines as event batches: the reader protocol the agent drives (read, flush,
    set_events, check, close), the same as the raw reader's."""

    def __init__(self, path: str, probes: ProbeSet, tasks: Tasks | None = None, **pipe: Any) -> None:
        self.pipe = TracePipeReader(path, **pipe)
        self.source = TextSource(probes, tasks)
        self.inst = Path(path).parent
        self.settle_tgids = tasks is not None and record_tgid(self.inst)
        self.carry = b""  # lines held over for the next read (their tgid waits for a table read)

    def read(self, timeout_s: float = 0.1) -> EventBatch | None:
        """The complete lines read now, or None after waiting up to timeout_s for any."""
        return self._read(timeout_s, force=False)

    def _read(self, timeout_s: float, force: bool) -> EventBatch | None:
        chunk = self.pipe.read_chunk(timeout_s)
        if self.source.tasks is not None:
            self.source.tasks.batch_read()
        if self.carry:
            chunk, self.carry = self.carry + chunk, b""
        if not chunk:
            return None
        if not self.settle_tgids:
            return self.source.batch(chunk)
        b, self.carry = self.source.settled(chunk, force)
        return b if len(b) else None

    def flush(self) -> EventBatch | None:
        return self._read(0, force=True)

    def set_events(self, probes: ProbeSet) -> None:
        self.source = TextSource(probes, self.source.tasks)
        self.settle_tgids = self.source.tasks is not None and record_tgid(self.inst)

    def check(self, probes: ProbeSet, spans: bool) -> None:
        """Text serves every probe set."""

    def close(self) -> None:
        self.pipe.close()
