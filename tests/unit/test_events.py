"""events: the batch's on-demand columns are asked of its records once, then kept."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kprobe_exporter.events import I64, EventBatch, Record


class Records:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def payloads(self, rows: Sequence[int]) -> list[bytes]:
        return [b""] * len(rows)

    def picker(self, ev: int, names: tuple[str, ...]):  # type: ignore[no-untyped-def]
        return lambda payload: (b"",) * len(names)

    def comms(self, rows: Sequence[int]) -> list[bytes]:
        return [b""] * len(rows)

    def column(self, name: str) -> I64:
        self.asked.append(name)
        return np.full(2, {"cpu": 3, "tgid": 9}[name], np.int64)

    def detach(self, row: int) -> Record:
        raise NotImplementedError


def test_columns_on_demand_once() -> None:
    rec = Records()
    b = EventBatch(np.zeros(2, np.int64), np.ones(2, np.int64), np.arange(2, dtype=np.int64), rec, [], 2)
    assert len(b) == 2 and b.errors == {} and b.lost == []
    assert b.tgid.tolist() == [9, 9] and b.tgid.tolist() == [9, 9] and b.cpu.tolist() == [3, 3]
    assert rec.asked == ["tgid", "cpu"]
    given = EventBatch(np.zeros(2, np.int64), np.ones(2, np.int64), np.arange(2, dtype=np.int64), rec, [], 2,
                       cpu=np.array([0, 1], np.int64))
    assert given.cpu.tolist() == [0, 1] and rec.asked == ["tgid", "cpu"]  # a reader that has it gives it
