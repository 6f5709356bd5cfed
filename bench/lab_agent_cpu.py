"""The agent's own CPU with `aggregation: kernel`, with no call and at full rate, in the kernel lab (issue 12).

    python3 bench/lab_agent_cpu.py [--kernel 6.1] [--rounds 3] [--window 60] [--scrape-every 15] [--n 20000]

Issue 12's goal: the agent's own CPU in kernel mode below 1% of a core at the maximum call rate. In one boot
of the lab guest, each round starts the agent (`aggregation: kernel`, the getppid kprobe+kretprobe pair with
latency, as bench/lab_kernel_agg.py's `k_agent`), then measures its utime+stime from /proc/PID/stat over two
windows of equal wall time with a /metrics scrape every SCRAPE_EVERY s in both: one with no call, one with
`kagg_loop.c` making N getppid calls on every guest CPU again and again (full rate); their order alternates
by round. The two windows do the same scrapes, so what differs is the call rate alone: in kernel mode the
agent's CPU should not depend on it. Every call of the busy window must be counted and timed.

Under TCG a guest core runs the agent's Python many times slower than the host's: the same fixed CPython
loop is timed on the host here and in the guest (medians of 5), and the guest's % of a core divided by that
factor is what the same work would take of a host core. Odd rounds; min / median / max. Guest side:
lab_agent_cpu_guest.py (with lab_kernel_agg_guest.py as agg_guest.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_guest import bg, run_in_bench_guest  # noqa: E402
from lab_agent_cpu_guest import python_loop_s  # noqa: E402


def mmm(xs: list[float], fmt: str = ".2f") -> str:
    return f"{min(xs):{fmt}} / **{statistics.median(xs):{fmt}}** / {max(xs):{fmt}}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=60.0, help="seconds of each window")
    ap.add_argument("--scrape-every", type=float, default=15.0)
    ap.add_argument("--n", type=int, default=20_000, help="getppid calls per guest CPU per workload run")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--package", type=Path, default=None)
    a = ap.parse_args()
    if a.rounds % 2 == 0:
        ap.error("--rounds must be odd (a median of an even count is no round's figure)")
    image = bg.ensure_guest(kernel=a.kernel)
    host_loop = [python_loop_s()]
    with tempfile.TemporaryDirectory() as tmp:
        loop = Path(tmp) / "kagg_loop"
        subprocess.run(["gcc", "-O1", "-static", "-o", str(loop), str(ROOT / "bench" / "kagg_loop.c")], check=True)
        files = {"kagg_loop": loop.read_bytes(),
                 "agg_guest.py": (ROOT / "bench" / "lab_kernel_agg_guest.py").read_bytes(),
                 "guest.py": (ROOT / "bench" / "lab_agent_cpu_guest.py").read_bytes()}
        script = f'python3 "$LAB_IN/guest.py" {a.n} {a.window} {a.scrape_every} {a.rounds}'
        r = run_in_bench_guest(image, script, files, timeout=a.timeout, package=a.package)
    host_loop.append(python_loop_s())  # before and after the boot: the host's load moves too
    if "agent_cpu.json" not in r.files:
        print(r.stdout[-5000:], file=sys.stderr)
        return 1
    rows = json.loads(r.files["agent_cpu.json"])
    host_s = statistics.median(host_loop)
    factor = [x["loop_s"] / host_s for x in rows]
    print(f"kernel {image.kernel_release}; {a.rounds} rounds, windows of {a.window:.0f} s, a scrape every "
          f"{a.scrape_every:.0f} s; boot {r.boot_seconds:.0f} s, all {r.seconds:.0f} s")
    print(f"emulation factor (the same CPython loop, guest / host {host_s * 1e3:.1f} ms): {mmm(factor, '.1f')}")
    print("| window | agent % of a guest core | the same / emulation factor (~% of a host core) | calls | scrapes |")
    print("| --- | --- | --- | --- | --- |")
    for w in ("idle", "busy"):
        pct = [x[f"{w}_agent_pct"] for x in rows]
        host_pct = [x[f"{w}_agent_pct"] / f for x, f in zip(rows, factor, strict=True)]
        print(f"| {'no call' if w == 'idle' else 'full rate, every CPU'} | {mmm(pct)} | {mmm(host_pct, '.3f')} | "
              f"{mmm([x[f'{w}_calls'] for x in rows], ',.0f')} | {mmm([x[f'{w}_scrapes'] for x in rows], '.0f')} |")
    ratio = [x["busy_agent_pct"] / x["idle_agent_pct"] for x in rows if x["idle_agent_pct"]]
    print(f"busy / idle, per round: {mmm(ratio)}")
    for x in rows:
        exact = x["counted"] == x["busy_calls"] == x["timed"] and x["lost"] == 0
        print(f"round {x['round']}: {x['busy_calls']:,} calls, counted {x['counted']:,}, timed {x['timed']:,}, "
              f"lost {x['lost']}, kprobe misses {x.get('missed', '?')}, mode kernel {x['mode']:.0f}"
              f"{'' if exact else '  <-- NOT EXACT'}")
    return 0 if r.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
