"""Raw pages: per-CPU ring-buffer pages decoded into event columns, merged across CPUs by time.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kprobe_exporter.raw.formats import FormatError, PageLayout

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
    page_ts, length, missed = _page_headers(w, pbase, layout)
    start = pbase + layout.data_off // 4
    end = start + length // 4
    at = _walk(w, page_base // 4, npages, pw, start, end)
    h = w[at]
    tl = (h & 31).astype(np.int64)
    page = ((at - page_base // 4) // pw).astype(np.int32)
    ts, ext, stamp = _timestamps(w, at, h, tl, page, page_ts)
    data = tl <= TYPE_DATA_MAX
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
    data_idx = np.flatnonzero(data)
    if not ok.all():
        d_rec, d_len, data_idx = d_rec[ok], d_len[ok], data_idx[ok]
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


def _page_headers(w: U32, pbase: I64, layout: PageLayout) -> tuple[I64, I64, I64]:
    """Per page: header timestamp, data bytes, and events missed before it (-1 none, 0 uncounted)."""
    npages = len(pbase)
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
    return page_ts, length, missed


def _timestamps(w: U32, at: I64, h: U32, tl: I64, page: I32, page_ts: I64) -> tuple[I64, Bool, Bool]:
    """Each header's timestamp: a cumulative sum of the deltas, restarted at each page (from its header
    timestamp) and at each absolute timestamp; and which headers were time extends and stamps."""
    delta = (h >> 5).astype(np.int64)
    ext = tl == TYPE_TIME_EXTEND
    stamp = tl == TYPE_TIME_STAMP
    inc = np.where(tl <= TYPE_DATA_MAX, delta, 0)
    if ext.any():
        inc[ext] = (w[at[ext] + 1].astype(np.int64) << TS_SHIFT) + delta[ext]
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
    return ts, ext, stamp


# Words from a header to the next one, by type_len: 1..28 carry 4*type_len bytes of data, a time
# extend or stamp is two words; 0 (a long record) and 29 (padding) say their length in array[0].
_STEP = np.array([0] + [t + 1 for t in range(1, TYPE_DATA_MAX + 1)] + [0, 2, 2], np.int64)


def _walk(w: U32, first: int, npages: int, pw: int, start: I64, end: I64) -> I64:
    """Word positions of every event header in the pages, in order.

    An event's length is in its own header, so a page is a chain: all pages follow their chains in
    lock step, one event of every page per step, ~8 numpy calls a step whatever the number of pages
    (the alternatives measured slower: bench/README.md).
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


def slice_batch(b: Batch, i: int, j: int) -> Batch:
    return Batch(b.ev[i:j], b.tid[i:j], b.ts[i:j], b.cpu[i:j], b.rec[i:j], b.rlen[i:j], b.data)


def compact_batch(b: Batch) -> Batch:
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


def merge_batches(a: Batch, b: Batch) -> Batch:
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
