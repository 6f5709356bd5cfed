"""What in-kernel aggregation adds to each traced call, on Debian's 6.1 under qemu (one boot).

    python3 bench/lab_kernel_agg.py [--n 100000] [--rounds 3]

Modes, on a kprobe + kretprobe pair on `__x64_sys_getppid`, against no probe in the same boot, in an
order that rotates each round; the loop itself reports its ns and CPU per call (bench/kagg_loop.c):
  record     the pair enabled in an instance whose buffer nobody reads (what streaming costs the loop,
             without a reader's own CPU)
  count1     the pair disabled, one hist trigger counting the entry event (kernel count-only, one event)
  count      the pair disabled, a hist trigger counting each of the two events
  latency    kprobe_exporter.triggers.latency_plan (entry timestamp, onmatch synthetic event, log2 hist)
Absolute numbers are inflated by emulation: read the ratios. Medians of an odd number of rounds.
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
sys.path.insert(0, str(ROOT / "tests"))

from kernel_lab.guest import run_in_guest  # noqa: E402

GUEST = r'''
import json, os, subprocess, sys
from pathlib import Path
from kprobe_exporter import hist, triggers
T = Path("/sys/kernel/tracing"); G = "kpe_bench"; I = T / "instances" / G
LOOP = os.environ["LAB_IN"] + "/kagg_loop"; os.chmod(LOOP, 0o755)
def write(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try: os.write(fd, (line + "\n").encode())
    finally: os.close(fd)
n, rounds = int(sys.argv[1]), int(sys.argv[2])
I.mkdir()
write(T / "kprobe_events", f"p:{G}/ppid __x64_sys_getppid")
write(T / "kprobe_events", f"r:{G}/ppid_ret __x64_sys_getppid")
plan = triggers.latency_plan(G, "ppid", "ppid_ret", "ppid")
count = (triggers.count_trigger(f"{G}/ppid"), triggers.count_trigger(f"{G}/ppid_ret"))
def on(mode):
    if mode == "record":
        for e in ("ppid", "ppid_ret"): write(I / "events" / G / e / "enable", "1")
    elif mode == "count1":
        write(I / count[0].path, count[0].line)
    elif mode == "count":
        for t in count: write(I / t.path, t.line)
    elif mode == "latency":
        for s in plan.synthetics: write(T / "synthetic_events", s.line)
        for t in plan.triggers: write(I / t.path, t.line)
def off(mode):
    got = {}
    if mode == "record":
        for e in ("ppid", "ppid_ret"): write(I / "events" / G / e / "enable", "0")
    elif mode == "count1":
        got = {count[0].event: hist.parse((I / count[0].path.replace("trigger", "hist")).read_text())[0].events}
        write(I / count[0].path, count[0].removal)
    elif mode == "count":
        got = {t.event: hist.parse((I / "events" / t.event / "hist").read_text())[0].events for t in count}
        for t in reversed(count): write(I / t.path, t.removal)
    elif mode == "latency":
        got = {t.event: hist.parse((I / "events" / t.event / "hist").read_text())[0].events for t in plan.triggers}
        for path, line in plan.removal(): write((T if path == triggers.SYNTHETIC_EVENTS else I) / path, line)
    return got
modes = ["none", "record", "count1", "count", "latency"]
out = []
for r in range(rounds):
    order = modes[r % len(modes):] + modes[: r % len(modes)]
    for mode in order:
        on(mode)
        calls, ns, cpu = subprocess.run([LOOP, str(n)], capture_output=True, text=True, check=True).stdout.split()
        out.append({"round": r, "mode": mode, "ns": float(ns), "cpu_ns": float(cpu), "counted": off(mode)})
I.rmdir()
write(T / "kprobe_events", f"-:{G}/ppid"); write(T / "kprobe_events", f"-:{G}/ppid_ret")
Path(os.environ["LAB_OUT"], "bench.json").write_text(json.dumps(out))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.rounds % 2 == 0:
        ap.error("--rounds must be odd (a median of an even count is no round's figure)")
    with tempfile.TemporaryDirectory() as tmp:
        loop = Path(tmp) / "kagg_loop"
        subprocess.run(["gcc", "-O1", "-static", "-o", str(loop), str(ROOT / "bench" / "kagg_loop.c")], check=True)
        files = {"kagg_loop": loop.read_bytes(), "bench.py": GUEST.encode()}
        r = run_in_guest(f'python3 "$LAB_IN/bench.py" {a.n} {a.rounds}', files, timeout=1800)
    if r.returncode != 0 or "bench.json" not in r.files:
        print(r.stdout[-3000:], file=sys.stderr)
        return 1
    rows = json.loads(r.files["bench.json"])
    base = statistics.median(x["ns"] for x in rows if x["mode"] == "none")
    print(f"{a.n} getppid calls per run, {a.rounds} rounds, medians; no probe: {base:.0f} ns/call")
    print("| mode | ns/call | added ns/call | CPU ns/call | x no probe | events counted (min over rounds) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in ("none", "record", "count1", "count", "latency"):
        xs = [x for x in rows if x["mode"] == mode]
        ns = statistics.median(x["ns"] for x in xs)
        cpu = statistics.median(x["cpu_ns"] for x in xs)
        counted = {k: min(x["counted"][k] for x in xs) for k in xs[0]["counted"]}
        print(f"| {mode} | {ns:.0f} | {ns - base:.0f} | {cpu:.0f} | {ns / base:.2f} | {counted or '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
