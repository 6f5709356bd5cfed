"""The columnar fast path (fastparse + pairing + aggregate) against the simplest per-line loop.

Differential tests: generated traces (several kernels' layouts, nesting, threads, LOST lines, age
and capacity evictions, labels and their caps, spans, long event names, garbage and one-byte
mutations of valid lines, random chunking) must give exactly the snapshot and the spans of
tests/ref_aggregate.py, whether the aggregate takes them in columns or line by line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feeding import feed_text
from kprobe_exporter import config, fastparse, pairing, parser, probes
from kprobe_exporter.aggregate import Aggregate, CompletedPair
from ref_aggregate import RefAggregate

HERE = Path(__file__).resolve().parents[1]
FIX = HERE / "fixtures"
LONG = "a_very_long_event_name_that_takes_six_words_of_eight"

CFG = f"""
label_limit: 3
pending: {{max_pending: 7, max_age: 2s}}
probes:
  - name: f
    uprobe: /bin/x:0x10
    args: {{s: "+0(%di):string", n: "%si:s32"}}
    labels: [s]
    latency: true
  - name: g
    uprobe: /bin/x:0x20
    args: {{n: "%di:s32"}}
    labels: [comm, n]
    latency: true
  - name: openat
    tracepoint: syscalls/sys_enter_openat
    latency: true
  - name: {LONG}
    uprobe: /bin/x:0x30
    latency: true
  - name: tick
    tracepoint: sched/sched_switch
"""


class Sampling:
    sample_ratio = 1.0
    min_duration_ns = 3_000


def build(cls: type, cfg_text: str = CFG) -> Any:
    cfg = config.load_text(cfg_text)
    ps = probes.build_probe_set(cfg, resolve=None)
    agg = cls(ps, cfg.buckets, cfg.label_limit, cfg.pending.max_pending, cfg.pending.max_age)
    spans: list[CompletedPair] = []
    for p in ps.pairs:
        if p.name in ("f", "openat"):
            agg.set_sink(p.name, Sampling(), spans.append)
    return agg, spans


COMMS = [b"app", b"sp ace", b"x)y:z [1]", b"<...>", b"0123456789abcde", b"d-a-s-h"]
BODIES = {
    "f": [b'f: (0x55d0) s="/etc/hostname" n=1', b'f: (0x55d0) s="a b\\"c" n=-2', b'f: (0x55d0) s="\xff\xfe" n=3',
          b'f: (0x55d0) s="x" n=4', b'f: (0x55d0) s="y" n=5'],
    "f_ret": [b"f_ret: (0x55e0 <- 0x55d0) ret=0x3"],
    "g": [b"g: (0x55d1) n=1", b"g: (0x55d1) n=2", b"g: (0x55d1) n=-7", b"g: (0x55d1) n=9"],
    "g_ret": [b"g_ret: (0x55e1 <- 0x55d1) ret=0x0"],
    "openat": [b"sys_openat(dfd: 0xffffff9c, filename: 0x7f, flags: 0x80000, mode: 0)"],
    "openat_ret": [b"sys_openat -> 0x3", b"sys_openat -> 0xfffffffffffffffe"],
    "long": [f"{LONG}: (0x55d2)".encode()],
    "long_ret": [f"{LONG}_ret: (0x55e2 <- 0x55d2) ret=0x1".encode()],
    "tick": [b"sched_switch: prev_comm=a prev_pid=1 prev_prio=120 prev_state=S ==> next_comm=b next_pid=2"],
    "unknown": [b"zzz: (0x1)", b"sys_read(fd: 3)", b"", b"f:", b"sys_openat", b"openat: x"],
}
KINDS = list(BODIES)
OTHER = [b"CPU:1 [LOST 17 EVENTS]", b"CPU:0 [LOST 3 EVENTS]", b"CPU:x [LOST 1 EVENTS]", b"# tracer: nop", b"",
         b"#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION", b"garbage", b"x" * 60]


def head(layout: int, comm: bytes, tid: int, cpu: int, ts_us: int) -> bytes:
    sec, usec = divmod(ts_us, 1_000_000)
    c = comm.rjust(16)
    if layout == 0:  # 6.x with irq-info
        return c + b"-%-7d [%03d] ..... %5d.%06d: " % (tid, cpu, sec, usec)
    if layout == 1:  # 6.x without irq-info (the agent's own)
        return c + b"-%-7d [%03d]  %5d.%06d: " % (tid, cpu, sec, usec)
    if layout == 2:  # record-tgid; `(-------)` where the kernel's tgid table has no entry for the pid
        tgid = b"%7d" % (tid - tid % 10) if tid % 3 else b"-------"
        return c + b"-%-7d (%s) [%03d] d.h1. %5d.%06d: " % (tid, tgid, cpu, sec, usec)
    return c + b"-%-5d [%03d] d... %5d.%06d: " % (tid, cpu, sec, usec)  # 4.x


step = st.tuples(
    st.sampled_from(KINDS + ["f", "f_ret", "g", "g_ret", "openat", "openat_ret"] * 3 + ["other"]),
    st.integers(0, 5),  # thread
    st.sampled_from([0, 1, 1, 3, 40, 900, 1_100_000, 2_500_000]),  # µs since the previous line
    st.integers(0, 99),  # which body / other line / layout switch
    st.integers(-1, 200),  # byte to mutate (-1: none)
    st.integers(0, 255),  # the byte to put there
)


def render(steps: list[tuple[str, int, int, int, int, int]], start_us: int, layout: int) -> list[bytes]:
    lines, ts = [], start_us
    for kind, t, dt, pick, mut, byte in steps:
        ts += dt
        if kind == "other":
            lines.append(OTHER[pick % len(OTHER)])
            continue
        lay = layout if pick < 90 else pick % 4  # mostly one layout, sometimes another mid-stream
        tid = 100 + t * 1001 if lay != 3 else 100 + t
        body = BODIES[kind][pick % len(BODIES[kind])]
        line = head(lay, COMMS[t % len(COMMS)], tid, t % 3, ts) + body
        if 0 <= mut < len(line):
            line = line[:mut] + bytes([byte]) + line[mut + 1 :]
            line = line.replace(b"\n", b" ")
        lines.append(line)
    return lines


def chunks(lines: list[bytes], cuts: list[int]) -> list[bytes]:
    out, prev = [], 0
    for c in sorted({min(c, len(lines)) for c in cuts} | {len(lines)}):
        if c > prev:
            out.append(b"\n".join(lines[prev:c]) + b"\n")
            prev = c
    return out


def compare(lines: list[bytes], cuts: list[int], min_columnar: int) -> None:
    agg, spans = build(Aggregate)
    agg.min_columnar = min_columnar
    ref, ref_spans = build(RefAggregate)
    for c in chunks(lines, cuts):
        feed_text(agg, c)
        ref.feed(c)
    got, want = agg.snapshot(), ref.snapshot()
    assert got.lines_read == want.lines_read
    assert got.parse_errors == want.parse_errors
    assert got.lost == want.lost
    assert got.events == want.events
    assert got.label_overflow == want.label_overflow
    assert got.pairs.keys() == want.pairs.keys()
    for name, w in want.pairs.items():
        assert vars(got.pairs[name]) == vars(w), name
    assert spans == ref_spans


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, max_size=400), start=st.sampled_from([1, 99_995_000_000, 12_345_678_000]),
       layout=st.integers(0, 3), cuts=st.lists(st.integers(0, 400), max_size=5),
       min_columnar=st.sampled_from([0, 0, 1, 128]))
def test_columnar_equals_per_line(steps: list[Any], start: int, layout: int, cuts: list[int],
                                  min_columnar: int) -> None:
    compare(render(steps, start, layout), cuts, min_columnar)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 60), max_size=4))
def test_arbitrary_bytes_columnar_equals_per_line(data: bytes, cuts: list[int]) -> None:
    lines = data.split(b"\n")
    compare(lines, cuts, 0)


@pytest.mark.parametrize("path", sorted(p for p in FIX.rglob("*") if p.is_file()))
def test_fixtures_columnar_equals_per_line(path: Path) -> None:
    lines = path.read_bytes().split(b"\n")
    for mc in (0, 10**9):
        compare(lines, [7, 100], mc)


def test_fastparse_agrees_with_parse_head_on_every_fixture_line() -> None:
    for path in sorted(p for p in FIX.rglob("*") if p.is_file()):
        buf = path.read_bytes()
        starts, ends = fastparse.lines_of(buf)
        tpl = next((t for t in (fastparse.learn(ln) for ln in buf.split(b"\n")[:40]) if t), None)
        if tpl is None:
            continue
        table = fastparse.TokenTable()
        p = fastparse.parse(buf, starts, ends, fastparse.Plan.of(tpl), table)
        took = 0
        for i in np.flatnonzero(p.ok).tolist():
            line = buf[starts[i] : ends[i]]
            tid, _, _, ts, start = parser.parse_head(line)
            assert (int(p.tid[i]), int(p.ts[i]), table.tokens[p.cls[i]]) == (tid, ts, parser.event_token(line, start))
            took += 1
        assert took > 0, path


def test_template_learns_the_layouts_of_three_kernels() -> None:
    six = fastparse.learn(b"           plain-7268    [000] DBZff   298.511609: open_path: (0x1) path=\"/x\"")
    four = fastparse.learn(b"   zabbix_agentd-1762  [002] d... 43812230.892155: myprobe: (x)")
    tgid = fastparse.learn(b"           plain-7408    (   7400) [000]    301.443865: f: x")
    assert six == fastparse.Template(7, 25, 29, 5, 49)
    assert four == fastparse.Template(5, 23, 27, 8, 49)
    assert tgid == fastparse.Template(7, 35, 39, 5, 54)
    assert fastparse.learn(b"CPU:0 [LOST 1020 EVENTS]") is None


def test_stable_order_equals_numpy_stable_argsort() -> None:
    rng = np.random.default_rng(1)
    for n in (0, 1, 2, 17, 1000):
        key = rng.integers(0, 5, n).astype(np.int64)
        assert (pairing.stable_order(key) == np.argsort(key, kind="stable")).all()
    big = np.array([2**61, 3, 2**61, 3], np.int64)  # too wide to pack: numpy's own stable sort
    assert pairing.stable_order(big).tolist() == [1, 3, 0, 2]
    wide = rng.integers(0, 3, 2000).astype(np.int64) << 60  # many ties, too wide to pack: still stable
    got = pairing.stable_order(wide)
    assert got.dtype == np.int64 and (got == np.argsort(wide, kind="stable")).all()
    none = pairing.stable_order(np.zeros(0, np.int64))
    assert (none.dtype, none.shape) == (np.dtype(np.int64), (0,))


def test_match_is_lifo_per_group_with_unmatched_exits() -> None:
    # group 0: exit(unmatched) entry entry exit exit exit(unmatched); group 1: entry entry exit
    group = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1], np.int64)
    sign = np.array([-1, 1, 1, -1, -1, -1, 1, 1, -1], np.int64)
    m = pairing.match(group, sign)
    assert sorted(zip(m.entries.tolist(), m.exits.tolist(), strict=True)) == [(1, 4), (2, 3), (7, 8)]
    assert np.flatnonzero(m.unmatched).tolist() == [0, 5]
    assert m.open.tolist() == [6]


def stack_match(group: list[int], sign: list[int]) -> tuple[list[tuple[int, int]], list[int], list[int], int]:
    """pairing.match as a stack per group: (entry, exit) pairs, unmatched exits, entries left open, deepest."""
    stacks: dict[int, list[int]] = {}
    pairs, unmatched = [], []
    deepest = 0
    for i, (g, s) in enumerate(zip(group, sign, strict=True)):
        if s > 0:
            stacks.setdefault(g, []).append(i)
            deepest = max(deepest, len(stacks[g]))
        elif stacks.get(g):
            pairs.append((stacks[g].pop(), i))
        else:
            unmatched.append(i)
    return sorted(pairs), unmatched, [i for g in sorted(stacks) for i in stacks[g]], deepest


def test_match_equals_a_stack_per_group_on_random_sequences() -> None:
    rng = np.random.default_rng(5)
    for _ in range(3000):
        n = int(rng.integers(1, 24))
        group = np.sort(rng.integers(0, int(rng.integers(1, 5)), n)).astype(np.int64)
        sign = np.where(rng.random(n) < rng.random(), 1, -1).astype(np.int64)
        m = pairing.match(group, sign)
        pairs, unmatched, still_open, deepest = stack_match(group.tolist(), sign.tolist())
        got = sorted(zip(m.entries.tolist(), m.exits.tolist(), strict=True))
        assert (got, np.flatnonzero(m.unmatched).tolist(), m.open.tolist()) == (pairs, unmatched, still_open), (
            group.tolist(), sign.tolist())
        assert m.depth_max == deepest


def test_match_of_nothing_is_empty_arrays() -> None:
    m = pairing.match(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert [(a.dtype, a.shape) for a in (m.entries, m.exits, m.unmatched, m.open)] == [
        (np.dtype(np.int64), (0,)), (np.dtype(np.int64), (0,)), (np.dtype(bool), (0,)), (np.dtype(np.int64), (0,))]
    assert m.depth_max == 0


def test_a_chunk_bigger_than_a_piece_is_cut_at_lines() -> None:
    bodies = (b'f: (0x1) s="a" n=1', b"f_ret: (0x2 <- 0x1) ret=0x0")
    lines = [head(1, b"t", 7, 0, 1_000_000 + i) + bodies[i % 2] for i in range(20000)]
    agg, _ = build(Aggregate)
    import kprobe_exporter.text as am
    old = am.PIECE
    am.PIECE = 4096
    try:
        feed_text(agg, b"\n".join(lines) + b"\n")
    finally:
        am.PIECE = old
    st_ = agg.snapshot().pairs["f"]
    assert (st_.count, st_.unmatched, st_.pending) == (10000, 0, 0)


def test_arg_picker_equals_arg_reader() -> None:
    ps = probes.build_probe_set(config.load_text(CFG), resolve=None)
    for ev in ps.events:
        names = tuple(a.name for a in ev.args)
        pick = parser.arg_picker(ev, names)
        read = parser.arg_reader(ev)
        for bodies in BODIES.values():
            for b in bodies:
                d = read(b)
                assert pick(b) == tuple(d.get(n, b"") for n in names)


def test_token_table_collisions_and_a_full_table_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    monkeypatch.setattr(fastparse.TokenTable, "BITS", 1)  # two slots: most tokens collide
    monkeypatch.setattr(fastparse.TokenTable, "MAX_CLASSES", 3)  # and the table fills, then starts afresh
    r = random.Random(3)
    kinds = [k for k in KINDS if k != "unknown"]
    steps = [(r.choice(kinds), r.randrange(4), r.choice([1, 3, 40]), r.randrange(100), -1, 0) for _ in range(3000)]
    compare(render(steps, 5_000_000, 1), [700, 1500, 2200], 0)


def test_fastparse_timestamps_are_exact_at_the_longest_uptime() -> None:
    """`%5lu.%06lu` seconds grow to 8 digits (3.17 years of uptime: the widest a template takes); the
    nanoseconds are then past 2^56, where a float64 can no longer hold a multiple of 1000 exactly."""
    secs = [99_999_999, 72_057_594, 10_000_001, 98_765_432]
    usecs = [1, 999_999, 123_457, 500_001]
    lines = [b"           plain-7268    [000] DBZff %8d.%06d: f: (0x1) a=1" % (s, u)
             for s in secs for u in usecs]
    buf = b"\n".join(lines) + b"\n"
    tpl = fastparse.learn(lines[0])
    assert tpl is not None and tpl.sec_w == 8
    starts, ends = fastparse.lines_of(buf)
    p = fastparse.parse(buf, starts, ends, fastparse.Plan.of(tpl), fastparse.TokenTable())
    assert p.ok.all() and p.tid.tolist() == [7268] * len(lines)
    assert p.ts.tolist() == [s * 10**9 + u * 1000 for s in secs for u in usecs]


def test_fastparse_takes_every_line_of_its_layout_and_only_what_parse_head_takes() -> None:
    """Lines of the three layouts (6.x, 4.x, record-tgid) with comms of any bytes (a comm is whatever
    prctl set: `[`, `]`, `:`, `-`, `(`, spaces), and lines with one byte of the head changed: the fast path
    takes every printed line of its template's layout, and takes a line only with parse_head's values."""
    import random

    rng = random.Random(16)
    heads = [b"%16s-%-7d [%03d] DBZff %5d.%06d: ", b"%16s-%-5d [%03d] d... %5d.%06d: ",
             b"%16s-%-7d (%7d) [%03d] %5d.%06d: "]
    alphabet = b"abz09[]:-( ).\t\xff"
    for head in heads:
        lines: list[bytes] = []
        printed: list[bool] = []  # as the kernel prints it
        for _ in range(300):
            comm = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 15)))
            pid = rng.choice([1, 42, 7268, 99999])
            vals = (comm, pid, rng.randint(0, 999), rng.randint(0, 99999), rng.randint(0, 999999))
            if b"(" in head:
                vals = (comm, pid, rng.choice([1, 7400, 99999]), *vals[2:])
            lines.append(head % vals + b"f: (0x1) a=1")
            printed.append(True)
        clean = (b"plain", 7268, 7400, 0, 298, 511609) if b"(" in head else (b"plain", 7268, 0, 298, 511609)
        tpl = fastparse.learn(head % clean + b"f: x")
        assert tpl is not None
        widest = 99999 if b"-5d" in head else 4194304  # a pid that fills its column
        for one in (head % clean, head % (clean[0], widest, *clean[2:])):
            one += b"f: (0x1) a=1"
            for col in range(16, tpl.body):  # every one-byte change of the head
                for byte in b"x[]:- 0(9":
                    lines.append(one[:col] + bytes([byte]) + one[col + 1:])
                    printed.append(False)
        buf = b"\n".join(lines) + b"\n"
        starts, ends = fastparse.lines_of(buf)
        table = fastparse.TokenTable()
        p = fastparse.parse(buf, starts, ends, fastparse.Plan.of(tpl), table)
        taken = 0
        for i, line in enumerate(lines):
            try:
                tid, _, _, ts, start = parser.parse_head(line)
            except parser.ParseError:
                assert not p.ok[i], line
                continue
            if not p.ok[i]:  # the per-line path's: another layout (a comm or pid that moved the columns)
                assert not printed[i] or fastparse.learn(line) != tpl, line  # or a byte the kernel does not print
                continue
            assert (int(p.tid[i]), int(p.ts[i]), table.tokens[p.cls[i]]) == (tid, ts, parser.event_token(line, start))
            taken += 1
        assert taken > 200


def test_learn_finds_the_printed_layout_whatever_the_comm_pid_and_body() -> None:
    """The template is the layout the line was printed with: its columns are counted here from the
    printed pieces (comm, `-`, pid padded to its width, the optional tgid column, `[CPU]`, the flags, the
    seconds padded to 5, `.usec: `), for pids of every width, comms and bodies holding `[`, `]`, `: `, `(`
    and `-`, and seconds of 1 to 8 digits; wider than one 8-byte word holds (pid, CPU, seconds), a head
    past MAX_BODY, or no space before the seconds: no template (the per-line parser takes those)."""
    import random

    rng = random.Random(31)
    comms = [b"plain", b"a[1]: b", b"x]y", b"]", b"[", b": ", b"(1) [2]", b"-", b"0123456789abcde", b"d-a-s-h 3"]
    bodies = [b"f: x", b"f: (0x1) s=\"[0] a: b\" n=1", b"sys_read(fd: 3)", b"e: ]]] [[[ :: (2)"]
    layouts = [(7, b"", b"DBZff"), (7, b"", b""), (7, b"(%7d) ", b"d.h1."), (5, b"", b"d...")]
    for _ in range(2000):
        pid_w, tgid_fmt, flags = rng.choice(layouts)
        pid = rng.randint(1, 10 ** rng.randint(1, pid_w) - 1)
        cpu = b"%03d" % rng.randint(0, 10 ** rng.randint(1, 6) - 1)
        sec = b"%5d" % rng.randint(0, 10 ** rng.randint(1, 8) - 1)
        comm = rng.choice(comms)
        before = comm.rjust(16) + b"-" + (b"%d" % pid).ljust(pid_w) + b" "
        if tgid_fmt:
            before += tgid_fmt % rng.randint(1, 9999999)
        bracket = len(before)
        close = bracket + 1 + len(cpu)
        head = before + b"[" + cpu + b"] " + (flags + b" " if flags else b" ")
        head += sec + b".%06d" % rng.randint(0, 999999)
        colon = len(head)
        line = head + b": " + rng.choice(bodies)
        want = fastparse.Template(pid_w, bracket, close, len(sec), colon)
        assert fastparse.learn(line) == want, line
    # one more than a word holds, one at a time, from a line learn takes
    c = b"plain".rjust(16)
    assert fastparse.learn(c + b"-7268    [000] DBZff   298.511609: f: x") == fastparse.Template(7, 25, 29, 5, 49)
    for wide in (b"-72680000 [000] DBZff   298.511609: f: x",  # an 8-digit pid
                 b"-7268    [0000000] DBZff   298.511609: f: x",  # a 7-digit CPU
                 b"-7268    [000] DBZff 123456789.511609: f: x",  # 9-digit seconds
                 b"-7268    [000] DBZff" + b"f" * 71 + b"   298.511609: f: x",  # ':' at 120 = MAX_BODY
                 b"-7268    [000] DBZff 298.511609: f: x"):  # seconds not padded to %5lu
        assert fastparse.learn(c + wide) is None, wide
    assert fastparse.learn(c + b"-7268    [000] DBZff" + b"f" * 70 + b"   298.511609: f: x") is not None


def test_fastparse_takes_no_line_with_an_earlier_colon_space() -> None:
    """Two bytes changed: `: ` (where parse_head ends the head) put at every column of three layouts'
    heads, and `[`/`]` pairs: the fast path takes such a line only with parse_head's values; a `: `
    in the flags or the space after `]` ends the head there for parse_head, so those lines are not taken."""
    heads = [b"%16s-%-7d [%03d] DBZff %5d.%06d: ", b"%16s-%-5d [%03d] d... %5d.%06d: ",
             b"%16s-%-7d (%7d) [%03d] d.h1. %5d.%06d: "]
    for head in heads:
        vals = (b"plain", 7268, 7400, 0, 298, 511609) if b"(" in head else (b"plain", 7268, 0, 298, 511609)
        one = head % vals + b"f: (0x1) a=1"
        tpl = fastparse.learn(one)
        assert tpl is not None
        lines = [one]
        for col in range(16, tpl.body - 1):
            for pair in (b": ", b"[1", b"1]", b"] "):
                lines.append(one[:col] + pair + one[col + 2:])
        buf = b"\n".join(lines) + b"\n"
        starts, ends = fastparse.lines_of(buf)
        table = fastparse.TokenTable()
        p = fastparse.parse(buf, starts, ends, fastparse.Plan.of(tpl), table)
        assert p.ok[0]
        for i, line in enumerate(lines):
            if not p.ok[i]:
                continue
            tid, _, _, ts, start = parser.parse_head(line)  # raises if the fast path took a bad head
            assert (int(p.tid[i]), int(p.ts[i]), table.tokens[p.cls[i]]) == (tid, ts, parser.event_token(line, start))


def test_the_agents_own_layout_is_read_with_seven_words() -> None:
    """The gathers are the fast path's main cost, so the layout the agent sets (irq-info off, no tgid)
    is read with seven 8-byte words (module docstring): pid, CPU, seconds, microseconds and two of the
    token, no extra word for a column that none of them covers; the 6.x irq-info layout needs one more."""
    own = fastparse.learn(b"plain".rjust(16) + b"-7268    [000]    298.511609: f: (0x1) a=1")
    irq = fastparse.learn(b"plain".rjust(16) + b"-7268    [000] DBZff   298.511609: f: (0x1) a=1")
    assert own is not None and irq is not None
    assert len(fastparse.Plan.of(own).extra) == 0
    assert len(fastparse.Plan.of(irq).extra) == 1


def test_token_table_keeps_one_class_per_token_across_chunks() -> None:
    """Fifty event names (short, 15 and 16 bytes, up to 62 with the ':', some with the same first 7 bytes)
    in random order, with args that vary: every line is taken with its
    own name, each name gets one class the first time it is seen and keeps it
    in later chunks (the table does not grow on a name it holds); fifty new names add fifty classes."""
    import random

    rng = random.Random(8)
    sizes = [1, 2, 5, 6, 7, 8, 14, 15, 16, 23, 24, 31, 40, 61]  # and the ':': 62 bytes, 8 words with ' ' and end

    def names(tag: str) -> list[bytes]:
        out = []
        for i in range(45):
            stem = f"{tag}{i}_".encode() if i % 10 else f"shared_{tag}{i}".encode()  # one first word
            out.append((stem + b"x" * 62)[: max(sizes[i % len(sizes)], len(stem))] + b":")
        t = tag.encode()[:2]  # and names that differ only in their 8th byte, or in a NUL after the ':'
        return [*out, t + b"_1234X:", t + b"_1234Y:", t + b"_:", t + b"_:\x00", t + b":"]

    def chunk(toks: list[bytes]) -> tuple[bytes, list[bytes]]:
        order = [rng.choice(toks) for _ in range(400)] + toks
        rng.shuffle(order)
        lines = [b"plain".rjust(16) + b"-%-7d [000]    298.%06d: %s %d %d (0x%012x)" % (
            7 + i, i, t, rng.randrange(9), rng.randrange(9), rng.randrange(1 << 48)) for i, t in enumerate(order)]
        return b"\n".join(lines) + b"\n", order

    first, second = names("ev"), names("more")
    tpl = fastparse.learn(chunk(first)[0].split(b"\n")[0])
    assert tpl is not None
    plan, table = fastparse.Plan.of(tpl), fastparse.TokenTable()
    classes: dict[bytes, int] = {}
    for rnd, (toks, grown) in enumerate([(first, 50), (first, 50), (second, 100), (first + second, 100)]):
        buf, order = chunk(toks)
        starts, ends = fastparse.lines_of(buf)
        p = fastparse.parse(buf, starts, ends, plan, table)
        assert p.ok.all()
        got = [table.tokens[c] for c in p.cls.tolist()]
        assert got == order
        for t, c in zip(order, p.cls.tolist(), strict=True):
            assert classes.setdefault(t, c) == c
        assert len(table.tokens) == 1 + grown
        assert sorted(table.tokens[1:]) == sorted(first if rnd < 2 else first + second)  # each once
    # two hundred new names in one chunk (short and long): each line taken has its own name; those not classed in this
    # chunk (new classes per chunk are bounded) are in the next, where every line is taken
    many = [b"n%d:" % i for i in range(100)] + [b"long_name_%d_%s:" % (i, b"y" * (i % 30)) for i in range(100)]
    for rnd in range(2):
        buf, order = chunk(many)
        starts, ends = fastparse.lines_of(buf)
        p = fastparse.parse(buf, starts, ends, plan, table)
        assert [table.tokens[c] for c in p.cls[p.ok].tolist()] == [t for t, o in zip(order, p.ok, strict=True) if o]
        assert p.ok.all() or rnd == 0


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_a_small_token_table_never_gives_a_wrong_class(bits: int) -> None:
    """A table of 2, 4 or 8 slots, so tokens share slots: a line is taken only with its own name, a name
    the table holds is taken on every line of it (at either of its two slots), no name is held twice, and
    names the table cannot hold go to the per-line parser. Among them names whose first word differs only
    in bits a float64 cannot hold (`0abcdef…` and `1abcdef…`), so the words must be compared as integers."""
    import random

    class Small(fastparse.TokenTable):
        BITS = bits

    rng = random.Random(bits)
    toks = [b"0abcdefghij:", b"1abcdefghij:", b"@abcdefghij:", b"Aabcdefghij:", b"f:", b"g_ret:",
            b"sys_openat(dfd:", b"a_very_long_event_name_of_four_words:"]
    c = b"plain".rjust(16)
    tpl = fastparse.learn(c + b"-7       [000]    298.000001: f: (0x1)")
    assert tpl is not None
    plan, table = fastparse.Plan.of(tpl), Small()
    held: set[bytes] = set()
    for rnd in range(3):
        order = [rng.choice(toks) for _ in range(300)]
        buf = b"".join(c + b"-%-7d [000]    298.%06d: %s (0x1)\n" % (7 + i, i, t) for i, t in enumerate(order))
        starts, ends = fastparse.lines_of(buf)
        p = fastparse.parse(buf, starts, ends, plan, table)
        for i, t in enumerate(order):
            if p.ok[i]:
                assert table.tokens[p.cls[i]] == t
            elif rnd:
                assert t not in held, t  # held since the last chunk: found at one of its slots
        assert len(set(table.tokens)) == len(table.tokens)
        held = set(table.tokens)
        assert len(held) > 1 + bits


def test_fastparse_takes_no_header_and_no_line_shorter_than_its_head() -> None:
    """A `#` line is a header, never parsed (even one that otherwise has the layout), and a line
    shorter than the head is not taken, even where the bytes of the lines after it complete a head
    at its columns (a head of another layout, four columns to the left); nor a line without a pid."""
    c = b"plain".rjust(16)
    good = c + b"-7268    [000]    298.511609: f: (0x1)"
    tpl = fastparse.learn(good)
    assert tpl is not None
    lines = [good, b"#" + good[1:], b"abc", good[4:], b"", good[1:], good, good.replace(b"7268", b"    ")]
    buf = b"\n".join(lines) + b"\n"
    starts, ends = fastparse.lines_of(buf)
    table = fastparse.TokenTable()
    p = fastparse.parse(buf, starts, ends, fastparse.Plan.of(tpl), table)
    assert p.ok.tolist() == [True, False, False, False, False, False, True, False]
    assert [int(p.tid[i]) for i in (0, 6)] == [7268, 7268] and table.tokens[p.cls[6]] == b"f:"


def test_names_whose_words_hash_alike_keep_their_own_classes() -> None:
    """Two 30-byte names built so that their words fold to the same 64-bit hash (the multiply-xor of
    TokenTable's docstring; the collision is checked with fastparse._fold): a collision may cost the
    per-line parser, never a line taken with the other name's class."""
    mult, mask = 0x100000001B3, (1 << 64) - 1
    a = b"collide_abcdefghijklmnopqrstu:"
    w = [int.from_bytes((b" " + a)[8 * k : 8 * k + 8], "little") for k in range(3)]
    for byte in range(0x41, 0x7F):
        w1 = (w[1] & ~0xFF) | byte
        if w1 == w[1]:
            continue
        w2 = w[2] ^ (((w[0] * mult ^ w[1]) * mult) & mask) ^ (((w[0] * mult ^ w1) * mult) & mask)
        mid = w1.to_bytes(8, "little") + w2.to_bytes(8, "little")
        if b" " not in mid and b"\n" not in mid:
            break
    b = a[:7] + mid + a[23:]
    assert len(b) == len(a) and b != a
    def words(t: bytes) -> list[npt.NDArray[np.uint64]]:  # the four words a line's ' name ' is read as
        return [np.array([int.from_bytes((b" " + t + b" ")[8 * k : 8 * k + 8], "little")], np.uint64)
                for k in range(4)]

    fold = [int(fastparse._fold(words(t))[0]) for t in (a, b)]
    assert fold[0] == fold[1]  # the premise: the two names hash alike
    c = b"plain".rjust(16)
    tpl = fastparse.learn(c + b"-7       [000]    298.000001: f: (0x1)")
    assert tpl is not None
    plan, table = fastparse.Plan.of(tpl), fastparse.TokenTable()
    for _ in range(3):
        order = [a, b, b, a, b] * 20
        buf = b"".join(c + b"-%-7d [000]    298.%06d: %s (0x1)\n" % (7 + i, i, t) for i, t in enumerate(order))
        starts, ends = fastparse.lines_of(buf)
        p = fastparse.parse(buf, starts, ends, plan, table)
        assert p.ok.any()
        assert [table.tokens[k] for k in p.cls[p.ok].tolist()] == [t for t, o in zip(order, p.ok, strict=True) if o]
    assert p.ok.all()  # both held by now, at their two slots
