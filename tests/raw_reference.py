"""Reference code the raw path is tested against, and that only tests use: an event-by-event page
decoder, and renderers of a record as the kernel's full trace text (head aside)."""

from __future__ import annotations

from collections.abc import Callable

from kprobe_exporter.probes import EventSpec
from kprobe_exporter.raw.args import (
    _int_at,
    _is_syscall,
    _probe_parts,
    _probe_value,
    printf_renderer,
    syscall_decoder,
)
from kprobe_exporter.raw.formats import EventFormat, PageLayout
from kprobe_exporter.raw.pages import (
    COMMIT_MASK,
    RB_MISSED_EVENTS,
    RB_MISSED_STORED,
    TS_MSB,
    TS_SHIFT,
    TYPE_PADDING,
    TYPE_TIME_EXTEND,
    TYPE_TIME_STAMP,
)

Renderer = Callable[[bytes], bytes]


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


def probe_renderer(ev: EventSpec, fmt: EventFormat) -> Renderer:
    """The text of a kprobe/uprobe record: `name: (ip) a=1 s="x"` or `name: (ret <- func) ret=3`.

    The ip prints as hex, where a kprobe's text has `sym+off/size`: the arg readers skip it.
    """
    head, ip_offs, parts = _probe_parts(ev, fmt)
    target = ev.target.replace("/", ".").encode()  # an eprobe prints the event it is on where others print ip

    def render(rec: bytes) -> bytes:
        ipt = b" <- ".join(b"0x%x" % _int_at(rec, o, s, False) for o, s in ip_offs) or target
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


def syscall_renderer(ev: EventSpec, fmt: EventFormat, kernel: tuple[int, int]) -> Renderer:
    """`sys_x(a: 0x1, b: 2)` / `sys_x -> 0x3`, the text of a syscall record."""
    name = ev.target.partition("/")[2]
    decode = syscall_decoder(ev, fmt, kernel)
    if name.startswith("sys_exit_"):
        head = b"sys_" + name[len("sys_exit_"):].encode() + b" -> "
        return lambda rec: head + decode(rec)["ret"]
    head = b"sys_" + name[len("sys_enter_"):].encode() + b"("
    return lambda rec: head + b", ".join(k.encode() + b": " + v for k, v in decode(rec).items()) + b")"


def make_renderer(ev: EventSpec, fmt: EventFormat, kernel: tuple[int, int]) -> Renderer:
    """The kernel's text for one record of `ev`, or FormatError saying why it cannot be made."""
    if ev.kind != "tracepoint":
        return probe_renderer(ev, fmt)
    if _is_syscall(ev):
        return syscall_renderer(ev, fmt, kernel)
    return printf_renderer(ev, fmt)
