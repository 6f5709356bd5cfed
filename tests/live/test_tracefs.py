"""Tracefs on the real kernel: install, the kernel's listing read back through the one definition parser,
profile hits, refusals with the kernel's own words, and removal that leaves nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kprobe_exporter import config, kinds, probes
from kprobe_exporter import tracefs as tracefs_mod
from kprobe_exporter.errors import TracefsError
from kprobe_exporter.tracefs import InstanceLock, Tracefs

INST = f"kpe_t_tracefs_{os.getpid()}"


def probe_set(progs: dict[str, Path], *extra: dict[str, object]) -> probes.ProbeSet:
    cfg = config.Config.model_validate({"instance": INST, "probes": [
        {"name": "compute", "uprobe": f"{progs['pie']}:compute", "latency": True},
        {"raw": f"p:compute_back {progs['pie']}:compute%return ret=$retval:s32"},
        {"name": "openat", "tracepoint": "syscalls/sys_enter_openat", "labels": ["flags"]},
        *extra,
    ]})
    return probes.build_probe_set(cfg)


@pytest.fixture
def installed(tracefs: Path, progs: dict[str, Path]):  # type: ignore[no-untyped-def]
    tfs = Tracefs(tracefs, INST)
    ps = probe_set(progs)
    tfs.install(ps, 64, record_tgid=False, own_tids=[])
    yield tfs, ps
    problems = tfs.remove()
    assert problems == []
    assert list(leftovers(tracefs)) == []


def leftovers(root: Path) -> list[str]:
    return list(tracefs_mod.leftovers(root, INST))


def test_the_kernel_lists_what_was_installed_and_the_parser_reads_it_back(installed, tracefs: Path) -> None:  # type: ignore[no-untyped-def]
    tfs, ps = installed
    dynamic = {ev.name: ev for ev in ps.events if ev.dynamic}
    assert sorted(tfs.own_definitions()) == sorted(("uprobe_events", name) for name in dynamic)
    listed = {}
    for line in (tracefs / "uprobe_events").read_text().splitlines():
        d = kinds.parse_definition(line)
        assert d is not None and d.kind is not None, line
        if d.group == INST:
            listed[d.event] = d.kind
    # the %return line is a return probe to the kernel too, however it lists it
    assert listed == {"compute": kinds.KIND["uprobe"], "compute_ret": kinds.KIND["uretprobe"],
                      "compute_back": kinds.KIND["uretprobe"]}
    assert tfs.installed_names() == {ev.name for ev in ps.events}
    assert all(tfs.event_id(ev) for ev in ps.events)


def test_profile_counts_hits_of_our_group_only(installed, progs: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    tfs, _ = installed
    before = tfs.profile()
    assert set(before) == {"compute", "compute_ret", "compute_back"}
    subprocess.run([str(progs["pie"]), "compute", "5"], check=True)
    after = tfs.profile()
    for name in before:
        assert after[name][0] - before[name][0] == 5, (name, before, after)


def test_refusals_carry_the_kernels_words_and_name_the_field(tracefs: Path, progs: dict[str, Path]) -> None:
    tfs = Tracefs(tracefs, INST)
    bad = probe_set(progs, {"name": "bits", "uprobe": f"{progs['pie']}:compute", "args": {"x": "%di:b4@70/64"}})
    with pytest.raises(TracefsError) as e:
        tfs.install(bad, 64, record_tgid=False, own_tids=[])
    assert (e.value.probe, e.value.field) == ("bits", "args.x")
    assert "trace_uprobe: error: Invalid bitfield (at 'b4@70/64')" in e.value.message
    assert leftovers(tracefs) == []  # what went in before the refusal came out
    wrong = probe_set(progs, {"name": "opn", "tracepoint": "syscalls/sys_enter_opnat"})
    with pytest.raises(TracefsError, match="did you mean syscalls/sys_enter_openat") as e:
        tfs.check_kinds(wrong.events)
    assert (e.value.probe, e.value.field) == ("opn", "tracepoint")
    label = probe_set(progs, {"name": "sw", "tracepoint": "sched/sched_switch", "labels": ["nosuch"]})
    with pytest.raises(TracefsError, match="label 'nosuch' is not a field of sched/sched_switch") as e:
        tfs.install(label, 64, record_tgid=False, own_tids=[])
    assert leftovers(tracefs) == []


def test_an_instance_is_held_by_one_live_agent() -> None:
    lock = InstanceLock.acquire(INST)
    try:
        with pytest.raises(TracefsError, match=f"instance '{INST}' is held by another live kprobe-exporter"):
            InstanceLock.acquire(INST)
    finally:
        lock.release()
    InstanceLock.acquire(INST).release()  # released: free again


def test_cleanup_removes_what_a_dead_agent_left(tracefs: Path, progs: dict[str, Path]) -> None:
    tfs = Tracefs(tracefs, INST)
    tfs.install(probe_set(progs), 64, record_tgid=False, own_tids=[])  # and never removed: a killed agent
    assert leftovers(tracefs)
    assert tracefs_mod.cleanup(tracefs, INST) == []
    assert leftovers(tracefs) == []
