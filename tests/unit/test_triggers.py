"""Trigger plans: names owned by the group, unique per pair, removal in reverse (the kernel lab proves them)."""

from __future__ import annotations

from kprobe_exporter import triggers


def test_every_name_is_the_groups_and_the_pairs() -> None:
    a = triggers.latency_plan("kpe", "open", "open_ret", "open")
    b = triggers.latency_plan("kpe", "read", "read_ret", "read")
    assert [s.name for s in a.synthetics] == ["kpe_open_lat"]
    assert all(t.event.startswith(("kpe/", "synthetic/kpe_")) for t in a.triggers)
    # a timestamp variable two triggers define would need qualifying: each pair has its own
    assert "open_ts0=" in a.triggers[0].line and "read_ts0=" in b.triggers[0].line
    assert "$open_ts0" in a.triggers[1].line and "onmatch(kpe.open).trace(kpe_open_lat," in a.triggers[1].line


def test_removal_is_the_reverse_of_installation_triggers_before_synthetic_events() -> None:
    plan = triggers.latency_plan("kpe", "open", "open_ret", "open", where='comm == "x"')
    undo = plan.removal()
    assert [line for _, line in undo[:3]] == ["!" + t.line for t in reversed(plan.triggers)]
    assert undo[3] == (triggers.SYNTHETIC_EVENTS, "!kpe_open_lat")
    assert all(t.line.endswith(' if comm == "x"') for t in plan.triggers[:2])  # a filter ends the line


def test_a_count_without_labels_has_a_bounded_key() -> None:
    assert "keys=common_cpu:" in triggers.count_trigger("kpe/open").line
    assert "keys=path,comm:" in triggers.count_trigger("kpe/open", ("path", "comm")).line
