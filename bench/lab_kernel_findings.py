"""Kernel findings for in-kernel aggregation (issue 12), one boot of the kernel lab per kernel.

    python3 bench/lab_kernel_findings.py [--kernel 6.1|6.12] [--only scrape,recursion,instances]

  scrape      a hist of 10,000 keys (syscalls/sys_enter_getpgid keyed by pid, 10,000 distinct pids asked):
              read and kprobe_exporter.hist.parse, 201 times: p50/p99, and the ratio to reading a plain
              10,000-line file of the same size (so the figure transfers from emulation to real hardware);
              the hist text comes back as out/hist-10k.txt for the host-only parse bench (bench_hist_parse.py)
  recursion   a uprobe pair on kagg_rec.c's rec(), which recurses D deep (D = 1, then 4), with
              kprobe_exporter.triggers' count and latency triggers, against the truth: every event recorded
              in the same instance and paired with a stack per thread
  instances   the synthetic event + onmatch inside two non-top-level instances (ARM-software/devlib #717,
              kernel bugzilla 219876): do the hists fill, does an instance's hist on the synthetic event see
              another instance's onmatch, where the synthetic event records, what removal in the wrong order
              and rmdir of an instance with triggers do, and a second install after removal (a reload)
  pidtable    (--only pidtable) latency_plan's entry trigger, keyed by common_pid, with size=128, and 300 short
              processes of 10 calls: what a full entry table does to counts and latency samples
Uses the tests' lab guests (no bpftrace needed). Prints the findings as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kernel_lab.guest import run_in_guest  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--only", default="scrape,recursion,instances")
    ap.add_argument("--out", type=Path, default=None, help="write findings.json and hist-10k.txt here")
    a = ap.parse_args()
    files = {"guest.py": (ROOT / "bench" / "lab_kernel_findings_guest.py").read_bytes()}
    with tempfile.TemporaryDirectory() as tmp:
        for prog in ("kagg_loop", "kagg_rec"):
            exe = Path(tmp) / prog
            subprocess.run(["gcc", "-O1", "-static", "-o", str(exe), str(ROOT / "bench" / f"{prog}.c")], check=True)
            files[prog] = exe.read_bytes()
        r = run_in_guest(f'python3 "$LAB_IN/guest.py" {a.only}', files, timeout=1800, kernel=a.kernel)
    if "findings.json" not in r.files:
        print(r.stdout[-5000:], file=sys.stderr)
        return 1
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        for name, data in r.files.items():
            (a.out / name).write_bytes(data)
    print(json.dumps(json.loads(r.files["findings.json"]), indent=1))
    return 0 if r.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
