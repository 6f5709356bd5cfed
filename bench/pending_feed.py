"""CPU time of Aggregate.feed on the escape corpus (50k-72k entries pending) and on the same lines
without the escaped entries (bench/escape_corpus.py builds both), in one process, alternating, an odd
number of rounds; the package is whichever PYTHONPATH gives (so an older tree can be measured too):

    PYTHONPATH=$PWD python3 bench/pending_feed.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from kprobe_exporter import config, probes
from kprobe_exporter.aggregate import Aggregate

OUT = Path(__file__).resolve().parent / "out"


def feed_text(agg: Aggregate, ps: probes.ProbeSet, data: bytes) -> None:
    """Text through the text source to the aggregate (trees before the event batch: feed() took text)."""
    try:
        from kprobe_exporter.text import TextSource
    except ImportError:
        agg.feed(data)  # type: ignore[arg-type]
        return
    for batch in TextSource(ps).batches(data):
        agg.feed(batch)


def rate(cfg_path: Path, trace: Path) -> tuple[float, int]:
    cfg = config.load(str(cfg_path))
    ps = probes.build_probe_set(cfg, str(cfg_path))
    agg = Aggregate(ps, cfg.buckets, cfg.label_limit, cfg.pending.max_pending, cfg.pending.max_age)
    data = trace.read_bytes()
    t0 = time.process_time()
    feed_text(agg, ps, data)
    t = time.process_time() - t0
    return data.count(b"\n") / t, agg.snapshot().pairs["work"].pending


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    got: dict[str, list[float]] = {"escape": [], "escape-none": []}
    ratios = []
    pending = {}
    for r in range(args.rounds):
        res = {}
        for name in ("escape", "escape-none") if r % 2 == 0 else ("escape-none", "escape"):
            res[name], pending[name] = rate(OUT / "escape.yaml", OUT / f"{name}.trace")
            got[name].append(res[name])
        ratios.append(res["escape"] / res["escape-none"])
    for name, xs in got.items():
        print(f"{name:12} M lines/s of CPU min/median/max {min(xs) / 1e6:.2f}/{statistics.median(xs) / 1e6:.2f}/"
              f"{max(xs) / 1e6:.2f}, pending at the end {pending[name]}")
    print(f"ratio (median of rounds): {statistics.median(ratios):.2f}x  rounds: "
          + ", ".join(f"{x:.2f}" for x in ratios))


if __name__ == "__main__":
    main()
