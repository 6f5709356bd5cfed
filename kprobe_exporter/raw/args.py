"""Raw args: a record's args as its trace text prints them, from its format's fields.

Counting and pairing need only the columns; args are decoded where a label or a span asks, per
distinct record: a probe's fetch args and a syscall's values by their fields and the kernel's
conversions, a plain tracepoint's by its print fmt applied to its fields. The tests check every
decoder against the kernel's own text of the same events.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kprobe_exporter import kernel as kernel_mod
from kprobe_exporter import labels, triggers
from kprobe_exporter.probes import EventSpec, ProbeSet
from kprobe_exporter.raw.formats import EventFormat, Field, FormatError, RawUnsupported, parse_format
from kprobe_exporter.raw.pages import EV_UNKNOWN

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
    # an eprobe's print fmt has no ip: its text prints `(SYSTEM.EVENT)` there, from the event it is on
    m = re.match(r'^"\((%lx|%lx <- %lx)\)(?P<rest>.*)",', pf) if ev.kind != "eprobe" else re.match(
        r'^"(?P<rest>.*)",', pf)
    if not m:
        raise FormatError(f"{fmt.name}: print fmt {pf[:60]!r} is not a probe's")
    ret = ev.kind != "eprobe" and "<-" in m.group(1)
    rest = m.group("rest")
    segs = list(_SEG_RE.finditer(rest))
    if "".join(s.group(0) for s in segs) != rest:
        raise FormatError(f"{fmt.name}: probe arg formats {rest!r} not understood")
    head = ev.key if ev.key.endswith(b":") else ev.name.encode() + b":"
    # print_*retprobe_event() print `(ret_ip <- func)`, the other way round from the format's print fmt
    ip_fields = ("__probe_ret_ip", "__probe_func") if ret else ("__probe_ip",) if ev.kind != "eprobe" else ()
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
            sign = body[:1] if body[:1] in (b"-", b"+") else b""  # the zeros go after the sign and 0x
            digits = body[len(sign):]
            pre = b""
            if digits[:2] in (b"0x", b"0X"):
                pre, digits = digits[:2], digits[2:]
            body = sign + pre + digits.rjust(width - len(body) + len(digits), b"0")
        else:
            body = body.rjust(width)
    return body


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


def synthetic_decoder(fmt: EventFormat) -> ArgDecoder:
    """A synthetic event's numeric fields, each as its decimal integer. Its text line prints `f=v` separated
    by spaces (print_synth_event), but its format file's print fmt separates them by ", " (`lat=%llu,
    ts0=%llu`): applied as a printf, it would leave a comma on every value but the last."""
    fields = fmt.own_fields
    for f in fields:
        if f.data_loc or f.count != 1 or f.size not in (1, 2, 4, 8):
            raise FormatError(f"{fmt.name}: field {f.name!r} ({f.ctype}) is not a number")

    def decode(rec: bytes) -> dict[str, bytes]:
        return {f.name: b"%d" % _int_at(rec, f.offset, f.size, f.signed) for f in fields}

    return decode


def make_decoder(ev: EventSpec, fmt: EventFormat, kernel: tuple[int, int]) -> ArgDecoder:
    """A record's args of `ev` as its text prints them, or FormatError saying why they cannot be read."""
    if ev.dynamic:
        return probe_decoder(ev, fmt)
    if ev.group == triggers.SYNTHETIC_GROUP:
        return synthetic_decoder(fmt)
    if _is_syscall(ev):
        return syscall_decoder(ev, fmt, kernel)
    return printf_decoder(ev, fmt)


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
        return cls(probes, formats, kernel or kernel_mod.version())


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
            make_decoder(ev, fmt, kernel or kernel_mod.version())
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


