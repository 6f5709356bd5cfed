"""Reload's pure parts: the plan (what stays, goes, comes) and the carried counts (monotonic, capped)."""

from __future__ import annotations

from kprobe_exporter import config, probes, reload
from kprobe_exporter.aggregate import PairStats, Snapshot

HEAD = "instance: kpe_t_unit\n"


def build(text: str) -> tuple[config.Config, probes.ProbeSet]:
    cfg = config.load_text(HEAD + text)
    return cfg, probes.build_probe_set(cfg, resolve=None)


def snap(events: dict, pairs: dict | None = None, lines: int = 0, overflow: dict | None = None) -> Snapshot:  # type: ignore[type-arg]
    return Snapshot(events, pairs or {}, lines, {"bad_head": 0}, {0: 1}, overflow or {}, [1e-6, 1e-3])


def stats(name: str, n: int, pending: int = 0) -> PairStats:
    return PairStats(name, [n, 0, 0], n * 1000, n, 0, {"age": 0, "capacity": 0, "lost": 0}, pending)


def test_plan_keeps_unchanged_events_and_pairs() -> None:
    old_cfg, old = build("probes:\n  - {name: a, uprobe: '/x:0x10', latency: true}\n"
                         "  - {name: b, uprobe: '/x:0x20', args: {v: '%di'}}\n"
                         "  - {name: c, tracepoint: sched/sched_switch}\n")
    new_cfg, new = build("probes:\n  - {name: a, uprobe: '/x:0x10', latency: true}\n"
                         "  - {name: b, uprobe: '/x:0x20', args: {v: '%si'}}\n"
                         "  - {name: d, uprobe: '/x:0x30'}\n")
    p = reload.plan(old_cfg, old, new_cfg, new, {})
    assert p.keep == {"a", "a_ret"} and p.keep_pairs == {"a"}
    assert {e.name for e in p.remove} == {"b", "c"} and {e.name for e in p.add} == {"b", "d"}
    assert p.changed and not p.restart
    assert not reload.plan(old_cfg, old, old_cfg, old, {}).changed
    other_cfg, other = build("buckets: [0.001, 1]\nprobes:\n  - {name: a, uprobe: '/x:0x10', latency: true}\n")
    assert reload.plan(old_cfg, old, other_cfg, other, {}).keep_pairs == set()  # new buckets: histograms restart
    moved = config.load_text("instance: kpe_t_elsewhere\nprobes: []\n")
    assert reload.plan(old_cfg, old, moved, probes.build_probe_set(moved, resolve=None), {}).restart == ("instance",)


def test_carry_and_merge_continue_counts_and_keep_label_caps() -> None:
    final = snap({("a", ()): 10, ("gone", ()): 5, ("l", (("p", "x"),)): 3, ("l", (("p", "y"),)): 2},
                 {"a": stats("a", 10, pending=2)}, lines=100)
    base = reload.carry(None, final, label_limit=3, keep={"a", "l"}, keep_pairs={"a"})
    assert ("gone", ()) not in base.events
    assert base.pairs["a"].evicted["reload"] == 2 and base.pairs["a"].pending == 0
    cur = snap({("a", ()): 4, ("l", (("p", "y"),)): 1, ("l", (("p", "z"),)): 1, ("l", (("p", "w"),)): 6},
               {"a": stats("a", 4, pending=1)}, lines=7, overflow={("l", "p"): 0})
    merged = reload.merge(base, cur, label_limit=3)
    assert merged.events[("a", ())] == 14 and merged.lines_read == 107
    assert merged.pairs["a"].count == 14 and merged.pairs["a"].buckets[0] == 14 and merged.pairs["a"].pending == 1
    # x, y from before and z first seen now fill the cap of 3; w overflows, and is counted as such
    assert merged.events[("l", (("p", "y"),))] == 3 and merged.events[("l", (("p", "z"),))] == 1
    assert merged.events[("l", (("p", "__overflow__"),))] == 6 and ("l", (("p", "w"),)) not in merged.events
    assert merged.label_overflow[("l", "p")] == 6
    assert merged.lost == {0: 2}


def test_regroup_moves_definitions_to_a_scratch_group() -> None:
    _, ps = build("probes:\n  - {name: a, uprobe: '/x:0x10', latency: true}\n"
                  "  - {name: t, tracepoint: sched/sched_switch}\n")
    moved = reload.regroup(ps.events, "kpe_t_unit", "kpe_reload_1")
    assert [e.definition for e in moved] == ["p:kpe_reload_1/a /x:0x10", "r:kpe_reload_1/a_ret /x:0x10 ret=$retval",
                                             None]


def test_plan_keeps_a_container_bound_uprobe_across_a_new_pid() -> None:
    """The probe set of a restarted container differs in the PID it went through only: kept (counts carry);
    the file identity decides whether it is defined again. Another function is another probe."""
    t = "probes:\n  - {name: a, uprobe: '/proc/%d/root/bin/app:%s', latency: true}\n"
    old_cfg, old = build(t % (123, "compute"))
    new_cfg, new = build(t % (4567, "compute"))
    p = reload.plan(old_cfg, old, new_cfg, new, {})
    assert p.keep == {"a", "a_ret"} and p.keep_pairs == {"a"} and not p.remove and not p.add
    other_cfg, other = build(t % (4567, "other"))
    assert reload.plan(old_cfg, old, other_cfg, other, {}).keep == set()
