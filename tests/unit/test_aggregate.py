"""Aggregate: counting, per-thread LIFO pairing, bounded pending state, loss handling, label caps."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from pathlib import Path

import pytest

from feeding import feed_text
from kprobe_exporter import aggmode, config, probes
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


class AllSpans:
    sample_ratio = 1.0
    min_duration_ns = 0


# Bounds 5 µs, 50 µs, 500 µs, 5 ms: the calls below have durations in distinct buckets, so a histogram
# tells which entry paired with which exit (sums and counts do not: any pairing of the same entries
# and exits has the same sum).
NESTED = """
buckets: [0.000005, 0.00005, 0.0005, 0.005]
probes:
  - name: f
    uprobe: /bin/x:0x10
    args: {n: "%di:s32"}
    latency: true
  - name: g
    uprobe: /bin/x:0x20
    latency: true
"""


def other_thread_calls(n: int, ts_us: int) -> list[bytes]:
    """n calls of g (another pair, another thread): enough of them make a chunk take the columnar
    path (whole-array pairing), none the per-line loop; f's figures do not include them."""
    return [line("o", 77, ts_us, "g: (0x3)" if i % 2 == 0 else "g_ret: (0x4 <- 0x3) ret=0") for i in range(2 * n)]


def nested() -> tuple[Aggregate, list[CompletedPair]]:
    agg = make(NESTED)
    spans: list[CompletedPair] = []
    agg.set_sink("f", AllSpans(), spans.append)
    return agg, spans


def pairs_of(spans: list[CompletedPair]) -> list[tuple[int, int, int, str]]:
    """(tid, start µs, end µs, the entry's n) of each span, in the order the exits came."""
    return [(p.tid, p.start_ns // 1000, p.end_ns // 1000, dict(p.args)["n"]) for p in spans]


@pytest.mark.parametrize("filler", [0, 200])  # the per-line loop, and whole-array pairing
def test_nested_calls_pair_lifo_per_thread(filler: int) -> None:
    agg, spans = nested()
    lines = [*other_thread_calls(filler, 1_000_000),
        line("a", 1, 1_000_000, "f: (0x1) n=1"),
        line("b", 2, 1_000_001, "f: (0x1) n=9"),
        line("a", 1, 1_000_010, "f: (0x1) n=2"),
        line("a", 1, 1_000_012, "f_ret: (0x2 <- 0x1) ret=0"),
        line("b", 2, 1_000_500, "f_ret: (0x2 <- 0x1) ret=0"),
        line("a", 1, 1_001_000, "f_ret: (0x2 <- 0x1) ret=0"),
    ]
    feed(agg, *lines)
    st = agg.snapshot().pairs["f"]
    assert (st.count, st.pending, st.unmatched) == (3, 0, 0)
    assert st.sum_ns == (2 + 499 + 1000) * 1000  # inner 2 µs, thread b 499 µs, outer 1000 µs
    # the inner call closes first: 2 µs (<= 5 µs); b 499 µs (<= 500 µs); the outer 1000 µs (<= 5 ms).
    # FIFO pairing would make them 12 µs, 499 µs, 990 µs.
    assert st.buckets == [1, 0, 1, 1, 0]
    assert pairs_of(spans) == [(1, 1_000_010, 1_000_012, "2"), (2, 1_000_001, 1_000_500, "9"),
                               (1, 1_000_000, 1_001_000, "1")]


@pytest.mark.parametrize("filler", list(itertools.product([0, 200], repeat=3)))
def test_a_stack_carried_over_chunk_boundaries_keeps_its_order(filler: tuple[int, int, int]) -> None:
    """Two nested calls open at the end of one chunk, a third opens in the next, and all close in a
    third chunk (with a fourth opened and closed in between): the innermost closes first, whichever
    way each chunk is paired (`filler`: other calls that make a chunk take the whole-array path)."""
    agg, spans = nested()
    feed(agg, *other_thread_calls(filler[0], 1_000_000), line("a", 1, 1_000_000, "f: (0x1) n=1"),
         line("a", 1, 1_000_010, "f: (0x1) n=2"))
    feed(agg, *other_thread_calls(filler[1], 1_000_010), line("a", 1, 1_000_012, "f: (0x1) n=3"))
    assert agg.snapshot().pairs["f"].pending == 3
    feed(agg, *other_thread_calls(filler[2], 1_000_012),
         line("a", 1, 1_000_013, "f_ret: (0x2 <- 0x1) ret=0"),
         line("a", 1, 1_000_020, "f: (0x1) n=4"),
         line("a", 1, 1_000_025, "f_ret: (0x2 <- 0x1) ret=0"),
         line("a", 1, 1_000_050, "f_ret: (0x2 <- 0x1) ret=0"),
         line("a", 1, 1_000_400, "f_ret: (0x2 <- 0x1) ret=0"))
    st = agg.snapshot().pairs["f"]
    assert (st.count, st.pending, st.unmatched) == (4, 0, 0)
    assert pairs_of(spans) == [(1, 1_000_012, 1_000_013, "3"), (1, 1_000_020, 1_000_025, "4"),
                               (1, 1_000_010, 1_000_050, "2"), (1, 1_000_000, 1_000_400, "1")]
    assert st.buckets == [2, 1, 1, 0, 0]  # 1 µs and 5 µs; 40 µs; 400 µs


@pytest.mark.parametrize("filler", [0, 200])
def test_stacks_of_several_threads_carried_over_together_stay_apart(filler: int) -> None:
    agg, spans = nested()
    feed(agg, *other_thread_calls(filler, 1_000_000), line("a", 1, 1_000_000, "f: (0x1) n=1"),
         line("b", 2, 1_000_001, "f: (0x1) n=5"),
         line("a", 1, 1_000_002, "f: (0x1) n=2"), line("b", 2, 1_000_003, "f: (0x1) n=6"))
    feed(agg, *other_thread_calls(filler, 1_000_003),
         line("b", 2, 1_000_004, "f_ret: (0x2 <- 0x1) ret=0"),
         line("a", 1, 1_000_030, "f_ret: (0x2 <- 0x1) ret=0"),
         line("b", 2, 1_000_301, "f_ret: (0x2 <- 0x1) ret=0"),
         line("a", 1, 1_003_000, "f_ret: (0x2 <- 0x1) ret=0"))
    assert pairs_of(spans) == [(2, 1_000_003, 1_000_004, "6"), (1, 1_000_002, 1_000_030, "2"),
                               (2, 1_000_001, 1_000_301, "5"), (1, 1_000_000, 1_003_000, "1")]
    assert agg.snapshot().pairs["f"].buckets == [1, 1, 1, 1, 0]


@pytest.mark.parametrize("filler", [0, 200])
def test_a_line_without_its_newline_at_the_end_of_the_text_still_counts(filler: int) -> None:
    """The reader hands on a line longer than its buffer in pieces, the last without a newline, and
    each piece is a line read; so is the last line of text that ends without one."""
    agg, spans = nested()
    text = b"\n".join([*other_thread_calls(filler, 1_000_000), line("a", 1, 1_000_000, "f: (0x1) n=1"),
                       line("a", 1, 1_000_040, "f_ret: (0x2 <- 0x1) ret=0")])
    feed_text(agg, text)
    snap = agg.snapshot()
    assert snap.lines_read == 2 + 2 * filler
    assert (snap.pairs["f"].count, snap.pairs["f"].pending, snap.pairs["f"].unmatched) == (1, 0, 0)
    assert pairs_of(spans) == [(1, 1_000_000, 1_000_040, "1")]


def test_a_duration_equal_to_a_bound_falls_in_that_bound_s_bucket() -> None:
    """Prometheus buckets are `le`: a call of exactly 5 µs counts in the 5 µs bucket, one of 6 µs not."""
    for filler in (0, 200):
        agg, _ = nested()
        feed(agg, line("a", 1, 1_000_000, "f: (0x1) n=1"), line("a", 1, 1_000_005, "f_ret: (0x2 <- 0x1) ret=0"),
             line("a", 1, 1_000_010, "f: (0x1) n=1"), line("a", 1, 1_000_060, "f_ret: (0x2 <- 0x1) ret=0"),
             line("a", 1, 1_000_100, "f: (0x1) n=1"), line("a", 1, 1_000_106, "f_ret: (0x2 <- 0x1) ret=0"),
             *other_thread_calls(filler, 1_000_106))
        assert agg.snapshot().pairs["f"].buckets == [1, 2, 0, 0, 0], filler


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


@pytest.mark.parametrize("filler", [0, 200])
def test_an_entry_exactly_max_age_old_stays_and_one_older_goes(filler: int) -> None:
    """max_age is how long an entry may wait: at max_age it is still pending, a microsecond later not."""
    agg2 = make(NESTED + "pending: {max_age: 2s}\n")
    feed(agg2, *other_thread_calls(filler, 10_000_000), line("a", 1, 10_000_000, "f: (0x1) n=1"),
         line("b", 2, 10_000_001, "f: (0x1) n=2"), line("b", 2, 10_000_003, "f: (0x1) n=3"))
    # a sweep driven by the agent's idle loop, at 2 s after b's first entry
    agg2.sweep((10_000_001 + 2_000_000) * 1000)
    st = agg2.snapshot().pairs["f"]
    assert (st.evicted["age"], st.pending) == (1, 2)  # a's 2.000001 s old entry went; b's stack stays whole
    agg2.sweep((10_000_003 + 2_000_000) * 1000)
    st = agg2.snapshot().pairs["f"]
    assert (st.evicted["age"], st.pending) == (2, 1)  # b's older entry went, its newer one (exactly 2 s) stays
    agg2.sweep((10_000_003 + 2_000_000) * 1000 + 1)
    assert agg2.snapshot().pairs["f"].pending == 0
    # the same, driven by a line of the trace (an unrelated thread's entry) at that moment
    agg3 = make(NESTED + "pending: {max_age: 2s}\n")
    feed(agg3, *other_thread_calls(filler, 10_000_000), line("a", 1, 10_000_000, "f: (0x1) n=1"),
         line("b", 2, 10_000_001, "f: (0x1) n=2"), line("b", 2, 10_000_003, "f: (0x1) n=3"),
         line("c", 3, 12_000_001, "f: (0x1) n=4"))
    st = agg3.snapshot().pairs["f"]
    assert (st.evicted["age"], st.pending) == (1, 3)


def test_loss_in_the_per_cpu_stats_drops_what_is_pending() -> None:
    """An exit may be among the events the stats say were lost: pending entries are dropped (evicted
    as `lost`) when a CPU's loss grows, and only then."""
    agg, _ = nested()
    agg.set_stats_lost(0, 0)
    agg.set_stats_lost(1, 0)  # the first reading: nothing lost
    feed(agg, line("a", 1, 10, "f: (0x1) n=1"), line("b", 2, 11, "f: (0x1) n=2"))
    agg.set_stats_lost(1, 0)  # unchanged
    st = agg.snapshot().pairs["f"]
    assert (st.pending, st.evicted["lost"]) == (2, 0)
    agg.set_stats_lost(1, 4)  # four events lost on CPU 1
    snap = agg.snapshot()
    assert (snap.pairs["f"].pending, snap.pairs["f"].evicted["lost"], snap.lost) == (0, 2, {0: 0, 1: 4})
    feed(agg, line("a", 1, 20, "f_ret: (0x2 <- 0x1) ret=0"), line("a", 1, 30, "f: (0x1) n=3"))
    st = agg.snapshot().pairs["f"]
    assert (st.count, st.unmatched, st.pending) == (0, 1, 1)  # its entry was dropped: the exit is unmatched
    agg.set_stats_lost(1, 4)  # the same total again: nothing new lost
    agg.set_stats_lost(1, 3)  # a smaller reading (the stats overlap LOST lines) is no new loss either
    assert agg.snapshot().pairs["f"].pending == 1
    agg.set_stats_lost(2, 0)  # a first reading of another CPU, with nothing lost
    assert agg.snapshot().pairs["f"].pending == 1
    agg.set_stats_lost(0, 1)
    st = agg.snapshot().pairs["f"]
    assert (st.pending, st.evicted["lost"]) == (0, 3)


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


@pytest.mark.parametrize("repeat", [1, 100])  # the per-line path and the columnar one (>= 128 lines)
def test_the_comm_recorded_with_the_event_names_labels_and_spans(repeat: int) -> None:
    """A probe whose comm is used records `$comm` (probes.COMM_ARG): it wins over the `<...>` (or the
    stale name) the line's head took from the kernel's cache at read time; a line without it (text
    recorded before) keeps the head's."""
    from kprobe_exporter.probes import COMM_ARG

    got: list[CompletedPair] = []

    class Sampling:
        sample_ratio = 1.0
        min_duration_ns = 0

    agg = make(COMM_LABEL.replace("labels: [comm]", "labels: [comm]\n    latency: true\n    spans: {}"))
    agg.set_sink("f", Sampling(), got.append)
    feed(agg, *repeat * [
        line("<...>", 21, 10, f'f: (0x1) n=1 {COMM_ARG}="gone worker"'),
        line("<...>", 21, 11, "f_ret: (0x2 <- 0x1) ret=0x0"),
        line("reused", 22, 12, f'f: (0x1) n=2 {COMM_ARG}="old"'),  # the id's next holder's name
        line("reused", 22, 13, "f_ret: (0x2 <- 0x1) ret=0x0"),
        line("before", 23, 14, "f: (0x1) n=3"),
        line("before", 23, 15, "f_ret: (0x2 <- 0x1) ret=0x0"),
    ])
    counts = {dict(lbls)["comm"]: v for (_, lbls), v in agg.snapshot().events.items()}
    assert counts == {"gone worker": repeat, "old": repeat, "before": repeat}
    assert [(p.comm, p.args) for p in got] == repeat * [
        ("gone worker", (("n", "1"),)), ("old", (("n", "2"),)), ("before", (("n", "3"),))]


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


KSPANS = FIX / "linux-6.1-debian" / "kernel-spans"


def test_kernel_mode_spans_from_the_synthetic_events_real_lines() -> None:
    """Lines of a synthetic latency event (`lat= ts0= pid=`) captured on 6.1 (kernel-spans/capture.sh,
    variant D: 5 slow calls of 50 behind `lat >= 10000000`) become spans: start at ts0, the kernel's duration."""
    ev = aggmode.span_event("kx_lat", "work", ret=True)
    pair = probes.PairSpec("w", "w", "w_ret", "work", config.SpanSettings())
    ps = probes.ProbeSet("kx", (ev,), (), (probes.KernelSpans(ev, pair),))
    agg = Aggregate(ps, [0.1])
    spans: list[CompletedPair] = []
    agg.set_sink("w", config.SpanSettings(), spans.append)
    text = (KSPANS / "synthetic_spans.trace").read_bytes()
    feed_text(agg, text)
    line_re = rb"-(\d+) +\[\d+\] \S+ +([\d.]+): kx_lat: lat=(\d+) ts0=(\d+) pid=\d+ ret=(\d+)"
    want = [(int(tid), int(ts0), int(ts0) + int(lat), hex(int(ret)), int(stamp.replace(b".", b"")) * 1000)
            for tid, stamp, lat, ts0, ret in re.findall(line_re, text)]
    assert len(want) == 5
    assert [(s.tid, s.start_ns, s.end_ns, s.retval) for s in spans] == [w[:4] for w in want]
    assert {(s.pair, s.function, s.comm, s.retval) for s in spans} == {("w", "work", "kpe_spans", "0x1")}
    # the same clock: each call ended (ts0 + lat) before the kernel stamped its synthetic event
    assert all(0 <= stamp - end < 10**6 for _, _, end, _, stamp in want)
    assert all(s.end_ns - s.start_ns >= 10_000_000 for s in spans)
    snap = agg.snapshot()
    assert snap.events == {} and snap.pairs == {}  # counted in the kernel only
    assert snap.parse_errors == dict.fromkeys(snap.parse_errors, 0)
