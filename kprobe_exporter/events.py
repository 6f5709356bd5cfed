"""Events: the one batch both readers yield and the aggregate consumes.

Columns (numpy int64, one row per trace line or ring-buffer entry): the event's index in the probe
set, thread id, nanosecond timestamp, and on demand CPU and tgid. What the columns do not carry (a
record's comm, its args) is read through the batch's Records, only for the rows a label or a span
asks about. Rows that are no event (a LOST line or marker, a comment, an unparsable line) have
event EV_NONE; loss markers are listed in `lost` with their row, so the aggregate can cut there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]

EV_UNKNOWN = -1  # an event this probe set does not have (counted as a parse error)
EV_NONE = -2  # a row that is no event: a loss marker, a comment, an unparsable line

# Parse error reasons (the `reason` label of kprobe_exporter_parse_errors_total).
BAD_HEAD = "bad_head"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_EVENT = "unknown_event"
BAD_LOST = "bad_lost_line"
REASONS = (BAD_HEAD, BAD_TIMESTAMP, UNKNOWN_EVENT, BAD_LOST)

ArgPicker = Callable[[bytes], tuple[bytes, ...]]


class Record(Protocol):
    """One event, detached from its batch (an entry waiting for its exit keeps one for its span)."""

    def comm(self) -> str: ...

    def tgid(self) -> int: ...

    def args(self) -> tuple[tuple[str, str], ...]: ...

    def retval(self) -> str | None: ...


class Records(Protocol):
    """A batch's access to what its columns do not carry, by row."""

    def payloads(self, rows: Sequence[int]) -> list[bytes]:
        """Per row, the bytes its args are read from: rows with equal payloads (of one event) have equal args."""
        ...

    def picker(self, ev: int, names: tuple[str, ...]) -> ArgPicker:
        """The values of args `names` of event `ev` from one of its payloads (b'' where absent)."""
        ...

    def comms(self, rows: Sequence[int]) -> list[bytes]:
        """Per row, the thread's comm as the trace names it (`<...>` where nothing could)."""
        ...

    def column(self, name: str) -> I64:
        """A column computed on demand: `cpu` or `tgid` (-1 unknown)."""
        ...

    def detach(self, row: int) -> Record: ...


class EventBatch:
    """Events in time order, as columns; see the module docstring."""

    __slots__ = ("_cols", "errors", "ev", "lost", "read", "records", "tid", "ts")

    def __init__(self, ev: I64, tid: I64, ts: I64, records: Records, lost: list[tuple[int, int, int]],
                 read: int, errors: dict[str, int] | None = None, cpu: I64 | None = None) -> None:
        self.ev, self.tid, self.ts, self.records = ev, tid, ts, records
        self.lost = lost  # (row, cpu, events lost before it; 0 when the kernel did not count them)
        self.read = read  # the lines (text) or records (raw) it holds, loss markers aside for raw
        self.errors = errors or {}  # rows the text parser could not take, by reason
        self._cols: dict[str, I64] = {} if cpu is None else {"cpu": cpu}

    def __len__(self) -> int:
        return len(self.ev)

    @property
    def cpu(self) -> I64:
        return self._column("cpu")

    @property
    def tgid(self) -> I64:
        return self._column("tgid")

    def _column(self, name: str) -> I64:
        col = self._cols.get(name)
        if col is None:
            col = self._cols[name] = self.records.column(name)
        return col


def empty_column(n: int, fill: int = -1) -> I64:
    return np.full(n, fill, np.int64)
