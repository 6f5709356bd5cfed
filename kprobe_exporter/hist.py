"""Hist: the kernel's hist-trigger tables (`events/GROUP/EVENT/hist`) read into keyed counts and sums.

A hist file holds one table per trigger on the event, each a `# trigger info:` header, one
`{ key: value, ... } hitcount: N  val: M` row per entry, and `Totals:` with Hits, Entries and Dropped
(entries the full table refused). Key values print by their modifier: plain numbers, padded strings,
`.execname` as `comm [pid]`, `.log2` as `~ 2^N` and `.buckets=S` as `~ LO-HI`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import NamedTuple

_TRIGGER = "# trigger info: "
_TOTAL = re.compile(r"^\s+(Hits|Entries|Dropped): (\d+)$")
_VALUE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.$]*):\s+(-?\d+)")
_LOG2 = re.compile(r"~ 2\^(\d+)\s*$")
_RANGE = re.compile(r"~ (\d+)-(\d+)\s*$")


class HistFormatError(ValueError):
    """A hist file that does not read as the kernel prints it (the message says where)."""


class HistRow(NamedTuple):  # a tuple, not a dataclass: a table may have tens of thousands of rows
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


def _key_cutter(names: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """A table's cut of `{ a: x, b: y }`'s inside into the printed values, made once per table.

    It cuts at the known names from the right, so that a string key (a comm, a path) containing ", b: "
    can only fool the cut of a key after it, never its own.
    """
    fields = [n.split(".", 1)[0] for n in names]
    head, first = f"{fields[0]}: ", fields[0]
    needles = [(f", {name}: ", len(name) + 4, name) for name in reversed(fields[1:])]

    def cut_one(inner: str) -> tuple[str, ...]:
        rest = inner.lstrip()
        if not rest.startswith(head):
            raise HistFormatError(f"key {first!r} not first in {inner!r}")
        return (rest[len(head) :].strip(),)

    def cut(inner: str) -> tuple[str, ...]:
        out: list[str] = []
        rest = inner
        for needle, width, name in needles:
            at = rest.rfind(needle)
            if at < 0:
                raise HistFormatError(f"key {name!r} not in {inner!r}")
            out.append(rest[at + width :].strip())
            rest = rest[:at]
        rest = rest.lstrip()
        if not rest.startswith(head):
            raise HistFormatError(f"key {first!r} not first in {inner!r}")
        out.append(rest[len(head) :].strip())
        out.reverse()
        return tuple(out)

    return cut if needles else cut_one


def _values(tail: str) -> dict[str, int]:
    """` hitcount:   N  lat:   M` → {"hitcount": N, "lat": M}. Whitespace-separated `name: number` pairs
    (what the kernel prints) are split; anything else goes through the regex, which picks the pairs out."""
    toks = tail.split()
    out: dict[str, int] = {}
    if len(toks) % 2 == 0:
        for i in range(0, len(toks), 2):
            name, num = toks[i], toks[i + 1]
            if name[-1:] != ":" or not num.isdecimal() or not (name.isascii() and name[:-1].isidentifier()):
                break
            out[name[:-1]] = int(num)
        else:
            return out
    return {m.group(1): int(m.group(2)) for m in _VALUE.finditer(tail)}


@dataclass
class RowMemo:
    """What one read of a table lends the next read of the same file: a row printed the same is that row
    again (its HistRow is shared, read-only), a key printed the same is not cut again."""

    rows: dict[str, HistRow] = field(default_factory=dict)  # the whole row line -> its row
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a changed row's key text -> its cut


def _row(line: str, cut: Callable[[str], tuple[str, ...]], known: RowMemo, seen: RowMemo) -> HistRow:
    """One `{ keys } hitcount: N ...` line, from `known` if it printed the same there; noted in `seen`."""
    row = known.rows.get(line)
    if row is None:
        close = line.rfind("} hitcount:")
        if close < 0:
            raise HistFormatError(f"not a hist row: {line!r}")
        inner = line[1:close]
        keys = known.keys.get(inner)
        if keys is None:
            keys = cut(inner)
        seen.keys[inner] = keys
        count = line[close + 11 :].strip()  # the usual row of a count table, `hitcount: N` alone, read in line
        if count.isdecimal() and count.isascii():
            row = HistRow(keys, {"hitcount": int(count)})
        else:
            row = HistRow(keys, _values(line[close + 1 :]))
    seen.rows[line] = row
    return row


def parse(text: str, rows_of: Container[tuple[str, ...]] | None = None,
          memo: dict[tuple[str, ...], RowMemo] | None = None) -> list[HistTable]:
    """Every table of one hist file, in the order the kernel prints them. With `rows_of`, only the tables
    keyed as one of its entries (`key_names`) get their rows; the others' rows are skipped (their totals,
    hits, entries and dropped, are still read), which is what a reader of their totals alone needs.

    `memo` (per `key_names`) carries rows and key cuts from one read of the same file to the next; it
    then holds this read's alone, so it never outgrows the file's tables."""
    seen: dict[tuple[str, ...], RowMemo] = {}
    known_t = seen_t = RowMemo()
    tables: list[HistTable] = []
    trigger: str | None = None
    names: tuple[str, ...] | None = None
    cut: Callable[[str], tuple[str, ...]] | None = None
    keep = True
    rows: list[HistRow] = []
    totals: dict[str, int] = {}
    for line in text.splitlines():
        if line[:1] == "{":
            if trigger is None:
                raise HistFormatError(f"a row before any trigger info: {line!r}")
            if cut is None:
                names = key_names(trigger)
                keep = rows_of is None or names in rows_of
                cut = _key_cutter(names)
                known_t = memo.get(names, RowMemo()) if memo is not None else RowMemo()
                seen_t = seen.setdefault(names, RowMemo())
            if keep:
                rows.append(_row(line, cut, known_t, seen_t))
        elif line.startswith(_TRIGGER):
            trigger = line[len(_TRIGGER) :].removesuffix(" [active]").removesuffix(" [paused]").strip()
            names, cut, rows, totals = None, None, [], {}
        elif (m := _TOTAL.match(line)) is not None:
            totals[m.group(1)] = int(m.group(2))
            if m.group(1) == "Dropped":
                if trigger is None:
                    raise HistFormatError("totals before any trigger info")
                tables.append(
                    HistTable(trigger, names or key_names(trigger), tuple(rows), totals.get("Hits", 0),
                              totals.get("Entries", 0), totals["Dropped"])
                )
                trigger = None
    if trigger is not None:
        raise HistFormatError(f"the table of {trigger!r} has no Totals (a truncated read?)")
    if memo is not None:
        memo.clear()
        memo.update(seen)
    return tables
