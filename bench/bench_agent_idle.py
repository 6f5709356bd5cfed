"""The agent's own CPU when its probes see no event: what it costs a host whatever the call rate, as kernel
mode leaves it (its events stay in the kernel) and as a quiet stream-mode probe does.

    python3 bench/bench_agent_idle.py [--rounds 3] [--seconds 30] [--scrape-every 2]

Host only, as root: this host has no hist triggers, so the probe is a stream-mode uprobe with latency on a
function nothing calls (fxgen's `compute`, never run): the agent's loop, housekeeping and reader with no
event. Each round starts `kprobe-exporter run`, waits until /healthz answers, then measures the process's
user+sys time from /proc/PID/stat over `seconds` with no scrape, then over `seconds` with a /metrics scrape
every `scrape_every` s, and stops it. The baseline, in the same rounds, is `sleep` measured the same way (0
unless the host's accounting adds some). Odd rounds; min / median / max, in % of one core.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build, ensure_tracefs, machine, proc_cpu_s

PORT = 10998


def measure(pid: int, seconds: float, scrape_every: float | None) -> float:
    """% of one core that `pid` used over `seconds`, scraping the agent every `scrape_every` s if given."""
    start, t0 = proc_cpu_s(pid), time.monotonic()
    while (left := seconds - (time.monotonic() - t0)) > 0:
        if scrape_every is not None:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=30).read()
        time.sleep(min(left, scrape_every or left))
    return 100 * (proc_cpu_s(pid) - start) / (time.monotonic() - t0)


def healthy() -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=5).status == 200
    except OSError:
        return False


def one_round(cfg: Path, seconds: float, scrape_every: float) -> dict[str, float]:
    agent = subprocess.Popen([sys.executable, "-m", "kprobe_exporter", "run", "--config", str(cfg),
                              "--web.listen-address", f"127.0.0.1:{PORT}"], stderr=subprocess.DEVNULL)
    try:
        while not healthy():
            if agent.poll() is not None:
                raise SystemExit(f"the agent exited with {agent.returncode}")
            time.sleep(0.1)
        time.sleep(2)  # past start-up
        out = {"agent idle": measure(agent.pid, seconds, None),
               "agent, scraped": measure(agent.pid, seconds, scrape_every)}
    finally:
        agent.terminate()
        agent.wait()
    sleeper = subprocess.Popen(["sleep", str(2 * seconds + 5)])
    try:
        out["baseline: sleep"] = measure(sleeper.pid, seconds, None)
    finally:
        sleeper.kill()
        sleeper.wait()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--scrape-every", type=float, default=2)
    a = ap.parse_args()
    if a.rounds % 2 == 0:
        ap.error("--rounds must be odd (a true median)")
    ensure_tracefs()
    fxgen = build("fxgen")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "idle.yaml"
        cfg.write_text(f"instance: kpe_idle_bench\nprobes:\n  - name: idle\n    uprobe: {fxgen}:compute\n"
                       "    latency: true\n")
        rows = [one_round(cfg, a.seconds, a.scrape_every) for _ in range(a.rounds)]
    print(f"{machine()}; {a.rounds} rounds of {a.seconds:g} s each; scrape every {a.scrape_every:g} s")
    print("| process | % of one core (min / median / max) |\n| --- | --- |")
    for name in rows[0]:
        xs = sorted(r[name] for r in rows)
        print(f"| {name} | {xs[0]:.2f} / **{statistics.median(xs):.2f}** / {xs[-1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
