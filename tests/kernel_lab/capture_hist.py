"""Capture real hist-trigger and synthetic-event output from the lab's 6.1 guest (one boot).

    python3 tests/kernel_lab/capture_hist.py OUTDIR

tests/fixtures/linux-6.1-debian/hist/ holds what it gave: an entry timestamp hist, the onmatch() return
hist, a synthetic latency event with `.log2` and `.buckets=1000` hists, count hists keyed by a `$comm`
string and by `common_pid.execname,ret`, the error_log text of a mismatched synthetic field type, and the
`!` lines that removed every trigger (after which kprobe_events and synthetic_events were empty).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_lab.guest import run_in_guest

SCRIPT = (Path(__file__).parent / "capture_hist.sh").read_text()



def main(out: Path) -> None:
    r = run_in_guest(SCRIPT, timeout=240)
    out.mkdir(parents=True, exist_ok=True)
    for k, v in r.files.items():
        (out / k).write_bytes(v)
    (out / "console.txt").write_text(r.stdout)
    print("rc", r.returncode, "boot", r.boot_seconds, "total", r.seconds)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
