"""Hist: the kernel's hist-trigger tables (`events/GROUP/EVENT/hist`) read into keyed counts and sums.

A hist file holds one table per trigger on the event, each a `# trigger info:` header, one
`{ key: value, ... } hitcount: N  val: M` row per entry, and `Totals:` with Hits, Entries and Dropped
(entries the full table refused). Key values print by their modifier: plain numbers, padded strings,
`.execname` as `comm [pid]`, `.log2` as `~ 2^N` and `.buckets=S` as `~ LO-HI`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TRIGGER = "# trigger info: "
_TOTAL = re.compile(r"^\s+(Hits|Entries|Dropped): (\d+)$")
_VALUE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.$]*):\s+(-?\d+)")
_LOG2 = re.compile(r"~ 2\^(\d+)\s*$")
_RANGE = re.compile(r"~ (\d+)-(\d+)\s*$")


class HistFormatError(ValueError):
    """A hist file that does not read as the kernel prints it (the message says where)."""


@dataclass(frozen=True)
class HistRow:
    keys: tuple[str, ...]  # each key field's printed value, padding stripped, in the trigger's key order
    values: dict[str, int]  # hitcount and each `vals=` field


@dataclass(frozen=True)
class HistTable:
    trigger: str  # as the kernel lists it back, without " [active]"/" [paused]"
    key_names: tuple[str, ...]  # the key fields with their modifiers, as in `keys=`
    rows: tuple[HistRow, ...]
    hits: int
    entries: int
    dropped: int  # events the full table could not take: counted, never folded into a row

    @property
    def events(self) -> int:
        """Every event the trigger saw. `Hits` counts only those a row took (seen on 6.1: a full table of
        128 entries showed Hits 255 and Dropped 352 for 607 events, which a keyless table counted as Hits)."""
        return self.hits + self.dropped


def key_names(trigger: str) -> tuple[str, ...]:
    """`hist:keys=comm,lat.log2:vals=...` → ("comm", "lat.log2")."""
    for part in trigger.split(":"):
        if part.startswith(("keys=", "key=")):
            return tuple(part.split("=", 1)[1].split(","))
    raise HistFormatError(f"no keys= in trigger {trigger!r}")


def log2_upper_bound(printed: str) -> int:
    """`~ 2^N` holds the values v with 2^(N-1) < v <= 2^N (the kernel keys ilog2(roundup_pow_of_two(v)))."""
    m = _LOG2.search(printed)
    if m is None:
        raise HistFormatError(f"not a log2 key: {printed!r}")
    return 1 << int(m.group(1))


def bucket_range(printed: str) -> tuple[int, int]:
    """`~ LO-HI` (`.buckets=S`) holds the integers LO..HI, both included."""
    m = _RANGE.search(printed)
    if m is None:
        raise HistFormatError(f"not a bucket key: {printed!r}")
    return int(m.group(1)), int(m.group(2))


def _split_keys(inner: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The printed values of `{ a: x, b: y }`'s inside, cut at the known names from the right.

    From the right, so that a string key (a comm, a path) containing ", b: " can only fool the cut of
    a key after it, never its own.
    """
    fields = [n.split(".", 1)[0] for n in names]
    out: list[str] = []
    rest = inner
    for name in reversed(fields[1:]):
        at = rest.rfind(f", {name}: ")
        if at < 0:
            raise HistFormatError(f"key {name!r} not in {inner!r}")
        out.append(rest[at + len(name) + 4 :].strip())
        rest = rest[:at]
    head = f"{fields[0]}: "
    if not rest.lstrip().startswith(head):
        raise HistFormatError(f"key {fields[0]!r} not first in {inner!r}")
    out.append(rest.lstrip()[len(head) :].strip())
    return tuple(reversed(out))


def _row(line: str, names: tuple[str, ...]) -> HistRow:
    close = line.rfind("} hitcount:")
    if not line.startswith("{") or close < 0:
        raise HistFormatError(f"not a hist row: {line!r}")
    values = {m.group(1): int(m.group(2)) for m in _VALUE.finditer(line[close + 1 :])}
    return HistRow(_split_keys(line[1:close], names), values)


def parse(text: str) -> list[HistTable]:
    """Every table of one hist file, in the order the kernel prints them."""
    tables: list[HistTable] = []
    trigger: str | None = None
    rows: list[HistRow] = []
    totals: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(_TRIGGER):
            trigger = line[len(_TRIGGER) :].removesuffix(" [active]").removesuffix(" [paused]").strip()
            rows, totals = [], {}
        elif line.startswith("{"):
            if trigger is None:
                raise HistFormatError(f"a row before any trigger info: {line!r}")
            rows.append(_row(line, key_names(trigger)))
        elif (m := _TOTAL.match(line)) is not None:
            totals[m.group(1)] = int(m.group(2))
            if m.group(1) == "Dropped":
                if trigger is None:
                    raise HistFormatError("totals before any trigger info")
                tables.append(
                    HistTable(trigger, key_names(trigger), tuple(rows), totals.get("Hits", 0),
                              totals.get("Entries", 0), totals["Dropped"])
                )
                trigger = None
    if trigger is not None:
        raise HistFormatError(f"the table of {trigger!r} has no Totals (a truncated read?)")
    return tables
