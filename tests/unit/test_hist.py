"""Hist tables: real hist files from Debian's 6.1 (tests/kernel_lab/capture_hist.py) read exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kprobe_exporter import hist

HIST = Path(__file__).resolve().parents[1] / "fixtures" / "linux-6.1-debian" / "hist"


def tables(name: str) -> list[hist.HistTable]:
    return hist.parse((HIST / name).read_text())


@pytest.mark.parametrize("name", ["vread.hist", "vread_ret.hist", "lat.hist"])
def test_every_row_is_read_rows_add_up_to_the_hits(name: str) -> None:
    text = (HIST / name).read_text()
    ts = hist.parse(text)
    assert len(ts) == text.count("# trigger info:")
    for t in ts:
        assert t.dropped == 0
        assert len(t.rows) == t.entries
        assert sum(r.values["hitcount"] for r in t.rows) == t.hits


def test_a_string_key_and_a_value_field() -> None:
    comm = tables("vread.hist")[1]
    assert comm.key_names == ("comm",)
    by = {r.keys[0]: r.values for r in comm.rows}
    assert by["dd"] == {"hitcount": 1306, "count": 1234600}
    assert by["bash"] == {"hitcount": 5, "count": 15350}


def test_two_keys_with_execname() -> None:
    t = tables("vread_ret.hist")[1]
    assert t.key_names == ("common_pid.execname", "ret")
    rows = {r.keys: r.values["hitcount"] for r in t.rows}
    assert rows[("dd              [       130]", "1")] == 1000
    assert rows[("dd              [       131]", "4096")] == 300


def test_log2_buckets_are_the_kernels_upper_bounds() -> None:
    t = tables("lat.hist")[0]
    assert t.key_names == ("lat.log2",)
    assert t.trigger == "hist:keys=lat.log2:vals=hitcount,lat:sort=lat:size=2048"
    bounds = {hist.log2_upper_bound(r.keys[0]): r.values for r in t.rows}
    assert bounds[1 << 13] == {"hitcount": 817, "lat": 5101997}
    for upper, v in bounds.items():  # every sample v in (upper/2, upper]: the mean must be too
        assert upper // 2 < v["lat"] / v["hitcount"] <= upper


def test_linear_buckets_and_the_same_samples_as_log2() -> None:
    log2, linear = tables("lat.hist")
    assert linear.key_names == ("lat.buckets=1000",)
    for r in linear.rows:
        lo, hi = hist.bucket_range(r.keys[0])
        assert hi - lo == 999 and lo % 1000 == 0
        assert lo <= r.values["lat"] / r.values["hitcount"] <= hi
    assert linear.hits == log2.hits
    assert sum(r.values["lat"] for r in linear.rows) == sum(r.values["lat"] for r in log2.rows)


def test_a_string_key_containing_the_next_keys_name_is_cut_right() -> None:
    text = (
        "# trigger info: hist:keys=comm,count:vals=hitcount:sort=hitcount:size=2048 [active]\n"
        "{ comm: a, count: 7 x  , count:         12 } hitcount:          3\n"
        "\nTotals:\n    Hits: 3\n    Entries: 1\n    Dropped: 0\n"
    )
    (t,) = hist.parse(text)
    assert t.rows[0].keys == ("a, count: 7 x", "12")


def test_a_full_table_counts_every_event_as_a_hit_or_a_drop() -> None:
    full, keyless = tables("full-table.hist")  # 300 processes against size=128, and a common_cpu key
    assert (full.entries, full.dropped) == (128, 352) and sum(r.values["hitcount"] for r in full.rows) == full.hits
    # the keyless table was installed one event (its own echo's open) later than the full one
    assert full.events == keyless.events + 1 and keyless.dropped == 0


def test_dropped_is_read() -> None:
    text = (
        "# trigger info: hist:keys=common_pid:vals=hitcount:sort=hitcount:size=128 [active]\n"
        "{ common_pid:        134 } hitcount:          4\n"
        "\nTotals:\n    Hits: 9\n    Entries: 1\n    Dropped: 5\n"
    )
    (t,) = hist.parse(text)
    assert (t.hits, t.entries, t.dropped) == (9, 1, 5)


def test_a_truncated_file_is_an_error_not_a_short_table() -> None:
    text = (HIST / "vread.hist").read_text()
    with pytest.raises(hist.HistFormatError, match="no Totals"):
        hist.parse(text[: text.rindex("Totals:")])


def test_rows_only_of_the_tables_asked_for_and_every_tables_totals() -> None:
    text = (HIST / "vread_ret.hist").read_text()
    full = hist.parse(text)
    some = hist.parse(text, rows_of={("common_pid.execname", "ret")})
    assert [t.key_names for t in some] == [t.key_names for t in full]
    assert [(t.hits, t.entries, t.dropped, t.trigger) for t in some] == [
        (t.hits, t.entries, t.dropped, t.trigger) for t in full]
    assert some[0].rows == () and len(full[0].rows) == full[0].entries > 0  # common_pid: not asked for
    assert some[1].rows == full[1].rows and len(some[1].rows) == some[1].entries


def test_three_keys_cut_from_the_right_and_values_in_any_form() -> None:
    """A string key holding the later keys' names keeps them; a value tail the kernel would not print plainly
    (a stray word, a negative number, a dotted name, a number run into text) reads as the regex picks it."""
    text = (
        "# trigger info: hist:keys=comm,a,b:vals=hitcount:sort=hitcount:size=2048 [active]\n"
        "{ comm: x, a: 1, b: 2   , a:          5, b:          6 } hitcount:          3\n"
        "{ comm: y                , a:          7, b:          8 } hitcount:          4  lat:   12  stray\n"
        "{ comm: z                , a:          9, b:         10 } hitcount:          5  d: -7  b.hex: 16\n"
        "{ comm: w                , a:         11, b:         12 } hitcount:          6  lat:  13x\n"
        "\nTotals:\n    Hits: 18\n    Entries: 4\n    Dropped: 0\n"
    )
    (t,) = hist.parse(text)
    assert [r.keys for r in t.rows] == [("x, a: 1, b: 2", "5", "6"), ("y", "7", "8"), ("z", "9", "10"),
                                        ("w", "11", "12")]
    assert [r.values for r in t.rows] == [{"hitcount": 3}, {"hitcount": 4, "lat": 12},
                                          {"hitcount": 5, "d": -7, "b.hex": 16}, {"hitcount": 6, "lat": 13}]


def _versions(text: str) -> list[str]:
    """The same file read again: one count changed, one row gone, one key printed anew; then as at first;
    then its last table alone (a trigger removed)."""
    rows = [i for i, line in enumerate(text.splitlines(keepends=True)) if line.startswith("{")]
    lines = text.splitlines(keepends=True)
    changed = list(lines)
    changed[rows[0]] = re.sub(r"hitcount: +(\d+)", lambda m: f"hitcount: {int(m[1]) + 5:>10}", changed[rows[0]])
    changed[rows[1]] = ""
    changed[rows[2]] = re.sub(r"(\w)( *\})", r"\g<1>9\2", changed[rows[2]], count=1)  # the last key's value
    return [text, "".join(changed), "".join(changed), text, text[text.rindex("# event histogram") :]]


@pytest.mark.parametrize("name", ["vread_ret.hist", "agent/open.hist", "lat.hist"])
def test_a_memo_carried_from_read_to_read_gives_what_a_fresh_parse_gives(name: str) -> None:
    memo: dict[tuple[str, ...], hist.RowMemo] = {}
    for text in _versions((HIST / name).read_text()):
        assert hist.parse(text, memo=memo) == hist.parse(text)
        kept = {line for line in text.splitlines() if line.startswith("{")}
        assert {line for m in memo.values() for line in m.rows} == kept  # this read's rows alone


def test_a_memo_is_kept_per_key_names() -> None:
    """The same row text under other keys cuts otherwise: `{ comm: x, a: 1 }` is one string key of `comm`."""
    row = "{ comm: x, a: 1 } hitcount:          3\n"
    tail = "\nTotals:\n    Hits: 3\n    Entries: 1\n    Dropped: 0\n"
    two = f"# trigger info: hist:keys=comm,a:vals=hitcount:size=2048 [active]\n{row}{tail}"
    one = two.replace("keys=comm,a:", "keys=comm:")
    memo: dict[tuple[str, ...], hist.RowMemo] = {}
    assert hist.parse(two, memo=memo)[0].rows[0].keys == ("x", "1")
    assert hist.parse(one, memo=memo)[0].rows[0].keys == ("x, a: 1",)
