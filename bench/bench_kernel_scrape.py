"""Host-only: the whole /metrics scrape of a kernel-mode probe with 10,000 label sets (issue 12's budget,
/metrics p99 <= 50 ms), against a ceiling that only reads and splits the same hist text.

    python3 bench/bench_kernel_scrape.py [--keys 10000] [--threads 256] [--rounds 5] [--scrapes 41]
                                         [--label-limit 100] [--churn] [--profile]

The probe is `open` (kprobe do_sys_openat2, labels [comm, n], latency), group `kpe_k`, as the agent installs
it (`kernelagg.probe_triggers`). Its hist files are written, in the 6.1 kernel's format, to a plain directory
standing in for the instance (this host has no hist triggers), templated on the real captures in
tests/fixtures/linux-6.1-debian/hist/agent: the entry event's file holds the thread table (keyed by
common_pid, saving the timestamp) and the count table (keyed by `__comm,n`, KEYS rows), the return event's the
thread table, the synthetic event's the `lat.log2` table. The rendering is checked first against those captures,
byte for byte.

A scrape: `KernelSource.read()` (read the three files, `hist.parse`, `raw_values`, `LabelFold.fold`) and
`generate_latest` on `metrics.make_registry` fed that view. The ceiling, in the same rounds: read the same
files and split every line with `str.split` (split), or match it with one precompiled regex (regex).
With --churn the files exist in two versions, every hitcount one apart, read in turn: no row reads as it
did the scrape before (the agent carries rows whose text is unchanged from one read to the next; without
--churn every row is unchanged, the idle table). `render` is `generate_latest` of the families one scrape
collected, collected once: prometheus_client's own formatting, which no collector avoids.
Rounds (odd) alternate the order; each runs SCRAPES of each contender; reported: wall and thread-CPU per
scrape, min/median/max of the rounds' medians, p99 over every scrape, and the ratios of the medians.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.core import Metric  # noqa: E402
from prometheus_client.registry import Collector, CollectorRegistry  # noqa: E402

from kprobe_exporter import aggmode, config, hist, kernelagg, probes  # noqa: E402
from kprobe_exporter.aggregate import Snapshot  # noqa: E402
from kprobe_exporter.kernelagg import KernelSource, KernelView  # noqa: E402
from kprobe_exporter.metrics import Sources, make_registry  # noqa: E402
from kprobe_exporter.tracefs import read_text  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "linux-6.1-debian" / "hist" / "agent"
GROUP = "kpe_k"
CONFIG = (f"instance: {GROUP}\nprobes:\n  - name: open\n    kprobe: do_sys_openat2\n"
          "    args: {n: '%si:u32'}\n    labels: [comm, n]\n    latency: true\n")


# --- the 6.1 kernel's hist format (kernel/trace/trace_events_hist.c: hist_trigger_print_key, _val) --------
def key_text(name: str, value: str | int) -> str:
    field = name.split(".", 1)[0]
    if name.endswith(".log2"):
        return f"{field}: ~ 2^{value:<2}"
    if isinstance(value, str):
        return f"{field}: {value:<50}"
    return f"{field}: {value:>10}"


def row_text(names: tuple[str, ...], keys: tuple[str | int, ...], hitcount: int, vals: dict[str, int]) -> str:
    inner = ", ".join(key_text(n, k) for n, k in zip(names, keys, strict=True))
    return f"{{ {inner} }} hitcount: {hitcount:>10}" + "".join(f"  {v}: {n:>10}" for v, n in vals.items()) + "\n"


def table_text(listed: str, rows: list[str], hits: int, dropped: int = 0) -> str:
    return (f"# event histogram\n#\n# trigger info: {listed} [active]\n#\n\n" + "".join(rows)
            + f"\nTotals:\n    Hits: {hits}\n    Entries: {len(rows)}\n    Dropped: {dropped}\n")


def check_against_captures() -> None:
    """Every captured table rendered back from its parse must be the capture, byte for byte."""
    for f in sorted(FIXTURES.iterdir()):
        text = f.read_text()
        out = []
        for t in hist.parse(text):
            keys = [tuple(int(k) if k.isdigit() else (k.split("^")[1] if n.endswith(".log2") else k)
                          for n, k in zip(t.key_names, r.keys, strict=True)) for r in t.rows]
            rows = [row_text(t.key_names, k, r.values["hitcount"],
                             {v: n for v, n in r.values.items() if v != "hitcount"})
                    for k, r in zip(keys, t.rows, strict=True)]
            out.append(table_text(t.trigger, rows, t.hits, t.dropped))
        if "\n\n".join(out) != text.rstrip("\n") + "\n" and "\n\n".join(out) + "\n" != text:
            raise SystemExit(f"the rendering differs from the capture {f.name}")


# --- the probe's files ------------------------------------------------------------------------------------
def listed_from_capture(name: str) -> str:
    """The thread tables' trigger info as 6.1 listed the agent's own lines (probe `open`, group kpe_k)."""
    first = (FIXTURES / name).read_text().split("# trigger info: ", 1)[1]
    return first.split(" [active]", 1)[0]


def counts(keys: int, bump: int = 0) -> list[tuple[int, str, int]]:
    """(hitcount, comm, n) of each key: 100 comms x keys/100 values of n, hitcounts spread, ascending."""
    return sorted((1 + bump + (i * 7919) % 100_000, f"worker-{i % 100:03d}", i // 100 * 3) for i in range(keys))


def files(pt: kernelagg.ProbeTriggers, keys: int, threads: int, bump: int = 0) -> dict[str, str]:
    """The three hist files; `bump` adds to every hitcount (another read of the same tables, every row changed)."""
    entry, exit_, synth = pt.plan.triggers[0], pt.plan.triggers[1], pt.latency
    assert synth is not None and pt.count.event == entry.event
    pids = [1000 + 7 * i for i in range(threads)]
    per_thread = [row_text(("common_pid",), (p,), 1 + bump + (i * 37) % 5000, {}) for i, p in enumerate(pids)]
    thread_hits = sum(1 + bump + (i * 37) % 5000 for i in range(threads))
    names = hist.key_names(pt.count.line)
    count_rows = [row_text(names, (c, n), h, {}) for h, c, n in counts(keys, bump)]  # sort=hitcount: ascending
    lat = [(e, 1 + bump + (e * 7717) % 20_000) for e in range(10, 31)]
    lat_rows = [row_text(("lat.log2",), (e,), n, {"lat": n * (3 << (e - 2))})
                for e, n in sorted(lat, key=lambda x: x[1] * (3 << (x[0] - 2)))]  # sort=lat
    return {
        entry.event: table_text(listed_from_capture("open.hist"), per_thread, thread_hits) + "\n\n"
        + table_text(pt.count.line, count_rows, sum(h for h, _, _ in counts(keys, bump))),
        exit_.event: table_text(listed_from_capture("open_ret.hist"), per_thread, thread_hits),
        synth.event: table_text(synth.line, lat_rows, sum(n for _, n in lat)),
    }


def stand_in(tmp: Path, texts: dict[str, str]) -> tuple[Path, Path]:
    root, inst = tmp, tmp / "instances" / GROUP
    root.mkdir(parents=True, exist_ok=True)
    (root / "synthetic_events").touch()
    for ev, text in texts.items():
        (inst / "events" / ev).mkdir(parents=True, exist_ok=True)
        (inst / "events" / ev / "trigger").touch()
        (inst / "events" / ev / "hist").write_text(text)
    return root, inst


# --- the ceilings -----------------------------------------------------------------------------------------
ROW = re.compile(r"\{ (.*) \} hitcount:\s+(\d+)")


def ceiling_split(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        for line in read_text(p).splitlines():
            n += len(line.split())
    return n


def ceiling_regex(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        for line in read_text(p).splitlines():
            if (m := ROW.match(line)) is not None:
                n += int(m.group(2))
    return n


class Collected(Collector):
    """The families of one scrape, collected once: `render` times prometheus_client's formatting alone."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


# --- timing -----------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> tuple[int, int]:
    w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    fn()
    return time.perf_counter_ns() - w0, time.thread_time_ns() - c0


def p99(xs: list[int]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * 0.99))] / 1e6


def ms(x: float) -> str:
    return f"{x / 1e6:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=256, help="rows of each thread table (entry, return)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scrapes", type=int, default=41, help="scrapes of each contender per round")
    ap.add_argument("--label-limit", type=int, default=100, help="100 (the default) folds nothing here")
    ap.add_argument("--profile", action="store_true", help="cProfile 20 scrapes and print the top entries")
    ap.add_argument("--churn", action="store_true",
                    help="every count changes from one scrape to the next (two versions of the files, alternated)")
    a = ap.parse_args()
    if a.rounds % 2 == 0:
        ap.error("--rounds must be odd (a true median)")
    check_against_captures()
    cfg = config.load_text(f"label_limit: {a.label_limit}\n{CONFIG}")
    m = aggmode.resolve(cfg, probes.build_probe_set(cfg, resolve=None), aggmode.KernelSupport(True, True))["open"]
    pt = kernelagg.probe_triggers(GROUP, m)
    texts = files(pt, a.keys, a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root, inst = stand_in(Path(tmp), texts)
        # the first read takes insts[-1], the files checked below
        insts = [stand_in(Path(tmp) / "churn", files(pt, a.keys, a.threads, bump=1))[1], inst] if a.churn else [inst]
        src = KernelSource(root, inst, GROUP, a.label_limit)
        src.install([m])
        paths = [inst / "events" / ev / "hist" for ev in texts]
        empty = Snapshot({}, {}, 0, {}, {}, {}, [1e-6])
        view: list[KernelView] = []
        registry = make_registry(Sources(snapshot=lambda: empty, probes=probes.ProbeSet(GROUP, (), ()),
                                         kernel=lambda: view[-1], modes=lambda: {"open": m}))

        def read() -> KernelView:
            src.inst = insts.pop()  # with --churn, the other version of the files each time
            insts.insert(0, src.inst)
            return src.read()

        def scrape() -> bytes:
            view.append(read())
            del view[:-1]
            return generate_latest(registry)

        body = scrape().decode()
        series = body.count('kprobe_events_total{')
        total = sum(float(x.rsplit(" ", 1)[1]) for x in body.splitlines() if x.startswith("kprobe_events_total{"))
        if total != sum(h for h, _, _ in counts(a.keys)):
            raise SystemExit(f"exported {total} events, the count table holds {sum(h for h, _, _ in counts(a.keys))}")
        print(f"{a.keys:,} keys ({len(texts)} hist files, {sum(map(len, texts.values())):,} bytes), "
              f"{a.threads} threads a thread table, label_limit {a.label_limit}: {series:,} series, "
              f"{total:,} events exported, {len(body):,} bytes of exposition")
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                scrape()
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
            return 0
        collected = list(registry.collect())
        fixed = CollectorRegistry(auto_describe=False)
        fixed.register(Collected(collected))
        contenders: dict[str, Callable[[], object]] = {
            "view": read, "scrape": scrape, "render": lambda: generate_latest(fixed),
            "split": lambda: ceiling_split(paths), "regex": lambda: ceiling_regex(paths)}
        wall: dict[str, list[list[int]]] = {k: [] for k in contenders}
        cpu: dict[str, list[list[int]]] = {k: [] for k in contenders}
        for r in range(a.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                got = [timed(contenders[name]) for _ in range(a.scrapes)]
                wall[name].append([w for w, _ in got])
                cpu[name].append([c for _, c in got])
        print(f"{a.rounds} rounds x {a.scrapes} scrapes, order alternated; ms per scrape")
        print("| contender | wall min / median / max (round medians) | wall p99 (all) | CPU median | CPU p99 |")
        print("| --- | --- | --- | --- | --- |")
        med = {}
        for name in contenders:
            rm = sorted(statistics.median(x) for x in wall[name])
            cm = statistics.median(statistics.median(x) for x in cpu[name])
            med[name] = (statistics.median(rm), cm)
            allw = [v for x in wall[name] for v in x]
            allc = [v for x in cpu[name] for v in x]
            print(f"| {name} | {ms(rm[0])} / {ms(statistics.median(rm))} / {ms(rm[-1])} | {p99(allw):.2f} | "
                  f"{ms(cm)} | {p99(allc):.2f} |")
        for name in ("view", "scrape", "render"):
            print(f"{name} / regex ceiling (medians): wall {med[name][0] / med['regex'][0]:.1f}x, "
                  f"CPU {med[name][1] / med['regex'][1]:.1f}x; / split: wall {med[name][0] / med['split'][0]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
