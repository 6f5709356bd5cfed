"""Debian's 6.12 (kernel lab) output of the probe kinds it adds, replayed through today's parser and raw decoder.

tests/fixtures/linux-6.12-debian (tests/make_612_fixtures.py) holds, per scenario, the pages of one instance
(raw/NAME/cpuN.raw, with the format files) with that instance's `trace` text, and the trace_pipe of two more
instances with the agent's options (irq-info off; record-tgid off and on) that traced the same events; also
every line of a definition corpus as the kernel listed it back or refused it (definitions.json, error_log.txt).

Each event is of the kind its definition line makes (kinds.py: fprobe, fretprobe, tprobe, eprobe, kretprobe for
`SYM%return`), with the argument names the kernel gave them (its format file); an eprobe's print fmt has no
`(ip)`: its text prints `(SYSTEM.EVENT)` there.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import raw_reference
from kprobe_exporter import kernel, parser, tracefs
from kprobe_exporter.kinds import parse_definition
from kprobe_exporter.probes import ArgSpec, EventSpec, ProbeSet
from kprobe_exporter.raw import args as raw_args
from kprobe_exporter.raw import formats as raw_formats
from kprobe_exporter.raw import pages as raw_pages

K612 = Path(__file__).resolve().parents[1] / "fixtures" / "linux-6.12-debian"
RAW = K612 / "raw"
SCENARIOS = sorted(p.name for p in RAW.iterdir() if (p / "meta.json").exists())
DECODED = SCENARIOS
TEXT_FILES = [(s, f.name) for s in SCENARIOS for f in sorted((RAW / s).glob("*trace*"))]


@dataclass
class Scenario:
    path: Path
    meta: dict[str, object]
    probes: ProbeSet
    formats: list[raw_formats.EventFormat]


def event_spec(line: str, fmt: raw_formats.EventFormat) -> EventSpec:
    """An event of a definition line, of the kind the line makes, with the args the kernel named in its format."""
    d = parse_definition(line)
    assert d is not None and d.kind is not None and d.event is not None
    args = tuple(ArgSpec(f.name, "", f.data_loc) for f in fmt.own_fields if not f.name.startswith("__probe"))
    return EventSpec(d.event, d.kind.key, "kpe612", d.target, d.target, line, args, key=d.event.encode() + b":")


def load(name: str) -> Scenario:
    path = RAW / name
    meta = json.loads((path / "meta.json").read_text())
    events, formats = [], []
    for _, line in meta["scenario"]["definitions"]:
        ev_name = line.split()[0].split("/")[1]
        fmt = raw_formats.parse_format((path / "events" / "kpe612" / ev_name / "format").read_text())
        events.append(event_spec(line, fmt))
        formats.append(fmt)
    return Scenario(path, meta, ProbeSet("kpe612", tuple(events), ()), formats)


def lines_of(path: Path) -> list[parser.TraceLine]:
    raw = path.read_bytes().split(b"\n")
    return [parser.parse_line(x) for x in raw if x and not x.startswith(b"#")]


def usec(ts_ns: int) -> int:
    return (ts_ns + 500) // 1000


def after_ip(body: bytes) -> bytes:
    return body[body.find(b")") + 1 :]


def by_token(lines: list[parser.TraceLine], name: str) -> list[parser.TraceLine]:
    return [t for t in lines if t.token == name.encode() + b":"]


def assert_exits_follow_entries(lines: list[parser.TraceLine], entry: str, exit_: str) -> None:
    """Every exit comes after an entry on its thread not yet exited (the capture's last opens, of tracing_on
    files, have their entry only: they return after the stop)."""
    pending: Counter[int] = Counter()
    for t in lines:
        if t.token == entry.encode() + b":":
            pending[t.tid] += 1
        elif t.token == exit_.encode() + b":":
            assert pending[t.tid] > 0, t
            pending[t.tid] -= 1
    assert sum(pending.values()) <= 6


def test_every_scenario_and_text_file_is_there() -> None:
    assert SCENARIOS == ["eprobe", "eprobe-record-tgid", "fault", "fprobe", "kprobe-return-btf", "tprobe"]
    assert all(json.loads((RAW / s / "meta.json").read_text())["release"].startswith("6.12.") for s in SCENARIOS)
    assert len(TEXT_FILES) == 6 + 4 * 2  # trace.txt each; two trace_pipes where several instances record


@pytest.mark.parametrize(("scenario", "name"), TEXT_FILES, ids=[f"{s}/{n}" for s, n in TEXT_FILES])
def test_every_text_line_parses(scenario: str, name: str) -> None:
    sc = load(scenario)
    lines = lines_of(sc.path / name)
    assert lines
    assert {t.token for t in lines} == {ev.key for ev in sc.probes.events}
    tgid = name == "kpe_tgid.trace_pipe" or "record-tgid" in scenario
    assert all((t.tgid != -1) == tgid for t in lines)
    if tgid:  # single-threaded workloads: each thread is its process
        assert all(t.tgid == t.tid for t in lines)


@pytest.mark.parametrize("scenario", DECODED)
def test_raw_pages_decode_to_the_kernels_text(scenario: str) -> None:
    sc = load(scenario)
    events = raw_args.RawEvents(sc.probes, sc.formats, kernel.version(str(sc.meta["release"])))
    assert events.decode_errors == {}
    layout = raw_formats.parse_header_page((sc.path / "header_page").read_text())
    pages = [f.read_bytes() for f in sorted(sc.path.glob("cpu*.raw"))]
    runs, off = [], 0
    for f, data in zip(sorted(sc.path.glob("cpu*.raw")), pages, strict=True):
        runs.append((int(f.stem[3:]), off, len(data) // layout.page_size))
        off += len(data)
    batch = raw_pages.batch_from_pages(b"".join(pages), runs, layout, events.lut)
    idx = np.flatnonzero(batch.ev >= 0)
    text = lines_of(sc.path / "trace.txt")
    assert len(idx) == len(text) > 0 and not np.any(batch.ev == raw_pages.EV_UNKNOWN)
    for i, t in zip(idx.tolist(), text, strict=True):
        e = int(batch.ev[i])
        ev = sc.probes.events[e]
        body = raw_reference.make_renderer(ev, sc.formats[e], events.kernel)(batch.record(i))
        assert (int(batch.tid[i]), int(batch.cpu[i]), usec(int(batch.ts[i])) * 1000) == (t.tid, t.cpu, t.ts_ns)
        assert body.split(b" (")[0] == t.body.split(b" (")[0] and after_ip(body) == after_ip(t.body), t
        assert parser.arg_reader(ev)(body) == parser.arg_reader(ev)(t.body)
        # the args the raw path decodes from the record's fields, without any text
        assert events.args(e, batch.record(i)) == parser.arg_reader(ev)(t.body)
        if ev.is_return:
            assert parser.retval_of(ev, body) == parser.retval_of(ev, t.body)


def test_fprobe_entries_and_exits_with_btf_args_and_typed_retval() -> None:
    sc = load("fprobe")
    lines = lines_of(sc.path / "kpe_text.trace_pipe")
    read = {ev.name: parser.arg_reader(ev) for ev in sc.probes.events}
    opens = by_token(lines, "open")
    # `$arg*` expands to do_sys_openat2's parameter names; dfd is an int (signed), the pointers hex
    assert [a.name for a in sc.probes.event("open").args] == ["dfd", "filename", "how"]
    assert all(t.body.startswith(b"open: (do_sys_openat2+0x0/0xe0) dfd=") for t in opens)
    assert {read["open"](t.body)["dfd"] for t in opens} == {b"-100"}
    assert all(read["open"](t.body)["filename"].startswith(b"0x") for t in opens)
    # an fprobe's entry on vfs_read is past its endbr64: vfs_read+0x4
    assert all(t.body.startswith(b"read: (vfs_read+0x4/0x370) count=") for t in by_token(lines, "read"))
    # member access how->flags and a user string on the same entry
    paths = [read["open_path"](t.body) for t in by_token(lines, "open_path")]
    assert sum(p["path"] == b"/nonexistent/x" for p in paths) == 3
    assert sum(p["path"] == b"/etc/hostname" for p in paths) >= 12
    assert all(p["flags"].startswith(b"0x") for p in paths)
    # exits: (caller <- function), $retval typed by BTF (long: signed decimal, not hex)
    rets = by_token(lines, "open_ret")
    assert all(b" <- do_sys_openat2) ret=" in t.body for t in rets)
    assert_exits_follow_entries(lines, "open", "open_ret")
    assert_exits_follow_entries(lines, "read", "read_ret")
    ret_ev = sc.probes.event("open_ret")
    # each failing open's exit on its thread says -ENOENT
    for t in lines:
        if t.token == b"open_path:" and read["open_path"](t.body)["path"] == b"/nonexistent/x":
            nxt = next(r for r in rets if r.tid == t.tid and r.ts_ns >= t.ts_ns)
            assert parser.retval_of(ret_ev, nxt.body) == b"-2"
    assert b"3" in {parser.retval_of(ret_ev, t.body) for t in rets}


def test_kprobe_return_forms_and_btf_names() -> None:
    sc = load("kprobe-return-btf")
    lines = lines_of(sc.path / "kpe_text.trace_pipe")
    counts = Counter(t.token for t in lines)
    # `SYM%return` and `r:` on the same function both fire per call; one prints the unknown caller
    assert counts[b"open_r:"] > 0 and counts[b"open_ret:"] > 0 and counts[b"read_ret:"] > 0
    for entry, exit_ in (("open", "open_ret"), ("open", "open_r"), ("read", "read_ret")):
        assert_exits_follow_entries(lines, entry, exit_)
    assert any(b"([unknown/kretprobe'd] <- do_sys_openat2)" in t.body for t in lines)
    ret_ev = sc.probes.event("open_r")
    assert {parser.retval_of(ret_ev, t.body) for t in by_token(lines, "open_r")} >= {b"3", b"-2"}
    # BTF names on a kprobe: `dfd filename` named by the kernel, a named member access
    assert [a.name for a in sc.probes.event("open").args] == ["dfd", "filename", "fl"]
    opened = [parser.arg_reader(sc.probes.event("open"))(t.body) for t in by_token(lines, "open")]
    assert {o["dfd"] for o in opened} == {b"-100"} and all(o["fl"].startswith(b"0x") for o in opened)


def test_strings_that_fault() -> None:
    sc = load("fault")
    lines = lines_of(sc.path / "kpe_text.trace_pipe")
    reads = [parser.arg_reader(sc.probes.event("read_buf"))(t.body) for t in by_token(lines, "read_buf")]
    # `string` of vfs_read's __user buf reads user memory (BTF knows it is __user): its old bytes, quoted, or
    # (fault) unquoted where the page is not in
    values = Counter(r["s"] for r in reads)
    assert values[b"(fault)"] > 0 and len(values) > 2
    assert all(r["s"] == b"(fault)" for t, r in zip(by_token(lines, "read_buf"), reads, strict=True)
               if b" s=(fault) " in t.body)
    assert {r["n"] for r in reads} >= {b"4"}  # busybox dd bs=4
    # and on do_sys_openat2 `string` of the __user filename reads it, like ustring
    opened = [parser.arg_reader(sc.probes.event("open_bad"))(t.body) for t in by_token(lines, "open_bad")]
    assert opened and all(o["bad"] == o["ok"] for o in opened)
    assert sum(o["ok"] == b"/nonexistent/x" for o in opened) == 3


def test_tprobe_fork_and_exit() -> None:
    sc = load("tprobe")
    lines = lines_of(sc.path / "kpe_text.trace_pipe")
    forks = [parser.arg_reader(sc.probes.event("fork"))(t.body) for t in by_token(lines, "fork")]
    assert forks and all(t.body.startswith(b"fork: (__probestub_sched_process_fork+0x4/0x10) arg1=")
                         for t in by_token(lines, "fork"))
    exits = {t.tid for t in by_token(lines, "exit")}
    children = {int(f["child"]) for f in forks}
    assert exits & children  # the /bin/true children exit, as the forks named them
    parents = {t.tid: int(f["arg1"]) for t, f in zip(by_token(lines, "fork"), forks, strict=True)}
    assert all(tid == parent for tid, parent in parents.items())  # parent->pid is the forking thread


@pytest.mark.parametrize("scenario", ["eprobe", "eprobe-record-tgid"])
def test_eprobe_text(scenario: str) -> None:
    sc = load(scenario)
    lines = lines_of(sc.path / "trace.txt")
    ev = sc.probes.event("eopen")
    opened = [parser.arg_reader(ev)(t.body) for t in by_token(lines, "eopen")]
    assert all(t.body.startswith(b"eopen: (syscalls.sys_enter_openat) fn=") for t in by_token(lines, "eopen"))
    assert {o["dfd"] for o in opened} == {b"0xffffff9c"}  # AT_FDCWD in the eprobe's default x64
    # 6.12.95: `+0($filename):ustring` faults on every sys_enter_openat, where a kprobe reads the same pointer
    assert opened and {o["fn"] for o in opened} == {b"(fault)"}
    assert {o["flags"] for o in opened} >= {b"0x80000", b"0x0"}
    rets = [parser.retval_of(sc.probes.event("eopen_ret"), t.body) for t in by_token(lines, "eopen_ret")]
    assert b"0x3" in rets
    assert_exits_follow_entries(lines, "eopen", "eopen_ret")


# --- the definition corpus: what 6.12 accepts, how it lists it back, what it says when it refuses ----------

CORPUS = json.loads((K612 / "definitions.json").read_text())
ENTRIES = tracefs.error_log_entries((K612 / "error_log.txt").read_text())


def listed(line: str) -> list[str]:
    return next(a["listed"] for a in CORPUS if a["line"] == line)


def test_the_corpus_answers() -> None:
    refused = [a for a in CORPUS if not a["accepted"]]
    assert len(CORPUS) == 72 and len(refused) == len(ENTRIES) == 21
    for a, entry in zip(refused, ENTRIES, strict=True):
        assert entry.splitlines()[1] == "  Command: " + a["line"]  # one entry per refused line, in order
    assert listed("p:kpe612c/e vfs_read%return ret=$retval") == ["r10:kpe612c/e vfs_read ret=$retval"]
    assert listed("f:kpe612c/e vfs_read $retval") == ["f:kpe612c/e vfs_read%return arg1=$retval"]
    assert listed("f:kpe612c/e do_sys_openat2 dfd filename how->flags:x64") == [
        "f:kpe612c/e do_sys_openat2 dfd=dfd filename=filename arg3=how->flags:x64"
    ]
    assert listed("e:kpe612c/e syscalls/sys_enter_openat") == ["e:kpe612c/e syscalls.sys_enter_openat"]


REASONS = {  # the refused line's event: what the agent shows the user (tracefs.kernel_reason)
    "f:kpe612c/e __x64_sys_getppid": "trace_fprobe: error: Failed to register probe event (at '__x64_sys_getppid')",
    "f:kpe612c/e vfs_read nosuch": "trace_fprobe: error: This variable is not found at this probe point (at 'nosuch')",
    "f:kpe612c/e vfs_read file->nosuch": "trace_fprobe: error: This field is not found. (at 'nosuch')",
    "e:kpe612c/e syscalls.nosuch_kpe": "event_probe: error: Attached event does not exist (at 'syscalls.nosuch_kpe')",
    "p:kpe612c/e vfs_read $retval": "trace_kprobe: error: $retval is not available on probe (at '$retval')",
    "p:kpe612c/e /opt/kprobe-lab/bin/busybox:0x1000 count":
        "trace_uprobe: error: BTF is not available or not supported (at 'count')",
}


@pytest.mark.parametrize("line", sorted(REASONS))
def test_error_log_reason(line: str) -> None:
    entry = next(e for e in ENTRIES if e.splitlines()[1] == "  Command: " + line)
    assert tracefs.kernel_reason(entry) == REASONS[line]


def test_the_agent_refuses_before_the_kernel_nothing_6_12_took() -> None:
    """Every line 6.12 accepted goes through the agent's config and probe checks to the kernel, and the args
    the agent will read are named as 6.12 listed them where the line leaves the naming to the kernel."""
    from kprobe_exporter import config, probes

    for a in CORPUS:
        if not a["accepted"]:
            continue
        ev = probes.build_probe_set(config.load_text(json.dumps({"probes": [{"raw": a["line"]}]})),
                                    resolve=None).events[0]
        d, kernel = parse_definition(a["line"]), parse_definition(a["listed"][0])
        assert d is not None and kernel is not None and kernel.kind is not None
        assert ev.kind == kernel.kind.key, (a["line"], a["listed"])
        if any(t.startswith("$arg") for t in d.fetchargs):  # named after parameters only the kernel knows
            assert ev.args == ()
            continue
        listed = [t.partition("=")[0] for t in kernel.fetchargs]
        for i, (tok, arg) in enumerate(zip(d.fetchargs, ev.args, strict=True)):
            if "=" not in tok:  # the agent writes a named arg as it is; it names the others as the kernel does
                assert arg.name == listed[i], (a["line"], a["listed"], arg)


def _replay(scenario: str, text: str, extra: str = "") -> tuple[object, Counter[str]]:
    """The agent's own config, text reader and aggregate over a scenario's text, and its raw pages' counts."""
    from kprobe_exporter import agent, config, probes
    from kprobe_exporter.text import TextSource

    sc = load(scenario)
    lines = "".join(f"  - raw: '{line}'\n" for _, line in sc.meta["scenario"]["definitions"])  # type: ignore
    cfg = config.load_text(f"instance: kpe612\nprobes:\n{lines}{extra}")
    ps = probes.build_probe_set(cfg, resolve=None)
    agg = agent.make_aggregate(cfg, ps)
    source = TextSource(ps)
    for batch in source.batches((sc.path / text).read_bytes()):
        agg.feed(batch)
    # the records of the same instance's binary pages, counted per event by their ids (no text involved)
    formats = {f.id: f.name for f in sc.formats}
    layout = raw_formats.parse_header_page((sc.path / "header_page").read_text())
    events = raw_args.RawEvents(sc.probes, sc.formats, kernel.version(str(sc.meta["release"])))
    files = sorted(sc.path.glob("cpu*.raw"))
    runs, off, data = [], 0, b""
    for f in files:
        page = f.read_bytes()
        runs.append((int(f.stem[3:]), off, len(page) // layout.page_size))
        off, data = off + len(page), data + page
    batch = raw_pages.batch_from_pages(data, runs, layout, events.lut)
    raw_counts = Counter(sc.probes.events[int(e)].name for e in batch.ev if e >= 0)
    assert set(formats.values()) >= set(raw_counts)
    return agg.snapshot(), raw_counts


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_agent_counts_each_new_kind_as_its_raw_records(scenario: str) -> None:
    """`raw:` lines of every kind through the agent's text reader and aggregate: each event counted exactly
    as many times as the same instance's binary pages hold its records."""
    snap, raw_counts = _replay(scenario, "trace.txt")
    counted = {name: n for (name, labels), n in snap.events.items()}  # type: ignore[attr-defined]
    assert counted == dict(raw_counts) and sum(raw_counts.values()) > 0
    assert not any(snap.parse_errors.values())  # type: ignore[attr-defined]


def test_fprobe_latency_pairs_and_string_labels_from_the_text() -> None:
    """fprobe entry and %return exit paired per thread; a label from a BTF-fed user string."""
    snap, raw_counts = _replay("fprobe", "kpe_text.trace_pipe",
                               "pairs:\n  - {name: openat2, entry: open, exit: open_ret}\n")
    pair = snap.pairs["openat2"]  # type: ignore[attr-defined]
    # every exit follows its entry on the thread (the last opens, of tracing_on, have their entry only)
    assert pair.count == raw_counts["open_ret"] and pair.unmatched == 0
    assert 0 < raw_counts["open"] - pair.count <= 6
