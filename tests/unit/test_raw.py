"""The raw ring-buffer decoder on real pages from this kernel (6.18) and Debian's 6.1 (kernel lab).

Each fixture directory (tests/make_raw_fixtures.py) holds the pages read from per_cpu/cpuN/trace_pipe_raw,
the header and event formats needed to decode them, and the instance's `trace` text of the same
events read just before: every decoded event must be the text's line, field for field (thread, CPU,
timestamp to the microsecond the text shows, and the body the kernel printed).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import raw_reference
from kprobe_exporter import config, parser, probes
from kprobe_exporter.probes import ProbeSet
from kprobe_exporter.raw import args as raw_args
from kprobe_exporter.raw import formats as raw_formats
from kprobe_exporter.raw import pages as raw_pages

RAW = Path(__file__).resolve().parents[1] / "fixtures" / "raw"
K618 = RAW / "linux-6.18"
K61 = RAW / "linux-6.1-debian"
ALL = sorted(p for p in RAW.glob("*/*") if (p / "meta.json").exists())


@dataclass
class Fixture:
    path: Path
    meta: dict[str, object]
    probes: ProbeSet
    layout: raw_formats.PageLayout
    events: raw_args.RawEvents
    pages: dict[int, bytes]  # per CPU, its pages concatenated
    batch: raw_pages.Batch

    def body(self, i: int) -> bytes:
        """The kernel's text of event i from its name on, rendered from its record."""
        e = int(self.batch.ev[i])
        fmt = self.events.formats[e]
        assert fmt is not None
        return raw_reference.make_renderer(self.probes.events[e], fmt, self.events.kernel)(self.batch.record(i))

    def stats(self, cpu: int) -> dict[str, str]:
        text = (self.path / f"cpu{cpu}.stats").read_text()
        return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def probe_set(sc: dict[str, object]) -> ProbeSet:
    """The config that installs a scenario's events, as the agent would build it."""
    lines = [f"instance: {sc['instance']}", "probes:"]
    defs = {line.split()[0].split(":", 1)[1]: line for _, line in sc["definitions"]}  # type: ignore[attr-defined]
    for ev in sc["events"]:  # type: ignore[attr-defined]
        if ev in defs:
            letter, rest = defs[ev].split(":", 1)
            name_part, tail = rest.split(" ", 1)
            lines.append(f"  - raw: '{letter}:{name_part.split('/')[1]} {tail}'")
        else:
            lines.append(f"  - tracepoint: {ev}")
    return probes.build_probe_set(config.load_text("\n".join(lines) + "\n"), resolve=None)


def load(path: Path) -> Fixture:
    meta = json.loads((path / "meta.json").read_text())
    ps = probe_set(meta["scenario"])
    layout = raw_formats.parse_header_page((path / "header_page").read_text())
    raw_formats.check_header_event((path / "header_event").read_text())
    formats = []
    for ev in ps.events:
        group, name = (ev.group, ev.name) if ev.dynamic else ev.target.split("/")
        formats.append(raw_formats.parse_format((path / "events" / group / name / "format").read_text()))
    events = raw_args.RawEvents(ps, formats, raw_formats.kernel_version(meta["release"]))
    pages = {int(f.stem[3:]): f.read_bytes() for f in sorted(path.glob("cpu*.raw"))}
    runs, off = [], 0
    for cpu, data in pages.items():
        runs.append((cpu, off, len(data) // layout.page_size))
        off += len(data)
    batch = raw_pages.batch_from_pages(b"".join(pages.values()), runs, layout, events.lut)
    return Fixture(path, meta, ps, layout, events, pages, batch)


def text_lines(path: Path) -> list[parser.TraceLine]:
    raw = (path / "trace.txt").read_bytes().split(b"\n")
    return [parser.parse_line(x) for x in raw if x and not x.startswith(b"#")]


def usec(ts_ns: int) -> int:
    """The text's microseconds: the kernel rounds (ns2usecs adds 500 before dividing)."""
    return (ts_ns + 500) // 1000


def after_ip(body: bytes) -> bytes:
    """A probe body from its args on: a kprobe's ip prints as `sym+off/size` in text, as hex here."""
    return body[body.find(b")") + 1:]


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


# --- formats ----------------------------------------------------------------------------------------


def test_header_page_layouts() -> None:
    usual = raw_formats.PageLayout()
    assert raw_formats.parse_header_page((K618 / "uprobes-syscalls" / "header_page").read_text()) == usual
    assert raw_formats.parse_header_page((K61 / "missed-events" / "header_page").read_text()) == usual
    big = raw_formats.parse_header_page((K618 / "subbuf8k-long-records" / "header_page").read_text())
    assert (big.data_off, big.data_size, big.page_size) == (16, 8176, 8192)
    with pytest.raises(raw_formats.FormatError):
        raw_formats.parse_header_page("\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n")


def test_header_event_must_be_the_known_encoding() -> None:
    raw_formats.check_header_event((K61 / "missed-events" / "header_event").read_text())
    text = (K618 / "missed-events" / "header_event").read_text()
    with pytest.raises(raw_formats.FormatError, match="type_len"):
        raw_formats.check_header_event(text.replace("5 bits", "6 bits"))


def test_format_fields_data_loc_and_arrays() -> None:
    text = (K618 / "uprobes-syscalls" / "events" / "kpe_rawcap" / "open_path" / "format").read_text()
    fmt = raw_formats.parse_format(text)
    path, arr, c = fmt.field("path"), fmt.field("arr"), fmt.field("c")
    assert path is not None and path.data_loc and path.size == 4
    assert arr is not None and (arr.count, arr.elem_size, arr.offset) == (4, 1, 24)
    assert c is not None and (c.size, c.signed) == (1, False)
    assert [f.name for f in fmt.own_fields] == ["__probe_ip", "path", "flags", "arr", "c"]
    with pytest.raises(raw_formats.FormatError):
        raw_formats.parse_format("name: x\nID: 5\nformat:\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n")


def test_printf_renderer_for_a_plain_tracepoint() -> None:
    text = """name: demo
ID: 900
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:int prio;\toffset:12;\tsize:4;\tsigned:1;
\tfield:unsigned long addr;\toffset:16;\tsize:8;\tsigned:0;

print fmt: "comm=%s prio=%d addr=0x%08lx neg=%u pct=100%%", __get_str(comm), REC->prio, REC->addr, \
((unsigned int)(REC->prio))
"""
    fmt = raw_formats.parse_format(text)
    ev = probes.EventSpec("demo", "tracepoint", "g", "g/demo", "demo", None, key=b"demo:")
    render = raw_reference.make_renderer(ev, fmt, (6, 18))
    rec = struct.pack("<HBBiIiQ", 900, 0, 0, 42, (6 << 16) | 24, -3, 0xBEEF) + b"hello\0"
    assert render(rec) == b"demo: comm=hello prio=-3 addr=0x0000beef neg=4294967293 pct=100%"
    odd = text.replace('"comm=%s', '"f=%pS comm=%s').replace("__get_str(comm)", "REC->addr, __get_str(comm)")
    with pytest.raises(raw_formats.FormatError):
        raw_reference.make_renderer(ev, raw_formats.parse_format(odd), (6, 18))


def test_args_needed_and_require_decoders() -> None:
    ps = probes.build_probe_set(config.load_text(
        "probes:\n  - name: s\n    kprobe: f\n    args: {p: '$arg1:symbol'}\n    labels: [p]\n"
        "  - name: t\n    kprobe: g\n    latency: true\n"), resolve=None)
    assert raw_args.args_needed(ps, spans=False) == ["s"]
    fmt_s = raw_formats.parse_format(
        "name: s\nID: 7\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
        "\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;\n"
        "\tfield:u64 p;\toffset:16;\tsize:8;\tsigned:0;\n\n"
        'print fmt: "(%lx) p=%pS", REC->__probe_ip, REC->p\n')
    fmt_t = raw_formats.parse_format(
        "name: t\nID: 8\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
        "\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;\n\n"
        'print fmt: "(%lx)", REC->__probe_ip\n')
    fmt_r = raw_formats.parse_format(
        "name: t_ret\nID: 9\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
        "\tfield:unsigned long __probe_func;\toffset:8;\tsize:8;\tsigned:0;\n"
        "\tfield:unsigned long __probe_ret_ip;\toffset:16;\tsize:8;\tsigned:0;\n"
        "\tfield:u64 ret;\toffset:24;\tsize:8;\tsigned:0;\n\n"
        'print fmt: "(%lx <- %lx) ret=0x%Lx", REC->__probe_func, REC->__probe_ret_ip, REC->ret\n')
    events = raw_args.RawEvents(ps, [fmt_s, fmt_t, fmt_r], (6, 1))
    assert "s" in events.decode_errors
    events.require_decoders(["t", "t_ret"])
    with pytest.raises(raw_formats.RawUnsupported, match="s:"):
        events.require_decoders(raw_args.args_needed(ps, spans=False))
    assert events.lut[9] == 2 and events.lut[10] == raw_pages.EV_UNKNOWN


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


def test_load_layout_follows_the_instances_subbuffers(tmp_path: Path) -> None:
    inst, root = tmp_path / "inst", tmp_path / "root"
    for d, fx in ((inst, "subbuf8k-long-records"), (root, "uprobes-syscalls")):
        (d / "events").mkdir(parents=True)
        for f in ("header_page", "header_event"):
            (d / "events" / f).write_text((K618 / fx / f).read_text())
    assert raw_formats.load_layout(inst, root).page_size == 8192
    (inst / "events" / "header_page").unlink()
    (inst / "buffer_subbuf_size_kb").write_text("8\n")
    with pytest.raises(raw_formats.FormatError, match="8 KiB"):
        raw_formats.load_layout(inst, root)  # the root's 4 KiB pages would misread 8 KiB sub-buffers
    (inst / "buffer_subbuf_size_kb").write_text("4\n")
    assert raw_formats.load_layout(inst, root).page_size == 4096
