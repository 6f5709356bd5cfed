"""Kinds: the table walked row by row, and the one parser of definition lines."""

from __future__ import annotations

import pytest

from kprobe_exporter import config, kinds
from kprobe_exporter.kinds import KIND, KINDS, ProbeKind, definition_line, parse_definition

TARGETS = {"tprobe": "sched_switch", "eprobe": "syscalls.sys_enter_openat"}


def sample_target(kind: ProbeKind) -> str:
    return "/usr/bin/true:0x1139" if kind.user else TARGETS.get(kind.key, "vfs_read")


def test_keys_are_unique_and_the_config_takes_each_accepted_one() -> None:
    assert len(KIND) == len(KINDS)
    fields = set(config.ProbeConfig.model_fields)
    for kind in KINDS:
        assert (kind.key in fields) == kind.accepted, kind.key
    assert kinds.CONFIG_KEYS == ("kprobe", "kretprobe", "uprobe", "uretprobe", "tracepoint", "fprobe", "fretprobe",
                                 "tprobe", "eprobe", "raw")


@pytest.mark.parametrize("kind", KINDS, ids=[k.key for k in KINDS])
def test_row_is_consistent(kind: ProbeKind) -> None:
    assert kind.option.startswith("CONFIG_") and kind.since >= (2, 6)
    assert kind.dynamic == bool(kind.letter) == (kind.probe_file is not None)
    assert kind.returns == bool(kind.return_forms)
    assert not (kind.user and kind.symbol)
    if kind.returns:
        assert kind.entry is not None and kind.exit is None
        entry = KIND[kind.entry]
        assert not entry.returns and entry.exit == kind.key and entry.user == kind.user
        assert entry.file == kind.file and entry.option == kind.option
    if kind.exit is not None:
        assert KIND[kind.exit].entry == kind.key
    if kinds.RETURN_SUFFIX in kind.return_forms:
        assert kind.suffix_since is not None and kind.suffix_since >= kind.since
    if kind.accepted and kind.dynamic:
        assert kind.file in kinds.PROBE_FILES


@pytest.mark.parametrize("kind", [k for k in KINDS if k.dynamic], ids=[k.key for k in KINDS if k.dynamic])
def test_the_line_a_kind_writes_parses_back_to_it(kind: ProbeKind) -> None:
    target = sample_target(kind)
    line = definition_line(kind, "grp", "ev", target, ("a=%di",))
    d = parse_definition(line)
    assert d is not None and d.kind == kind, line
    assert (d.group, d.event, d.target, d.fetchargs) == ("grp", "ev", target, ("a=%di",))
    assert d.line() == line
    assert d.line(group="other").startswith(line.split(":", 1)[0] + ":other/ev ")


@pytest.mark.parametrize("kind", [k for k in KINDS if k.returns], ids=[k.key for k in KINDS if k.returns])
def test_every_return_form_is_recognised(kind: ProbeKind) -> None:
    target = sample_target(kind)
    assert kind.entry is not None
    lines = {"r": f"r:g/e {target}", "r<N>": f"r16:g/e {target}",
             kinds.RETURN_SUFFIX: f"{KIND[kind.entry].letter}:g/e {target}%return ret=$retval"}
    for form in kind.return_forms:
        d = parse_definition(lines[form])
        assert d is not None and d.kind == kind and d.target == target, (form, d)
        assert d.suffix == (form == kinds.RETURN_SUFFIX)
        assert d.line() == lines[form]  # a line goes to the kernel as it was written
    if kind.maxactive:
        assert parse_definition(f"r16:g/e {target}").maxactive == "16"  # type: ignore[union-attr]


@pytest.mark.parametrize(("line", "kind", "group", "event", "target"), [
    ("p:kprobes/myprobe do_sys_open dfd=%ax", "kprobe", "kprobes", "myprobe", "do_sys_open"),
    ("r10:grp/ev vfs_read", "kretprobe", "grp", "ev", "vfs_read"),  # how 6.12 lists a %return kprobe
    ("p:uprobes/ev /bin/x:0x0000000000001139 arg=%di", "uprobe", "uprobes", "ev", "/bin/x:0x0000000000001139"),
    ("  r:ev /bin/x:0x10  ", "uretprobe", None, "ev", "/bin/x:0x10"),
    ("p do_sys_open", "kprobe", None, None, "do_sys_open"),
    ("p:ev mod:sym", "kprobe", None, "ev", "mod:sym"),  # MOD:SYM is a kernel target
    ("f:g/ev do_sys_openat2 $arg*", "fprobe", "g", "ev", "do_sys_openat2"),
    ("f:g/ev do_sys_openat2%return ret=$retval", "fretprobe", "g", "ev", "do_sys_openat2"),
    ("t:g/ev sched_switch prev->pid", "tprobe", "g", "ev", "sched_switch"),
    ("e:g/ev syscalls.sys_enter_openat fn=+0($filename):ustring", "eprobe", "g", "ev", "syscalls.sys_enter_openat"),
    ("r:g/ev vfs_read%return", "kretprobe", "g", "ev", "vfs_read"),  # 6.12 takes it (listed as r10:g/ev vfs_read)
    ("t:g/ev sched_switch%return", "tprobe", "g", "ev", "sched_switch%return"),  # no kind has it: the kernel says
])
def test_lines_of_every_kind(line: str, kind: str, group: str | None, event: str | None, target: str) -> None:
    d = parse_definition(line)
    assert d is not None and d.kind is KIND[kind]
    assert (d.group, d.event, d.target) == (group, event, target)


def test_removal_lines_and_lines_without_the_shape() -> None:
    d = parse_definition("-:grp/ev")
    assert d is not None and (d.letter, d.group, d.event, d.kind) == ("-", "grp", "ev", None)
    assert d.line() == "-:grp/ev"
    for bad in ("", "p:a/b/c x", "px:e t", "p:/e t", "p:e/ t", "-:", "-:a b", "P:e t", "1:e t"):
        assert parse_definition(bad) is None, bad
    x = parse_definition("x:e t")  # the shape, but no kind writes `x`
    assert x is not None and x.kind is None
    assert parse_definition("p:e").target == ""  # type: ignore[union-attr]


def test_a_kernel_older_than_a_kind_is_named_in_the_refusal() -> None:
    from kprobe_exporter.tracefs import version_hint
    assert version_hint(KIND["fprobe"], "6.1.0-56-amd64") == (
        "; fprobe events came in Linux 6.5 (CONFIG_FPROBE_EVENTS), this kernel is 6.1.0-56-amd64")
    assert version_hint(KIND["eprobe"], "5.10.0-1-amd64").startswith("; eprobe events came in Linux 5.15 ")
    assert version_hint(KIND["fprobe"], "6.12.95+deb12-amd64") == version_hint(KIND["eprobe"], "5.15.0") == ""
    assert version_hint(KIND["fprobe"], "weird") == ""


def test_an_invalid_register_the_kernel_refused_gets_a_suggestion() -> None:
    from kprobe_exporter.tracefs import register_hint
    assert register_hint("trace_uprobe: error: Invalid register name (at '%rdi:s32')") == "; did you mean %di?"
    assert register_hint("trace_kprobe: error: Invalid register name (at '%zzzz')") == ""
    assert register_hint("trace_kprobe: error: Unknown type is specified (at 'u7')") == ""
