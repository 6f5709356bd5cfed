"""In-kernel aggregation against streaming and bpftrace, on one probe, in one boot of the kernel lab (issue 12).

    python3 bench/lab_kernel_agg.py [--kernel 6.1] [--n 20000] [--rounds 3] [--modes none,record,...]

The probe: a kprobe + kretprobe pair on `__x64_sys_getppid`. The workload (`kagg_loop.c`): N getppid calls
on every guest CPU at once, at full rate, the calls counted by the workload itself. The guest is the lab's
plus bpftrace (`bench_guest.py`: its own directory and key in the lab cache, so the tests' guests are not
rebuilt). Modes, interleaved in an order that rotates each round:

  none           no probe
  record         the pair enabled in an instance whose buffer nobody reads (the traced loop's share of streaming)
  text, raw      the agent (`kprobe-exporter run`, `latency: true`) with the text or the raw reader
  k_count_entry  one hist trigger counting the entry event (`triggers.count_trigger`, key common_cpu)
  k_count_exit   the same on the return event
  k_count_pid    the entry count keyed by common_pid (a key that grows with threads)
  k_lat          `triggers.latency_plan`: entry timestamp per thread, onmatch synthetic event of one field
                 (u64 lat), lat.log2 hist; the count is the synthetic hist's (one sample per completed call)
  k_lat_count    k_lat plus a separate entry count hist: the agent's layout since 1 Dec 2026
  k_lat_pid      k_lat with a second field, `int pid`, in the synthetic event (the agent's before 1 Dec 2026)
  k_agent        (only when asked for) the agent with `aggregation: kernel`, once merged with main's kernelagg.py
  bpftrace       `kprobe { @s[tid] = nsecs } kretprobe /@s[tid]/ { @ = hist(nsecs - @s[tid]); delete(@s[tid]) }`

For each: (a) ns per call of the loop on one CPU and what it adds to `none`; (b) CPU per call: the loop's
(user+sys of its processes), the tool's (the agent's or bpftrace's utime+stime over the run and its drain,
or for the kernel modes the one read+parse of the hist files at the end) and their sum; (c) what was
counted against the calls made. min/median/max over an odd number of rounds. The kernel modes write
`kprobe_exporter.triggers` lines directly; TODO(kagg): `--modes ...,k_agent` runs the agent with
`aggregation: kernel` (lab_kernel_agg_guest.modes()) once this branch meets main's kernelagg.py.
Absolute figures are inflated by emulation (TCG): read ratios.

Found (README, Performance, "Kernel aggregation"): counting costs the traced call about what recording into a
buffer does, whichever event and key; latency (onmatch + synthetic event) costs 5-6x that; a separate count
hist is within the noise; the synthetic event's `pid` field cost 6.12 more than half of it. The agent's
layout: the three latency triggers with a one-field synthetic event (`u64 lat`) and a count hist of its own
(the entry's thread table is replaced as threads come and go, so it cannot hold a count).
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

from bench_guest import bg, ensure_bench_guest, run_in_bench_guest  # noqa: E402

ensure_guest = bg.ensure_guest

MODES = ("none", "record", "text", "raw", "k_count_entry", "k_count_exit", "k_count_pid", "k_lat",
         "k_lat_count", "k_lat_pid", "bpftrace")
# k_agent: the agent with `aggregation: kernel` (in main since kernelagg.py; not in this branch): ask for it.
OPTIONAL_MODES = ("k_agent",)


def mmm(xs: list[float]) -> str:
    return f"{min(xs):.0f} / **{statistics.median(xs):.0f}** / {max(xs):.0f}"


def table(rows: list[dict], n: int, rounds: int, modes: list[str]) -> str:
    base = {r["round"]: r["ns"] for r in rows if r["mode"] == "none"}
    base_cpu = statistics.median(r["loop_cpu_ns"] for r in rows if r["mode"] == "none") if base else 0.0
    out = [
        "| mode | ns/call (min / median / max) | added ns/call (median) | loop CPU ns/call | tool CPU ns/call "
        "| total CPU ns/call | total CPU added | counted (worst round) / calls |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in modes:
        xs = [r for r in rows if r["mode"] == mode]
        if not xs:
            continue
        ns = [r["ns"] for r in xs]
        added = [r["ns"] - base[r["round"]] for r in xs if r["round"] in base]
        loop = [r["loop_cpu_ns"] for r in xs]
        tool = [r["tool_cpu_ns"] for r in xs]
        total = [r["loop_cpu_ns"] + r["tool_cpu_ns"] for r in xs]
        keys = sorted({k for r in xs for k in r["counted"]})
        worst = {k: (max if k in ("lost", "missed", "dropped") else min)(r["counted"].get(k, 0) for r in xs)
                 for k in keys}
        counted = ", ".join(f"{k} {v:,}" for k, v in worst.items()) or "-"
        out.append(
            f"| {mode} | {mmm(ns)} | {statistics.median(added) if added else 0:.0f} | {mmm(loop)} | {mmm(tool)} "
            f"| {mmm(total)} | {statistics.median(total) - base_cpu:.0f} | {counted} / {xs[0]['calls']:,} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="getppid calls per guest CPU per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--timeout", type=float, default=5400)
    ap.add_argument("--package", type=Path, default=None,
                    help="the kprobe_exporter package to run in the guest (default: this checkout's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = ap.parse_args()
    if a.rounds % 2 == 0:
        ap.error("--rounds must be odd (a median of an even count is no round's figure)")
    modes = a.modes.split(",")
    if unknown := sorted(set(modes) - set(MODES) - set(OPTIONAL_MODES)):
        ap.error(f"unknown modes {unknown}; known: {','.join(MODES)}")
    # bpftrace needs the bench guest (built once, own key); without it the tests' lab guest will do.
    image = ensure_bench_guest(a.kernel) if "bpftrace" in modes else ensure_guest(kernel=a.kernel)
    with tempfile.TemporaryDirectory() as tmp:
        loop = Path(tmp) / "kagg_loop"
        subprocess.run(["gcc", "-O1", "-static", "-o", str(loop), str(ROOT / "bench" / "kagg_loop.c")], check=True)
        files = {"kagg_loop": loop.read_bytes(),
                 "guest.py": (ROOT / "bench" / "lab_kernel_agg_guest.py").read_bytes()}
        script = f'python3 "$LAB_IN/guest.py" {a.n} {a.rounds} {",".join(modes)}'
        r = run_in_bench_guest(image, script, files, timeout=a.timeout, package=a.package)
    if "bench.json" not in r.files:
        print(r.stdout[-5000:], file=sys.stderr)
        return 1
    rows = json.loads(r.files["bench.json"])
    for bad in (x for x in rows if "failed" in x):
        print(f"round {bad['round']} {bad['mode']} failed: {bad['failed']}", file=sys.stderr)
    rows = [x for x in rows if "failed" not in x]
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    print(f"kernel {image.kernel_release}, {rows[0]['calls']:,} getppid calls per run ({a.n:,} on each guest CPU), "
          f"{a.rounds} rounds; boot {r.boot_seconds:.0f} s, all {r.seconds:.0f} s")
    print(table(rows, a.n, a.rounds, modes))
    if "bpftrace.txt" in r.files:  # its last run's map, as bpftrace printed it
        print("bpftrace's last map:\n" + r.files["bpftrace.txt"].decode(errors="replace")[-2000:])
    if r.returncode != 0:
        print(f"the guest script exited {r.returncode} (rows above are the runs that finished):", file=sys.stderr)
        print(r.stdout[-3000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
