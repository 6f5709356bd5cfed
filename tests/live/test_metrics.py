"""Metrics: the exposition is valid (promtool), complete, and a real Prometheus reads exact counts."""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from agent_proc import running_agent, samples, value
from feeding import feed_text
from kprobe_exporter import config, probes
from kprobe_exporter.aggregate import Aggregate
from kprobe_exporter.metrics import Sources, SpanCounts, make_registry

HERE = Path(__file__).resolve().parents[1]


def replayed_registry(exemplar: tuple[str, float, float] | None = None):  # type: ignore[no-untyped-def]
    cfg = config.load(HERE / "configs" / "fixture-6.18.yaml")
    ps = probes.build_probe_set(cfg, resolve=None)
    agg = Aggregate(ps, cfg.buckets, cfg.label_limit)
    feed_text(agg, (HERE / "fixtures" / "linux-6.18" / "uprobes-tracepoints.trace").read_bytes())
    return make_registry(
        Sources(
            snapshot=agg.snapshot,
            probes=ps,
            installed=lambda: {"compute"},
            spans=lambda: SpanCounts(7, {"queue_full": 2}),
            exemplar=lambda pair: exemplar if pair == "compute" else None,
        )
    )


def promtool_check(text: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)


def test_exposition_passes_promtool() -> None:
    text = generate_latest(replayed_registry())
    r = promtool_check(text)
    assert r.returncode == 0, r.stdout + r.stderr
    s = samples(text.decode())
    assert value(s, "kprobe_latency_seconds_count", probe="compute") == 25
    assert value(s, "kprobe_latency_seconds_bucket", probe="compute", le="+Inf") == 25
    assert value(s, "kprobe_exporter_probe_installed", probe="compute") == 1
    assert value(s, "kprobe_exporter_probe_installed", probe="recurse") == 0
    assert value(s, "kprobe_exporter_spans_exported_total") == 7
    assert value(s, "kprobe_exporter_spans_dropped_total", reason="queue_full") == 2
    assert value(s, "kprobe_exporter_build_info") == 1
    # cumulative buckets never decrease
    buckets = sorted(
        (float(dict(lbls)["le"]), v)
        for (n, lbls), v in s.items()
        if n == "kprobe_latency_seconds_bucket" and dict(lbls)["probe"] == "compute"
    )
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))


def test_exemplar_in_openmetrics_only() -> None:
    reg = replayed_registry(("0af7651916cd43dd8448eb211c80319c", 12e-6, 1700000000.0))
    om = generate_openmetrics(reg).decode()
    line = next(ln for ln in om.splitlines() if "trace_id" in ln)
    assert line.startswith('kprobe_latency_seconds_bucket{le="1.6e-05",probe="compute"}')
    assert '# {trace_id="0af7651916cd43dd8448eb211c80319c"} 1.2e-05' in line
    assert "trace_id" not in generate_latest(reg).decode()


@pytest.mark.root
def test_live_exposition_passes_promtool(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    cfg = write_config(f"""
instance: kpe_t_metrics
probes:
  - {{name: compute, uprobe: '{progs["pie"]}:compute', args: {{a: '%di:s32'}}, labels: [comm], latency: true}}
  - {{name: openat, tracepoint: syscalls/sys_enter_openat, latency: true}}
""")
    with running_agent(cfg) as agent:
        subprocess.run([progs["pie"], "compute", "10"], check=True)
        agent.wait_value("kprobe_events_total", 10, probe="compute")
        r = promtool_check(agent.scrape().encode())
        assert r.returncode == 0, r.stdout + r.stderr
        om = agent.scrape(accept="application/openmetrics-text; version=1.0.0")
        assert om.rstrip().endswith("# EOF")


@pytest.mark.root
@pytest.mark.prometheus
def test_real_prometheus_reads_exact_count(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    from prom_server import prometheus_server, query, wait_for_scrapes

    cfg = write_config(f"""
instance: kpe_t_prom
probes:
  - {{name: compute, uprobe: '{progs["pie"]}:compute', latency: true}}
""")
    with running_agent(cfg) as agent:
        target = f"127.0.0.1:{agent.port}"
        with prometheus_server([target], scrape_interval="1s") as prom:
            wait_for_scrapes(prom, target, 1)
            subprocess.run([progs["pie"], "compute", "77"], check=True)
            assert agent.wait_value("kprobe_latency_seconds_count", 77, probe="compute") == 77
            deadline = time.monotonic() + 30
            got = None
            while time.monotonic() < deadline:
                res = query(prom, 'kprobe_events_total{probe="compute"}')
                got = float(res[0]["value"][1]) if res else None
                if got == 77:
                    break
                time.sleep(0.5)
            assert got == 77
            res = query(prom, 'kprobe_latency_seconds_count{probe="compute"}')
            assert float(res[0]["value"][1]) == 77


@pytest.mark.root
def test_auto_aggregation_streams_here_and_says_why(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    """This kernel has no hist triggers: `auto` streams every probe, counts exactly, and the self-metric
    and the landing page say so, with the reason (the kernel mode itself: tests/lab/test_kernel_mode.py)."""
    import urllib.request

    cfg = write_config(f"""
instance: kpe_t_metrics_agg
probes:
  - {{name: compute, uprobe: '{progs["pie"]}:compute', latency: true}}
  - {{name: forced, uprobe: '{progs["pie"]}:compute', aggregation: stream}}
""")
    hist = any((tracefs / "events").glob("*/*/hist"))
    with running_agent(cfg) as agent:
        subprocess.run([progs["pie"], "compute", "10"], check=True)
        agent.wait_value("kprobe_latency_seconds_count", 10, probe="compute")
        m = samples(agent.scrape())
        assert value(m, "kprobe_events_total", probe="forced") == 10
        assert value(m, "kprobe_exporter_probe_aggregation", probe="compute",
                     mode="kernel" if hist else "stream") == 1
        assert value(m, "kprobe_exporter_probe_aggregation", probe="forced", mode="stream") == 1
        with urllib.request.urlopen(agent.url + "/") as r:
            page = r.read().decode()
        if not hist:
            assert "<td>compute</td><td>stream</td><td>this kernel has no hist triggers (CONFIG_HIST_TRIGGERS)</td>" \
                in page, page
        assert "<td>forced</td><td>stream</td><td>configured</td>" in page, page
