"""Cost per event of the cgroup labels through the aggregate: the same events counted with and without them.

    python3 bench/bench_labels.py [--tids 300] [--events 200000] [--chunk 4000] [--rounds 5]

The events are uprobe trace lines (this kernel's text format) of one probe with an int arg `n` (8
values), from `tids` threads alive on this host (real /proc entries; idle threads of the bench's own
make up the count on a small host), skewed as real load is (a few threads make most events). Each
variant's probe set parses them once, with the agent's text source, into the batches the reader would
hand the aggregate (`chunk` lines each); what is timed is `Aggregate.feed` of all of them, in process
CPU time, so the figure is the labels' cost on the hot path and nothing else:

- base: `labels: [n]` (a labelled probe, an arg label)
- cgroup: `labels: [n, cgroup, container_id]`
- four: `labels: [n, cgroup, container_id, pod_uid, systemd_unit]`

The variants share the agent's one tid -> cgroup cache (CgroupOf), warmed first, rechecking every 1 s as
in production (real /proc reads, included in the figure). Each round feeds a fresh aggregate per variant,
in rotating order; odd rounds, true median, min/median/max per event and the median ratio to base. The
counts of every variant are checked equal (the labels split the same events, they add none).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cgroups import enough_tids

from kprobe_exporter import agent, config, probes
from kprobe_exporter.cgroups import CgroupOf
from kprobe_exporter.events import EventBatch
from kprobe_exporter.text import TextSource

VARIANTS = {"base": "[n]", "cgroup": "[n, cgroup, container_id]",
            "four": "[n, cgroup, container_id, pod_uid, systemd_unit]"}


def corpus(tids: list[tuple[int, bytes]], n: int, rng: np.random.Generator) -> bytes:
    w = 1.0 / np.arange(1, len(tids) + 1)  # Zipf-like: a few busy threads, a long tail
    pick = rng.choice(len(tids), size=n, p=w / w.sum()).tolist()
    vals = rng.integers(0, 8, size=n).tolist()
    lines = []
    for i, (k, v) in enumerate(zip(pick, vals, strict=True)):
        tid, comm = tids[k]
        us = 1_000_000 + i
        lines.append(f"{comm.decode(errors='replace')[-16:]:>16}-{tid:<7} [000] ..... "
                     f"{us // 10**6:5d}.{us % 10**6:06d}: f: (0x401136) n={v}")
    return ("\n".join(lines) + "\n").encode()


def setup(labels: str) -> tuple[config.Config, probes.ProbeSet]:
    cfg = config.load_text(f"label_limit: 100000\nprobes:\n  - {{name: f, uprobe: '/bin/x:0x10', "
                           f"args: {{n: '%di:s32'}}, labels: {labels}}}\n")
    return cfg, probes.build_probe_set(cfg, resolve=None)


def batches(ps: probes.ProbeSet, text: bytes, chunk: int) -> list[EventBatch]:
    src = TextSource(ps)
    lines = text.splitlines(keepends=True)
    out: list[EventBatch] = []
    for i in range(0, len(lines), chunk):
        out.extend(src.batches(b"".join(lines[i:i + chunk])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tids", type=int, default=300)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if a.rounds % 2 == 0:
        ap.error("--rounds must be odd (a true median)")
    tids, idle = enough_tids(a.tids)
    text = corpus(tids, a.events, np.random.default_rng(7))
    of = CgroupOf()
    setups = {k: setup(v) for k, v in VARIANTS.items()}
    fed = {k: batches(ps, text, a.chunk) for k, (_, ps) in setups.items()}
    assert sum(len(b) for b in fed["base"]) == a.events
    warm = agent.make_aggregate(*setups["four"], of)
    while of.counts.over_budget or not of.counts.reads:  # every tid resolved once (128 new ones a batch)
        of.counts.over_budget = 0
        for b in fed["four"]:
            warm.feed(b)
    runs: dict[str, list[float]] = {k: [] for k in VARIANTS}
    totals: dict[str, set[int]] = {k: set() for k in VARIANTS}
    series: dict[str, int] = {}
    order = list(VARIANTS)
    for r in range(a.rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            agg = agent.make_aggregate(*setups[k], of)
            t0 = time.process_time()
            for b in fed[k]:
                agg.feed(b)
            runs[k].append((time.process_time() - t0) / a.events)
            snap = agg.snapshot().events
            totals[k].add(sum(snap.values()))
            series[k] = len(snap)
    assert all(t == {a.events} for t in totals.values()), totals
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"# {platform.node()} Python {platform.python_version()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; {len(tids)} live tids, {a.events} events in chunks of {a.chunk}, "
          f"{a.rounds} rounds (rotating order), process CPU time of Aggregate.feed")
    print(f"# /proc lookups over the run: {of.counts.reads} (rechecks every {of.recheck_s:g} s); unknown: "
          f"{of.counts.gone} gone, {of.counts.over_budget} over budget; series: "
          f"{', '.join(f'{k} {n}' for k, n in series.items())}")
    print("| labels | ns/event min / median / max | + ns/event (median) | ratio to base (median) |")
    print("| --- | --- | --- | --- |")
    for k, labels in VARIANTS.items():
        lo, hi = min(runs[k]), max(runs[k])
        print(f"| `{labels}` | {lo * 1e9:.0f} / {med[k] * 1e9:.0f} / {hi * 1e9:.0f} | "
              f"{(med[k] - med['base']) * 1e9:.0f} | {med[k] / med['base']:.2f}x |")
    idle.set()


if __name__ == "__main__":
    main()
