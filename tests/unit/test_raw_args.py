"""raw.args: a record's args from its format's fields; a plain tracepoint's through its print fmt."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import pytest

import raw_reference
from kprobe_exporter import config, probes
from kprobe_exporter.raw import args as raw_args
from kprobe_exporter.raw import formats as raw_formats
from kprobe_exporter.raw import pages as raw_pages


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
    # the args, as the text's reader takes them from that line
    assert raw_args.make_decoder(ev, fmt, (6, 18))(rec) == {
        "comm": b"hello", "prio": b"-3", "addr": b"0x0000beef", "neg": b"4294967293", "pct": b"100%"}
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
    assert events.probes is ps  # the reader names events through it
    with pytest.raises(raw_formats.RawUnsupported) as e:
        events.require_decoders(["t", "s"])
    assert str(e.value) == ("args needed for labels or spans cannot be decoded: "
                            "s: s: arg 'p' prints as '%pS' (a symbol?), not rendered here")
    # an event not installed (a reload lost a race): no decoder, and the events after it still mapped
    lost = raw_args.RawEvents(ps, [None, fmt_t, fmt_r], (6, 1))
    assert lost.decode_errors == {"s": "not installed"} and lost.decoders[0] is None
    assert lost.lut[8] == 1 and lost.lut[9] == 2 and lost.lut[7] == raw_pages.EV_UNKNOWN
    with pytest.raises(raw_formats.FormatError) as e2:
        raw_args.RawEvents(ps, [fmt_s, fmt_t, fmt_t], (6, 1))
    assert str(e2.value) == "events t_ret and t share id 8"
    with pytest.raises(ValueError):  # one format per event, or nothing
        raw_args.RawEvents(ps, [fmt_s, fmt_t], (6, 1))
    assert events.args(0, struct.pack("<HBBiQQ", 7, 0, 0, 1, 0, 0)) == {}  # no decoder: no args, no error


def test_print_fmt_literals_and_nul_terminated_strings() -> None:
    """A print fmt's C string literal with each escape the kernel's formats use; an unknown escape is a
    FormatError naming it; a trailing backslash stays. A string field ends at its first NUL, else at its end."""
    assert raw_args._c_string(r"a\n\t\"\\\'\rb") == b'a\n\t"\\\'\rb'
    assert raw_args._c_string("x=%d\\") == b"x=%d\\" and raw_args._c_string(r"x\n") == b"x\n"  # escape last
    assert raw_args._c_string("") == b""
    with pytest.raises(raw_args.FormatError, match=r"escape \\q"):
        raw_args._c_string(r"a\qb")
    assert raw_args._cstr(b"ab\0cd\0") == b"ab"
    assert raw_args._cstr(b"abc") == b"abc"
    assert raw_args._cstr(b"\0abc") == b""


def test_one_conversion_renders_as_c_printf_does() -> None:
    """_printf1 against the C library's snprintf (the kernel's vsnprintf agrees on these): integer
    conversions with each length, flag and width the print fmts use, and %s."""
    libc = ctypes.CDLL(None)
    buf = ctypes.create_string_buffer(64)
    values = [0, 1, -1, 7, 127, 128, 255, 256, -128, 0x1234, 65535, 65536, 2**31 - 1, -(2**31), 2**32 - 1,
              0x1234ABCD5678, 2**63 - 1, -(2**63)]
    checked = 0
    for ln in (b"hh", b"h", b"", b"l", b"ll"):
        for conv in b"diuoxXc":
            for flags in (b"", b"-", b"+", b"0", b"#", b"-0", b"+0", b"#0"):
                if b"#" in flags and conv not in b"xX":
                    continue  # (%#o's leading 0 is not rendered: no print fmt uses it)
                for width in (b"", b"1", b"6", b"20"):
                    spec = b"%" + flags + width + ln + bytes([conv])
                    for v in values:
                        if conv == ord("c") and (ln or v & 0xFF == 0):
                            continue  # a NUL would end snprintf's string
                        arg = ctypes.c_longlong(v) if ln in (b"l", b"ll") else ctypes.c_int(
                            (v & 0xFFFFFFFF) - ((v & 0x80000000) << 1))
                        libc.snprintf(buf, 64, spec, arg)
                        assert raw_args._printf1(spec, v) == buf.value, (spec, v)
                        checked += 1
    assert checked > 10_000
    assert raw_args._printf1(b"%s", b"ab") == b"ab" and raw_args._printf1(b"%5s", b"ab") == b"   ab"
    assert raw_args._printf1(b"%-5s", b"ab") == b"ab   " and raw_args._printf1(b"%s", 42) == b"42"
    with pytest.raises(raw_args.FormatError, match="a string for a numeric conversion"):
        raw_args._printf1(b"%d", b"ab")


_CASTS = {"unsigned long": ctypes.c_uint64, "long": ctypes.c_int64, "unsigned long long": ctypes.c_uint64,
          "long long": ctypes.c_int64, "unsigned int": ctypes.c_uint32, "int": ctypes.c_int32, "u64": ctypes.c_uint64,
          "s64": ctypes.c_int64, "u32": ctypes.c_uint32, "s32": ctypes.c_int32, "unsigned": ctypes.c_uint32,
          "u16": ctypes.c_uint16, "s16": ctypes.c_int16, "u8": ctypes.c_uint8, "s8": ctypes.c_int8,
          "unsigned short": ctypes.c_uint16, "short": ctypes.c_int16, "unsigned char": ctypes.c_uint8,
          "char": ctypes.c_int8, "size_t": ctypes.c_size_t, "pid_t": ctypes.c_int32}  # char is signed on x86
_CAST_FIELDS = [("s8 b", 12, 1, 1, ctypes.c_int8), ("u8 ub", 13, 1, 0, ctypes.c_uint8),
                ("short h", 14, 2, 1, ctypes.c_int16), ("int i", 16, 4, 1, ctypes.c_int32),
                ("unsigned int ui", 20, 4, 0, ctypes.c_uint32), ("long l", 24, 8, 1, ctypes.c_int64),
                ("unsigned long ul", 32, 8, 0, ctypes.c_uint64), ("int X", 48, 4, 1, ctypes.c_int32)]
_CAST_FORMAT = "name: casts\nID: 901\nformat:\n" + "".join(
    f"\tfield:{d};\toffset:{o};\tsize:{s};\tsigned:{g};\n" for d, o, s, g in [
        ("unsigned short common_type", 0, 2, 0), ("unsigned char common_flags", 2, 1, 0),
        ("unsigned char common_preempt_count", 3, 1, 0), ("int common_pid", 4, 4, 1),
        ("__data_loc char[] comm", 8, 4, 0), *[(d, o, s, g) for d, o, s, g, _ in _CAST_FIELDS],
        ("u16 arr[4]", 40, 8, 0)]) + '\nprint fmt: "x=%d", REC->i\n'


def test_print_fmt_arguments_read_fields_and_casts_as_c_does() -> None:
    """A print fmt argument is a field (an array's element), __get_str of a __data_loc field, or either under
    C casts: each value is what C gives (ctypes' integer conversions), casts applied innermost first, and
    the arguments split at the commas outside parentheses and brackets."""
    import random

    rng = random.Random(901)
    fmt = raw_formats.parse_format(_CAST_FORMAT)
    for _ in range(3000):
        rec = bytearray(rng.randbytes(56))
        rec[0:2] = struct.pack("<H", 901)
        s = rng.choice([b"init", b"", b"a b\0junk", b"x" * 20])
        rec[8:12] = struct.pack("<I", (len(s) << 16) | 56)
        rec = bytes(rec) + s
        decl, off, _, _, ctype = rng.choice(_CAST_FIELDS)
        expr = "REC->" + decl.split()[-1]
        want = ctype.from_buffer_copy(rec, off).value
        if rng.random() < 0.2:
            k = rng.randrange(4)
            expr, want = f"REC->arr[{k}]", struct.unpack_from("<H", rec, 40 + 2 * k)[0]
        for _ in range(rng.randint(0, 3)):
            name = rng.choice(list(_CASTS))
            expr = f"({name}){expr}" if rng.random() < 0.5 else f"({name})({expr})"
            want = _CASTS[name](want).value
        if rng.random() < 0.3:
            expr = f"( {expr} )"
        assert raw_args._arg_fn(expr, fmt)(rec) == want, expr
    rec = bytes(rec[:8]) + struct.pack("<I", (5 << 16) | 56) + bytes(44) + b"ab\0cd"
    assert raw_args._arg_fn("__get_str(comm)", fmt)(rec) == b"ab"
    assert raw_args._arg_fn("(__get_str( comm ))", fmt)(rec) == b"ab"
    assert raw_args._split_args(" ((unsigned int)(REC->i)), REC->X,f(a, b), g[1, (2)] ,REC->arr[0] ") == [
        "((unsigned int)(REC->i))", "REC->X", "f(a, b)", "g[1, (2)]", "REC->arr[0]"]
    assert raw_args._split_args("") == [] and raw_args._split_args("REC->i") == ["REC->i"]
    for expr, text in [("__get_str(i)", "casts: __get_str(i) has no __data_loc field"),
                       ("__get_str(nope)", "casts: __get_str(nope) has no __data_loc field"),
                       ("REC->comm", "casts: print fmt argument 'REC->comm' has no plain field"),
                       ("REC->nope", "casts: print fmt argument 'REC->nope' has no plain field"),
                       ("REC->arr", "casts: print fmt argument 'REC->arr' not understood"),
                       ("REC->arr[4]", "casts: print fmt argument 'REC->arr[4]' not understood"),
                       ("REC->i + 1", "casts: print fmt argument 'REC->i + 1' not understood"),
                       ("(struct x)REC->i", "casts: print fmt argument '(struct x)REC->i' not understood")]:
        with pytest.raises(raw_formats.FormatError) as e:
            raw_args._arg_fn(expr, fmt)
        assert str(e.value) == text


_COMMON = ("\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
           "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n"
           "\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n"
           "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n")


def _fmt(name: str, fields: str, print_fmt: str, ident: int = 950) -> raw_formats.EventFormat:
    return raw_formats.parse_format(f"name: {name}\nID: {ident}\nformat:\n{_COMMON}{fields}\nprint fmt: {print_fmt}\n")


def test_syscall_values_as_print_syscall_enter_and_exit_print_them() -> None:
    """6.18's print_syscall_enter: a value below 10 in decimal, else 0x%lx, of the unsigned long; before
    6.18 %lx; an exit's one value `ret` as 0x%lx. Fields that are not unsigned longs are a FormatError."""
    fields = ("\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n"
              "\tfield:unsigned long dfd;\toffset:16;\tsize:8;\tsigned:0;\n"
              "\tfield:unsigned long mode;\toffset:24;\tsize:8;\tsigned:0;\n")
    enter = _fmt("sys_enter_openat", fields, '"dfd: 0x%08lx, mode: 0x%08lx", REC->dfd, REC->mode')
    ev = probes.EventSpec("o", "tracepoint", "syscalls", "syscalls/sys_enter_openat", "openat", None)
    for dfd, mode, new, old in [(9, 10, (b"9", b"0xa"), (b"9", b"a")),
                                (2**64 - 1, 0, (b"0xffffffffffffffff", b"0"), (b"ffffffffffffffff", b"0"))]:
        rec = struct.pack("<HBBiiiQQ", 950, 0, 0, 1, 257, 0, dfd, mode)
        assert raw_args.make_decoder(ev, enter, (6, 18))(rec) == dict(zip(("dfd", "mode"), new, strict=True))
        assert raw_args.make_decoder(ev, enter, (6, 12))(rec) == dict(zip(("dfd", "mode"), old, strict=True))
    exit_fields = ("\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n"
                   "\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;\n")
    ex = _fmt("sys_exit_openat", exit_fields, '"0x%lx", REC->ret')
    xev = probes.EventSpec("o_ret", "tracepoint", "syscalls", "syscalls/sys_exit_openat", "openat", None)
    rec = struct.pack("<HBBiiiq", 950, 0, 0, 1, 257, 0, -2)
    assert raw_args.make_decoder(xev, ex, (6, 18))(rec) == {"ret": b"0xfffffffffffffffe"}
    nr = "\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n"
    for bad_fields, target, text in [
            (nr + "\tfield:int fd;\toffset:16;\tsize:4;\tsigned:1;\n",
             "syscalls/sys_enter_openat",
             "sys_enter_openat: syscall fields other than unsigned longs (user strings?) not rendered here"),
            (nr + "\tfield:u32 two[2];\toffset:16;\tsize:8;\tsigned:0;\n",
             "syscalls/sys_enter_openat",
             "sys_enter_openat: syscall fields other than unsigned longs (user strings?) not rendered here"),
            (exit_fields + "\tfield:long more;\toffset:24;\tsize:8;\tsigned:1;\n", "syscalls/sys_exit_openat",
             "sys_enter_openat: a syscall exit with 2 fields")]:
        tev = probes.EventSpec("o", "tracepoint", "syscalls", target, "openat", None)
        with pytest.raises(raw_formats.FormatError) as e:
            raw_args.make_decoder(tev, _fmt("sys_enter_openat", bad_fields, '"x"'), (6, 18))
        assert str(e.value) == text


def test_printf_tracepoint_args_are_read_as_the_texts_reader_reads_them() -> None:
    """A tracepoint's args through its print fmt: a comm that holds a tab, `=` and a non-UTF-8 byte after
    a space renders as the kernel prints it, and its args are what the text's reader takes from that text;
    `%%` before other conversions; a print fmt without arguments; conversions and arguments that do not
    match are FormatErrors that say so."""
    from kprobe_exporter import parser

    fields = ("\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:1;\n"
              "\tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:0;\n"
              "\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;\n")
    fmt = _fmt("demo", fields, '"pct=100%% name=%s prio=%d", __get_str(name), REC->prio')
    ev = probes.EventSpec("demo", "tracepoint", "g", "g/demo", "demo", None, key=b"demo:")
    name = b"x\ty=z \xff=1"
    rec = struct.pack("<HBBi16sIi", 950, 0, 0, 1, b"", (len(name) << 16) | 32, -3) + name
    text = b"demo: pct=100% name=x\ty=z \xff=1 prio=-3"
    assert raw_args.printf_renderer(ev, fmt)(rec) == text
    assert raw_args.make_decoder(ev, fmt, (6, 18))(rec) == parser.tracepoint_arg_reader(ev)(text)
    assert raw_args.make_decoder(ev, fmt, (6, 18))(rec)["name"] == b"x\ty=z"
    bare = _fmt("demo", fields, '"started"')
    assert raw_args.printf_renderer(ev, bare)(rec) == b"demo: started"
    for pf, text in [('"a=%d b=%d", REC->prio', "demo: print fmt has more conversions than arguments"),
                     ('"a=%d", REC->prio, REC->prio', "demo: print fmt conversions and arguments do not match"),
                     ('"a=%d b=%y", REC->prio', "demo: print fmt conversions and arguments do not match"),
                     ('"a=%pS", REC->prio', "demo: %p and precisions are not rendered here"),
                     ('"a=%.3d", REC->prio', "demo: %p and precisions are not rendered here"),
                     ("REC->prio", "demo: print fmt not understood")]:
        with pytest.raises(raw_formats.FormatError) as e:
            raw_args.printf_renderer(ev, _fmt("demo", fields, pf))
        assert str(e.value) == text


def test_hex_array_args_and_span_ends_need_args() -> None:
    """A probe's x32 array prints `{0x2f,0x65}` (print_type_x32 per element); args are needed for labelled
    events and, with spans on, for both ends of each pair that has spans."""
    fmt = _fmt("p", "\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;\n"
                    "\tfield:u32 arr[2];\toffset:16;\tsize:8;\tsigned:0;\n",
               '"(%lx) arr={0x%x,0x%x}", REC->__probe_ip, REC->arr[0], REC->arr[1]')
    ev = probes.EventSpec("p", "kprobe", "g", "f", "f", "p:g/p f arr=+0(%di):x32[2]",
                          (probes.ArgSpec("arr", "+0(%di):x32[2]", False),))
    rec = struct.pack("<HBBiQII", 950, 0, 0, 1, 0xFFFF0000, 0x2F, 0xFFFFFFFF)
    assert raw_args.make_decoder(ev, fmt, (6, 18))(rec) == {"arr": b"{0x2f,0xffffffff}"}
    ps = probes.build_probe_set(config.load_text(
        "probes:\n  - {name: a, kprobe: f, latency: true, spans: {sample_ratio: 0.5}}\n"
        "  - {name: b, kprobe: g, latency: true}\n  - {name: c, kprobe: i, latency: true, spans: {}}\n"
        "  - {name: s, kprobe: h, args: {p: '$arg1'}, labels: [p]}\n"), resolve=None)
    assert raw_args.args_needed(ps, spans=False) == ["s"]
    assert raw_args.args_needed(ps, spans=True) == ["s", "a", "a_ret", "c", "c_ret"]


def test_probe_formats_values_and_what_is_not_rendered() -> None:
    """A u32 printed %u is unsigned whatever its top bit; a one-element x32 array; and each probe format
    the decoder cannot render is a FormatError that names the event and what it could not read."""
    ip = "\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;\n"
    ev = probes.EventSpec("p", "kprobe", "g", "f", "f", "p:g/p f", ())
    fmt = _fmt("p", ip + "\tfield:u32 b;\toffset:16;\tsize:4;\tsigned:0;\n"
                         "\tfield:u32 one[1];\toffset:20;\tsize:4;\tsigned:0;\n",
               '"(%lx) b=%u one={0x%x}", REC->__probe_ip, REC->b, REC->one')
    rec = struct.pack("<HBBiQII", 950, 0, 0, 1, 0xFFFF0000, 0xFFFFFFFF, 0x80000000)
    assert raw_args.make_decoder(ev, fmt, (6, 18))(rec) == {"b": b"4294967295", "one": b"{0x80000000}"}
    arr = ip + "\tfield:u32 arr[2];\toffset:16;\tsize:8;\tsigned:0;\n"
    long_pf = '"' + "x" * 80 + ' %d", REC->x'
    for fields, pf, text in [
            (arr, '"(%lx) arr={0x%x,%u}", REC->__probe_ip, REC->arr', "p: array arg '{0x%x,%u}' not understood"),
            (arr, '"(%lx) arr={0x%x,0x%x,0x%x}", REC->__probe_ip, REC->arr',
             "p: array arg '{0x%x,0x%x,0x%x}' not understood"),
            (arr, '"(%lx) arr={%q,%q}", REC->__probe_ip, REC->arr', "p: array arg '{%q,%q}' not understood"),
            (arr, '"(%lx) arr=%pS", REC->__probe_ip, REC->arr',
             "p: arg 'arr' prints as '%pS' (a symbol?), not rendered here"),
            (arr, '"(%lx) nope=%u", REC->__probe_ip, REC->nope', "p: arg 'nope' has no field"),
            (arr, '"(%lx) arr=%u extra", REC->__probe_ip, REC->arr',
             "p: probe arg formats ' arr=%u extra' not understood"),
            ("", '"(%lx <- %lx)", REC->__probe_func, REC->__probe_ret_ip', "p: no __probe_ret_ip, __probe_func field"),
            ("", '"x=%d", REC->x', "p: print fmt '\"x=%d\", REC->x' is not a probe's"),
            ("", long_pf, f"p: print fmt {long_pf[:60]!r} is not a probe's")]:
        with pytest.raises(raw_formats.FormatError) as e:
            raw_args.make_decoder(ev, _fmt("p", fields, pf), (6, 18))
        assert str(e.value) == text


KSPANS = Path(__file__).resolve().parents[1] / "fixtures" / "linux-6.1-debian" / "kernel-spans"


def test_synthetic_event_args_are_what_its_text_line_prints() -> None:
    """A kernel-mode pair's synthetic event, as 6.1 defined it (kernel-spans/): its format file's print fmt
    separates fields by ", " while its text line separates them by spaces; the raw decoder must give what
    the line gives (a printf of the print fmt left `lat=123,`: no span ever came from the raw reader).
    Each record is built at the format's offsets from a captured line's values, then decoded."""
    from kprobe_exporter import aggmode

    fmt = raw_formats.parse_format((KSPANS / "synthetic_spans.format").read_text())
    ev = aggmode.span_event(fmt.name, "work", ret=True)
    decode = raw_args.make_decoder(ev, fmt, (6, 1))
    lines = [ln for ln in (KSPANS / "synthetic_spans.trace").read_text().splitlines() if f" {fmt.name}: " in ln]
    assert len(lines) == 5
    for line in lines:
        want = dict(kv.split("=") for kv in line.split(f" {fmt.name}: ")[1].split())
        rec = bytearray(40)
        struct.pack_into("<H", rec, 0, fmt.id)
        for name, v in want.items():
            f = fmt.field(name)
            assert f is not None
            rec[f.offset:f.offset + f.size] = int(v).to_bytes(f.size, "little", signed=f.signed)
        assert decode(bytes(rec)) == {k: v.encode() for k, v in want.items()}
    neg = bytearray(40)
    pid = fmt.field("pid")
    assert pid is not None and pid.signed
    neg[pid.offset:pid.offset + 4] = (-5).to_bytes(4, "little", signed=True)
    assert decode(bytes(neg))["pid"] == b"-5"  # `int pid` prints as %d
    bad = raw_formats.parse_format((KSPANS / "synthetic_spans.format").read_text().replace(
        "field:u64 ret;\toffset:32;\tsize:8;", "field:__data_loc char[] ret;\toffset:32;\tsize:4;"))
    with pytest.raises(raw_formats.FormatError, match="'ret'"):
        raw_args.make_decoder(ev, bad, (6, 1))
