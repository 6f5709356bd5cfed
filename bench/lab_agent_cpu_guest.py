"""The guest side of bench/lab_agent_cpu.py: the agent's own CPU in kernel mode, with no call and at full rate.

Run inside the lab guest as `python3 lab_agent_cpu_guest.py N WINDOW_S SCRAPE_EVERY_S ROUNDS`; writes
$LAB_OUT/agent_cpu.json, one row per round. Reuses lab_kernel_agg_guest.py (shipped beside it as agg_guest.py)
for the agent, the workload and /proc accounting.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # in the guest only (the host imports python_loop_s alone)
    from agg_guest import Agent

PORT = 10210


def python_loop_s(rounds: int = 5) -> float:
    """Median time of a fixed CPython loop: run on the host and in the guest, its ratio is what emulation
    makes of the agent's kind of work (the same interpreter's byte code)."""
    took = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        x = 0
        for i in range(200_000):
            x += i * i
        took.append(time.perf_counter() - t0)
    return statistics.median(took)


def window(agent: Agent, seconds: float, scrape_every: float, n: int | None) -> dict[str, float]:
    """The agent's CPU over `seconds` of wall time with a /metrics scrape every `scrape_every` s; with `n`,
    the workload runs N getppid calls per guest CPU again and again meanwhile (full rate on every CPU)."""
    from agg_guest import cpu_ns, run_loop

    calls = [0]
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            calls[0] += run_loop(n or 0)[0]

    cpu0, t0 = cpu_ns(agent.proc.pid), time.monotonic()
    worker = threading.Thread(target=work) if n else None
    if worker:
        worker.start()
    scrapes = 0
    while (left := seconds - (time.monotonic() - t0)) > 0:
        time.sleep(min(left, scrape_every))
        if time.monotonic() - t0 < seconds + 0.5:
            agent.scrape()
            scrapes += 1
    stop.set()
    if worker:
        worker.join()  # the chunk under way ends the window: its calls are in it
    wall, cpu = time.monotonic() - t0, cpu_ns(agent.proc.pid) - cpu0
    return {"wall_s": wall, "agent_cpu_s": cpu / 1e9, "agent_pct": 100 * cpu / 1e9 / wall, "calls": calls[0],
            "scrapes": scrapes}


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from agg_guest import LOOP, Agent, metric, run_loop

    n, seconds, every, rounds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    os.chmod(LOOP, 0o755)
    run_loop(n)  # warm-up: the first run pays for paging the loop in
    rows = []
    for r in range(rounds):
        agent = Agent("text", PORT, "kernel")
        agent.on()
        try:
            time.sleep(5)  # past start-up
            before = agent.counted()
            # alternate which window comes first: a trend over the round (a busier host) favours neither
            order = ("idle", "busy") if r % 2 == 0 else ("busy", "idle")
            got = {w: window(agent, seconds, every, n if w == "busy" else None) for w in order}
            after = agent.counted()
            text = agent.scrape()
        finally:
            agent.off()
        row = {"round": r, "loop_s": python_loop_s(), **{f"{w}_{k}": v for w, d in got.items() for k, v in d.items()},
               "counted": after["entries"] - before["entries"], "timed": after["latency"] - before["latency"],
               "lost": after["lost"] - before["lost"], "missed": after["missed"] - before["missed"],
               "mode": metric(text, "kprobe_exporter_probe_aggregation", probe="ppid", mode="kernel")}
        rows.append(row)
        print(f"round {r}: {row}", flush=True)
        Path(os.environ["LAB_OUT"], "agent_cpu.json").write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
