"""The raw ring-buffer decoder on real pages from this kernel (6.18) and Debian's 6.1 (kernel lab).

Each fixture directory (tests/make_raw_fixtures.py) holds the pages read from per_cpu/cpuN/trace_pipe_raw,
the header and event formats needed to decode them, and the instance's `trace` text of the same
events read just before: every decoded event must be the text's line, field for field (thread, CPU,
timestamp to the microsecond the text shows, and the body the kernel printed).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

import raw_reference
from kprobe_exporter import parser
from kprobe_exporter.raw import formats as raw_formats
from kprobe_exporter.raw import pages as raw_pages
from raw_fixtures import ALL, K61, K618, after_ip, load, text_lines, usec

# --- every fixture: the decode is the kernel's own text ----------------------------------------


@pytest.mark.parametrize("path", ALL, ids=[f"{p.parent.name}/{p.name}" for p in ALL])
def test_decoded_events_are_the_kernels_text_of_the_same_events(path: Path) -> None:
    fx = load(path)
    b = fx.batch
    idx = np.flatnonzero(b.ev >= 0)
    text = text_lines(path)
    assert len(idx) == len(text) > 0
    assert not np.any(b.ev == raw_pages.EV_UNKNOWN)
    for i, t in zip(idx.tolist(), text, strict=True):
        ev = fx.probes.events[b.ev[i]]
        body = fx.body(i)
        assert (int(b.tid[i]), int(b.cpu[i]), usec(int(b.ts[i])) * 1000) == (t.tid, t.cpu, t.ts_ns), t
        if ev.kind in ("kprobe", "kretprobe"):
            assert body[:body.find(b"(")] == t.body[:t.body.find(b"(")]
            assert after_ip(body) == after_ip(t.body)
        else:
            assert body == t.body
        # and so the text path's own readers take the same args from both
        assert parser.arg_reader(ev)(body) == parser.arg_reader(ev)(t.body)
        # which are the args the raw path decodes from the record's fields, without any text
        assert fx.events.args(int(b.ev[i]), b.record(i)) == parser.arg_reader(ev)(t.body)
        if ev.is_return:
            assert parser.retval_of(ev, body) == parser.retval_of(ev, t.body)


@pytest.mark.parametrize("path", ALL, ids=[f"{p.parent.name}/{p.name}" for p in ALL])
def test_vectorised_decode_equals_the_event_by_event_reference(path: Path) -> None:
    fx = load(path)
    for _cpu, data in fx.pages.items():
        n = len(data) // fx.layout.page_size
        if not n:
            continue
        d = raw_pages.decode_pages(data, n, fx.layout)
        ref = []
        for p in range(n):
            page = data[p * fx.layout.page_size:(p + 1) * fx.layout.page_size]
            ref += [(ts, rec) for kind, ts, rec in raw_reference.decode_page_python(page, fx.layout) if kind == "data"]
        got = [(int(d.ts[i]), data[int(d.rec[i]):int(d.rec[i]) + int(d.rlen[i])]) for i in range(len(d.ts))]
        assert got == ref
        assert all(struct.unpack_from("<H", rec)[0] == t for (_, rec), t in zip(ref, d.etype.tolist(), strict=True))


# --- what each fixture was made to show ---------------------------------------------------------


def test_618_uprobe_and_syscall_pairs_decode_exactly() -> None:
    fx = load(K618 / "uprobes-syscalls")
    b = fx.batch
    names = [fx.probes.events[e].name for e in b.ev.tolist()]
    counts = {n: names.count(n) for n in sorted(set(names))}
    # 10 + 2 (failing) opens in main threads, 5 calls in each of 3 threads; syscall pairs from everyone
    assert counts["open_path"] == counts["open_path_ret"] == 27
    assert counts["compute"] == counts["compute_ret"] == 25
    # the capture script's own shell opened the `tracing_on` file: an enter whose exit came after the stop
    assert (counts["sys_enter_openat"], counts["sys_exit_openat"]) == (41, 40)
    first = names.index("compute")
    assert fx.body(first) == (b"compute: (0x%x) a=-5 b=12345 big=12345 sb=-5 hx=0x3039"
                             % struct.unpack_from("<Q", b.record(first), 8)[0])
    o = names.index("open_path")
    args = parser.arg_reader(fx.probes.events[b.ev[o]])(fx.body(o))
    assert args == {"path": b"/etc/hostname", "flags": b"0x0", "arr": b"{47,101,116,99}", "c": b"'/'"}
    failed = [i for i, n in enumerate(names) if n == "open_path_ret"
              and fx.body(i).endswith(b"ret=-1")]
    assert len(failed) == 2
    assert fx.body(names.index("sys_exit_openat")) == b"sys_openat -> 0x3"
    enter = fx.body(names.index("sys_enter_openat"))
    assert enter.startswith(b"sys_openat(dfd: 0xffffff9c, filename: 0x")  # 6.18: 0x, and values < 10 in decimal
    assert enter.endswith(b", flags: 0x80201, mode: 0)")  # the shell opening tracing_on: O_WRONLY|O_TRUNC|O_CLOEXEC
    # nanosecond timestamps, not multiples of 1000
    assert np.count_nonzero(b.ts % 1000) > len(b.ts) // 2
    assert np.all(np.diff(b.ts) >= 0)


def test_618_time_extend_carries_a_200ms_delta() -> None:
    fx = load(K618 / "time-extend")
    d = raw_pages.decode_pages(fx.pages[0], 1, fx.layout)
    assert d.extends == 3  # one per 200 ms sleep: the return comes 2^27 ns (134 ms) past its entry
    b = fx.batch
    names = [fx.probes.events[e].name for e in b.ev.tolist()]
    entries = [int(b.ts[i]) for i, n in enumerate(names) if n == "sleep_us"]
    exits = [int(b.ts[i]) for i, n in enumerate(names) if n == "sleep_us_ret"]
    assert len(entries) == len(exits) == 3
    text = {(t.token, t.ts_ns) for t in text_lines(fx.path)}
    for s, e in zip(entries, exits, strict=True):
        assert 200_000_000 < e - s < 260_000_000
        assert (b"sleep_us_ret:", usec(e) * 1000) in text and (b"sleep_us:", usec(s) * 1000) in text


def test_618_missed_events_are_counted_from_the_page_header() -> None:
    fx = load(K618 / "missed-events")
    d = raw_pages.decode_pages(fx.pages[1], len(fx.pages[1]) // 4096, fx.layout)
    overrun = int(fx.stats(1)["overrun"])
    assert overrun > 0
    assert d.missed.tolist() == [overrun, -1, -1]  # RB_MISSED_EVENTS|RB_MISSED_STORED, count after the data
    b = fx.batch
    assert int(b.ev[0]) == raw_pages.EV_LOST and int(b.cpu[0]) == 1 and int(b.rlen[0]) == overrun
    assert int(b.ts[0]) <= int(b.ts[1])
    assert len(b) == 1 + int(fx.stats(1)["entries"])


def test_618_eight_kib_subbuffers_and_long_records() -> None:
    fx = load(K618 / "subbuf8k-long-records")
    assert fx.layout.page_size == 8192 and fx.meta["subbuf_kb"] == "8"
    d = raw_pages.decode_pages(fx.pages[0], 2, fx.layout)
    long_recs = d.rlen > 4 * raw_pages.TYPE_DATA_MAX  # past type_len: length in array[0]
    assert int(long_recs.sum()) == 60
    i = int(np.flatnonzero(fx.batch.ev == 0)[0])
    path = parser.arg_reader(fx.probes.events[0])(fx.body(i))["path"]
    assert path == b"/tmp/" + b"long-path-" * 20 + b"x"


def test_61_kprobes_kretprobes_and_syscalls_decode_exactly() -> None:
    fx = load(K61 / "kprobes-syscalls")
    assert fx.meta["release"] == "6.1.0-56-amd64"
    b = fx.batch
    names = [fx.probes.events[e].name for e in b.ev.tolist()]
    i = names.index("open")
    body = fx.body(i)
    args = parser.arg_reader(fx.probes.events[b.ev[i]])(body)
    assert args["dfd"] == b"-100" and args["how"].startswith(b"0x")
    ret = [parser.retval_of(fx.probes.events[b.ev[j]], fx.body(j)) for j, n in enumerate(names)
           if n == "open_ret"]
    assert b"-2" in ret and b"3" in ret  # ENOENT from the failing opens
    enter = fx.body(names.index("sys_enter_openat"))
    assert enter.startswith(b"sys_openat(dfd: ffffff9c, filename: ")  # 6.1 prints %lx, no 0x
    assert fx.body(names.index("sys_exit_openat")) == b"sys_openat -> 0x3"
    assert int(np.count_nonzero(b.rlen > 4 * raw_pages.TYPE_DATA_MAX)) >= 1


def test_61_time_extend_and_missed_events() -> None:
    fx = load(K61 / "time-extend")
    assert raw_pages.decode_pages(fx.pages[0], 1, fx.layout).extends == 3
    fx = load(K61 / "missed-events")
    d = raw_pages.decode_pages(fx.pages[1], len(fx.pages[1]) // 4096, fx.layout)
    assert d.missed[0] == int(fx.stats(1)["overrun"]) > 0
    assert (d.missed[1:] == -1).all()


# --- event types no capture produced: made from a real page ----------------------------------------


def _page(events: list[bytes], ts: int, commit_flags: int = 0, layout: raw_formats.PageLayout | None = None,
          tail: bytes = b"") -> bytes:
    layout = layout or raw_formats.PageLayout()
    data = b"".join(events)
    hdr = struct.pack("<QQ", ts, len(data) | commit_flags)
    return (hdr + data + tail).ljust(layout.page_size, b"\0")


def _hdr(type_len: int, delta: int) -> bytes:
    return struct.pack("<I", type_len | (delta << 5))


def test_absolute_timestamp_padding_and_empty_padding() -> None:
    fx = load(K618 / "uprobes-syscalls")
    rec = fx.batch.record(0)  # a real record (sys_enter_openat: 48 bytes)
    assert len(rec) == 48
    events = [
        _hdr(12, 100) + rec,  # ts + 100
        _hdr(raw_pages.TYPE_PADDING, 1) + struct.pack("<I", 16) + b"\0" * 12,  # discarded: array[0] + 4 bytes
        _hdr(raw_pages.TYPE_TIME_STAMP, 5) + struct.pack("<I", 3),  # absolute: 3 << 27 | 5
        _hdr(12, 7) + rec,
        _hdr(raw_pages.TYPE_TIME_EXTEND, 1) + struct.pack("<I", 2),  # + (2 << 27 | 1)
        _hdr(0, 0) + struct.pack("<I", 52) + rec,  # a long-form header: array[0] = 48 + 4
        _hdr(raw_pages.TYPE_PADDING, 0),  # empty padding: the rest of the page is nothing
        _hdr(12, 9) + rec,  # never read
    ]
    page = _page(events, 1_000_000)
    d = raw_pages.decode_pages(page, 1, raw_formats.PageLayout())
    t2 = (3 << 27) + 5 + 7
    assert d.ts.tolist() == [1_000_100, t2, t2 + (2 << 27) + 1]
    assert d.rlen.tolist() == [48, 48, 48] and d.stamps == 1 and d.extends == 1 and d.paddings == 2
    ref = raw_reference.decode_page_python(page, raw_formats.PageLayout())
    assert [(ts, r) for k, ts, r in ref if k == "data"] == [(int(t), rec) for t in d.ts]


def test_missed_flag_without_a_stored_count() -> None:
    rec = load(K618 / "uprobes-syscalls").batch.record(0)
    page = _page([_hdr(12, 1) + rec], 50, raw_pages.RB_MISSED_EVENTS)
    d = raw_pages.decode_pages(page, 1, raw_formats.PageLayout())
    assert d.missed.tolist() == [0] and d.ts.tolist() == [51]
    stored = _page([_hdr(12, 1) + rec], 50, raw_pages.RB_MISSED_EVENTS | raw_pages.RB_MISSED_STORED,
                   tail=struct.pack("<Q", 1234))
    assert raw_pages.decode_pages(stored, 1, raw_formats.PageLayout()).missed.tolist() == [1234]


def test_a_commit_beyond_the_page_is_a_format_error() -> None:
    page = struct.pack("<QQ", 1, 5000).ljust(4096, b"\0")
    with pytest.raises(raw_formats.FormatError):
        raw_pages.decode_pages(page, 1, raw_formats.PageLayout())


# --- merging CPUs and holding events back -----------------------------------------------------------


def test_cpus_merge_in_time_order_and_held_events_keep_their_records() -> None:
    fx = load(K618 / "uprobes-syscalls")
    b = fx.batch
    assert set(b.cpu.tolist()) == {0, 1}
    assert np.all(np.diff(b.ts) >= 0)
    cut = len(b) // 2
    head = raw_pages.slice_batch(b, 0, cut)
    held = raw_pages.compact_batch(raw_pages.slice_batch(b, cut, len(b)))
    assert len(held.data) == int(b.rlen[cut:].sum()) < len(b.data)
    again = raw_pages.merge_batches(held, raw_pages.empty_batch())
    for i in range(len(held)):
        assert again.record(i) == b.record(cut + i)
    merged = raw_pages.merge_batches(held, head)
    assert merged.ts.tolist() == b.ts.tolist()
    assert [merged.record(i) for i in range(len(merged))] == [b.record(i) for i in range(len(b))]


COLUMNS = ("ev", "tid", "ts", "cpu", "rec", "rlen")


def test_empty_compacted_and_merged_batches_keep_the_decoded_columns() -> None:
    """What the reader holds between reads: nothing (empty_batch), the events past the watermark with a
    loss marker among them (compact_batch: their records only), and held + new merged by time, ties in
    the held batch's favour (merge_batches); always the decoder's own column types."""
    b = load(K618 / "missed-events").batch
    dtypes = [getattr(b, c).dtype for c in COLUMNS]
    e = raw_pages.empty_batch()
    assert [getattr(e, c).dtype for c in COLUMNS] == dtypes and [len(getattr(e, c)) for c in COLUMNS] == [0] * 6
    assert e.data == b""
    lost = int(np.flatnonzero(b.ev == raw_pages.EV_LOST)[0])
    part = raw_pages.slice_batch(b, max(0, lost - 5), min(len(b), lost + 5))
    c = raw_pages.compact_batch(part)
    is_rec = part.ev != raw_pages.EV_LOST
    assert [getattr(c, col).dtype for col in COLUMNS] == dtypes
    assert len(c.data) == int(part.rlen[is_rec].sum()) < len(part.data)
    assert [c.record(i) for i in np.flatnonzero(is_rec)] == [part.record(i) for i in np.flatnonzero(is_rec)]
    assert c.rlen.tolist() == part.rlen.tolist()  # a loss marker's count kept
    # two batches of 40 events, four at each stamp: numpy's unstable sort scrambles such ties
    a = raw_pages.slice_batch(b, 0, 40)
    ts = np.repeat(np.arange(10, dtype=np.int64), 4)
    held = raw_pages.Batch(a.ev, np.arange(40, dtype=np.int32), ts, a.cpu, a.rec, a.rlen, a.data)
    new = raw_pages.Batch(a.ev, np.arange(40, 80, dtype=np.int32), ts, a.cpu, a.rec, a.rlen, a.data)
    m = raw_pages.merge_batches(held, new)
    assert [getattr(m, col).dtype for col in COLUMNS] == dtypes
    assert m.tid.tolist() == [t for k in range(10) for t in [*range(4 * k, 4 * k + 4), *range(40 + 4 * k, 44 + 4 * k)]]
    assert [m.record(i) for i in range(80) if m.ev[i] != raw_pages.EV_LOST] == \
        [a.record(i % 40) for i in m.tid.tolist() if a.ev[i % 40] != raw_pages.EV_LOST]


# --- random pages written from the kernel's page and event format ----------------------------------


class _PageWriter:
    """Writes ring-buffer pages as kernel/trace/ring_buffer.c lays them out, keeping what a reader must
    get back from each: data events (timestamp, record, common_type, common_pid), the time-extend,
    absolute-stamp and padding events (empty ones included), and the lost-events count of the header."""

    def __init__(self, seed: int, layout: raw_formats.PageLayout) -> None:
        import random

        self.rng = random.Random(seed)
        self.layout = layout

    def record(self) -> bytes:
        rng = self.rng
        n = 4 * (rng.randint(2, 28) if rng.random() < 0.7 else rng.randint(29, 150))
        head = struct.pack("<HBBi", rng.choice([7, 300, 2049, 65535]), 1, 0, rng.randint(1, 4_194_304))
        return head + rng.randbytes(n - 8)

    def page(self, page_ts: int, empty: bool = False, ordered: bool = False) -> tuple[bytes, dict]:
        rng, lay = self.rng, self.layout
        ts, data = page_ts, b""
        out: dict = {"page_ts": page_ts, "data": [], "extends": 0, "stamps": 0, "paddings": 0}
        budget = 0 if empty else (lay.data_size if rng.random() < 0.3 else 4 * rng.randint(3, lay.data_size // 8))
        while len(data) < budget:
            rem = budget - len(data)
            kind = rng.random()
            if rem == 4 or (kind < 0.03 and rem > 4):  # an empty padding: the page ends, whatever follows
                data += _hdr(raw_pages.TYPE_PADDING, 0)
                out["paddings"] += 1
                # past it, words a walk that did not stop would take: array[0] = 4, then a data event
                data += (struct.pack("<I", 4) + _hdr(3, 1) + self.record()[:12] + rng.randbytes(rem))[:rem - 4]
                break
            if rem == 8 or kind < 0.12:  # time extend: the delta did not fit 27 bits
                v = rng.randrange(1 << 27, 1 << 40)
                data += _hdr(raw_pages.TYPE_TIME_EXTEND, v & ((1 << 27) - 1)) + struct.pack("<I", v >> 27)
                ts += v
                out["extends"] += 1
            elif kind < 0.2:  # absolute timestamp, its top bits from the page's
                low = ts & ((1 << 59) - 1)
                lo, hi = (low, low + (1 << 30)) if ordered else (page_ts & ((1 << 59) - 1), 1 << 59)
                v = rng.randrange(lo, hi)
                data += _hdr(raw_pages.TYPE_TIME_STAMP, v & ((1 << 27) - 1)) + struct.pack("<I", v >> 27)
                ts = v | (page_ts & raw_pages.TS_MSB)
                out["stamps"] += 1
            elif kind < 0.28:  # padding (a discarded event): array[0] bytes follow the header
                n = 4 * rng.randint(1, min(40, rem // 4 - 1))
                data += _hdr(raw_pages.TYPE_PADDING, rng.randint(1, 99)) + struct.pack("<I", n) + rng.randbytes(n - 4)
                out["paddings"] += 1
            elif kind < 0.3:  # 4 bytes cannot hold the common fields: no event, but its delta counts
                delta = rng.randrange(1 << 27)
                data += _hdr(1, delta) + rng.randbytes(4)
                ts += delta
            else:
                rec = self.record()
                if len(rec) + 8 > rem:
                    rec = rec[:max(8, (rem - 8) // 4 * 4)] if rem >= 16 else rec[:rem - 4]
                delta = rng.choice([0, 1, rng.randrange(1 << 27)])
                ts += delta
                if len(rec) > 4 * raw_pages.TYPE_DATA_MAX or (rng.random() < 0.1 and len(rec) + 8 <= rem):
                    data += _hdr(0, delta) + struct.pack("<I", len(rec) + 4) + rec
                else:
                    data += _hdr(len(rec) // 4, delta) + rec
                etype, pid = struct.unpack_from("<Hxxi", rec)
                out["data"].append((ts, rec, etype, pid))
        commit = len(data)
        torn = out["data"] and data.endswith(out["data"][-1][1]) and rng.random() < 0.1
        if torn:  # the commit ends inside the last record: that record is not taken
            commit -= 4 * rng.randint(1, len(out["data"][-1][1]) // 4)
            out["data"].pop()
        flags, tail, out["missed"] = 0, b"", -1
        if rng.random() < 0.25:
            flags, out["missed"] = raw_pages.RB_MISSED_EVENTS, 0
            if len(data) + lay.commit_size <= lay.data_size and not torn and rng.random() < 0.7:
                # the count is a long after the data (ring_buffer.c rb_read_page)
                out["missed"] = rng.choice([1, 4321, 1 << 33 if lay.commit_size == 8 else (1 << 32) - 1])
                flags |= raw_pages.RB_MISSED_STORED
                tail = out["missed"].to_bytes(lay.commit_size, "little")
        out["len"], out["last"] = commit, ts
        # what lies past the commit is a previous use of the page: headers a reader must not take
        stale = b"".join(rng.choice([_hdr(raw_pages.TYPE_TIME_EXTEND, 3) + struct.pack("<I", 1),
                                     _hdr(raw_pages.TYPE_PADDING, 5) + struct.pack("<I", 4),
                                     _hdr(raw_pages.TYPE_TIME_STAMP, 1) + struct.pack("<I", 9),
                                     _hdr(3, 1) + self.record()[:12]]) for _ in range(40))
        # commit is a local_t (a long): RB_MISSED_EVENTS, an int (1 << 31), sign-extends into a 64-bit one
        high = 0xFFFFFFFF << 32 if flags & raw_pages.RB_MISSED_EVENTS and lay.commit_size == 8 else 0
        head = bytearray(lay.data_off)
        head[lay.ts_off:lay.ts_off + 8] = page_ts.to_bytes(8, "little")
        word = (commit | flags | high).to_bytes(lay.commit_size, "little")
        head[lay.commit_off:lay.commit_off + lay.commit_size] = word
        page = bytes(head) + data[:commit] + tail + data[commit + len(tail):] + stale
        return page[:lay.page_size].ljust(lay.page_size, b"\0"), out


def _run(w: _PageWriter, n: int, ordered: bool = False) -> tuple[bytes, list[dict]]:
    """n pages; `ordered`: in time order, as one CPU's pages are (each page starts where the last ended)."""
    pages: list[tuple[bytes, dict]] = []
    for _ in range(n):
        ts = w.rng.choice([w.rng.randrange(1 << 40), w.rng.randrange(1 << 62)])
        if ordered:
            ts = (pages[-1][1]["last"] if pages else 1000) + w.rng.choice([0, 1, 999])
        pages.append(w.page(ts, empty=w.rng.random() < 0.1, ordered=ordered))
    return b"".join(p for p, _ in pages), [e for _, e in pages]


LAYOUTS = [raw_formats.PageLayout(), raw_formats.PageLayout(data_size=8192 - 16),
           raw_formats.PageLayout(commit_size=4, data_off=12, data_size=4096 - 12)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["4k", "8k", "32-bit"])
def test_random_pages_decode_to_what_was_written(layout: raw_formats.PageLayout) -> None:
    """Runs of 1-12 pages (every event type, full pages ending in an empty padding or an event in their
    last words, empty pages, stale headers past the commit, lost-events flags with and without a count)
    decoded in one call, at an offset in the buffer: each page's header fields, and every data event's
    timestamp, record, type and thread, and the counts of extends, stamps and paddings."""
    w = _PageWriter(612, layout)
    for _ in range(40):
        n = w.rng.randint(1, 12)
        buf, want = _run(w, n)
        skip = w.rng.choice([0, 1, 3]) * layout.page_size
        d = raw_pages.decode_pages(w.rng.randbytes(skip) + buf, n, layout, skip)
        assert d.page_ts.tolist() == [p["page_ts"] for p in want]
        assert d.page_len.tolist() == [p["len"] for p in want]
        assert d.missed.tolist() == [p["missed"] for p in want]
        assert (d.extends, d.stamps, d.paddings) == tuple(sum(p[k] for p in want) for k in
                                                          ("extends", "stamps", "paddings"))
        events = [(i, *e) for i, p in enumerate(want) for e in p["data"]]
        buf = bytes(skip) + buf
        assert [(int(d.page[i]), int(d.ts[i]), buf[int(d.rec[i]):int(d.rec[i]) + int(d.rlen[i])], int(d.etype[i]),
                 int(d.pid[i])) for i in range(len(d.ts))] == events
        assert [x.dtype for x in (d.ts, d.etype, d.pid, d.rec, d.rlen, d.page, d.page_ts, d.page_len, d.missed)] == [
            np.int64, np.int32, np.int32, np.int64, np.int32, np.int32, np.int64, np.int32, np.int64]


def test_random_cpus_merge_by_time_with_loss_markers() -> None:
    """Per-CPU runs of random pages merged: every event once, in timestamp order, ties in CPU order, a
    loss marker (EV_LOST, its count capped to int32, 0 when not stored) at its page's header time right
    before that page's events; event ids through the probe set's table (-1 for an id it has not)."""
    layout = raw_formats.PageLayout()
    w = _PageWriter(61, layout)
    lut = np.full(65536, raw_pages.EV_UNKNOWN, np.int32)
    lut[[7, 300, 2049]] = [0, 1, 2]
    for _ in range(25):
        cpus, buf, want = [], b"", []
        for cpu in w.rng.sample(range(8), w.rng.randint(1, 4)):
            n = w.rng.choice([0, 1, 2, 5])
            run, pages = _run(w, n, ordered=True)
            cpus.append((cpu, len(buf), n))
            buf += run
            for p in pages:
                if p["missed"] >= 0:
                    want.append((p["page_ts"], raw_pages.EV_LOST, 0, cpu, b"", min(p["missed"], 2**31 - 1)))
                want += [(ts, int(lut[et]), pid, cpu, rec, len(rec)) for ts, rec, et, pid in p["data"]]
        # same-time events across CPUs: the stable sort keeps the lower position (CPU listed first)
        want.sort(key=lambda e: e[0])
        b = raw_pages.batch_from_pages(buf, cpus, layout, lut)
        got = [(int(b.ts[i]), int(b.ev[i]), int(b.tid[i]), int(b.cpu[i]),
                b"" if b.ev[i] == raw_pages.EV_LOST else b.record(i), int(b.rlen[i])) for i in range(len(b))]
        assert got == want
        assert [x.dtype for x in (b.ev, b.tid, b.ts, b.cpu, b.rec, b.rlen)] == [
            np.int32, np.int32, np.int64, np.int32, np.int64, np.int32]
        assert b.data == (buf if want else b"")


def _raw_page(commit: int, high: int = 0) -> bytes:
    return struct.pack("<QII", 77, commit, high).ljust(4096, b"\0")


def test_page_headers_refuse_what_no_kernel_writes() -> None:
    """A commit beyond the data or not a multiple of 4 (events are 4-byte aligned), and a 64-bit commit
    whose high word is neither 0 nor the sign extension of RB_MISSED_EVENTS, are no ring-buffer page:
    FormatError, naming the first bad page and its commit. A full page and the flags' own high word are fine."""
    lay = raw_formats.PageLayout()

    def decode(*pages: bytes) -> raw_pages.Decoded:
        return raw_pages.decode_pages(b"".join(pages), len(pages), lay)

    full, small = _raw_page(4080), _raw_page(12)
    assert decode(full, small).page_len.tolist() == [4080, 12]
    flagged = _raw_page(12 | raw_pages.RB_MISSED_EVENTS, 0xFFFFFFFF)
    assert decode(small, flagged).missed.tolist() == [-1, 0]
    high = "a page's commit field has bits above 32 set"
    two_bad = (full, small, _raw_page(4100), _raw_page(6))
    for bad, text in [(two_bad, "page 2: commit 4100 does not fit a 4080-byte page"),
                      ((small, _raw_page(6)), "page 1: commit 6 does not fit a 4080-byte page"),
                      ((_raw_page(4084),), "page 0: commit 4084 does not fit a 4080-byte page"),
                      ((small, _raw_page(12, 1)), high),
                      ((_raw_page(12 | raw_pages.RB_MISSED_EVENTS, 0x1),), high),
                      ((_raw_page(12, 0xFFFFFFFF),), high)]:
        with pytest.raises(raw_formats.FormatError) as e:
            decode(*bad)
        assert str(e.value) == text
