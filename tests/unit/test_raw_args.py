"""raw.args: a record's args from its format's fields; a plain tracepoint's through its print fmt."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import raw_fixtures
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


# check_probes and RawEvents.load read format files only. Their tests lay REAL captured format files out in a
# temporary directory as tracefs lays them out (events/GROUP/EVENT/format): it stands in for tracefs, since
# the unit tier has no kernel to ask.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CAPTURED = {  # tracefs path -> a format file captured from that path of a real kernel
    "syscalls/sys_enter_openat": "raw/linux-6.18/uprobes-syscalls/events/syscalls/sys_enter_openat",
    "syscalls/sys_exit_openat": "raw/linux-6.18/uprobes-syscalls/events/syscalls/sys_exit_openat",
    "kpe_rawcap/open_path": "raw/linux-6.18/uprobes-syscalls/events/kpe_rawcap/open_path",
    "kpe_rawcap/open_path_ret": "raw/linux-6.18/uprobes-syscalls/events/kpe_rawcap/open_path_ret",
    "kpe_rawcap/compute": "raw/linux-6.18/uprobes-syscalls/events/kpe_rawcap/compute",
    "kpe_rawcap/compute_ret": "raw/linux-6.18/uprobes-syscalls/events/kpe_rawcap/compute_ret",
    "kpe_rawcap/sleep_us": "raw/linux-6.18/time-extend/events/kpe_rawcap/sleep_us",  # ID 2326, as open_path's
    "sched/sched_switch": "linux-6.18/tracepoint-formats/events/sched/sched_switch",
    "sched/sched_process_fork": "linux-6.18/tracepoint-formats/events/sched/sched_process_fork",
    "syscalls/sys_enter_getppid": "linux-6.18/tracepoint-formats/events/syscalls/sys_enter_getppid",
    "syscalls/sys_exit_getppid": "linux-6.18/tracepoint-formats/events/syscalls/sys_exit_getppid",
    "kpe612/eopen": "linux-6.12-debian/raw/eprobe/events/kpe612/eopen",
}


@contextlib.contextmanager
def _tracefs(*events: str) -> Iterator[Path]:
    """A temporary directory standing in for tracefs, with the captured format of each of `events`."""
    with tempfile.TemporaryDirectory(prefix="kpe-fake-tracefs-") as d:
        root = Path(d)
        for ev in events:
            (root / "events" / ev).mkdir(parents=True)
            shutil.copyfile(FIXTURES / CAPTURED[ev] / "format", root / "events" / ev / "format")
        yield root


_CHECKED = """instance: kpe_t
probes:
  - {name: up, uprobe: '/bin/true:0x10', args: {a: '%di:u32', s: '+0(%si):string'}, labels: [a]}
  - {name: opn, tracepoint: syscalls/sys_enter_openat, labels: [dfd]}
  - {name: fork, tracepoint: sched/sched_process_fork, labels: [child_comm]}
  - {name: gp, tracepoint: syscalls/sys_enter_getppid, latency: true, spans: {}}
  - {name: wake, tracepoint: sched/sched_wakeup}
  - {name: sw_count, tracepoint: sched/sched_switch}
"""
_NEEDED = ("syscalls/sys_enter_openat", "sched/sched_process_fork", "syscalls/sys_enter_getppid",
           "syscalls/sys_exit_getppid")


def _probe_set(text: str) -> probes.ProbeSet:
    return probes.build_probe_set(config.load_text(text), resolve=None)


def _refusal(ps: probes.ProbeSet, root: Path, spans: bool, kernel: tuple[int, int] | None = (6, 18)) -> str:
    with pytest.raises(raw_formats.RawUnsupported) as e:
        raw_args.check_probes(ps, root, spans=spans, kernel=kernel)
    return str(e.value)


PREFIX = "args needed for labels or spans cannot be decoded: "


def test_check_probes_reads_the_formats_of_the_events_whose_args_are_needed() -> None:
    """Only the events whose args labels or spans need are judged, a tracepoint by its format file under
    tracefs_root/events/GROUP/EVENT: a syscall's, a plain printf's, an argumentless syscall's and its exit all
    decode; the uprobe's (no symbol) needs no file; an event counted without labels is never read (no
    sched_wakeup file here, sched_switch's helpers unread). Spans off: the pair's ends are not needed."""
    ps = _probe_set(_CHECKED)
    with _tracefs(*_NEEDED) as root:
        raw_args.check_probes(ps, root, spans=True, kernel=(6, 18))
        raw_args.check_probes(ps, root, spans=True, kernel=(6, 1))
        raw_args.check_probes(ps, root, spans=True)  # the running kernel's conversions
        raw_args.check_probes(ps, root, spans=False)
    with _tracefs("syscalls/sys_enter_openat", "sched/sched_process_fork") as root:
        raw_args.check_probes(ps, root, spans=False)  # the getppid pair's files are not read without spans
        assert _refusal(ps, root, spans=True) == (
            PREFIX + "gp: No such file or directory; gp_ret: No such file or directory")
    with _tracefs() as root:
        # every file missing: each needed tracepoint named once, in the probe set's order; not the uprobe
        assert _refusal(ps, root, spans=True, kernel=None) == PREFIX + "; ".join(
            f"{n}: No such file or directory" for n in ("opn", "fork", "gp", "gp_ret"))
    uprobe_only = _probe_set("instance: kpe_t\nprobes:\n"
                             "  - {name: up, uprobe: '/bin/true:0x10', args: {a: '%di:u32'}, labels: [a]}\n")
    raw_args.check_probes(uprobe_only, Path("/nonexistent-tracefs"), spans=True)  # reads no file at all


def test_check_probes_names_each_event_it_cannot_decode_and_why() -> None:
    """Symbol fetch args (`sym+off/size` needs the kernel's symbol table), a missing format file and a format
    the decoder cannot read (sched_switch passes `char prev_comm[16]` whole and prints with __print_flags):
    one refusal naming every such event and its reason, in the probe set's order, a dynamic probe's first
    symbol arg (the rest of its args and a `symstr`, a string, are fine)."""
    ps = _probe_set("""instance: kpe_t
probes:
  - {name: sym, kprobe: f, args: {a: '%di:u32', p: '%si:symbol', q: '%dx:symbol'}, labels: [a]}
  - {name: sw, tracepoint: sched/sched_switch, labels: [prev_state]}
  - {name: str, kprobe: g, args: {n: '%si:symstr'}, labels: [n]}
  - {name: arr, kprobe: h, args: {v: '+0(%di):symbol[2]'}, labels: [v]}
  - {name: wr, tracepoint: syscalls/sys_enter_write, labels: [fd]}
  - {name: opn, tracepoint: syscalls/sys_enter_openat, labels: [dfd]}
""")
    with _tracefs("sched/sched_switch", "syscalls/sys_enter_openat") as root:
        assert _refusal(ps, root, spans=False) == PREFIX + (
            "sym: arg 'p' is a symbol; "
            "sw: sched_switch: print fmt argument 'REC->prev_comm' not understood; "
            "arr: arg 'v' is a symbol; "
            "wr: No such file or directory")
    # a format file the parser refuses (cut before its name and ID lines) is named the same way
    with _tracefs("syscalls/sys_enter_openat") as root:
        f = root / "events" / "syscalls" / "sys_enter_openat" / "format"
        f.write_text(f.read_text().split("format:\n", 1)[1])
        ps2 = _probe_set("probes:\n  - {name: opn, tracepoint: syscalls/sys_enter_openat, labels: [dfd]}\n")
        assert _refusal(ps2, root, spans=False) == PREFIX + "opn: format file without name or ID"


def _scenario(name: str) -> probes.ProbeSet:
    """The probe set that installed a captured raw fixture's events (its meta.json)."""
    meta = json.loads((raw_fixtures.K618 / name / "meta.json").read_text())
    return raw_fixtures.probe_set(meta["scenario"])


def _dirs(root: Path, ps: probes.ProbeSet) -> list[Path]:
    """Each event's directory under a tracefs root, as the reader's event_dir gives it."""
    return [root / "events" / (f"{ev.group}/{ev.name}" if ev.dynamic else ev.target) for ev in ps.events]


# the ID line of each captured format file of the uprobes-syscalls scenario, in its events' order
_IDS = {"open_path": 2326, "open_path_ret": 2327, "compute": 2331, "compute_ret": 2332,
        "sys_enter_openat": 782, "sys_exit_openat": 781}
_UPROBES_SYSCALLS = ("kpe_rawcap/open_path", "kpe_rawcap/open_path_ret", "kpe_rawcap/compute",
                     "kpe_rawcap/compute_ret", "syscalls/sys_enter_openat", "syscalls/sys_exit_openat")


def test_raw_events_load_maps_each_format_id_to_its_event() -> None:
    """Loaded from each event's directory (a temporary tracefs of the 6.18 uprobes-syscalls capture): each
    file's ID maps to its event's index and no other id maps anywhere; every event has its format and a
    decoder; the kernel given (else the running one's) picks the syscall conversions (6.18: below 10 in
    decimal, else 0x%lx; before: %lx)."""
    ps = _scenario("uprobes-syscalls")
    assert [ev.name for ev in ps.events] == list(_IDS)
    with _tracefs(*_UPROBES_SYSCALLS) as root:
        events = raw_args.RawEvents.load(_dirs(root, ps), ps, (6, 1))
        running = raw_args.RawEvents.load(_dirs(root, ps), ps)
    for ev in (events, running):
        assert ev.probes is ps
        assert [int(ev.lut[i]) for i in _IDS.values()] == list(range(6))
        assert int((ev.lut != raw_pages.EV_UNKNOWN).sum()) == 6
        assert [f.name if f else None for f in ev.formats] == list(_IDS)
        assert ev.decode_errors == {} and all(d is not None for d in ev.decoders)
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert m is not None
    assert events.kernel == (6, 1) and running.kernel == (int(m.group(1)), int(m.group(2)))
    # sys_enter_openat's fields are unsigned longs at 16 (dfd), 24, 32, 40 (its format file)
    rec = struct.pack("<HBBiiiQQQQ", 782, 0, 0, 1, 257, 0, 10, 0x7FFC0000, 0x241, 0o644)
    assert events.args(4, rec) == {"dfd": b"a", "filename": b"7ffc0000", "flags": b"241", "mode": b"1a4"}
    assert raw_args.RawEvents.load(_dirs(FIXTURES / "raw/linux-6.18/uprobes-syscalls", ps), ps, (6, 18)).args(
        4, rec) == {"dfd": b"0xa", "filename": b"0x7ffc0000", "flags": b"0x241", "mode": b"0x1a4"}


def test_raw_events_load_strict_refuses_a_missing_format_and_lenient_leaves_the_event_out() -> None:
    """strict (the default): an event without a format file is RawUnsupported naming the event, its file and
    the OS's reason, with no chained traceback. strict=False: that event (not installed: a reload lost a race)
    gets no format, no decoder and `not installed`, its id maps nowhere, and the events after it load. One
    directory per event, or ValueError."""
    ps = _scenario("uprobes-syscalls")
    with _tracefs(*(e for e in _UPROBES_SYSCALLS if e != "kpe_rawcap/compute")) as root:
        dirs = _dirs(root, ps)
        with pytest.raises(raw_formats.RawUnsupported) as e:
            raw_args.RawEvents.load(dirs, ps, (6, 18))
        assert str(e.value) == (f"cannot read the format of compute ({root}/events/kpe_rawcap/compute/format): "
                                "No such file or directory")
        assert e.value.__cause__ is None and e.value.__suppress_context__
        with pytest.raises(raw_formats.RawUnsupported):
            raw_args.RawEvents.load(dirs, ps, (6, 18), strict=True)
        lenient = raw_args.RawEvents.load(dirs, ps, (6, 18), strict=False)
        with pytest.raises(ValueError):
            raw_args.RawEvents.load(dirs[:-1], ps, (6, 18), strict=False)
        with pytest.raises(ValueError):
            raw_args.RawEvents.load([*dirs, dirs[0]], ps, (6, 18), strict=False)
    assert lenient.decode_errors == {"compute": "not installed"}
    assert [d is None for d in lenient.decoders] == [False, False, True, False, False, False]
    assert [f.name if f else None for f in lenient.formats] == [
        "open_path", "open_path_ret", None, "compute_ret", "sys_enter_openat", "sys_exit_openat"]
    assert int(lenient.lut[2331]) == raw_pages.EV_UNKNOWN
    assert [int(lenient.lut[i]) for i in (2326, 2327, 2332, 782, 781)] == [0, 1, 3, 4, 5]


def test_raw_events_load_refuses_shared_ids_and_says_why_a_decoder_is_missing() -> None:
    """Two captured formats with the same ID (open_path and sleep_us, two captures' first probes) are refused,
    naming both events. A tracepoint whose print fmt the decoder cannot render (sched_switch) loads without a
    decoder and with the reason; a plain printf tracepoint (sched_process_fork), a syscall without args and
    its exit, and a synthetic event (6.1's kernel-spans) load with decoders that give what their text prints."""
    from kprobe_exporter import aggmode

    up, te = _scenario("uprobes-syscalls"), _scenario("time-extend")
    twice = probes.ProbeSet("kpe_rawcap", (up.events[0], te.events[0]), ())
    with _tracefs("kpe_rawcap/open_path", "kpe_rawcap/sleep_us") as root:
        with pytest.raises(raw_formats.FormatError) as e:
            raw_args.RawEvents.load(_dirs(root, twice), twice, (6, 18))
    assert str(e.value) == "events sleep_us and open_path share id 2326"
    tps = _probe_set("probes:\n  - {name: sw, tracepoint: sched/sched_switch}\n"
                     "  - {name: fork, tracepoint: sched/sched_process_fork}\n"
                     "  - {name: gp, tracepoint: syscalls/sys_enter_getppid, latency: true}\n")
    span = aggmode.span_event("kx_lat", "work", ret=True)
    ps = probes.ProbeSet(tps.group, (*tps.events, span), ())
    with _tracefs("sched/sched_switch", "sched/sched_process_fork", "syscalls/sys_enter_getppid",
                  "syscalls/sys_exit_getppid") as root:
        (root / "events" / "synthetic" / "kx_lat").mkdir(parents=True)
        shutil.copyfile(KSPANS / "synthetic_spans.format", root / "events" / "synthetic" / "kx_lat" / "format")
        events = raw_args.RawEvents.load(_dirs(root, ps), ps, (6, 18))
    assert events.decode_errors == {"sw": "sched_switch: print fmt argument 'REC->prev_comm' not understood"}
    assert [d is None for d in events.decoders] == [True, False, False, False, False]
    assert [int(events.lut[i]) for i in (372, 366, 305, 304, 1474)] == [0, 1, 2, 3, 4]  # their ID lines
    # sched_process_fork: __data_loc parent_comm at 8, parent_pid at 12, __data_loc child_comm at 16,
    # child_pid at 20, the strings after the fields
    fork = struct.pack("<HBBiIiIi", 366, 0, 0, 1, (5 << 16) | 24, 100, (5 << 16) | 29, 101) + b"bash\0bash\0"
    assert events.args(1, fork) == {"comm": b"bash", "pid": b"100", "child_comm": b"bash", "child_pid": b"101"}
    assert events.args(2, struct.pack("<HBBii", 305, 0, 0, 1, 110)) == {}  # sys_getppid()
    assert events.args(3, struct.pack("<HBBiiiq", 304, 0, 0, 1, 110, 0, 4242)) == {"ret": b"0x1092"}
    lat = struct.pack("<HBBiQQiiQ", 1474, 0, 0, 1, 5000, 123456789, 77, 0, 3)  # lat, ts0, pid, ret
    assert events.args(4, lat) == {"lat": b"5000", "ts0": b"123456789", "pid": b"77", "ret": b"3"}
    with pytest.raises(raw_formats.RawUnsupported, match=r"^args needed .*: sw: sched_switch: print fmt"):
        events.require_decoders(["fork", "sw"])
