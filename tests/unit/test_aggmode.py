"""Aggregation mode: each probe's mode resolved in one place, from the config and what the kernel has."""

from __future__ import annotations

from pathlib import Path

import pytest

from kprobe_exporter import aggmode, config, probes
from kprobe_exporter.aggmode import KernelSupport
from kprobe_exporter.errors import UserError

FULL = KernelSupport(hist=True, synthetic=True)
NONE = KernelSupport(hist=False, synthetic=False)


def modes(yaml: str, support: KernelSupport = FULL) -> dict[str, aggmode.ProbeMode]:
    cfg = config.load_text(yaml)
    return aggmode.resolve(cfg, probes.build_probe_set(cfg, resolve=None), support)


def refusal(yaml: str, support: KernelSupport = FULL) -> UserError:
    with pytest.raises(UserError) as e:
        modes(yaml, support)
    assert e.value.field == "aggregation"
    return e.value


OPEN = "  - name: open\n    kprobe: do_sys_openat2\n"


def test_auto_takes_the_kernel_where_it_can_and_streams_where_it_has_no_hist_triggers() -> None:
    cfg = f"probes:\n{OPEN}    latency: true\n"
    assert modes(cfg)["open"].mode == "kernel"
    m = modes(cfg, NONE)["open"]
    assert m.mode == "stream" and "CONFIG_HIST_TRIGGERS" in m.reason


def test_kernel_that_cannot_be_honoured_names_probe_field_and_why() -> None:
    e = refusal(f"aggregation: kernel\nprobes:\n{OPEN}", NONE)
    assert e.probe == "open" and "CONFIG_HIST_TRIGGERS" in e.line()
    e = refusal(f"probes:\n{OPEN}    latency: true\n    aggregation: kernel\n", KernelSupport(True, False))
    assert "CONFIG_SYNTH_EVENTS" in e.line()


def test_a_probe_overrides_the_top_level() -> None:
    m = modes(f"aggregation: stream\nprobes:\n{OPEN}    aggregation: kernel\n"
              "  - name: other\n    kprobe: vfs_read\n")
    assert (m["open"].mode, m["other"].mode, m["other"].reason) == ("kernel", "stream", "configured")


def test_recursive_latency_streams_under_auto_and_is_refused_under_kernel() -> None:
    m = modes(f"probes:\n{OPEN}    latency: true\n    recursive: true\n")["open"]
    assert m.mode == "stream" and "nested" in m.reason
    refusal(f"probes:\n{OPEN}    latency: true\n    recursive: true\n    aggregation: kernel\n")
    assert modes(f"probes:\n{OPEN}    recursive: true\n")["open"].mode == "kernel"  # counts alone are exact


def test_labels_become_hist_keys_that_print_as_the_trace_does() -> None:
    m = modes(f"probes:\n{OPEN}    args: {{flags: '%dx:x32', n: '%si:s32', path: '+0(%si):ustring'}}\n"
              "    labels: [comm, flags, n]\n")["open"]
    assert [(k.label, k.field, k.fmt, k.bits) for k in m.keys] == [
        ("comm", probes.COMM_ARG, "str", 64), ("flags", "flags", "x", 32), ("n", "n", "s", 32)]
    comm, flags, n = m.keys
    assert flags.value("577") == "0x241" and n.value("4294967295") == "-1" and n.value("18446744073709551615") == "-1"
    assert comm.value("kpe_opener") == "kpe_opener"
    untyped = modes(f"probes:\n{OPEN}    args: {{fd: '%di'}}\n    labels: [fd]\n")["open"].keys[0]
    assert (untyped.fmt, untyped.bits, untyped.value("16")) == ("x", 64, "0x10")  # the kernel's default type


@pytest.mark.parametrize("labels,why", [
    ("[container_id]", "user space"),
    ("[a, b, c, d]", "TRACING_MAP_KEYS_MAX"),
    ("[comm, path]", "one string"),
    ("[sym]", "type 'symbol'"),
])
def test_labels_the_kernel_cannot_key_stream_under_auto(labels: str, why: str) -> None:
    args = "{a: '%di:u8', b: '%si:u8', c: '%dx:u8', d: '%cx:u8', path: '+0(%si):string', sym: '%ip:symbol'}"
    cfg = f"probes:\n{OPEN}    args: {args}\n    labels: {labels}\n"
    m = modes(cfg)["open"]
    assert m.mode == "stream" and why in m.reason, m.reason
    assert why in refusal(cfg.replace("probes:\n", "aggregation: kernel\nprobes:\n")).line()


def test_tracepoints_count_in_the_kernel_but_their_labels_stream() -> None:
    tp = "  - name: openat\n    tracepoint: syscalls/sys_enter_openat\n    latency: true\n"
    m = modes(f"probes:\n{tp}")["openat"]
    assert m.mode == "kernel" and m.exit is not None and m.exit.target == "syscalls/sys_exit_openat"
    assert modes(f"probes:\n{tp}    labels: [dfd]\n")["openat"].mode == "stream"


def test_explicit_pairs_stream() -> None:
    cfg = (f"probes:\n{OPEN}  - name: ret\n    kretprobe: do_sys_openat2\n"
           "pairs:\n  - name: p\n    entry: open\n    exit: ret\n")
    assert {m.mode for m in modes(cfg).values()} == {"stream"}


def test_the_stream_set_leaves_kernel_probes_out() -> None:
    cfg = config.load_text(f"probes:\n{OPEN}    latency: true\n  - name: r\n    kprobe: vfs_read\n"
                           "    aggregation: stream\n    latency: true\n")
    ps = probes.build_probe_set(cfg, resolve=None)
    m = aggmode.resolve(cfg, ps, FULL)
    stream = aggmode.streamed(ps, m)
    assert [e.name for e in stream.events] == ["r", "r_ret"] and [p.name for p in stream.pairs] == ["r"]
    assert [e.name for e in aggmode.kernel_events(m)] == ["open", "open_ret"]


def test_support_is_found_by_files(tmp_path: Path) -> None:
    (tmp_path / "events" / "g" / "e").mkdir(parents=True)
    (tmp_path / "events" / "g" / "e" / "trigger").touch()
    assert KernelSupport.detect(tmp_path) == NONE  # a trigger file alone: no hist triggers
    (tmp_path / "events" / "g" / "e" / "hist").touch()
    (tmp_path / "synthetic_events").touch()
    assert KernelSupport.detect(tmp_path) == FULL
    real = Path("/sys/kernel/tracing")
    if (real / "events").is_dir():  # this host: the answer its own files give
        sample = next(p for p in (real / "events").glob("*/*") if p.is_dir())
        assert KernelSupport.detect(real).hist == (sample / "hist").exists()


SPANS = "    latency: true\n    spans: {min_duration: 5ms}\n"


def test_spans_in_kernel_mode_stream_only_the_slow_calls_synthetic_event() -> None:
    cfg = config.load_text(f"aggregation: kernel\nprobes:\n{OPEN}{SPANS}")
    ps = probes.build_probe_set(cfg, resolve=None)
    m = aggmode.resolve(cfg, ps, FULL)
    assert m["open"].mode == "kernel"
    stream = aggmode.streamed(ps, m)
    (ks,) = stream.kernel_spans
    assert ks.pair.name == "open" and ks.event in stream.events and not ks.event.counted
    assert ks.event.key == f"{ps.group}_open_lat:".encode()
    assert [a.name for a in ks.event.args] == ["lat", "ts0", "pid", "ret"]  # a kretprobe records ret
    assert [e.name for e in stream.events] == [ks.event.name]  # the probe's own events stay in the kernel


def test_auto_streams_spans_that_would_lose_the_entrys_args() -> None:
    m = modes(f"probes:\n{OPEN}    args: {{dfd: '%di:s32'}}\n{SPANS}")["open"]
    assert m.mode == "stream" and "args" in m.reason
    assert modes(f"probes:\n{OPEN}{SPANS}")["open"].mode == "kernel"


def test_kernel_mode_spans_are_had_with_either_reader() -> None:
    """The raw reader decodes the synthetic event (raw/args.synthetic_decoder; the lab proves both readers)."""
    for reader in ("text", "raw"):
        assert modes(f"reader: {reader}\nprobes:\n{OPEN}{SPANS}")["open"].mode == "kernel"
