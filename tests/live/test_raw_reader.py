"""The raw reader on the real kernel: the same workload through both readers, and the agent with `reader: raw`.

Two instances of our own get the same events (each event is written into every instance that has
it enabled): one is read as trace_pipe text, the other as per-CPU ring-buffer pages, each into its
own aggregate with a span sink on every pair. They must agree exactly on counts, labels (but for the
kernel's lossy comm cache, see the test), threads, process ids (each the workload's own, exactly), args,
return values and pairs, and on timestamps to the microsecond the text shows.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent_proc import running_agent, value
from feeding import feed_events, feed_text
from kprobe_exporter import config, probes
from kprobe_exporter.aggregate import Aggregate, CompletedPair
from kprobe_exporter.raw import args as raw_args
from kprobe_exporter.raw import formats as raw_formats
from kprobe_exporter.raw import reader as raw_reader
from kprobe_exporter.reader import TextReader
from kprobe_exporter.tasks import UNKNOWN_COMM, Tasks
from kprobe_exporter.tracefs import Tracefs

pytestmark = pytest.mark.root


class Sampling:
    sample_ratio = 1.0
    min_duration_ns = 0


@pytest.fixture
def exe(progs: dict[str, Path], tmp_path: Path) -> Path:
    """fxgen under a name of its own: its comm selects this test's syscalls (others run fxgen too)."""
    out = tmp_path / COMM
    shutil.copy(progs["pie"], out)
    return out


COMM = "kpe_rawcmp"


def workload_config(instance: str, exe: Path) -> str:
    # the workload's syscalls only (comm filter): other processes' come and go with each instance's lifetime
    return f"""
instance: {instance}
probes:
  - name: open_path
    uprobe: {exe}:open_path
    args: {{path: "+0(%di):string", flags: "%si:x32"}}
    labels: [path]
    latency: true
  - name: compute
    uprobe: {exe}:compute
    args: {{a: "%di:s32", b: "%si:u32"}}
    latency: true
  - name: openat
    tracepoint: syscalls/sys_enter_openat
    filter: 'comm == "{COMM}"'
    labels: [comm]
  - name: sys_exit_openat
    tracepoint: syscalls/sys_exit_openat
    filter: 'comm == "{COMM}"'
pairs:
  - {{name: openat, entry: openat, exit: sys_exit_openat}}
"""


class Pipeline:
    """What the agent runs, in this process: an instance, a reader, an aggregate with span sinks."""

    def __init__(self, root: Path, instance: str, exe: Path, raw: bool) -> None:
        cfg = config.load_text(workload_config(instance, exe))
        self.probes = probes.build_probe_set(cfg)
        self.tfs = Tracefs(root, instance)
        # no own pids excluded: with event-fork on, the workload (our child) would be excluded too
        self.tfs.install(self.probes, 4096, record_tgid=True, own_tids=[])
        self.agg = Aggregate(self.probes, cfg.buckets)
        self.spans: list[CompletedPair] = []
        for p in self.probes.pairs:
            self.agg.set_sink(p.name, Sampling(), self.spans.append)
        self.reader: TextReader | raw_reader.RawReader
        if raw:
            self.reader = raw_reader.RawReader.open(self.tfs.inst, root, self.probes, self.tfs.event_dir, spans=True)
        else:  # as the agent has it: a `<...>` is named while it can be, tgids settled as read
            self.reader = TextReader(str(self.tfs.inst / "trace_pipe"), self.probes, Tasks(root))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            feed_events(self.agg, self.reader.read(0.05))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        feed_events(self.agg, self.reader.flush())
        self.reader.close()
        for cpu, total in self.tfs.cpu_stats().items():
            self.agg.set_stats_lost(cpu, total)
        self.tfs.remove()
        self.tfs.close()


def comm_blurred(events: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[object, float]:
    """Counts with `<...>` taken as the workload's comm (see the test)."""
    out: dict[object, float] = {}
    for (name, labels), v in events.items():
        key = (name, tuple((k, COMM if k == "comm" and x == UNKNOWN_COMM else x) for k, x in labels))
        out[key] = out.get(key, 0) + v
    return out


def usec(ns: int) -> int:
    return (ns + 500) // 1000


def test_both_readers_agree_on_the_same_events(tracefs: Path, exe: Path) -> None:
    text = Pipeline(tracefs, "kpe_t_rawcmp_text", exe, raw=False)
    try:
        raw = Pipeline(tracefs, "kpe_t_rawcmp_raw", exe, raw=True)
    except BaseException:
        text.close()
        raise
    try:
        pids = [run(exe, "open", "300", "/etc/hostname"), run(exe, "compute", "400"),
                run(exe, "threads", "200", "4"), run(exe, "open", "20", "/nonexistent/file")]
        time.sleep(1.0)
    finally:
        raw.close()
        text.close()
    t, r = text.agg.snapshot(), raw.agg.snapshot()
    # each batch dates the comm/tgid tables: one read before its events may name a reused tid's past
    assert isinstance(raw.reader, raw_reader.RawReader) and raw.reader.tasks._batch_at > 0
    assert t.lost == r.lost == {} or (not any(t.lost.values()) and not any(r.lost.values()))
    # The kernel names threads from a 128-entry cache: a short-lived thread evicted before its line was
    # formatted and gone from /proc by the time either reader asked is `<...>` there, and the two readers
    # ask at different moments. That is the only way their labels may differ, and rarely.
    assert comm_blurred(r.events) == comm_blurred(t.events)
    for ev in (r.events, t.events):
        assert ev.get(("openat", (("comm", UNKNOWN_COMM),)), 0) <= ev[("openat", (("comm", COMM),))] // 100, ev
    assert r.events[("open_path", (("path", "/etc/hostname"),))] == 300 + 200 * 4
    assert r.events[("open_path", (("path", "/nonexistent/file"),))] == 20
    assert r.events[("compute", ())] == 400 + 200 * 4
    for name in ("open_path", "compute", "openat"):
        tp, rp = t.pairs[name], r.pairs[name]
        assert (rp.count, rp.unmatched, rp.pending) == (tp.count, tp.unmatched, tp.pending), name
    assert r.pairs["open_path"].count == 300 + 800 + 20
    assert r.pairs["openat"].count >= 300 + 800 + 20

    def key(s: CompletedPair) -> tuple[str, int, int]:
        return (s.pair, s.tid, s.start_ns)  # each thread's calls in order (they cannot overlap)

    # Python's sort is stable and each list is in the order of the exits, so calls of a thread that
    # start within one microsecond of text keep the thread's own order: the k-th call of a pair on a
    # thread is the k-th on that thread in both, with the same args and return value.
    ts_, rs_ = sorted(text.spans, key=key), sorted(raw.spans, key=key)
    assert len(rs_) == len(ts_) == sum(p.count for p in r.pairs.values())
    for a, b in zip(rs_, ts_, strict=True):
        assert (a.pair, a.tid, a.args, a.retval) == (b.pair, b.tid, b.args, b.retval)
    # the calls of each thread, across pairs, in the order they returned: the same sequence in both
    assert by_thread(raw.spans) == by_thread(text.spans)
    # Every span's process id is its process's, in both: a thread that had exited before its events were
    # read (most of the `threads` run's) has it from saved_tgids read after /proc had lost it (Tasks.tgids).
    def process(tid: int) -> int:
        return tid if tid in pids else pids[2]  # a main thread's tid is its pid; the rest are `threads`'

    assert [a.tgid for a in rs_] == [process(a.tid) for a in rs_]
    assert [b.tgid for b in ts_] == [process(b.tid) for b in ts_]
    assert {a.comm for a in rs_} | {b.comm for b in ts_} <= {COMM, UNKNOWN_COMM}
    assert sum(a.comm != COMM or b.comm != COMM for a, b in zip(rs_, ts_, strict=True)) <= len(rs_) // 100
    # Timestamps: each instance's buffer stamps an event itself, a few hundred ns apart (more when an
    # interrupt or a busy CPU comes between the two writes), so no bound on their difference holds
    # under load; the exact check of the stamps, on one buffer read both ways, is the next test. What
    # holds here is the order they put each thread's calls in (above), and that both are real stamps.
    for spans in (rs_, ts_):
        assert all(s.end_ns >= s.start_ns > 0 for s in spans)
    d = np.array([s.end_ns - s.start_ns for s in rs_])
    assert np.count_nonzero(d % 1000) > len(d) // 2  # nanoseconds, where text has microseconds
    assert not np.any(np.array([s.end_ns - s.start_ns for s in ts_]) % 1000)


def run(exe: Path, *args: str) -> int:
    """The pid of a finished run of the workload."""
    p = subprocess.Popen([str(exe), *args])
    assert p.wait() == 0
    return p.pid


def by_thread(spans: list[CompletedPair]) -> dict[int, list[tuple[str, tuple[tuple[str, str], ...], str | None]]]:
    """Each thread's calls (pair, args, return value) in the order they returned."""
    out: dict[int, list[tuple[str, tuple[tuple[str, str], ...], str | None]]] = {}
    for s in spans:
        out.setdefault(s.tid, []).append((s.pair, s.args, s.retval))
    return out


def test_one_buffer_as_text_and_as_pages_agrees_to_the_microsecond(tracefs: Path, exe: Path) -> None:
    """The instance's `trace` text (which does not consume) and then its pages: the very same stamps."""
    cfg = config.load_text(workload_config("kpe_t_rawexact", exe))
    ps = probes.build_probe_set(cfg)
    tfs = Tracefs(tracefs, "kpe_t_rawexact")
    tfs.install(ps, 8192, record_tgid=True, own_tids=[])
    try:
        subprocess.run([str(exe), "threads", "100", "4"], check=True)
        subprocess.run([str(exe), "compute", "300"], check=True)
        (tfs.inst / "tracing_on").write_text("0")
        text = (tfs.inst / "trace").read_bytes()
        events = raw_args.RawEvents.load([tfs.event_dir(ev) for ev in ps.events], ps)
        reader = raw_reader.RawReader(tfs.inst, events, tracefs_root=tracefs)
        spans: dict[str, list[CompletedPair]] = {"text": [], "raw": []}
        aggs = {k: Aggregate(ps, cfg.buckets) for k in spans}
        for k, agg in aggs.items():
            for p in ps.pairs:
                agg.set_sink(p.name, Sampling(), spans[k].append)
        feed_text(aggs["text"], text)
        while (batch := reader.flush()) is not None:
            feed_events(aggs["raw"], batch)
        reader.close()
    finally:
        tfs.remove()
        tfs.close()
    t, r = aggs["text"].snapshot(), aggs["raw"].snapshot()
    assert r.events == t.events and r.lines_read == t.lines_read > 2 * 700
    assert {k: (p.count, p.unmatched, p.pending) for k, p in r.pairs.items()} == \
        {k: (p.count, p.unmatched, p.pending) for k, p in t.pairs.items()}
    assert len(spans["raw"]) == len(spans["text"]) == sum(p.count for p in r.pairs.values()) >= 700 + 400
    for a, b in zip(spans["raw"], spans["text"], strict=True):
        assert (a.pair, a.tid, a.tgid, a.comm, a.args, a.retval) == (b.pair, b.tid, b.tgid, b.comm, b.args, b.retval)
        assert (usec(a.start_ns) * 1000, usec(a.end_ns) * 1000) == (b.start_ns, b.end_ns)


def num(x: float | None) -> float:
    assert x is not None
    return x


def test_agent_with_reader_raw_counts_exactly(tracefs: Path, progs: dict[str, Path],
                                              write_config: Callable[[str], Path]) -> None:
    cfg = write_config(workload_config("kpe_t_rawagent", progs["pie"])+ "reader: raw\n")
    with running_agent(cfg) as agent:
        subprocess.run([str(progs["pie"]), "open", "150", "/etc/hostname"], check=True)
        subprocess.run([str(progs["pie"]), "compute", "77"], check=True)
        assert agent.wait_value("kprobe_latency_seconds_count", 150, probe="open_path") == 150
        text = agent.scrape()
        assert value(text, "kprobe_events_total", probe="open_path", path="/etc/hostname") == 150
        assert agent.wait_value("kprobe_latency_seconds_count", 77, probe="compute") == 77
        assert value(text, "kprobe_exporter_pairs_unmatched_total", probe="open_path") == 0
        assert num(value(text, "kprobe_exporter_lines_read_total")) >= 2 * 150 + 2 * 77
        assert value(text, "kprobe_exporter_parse_errors_total") == 0
        assert 0 < num(value(text, "kprobe_latency_seconds_sum", probe="compute")) < 77 * 0.01
        rc, err = agent.stop()
    assert rc == 0
    assert "reader: raw (per-CPU trace_pipe_raw" in err


def test_reader_flag_and_fallback_with_a_reason(tracefs: Path, progs: dict[str, Path],
                                                write_config: Callable[[str], Path]) -> None:
    # sched_switch prints with helpers (__print_flags, ?:) the raw renderer does not do: a label on its
    # field needs the text reader, and the agent says so and counts through text
    cfg = write_config("""
instance: kpe_t_rawfallback
probes:
  - name: sched_switch
    tracepoint: sched/sched_switch
    labels: [prev_state]
  - name: getppid
    tracepoint: syscalls/sys_enter_getppid
""")
    with running_agent(cfg, extra=["--reader", "raw"]) as agent:
        assert num(agent.wait_value("kprobe_events_total", 1, probe="sched_switch")) >= 1
        rc, err = agent.stop()
    assert rc == 0
    assert "the raw reader cannot serve this config here" in err and "sched_switch" in err
    assert "reading trace_pipe text" in err


def test_raw_reader_refuses_an_instance_without_per_cpu_files(tmp_path: Path) -> None:
    inst = tmp_path / "inst"
    (inst / "events").mkdir(parents=True)
    (inst / "trace_clock").write_text("local global counter uptime perf [mono] mono_raw boot\n")
    ps = probes.build_probe_set(config.load_text("probes:\n  - tracepoint: syscalls/sys_enter_getppid\n"),
                                resolve=None)
    events = raw_args.RawEvents(ps, [None], (6, 18))
    with pytest.raises(raw_formats.RawUnsupported, match="per_cpu"):
        raw_reader.RawReader(inst, events)
    (inst / "trace_clock").write_text("[local] global\n")
    with pytest.raises(raw_formats.RawUnsupported, match="clock 'local'"):
        raw_reader.RawReader(inst, events)


def test_reload_under_the_raw_reader_maps_the_new_event_ids(tracefs: Path, exe: Path, tmp_path: Path) -> None:
    from hard_helpers import LoggedAgent

    head = "instance: kpe_t_rawreload\nreader: raw\nprobes:\n"
    compute = f"  - {{name: compute, uprobe: '{exe}:compute', args: {{a: '%di:s32'}}, latency: true}}\n"
    opener = (f"  - {{name: open_path, uprobe: '{exe}:open_path', args: {{path: '+0(%di):string'}}, "
              "labels: [path], latency: true}\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(head + compute)
    agent = LoggedAgent(cfg, tmp_path / "agent.log").wait_ready()
    try:
        subprocess.run([str(exe), "compute", "40"], check=True)
        assert agent.wait_value("kprobe_latency_seconds_count", 40, probe="compute") == 40
        start = len(agent.log())
        cfg.write_text(head + compute + opener)
        agent.kill(signal.SIGHUP)
        agent.wait_log(r"reloaded: .*", start=start)
        subprocess.run([str(exe), "open", "25", "/etc/hostname"], check=True)
        subprocess.run([str(exe), "compute", "10"], check=True)
        assert agent.wait_value("kprobe_events_total", 25, probe="open_path", path="/etc/hostname") == 25
        assert agent.wait_value("kprobe_latency_seconds_count", 25, probe="open_path") == 25
        assert agent.wait_value("kprobe_latency_seconds_count", 50, probe="compute") == 50
        text = agent.scrape()
        assert value(text, "kprobe_exporter_parse_errors_total", reason="unknown_event") == 0
    finally:
        agent.stop()
    assert "reader: raw (per-CPU" in agent.log()
