"""Host-only: kprobe_exporter.hist.parse on a hist file of 10,000 keys (issue 12's scrape budget, /metrics p99 ≤ 50 ms).

    python3 bench/bench_hist_parse.py [--keys 10000] [--runs 201] [--file hist-10k.txt]

The text is either a real one (`--file`, e.g. the out/hist-10k.txt of bench/lab_kernel_findings.py --out) or
made here in the kernel's format (a `pid` key and hitcount, as 6.1 prints `hist:keys=pid:vals=hitcount`).
Reports p50/p99/max of parse alone and of a plain read+split of the same text, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kprobe_exporter import hist  # noqa: E402


def synthetic(keys: int) -> str:
    size = 1 << (keys * 2 - 1).bit_length()
    head = (
        "# event histogram\n#\n"
        f"# trigger info: hist:keys=pid:vals=hitcount:sort=hitcount:size={size} [active]\n#\n\n"
    )
    rows = "".join(f"{{ pid: {100000 + i:>8} }} hitcount:          1\n" for i in range(keys))
    return head + rows + f"\nTotals:\n    Hits: {keys}\n    Entries: {keys}\n    Dropped: 0\n"


def quantiles(xs: list[int]) -> str:
    s = sorted(xs)
    return f"p50 {s[len(s) // 2] / 1e6:.2f} ms, p99 {s[int(len(s) * 0.99)] / 1e6:.2f} ms, max {s[-1] / 1e6:.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=201)
    ap.add_argument("--file", type=Path, default=None)
    a = ap.parse_args()
    text = a.file.read_text() if a.file else synthetic(a.keys)
    rows = len(hist.parse(text)[0].rows)
    parse_ns, split_ns = [], []
    for _ in range(a.runs):
        t0 = time.perf_counter_ns()
        hist.parse(text)
        t1 = time.perf_counter_ns()
        text.splitlines()
        t2 = time.perf_counter_ns()
        parse_ns.append(t1 - t0)
        split_ns.append(t2 - t1)
    print(f"{rows:,} rows, {len(text):,} bytes ({'file ' + str(a.file) if a.file else 'synthetic'}), {a.runs} runs")
    print(f"hist.parse:       {quantiles(parse_ns)}")
    print(f"splitlines only:  {quantiles(split_ns)}")
    print(f"parse / splitlines (medians): {statistics.median(parse_ns) / statistics.median(split_ns):.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
