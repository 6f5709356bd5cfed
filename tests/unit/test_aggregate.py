"""Aggregate: counting, per-thread LIFO pairing, bounded pending state, loss handling, label caps."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from feeding import feed_text
from kprobe_exporter import config, probes
from kprobe_exporter.aggregate import Aggregate, CompletedPair

HERE = Path(__file__).resolve().parents[1]
FIX = HERE / "fixtures"


def make(cfg_text: str, **kw: object) -> Aggregate:
    cfg = config.load_text(cfg_text)
    ps = probes.build_probe_set(cfg, resolve=None)
    return Aggregate(ps, cfg.buckets, cfg.label_limit, cfg.pending.max_pending, cfg.pending.max_age, **kw)  # type: ignore[arg-type]


def from_file(cfg_path: Path) -> Aggregate:
    return make(cfg_path.read_text())


def line(comm: str, tid: int, ts_us: int, body: str, cpu: int = 0) -> bytes:
    return f"{comm:>16}-{tid:<7} [{cpu:03d}] ..... {ts_us // 10**6:5d}.{ts_us % 10**6:06d}: {body}".encode()


UP = """
probes:
  - name: f
    uprobe: /bin/x:0x10
    args: {n: "%di:s32"}
    latency: true
"""


def feed(agg: Aggregate, *lines: bytes) -> None:
    feed_text(agg, b"\n".join(lines) + b"\n")


def reference_pairs(path: Path, entry: bytes, exit_: bytes) -> tuple[int, int, int]:
    """An independent regex-and-stack pairing: (pairs, unmatched exits, left pending)."""
    rx = re.compile(rb"^.{16}-(\d+)\s.*?(\d+)\.(\d{6}): (\S+)")
    stacks: dict[bytes, list[int]] = defaultdict(list)
    pairs = unmatched = 0
    for ln in path.read_bytes().splitlines():
        m = rx.match(ln)
        if not m:
            continue
        tid, tok = m.group(1), m.group(4)
        if tok.startswith(entry):
            stacks[tid].append(1)
        elif tok == exit_:
            if stacks[tid]:
                stacks[tid].pop()
                pairs += 1
            else:
                unmatched += 1
    return pairs, unmatched, sum(len(s) for s in stacks.values())


def test_fixture_618_counts_and_pairs_match_an_independent_reference() -> None:
    for name in (
        "uprobes-tracepoints.trace",
        "uprobes-tracepoints-no-irq-info.trace",
        "uprobes-tracepoints-record-tgid.trace",
    ):
        agg = from_file(HERE / "configs" / "fixture-6.18.yaml")
        trace = FIX / "linux-6.18" / name
        feed_text(agg, trace.read_bytes())
        snap = agg.snapshot()
        assert snap.lines_read == 278 and sum(snap.parse_errors.values()) == 0
        for pair, (entry, exit_) in {
            "open_path": (b"open_path:", b"open_path_ret:"),
            "compute": (b"compute:", b"compute_ret:"),
            "recurse": (b"recurse:", b"recurse_ret:"),
            "openat": (b"sys_openat(", b"sys_openat"),
        }.items():
            want = reference_pairs(trace, entry, exit_)
            st = snap.pairs[pair]
            assert (st.count, st.unmatched, st.pending) == want, (name, pair)
            assert sum(st.buckets) == st.count
        assert snap.pairs["recurse"].count == 20 and snap.pairs["openat"].count == 61
        assert sum(v for (p, _), v in snap.events.items() if p == "open_path") == 28


def test_fixture_61_two_kretprobes_on_one_function_still_pair() -> None:
    agg = from_file(HERE / "configs" / "fixture-6.1.yaml")
    trace = FIX / "linux-6.1-debian" / "kprobes-kretprobes-eprobe.trace"
    feed_text(agg, trace.read_bytes())
    snap = agg.snapshot()
    assert sum(snap.parse_errors.values()) == 0
    assert (snap.pairs["openat2"].count, snap.pairs["openat2"].unmatched) == reference_pairs(
        trace, b"myargs:", b"myretprobe:"
    )[:2]
    assert (snap.pairs["grp"].count, snap.pairs["grp"].unmatched) == reference_pairs(trace, b"grpprobe:", b"grpret:")[
        :2
    ]
    assert snap.events[("getname_ret", ())] == 20
    labelled = {dict(lbls)["fname"] for (p, lbls), _ in snap.events.items() if p == "myargs"}
    assert "/sys/kernel/tracing/instances/lab/tracing_on" in labelled


def test_nested_calls_pair_lifo_per_thread() -> None:
    agg = make(UP)
    feed(
        agg,
        line("a", 1, 1_000_000, "f: (0x1) n=1"),
        line("b", 2, 1_000_001, "f: (0x1) n=9"),
        line("a", 1, 1_000_010, "f: (0x1) n=2"),
        line("a", 1, 1_000_012, "f_ret: (0x2 <- 0x1) ret=0"),
        line("b", 2, 1_000_500, "f_ret: (0x2 <- 0x1) ret=0"),
        line("a", 1, 1_001_000, "f_ret: (0x2 <- 0x1) ret=0"),
    )
    st = agg.snapshot().pairs["f"]
    assert (st.count, st.pending, st.unmatched) == (3, 0, 0)
    assert st.sum_ns == (2 + 499 + 1000) * 1000  # inner 2 µs, thread b 499 µs, outer 1000 µs


def test_exit_without_entry_is_unmatched() -> None:
    agg = make(UP)
    feed(agg, line("a", 1, 5, "f_ret: (0x2 <- 0x1) ret=0"))
    st = agg.snapshot().pairs["f"]
    assert (st.count, st.unmatched) == (0, 1)


def test_pending_is_bounded_by_count_and_age() -> None:
    agg = make(UP + "pending: {max_pending: 100, max_age: 2s}\n")
    feed(agg, *(line("t", 1000 + i, 10_000_000 + i, "f: (0x1) n=0") for i in range(250)))
    st = agg.snapshot().pairs["f"]
    assert st.pending == 100 and st.evicted["capacity"] == 150
    feed(agg, line("t", 5, 13_000_000, "f: (0x1) n=0"))  # 3 s later: the old entries age out
    st = agg.snapshot().pairs["f"]
    # the 101st entry first pushes out the oldest by capacity, then the other 99 go by age
    assert (st.evicted["capacity"], st.evicted["age"], st.pending) == (151, 99, 1)
    agg.sweep(20 * 10**9)
    assert agg.snapshot().pairs["f"].pending == 0


def test_lost_line_drops_pending_and_counts_loss() -> None:
    agg = make(UP)
    feed(
        agg, line("a", 1, 10, "f: (0x1) n=1"), b"CPU:1 [LOST 77 EVENTS]", line("a", 1, 20, "f_ret: (0x2 <- 0x1) ret=0")
    )
    snap = agg.snapshot()
    st = snap.pairs["f"]
    assert snap.lost == {1: 77}
    assert (st.count, st.evicted["lost"], st.unmatched) == (0, 1, 1)
    agg.set_stats_lost(1, 50)  # the stats overlap the LOST lines: the larger counts
    assert agg.snapshot().lost == {1: 77}
    agg.set_stats_lost(0, 5)
    assert agg.snapshot().lost == {1: 77, 0: 5}


def test_overload_fixture_loss_and_pairs() -> None:
    agg = from_file(HERE / "configs" / "overload.yaml")
    feed_text(agg, (FIX / "linux-6.18" / "trace-pipe-overload.txt").read_bytes())
    snap = agg.snapshot()
    assert snap.lost == {0: 1020 + 7480 + 6290}
    assert snap.events[("getppid", ())] == 2999
    assert snap.pairs["getppid"].count + snap.pairs["getppid"].unmatched == 2998


def test_label_cap_overflows_and_counts() -> None:
    agg = make("""
label_limit: 3
probes:
  - name: f
    uprobe: /bin/x:0x10
    args: {n: "%di:s32"}
    labels: [n, comm]
""")
    feed(agg, *(line("c", 1, 10 + i, f"f: (0x1) n={i}") for i in range(10)))
    snap = agg.snapshot()
    ns = {dict(lbls)["n"]: v for (p, lbls), v in snap.events.items()}
    assert ns == {"0": 1, "1": 1, "2": 1, "__overflow__": 7}
    assert snap.label_overflow[("f", "n")] == 7 and snap.label_overflow[("f", "comm")] == 0


def test_span_sink_gets_sampled_pairs_with_args_and_retval() -> None:
    got: list[CompletedPair] = []

    class Sampling:
        sample_ratio = 1.0
        min_duration_ns = 5_000

    agg = make(UP)
    agg.set_sink("f", Sampling(), got.append)
    feed(
        agg,
        line("app", 7, 100, "f: (0x1) n=-3"),
        line("app", 7, 102, "f_ret: (0x2 <- 0x1) ret=0xfffffffffffffffe"),
        line("app", 7, 200, "f: (0x1) n=4"),
        line("app", 7, 290, "f_ret: (0x2 <- 0x1) ret=5"),
    )
    assert len(got) == 1  # the 2 µs call is under min_duration
    p = got[0]
    assert (p.pair, p.tid, p.comm, p.start_ns, p.end_ns, p.args, p.retval) == (
        "f",
        7,
        "app",
        200_000,
        290_000,
        (("n", "4"),),
        "5",
    )


def test_stats_make_every_cpu_series_exist_at_zero() -> None:
    agg = make(UP)
    agg.set_stats_lost(0, 0)
    agg.set_stats_lost(1, 0)
    assert agg.snapshot().lost == {0: 0, 1: 0}


COMM_LABEL = """
probes:
  - name: f
    uprobe: /bin/x:0x10
    args: {n: "%di:s32"}
    labels: [comm]
"""


@pytest.mark.parametrize("repeat", [1, 100])  # the per-line path and the columnar one (>= 128 lines)
def test_unknown_comm_is_named_live_and_left_alone_in_replay(tmp_path: Path, repeat: int) -> None:
    """`<...>` is what the kernel prints when its 128-entry comm cache lost the thread. A live agent names
    it from the chunk's other lines of that thread, then /proc; replay cannot."""
    import os

    from kprobe_exporter.tasks import Tasks

    me = os.getpid()
    comm = Path("/proc/self/comm").read_text().strip()
    lines = repeat * [
        line("worker", 11, 10, "f: (0x1) n=1"),
        line("<...>", 11, 11, "f: (0x1) n=1"),  # the same thread, evicted by the time this line printed
        line("<...>", me, 12, "f: (0x1) n=1"),  # a live thread: /proc names it
        line("<...>", 999_999_999, 13, "f: (0x1) n=1"),  # gone: stays unknown
    ]
    live = make(COMM_LABEL)
    # as the agent has it: /proc only (the kernel looked in its tables already)
    feed_text(live, b"\n".join(lines) + b"\n", tasks=Tasks())
    got = {dict(lbls)["comm"]: v for (_, lbls), v in live.snapshot().events.items()}
    assert got == {"worker": 2 * repeat, comm: repeat, "<...>": repeat}

    replay = make(COMM_LABEL)
    feed(replay, *lines)
    got = {dict(lbls)["comm"]: v for (_, lbls), v in replay.snapshot().events.items()}
    assert got == {"worker": repeat, "<...>": 3 * repeat}


def test_deep_pending_stacks_pair_lifo_across_chunks_and_keep_their_eviction_order() -> None:
    """Many threads with deep stacks of entries that never return (longjmp): later chunks pop into those
    stacks, empty some, refill others. Every pair, every unmatched exit, every stack left and the order
    capacity eviction takes them in must be what a per-line stack per thread gives."""
    import random

    rng = random.Random(14)
    got: list[CompletedPair] = []

    class Sampling:
        sample_ratio = 1.0
        min_duration_ns = 0

    agg = make(UP + "pending: {max_pending: 100000, max_age: 1h}\n")
    agg.set_sink("f", Sampling(), got.append)
    lines: list[bytes] = []
    model: dict[int, list[int]] = {}  # tid -> entry ids, bottom first; dict order = order opened
    want: list[tuple[int, str, str]] = []
    unmatched = 0
    ts = 1_000_000
    for uid in range(3000):  # 300 threads, 1..19 entries each, interleaved
        tid = 100 + rng.randrange(300)
        ts += 1
        lines.append(line("app", tid, ts, f"f: (0x1) n={uid}"))
        model.setdefault(tid, []).append(uid)
    for uid in range(3000, 40000):
        tid = 100 + rng.randrange(320)  # 20 threads with nothing pending
        ts += 1
        if rng.random() < 0.5:
            lines.append(line("app", tid, ts, f"f: (0x1) n={uid}"))
            model.setdefault(tid, []).append(uid)
        else:
            lines.append(line("app", tid, ts, f"f_ret: (0x2 <- 0x1) ret={uid}"))
            stack = model.get(tid)
            if stack:
                want.append((tid, str(stack.pop()), str(uid)))
                if not stack:
                    del model[tid]
            else:
                unmatched += 1
    at = 0
    while at < len(lines):  # chunks of 150..2500 lines: the columnar path, cut anywhere
        n = rng.randrange(150, 2500)
        feed(agg, *lines[at : at + n])
        at += n
    assert [(p.tid, p.args[0][1], p.retval) for p in got] == want
    st = agg.snapshot().pairs["f"]
    assert (st.count, st.unmatched, st.pending) == (len(want), unmatched, sum(map(len, model.values())))
    # the test is about deep stacks popped into from later chunks: they must be there
    assert st.pending > 2000 and sum(int(n) < 3000 for _, n, _ in want) > 1000
    # Capacity eviction takes whole stacks, oldest opened first: the stacks' order must be the model's.
    agg.max_pending = st.pending + 5
    evicted: list[int] = []
    extra = []
    for i in range(200):
        tid, ts = 5000 + i, ts + 1
        extra.append(line("app", tid, ts, f"f: (0x1) n={50000 + i}"))
        model[tid] = [50000 + i]
        while sum(map(len, model.values())) > agg.max_pending:
            evicted.append(len(model.pop(next(iter(model)))))
    feed(agg, *extra)
    st = agg.snapshot().pairs["f"]
    assert st.evicted["capacity"] == sum(evicted) and st.pending == sum(map(len, model.values()))
    assert list(agg.pairs["f"].stack) == list(model)
