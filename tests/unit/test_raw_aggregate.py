"""The raw reader's event batches against the text source's, on the same events, through one aggregate.

Every raw fixture has the kernel's text of the events its pages hold: fed through the two entries
of one probe set, with labels (args and comm) and spans on every pair, they must count the same,
label the same, pair the same and emit the same spans; timestamps agree to the microsecond the text
shows (the kernel rounds ns to µs), while the raw path keeps the nanoseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from feeding import feed_raw, feed_text
from kprobe_exporter import config, kernel, probes
from kprobe_exporter.aggregate import Aggregate, CompletedPair, Snapshot
from kprobe_exporter.probes import ProbeSet
from kprobe_exporter.raw import args as raw_args
from kprobe_exporter.raw import pages as raw_pages
from kprobe_exporter.tasks import Tasks
from raw_fixtures import ALL, K618, load, usec


class Sampling:
    sample_ratio = 1.0
    min_duration_ns = 0


def labelled_probe_set(path: Path) -> ProbeSet:
    """The fixture's events with a label on each entry's first string arg (comm where it has none),
    and every entry/exit pair declared, so that counting, labels, pairing and spans are all exercised."""
    sc = json.loads((path / "meta.json").read_text())["scenario"]
    defs = {line.split()[0].split(":", 1)[1]: line for _, line in sc["definitions"]}
    names, lines = [], [f"instance: {sc['instance']}", "probes:"]
    for ev in sc["events"]:
        if ev in defs:
            letter, rest = defs[ev].split(":", 1)
            name_part, tail = rest.split(" ", 1)
            name = name_part.split("/")[1]
            lines.append(f"  - raw: '{letter}:{name} {tail}'")
            strings = [a.split("=")[0] for a in tail.split()[1:] if a.endswith(("string", "ustring"))]
            if letter == "p":
                lines.append(f"    labels: [{strings[0] if strings else 'comm'}]")
        else:
            name = ev.split("/")[1]
            lines.append(f"  - tracepoint: {ev}")
            if name.startswith("sys_enter_"):
                lines.append("    labels: [comm]")
        names.append(name)
    pairs = [(n, n + "_ret") for n in names if n + "_ret" in names]
    pairs += [(n, "sys_exit_" + n[len("sys_enter_"):]) for n in names
              if n.startswith("sys_enter_") and "sys_exit_" + n[len("sys_enter_"):] in names]
    lines.append("pairs:")
    lines += [f"  - {{name: p_{a}, entry: {a}, exit: {b}, spans: {{sample_ratio: 1.0}}}}" for a, b in pairs]
    return probes.build_probe_set(config.load_text("\n".join(lines) + "\n"), resolve=None)


def run_both(path: Path, tmp: Path) -> tuple[Snapshot, Snapshot, list[CompletedPair], list[CompletedPair], Aggregate]:
    ps = labelled_probe_set(path)
    fx = load(path)
    text = (path / "trace.txt").read_bytes()
    # the comms a text line shows, as saved_cmdlines would give them to the raw path
    cmdlines = {}
    for line in text.split(b"\n"):
        if line and not line.startswith(b"#"):
            cmdlines[int(line[17:line.find(b" ", 17)])] = line[:16].lstrip().decode()
    (tmp / "saved_cmdlines").write_text("".join(f"{k} {v}\n" for k, v in cmdlines.items()))
    # trace_pipe would print `CPU:N [LOST M EVENTS]` ahead of the first event it shows from a CPU after
    # a loss; the `trace` file does not: put it where trace_pipe would
    for i in np.flatnonzero(fx.batch.ev == raw_pages.EV_LOST).tolist():
        cpu, n = int(fx.batch.cpu[i]), int(fx.batch.rlen[i])
        at = text.find(b"[%03d]" % cpu)
        head = text.rfind(b"\n", 0, at) + 1
        text = text[:head] + b"CPU:%d [LOST %d EVENTS]\n" % (cpu, n) + text[head:]
    formats = fx.events.formats
    # the labelled set has the same events in the same order: the fixture's formats fit it
    assert [e.name for e in ps.events] == [e.name for e in fx.probes.events]
    events = raw_args.RawEvents(ps, formats, kernel.version(str(fx.meta["release"])))
    batch = fx.batch
    tasks = Tasks(tmp)

    out: dict[str, list[CompletedPair]] = {"text": [], "raw": []}
    aggs = {}
    for kind in ("text", "raw"):
        agg = Aggregate(ps, config.default_buckets(), label_limit=100)
        for p in ps.pairs:
            agg.set_sink(p.name, Sampling(), out[kind].append)
        if kind == "text":
            feed_text(agg, text)
        else:
            feed_raw(agg, batch, events, tasks)
        aggs[kind] = agg
    return aggs["text"].snapshot(), aggs["raw"].snapshot(), out["text"], out["raw"], aggs["raw"]


@pytest.mark.parametrize("path", ALL, ids=[f"{p.parent.name}/{p.name}" for p in ALL])
def test_raw_and_text_count_label_pair_and_span_alike(path: Path, tmp_path: Path) -> None:
    t, r, t_spans, r_spans, _ = run_both(path, tmp_path)
    assert r.events == t.events
    assert any(labels for _, labels in r.events)
    assert r.lines_read == t.lines_read - len(t.lost) > 0  # text counts the LOST line too
    assert r.lost == t.lost
    assert r.parse_errors == t.parse_errors
    for name, tp in t.pairs.items():
        rp = r.pairs[name]
        assert (rp.count, rp.unmatched, rp.pending, rp.evicted) == \
            (tp.count, tp.unmatched, tp.pending, tp.evicted), name
    assert len(r_spans) == len(t_spans) == sum(p.count for p in r.pairs.values()) > 0
    for rs, ts in zip(r_spans, t_spans, strict=True):
        assert (rs.pair, rs.function, rs.tid, rs.comm, rs.args, rs.retval) == \
            (ts.pair, ts.function, ts.tid, ts.comm, ts.args, ts.retval)
        assert (usec(rs.start_ns) * 1000, usec(rs.end_ns) * 1000) == (ts.start_ns, ts.end_ns)
    # the raw path keeps nanoseconds: its sums are the spans' exact durations
    for name, rp in r.pairs.items():
        assert rp.sum_ns == sum(s.end_ns - s.start_ns for s in r_spans if s.pair == name)


def test_raw_latency_has_nanoseconds_text_cannot_show(tmp_path: Path) -> None:
    _, _, t_spans, r_spans, _ = run_both(K618 / "uprobes-syscalls", tmp_path)
    raw = np.array([s.end_ns - s.start_ns for s in r_spans])
    text = np.array([s.end_ns - s.start_ns for s in t_spans])
    assert np.all(text % 1000 == 0) and np.count_nonzero(raw % 1000) > len(raw) // 2
    assert np.all(np.abs(raw - text) <= 1000)


def test_missed_events_count_as_lost_and_drop_pending(tmp_path: Path) -> None:
    path = K618 / "missed-events"
    _, r, _, _, _ = run_both(path, tmp_path)
    overrun = int(load(path).stats(1)["overrun"])
    assert r.lost == {1: overrun}
    # a marker in the middle of a stream drops what is pending, as a LOST line does
    fx = load(K618 / "uprobes-syscalls")
    b = fx.batch
    cut = int(np.flatnonzero(np.array([fx.probes.events[e].name for e in b.ev.tolist()]) == "open_path")[3]) + 1
    marker = raw_pages.Batch(np.array([raw_pages.EV_LOST], np.int32), np.zeros(1, np.int32), b.ts[cut - 1:cut],
                           np.ones(1, np.int32), np.zeros(1, np.int64), np.array([7], np.int32), b"")
    agg2 = Aggregate(fx.probes, config.default_buckets())
    feed_raw(agg2, raw_pages.slice_batch(b, 0, cut), fx.events)
    assert agg2.snapshot().pairs == {}  # no pairs declared in the plain set
    agg3 = Aggregate(labelled_probe_set(K618 / "uprobes-syscalls"), config.default_buckets())
    feed_raw(agg3, raw_pages.slice_batch(b, 0, cut), fx.events)
    pending = agg3.snapshot().pairs["p_open_path"].pending
    assert pending == 1
    feed_raw(agg3, raw_pages.merge_batches(marker, raw_pages.empty_batch()), fx.events)
    s = agg3.snapshot()
    assert s.pairs["p_open_path"].pending == 0 and s.pairs["p_open_path"].evicted["lost"] == 1
    assert s.lost == {1: 7}
