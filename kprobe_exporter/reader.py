"""Reader: drain trace_pipe with one read() into a preallocated buffer; hand on complete lines only."""

from __future__ import annotations

import os
import select


class ReaderError(Exception):
    """trace_pipe failed in a way that retrying will not fix (tracefs gone, instance removed)."""


class TracePipeReader:
    """Non-blocking reads of a trace_pipe; a partial last line is carried to the next read."""

    def __init__(self, path: str, bufsize: int = 1 << 20) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)
        self._have = 0  # bytes of a partial line kept at the buffer's start
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def read_chunk(self, timeout_s: float = 0.1) -> bytes:
        """Complete lines read now, or b'' after waiting up to timeout_s for any."""
        view = self._view
        try:
            n = os.readv(self.fd, [view[self._have :]])
        except BlockingIOError:
            self._readable(timeout_s)  # wait here; the next call reads what arrived
            return b""
        except OSError as e:
            # EINTR is retried by Python itself (PEP 475); the rest means tracefs went away.
            raise ReaderError(f"reading {self.path} failed: {os.strerror(e.errno or 0)}") from None
        if n == 0 and self._have == 0:
            return b""
        end = self._have + n
        cut = self._buf.rfind(b"\n", 0, end) + 1
        if cut == 0:
            if end == len(self._buf):  # a line longer than the buffer: pass it on as is
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
