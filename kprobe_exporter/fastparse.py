"""Chunk parser: every line of a chunk to columns (tid, timestamp, event token class) in numpy passes.

Why: per line, CPython's per-line parser is over ten times slower (bench/README.md has the figures).
Here a chunk's lines go through ~100 whole-array operations instead, because the line head is
fixed-width within one kernel: the comm is right-aligned in 16 columns, the pid left-aligned in 7 (5
on 4.x), then `[CPU]`, the flags, `SSSSS.UUUUUU: `. The columns are learned from one line of each
chunk (`learn`), and every line is checked against them exactly, so a line is taken here only where
`parser.parse_head` would give the same answer. Every other line (a LOST line, a header, a malformed
line, another layout) goes back to the caller's per-line parser, which counts its errors by reason.

Fields are read eight bytes at a time: a strided uint64 view over the buffer turns "the 8 bytes at
each line's start + k" into one gather (the dominant cost, so the layout is read with as few words
as possible: 7 on the agent's own layout), and SWAR arithmetic on those words validates
and converts the digits of the pid, seconds and microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kprobe_exporter import parser

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

_ONES = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_NIB = np.uint64(0x0F0F0F0F0F0F0F0F)
_U1, _U7, _U8, _U56, _U63 = (np.uint64(x) for x in (1, 7, 8, 56, 63))
MAX_TOKEN_WORDS = 8  # event tokens up to 62 bytes are classified here (mutation run 3); longer ones per line
MAX_BODY = 120  # a head wider than this (a very long flags column) is left to the per-line parser
PAD = b"\n" * 256  # gathers past a chunk's end read newlines, and a newline ends a token


def _rep(byte: int) -> np.uint64:
    return np.uint64(byte * 0x0101010101010101)


_SPACES, _NEWLINES, _COLONS, _BRACKETS = _rep(0x20), _rep(0x0A), _rep(0x3A), _rep(0x5B)
_GE30, _GE3A = _rep(0x80 - 0x30), _rep(0x80 - 0x3A)


def _zero_bytes(x: U64) -> U64:
    """0x80 in each byte of x that is zero, exactly (no borrow between bytes)."""
    y: U64 = ((x & _LOW7) + _LOW7) | x
    return ~y & _HIGH


def _digit_bytes(w: U64) -> U64:
    """0x80 in each byte of w that is an ASCII digit, exactly."""
    lo = w & _LOW7
    out: U64 = (lo + _GE30) & ~(lo + _GE3A) & ~w & _HIGH
    return out


def _swar8(v: U64) -> I64:
    """Eight digit values (0..9, the most significant in the lowest byte) to their number."""
    v = v * np.uint64(10) + (v >> _U8)
    v = (v & np.uint64(0x00FF00FF00FF00FF)) * np.uint64(100) + ((v >> np.uint64(16)) & np.uint64(0x00FF00FF00FF00FF))
    v = (v & np.uint64(0x0000FFFF0000FFFF)) * np.uint64(10000) + ((v >> np.uint64(32)) & np.uint64(0x0000FFFF0000FFFF))
    return (v & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _mask80(first: int, last: int) -> np.uint64:
    """0x80 in bytes first..last (inclusive) of a little-endian word."""
    return np.uint64(sum(0x80 << (8 * i) for i in range(max(first, 0), min(last, 7) + 1)))


_ANY, _FIX, _DIG, _NOCOLON, _NOBRACKET = range(5)


@dataclass(frozen=True)
class Template:
    """Where the fields of one kernel's line head sit, learned from one line that parses."""

    pid_w: int  # pid columns (7 on 5.x/6.x, 5 on 4.x)
    bracket: int  # column of '[' before the CPU
    close: int  # column of ']' after the CPU
    sec_w: int  # width of the seconds field ('%5lu': 5, more after 99999 s of uptime)
    colon: int  # column of the ':' after the microseconds

    @property
    def body(self) -> int:
        return self.colon + 2

    def classes(self) -> list[tuple[int, int]]:
        """(class, byte) of every column up to the body; the pid, seconds and microseconds
        digits are ANY here because their words check them (see parse)."""
        cls: list[tuple[int, int]] = [(_ANY, 0)] * self.body
        cls[16] = (_FIX, 0x2D)  # '-'
        sep = 17 + self.pid_w
        cls[sep] = (_FIX, 0x20)
        for c in range(sep + 1, self.bracket):  # "(  TGID) " with record-tgid: no '[' before ours
            cls[c] = (_NOBRACKET, 0)
        cls[self.bracket] = (_FIX, 0x5B)
        for c in range(self.bracket + 1, self.close):
            cls[c] = (_DIG, 0)
        cls[self.close] = (_FIX, 0x5D)
        sec_start = self.colon - 7 - self.sec_w
        for c in range(self.close + 1, sec_start - 1):  # irq-info flags: no ': ' before the timestamp's
            cls[c] = (_NOCOLON, 0)
        cls[sec_start - 1] = (_FIX, 0x20)
        cls[self.colon - 7] = (_FIX, 0x2E)  # '.'
        cls[self.colon] = (_FIX, 0x3A)
        cls[self.colon + 1] = (_FIX, 0x20)
        return cls


def learn(line: bytes) -> Template | None:
    """The template of a line parser.parse_head accepts, if its head has the kernel's fixed layout."""
    try:
        parser.parse_head(line)
    except parser.ParseError:
        return None
    sp = line.find(b" ", 17)
    j = sp
    while j < len(line) and line[j] == 0x20:
        j += 1
    pid_w = j - 1 - 17  # the pid columns end one before '(' or '[' (that column is a space)
    bracket = line.find(b"[", sp)
    close = line.find(b"]", bracket)
    colon = line.find(b": ", close)
    sec_w = max(5, colon - 7 - (line.rfind(b" ", close, colon) + 1))
    if not (1 <= pid_w <= 7 and sec_w <= 8 and 1 <= close - bracket - 1 <= 6 and colon < MAX_BODY):
        return None  # beyond what one 8-byte word holds: the per-line parser takes these
    space = colon - 8 - sec_w  # the column before the seconds field
    if space <= close or line[space] != 0x20:
        return None
    return Template(pid_w, bracket, close, sec_w, colon)


class _Word:
    """One 8-byte gather at a fixed column, with the class checks of the columns it covers."""

    def __init__(self, off: int) -> None:
        self.off = off
        self.fix_mask = np.uint64(0)
        self.fix_val = np.uint64(0)
        self.digit = np.uint64(0)  # 0x80 at bytes that must be digits
        self.nocolon = np.uint64(0)
        self.nobracket = np.uint64(0)

    def add(self, i: int, kind: int, byte: int) -> None:
        if kind == _FIX:
            self.fix_mask |= np.uint64(0xFF << (8 * i))
            self.fix_val |= np.uint64(byte << (8 * i))
        elif kind == _DIG:
            self.digit |= np.uint64(0x80 << (8 * i))
        elif kind == _NOCOLON:
            self.nocolon |= np.uint64(0x80 << (8 * i))
        elif kind == _NOBRACKET:
            self.nobracket |= np.uint64(0x80 << (8 * i))

    def check(self, w: U64, ok: Bool) -> None:
        if self.fix_mask:
            ok &= (w & self.fix_mask) == self.fix_val
        if self.digit:
            ok &= (_digit_bytes(w) & self.digit) == self.digit
        if self.nocolon:
            ok &= (_zero_bytes(w ^ _COLONS) & self.nocolon) == 0
        if self.nobracket:
            ok &= (_zero_bytes(w ^ _BRACKETS) & self.nobracket) == 0


@dataclass
class Plan:
    """The words a template is read with: four that also carry values, and extras for the rest."""

    tpl: Template
    pid: _Word  # at 16: '-', the pid
    cpu: _Word  # at bracket - 1: ' [CPU]'
    sec: _Word  # the 8 columns before '.': the seconds
    usec: _Word  # at '.': '.UUUUUU:'
    token: _Word  # at colon + 1: ' ' and the token's first 7 bytes
    extra: list[_Word] = field(default_factory=list)

    @classmethod
    def of(cls, tpl: Template) -> Plan:
        c = tpl.colon
        words = [_Word(16), _Word(tpl.bracket - 1), _Word(c - 15), _Word(c - 7), _Word(c + 1)]
        classes = tpl.classes()
        extra: list[_Word] = []
        for col, (kind, byte) in enumerate(classes):
            if kind == _ANY:
                continue
            w = next((w for w in words + extra if w.off <= col < w.off + 8), None)
            if w is None:
                w = _Word(col)
                extra.append(w)
            w.add(col - w.off, kind, byte)
        return cls(tpl, words[0], words[1], words[2], words[3], words[4], extra)


class TokenTable:
    """Event tokens seen so far, by a hash of their (terminator-masked) words; kept across chunks.

    A table of 4096 slots replaces a per-chunk np.unique (which cost as much as all the field
    parsing, bench/README.md): a line's class is one multiply, one shift and one take, and the class's words
    are compared with the line's, so a collision costs speed, never a wrong answer. Each token has
    two candidate slots (two multipliers), so two events colliding is 1 in ~10^7, not 1 in 80 for ten
    events; only lines whose first slot misses look at the second.
    """

    BITS = 12
    MAX_CLASSES = 1024
    MULT = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))

    def __init__(self) -> None:
        self.slots = np.zeros(1 << self.BITS, np.int64)  # class 0 is nothing: its nwords never match
        self.words = np.zeros((1, MAX_TOKEN_WORDS), np.uint64)
        self.nwords = np.array([-1], np.int64)
        self.tokens: list[bytes] = [b""]

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.MAX_CLASSES

    def slot(self, h: U64, which: int = 0) -> U64:
        out: U64 = (h * self.MULT[which]) >> np.uint64(64 - self.BITS)
        return out

    def _check(self, keys: list[U64], cls: I64) -> Bool:
        good: Bool = self.nwords[cls] == len(keys)
        for k, key in enumerate(keys):
            good &= self.words[:, k][cls] == key
        return good

    def lookup(self, keys: list[U64]) -> tuple[U64, I64, Bool]:
        """(hash, class, whether the class's words are exactly these) per line."""
        h = _fold(keys)
        cls: I64 = self.slots[self.slot(h)]
        good = self._check(keys, cls)
        miss = np.flatnonzero(~good)
        if len(miss) and len(self.tokens) > 1:
            alt = self.slots[self.slot(h[miss], 1)]
            hit = self._check([k[miss] for k in keys], alt)
            cls[miss[hit]] = alt[hit]
            good[miss[hit]] = True
        return h, cls, good

    def add(self, h: int, row: list[int], token: bytes) -> int:
        """A new class for a token, or 0 when both its slots are taken or the table is full."""
        if self.full:
            return 0
        for which in (0, 1):
            s = int(self.slot(np.array([h], np.uint64), which)[0])
            if self.slots[s] == 0:
                break
        else:
            return 0
        new = np.zeros((1, MAX_TOKEN_WORDS), np.uint64)
        new[0, : len(row)] = row
        self.words = np.vstack([self.words, new])
        self.nwords = np.append(self.nwords, len(row))
        self.tokens.append(token)
        self.slots[s] = len(self.tokens) - 1
        return len(self.tokens) - 1


def _fold(keys: list[U64]) -> U64:
    h = keys[0]
    for k in keys[1:]:
        h = (h * np.uint64(0x100000001B3)) ^ k
    return h


@dataclass
class Parsed:
    """Columns for the lines of one chunk; lines not `ok` are left to the per-line parser."""

    starts: I64  # offset of each line in the chunk
    ends: I64  # offset of each line's end (its newline, or the chunk's end)
    ok: Bool  # parsed here
    tid: I64  # valid where ok
    ts: I64  # nanoseconds, valid where ok
    cls: I64  # TokenTable class, valid where ok
    body: int  # body start column of ok lines


def lines_of(buf: bytes) -> tuple[I64, I64]:
    a = np.frombuffer(buf, np.uint8)
    nl = np.flatnonzero(a == 10)
    if len(buf) and buf[-1] != 0x0A:
        nl = np.append(nl, len(buf))
    starts = np.empty(len(nl), np.int64)
    if len(nl):
        starts[0] = 0
        starts[1:] = nl[:-1] + 1
    return starts, nl.astype(np.int64)


def parse(buf: bytes, starts: I64, ends: I64, plan: Plan, table: TokenTable) -> Parsed:
    """Vectorised parse_head and event token of every line that fits the plan's template."""
    tpl = plan.tpl
    padded = buf + PAD
    words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
    ok = (ends - starts) >= tpl.body
    ok &= np.frombuffer(padded, np.uint8)[starts] != 0x23  # '#' header lines are skipped, never parsed

    # pid: digits then spaces over the pid columns (the separator after them is a FIX space)
    w = words[starts + 16]
    plan.pid.check(w, ok)
    p = w >> _U8
    region = _mask80(0, tpl.pid_w - 1)
    dig = _digit_bytes(p) & region
    d1 = dig >> _U7
    g = d1 * np.uint64(0xFF)
    ok &= ((dig | (_zero_bytes(p ^ _SPACES) & region)) == region) & ((g & (g + _U1)) == 0) & ((d1 & _U1) != 0)
    nd = (d1 * _ONES) >> _U56
    tid = _swar8(np.left_shift(p & _NIB & g, (_U8 - nd) * _U8))

    plan.cpu.check(words[starts + plan.cpu.off], ok)
    for x in plan.extra:
        x.check(words[starts + x.off], ok)

    # seconds: spaces then digits (at least one) in the last sec_w of the 8 columns before '.'
    w = words[starts + plan.sec.off]
    plan.sec.check(w, ok)
    region = _mask80(8 - tpl.sec_w, 7)
    dig = _digit_bytes(w) & region
    g = (dig >> _U7) * np.uint64(0xFF)
    ng = ~g
    ok &= ((dig | (_zero_bytes(w ^ _SPACES) & region)) == region) & ((ng & (ng + _U1)) == 0) & ((dig >> _U63) != 0)
    sec = _swar8(w & _NIB & g)

    # microseconds: '.UUUUUU:'
    w = words[starts + plan.usec.off]
    plan.usec.check(w, ok)
    usec_digits = _mask80(1, 6)
    ok &= (_digit_bytes(w) & usec_digits) == usec_digits
    usec = _swar8((w & np.uint64(0x000F0F0F0F0F0F00)) << _U8)
    ts = (sec * 1_000_000 + usec) * 1000

    cls = _classify(buf, words, starts, ends, plan, table, ok)
    return Parsed(starts, ends, ok, tid, ts, cls, tpl.body)


def _token_keys(w: U64, first: bool) -> tuple[U64, Bool]:
    """A token word masked after its terminator (' ' or newline, which stays in the key so 'ab' and
    'ab\\0' differ), and whether the terminator is in it. The first word's byte 0 is the ' ' before
    the token."""
    z = _zero_bytes(w ^ _SPACES) | _zero_bytes(w ^ _NEWLINES)
    if first:
        z &= ~np.uint64(0x80)
    low = z & (~z + _U1)  # the first terminator's 0x80 bit, or 0
    t1 = low >> _U7
    key: U64 = w & (t1 * np.uint64(0xFF) + (t1 - _U1))
    return key, z != 0


def _classify(buf: bytes, words: U64, starts: I64, ends: I64, plan: Plan, table: TokenTable, ok: Bool) -> I64:
    """The TokenTable class of each ok line; lines whose token cannot be classed get ok = False."""
    w0 = words[starts + plan.token.off]
    plan.token.check(w0, ok)
    k0, term0 = _token_keys(w0, True)
    k1, term1 = _token_keys(words[starts + (plan.token.off + 8)], False)
    k1 *= ~term0  # nothing after a terminator counts
    short = term0 | term1
    body = plan.tpl.body
    h, cls, good = table.lookup([k0, k1])
    _learn(buf, starts, ends, body, table, [k0, k1], h, cls, good, np.flatnonzero(ok & short & ~good), ok)
    long_idx = np.flatnonzero(ok & ~short)
    ok &= short | np.zeros(len(ok), bool)
    if len(long_idx):  # tokens of 15 bytes or more: more words, for the lines that have them
        ks = [k0[long_idx], k1[long_idx]]
        live = np.ones(len(long_idx), bool)
        for k in range(2, MAX_TOKEN_WORDS):
            kk, term = _token_keys(words[starts[long_idx] + (plan.token.off + 8 * k)], False)
            ks.append(kk * live)
            live &= ~term
            if not live.any():
                break
        sub_ok = ~live  # no terminator within MAX_TOKEN_WORDS words: per line
        lh, lcls, lgood = table.lookup(ks)
        _learn(buf, starts[long_idx], ends[long_idx], body, table, ks, lh, lcls, lgood,
               np.flatnonzero(sub_ok & ~lgood), sub_ok)
        cls[long_idx] = lcls
        ok[long_idx] = sub_ok
    return cls


def _learn(buf: bytes, starts: I64, ends: I64, body: int, table: TokenTable, keys: list[U64], h: U64,
           cls: I64, good: Bool, todo: I64, ok: Bool) -> None:
    """Add the classes of new tokens (one per round, with every line that shares it); lines left
    without a class get ok = False."""
    for _ in range(64):
        if not len(todo):
            return
        i = int(todo[0])
        row = [int(k[i]) for k in keys]
        c = table.add(int(h[i]), row, _token_at(buf, int(starts[i]) + body, int(ends[i])))
        same = todo[h[todo] == h[i]]
        if c:
            hit = np.ones(len(same), bool)
            for k, key in enumerate(keys):
                hit &= key[same] == row[k]
            cls[same[hit]] = c
            good[same[hit]] = True
            same = same[~hit]  # same hash, another token: per line
        ok[same] = False
        todo = todo[~good[todo] & ok[todo]]
    ok[todo] = False


def _token_at(buf: bytes, start: int, end: int) -> bytes:
    sp = buf.find(b" ", start, end)
    return buf[start : sp if sp >= 0 else end]
