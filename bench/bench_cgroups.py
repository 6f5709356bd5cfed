"""Cost per event of the cgroup labels: a labelled batch counted with and without them, same run.

    python3 bench/bench_cgroups.py [--tids 300] [--batch 4000] [--batches 250] [--rounds 5]

The batch is what the hot path counts for a labelled probe: event ids, comms and thread ids of
`batch` events (the reader's chunks are ~4000 lines at 200k events/s) spread over `tids` distinct
threads alive on this host (real /proc entries; idle threads of the bench's own if the host has
fewer; skewed, as a few threads make most
events). Baseline: `Counter(zip(event, comm))`, the aggregate's labelled counting; a second
baseline counts a third column given in advance (what any extra label costs). With: the same
plus the `cgroup` label (second row: all four cgroup labels) from CgroupLabels.columns, cache
warm, rechecks every 1 s as in production (so the figure includes them); third row: the form for a
caller that counts by tid first (CgroupLabels.by_tid, a cost per distinct key). Each round times
every variant in turn, in process CPU time (other load on the machine does not count); the median
of an odd number of rounds is reported, per event and as a ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kprobe_exporter.cgroups import LABELS, CgroupLabels, CgroupOf


def live_tids(n: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            for t in os.listdir(f"/proc/{pid}/task"):
                out.append((int(t), Path(f"/proc/{pid}/task/{t}/comm").read_bytes().rstrip(b"\n")))
        except OSError:
            continue
        if len(out) >= n:
            break
    return out[:n]


def enough_tids(n: int) -> tuple[list[tuple[int, bytes]], threading.Event]:
    """`n` live threads (tid, comm): the host's, and where a small host has fewer, idle ones of ours
    (they wait on the returned event: set it to let them go)."""
    tids = live_tids(n)
    idle = threading.Event()
    extra = [threading.Thread(target=idle.wait, daemon=True) for _ in range(n - len(tids))]
    for t in extra:
        t.start()
    return tids + [(t.native_id or 0, b"bench-idle") for t in extra], idle


def make_batch(tids: list[tuple[int, bytes]], size: int, rng: np.random.Generator) -> tuple[list[int], list[bytes],
                                                                                               np.ndarray]:
    w = 1.0 / np.arange(1, len(tids) + 1)  # Zipf-like: a few busy threads, a long tail
    pick = rng.choice(len(tids), size=size, p=w / w.sum())
    ev = rng.integers(0, 4, size=size).tolist()
    return ev, [tids[i][1] for i in pick], np.array([tids[i][0] for i in pick], dtype=np.int64)


def timed(fn: Callable[[], object], batches: int) -> float:
    t0 = time.process_time()
    for _ in range(batches):
        fn()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tids", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4000)
    ap.add_argument("--batches", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if a.rounds % 2 == 0:
        ap.error("--rounds must be odd (a true median)")
    tids, idle = enough_tids(a.tids)
    ev, comms, tid_col = make_batch(tids, a.batch, np.random.default_rng(7))
    of = CgroupOf()
    one, four = CgroupLabels(["cgroup"], of), CgroupLabels(LABELS, of)
    while of.counts.over_budget or not of.counts.reads:  # warm: every tid resolved once
        of.counts.over_budget = 0
        four.columns(tid_col)

    def base() -> object:
        return Counter(zip(ev, comms, strict=True))

    fixed = one.columns(tid_col)["cgroup"]

    def counted_only() -> object:  # the same three-column count with the column given: what counting costs
        return Counter(zip(ev, comms, fixed, strict=True))

    def with_cgroup() -> object:
        return Counter(zip(ev, comms, one.columns(tid_col)["cgroup"], strict=True))

    def with_four() -> object:
        c = four.columns(tid_col)
        return Counter(zip(ev, comms, *(c[n] for n in LABELS), strict=True))

    def by_tid() -> object:
        # count by thread first (C speed), then label the distinct keys: cost per key, not per event
        c = Counter(zip(ev, comms, tid_col.tolist(), strict=True))
        rows = four.by_tid([t for _, _, t in c])
        out: Counter[tuple[object, ...]] = Counter()
        for (e, cm, t), n in c.items():
            out[(e, cm, *rows[t])] += n
        return out

    variants = {"base": ("Counter(event, comm)", base),
                "counted": ("Counter(event, comm, cgroup) with the column given (counting a third label)",
                            counted_only),
                "cgroup": ("+ cgroup, per event (columns)", with_cgroup),
                "four": ("+ all four cgroup labels, per event (columns)", with_four),
                "by_tid": ("+ all four, counted by tid then labelled per key (by_tid)", by_tid)}
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, (_, fn) in variants.items():
            runs[name].append(timed(fn, a.batches) / (a.batches * a.batch))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"# {platform.node()} {platform.python_version()} {os.cpu_count()} CPUs; {len(tids)} distinct live tids,"
          f" batch {a.batch} events x {a.batches} batches, {a.rounds} rounds, median of process CPU time")
    print(f"/proc lookups over the run: {of.counts.reads} (rechecks every {of.recheck_s:g} s), "
          f"unknown: {of.counts.gone} gone, {of.counts.over_budget} over budget")
    print("| variant | ns/event | + ns/event over baseline | ratio |")
    print("| --- | --- | --- | --- |")
    for k, (label, _) in variants.items():
        print(f"| {label} | {med[k] * 1e9:.0f} | {(med[k] - med['base']) * 1e9:.0f} | {med[k] / med['base']:.2f}x |")
    idle.set()


if __name__ == "__main__":
    main()
