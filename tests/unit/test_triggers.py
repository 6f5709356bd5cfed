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


def test_spans_stream_the_synthetic_event_behind_a_duration_filter() -> None:
    plan = triggers.latency_plan("kpe", "open", "open_ret", "open", span_min_ns=5_000_000)
    assert plan.synthetics[0].line == "kpe_open_lat u64 lat; u64 ts0; int pid"
    # the entry's timestamp rides along: the kernel (6.1, tests/fixtures/linux-6.1-debian/kernel-spans)
    # accepts $open_ts0 both in the latency and as a trace() argument
    assert ".trace(kpe_open_lat,$open_lat,$open_ts0,common_pid)" in plan.triggers[1].line
    (st,) = plan.streams
    assert (st.path("filter"), st.filter) == ("events/synthetic/kpe_open_lat/filter", "lat >= 5000000")
    # disabled first (an enabled synthetic event is busy), then triggers, then the definition
    assert plan.removal()[0] == ("events/synthetic/kpe_open_lat/enable", "0")
    assert plan.removal()[-1] == (triggers.SYNTHETIC_EVENTS, "!kpe_open_lat")
    plain = triggers.latency_plan("kpe", "open", "open_ret", "open")
    # without spans one field: each is work at every return (bench/README: 6.12's 85 -> 36 µs a call)
    assert plain.streams == () and plain.synthetics[0].line == "kpe_open_lat u64 lat"
    assert ".trace(kpe_open_lat,$open_lat)" in plain.triggers[1].line
    assert plain.threads == plain.triggers[:2]  # the tables keyed by thread: entry, then return
    ret = triggers.latency_plan("kpe", "open", "open_ret", "open", span_min_ns=1, span_ret=True)
    assert ret.synthetics[0].line == "kpe_open_lat u64 lat; u64 ts0; int pid; u64 ret"
    assert ".trace(kpe_open_lat,$open_lat,$open_ts0,common_pid,ret)" in ret.triggers[1].line
