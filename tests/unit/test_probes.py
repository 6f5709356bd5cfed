"""Probes: definition lines for every kind, the original notes' raw lines, fetcharg checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from kprobe_exporter import config, probes
from kprobe_exporter.errors import UserError


def build(text: str, resolve: probes.Resolver | None = None) -> probes.ProbeSet:
    return probes.build_probe_set(config.load_text(text, "c.yaml"), "c.yaml", resolve=resolve)


def defs(ps: probes.ProbeSet) -> list[str | None]:
    return [e.definition for e in ps.events]


def test_kprobe_with_latency_makes_entry_and_return() -> None:
    ps = build("""
probes:
  - name: open
    kprobe: do_sys_openat2
    args: {dfd: "$arg1:s32", path: "+0($arg2):ustring"}
    latency: true
""")
    assert defs(ps) == [
        "p:kprobe_exporter/open do_sys_openat2 dfd=$arg1:s32 path=+0($arg2):ustring",
        "r:kprobe_exporter/open_ret do_sys_openat2 ret=$retval",
    ]
    assert [(p.name, p.entry, p.exit, p.function) for p in ps.pairs] == [("open", "open", "open_ret", "do_sys_openat2")]
    assert [e.counted for e in ps.events] == [True, False]


def test_original_notes_raw_lines_verbatim_go_into_our_group() -> None:
    ps = build("""
instance: mygrp
probes:
  - raw: 'p:myprobe do_sys_open dfd=%ax filename=%dx flags=%cx mode=+4($stack)'
  - raw: 'r:myretprobe do_sys_open $retval'
  - raw: 'r:getname_probe getname +0($retval):string'
""")
    assert defs(ps) == [
        "p:mygrp/myprobe do_sys_open dfd=%ax filename=%dx flags=%cx mode=+4($stack)",
        "r:mygrp/myretprobe do_sys_open arg1=$retval",
        "r:mygrp/getname_probe getname arg1=+0($retval):string",
    ]
    assert [e.kind for e in ps.events] == ["kprobe", "kretprobe", "kretprobe"]


def test_raw_line_group_is_replaced_and_maxactive_kept() -> None:
    ps = build("probes:\n  - raw: 'r10:othergrp/ev do_sys_openat2 $retval'\n")
    assert defs(ps) == ["r10:kprobe_exporter/ev do_sys_openat2 arg1=$retval"]


def test_uprobe_symbol_resolved_and_offset_kept(tmp_path: Path) -> None:
    ps = build(
        """
probes:
  - {name: a, uprobe: "/bin/x:compute", latency: true}
  - {name: b, uretprobe: "/bin/x:0x1139"}
""",
        resolve=lambda path, sym: 0x1234,
    )
    assert defs(ps) == [
        "p:kprobe_exporter/a /bin/x:0x1234",
        "r:kprobe_exporter/a_ret /bin/x:0x1234 ret=$retval",
        "r:kprobe_exporter/b /bin/x:0x1139",
    ]


def test_syscall_tracepoints_print_keys_told_apart() -> None:
    ps = build("probes:\n  - {name: openat, tracepoint: syscalls/sys_enter_openat, latency: true}\n")
    assert [(e.kind, e.target, e.key) for e in ps.events] == [
        ("tracepoint", "syscalls/sys_enter_openat", b"sys_openat("),
        ("tracepoint", "syscalls/sys_exit_openat", b"sys_openat "),
    ]
    assert defs(ps) == [None, None]


@pytest.mark.parametrize(
    ("probe", "field", "needle"),
    [
        ("{name: a, kprobe: f, args: {x: '+0(%di'}}", "args.x", "unbalanced parentheses"),
        ("{name: a, kprobe: f, args: {x: '%di#x'}}", "args.x", "must not contain '#'"),
        ("{name: a, tprobe: sched_switch, latency: true}", "latency", "a tprobe has no return event"),
        ("{name: a, fretprobe: f, latency: true}", "latency", "a fretprobe is already the return"),
        ("{name: a, kprobe: f, labels: [y]}", "labels", "not an arg of this probe"),
        ("{name: a, kretprobe: f, latency: true}", "latency", "already the return"),
        ("{name: a, tracepoint: sched/sched_switch, latency: true}", "latency", "no matching return event"),
        ("{name: a, tracepoint: nogroup}", "tracepoint", "not GROUP/EVENT"),
        ("{name: a, kprobe: 'f+4', latency: true}", "latency", "function entry"),
        ("{name: a, uprobe: 'rel/path:sym'}", "uprobe", "absolute path"),
        ("{name: a, kprobe: f, spans: {sample_ratio: 1}}", "spans", "latency"),
        ("{raw: 'p do_sys_open'}", "raw", "needs an event name"),
        ("{name: a, kprobe: f, container: web}", "container", "is for uprobes"),
        ("{name: a, tracepoint: sched/sched_switch, cgroup: 'x'}", "cgroup", "is for uprobes"),
        ("{raw: 'p:a /bin/x:0x1', container: web}", "container", "not a raw line"),
        ("{name: a, uprobe: '/bin/x:0x1', cgroup: '(x'}", "cgroup", "not a regular expression"),
    ],
)
def test_probe_mistakes_name_probe_and_field(probe: str, field: str, needle: str) -> None:
    with pytest.raises(UserError) as e:
        build(f"probes:\n  - {probe}\n")
    msg = e.value.line()
    assert msg.startswith("c.yaml: probe ") and f"field {field!r}" in msg and needle in msg, msg
    assert "\n" not in msg


def test_duplicates_and_pairs() -> None:
    with pytest.raises(UserError, match="duplicate name"):
        build("probes:\n  - {name: a, kprobe: f}\n  - {name: a, kprobe: g}\n")
    with pytest.raises(UserError, match="duplicate name"):  # the generated a_ret collides
        build("probes:\n  - {name: a, kprobe: f, latency: true}\n  - {name: a_ret, kprobe: g}\n")
    with pytest.raises(UserError, match=r"pair 'p', field 'exit': names unknown event 'nope'"):
        build("probes:\n  - {name: a, kprobe: f}\npairs:\n  - {name: p, entry: a, exit: nope}\n")
    ps = build(
        "probes:\n  - {name: a, kprobe: f}\n  - {name: b, kretprobe: f}\npairs:\n  - {name: p, entry: a, exit: b}\n"
    )
    assert [(p.name, p.entry, p.exit) for p in ps.pairs] == [("p", "a", "b")]


def test_too_many_args() -> None:
    args = ", ".join(f"a{i}: '%di'" for i in range(129))
    with pytest.raises(UserError, match="at most 128"):
        build(f"probes:\n  - {{name: a, kprobe: f, args: {{{args}}}}}\n")


def test_return_suffix_makes_a_return_probe_that_takes_retval() -> None:
    """Issue 13: `p:... SYM%return` (Linux 5.10+) is a return probe; config used to refuse its $retval."""
    ps = build("probes:\n  - raw: 'p:vread_ret vfs_read%return ret=$retval:s64'\n"
               "  - raw: 'p:u_ret /bin/x:compute%return $retval'\n"
               "  - raw: 'r:r_ret vfs_read%return'\n", resolve=lambda path, sym: 0x1234)
    assert defs(ps) == ["p:kprobe_exporter/vread_ret vfs_read%return ret=$retval:s64",
                        "p:kprobe_exporter/u_ret /bin/x:0x1234%return arg1=$retval",
                        "r:kprobe_exporter/r_ret vfs_read%return"]
    assert [(e.kind, e.target, e.function, e.is_return) for e in ps.events] == [
        ("kretprobe", "vfs_read", "vfs_read", True), ("uretprobe", "/bin/x:0x1234", "compute", True),
        ("kretprobe", "vfs_read", "vfs_read", True)]
    with pytest.raises(UserError, match="field 'latency': a kretprobe is already the return"):
        build("probes:\n  - {raw: 'p:v vfs_read%return', latency: true}\n")
    # no suffix: an entry probe still, and $retval there is the kernel's to refuse (in its words, at install)
    assert defs(build("probes:\n  - raw: 'p:v vfs_read ret=$retval'\n")) == ["p:kprobe_exporter/v vfs_read ret=$retval"]


@pytest.mark.parametrize("fetch", [
    "%nosuch", "%di:u33", "$bogus", "$retval", "%di:symbol", "+0($arg2):char", "$current", "file->f_flags:x32",
    "$arg*", "count", "\\\"hi\"", "@jiffies", "+0(filename):ustring",
])
def test_the_kernel_judges_every_fetcharg_that_could_parse(fetch: str) -> None:
    """Only what no kernel parses is refused before the kernel: the rest is written as given (issue 13)."""
    for kind in ("kprobe", "uprobe"):
        target = "vfs_read" if kind == "kprobe" else "/bin/x:0x1"
        ps = build(f"probes:\n  - {{name: a, {kind}: '{target}', args: {{x: '{fetch}'}}}}\n")
        assert ps.events[0].definition is not None and ps.events[0].definition.endswith(f" x={fetch}")


def test_new_kinds_in_the_config() -> None:
    ps = build("""
probes:
  - {fprobe: do_sys_openat2, args: {fname: filename, flags: "how->flags:x64"}, latency: true, labels: [fname]}
  - {fretprobe: vfs_read, args: {n: $retval}}
  - {tprobe: sched_switch, args: {prev: prev->pid}}
  - {eprobe: syscalls/sys_enter_openat, args: {dfd: $dfd}}
  - {name: eo2, eprobe: syscalls.sys_enter_openat}
""")
    assert defs(ps) == [
        "f:kprobe_exporter/do_sys_openat2 do_sys_openat2 fname=filename flags=how->flags:x64",
        "f:kprobe_exporter/do_sys_openat2_ret do_sys_openat2%return ret=$retval",
        "f:kprobe_exporter/vfs_read vfs_read%return n=$retval",
        "t:kprobe_exporter/sched_switch sched_switch prev=prev->pid",
        "e:kprobe_exporter/sys_enter_openat syscalls/sys_enter_openat dfd=$dfd",
        "e:kprobe_exporter/eo2 syscalls.sys_enter_openat",
    ]
    assert [(e.kind, e.is_return, e.probe_file) for e in ps.events] == [
        ("fprobe", False, "dynamic_events"), ("fretprobe", True, "dynamic_events"),
        ("fretprobe", True, "dynamic_events"), ("tprobe", False, "dynamic_events"),
        ("eprobe", False, "dynamic_events"), ("eprobe", False, "dynamic_events")]
    assert [(p.entry, p.exit) for p in ps.pairs] == [("do_sys_openat2", "do_sys_openat2_ret")]


@pytest.mark.parametrize(("line", "written", "names", "kind"), [
    # the kernel names a bare BTF arg by itself (`count=count`), other unnamed args argN by position
    ("p:e vfs_read count", "p:kprobe_exporter/e vfs_read count", ["count"], "kprobe"),
    ("f:e vfs_read count:u64 file->f_flags:x32", "f:kprobe_exporter/e vfs_read count:u64 arg2=file->f_flags:x32",
     ["count", "arg2"], "fprobe"),
    ("f:e vfs_read $retval", "f:kprobe_exporter/e vfs_read arg1=$retval", ["arg1"], "fretprobe"),  # 6.12: an exit
    ("f:e vfs_read%return $retval", "f:kprobe_exporter/e vfs_read%return arg1=$retval", ["arg1"], "fretprobe"),
    ("t:e sched_switch prev->pid next=next->pid", "t:kprobe_exporter/e sched_switch arg1=prev->pid next=next->pid",
     ["arg1", "next"], "tprobe"),
    ("e:e syscalls.sys_enter_openat $dfd", "e:kprobe_exporter/e syscalls.sys_enter_openat arg1=$dfd", ["arg1"],
     "eprobe"),
    ("f:e vfs_read $arg* n=count", "f:kprobe_exporter/e vfs_read $arg* n=count", [], "fprobe"),  # names unknown
    # 6.12 names an unnamed $argN after the parameter, and refuses `$arg9` that it takes as `a=$arg9`
    ("p:e vfs_read $arg1 n=count", "p:kprobe_exporter/e vfs_read $arg1 n=count", [], "kprobe"),
    ("f:e vfs_read $arg9", "f:kprobe_exporter/e vfs_read $arg9", [], "fprobe"),
])
def test_raw_lines_name_args_as_the_kernel_lists_them(line: str, written: str, names: list[str], kind: str) -> None:
    ev = build(f"probes:\n  - raw: '{line}'\n").events[0]
    assert (ev.definition, [a.name for a in ev.args], ev.kind) == (written, names, kind)


def test_comm_is_recorded_with_the_event_where_a_comm_label_or_spans_need_it() -> None:
    """The text names a task from the kernel's comm cache at read time (`<...>` once it lost an exited
    task): probes whose comm is used record `$comm` with the event; tracepoints carry what they carry."""
    ps = build("""
probes:
  - {name: by_comm, kprobe: vfs_read, args: {n: "%dx:u64"}, labels: [comm]}
  - {name: spanned, uprobe: "/bin/x:0x10", latency: true, spans: {}}
  - {name: plain, kprobe: vfs_write, latency: true}
  - {raw: "r:raw_by_comm vfs_read $retval", labels: [comm]}
  - {name: tp, tracepoint: sched/sched_process_exec, labels: [comm]}
""")
    assert defs(ps) == [
        "p:kprobe_exporter/by_comm vfs_read n=%dx:u64 __comm=$comm",
        "p:kprobe_exporter/spanned /bin/x:0x10 __comm=$comm",
        "r:kprobe_exporter/spanned_ret /bin/x:0x10 ret=$retval",  # the entry's comm names the span
        "p:kprobe_exporter/plain vfs_write",
        "r:kprobe_exporter/plain_ret vfs_write ret=$retval",
        "r:kprobe_exporter/raw_by_comm vfs_read arg1=$retval __comm=$comm",
        None,
    ]
    assert ps.event("by_comm").args[-1] == probes.ArgSpec(probes.COMM_ARG, "$comm", True)


@pytest.mark.parametrize(
    ("probe", "field", "needle"),
    [
        ("{name: a, uprobe: '/bin/x:f', container: web, cgroup: x}", "cgroup", "not both"),
        ("{name: a, uprobe: '/bin/x:f', cgroup: 'kpe-no-such-cgroup-[0-9]{99}'}", "cgroup", "no process in a cgroup"),
        ("{name: a, uprobe: '/kpe/no/such/file:f', cgroup: '.'}", "cgroup", "no file /kpe/no/such/file inside"),
    ],
)
def test_container_selector_mistakes(probe: str, field: str, needle: str) -> None:
    """Resolved against this host's real /proc (the processes here); the live tier runs real containers."""
    with pytest.raises(UserError) as e:
        build(f"probes:\n  - {probe}\n", resolve=lambda path, sym: 0)
    msg = e.value.line()
    assert f"field {field!r}" in msg and needle in msg, msg


def test_container_selector_left_alone_without_resolution() -> None:
    """Replay resolves nothing: the in-container path stays as written."""
    ps = build("probes:\n  - {name: a, uprobe: '/bin/app:0x10', container: web}\n")
    assert ps.events[0].target == "/bin/app:0x10"
