"""Soak: the agent at a sustained high rate with thread churn; RSS flat, counters monotonic, the reader alive.

KPE_SOAK_SECONDS sets the length (default 600: the issue's ten minutes; CI runs the default).
The figures are printed (pytest -s) and, with KPE_SOAK_REPORT=FILE, written there as JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_proc import value
from hard_helpers import LoggedAgent, force_cleanup, nothing_left

pytestmark = [pytest.mark.root, pytest.mark.soak]

DURATION = float(os.environ.get("KPE_SOAK_SECONDS", "600"))
SCRAPE_EVERY = 5.0
MAX_RSS_DRIFT = 0.05


def _counters(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.type not in ("counter", "histogram"):
            continue
        for s in fam.samples:
            if s.name.endswith(("_total", "_count", "_sum", "_bucket")):
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_soak(tracefs: Path, progs: dict[str, Path], tmp_path: Path) -> None:
    inst = "kpe_t_soak"
    pie = progs["pie"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""instance: {inst}
pending: {{max_age: 5s}}
probes:
  - {{name: compute, uprobe: '{pie}:compute', args: {{a: '%di:s32'}}, labels: [comm], latency: true}}
  - {{name: open_path, uprobe: '{pie}:open_path', args: {{path: '+0(%di):string'}}, labels: [path], latency: true}}
  - {{name: openat, tracepoint: syscalls/sys_enter_openat, filter: 'comm == "fxgen"', latency: true}}
""")
    stop = threading.Event()
    runs = [0]

    def churn() -> None:  # processes of 8 threads each, started over and over: tids come and go
        while not stop.is_set():
            subprocess.run([pie, "threads", "3000", "8", "/etc/hostname"], check=True, timeout=120)
            runs[0] += 1

    agent = LoggedAgent(cfg, tmp_path / "agent.log").wait_ready()
    load = threading.Thread(target=churn, daemon=True)
    t_start = time.monotonic()
    # The allocator settles over the first two minutes (measured: 62 MB at 1 min, 64.5 MB at 2 min,
    # then within about 1% to the end of ten): drift is measured after the first fifth of the run.
    warmup = DURATION * 0.2
    rss: list[tuple[float, int]] = []
    scrapes: list[tuple[float, float, float]] = []  # (t, events, lines)
    stale: list[float] = []
    prev: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    went_down: list[str] = []
    try:
        load.start()
        while (t := time.monotonic() - t_start) < DURATION:
            time.sleep(SCRAPE_EVERY)
            t = time.monotonic() - t_start
            now = time.time()
            text = agent.scrape()
            assert agent.get("/healthz")[0] == 200, agent.log()
            beat = value(text, "kprobe_exporter_last_read_timestamp_seconds") or 0
            if now - beat > 3:
                stale.append(now - beat)
            cur = _counters(text)
            for key, v in prev.items():
                if key in cur and cur[key] < v:
                    went_down.append(f"{key[0]}{dict(key[1])}: {v} -> {cur[key]}")
                elif key not in cur and key[0].startswith("kprobe_events"):
                    went_down.append(f"{key[0]}{dict(key[1])} disappeared")
            prev = cur
            scrapes.append((t, value(text, "kprobe_events_total") or 0,
                            value(text, "kprobe_exporter_lines_read_total") or 0))
            rss.append((t, agent.rss_kb()))
        final = agent.scrape()
    finally:
        stop.set()
        load.join(150)
        rc = agent.stop()
        force_cleanup(inst)
    assert rc == 0, agent.log()
    assert nothing_left(inst)

    after = [kb for t, kb in rss if t >= warmup]
    assert len(after) >= 4, rss
    start_kb = statistics.median(after[:3])
    end_kb = statistics.median(after[-3:])
    drift = (end_kb - start_kb) / start_kb
    span = scrapes[-1][0] - scrapes[0][0]
    events_rate = (scrapes[-1][1] - scrapes[0][1]) / span
    lines_rate = (scrapes[-1][2] - scrapes[0][2]) / span
    lost = value(final, "kprobe_exporter_lost_events_total") or 0
    figures = {
        "duration_s": round(DURATION), "warmup_s": round(warmup), "rss_start_kb": start_kb, "rss_end_kb": end_kb,
        "rss_max_kb": max(kb for _, kb in rss), "rss_drift_pct": round(100 * drift, 2),
        "events_per_s": round(events_rate), "lines_per_s": round(lines_rate), "lost_events": lost,
        "processes_run": runs[0], "threads_started": runs[0] * 8,
        "paired_calls": value(final, "kprobe_latency_seconds_count"),
        "evicted": value(final, "kprobe_exporter_pairs_evicted_total"),
        "stale_heartbeats": len(stale), "scrapes": len(scrapes),
        "rss_kb_by_minute": [kb for t, kb in rss if int(t) % 60 < SCRAPE_EVERY],
    }
    print("soak:", json.dumps(figures))
    if os.environ.get("KPE_SOAK_REPORT"):
        Path(os.environ["KPE_SOAK_REPORT"]).write_text(json.dumps(figures, indent=2) + "\n")
    assert not went_down, went_down[:10]
    assert not stale, f"the reader loop's heartbeat was late {len(stale)} times: {stale[:5]}"
    assert drift <= MAX_RSS_DRIFT, figures
    assert events_rate > 10000, figures  # sustained, not a trickle
    assert runs[0] >= 5, figures
