"""Kernel aggregation source: hist files of the real 6.1 kernel rendered as the exported series; values
carried across replaced triggers; label_limit folding; dropped entries counted and logged once.

The hist text is the 6.1 kernel's (tests/fixtures/linux-6.1-debian/hist, captured in the kernel lab). The
instance directory is a plain directory standing in for tracefs (this host has no hist triggers): it
holds those files where tracefs would, and the trigger lines the source writes land in plain files.
The same source against the real kernel is tests/lab/test_kernel_mode.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from kprobe_exporter import aggmode, config, hist, kernelagg, probes, triggers
from kprobe_exporter.aggmode import KernelSupport
from kprobe_exporter.kernelagg import KernelSource, KernelView, LabelFold
from kprobe_exporter.metrics import Sources, make_registry

HIST = Path(__file__).resolve().parents[1] / "fixtures" / "linux-6.1-debian" / "hist"
GROUP = "kpe"


def mode(yaml: str, name: str = "open") -> aggmode.ProbeMode:
    cfg = config.load_text(f"instance: {GROUP}\n{yaml}")
    return aggmode.resolve(cfg, probes.build_probe_set(cfg, resolve=None), KernelSupport(True, True))[name]


LAT = "probes:\n  - name: open\n    kprobe: do_sys_openat2\n    latency: true\n"
LAT_FILTERED = LAT + "    filter: 'comm == \"kpe_opener\"'\n"


def instance(tmp_path: Path, files: dict[str, str]) -> tuple[Path, Path]:
    """A stand-in tracefs root and instance holding `events/EVENT/hist` texts and empty trigger files."""
    root, inst = tmp_path, tmp_path / "instances" / GROUP
    (root / "synthetic_events").touch()
    for ev in (f"{GROUP}/open", f"{GROUP}/open_ret", f"synthetic/{GROUP}_open_lat"):
        (inst / "events" / ev).mkdir(parents=True, exist_ok=True)
        (inst / "events" / ev / "trigger").touch()
        (inst / "events" / ev / "hist").write_text(files.get(ev, ""))
    return root, inst


def count_table(per_cpu: list[int], dropped: int = 0) -> str:
    """A count table keyed by common_cpu (triggers.count_trigger without labels) in 6.1's print format
    (kernel/trace/trace_events_hist.c, as tests/fixtures/linux-6.1-debian/hist/agent holds it)."""
    rows = "".join(f"{{ common_cpu: {c:>10} }} hitcount: {n:>10}\n"
                   for c, n in sorted(enumerate(per_cpu), key=lambda cn: cn[1]))
    return ("# event histogram\n#\n# trigger info: hist:keys=common_cpu:vals=hitcount:sort=hitcount:size=2048"
            f" [active]\n#\n\n{rows}\nTotals:\n    Hits: {sum(per_cpu)}\n    Entries: {len(per_cpu)}\n"
            f"    Dropped: {dropped}\n")


def entry_hist(thread_table: str, per_cpu: list[int]) -> str:
    """An entry event's hist file: the thread table, then the count table (in the order they were written)."""
    return thread_table.rstrip("\n") + "\n\n\n" + count_table(per_cpu)


def six_one(tmp_path: Path) -> tuple[Path, Path]:
    """vread.hist's first table is the entry layout (keyed by thread, saving a timestamp), beside it a
    count of 1,341 entries; lat.hist's the `.log2` latency table: as the 6.1 kernel printed them."""
    return instance(tmp_path, {f"{GROUP}/open": entry_hist((HIST / "vread.hist").read_text(), [700, 641]),
                               f"synthetic/{GROUP}_open_lat": (HIST / "lat.hist").read_text()})


def test_a_latency_probe_without_labels_counts_in_a_table_of_its_own_and_times_in_log2(tmp_path: Path) -> None:
    """Not from the entry's thread table, which is replaced as threads come and go: a count must not restart."""
    root, inst = six_one(tmp_path)
    src = KernelSource(root, inst, GROUP, 100)
    src.install([mode(LAT)])
    written = (inst / "events" / GROUP / "open" / "trigger").read_text().splitlines()
    assert [w.split(":")[1] for w in written] == ["keys=common_pid", "keys=common_cpu"]
    view = src.read()
    assert view.events == {("open", ()): 700 + 641}
    lat = view.latency["open"]
    table = hist.parse((HIST / "lat.hist").read_text())[0]
    assert lat.count == table.hits == 1347 and lat.sum_ns == sum(r.values["lat"] for r in table.rows)
    assert lat.bounds_ns == tuple(2**e for e in range(35))


def test_each_le_is_the_top_of_the_kernels_bucket(tmp_path: Path) -> None:
    """`~ 2^N` holds (2^(N-1), 2^N]: every row's mean lies there, so the exported le must be 2^N ns."""
    table = hist.parse((HIST / "lat.hist").read_text())[0]
    lat = kernelagg.latency_of({hist.log2_upper_bound(r.keys[0]).bit_length() - 1: (r.values["hitcount"],
                                r.values["lat"]) for r in table.rows})
    for r in table.rows:
        i = next(i for i, b in enumerate(lat.bounds_ns) if b == hist.log2_upper_bound(r.keys[0]))
        assert lat.counts[i] == r.values["hitcount"]
        assert lat.bounds_ns[i] // 2 < r.values["lat"] / r.values["hitcount"] <= lat.bounds_ns[i]


def test_metrics_render_kernel_series_under_the_stream_names(tmp_path: Path) -> None:
    root, inst = six_one(tmp_path)
    src = KernelSource(root, inst, GROUP, 100)
    m = mode(LAT)
    src.install([m])
    from kprobe_exporter.aggregate import Snapshot
    empty = Snapshot({}, {}, 0, {}, {}, {}, [1e-6])
    text = generate_latest(make_registry(Sources(snapshot=lambda: empty, probes=probes.ProbeSet(GROUP, (), ()),
                                                 kernel=src.read, modes=lambda: {"open": m}))).decode()
    assert 'kprobe_events_total{probe="open"} 1341.0' in text
    assert 'kprobe_latency_seconds_count{probe="open"} 1347.0' in text
    assert 'kprobe_latency_seconds_bucket{le="8.192e-06",probe="open"} 817.0' in text  # ~ 2^13: 817 calls
    assert 'kprobe_latency_seconds_bucket{le="4.096e-06",probe="open"} 0.0' in text
    assert 'kprobe_exporter_probe_aggregation{mode="kernel",probe="open"} 1.0' in text
    assert 'kprobe_exporter_kernel_dropped_total{probe="open"} 0.0' in text


def test_a_replaced_trigger_carries_its_values_forward_and_a_kept_one_is_left_alone(tmp_path: Path) -> None:
    root, inst = six_one(tmp_path)
    src = KernelSource(root, inst, GROUP, 100)
    old = mode(LAT)
    src.install([old])
    trigger = inst / "events" / GROUP / "open" / "trigger"
    before = trigger.read_text()
    src.retire({"open": old}, (), 100)
    assert trigger.read_text() == before and src.missing({"open": old}) == []  # unchanged: untouched
    new = mode(LAT_FILTERED)
    src.retire({"open": new}, (), 100)
    assert trigger.read_text().splitlines()[-2:] == ["!" + ln for ln in reversed(before.splitlines())]  # removed
    src.install(src.missing({"open": new}))
    (inst / "events" / GROUP / "open" / "hist").write_text(  # the new triggers start from zero in the kernel
        entry_hist((HIST / "vread.hist").read_text(), [5]))
    (inst / "events" / "synthetic" / f"{GROUP}_open_lat" / "hist").write_text("")
    view = src.read()
    assert view.events == {("open", ()): 1341 + 5}
    assert view.latency["open"].count == 1347  # the old table's samples, kept


def test_a_probe_that_goes_takes_its_values_with_it(tmp_path: Path) -> None:
    root, inst = six_one(tmp_path)
    src = KernelSource(root, inst, GROUP, 100)
    src.install([mode(LAT)])
    src.retire({}, (), 100)
    assert src.read().events == {} and src.offsets == {}


def test_label_limit_folds_into_overflow_and_the_admitted_values_stay() -> None:
    fold = LabelFold(limit=1)
    v1 = KernelView()
    fold.fold("open", {(("comm", "a"),): 5, (("comm", "b"),): 3}, v1)
    assert v1.events == {("open", (("comm", "a"),)): 5, ("open", (("comm", "__overflow__"),)): 3}
    assert v1.label_overflow == {("open", "comm"): 3}
    v2 = KernelView()
    fold.fold("open", {(("comm", "a"),): 6, (("comm", "b"),): 30}, v2)  # b outgrew a: a keeps its place
    assert v2.events == {("open", (("comm", "a"),)): 6, ("open", (("comm", "__overflow__"),)): 30}


def test_labels_come_from_the_count_table_and_a_full_table_is_counted_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = mode("probes:\n  - name: open\n    kprobe: do_sys_openat2\n    args: {n: '%di:u32'}\n    labels: [n]\n")
    full = (HIST / "full-table.hist").read_text().replace("keys=common_pid", "keys=n").replace("{ common_pid:", "{ n:")
    root, inst = instance(tmp_path, {f"{GROUP}/open": full})
    src = KernelSource(root, inst, GROUP, 1000)
    src.install([m])
    table = hist.parse(full)[0]
    with caplog.at_level(logging.WARNING):
        view = src.read()
        src.read()
    assert sum(view.events.values()) == table.hits == 255 and view.dropped == {"open": 352}
    assert len(view.events) == 128 and all(dict(k[1])["n"].isdigit() for k in view.events)
    logged = [r.message for r in caplog.records if "full hist table" in r.message]
    assert len(logged) == 1 and "352" in logged[0], logged


AGENT = HIST / "agent"  # the agent's own triggers on 6.1 (tests/lab/test_kernel_mode.py, KPE_KAGG_KEEP)


def test_the_agents_own_tables_as_6_1_printed_them(tmp_path: Path) -> None:
    """Probe `open` (labels [comm], latency) and `open_f` (a filter, latency) after 2 x 10,000 opens of
    kpe_opener, 2,000 of kpe_slow and the guest's own: per-comm counts from the string-keyed table, the
    latency count from the synthetic event's `.log2` table."""
    cfg = (f"instance: {GROUP}\nprobes:\n  - name: open\n    kprobe: do_sys_openat2\n    labels: [comm]\n"
           "    latency: true\n  - name: open_f\n    kprobe: do_sys_openat2\n    latency: true\n"
           "    filter: 'comm == \"kpe_opener\"'\n")
    c = config.load_text(cfg)
    ms = aggmode.resolve(c, probes.build_probe_set(c, resolve=None), KernelSupport(True, True))
    text = {f"{GROUP}/open": (AGENT / "open.hist").read_text(), f"{GROUP}/open_f": (AGENT / "open_f.hist").read_text(),
            f"synthetic/{GROUP}_open_lat": (AGENT / "kpe_k_open_lat.hist").read_text(),
            f"synthetic/{GROUP}_open_f_lat": (AGENT / "kpe_k_open_f_lat.hist").read_text()}
    opened = kernelagg.raw_values(kernelagg.probe_triggers(GROUP, ms["open"]), text)
    assert opened.events[(("comm", "kpe_opener"),)] == 20000 and opened.events[(("comm", "kpe_slow"),)] == 2000
    counted = hist.parse(text[f"{GROUP}/open"])[1]  # the table keyed by __comm, after the thread table
    assert counted.key_names == ("__comm",) and counted.dropped == 0
    assert sum(opened.events.values()) == counted.hits and opened.dropped == 0
    f = kernelagg.raw_values(kernelagg.probe_triggers(GROUP, ms["open_f"]), text)
    # open_f has no labels: its count is the table keyed by common_cpu, not the thread table beside it
    assert [t.key_names for t in hist.parse(text[f"{GROUP}/open_f"])] == [("common_pid",), ("common_cpu",)]
    assert f.events == {(): 20000} and sum(n for n, _ in f.lat.values()) == 20000
    lat = kernelagg.latency_of(f.lat)
    rows = {r.keys[0].strip(): r.values["hitcount"] for r in hist.parse(text[f"synthetic/{GROUP}_open_f_lat"])[0].rows}
    assert lat.counts[16] == rows["~ 2^16"] > 0 and lat.bounds_ns[16] == 65536  # `~ 2^16`: calls of at most 65.5 µs


def test_a_full_thread_table_loses_latency_samples_and_says_so_but_no_count(tmp_path: Path) -> None:
    """full-table.hist (6.1): a 128-entry table keyed by thread refused 352 events, beside a count keyed by
    common_cpu on the same event. The count is that table's 606; the 352 are latency samples lost, counted
    as dropped."""
    full = (HIST / "full-table.hist").read_text().replace("size=128", "open_ts0=common_timestamp:size=128")
    root, inst = instance(tmp_path, {f"{GROUP}/open": full})
    src = KernelSource(root, inst, GROUP, 100)
    src.install([mode(LAT)])
    view = src.read()
    assert view.events == {("open", ()): 288 + 318} and view.dropped == {"open": 352}


def thread_table(trigger: str, pids: range, dropped: int = 0) -> str:
    """A table keyed by thread, one call each, in 6.1's print format (vread.hist's)."""
    rows = "".join(f"{{ common_pid: {p:>10} }} hitcount: {1:>10}\n" for p in pids)
    return (f"# event histogram\n#\n# trigger info: {trigger} [active]\n#\n\n{rows}\nTotals:\n"
            f"    Hits: {len(pids)}\n    Entries: {len(pids)}\n    Dropped: {dropped}\n")


@pytest.mark.parametrize("threads", [triggers.THREAD_RENEW_AT - 1, triggers.THREAD_RENEW_AT, 2048])
def test_thread_tables_past_half_full_are_replaced_by_empty_ones_and_nothing_counted_goes(
        tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel never deletes a row of a table keyed by thread and refuses `:clear` on the pair's triggers
    (they define and use variables: EINVAL on 6.1 and 6.12), so a read that finds the fuller of the two at
    THREAD_RENEW_AT rows or more removes the return's trigger, then the entry's, and writes both again, in
    that order (the return refers to the entry's variable). The count has a table of its own, and what the
    old tables refused stays counted. The real kernel doing it: tests/lab/test_kernel_mode.py."""
    root, inst = instance(tmp_path, {})
    src = KernelSource(root, inst, GROUP, 100)
    m = mode(LAT)
    src.install([m])
    pt = src.installed["open"]
    entry, exit_ = pt.plan.threads
    events = inst / "events"
    (events / entry.event / "hist").write_text(entry_hist(thread_table(entry.line, range(100, 100 + threads), 7),
                                                          [4000]))
    (events / exit_.event / "hist").write_text(thread_table(exit_.line, range(100, 100 + threads - 1)))
    written: list[tuple[str, str]] = []  # every write, in order, across the files (then done for real)

    def write_file(path: Path, text: str, append: bool = False) -> None:
        written.append((str(path.relative_to(inst)), text.strip()))
        real_write(path, text, append=append)

    real_write = kernelagg.write_file
    monkeypatch.setattr(kernelagg, "write_file", write_file)
    view = src.read()
    if threads < triggers.THREAD_RENEW_AT:
        assert written == [] and view.renewals == {"open": 0}
        return
    assert written == [(exit_.path, exit_.removal), (entry.path, entry.removal), (entry.path, entry.line),
                       (exit_.path, exit_.line)]
    assert view.renewals == {"open": 1} and view.events == {("open", ()): 4000} and view.dropped == {"open": 7}
    # the new tables start empty: the count goes on from its own table, the old tables' drops stay
    (events / entry.event / "hist").write_text(entry_hist(thread_table(entry.line, range(5)), [4010]))
    (events / exit_.event / "hist").write_text(thread_table(exit_.line, range(5)))
    again = src.read()
    assert again.events == {("open", ()): 4010} and again.dropped == {"open": 7} and again.renewals == {"open": 1}


def test_a_renewal_the_kernel_refuses_is_logged_once_and_tried_again_at_each_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A refused write of a renewal's lines (here: the entry's trigger file is a directory, EISDIR) leaves
    the pair without latency; each read tries the lines again, in order, and the error is logged once."""
    root, inst = instance(tmp_path, {})
    src = KernelSource(root, inst, GROUP, 100)
    src.install([mode(LAT)])
    pt = src.installed["open"]
    entry, exit_ = pt.plan.threads
    (inst / "events" / entry.event / "hist").write_text(
        entry_hist(thread_table(entry.line, range(triggers.THREAD_RENEW_AT)), [1]))
    trigger = inst / "events" / entry.event / "trigger"
    kept = trigger.read_text()
    trigger.unlink()
    trigger.mkdir()
    with caplog.at_level(logging.ERROR):
        src.read()
        src.read()
    assert len([r for r in caplog.records if "latency not measured" in r.message]) == 1
    exit_file = inst / "events" / exit_.event / "trigger"
    assert exit_file.read_text().splitlines()[-1] == exit_.removal  # the return's line waits for the entry's
    trigger.rmdir()
    trigger.write_text(kept)
    view = src.read()
    assert trigger.read_text().splitlines()[-1] == entry.line and exit_file.read_text().splitlines()[-1] == exit_.line
    assert view.renewals == {"open": 1}


def _fold_by_sorting_all(limit: int, admitted: dict[tuple[str, str], dict[str, None]], probe: str,
                         events: dict[kernelagg.Labels, int], view: KernelView) -> None:
    """The fold as first written: every label set, most counted first (the semantics LabelFold keeps)."""
    for labels, n in sorted(events.items(), key=lambda kv: (-kv[1], kv[0])):
        out = []
        for label, v in labels:
            seen = admitted.setdefault((probe, label), {})
            if v not in seen and len(seen) < limit:
                seen[v] = None
            if v not in seen:
                view.label_overflow[(probe, label)] = view.label_overflow.get((probe, label), 0) + n
                v = config.OVERFLOW_VALUE
            out.append((label, v))
        key = (probe, tuple(out))
        view.events[key] = view.events.get(key, 0) + n


@pytest.mark.parametrize("limit", [1, 3, 8, 50])
def test_the_fold_admits_and_folds_as_sorting_every_label_set_would(limit: int) -> None:
    """Scrapes whose label sets come and go and whose counts reorder: the fold that sorts only the sets with
    a value not yet admitted (and none when no place is left) gives what sorting all of them gives."""
    import random

    rnd = random.Random(limit)
    fold = LabelFold(limit)
    admitted: dict[tuple[str, str], dict[str, None]] = {}
    for scrape in range(12):
        events = {(("comm", f"c{rnd.randrange(6 + scrape)}"), ("n", str(rnd.randrange(10 + 2 * scrape)))):
                  rnd.randrange(1, 50) for _ in range(40)}
        got, want = KernelView(), KernelView()
        fold.fold("open", events, got)
        _fold_by_sorting_all(limit, admitted, "open", events, want)
        assert (got.events, got.label_overflow) == (want.events, want.label_overflow), scrape
        assert fold.admitted == admitted


def test_a_tracepoints_trigger_goes_to_its_own_system_and_event(tmp_path: Path) -> None:
    """A tracepoint lives at events/SYSTEM/EVENT, not under the agent's group by the probe's name (the
    kernel lab's `check` of a tracepoint probe once answered ENOENT for `events/syscalls/<probe>/trigger`)."""
    m = mode("probes:\n  - name: opens\n    tracepoint: syscalls/sys_enter_openat\n", "opens")
    assert m.kernel
    pt = kernelagg.probe_triggers(GROUP, m)
    assert [t.event for t in pt.plan.triggers] == ["syscalls/sys_enter_openat"]
    assert pt.count.path == "events/syscalls/sys_enter_openat/trigger"


def test_a_source_read_again_and_again_gives_what_a_fresh_source_reads(tmp_path: Path) -> None:
    """The rows, cuts, labels and admitted sets carried from read to read: after counts change, rows go and
    come back and new label values appear, each view is the one a source reading for the first time gives."""
    import re

    m = mode("probes:\n  - name: open\n    kprobe: do_sys_openat2\n    labels: [comm]\n    latency: true\n")
    first = (AGENT / "open.hist").read_text()
    bumped = re.sub(r"hitcount: +(\d+)", lambda g: f"hitcount: {int(g[1]) + 3:>10}", first)
    renamed = bumped.replace("{ __comm: sleep ", "{ __comm: sleeq ").replace("{ __comm: busybox", "{ __comm: busyb0x")
    gone = "".join(line for line in first.splitlines(keepends=True) if "__comm: cat " not in line)
    for d in ("kept", *map(str, range(6))):
        (tmp_path / d).mkdir()
    kept = KernelSource(*instance(tmp_path / "kept", {}), GROUP, 7)
    kept.install([m])
    for i, text in enumerate([first, bumped, renamed, gone, first, renamed]):
        files = {f"{GROUP}/open": text, f"synthetic/{GROUP}_open_lat": (AGENT / "kpe_k_open_lat.hist").read_text()}
        for ev, t in files.items():
            (kept.inst / "events" / ev / "hist").write_text(t)
        fresh = KernelSource(*instance(tmp_path / str(i), files), GROUP, 7)
        fresh.install([m])
        fresh.fold.admitted = {k: dict(v) for k, v in kept.fold.admitted.items()}  # what the kept one admitted
        want, got = fresh.read(), kept.read()
        assert (got.events, got.label_overflow, got.latency) == (want.events, want.label_overflow, want.latency), i
    assert any(dict(labels).get("comm") == "__overflow__" for _, labels in got.events)  # limit 7: some folded


def test_a_reload_that_prints_a_label_otherwise_reads_it_anew(tmp_path: Path) -> None:
    """The same printed key under a replaced trigger whose label is signed now: not the old label value."""
    table = ("# trigger info: hist:keys=n:vals=hitcount:sort=hitcount:size=2048 [active]\n#\n\n"
             "{ n: 4294967295 } hitcount:          3\n\nTotals:\n    Hits: 3\n    Entries: 1\n    Dropped: 0\n")
    root, inst = instance(tmp_path, {f"{GROUP}/open": table})
    src = KernelSource(root, inst, GROUP, 100)
    unsigned = mode("probes:\n  - name: open\n    kprobe: do_sys_openat2\n    args: {n: '%di:u32'}\n    labels: [n]\n")
    signed = mode("probes:\n  - name: open\n    kprobe: do_sys_openat2\n    args: {n: '%di:s32'}\n    labels: [n]\n")
    src.install([unsigned])
    assert src.read().events == {("open", (("n", "4294967295"),)): 3}
    src.retire({"open": signed}, (), 100)
    src.install(src.missing({"open": signed}))
    (inst / "events" / GROUP / "open" / "hist").write_text(table)  # the new trigger's table, printed the same
    src.offsets.clear()  # the old trigger's values aside: only the new one's reading matters here
    assert src.read().events == {("open", (("n", "-1"),)): 3}


def test_a_scrape_asking_while_a_read_is_under_way_takes_its_view_and_one_after_it_reads_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving is forced (the first read waits until the second scrape has asked); no timing."""
    import threading

    root, inst = six_one(tmp_path)
    src = KernelSource(root, inst, GROUP, 100)
    src.install([mode(LAT)])
    reading, go, asked = threading.Event(), threading.Event(), threading.Event()
    reads: list[int] = []
    real_text, real_done = src._hist_text, src._reads_done

    def held_text(pts: list[kernelagg.ProbeTriggers]) -> dict[str, str]:
        reads.append(1)
        reading.set()
        go.wait(30)
        return real_text(pts)

    def done() -> int:
        n = real_done()
        if threading.current_thread().name == "second":
            asked.set()
        return n

    monkeypatch.setattr(src, "_hist_text", held_text)
    monkeypatch.setattr(src, "_reads_done", done)
    views: dict[str, KernelView] = {}
    first = threading.Thread(target=lambda: views.setdefault("first", src.read()))
    second = threading.Thread(target=lambda: views.setdefault("second", src.read()), name="second")
    first.start()
    assert reading.wait(30)
    second.start()
    assert asked.wait(30)
    go.set()
    first.join(30)
    second.join(30)
    assert views["second"] is views["first"] and len(reads) == 1
    again = src.read()  # asked after that read ended: its own read
    assert again is not views["first"] and len(reads) == 2 and again.events == views["first"].events
