"""Parser: one line of trace text to (comm, tid, tgid, cpu, timestamp ns, event key, body).

The line head is fixed-width within a kernel (`%16s-%-7d`, 5 on 4.x), so the comm ends at
column 16 whatever it contains; the rest is found by a few byte searches, not a regex.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from kprobe_exporter.events import BAD_HEAD, BAD_LOST, BAD_TIMESTAMP
from kprobe_exporter.events import REASONS as REASONS
from kprobe_exporter.events import UNKNOWN_EVENT as UNKNOWN_EVENT
from kprobe_exporter.probes import EventSpec

LOST_PREFIX = b"CPU:"
_LOST_RE = re.compile(rb"CPU:(\d+) \[LOST (\d+) EVENTS\]")



class ParseError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TraceLine(NamedTuple):
    comm: bytes
    tid: int
    tgid: int  # -1 without the record-tgid column
    cpu: int
    ts_ns: int
    token: bytes  # the event's name as printed, up to the first space (see event_token)
    body: bytes  # everything after the timestamp's ': '


def parse_lost(line: bytes) -> tuple[int, int]:
    """(cpu, events) of a `CPU:N [LOST M EVENTS]` line."""
    m = _LOST_RE.match(line)
    if not m:
        raise ParseError(BAD_LOST)
    return int(m.group(1)), int(m.group(2))


MAX_DIGITS = 9  # pid, CPU and seconds: 9 digits keep every timestamp and key inside an int64


def parse_head(line: bytes) -> tuple[int, int, int, int, int]:
    """(tid, tgid, cpu, ts_ns, body start) of an event line; raises ParseError.

    Numbers are plain ASCII digits (no sign, '_' or spaces, which int() would take) of at most
    MAX_DIGITS: the columnar parser (fastparse) reads exactly these, so both agree on every line.
    """
    if len(line) < 30 or line[16] != 0x2D:  # '-' after the 16-column comm
        raise ParseError(BAD_HEAD)
    sp = line.find(b" ", 17)
    b = line.find(b"[", sp)
    e = line.find(b"]", b)
    c = line.find(b": ", e)
    if sp < 0 or b < 0 or e < 0 or c < 0:
        raise ParseError(BAD_HEAD)
    pid, cpu_text = line[17:sp], line[b + 1 : e]
    if not (pid.isdigit() and cpu_text.isdigit() and len(pid) <= MAX_DIGITS and len(cpu_text) <= MAX_DIGITS):
        raise ParseError(BAD_HEAD)
    tgid = -1
    o = line.find(b"(", sp, b)
    if o >= 0:
        t = line[o + 1 : line.find(b")", o, b)].strip()
        tgid = int(t) if t.isdigit() else -1
    ts = line[line.rfind(b" ", e, c) + 1 : c]
    if len(ts) < 8 or ts[-7] != 0x2E:  # sec.usec
        raise ParseError(BAD_TIMESTAMP)
    sec, usec = ts[:-7], ts[-6:]
    if not (sec.isdigit() and usec.isdigit() and len(sec) <= MAX_DIGITS):
        raise ParseError(BAD_TIMESTAMP)
    return int(pid), tgid, int(cpu_text), int(sec) * 1_000_000_000 + int(usec) * 1000, c + 2


def event_token(line: bytes, start: int) -> bytes:
    """The printed event name up to the first space: `name:`, `sys_x(a:`, `sys_x()` or `sys_x`."""
    sp = line.find(b" ", start)
    return line[start:sp] if sp >= 0 else line[start:]


def dispatch_key(token: bytes) -> bytes:
    """Normalise a token to the key form of probes.event_key: `sys_x(a:` and `sys_x()` to `sys_x(`."""
    p = token.find(b"(")
    return token[: p + 1] if p >= 0 else token


def parse_line(line: bytes) -> TraceLine:
    tid, tgid, cpu, ts_ns, start = parse_head(line)
    return TraceLine(line[:16].lstrip(), tid, tgid, cpu, ts_ns, event_token(line, start), line[start:])


def comm_of(line: bytes) -> bytes:
    return line[:16].lstrip()


# --- arguments -----------------------------------------------------------------------

ArgReader = Callable[[bytes], dict[str, bytes]]


def probe_arg_reader(ev: EventSpec) -> ArgReader:
    """Args of a kprobe/uprobe body: `name: (ip) a=1 s="text with spaces" b=0x2`.

    The names and their order are known, so each value runs to the next ` name=` marker;
    string values are quoted raw and may hold spaces, quotes and non-UTF-8 bytes.
    """
    markers = [(a.name, (" " + a.name + "=").encode(), a.is_string) for a in ev.args]

    def read(body: bytes) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        pos = body.find(b") ")  # end of '(ip)' or '(ret <- func)'
        pos = 0 if pos < 0 else pos + 1
        for i, (name, marker, is_string) in enumerate(markers):
            at = body.find(marker, pos)
            if at < 0:
                break
            vstart = at + len(marker)
            if i + 1 < len(markers):
                nxt = markers[i + 1][1]
                # Strings are printed raw: the closing quote is the last `"` + next marker, so a value
                # holding ` n=` or `" n=` still ends where the kernel ended it
                end = body.rfind(b'"' + nxt, vstart + 1) + 1 if is_string else body.find(nxt, vstart)
                if end <= 0 or (is_string and end == 0):
                    end = body.find(nxt, vstart)
                if end < 0:
                    end = len(body)
            else:
                end = len(body)
            value = body[vstart:end]
            if is_string and len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
                value = value[1:-1]
            out[name] = value
            pos = end
        return out

    return read


ArgPicker = Callable[[bytes], tuple[bytes, ...]]


def arg_picker(ev: EventSpec, names: tuple[str, ...]) -> ArgPicker:
    """The values of `names` (b"" where absent) from an event body, exactly as arg_reader reads them.

    For labels: arg_reader builds a dict of every arg; this walks the markers only up to the last
    arg it needs and builds no dict.
    """
    if not ev.dynamic:
        read = tracepoint_arg_reader(ev)
        return lambda body: tuple(read(body).get(n, b"") for n in names)
    markers = [((" " + a.name + "=").encode(), a.is_string) for a in ev.args]
    slots = {i: names.index(a.name) for i, a in enumerate(ev.args) if a.name in names}
    last = max(slots, default=-1)
    nxt = [markers[i + 1][0] if i + 1 < len(markers) else b"" for i in range(len(markers))]
    quoted = [b'"' + m for m in nxt]

    def pick(body: bytes) -> tuple[bytes, ...]:
        out = [b""] * len(names)
        pos = body.find(b") ")
        pos = 0 if pos < 0 else pos + 1
        for i in range(last + 1):
            marker, is_string = markers[i]
            at = body.find(marker, pos)
            if at < 0:
                break
            vstart = at + len(marker)
            if i + 1 < len(markers):
                end = body.rfind(quoted[i], vstart + 1) + 1 if is_string else body.find(nxt[i], vstart)
                if end <= 0:
                    end = body.find(nxt[i], vstart)
                if end < 0:
                    end = len(body)
            else:
                end = len(body)
            slot = slots.get(i)
            if slot is not None:
                value = body[vstart:end]
                if is_string and len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
                    value = value[1:-1]
                out[slot] = value
            pos = end
        return tuple(out)

    return pick


def tracepoint_arg_reader(ev: EventSpec) -> ArgReader:
    """Fields of a tracepoint body: syscall `sys_x(a: 1, b: 2)` / `sys_x -> 0x3`, or `f=v f2=v2`."""

    def read(body: bytes) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        if body.startswith(b"sys_"):
            arrow = body.find(b" -> ")
            if arrow >= 0:
                out["ret"] = body[arrow + 4 :].strip()
                return out
            inner = body[body.find(b"(") + 1 : body.rfind(b")")]
            for part in inner.split(b", "):
                k, sep, v = part.partition(b": ")
                if sep:
                    out[k.decode("ascii", "replace")] = v
            return out
        colon = body.find(b": ")
        for part in body[colon + 2 :].split(b" "):
            k, sep, v = part.partition(b"=")
            if sep:
                out[k.decode("ascii", "replace")] = v
        return out

    return read


def arg_reader(ev: EventSpec) -> ArgReader:
    return probe_arg_reader(ev) if ev.dynamic else tracepoint_arg_reader(ev)


def retval_of(ev: EventSpec, body: bytes) -> bytes | None:
    """The return value text of a return event's body, where it prints one."""
    if not ev.dynamic:
        arrow = body.find(b" -> ")
        return body[arrow + 4 :].strip() if arrow >= 0 else None
    values = probe_arg_reader(ev)(body)
    for name in ("ret", "arg1"):
        if name in values:
            return values[name]
    return next(iter(values.values()), None)
