"""Raw reader: the instance's per-CPU ring buffers (`per_cpu/cpuN/trace_pipe_raw`) page by page, in binary.

The text path lets the kernel format every event inside our read() of `trace_pipe`; that caps even
`cat` at about 1M lines/s here and keeps only microseconds. The raw pages carry the events as the
probes wrote them, with nanosecond timestamps, and cost the kernel one page swap per read.

What is in a page (the layouts are read from `events/header_page` and `events/header_event`):

    page header   u64 timestamp | local_t commit (bytes of data; bit 31 RB_MISSED_EVENTS: events were
                  lost before this page, bit 30 RB_MISSED_STORED: their count is stored after the data)
    data          events, 4-byte aligned, each with a u32 header: type_len (5 bits), time_delta (27 bits)
                    type_len 1..28   data of 4*type_len bytes follows
                    type_len 0       u32 array[0] = data length + 4, then the data
                    type_len 29      padding: time_delta 0 ends the page, else array[0] + 4 bytes to skip
                    type_len 30      time extend: delta = array[0] << 27 | time_delta
                    type_len 31      absolute timestamp, same encoding
    event data    the fields of `events/GROUP/NAME/format`: common_type (the event id we dispatch on),
                  common_flags, common_preempt_count, common_pid (the thread id), then the event's own.

How it is decoded (`decode_pages`): the event chain of a page is sequential (each header gives the next
one's offset), so all pages of a batch are walked in lock step with numpy, one event of every page per
step, marking event starts in a bitmap; everything after that (timestamps by a segmented cumulative
sum, ids, pids, record offsets) is whole-array work. A batch of a few hundred pages costs about as
many numpy calls as one page, so the cost per event falls as the load rises.

Args are not decoded on the hot path at all: counting and pairing need only the id, the pid and the
timestamp. Where a label or a span needs them, `Renderer` turns one record into exactly the text the
kernel would have printed for it, and the text path's own arg readers take it from there, so both
readers give the same args by construction (and the tests check it against the kernel's text).
"""

from __future__ import annotations

import errno
import os
import re
import select
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kprobe_exporter import labels
from kprobe_exporter.events import EventBatch
from kprobe_exporter.probes import EventSpec, ProbeSet
from kprobe_exporter.reader import ReaderError
from kprobe_exporter.tasks import Tasks

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
U32 = npt.NDArray[np.uint32]
Bool = npt.NDArray[np.bool_]

RB_MISSED_EVENTS = 1 << 31
RB_MISSED_STORED = 1 << 30
COMMIT_MASK = RB_MISSED_STORED - 1
TS_SHIFT = 27
TS_MSB = 0xF << 59

TYPE_PADDING = 29
TYPE_TIME_EXTEND = 30
TYPE_TIME_STAMP = 31
TYPE_DATA_MAX = 28

# Special values of Batch.ev besides an index into ProbeSet.events.
EV_UNKNOWN = -1  # an event id this probe set does not have
EV_LOST = -2  # the kernel lost events on `cpu` before this point: `rlen` holds the count (0 when not stored)

# Instance clocks with a userspace clock to compare against (for the cross-CPU merge watermark).
CLOCKS = {"mono": time.CLOCK_MONOTONIC, "mono_raw": time.CLOCK_MONOTONIC_RAW, "boot": time.CLOCK_BOOTTIME}
if hasattr(time, "CLOCK_TAI"):
    CLOCKS["tai"] = time.CLOCK_TAI


class RawUnsupported(Exception):
    """The raw reader cannot serve this instance or probe set; the message says why (the text reader can)."""


class FormatError(RawUnsupported):
    """A header or event format file this decoder does not understand."""


# --- header and event formats ---------------------------------------------------------------

_FIELD_RE = re.compile(
    r"^\s*field:\s*(?P<decl>[^;]*?)\s*;\s*offset:\s*(?P<off>\d+)\s*;\s*size:\s*(?P<size>\d+)\s*;"
    r"(?:\s*signed:\s*(?P<signed>-?\d+)\s*;)?",
    re.MULTILINE,
)


@dataclass(frozen=True)
class PageLayout:
    """Where a ring-buffer page keeps its timestamp, commit and data (from `events/header_page`)."""

    ts_off: int = 0
    commit_off: int = 8
    commit_size: int = 8
    data_off: int = 16
    data_size: int = 4080

    @property
    def page_size(self) -> int:
        return self.data_off + self.data_size


def parse_header_page(text: str) -> PageLayout:
    fields = {m.group("decl").split()[-1]: (int(m.group("off")), int(m.group("size")))
              for m in _FIELD_RE.finditer(text)}
    try:
        ts_off, ts_size = fields["timestamp"]
        commit_off, commit_size = fields["commit"]
        data_off, data_size = fields["data"]
    except KeyError as e:
        raise FormatError(f"header_page has no field {e.args[0]!r}") from None
    if ts_size != 8 or commit_size not in (4, 8) or ts_off % 4 or commit_off % 4 or data_off % 8:
        raise FormatError(f"header_page layout not understood: timestamp {ts_off}/{ts_size}, "
                          f"commit {commit_off}/{commit_size}, data {data_off}/{data_size}")
    if (data_off + data_size) % 4096 or data_size <= 0:
        raise FormatError(f"header_page: a page of {data_off + data_size} bytes is not whole 4 KiB pages")
    return PageLayout(ts_off, commit_off, commit_size, data_off, data_size)


def check_header_event(text: str) -> None:
    """The compressed event header this decoder implements; anything else is a FormatError."""
    want = {
        "type_len": r"type_len\s*:\s*5 bits",
        "time_delta": r"time_delta\s*:\s*27 bits",
        "padding": r"padding\s*:\s*type == 29",
        "time_extend": r"time_extend\s*:\s*type == 30",
        "data max": r"data max type_len\s*==\s*28",
    }
    missing = [name for name, pat in want.items() if not re.search(pat, text)]
    # "time_stamp : type == 31" appeared with absolute timestamps (4.x); older kernels lack it
    if missing:
        raise FormatError(f"header_event not understood ({', '.join(missing)})")


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str  # the declared type without the name: "int", "unsigned long", "__data_loc char[]", "u8[]"
    offset: int
    size: int
    signed: bool
    data_loc: bool = False  # u32: offset of the data in the record (low 16 bits), length (high 16)
    count: int = 1  # array elements (size / element size)

    @property
    def elem_size(self) -> int:
        return self.size // self.count if self.count else self.size


@dataclass(frozen=True)
class EventFormat:
    name: str
    id: int
    fields: tuple[Field, ...]
    print_fmt: str

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    @property
    def own_fields(self) -> tuple[Field, ...]:
        """The fields after the common ones."""
        return tuple(f for f in self.fields if not f.name.startswith("common_"))


_ELEM_SIZES = {"char": 1, "u8": 1, "s8": 1, "u16": 2, "s16": 2, "short": 2, "u32": 4, "s32": 4, "int": 4,
               "u64": 8, "s64": 8, "long": 8}


def parse_format(text: str) -> EventFormat:
    """An `events/GROUP/NAME/format` file."""
    m_name = re.search(r"^name:\s*(\S+)", text, re.MULTILINE)
    m_id = re.search(r"^ID:\s*(\d+)", text, re.MULTILINE)
    if not m_name or not m_id:
        raise FormatError("format file without name or ID")
    fields = []
    for m in _FIELD_RE.finditer(text):
        decl = m.group("decl").strip()
        off, size = int(m.group("off")), int(m.group("size"))
        signed = m.group("signed") == "1"
        data_loc = decl.startswith("__data_loc ") or decl.startswith("__rel_loc ")
        if decl.startswith("__rel_loc "):
            raise FormatError(f"field {decl!r}: __rel_loc is not supported")
        am = re.match(r"^(?P<type>.*?)\s*\b(?P<name>\w+)\s*(?P<arr>\[\s*\d*\s*\])?$", decl)
        if not am:
            raise FormatError(f"field declaration {decl!r} not understood")
        name, ctype, arr = am.group("name"), am.group("type").strip(), am.group("arr")
        count = 1
        if arr is not None and not data_loc:
            n = arr.strip("[] ")
            base = ctype.split()[-1] if ctype else "char"
            elem = int(n) and size // int(n) if n else _ELEM_SIZES.get(base, 0)
            if not elem or size % elem:
                raise FormatError(f"array field {decl!r} of {size} bytes not understood")
            count = size // elem
            ctype += "[]"
        elif data_loc:
            if size != 4:
                raise FormatError(f"__data_loc field {name!r} of {size} bytes")
            ctype = ctype.removeprefix("__data_loc ").strip() + ("[]" if arr is not None else "")
        fields.append(Field(name, ctype, off, size, signed, data_loc, count))
    pm = re.search(r"^print fmt:\s*(.*)$", text, re.MULTILINE)
    fmt = EventFormat(m_name.group(1), int(m_id.group(1)), tuple(fields), pm.group(1) if pm else "")
    for need, size in (("common_type", 2), ("common_pid", 4)):
        f = fmt.field(need)
        if f is None or f.size != size:
            raise FormatError(f"{fmt.name}: no {need} of {size} bytes")
    if fmt.field("common_type").offset != 0 or fmt.field("common_pid").offset != 4:  # type: ignore[union-attr]
        raise FormatError(f"{fmt.name}: common fields not at their usual offsets")
    return fmt


# --- decoding pages ---------------------------------------------------------------------------


@dataclass
class Decoded:
    """The events of a run of pages, in page order (within a page, in time order)."""

    ts: I64  # nanoseconds of the instance's clock
    etype: I32  # common_type (the event id)
    pid: I32  # common_pid (the thread id)
    rec: I64  # byte offset of each record in the buffer that was decoded
    rlen: I32  # record length in bytes
    page: I32  # which page (index into the run) each event came from
    page_ts: I64  # per page: its header timestamp
    page_len: I32  # per page: data bytes
    missed: I64  # per page: -1 none lost before it, 0 lost but not counted, N lost
    extends: int = 0  # time-extend events seen
    stamps: int = 0  # absolute-timestamp events seen
    paddings: int = 0  # padding events seen


def _u64(w: U32, at: I64) -> I64:
    return (w[at].astype(np.int64) | (w[at + 1].astype(np.int64) << 32)).astype(np.int64)


def decode_pages(buf: bytes | bytearray | memoryview, npages: int, layout: PageLayout,
                 page_base: int = 0) -> Decoded:
    """Decode `npages` consecutive pages starting at byte `page_base` of `buf` (little-endian).

    Raises FormatError on a page that cannot be a ring-buffer page (commit beyond the page).
    """
    psize = layout.page_size
    pw = psize // 4
    nwords = (page_base + npages * psize) // 4
    w: U32 = np.frombuffer(buf, dtype="<u4", count=nwords)
    # two spare words so that a header at a page's last word can read its array[0] safely
    w = np.concatenate([w, np.zeros(2, np.uint32)])
    pbase = (page_base // 4 + np.arange(npages, dtype=np.int64) * pw).astype(np.int64)
    page_ts = _u64(w, pbase + layout.ts_off // 4)
    commit = w[pbase + layout.commit_off // 4].astype(np.int64)  # flags sit in the low 32 bits
    if layout.commit_size == 8:
        # RB_MISSED_EVENTS is (1 << 31), an int: added to the long commit it sign-extends, so the high
        # word is all ones when that flag is set, and zero otherwise
        hi = w[pbase + layout.commit_off // 4 + 1]
        want = np.where((commit & RB_MISSED_EVENTS) != 0, np.uint32(0xFFFFFFFF), np.uint32(0))
        if np.any((hi != want) & (hi != 0)):
            raise FormatError("a page's commit field has bits above 32 set")
    length = commit & COMMIT_MASK
    if np.any(length > layout.data_size) or np.any(length % 4):
        bad = int(np.flatnonzero((length > layout.data_size) | (length % 4 != 0))[0])
        raise FormatError(f"page {bad}: commit {int(length[bad])} does not fit a {layout.data_size}-byte page")
    missed = np.full(npages, -1, np.int64)
    lost_flag = (commit & RB_MISSED_EVENTS) != 0
    if lost_flag.any():
        missed[lost_flag] = 0
        stored = lost_flag & ((commit & RB_MISSED_STORED) != 0)
        if stored.any():
            at = pbase[stored] + (layout.data_off + length[stored]) // 4
            missed[stored] = _u64(w, at) if layout.commit_size == 8 else w[at].astype(np.int64)
    start = pbase + layout.data_off // 4
    end = start + length // 4
    at = _walk(w, page_base // 4, npages, pw, start, end)
    h = w[at]
    tl = (h & 31).astype(np.int64)
    delta = (h >> 5).astype(np.int64)
    page = ((at - page_base // 4) // pw).astype(np.int32)
    ext = tl == TYPE_TIME_EXTEND
    stamp = tl == TYPE_TIME_STAMP
    data = tl <= TYPE_DATA_MAX
    inc = np.where(data, delta, 0)
    if ext.any():
        inc[ext] = (w[at[ext] + 1].astype(np.int64) << TS_SHIFT) + delta[ext]
    # Timestamps: a cumulative sum of the deltas, restarted at each page (from its header timestamp)
    # and at each absolute timestamp.
    first = np.ones(len(at), np.bool_)
    if len(at):
        first[1:] = page[1:] != page[:-1]
    seg_start = first | stamp
    cum = np.cumsum(inc)
    seg_id = np.cumsum(seg_start) - 1
    starts = np.flatnonzero(seg_start)
    base = page_ts[page[starts]]
    base_cum = cum[starts] - inc[starts]
    if stamp.any():
        sv = (w[at[stamp] + 1].astype(np.int64) << TS_SHIFT) + delta[stamp]
        msb = page_ts[page[stamp]] & np.int64(TS_MSB)
        sv = np.where(msb != 0, sv | msb, sv)
        is_stamp_start = stamp[starts]
        base[is_stamp_start] = sv
    ts = base[seg_id] + cum - base_cum[seg_id]
    big = data & (tl == 0)
    rec_w = at + 1 + big
    rlen = np.where(big, 0, tl * 4)
    if big.any():
        rlen[big] = w[at[big] + 1].astype(np.int64) - 4
    d_rec = rec_w[data]
    d_len = rlen[data].astype(np.int32)
    d_page = page[data].astype(np.int64)
    data_end = page_base + d_page * psize + layout.data_off + length[d_page]
    ok = (d_len >= 8) & (d_rec * 4 + d_len <= data_end)
    if not ok.all():
        keep_d = ok
        d_rec, d_len = d_rec[keep_d], d_len[keep_d]
        data_idx = np.flatnonzero(data)[keep_d]
    else:
        data_idx = np.flatnonzero(data)
    first_word = w[d_rec]
    return Decoded(
        ts=ts[data_idx].astype(np.int64),
        etype=(first_word & 0xFFFF).astype(np.int32),
        pid=w[d_rec + 1].view(np.int32).astype(np.int32),
        rec=(d_rec * 4).astype(np.int64),
        rlen=d_len,
        page=page[data_idx],
        page_ts=page_ts,
        page_len=length.astype(np.int32),
        missed=missed,
        extends=int(ext.sum()),
        stamps=int(stamp.sum()),
        paddings=int((tl == TYPE_PADDING).sum()),
    )


# Words from a header to the next one, by type_len: 1..28 carry 4*type_len bytes of data, a time
# extend or stamp is two words; 0 (a long record) and 29 (padding) say their length in array[0].
_STEP = np.array([0] + [t + 1 for t in range(1, TYPE_DATA_MAX + 1)] + [0, 2, 2], np.int64)


def _walk(w: U32, first: int, npages: int, pw: int, start: I64, end: I64) -> I64:
    """Word positions of every event header in the pages, in order.

    An event's length is in its own header, so a page is a chain: all pages follow their chains in
    lock step, one event of every page per step, ~8 numpy calls a step whatever the number of pages.
    Measured on 256 full pages (43k events): 0.95 ms; with the step computed by comparisons instead of
    the table 1.3 ms; with every word's next header precomputed first (then two calls a step) 1.9 ms.
    """
    lo = first
    marks = np.zeros(npages * pw + 2, np.bool_)
    live = start < end
    pos, stop = start[live] - lo, end[live] - lo
    local = w[lo:lo + npages * pw + 2]
    while len(pos):
        marks[pos] = True
        h = local[pos]
        step = _STEP[h & 31]
        if not step.all():
            var = np.flatnonzero(step == 0)
            hv = h[var]
            vstep = 1 + (local[pos[var] + 1] >> 2).astype(np.int64)
            null = ((hv & 31) == TYPE_PADDING) & ((hv >> 5) == 0)
            vstep[null] = (stop[var] - pos[var])[null]  # an empty padding: the page ends here
            step[var] = np.maximum(vstep, 1)
        pos += step
        keep = pos < stop
        if not keep.all():
            pos, stop = pos[keep], stop[keep]
    return np.flatnonzero(marks).astype(np.int64) + lo


def decode_page_python(page: bytes, layout: PageLayout) -> list[tuple[str, int, bytes]]:
    """A straightforward event-by-event decoder of one page: (kind, timestamp, record) per entry.

    The reference the vectorised decoder is tested against; kind is data, extend, stamp, padding or
    lost (timestamp is the page's, record the 8-byte count or b'').
    """
    ts = int.from_bytes(page[layout.ts_off:layout.ts_off + 8], "little")
    commit = int.from_bytes(page[layout.commit_off:layout.commit_off + layout.commit_size], "little")
    length = commit & COMMIT_MASK
    out: list[tuple[str, int, bytes]] = []
    if commit & RB_MISSED_EVENTS:
        cnt = b""
        if commit & RB_MISSED_STORED:
            at = layout.data_off + length
            cnt = page[at:at + layout.commit_size]
        out.append(("lost", ts, cnt))
    p = layout.data_off
    end = layout.data_off + length
    while p < end:
        h = int.from_bytes(page[p:p + 4], "little")
        tl, delta = h & 31, h >> 5
        if tl == TYPE_PADDING:
            if delta == 0:
                break
            out.append(("padding", ts, b""))
            p += 4 + int.from_bytes(page[p + 4:p + 8], "little")
        elif tl in (TYPE_TIME_EXTEND, TYPE_TIME_STAMP):
            v = (int.from_bytes(page[p + 4:p + 8], "little") << TS_SHIFT) + delta
            if tl == TYPE_TIME_EXTEND:
                ts += v
                out.append(("extend", ts, b""))
            else:
                ts = v | (ts & TS_MSB)
                out.append(("stamp", ts, b""))
            p += 8
        elif tl == 0:
            n = int.from_bytes(page[p + 4:p + 8], "little") - 4
            ts += delta
            out.append(("data", ts, bytes(page[p + 8:p + 8 + n])))
            p += 8 + n
        else:
            ts += delta
            out.append(("data", ts, bytes(page[p + 4:p + 4 + 4 * tl])))
            p += 4 + 4 * tl
    return out


# --- rendering a record as the kernel's text ---------------------------------------------------

Renderer = Callable[[bytes], bytes]
ArgDecoder = Callable[[bytes], dict[str, bytes]]  # a record's args, each as the text prints it


def _int_at(rec: bytes, off: int, size: int, signed: bool) -> int:
    return int.from_bytes(rec[off:off + size], "little", signed=signed)


def _data_loc(rec: bytes, off: int) -> bytes:
    loc = int.from_bytes(rec[off:off + 4], "little")
    start, n = loc & 0xFFFF, loc >> 16
    return rec[start:start + n]


def _cstr(b: bytes) -> bytes:
    z = b.find(b"\0")
    return b if z < 0 else b[:z]


# Dynamic-probe arg conversions as print_type_*() in kernel/trace/trace_probe.c print them.
_PROBE_CONV = {
    "%u": ("u", 0), "%d": ("d", 0), "%Lu": ("u", 0), "%Ld": ("d", 0), "%lu": ("u", 0), "%ld": ("d", 0),
    "0x%x": ("x", 0), "0x%Lx": ("x", 0), "0x%lx": ("x", 0), "'%c'": ("c", 0), '\\"%s\\"': ("s", 0),
}
_SEG_RE = re.compile(r" (?P<name>\w+)=(?P<conv>\{[^}]*\}|\\\"%s\\\"|'%c'|0x%L?l?x|%L?l?[ud]|%p\w*)")


def _probe_value(conv: str, f: Field, rec: bytes, off: int, size: int) -> bytes:
    if conv == "s":
        s = _data_loc(rec, off)
        return b"(fault)" if not s else b'"' + _cstr(s) + b'"'
    v = _int_at(rec, off, size, f.signed or conv == "d")
    if conv == "x":
        return b"0x%x" % (v & ((1 << (8 * size)) - 1))
    if conv == "c":
        return b"'" + bytes([v & 0xFF]) + b"'"
    return b"%d" % v


_ProbePart = tuple[bytes, str, Field]  # (` name=`, conversion kind, field)


def _probe_parts(ev: EventSpec, fmt: EventFormat) -> tuple[bytes, list[tuple[int, int]], list[_ProbePart]]:
    """A kprobe/uprobe format's head, ip fields (offset, size) and args, or FormatError."""
    pf = fmt.print_fmt
    m = re.match(r'^"\((%lx|%lx <- %lx)\)(?P<rest>.*)",', pf)
    if not m:
        raise FormatError(f"{fmt.name}: print fmt {pf[:60]!r} is not a probe's")
    ret = "<-" in m.group(1)
    rest = m.group("rest")
    segs = list(_SEG_RE.finditer(rest))
    if "".join(s.group(0) for s in segs) != rest:
        raise FormatError(f"{fmt.name}: probe arg formats {rest!r} not understood")
    head = ev.key if ev.key.endswith(b":") else ev.name.encode() + b":"
    # print_*retprobe_event() print `(ret_ip <- func)`, the other way round from the format's print fmt
    ip_fields = ("__probe_ret_ip", "__probe_func") if ret else ("__probe_ip",)
    ips = [fmt.field(n) for n in ip_fields]
    if any(f is None for f in ips):
        raise FormatError(f"{fmt.name}: no {', '.join(ip_fields)} field")
    parts: list[tuple[bytes, str, Field]] = []
    for s in segs:
        f = fmt.field(s.group("name"))
        if f is None:
            raise FormatError(f"{fmt.name}: arg {s.group('name')!r} has no field")
        conv = s.group("conv")
        if conv.startswith("{"):
            inner = conv[1:-1].split(",")
            if len(inner) != f.count or len(set(inner)) != 1 or inner[0] not in _PROBE_CONV:
                raise FormatError(f"{fmt.name}: array arg {conv!r} not understood")
            kind = "[" + _PROBE_CONV[inner[0]][0]
        elif conv in _PROBE_CONV:
            kind = _PROBE_CONV[conv][0]
        else:
            raise FormatError(f"{fmt.name}: arg {f.name!r} prints as {conv!r} (a symbol?), not rendered here")
        parts.append((b" " + f.name.encode() + b"=", kind, f))
    return head, [(f.offset, f.size) for f in ips if f is not None], parts


def _probe_arg(kind: str, f: Field, rec: bytes) -> bytes:
    if kind[0] == "[":
        es = f.elem_size
        return b"{" + b",".join(_probe_value(kind[1], f, rec, f.offset + i * es, es) for i in range(f.count)) + b"}"
    if kind == "s":  # the value a string arg has in the text, without the quotes it prints in
        s = _data_loc(rec, f.offset)
        return _cstr(s) if s else b"(fault)"
    return _probe_value(kind, f, rec, f.offset, f.size)


def probe_decoder(ev: EventSpec, fmt: EventFormat) -> ArgDecoder:
    """The args of a kprobe/uprobe record, each as its text prints it."""
    _, _, parts = _probe_parts(ev, fmt)
    named = [(label[1:-1].decode(), kind, f) for label, kind, f in parts]

    def decode(rec: bytes) -> dict[str, bytes]:
        return {name: _probe_arg(kind, f, rec) for name, kind, f in named}

    return decode


def probe_renderer(ev: EventSpec, fmt: EventFormat) -> Renderer:
    """The text of a kprobe/uprobe record: `name: (ip) a=1 s="x"` or `name: (ret <- func) ret=3`.

    The ip prints as hex, where a kprobe's text has `sym+off/size`: the arg readers skip it.
    """
    head, ip_offs, parts = _probe_parts(ev, fmt)

    def render(rec: bytes) -> bytes:
        ipt = b" <- ".join(b"0x%x" % _int_at(rec, o, s, False) for o, s in ip_offs)
        out = [head, b" (", ipt, b")"]
        for label, kind, f in parts:
            out.append(label)
            if kind[0] == "[":
                es = f.elem_size
                out.append(b"{" + b",".join(_probe_value(kind[1], f, rec, f.offset + i * es, es)
                                             for i in range(f.count)) + b"}")
            else:
                out.append(_probe_value(kind, f, rec, f.offset, f.size))
        return b"".join(out)

    return render


def syscall_decoder(ev: EventSpec, fmt: EventFormat, kernel: tuple[int, int]) -> ArgDecoder:
    """The args of `sys_x(a: 0x1, b: 2)` / `sys_x -> 0x3` as print_syscall_enter/exit print them
    (an exit's one value is `ret`, as the text's arg reader names it).

    6.18 prints values below 10 in decimal and the rest as 0x%lx; before it, every value as %lx.
    """
    name = ev.target.partition("/")[2]
    own = [f for f in fmt.own_fields if f.name != "__syscall_nr"]
    if any(f.size != 8 or f.data_loc or f.count != 1 for f in own):
        raise FormatError(f"{fmt.name}: syscall fields other than unsigned longs (user strings?) not rendered here")
    if name.startswith("sys_exit_"):
        if len(own) != 1:
            raise FormatError(f"{fmt.name}: a syscall exit with {len(own)} fields")
        off = own[0].offset
        return lambda rec: {"ret": b"0x%x" % _int_at(rec, off, 8, False)}
    names = [(f.name, f.offset) for f in own]
    if kernel >= (6, 18):
        def value(v: int) -> bytes:
            return b"%d" % v if v < 10 else b"0x%x" % v
    else:
        def value(v: int) -> bytes:
            return b"%x" % v

    return lambda rec: {n: value(_int_at(rec, off, 8, False)) for n, off in names}


def syscall_renderer(ev: EventSpec, fmt: EventFormat, kernel: tuple[int, int]) -> Renderer:
    """`sys_x(a: 0x1, b: 2)` / `sys_x -> 0x3`, the text of a syscall record."""
    name = ev.target.partition("/")[2]
    decode = syscall_decoder(ev, fmt, kernel)
    if name.startswith("sys_exit_"):
        head = b"sys_" + name[len("sys_exit_"):].encode() + b" -> "
        return lambda rec: head + decode(rec)["ret"]
    head = b"sys_" + name[len("sys_enter_"):].encode() + b"("
    return lambda rec: head + b", ".join(k.encode() + b": " + v for k, v in decode(rec).items()) + b")"


_CONV_RE = re.compile(rb"%(?P<flags>[-+ #0]*)(?P<width>\d*)(?:\.(?P<prec>\d+))?(?P<len>hh|h|ll|l|L|z)?"
                      rb"(?P<conv>[diouxXcsp%])")
_CAST_BITS = {"unsigned long": (64, False), "long": (64, True), "unsigned long long": (64, False),
              "long long": (64, True), "unsigned int": (32, False), "int": (32, True), "u64": (64, False),
              "s64": (64, True), "u32": (32, False), "s32": (32, True), "unsigned": (32, False),
              "u16": (16, False), "s16": (16, True), "u8": (8, False), "s8": (8, True),
              "unsigned short": (16, False), "short": (16, True), "unsigned char": (8, False),
              "char": (8, True), "size_t": (64, False), "pid_t": (32, True)}


def _c_string(lit: str) -> bytes:
    out = bytearray()
    i = 0
    esc = {"n": 10, "t": 9, '"': 34, "\\": 92, "'": 39, "r": 13}
    while i < len(lit):
        c = lit[i]
        if c == "\\" and i + 1 < len(lit):
            nxt = lit[i + 1]
            if nxt not in esc:
                raise FormatError(f"escape \\{nxt} in a print fmt")
            out.append(esc[nxt])
            i += 2
            continue
        out += c.encode()
        i += 1
    return bytes(out)


def _split_args(s: str) -> list[str]:
    args: list[str] = []
    cur: list[str] = []
    depth = 0
    for c in s:
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        if c == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        args.append("".join(cur).strip())
    return args


ArgFn = Callable[[bytes], int | bytes]


def _arg_fn(expr: str, fmt: EventFormat) -> ArgFn:
    e = expr.strip()
    casts: list[tuple[int, bool]] = []
    while True:
        if e.startswith("(") and _balanced(e[1:-1]) and e.endswith(")"):
            e = e[1:-1].strip()
            continue
        cm = re.match(r"^\((?P<t>[\w ]+)\)\s*(?P<rest>.+)$", e)
        if cm and cm.group("t").strip() in _CAST_BITS and _balanced(cm.group("rest")):
            casts.append(_CAST_BITS[cm.group("t").strip()])
            e = cm.group("rest").strip()
            continue
        break
    gm = re.fullmatch(r"__get_str\(\s*(\w+)\s*\)", e)
    if gm:
        f = fmt.field(gm.group(1))
        if f is None or not f.data_loc:
            raise FormatError(f"{fmt.name}: __get_str({gm.group(1)}) has no __data_loc field")
        off = f.offset
        return lambda rec: _cstr(_data_loc(rec, off))
    rm = re.fullmatch(r"REC->(\w+)(?:\[(\d+)\])?", e)
    if not rm:
        raise FormatError(f"{fmt.name}: print fmt argument {expr!r} not understood")
    f = fmt.field(rm.group(1))
    if f is None or f.data_loc:
        raise FormatError(f"{fmt.name}: print fmt argument {expr!r} has no plain field")
    idx = int(rm.group(2) or 0)
    if (rm.group(2) is None and f.count != 1) or idx >= f.count:
        raise FormatError(f"{fmt.name}: print fmt argument {expr!r} not understood")
    off, size, signed = f.offset + idx * f.elem_size, f.elem_size, f.signed

    def value(rec: bytes) -> int:
        v = _int_at(rec, off, size, signed)
        for bits, sgn in reversed(casts):  # innermost cast first
            v &= (1 << bits) - 1
            if sgn and v >> (bits - 1):
                v -= 1 << bits
        return v

    return value


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += c == "("
        depth -= c == ")"
        if depth < 0:
            return False
    return depth == 0


def printf_renderer(ev: EventSpec, fmt: EventFormat) -> Renderer:
    """`name: ...` for a tracepoint whose print fmt is a plain printf over its fields (no helpers)."""
    pm = re.match(r'^"(?P<f>(?:[^"\\]|\\.)*)"\s*(?:,(?P<args>.*))?$', fmt.print_fmt.strip())
    if not pm:
        raise FormatError(f"{fmt.name}: print fmt not understood")
    fstr = _c_string(pm.group("f"))
    args = [_arg_fn(a, fmt) for a in _split_args(pm.group("args") or "")]
    pieces: list[bytes | tuple[bytes, ArgFn]] = []
    last = 0
    ai = 0
    for cm in _CONV_RE.finditer(fstr):
        pieces.append(fstr[last:cm.start()])
        last = cm.end()
        if cm.group("conv") == b"%":
            pieces.append(b"%")
            continue
        if cm.group("conv") == b"p" or cm.group("prec"):
            raise FormatError(f"{fmt.name}: %p and precisions are not rendered here")
        if ai >= len(args):
            raise FormatError(f"{fmt.name}: print fmt has more conversions than arguments")
        pieces.append((cm.group(0), args[ai]))
        ai += 1
    if ai != len(args) or b"%" in fstr[last:]:
        raise FormatError(f"{fmt.name}: print fmt conversions and arguments do not match")
    pieces.append(fstr[last:])
    head = fmt.name.encode() + b": "

    def render(rec: bytes) -> bytes:
        out = [head]
        for p in pieces:
            if isinstance(p, bytes):
                out.append(p)
            else:
                out.append(_printf1(p[0], p[1](rec)))
        return b"".join(out)

    return render


def _printf1(spec: bytes, v: int | bytes) -> bytes:
    m = _CONV_RE.fullmatch(spec)
    assert m is not None
    conv, ln, flags = m.group("conv"), m.group("len") or b"", m.group("flags")
    if conv == b"s":
        s = v if isinstance(v, bytes) else b"%d" % v
        body = s
    elif isinstance(v, bytes):
        raise FormatError("a string for a numeric conversion")
    else:
        bits = {b"hh": 8, b"h": 16, b"": 32}.get(ln, 64)
        u = v & ((1 << bits) - 1)
        if conv in b"di":
            sv = u - (1 << bits) if u >> (bits - 1) else u
            body = b"%d" % sv
            if b"+" in flags and sv >= 0:
                body = b"+" + body
        elif conv == b"u":
            body = b"%d" % u
        elif conv == b"o":
            body = b"%o" % u
        elif conv == b"c":
            body = bytes([u & 0xFF])
        else:
            body = (b"%x" if conv == b"x" else b"%X") % u
            if b"#" in flags and u:
                body = (b"0x" if conv == b"x" else b"0X") + body
    width = int(m.group("width") or 0)
    if len(body) < width:
        if b"-" in flags:
            body = body.ljust(width)
        elif b"0" in flags and conv not in b"sc":
            neg = body[:1] == b"-"
            digits = body[1:] if neg else body
            pre = b""
            if digits[:2] in (b"0x", b"0X"):
                pre, digits = digits[:2], digits[2:]
            body = (b"-" if neg else b"") + pre + digits.rjust(width - len(body) + len(digits), b"0")
        else:
            body = body.rjust(width)
    return body


def make_renderer(ev: EventSpec, fmt: EventFormat, kernel: tuple[int, int]) -> Renderer:
    """The kernel's text for one record of `ev`, or FormatError saying why it cannot be made."""
    if ev.kind != "tracepoint":
        return probe_renderer(ev, fmt)
    if _is_syscall(ev):
        return syscall_renderer(ev, fmt, kernel)
    return printf_renderer(ev, fmt)


def _is_syscall(ev: EventSpec) -> bool:
    return ev.group == "syscalls" and ev.target.partition("/")[2].startswith(("sys_enter_", "sys_exit_"))


def printf_decoder(ev: EventSpec, fmt: EventFormat) -> ArgDecoder:
    """The `f=v` args of a tracepoint whose print fmt is a plain printf over its fields: its print fmt
    applied to the record's fields, read as the text's arg reader reads `f=v f2=v2`."""
    render = printf_renderer(ev, fmt)
    skip = len(fmt.name) + 2  # `name: `

    def decode(rec: bytes) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for part in render(rec)[skip:].split(b" "):
            k, sep, v = part.partition(b"=")
            if sep:
                out[k.decode("ascii", "replace")] = v
        return out

    return decode


def make_decoder(ev: EventSpec, fmt: EventFormat, kernel: tuple[int, int]) -> ArgDecoder:
    """A record's args of `ev` as its text prints them, or FormatError saying why they cannot be read."""
    if ev.kind != "tracepoint":
        return probe_decoder(ev, fmt)
    if _is_syscall(ev):
        return syscall_decoder(ev, fmt, kernel)
    return printf_decoder(ev, fmt)


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# --- the probe set's events as the raw reader sees them ------------------------------------------


class RawEvents:
    """Event ids to probe-set indices, and an arg decoder per event where one can be made."""

    def __init__(self, probes: ProbeSet, formats: Sequence[EventFormat | None], kernel: tuple[int, int]) -> None:
        self.probes = probes
        self.formats = list(formats)
        self.kernel = kernel
        self.lut = np.full(65536, EV_UNKNOWN, np.int32)
        self.decoders: list[ArgDecoder | None] = []
        self.decode_errors: dict[str, str] = {}
        for i, (ev, fmt) in enumerate(zip(probes.events, formats, strict=True)):
            if fmt is None:  # not installed (a reload that lost a race): none of its events can come
                self.decoders.append(None)
                self.decode_errors[ev.name] = "not installed"
                continue
            if self.lut[fmt.id] != EV_UNKNOWN:
                raise FormatError(f"events {ev.name} and {probes.events[self.lut[fmt.id]].name} share id {fmt.id}")
            self.lut[fmt.id] = i
            try:
                self.decoders.append(make_decoder(ev, fmt, kernel))
            except FormatError as e:
                self.decoders.append(None)
                self.decode_errors[ev.name] = str(e)

    def args(self, ev: int, rec: bytes) -> dict[str, bytes]:
        """The args of record `rec` of event index `ev` ({} where they cannot be decoded)."""
        d = self.decoders[ev]
        return d(rec) if d is not None else {}

    def require_decoders(self, names: Sequence[str]) -> None:
        """RawUnsupported when an event whose args are needed (labels, spans) cannot be decoded."""
        bad = [f"{n}: {self.decode_errors[n]}" for n in names if n in self.decode_errors]
        if bad:
            raise RawUnsupported("args needed for labels or spans cannot be decoded: " + "; ".join(bad))

    @classmethod
    def load(cls, event_dirs: Sequence[Path], probes: ProbeSet, kernel: tuple[int, int] | None = None,
             strict: bool = True) -> RawEvents:
        """From each event's format file; with strict=False an event without one is left out."""
        formats: list[EventFormat | None] = []
        for ev, d in zip(probes.events, event_dirs, strict=True):
            try:
                text = (d / "format").read_text()
            except OSError as e:
                if strict:
                    raise RawUnsupported(f"cannot read the format of {ev.name} ({d}/format): {e.strerror}") from None
                formats.append(None)
                continue
            formats.append(parse_format(text))
        return cls(probes, formats, kernel or kernel_version())


def check_probes(probes: ProbeSet, tracefs_root: Path, spans: bool, kernel: tuple[int, int] | None = None) -> None:
    """RawUnsupported when args that labels or spans need could not be decoded, judged before install.

    Tracepoints by their format files; dynamic probes by their fetch types (a `symbol` prints as
    `sym+off/size`, which needs the kernel's symbol table: not rendered here).
    """
    bad = []
    for name in args_needed(probes, spans):
        ev = probes.event(name)
        if ev.dynamic:
            sym = [a.name for a in ev.args if re.search(r":symbol(?:\[|$)", a.fetch)]
            if sym:
                bad.append(f"{name}: arg {sym[0]!r} is a symbol")
            continue
        try:
            fmt = parse_format((tracefs_root / "events" / ev.target / "format").read_text())
            make_decoder(ev, fmt, kernel or kernel_version())
        except OSError as e:
            bad.append(f"{name}: {e.strerror}")
        except FormatError as e:
            bad.append(f"{name}: {e}")
    if bad:
        raise RawUnsupported("args needed for labels or spans cannot be decoded: " + "; ".join(bad))


def args_needed(probes: ProbeSet, spans: bool) -> list[str]:
    """Events whose args the aggregate will read: labelled counted events, and pairs' ends when spans are on."""
    names = [ev.name for ev in probes.events if ev.counted and labels.arg_labels(ev)]
    if spans:
        for p in probes.pairs:
            if p.spans is not None:
                names += [p.entry, p.exit]
    return names


# --- batches ----------------------------------------------------------------------------------


@dataclass
class Batch:
    """Decoded events of all CPUs merged in timestamp order, with their records (what the reader holds)."""

    ev: I32  # index into ProbeSet.events, or EV_UNKNOWN / EV_LOST
    tid: I32  # common_pid
    ts: I64  # ns, the instance's clock
    cpu: I32
    rec: I64  # offset of the record in `data`
    rlen: I32  # record length; for EV_LOST the lost count (0: not stored)
    data: bytes

    def __len__(self) -> int:
        return len(self.ev)

    def record(self, i: int) -> bytes:
        o = int(self.rec[i])
        return self.data[o:o + int(self.rlen[i])]


class RawRecord:
    """One record, kept for a span: its args decoded through its format's fields when asked."""

    __slots__ = ("ev", "events", "rec", "tasks", "tid")

    def __init__(self, events: RawEvents, ev: int, rec: bytes, tid: int, tasks: Tasks) -> None:
        self.events, self.ev, self.rec, self.tid, self.tasks = events, ev, rec, tid, tasks

    def comm(self) -> str:
        return _comm(self.tasks, self.tid).decode("utf-8", "backslashreplace")

    def tgid(self) -> int:
        return self.tasks.tgid(self.tid)

    def args(self) -> tuple[tuple[str, str], ...]:
        values = self.events.args(self.ev, self.rec)
        spec = self.events.probes.events[self.ev]
        names = [a.name for a in spec.args] if spec.dynamic else list(values)
        return tuple((n, values[n].decode("utf-8", "backslashreplace")) for n in names if n in values)

    def retval(self) -> str | None:
        """What the text's return-value reader takes: a probe's `ret` (else `arg1`, else its first arg), a
        syscall exit's value."""
        spec = self.events.probes.events[self.ev]
        values = self.events.args(self.ev, self.rec)
        if spec.kind == "tracepoint":
            ret = values.get("ret") if spec.target.partition("/")[2].startswith("sys_exit_") else None
        else:
            ret = next((values[n] for n in ("ret", "arg1") if n in values), next(iter(values.values()), None))
        return ret.decode("ascii", "replace") if ret is not None else None


def _comm(tasks: Tasks, tid: int) -> bytes:
    """A thread's comm as the text's 16 columns show it."""
    return tasks.comm(tid).encode("utf-8", "backslashreplace")[-16:].lstrip()


class RawRecords:
    """A batch's records behind an event batch: args from the record through its format's fields,
    comm and tgid from the live threads and the kernel's tables (records carry neither)."""

    def __init__(self, b: Batch, events: RawEvents, tasks: Tasks) -> None:
        self.b, self.events, self.tasks = b, events, tasks

    def payloads(self, rows: Sequence[int]) -> list[bytes]:
        # the common fields never print, so records equal past them have equal args
        data, recs, lens = self.b.data, self.b.rec, self.b.rlen
        offs, ns = recs[rows].tolist(), lens[rows].tolist()
        return [data[o + 8:o + n] for o, n in zip(offs, ns, strict=True)]

    def picker(self, ev: int, names: tuple[str, ...]) -> Callable[[bytes], tuple[bytes, ...]]:
        args, pad = self.events.args, bytes(8)
        return lambda payload: tuple(args(ev, pad + payload).get(n, b"") for n in names)

    def comms(self, rows: Sequence[int]) -> list[bytes]:
        tasks, seen = self.tasks, dict[int, bytes]()
        out = []
        for t in self.b.tid[rows].tolist():
            c = seen.get(t)
            if c is None:
                c = seen[t] = _comm(tasks, t)
            out.append(c)
        return out

    def column(self, name: str) -> I64:
        if name != "tgid":
            raise KeyError(name)
        tids = self.b.tid.astype(np.int64)
        uniq, inv = np.unique(tids, return_inverse=True)
        tg = np.array([self.tasks.tgid(t) for t in uniq.tolist()], np.int64)
        return np.where(self.b.ev != EV_LOST, tg[inv], -1).astype(np.int64)

    def detach(self, row: int) -> RawRecord:
        return RawRecord(self.events, int(self.b.ev[row]), self.b.record(row), int(self.b.tid[row]), self.tasks)


def event_batch(b: Batch, events: RawEvents, tasks: Tasks) -> EventBatch:
    """The aggregate's view of a batch: its columns, its loss markers, its records behind them."""
    ev = b.ev.astype(np.int64)
    at = np.flatnonzero(ev == EV_LOST)
    lost = list(zip(at.tolist(), b.cpu[at].tolist(), b.rlen[at].tolist(), strict=True))
    return EventBatch(ev, b.tid.astype(np.int64), b.ts.astype(np.int64), RawRecords(b, events, tasks), lost,
                      len(ev) - len(at), cpu=b.cpu.astype(np.int64))


def empty_batch() -> Batch:
    return Batch(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.int32),
                 np.empty(0, np.int64), np.empty(0, np.int32), b"")


def batch_from_pages(buf: bytes, cpus: Sequence[tuple[int, int, int]], layout: PageLayout,
                     lut: npt.NDArray[np.int32]) -> Batch:
    """Decode per-CPU runs of pages in `buf` — (cpu, first byte, pages) each — and merge them by time.

    A page that says events were lost before it becomes an EV_LOST entry at its header timestamp,
    right before its own events. Each CPU's run is in time order already, so the merge is a stable
    sort of the runs laid end to end in CPU order (timsort merges runs in linear time; ties keep the
    lower CPU first, as trace_pipe's merge does).
    """
    runs: list[tuple[I64, I32, I32, I32, I64, I32]] = []
    for cpu, base, n in cpus:
        if n == 0:
            continue
        d = decode_pages(buf, n, layout, base)
        ev = lut[d.etype]
        cols = (d.ts, ev, d.pid, np.full(len(ev), cpu, np.int32), d.rec, d.rlen)
        lost = np.flatnonzero(d.missed >= 0)
        if len(lost):
            at = np.searchsorted(d.page, lost)  # each marker before the first event of its page
            k = len(lost)
            cols = (np.insert(d.ts, at, d.page_ts[lost]), np.insert(ev, at, EV_LOST),
                    np.insert(d.pid, at, 0), np.full(len(ev) + k, cpu, np.int32), np.insert(d.rec, at, 0),
                    np.insert(d.rlen, at, np.minimum(d.missed[lost], 2**31 - 1).astype(np.int32)))
        if len(cols[0]):
            runs.append(cols)
    if not runs:
        return empty_batch()
    if len(runs) == 1:
        ts, ev, pid, cpu_col, rec, rlen = runs[0]
        return Batch(ev, pid, ts, cpu_col, rec, rlen, bytes(buf))
    ts = np.concatenate([c[0] for c in runs])
    order = np.argsort(ts, kind="stable")
    return Batch(np.concatenate([c[1] for c in runs])[order], np.concatenate([c[2] for c in runs])[order], ts[order],
                 np.concatenate([c[3] for c in runs])[order], np.concatenate([c[4] for c in runs])[order],
                 np.concatenate([c[5] for c in runs])[order], bytes(buf))


# --- the reader ---------------------------------------------------------------------------------


class RawReader:
    """Drains `per_cpu/cpuN/trace_pipe_raw` of an instance, one page per read, all CPUs from one thread.

    One thread polls every CPU's file. Measured against a reader thread per CPU handing pages to the
    decoding thread (bench/raw_threads.py, same run): under overload the single thread delivered as
    much or more (2.6 against 2.3 M events/s, the reads are short syscalls and decoding holds the
    GIL); at 200k events/s the threads cost 0.09 against 0.12 us of CPU an event, but they leave the
    CPUs unmerged, which is what that difference buys here.

    Cross-CPU order: a batch is cut at a watermark, the earliest of each CPU's "nothing older can still
    come" time (when its file answered EAGAIN: the clock at the start of its drain, less a margin for
    writes in flight; when its share of the buffer filled first: its last event). Events after the
    watermark wait for the next batch, so a thread that migrates between CPUs keeps its entry before
    its exit, as in trace_pipe's merge.
    """

    HOLD_MARGIN_NS = 200_000
    SHORT_PAGES = 16

    def __init__(self, inst: Path, events: RawEvents, *, tracefs_root: Path | None = None,
                 event_dir: Callable[[EventSpec], Path] | None = None, max_pages_per_cpu: int = 256,
                 layout: PageLayout | None = None, buffer_percent: int = 25) -> None:
        self.inst = inst
        self.events = events
        self.root = tracefs_root
        self.event_dir = event_dir or (lambda ev: inst / "events" / (ev.target if not ev.dynamic else
                                                                    f"{ev.group}/{ev.name}"))
        self.tasks = Tasks(tracefs_root)
        self.layout = layout or load_layout(inst, tracefs_root)
        self.clock = read_clock(inst)
        per_cpu = sorted((int(d.name[3:]), d / "trace_pipe_raw") for d in (inst / "per_cpu").glob("cpu[0-9]*"))
        if not per_cpu:
            raise RawUnsupported(f"{inst}/per_cpu has no CPUs")
        self.fds: list[tuple[int, int]] = []
        try:
            for cpu, path in per_cpu:
                try:
                    self.fds.append((cpu, os.open(path, os.O_RDONLY | os.O_NONBLOCK)))
                except OSError as e:
                    raise RawUnsupported(f"cannot open {path}: {e.strerror}") from None
        except BaseException:
            self.close()
            raise
        self.poll = select.poll()
        for _, fd in self.fds:
            self.poll.register(fd, select.POLLIN)
        # poll() on trace_pipe_raw wakes when a CPU's buffer is this full (trace_pipe ignores it). The
        # kernel's 50 leaves half the buffer for the time it takes to be scheduled and drain: at one
        # core's full event rate, 20 ms of a 4 MiB buffer. 25 leaves three quarters.
        try:
            (inst / "buffer_percent").write_text(str(buffer_percent))
        except OSError:
            pass
        ps = self.layout.page_size
        self.max_pages = max_pages_per_cpu
        self.buf = bytearray(ps * max_pages_per_cpu * len(self.fds))
        view = memoryview(self.buf)
        self.pages = [view[i * ps:(i + 1) * ps] for i in range(max_pages_per_cpu * len(self.fds))]
        self.held = empty_batch()
        self._short = False

    @classmethod
    def open(cls, inst: Path, root: Path, probes: ProbeSet, event_dir: Callable[[EventSpec], Path],
             spans: bool) -> RawReader:
        """The raw reader of an installed probe set, or RawUnsupported saying why it cannot serve it."""
        check_byteorder()
        check_probes(probes, root, spans=spans)
        events = RawEvents.load([event_dir(ev) for ev in probes.events], probes)
        events.require_decoders(args_needed(probes, spans=spans))
        return cls(inst, events, tracefs_root=root, event_dir=event_dir)

    def check(self, probes: ProbeSet, spans: bool) -> None:
        """RawUnsupported when a new probe set's args could not be decoded (judged before a reload)."""
        if self.root is not None:
            check_probes(probes, self.root, spans=spans)

    def read(self, timeout_s: float = 0.1) -> EventBatch | None:
        """Every event up to the watermark.

        After a short drain (under SHORT_PAGES pages) it first lets events gather: poll() until the
        instance's buffer_percent of a CPU's buffer is filled, or up to timeout_s. Reading again at
        once would hand over a few events at a time for the same fixed cost per batch (measured: 1.1
        against 0.11 us of CPU per event at 200k events/s, bench/raw_threads.py).
        """
        if self._short and timeout_s > 0:
            try:
                self.poll.poll(int(timeout_s * 1000))
            except InterruptedError:
                pass
        return self._events(self._read(flush=False))

    def _events(self, b: Batch) -> EventBatch | None:
        return event_batch(b, self.events, self.tasks) if len(b) else None

    def set_events(self, probes: ProbeSet) -> None:
        """A new probe set's ids (after a reload); events held over are re-dispatched by their ids.
        RawUnsupported when the new events cannot be decoded."""
        events = RawEvents.load([self.event_dir(ev) for ev in probes.events], probes, strict=False)
        if len(self.held):
            types = np.array([int.from_bytes(self.held.record(i)[:2], "little") if self.held.ev[i] != EV_LOST
                              else 0 for i in range(len(self.held))], np.int64)
            self.held.ev = np.where(self.held.ev == EV_LOST, EV_LOST, events.lut[types]).astype(np.int32)
        self.events = events

    def flush(self) -> EventBatch | None:
        """Everything buffered, held events included (at stop, or before a reload); None when nothing is."""
        return self._events(self._read(flush=True))

    def _read(self, flush: bool) -> Batch:
        ps = self.layout.page_size
        runs = []
        marks = []
        slot = 0
        for cpu, fd in self.fds:
            t0 = time.clock_gettime_ns(self.clock)
            first = slot
            limit = first + self.max_pages
            drained = False
            while slot < limit:
                try:
                    n = os.readv(fd, [self.pages[slot]])
                except BlockingIOError:
                    drained = True
                    break
                except OSError as e:
                    if e.errno == errno.EINTR:
                        continue
                    raise ReaderError(f"reading {self.inst}/per_cpu/cpu{cpu}/trace_pipe_raw failed: "
                                      f"{os.strerror(e.errno or 0)}") from None
                if n == 0:
                    drained = True
                    break
                if n != ps:
                    # a short page: keep what the page header says is there, zero the rest
                    self.buf[slot * ps + n:(slot + 1) * ps] = bytes(ps - n)
                slot += 1
            runs.append((cpu, first * ps, slot - first))
            marks.append((cpu, drained, t0))
        self.tasks.batch_read()  # every event below was written before now: older table reads may be stale
        self._short = slot < self.SHORT_PAGES
        new = batch_from_pages(bytes(memoryview(self.buf)[:slot * ps]), runs, self.layout, self.events.lut)
        merged = _merge(self.held, new)
        if flush:
            self.held = empty_batch()
            out = merged
        else:
            water = None
            for cpu, drained, t0 in marks:
                if drained:
                    w = t0 - self.HOLD_MARGIN_NS
                else:
                    mine = new.ts[new.cpu == cpu]
                    w = int(mine[-1]) if len(mine) else t0
                water = w if water is None else min(water, w)
            cut = int(np.searchsorted(merged.ts, water, side="right")) if water is not None else len(merged)
            out = _slice(merged, 0, cut)
            self.held = _compact(_slice(merged, cut, len(merged)))
        return out

    def close(self) -> None:
        for _, fd in self.fds:
            try:
                self.poll.unregister(fd)
            except (KeyError, ValueError, AttributeError):
                pass
            os.close(fd)
        self.fds = []


def _slice(b: Batch, i: int, j: int) -> Batch:
    return Batch(b.ev[i:j], b.tid[i:j], b.ts[i:j], b.cpu[i:j], b.rec[i:j], b.rlen[i:j], b.data)


def _compact(b: Batch) -> Batch:
    """A batch whose data holds only its own records (what is held over to the next read)."""
    if not len(b):
        return empty_batch()
    is_rec = b.ev != EV_LOST
    lens = np.where(is_rec, b.rlen, 0).astype(np.int64)
    new_off = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    total = int(lens.sum())
    src = np.frombuffer(b.data, np.uint8)
    idx = np.repeat(b.rec - new_off, lens) + np.arange(total, dtype=np.int64)
    data = src[idx].tobytes()
    return Batch(b.ev, b.tid, b.ts, b.cpu, np.where(is_rec, new_off, 0), b.rlen, data)


def _merge(a: Batch, b: Batch) -> Batch:
    if not len(a):
        return b
    if not len(b):
        return a
    shift = len(a.data)
    ts = np.concatenate([a.ts, b.ts])
    order = np.argsort(ts, kind="stable")
    return Batch(np.concatenate([a.ev, b.ev])[order], np.concatenate([a.tid, b.tid])[order], ts[order],
                 np.concatenate([a.cpu, b.cpu])[order],
                 np.concatenate([a.rec, np.where(b.ev != EV_LOST, b.rec + shift, 0)])[order],
                 np.concatenate([a.rlen, b.rlen])[order], a.data + b.data)


def load_layout(inst: Path, tracefs_root: Path | None = None) -> PageLayout:
    """The page layout of an instance, from its own events/header_page (which follows the instance's
    buffer_subbuf_size_kb), else the root's; its header_event must be the encoding decoded here.

    Without either (kernels before they existed), a page is the machine's page: 4 KiB or unsupported.
    """
    candidates = [inst / "events"]
    if tracefs_root is not None:
        candidates.append(tracefs_root / "events")
    for events in candidates:
        try:
            text = (events / "header_page").read_text()
        except OSError:
            continue
        layout = parse_header_page(text)
        try:
            check_header_event((events / "header_event").read_text())
        except OSError:
            pass  # header_page without header_event: never seen; the page format is the judge
        if events != candidates[0] and (inst / "buffer_subbuf_size_kb").exists():
            kb = int((inst / "buffer_subbuf_size_kb").read_text().strip() or 0)
            if kb * 1024 != layout.page_size:
                raise FormatError(f"sub-buffers of {kb} KiB but header_page says {layout.page_size} bytes")
        return layout
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        raise RawUnsupported("no events/header_page and pages are not 4 KiB")
    return PageLayout()


def read_clock(inst: Path) -> int:
    try:
        text = (inst / "trace_clock").read_text()
    except OSError as e:
        raise RawUnsupported(f"cannot read {inst}/trace_clock: {e.strerror}") from None
    m = re.search(r"\[(\w+)\]", text)
    name = m.group(1) if m else "?"
    if name not in CLOCKS:
        raise RawUnsupported(f"the instance's trace clock {name!r} has no userspace clock to merge CPUs by")
    return CLOCKS[name]


def check_byteorder() -> None:
    if sys.byteorder != "little":
        raise RawUnsupported("the raw decoder reads little-endian pages; this machine is big-endian")
