"""Probes: the validated config becomes events to install (definition lines) and pairs to match.

Uprobe targets are resolved from ELF symbols to file offsets here; nothing here touches tracefs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from kprobe_exporter import symbols
from kprobe_exporter.cgroups import LABELS as CGROUP_LABELS
from kprobe_exporter.config import (
    MAX_ARGS,
    Config,
    ProbeConfig,
    SpanSettings,
    check_name,
    check_tracefs_text,
)
from kprobe_exporter.errors import UserError
from kprobe_exporter.kinds import KIND, RAW_KEY, ProbeKind, definition_line, parse_definition
from kprobe_exporter.kube import KUBE_LABELS

_STRING_TYPES = ("string", "ustring", "symstr")
_TRACEPOINT_RE = re.compile(r"^([A-Za-z0-9_]+)/([A-Za-z0-9_]+)$")
_PID_LABEL_RE = re.compile(r"(?:^|_)(?:pid|tid|tgid)$", re.IGNORECASE)
# The task's name, recorded with the event where a `comm` label or spans need it: the trace text names a
# task from the kernel's bounded comm cache when it is read, by then `<...>` for one that has exited.
COMM_ARG = "__comm"
# Labels every kind takes, whatever its args: they come from the thread (labels.SOURCES), not the record.
THREAD_LABELS = ("comm", *CGROUP_LABELS, *KUBE_LABELS)


def probe_error(label: str, fld: str, message: str) -> UserError:
    """A probe's mistake; label is the probe's name quoted ('a'), `pair 'p'`, or `raw line`."""
    return UserError(message, field=fld, who=label if label.startswith("pair ") else f"probe {label}")


@dataclass(frozen=True)
class ArgSpec:
    name: str
    fetch: str
    is_string: bool
    named: bool = True  # False: unnamed in a raw line, written `argN=FETCH` by the agent (the kernel's name)


@dataclass(frozen=True)
class EventSpec:
    """One trace event the agent enables: a dynamic probe it defines, or an existing tracepoint."""

    name: str  # event name (unique in the set); the `probe` label for counted events
    kind: str  # the key of its row in kinds.KINDS (kprobe, kretprobe, uprobe, uretprobe, tracepoint)
    group: str
    target: str  # symbol, PATH:0xOFFSET or GROUP/EVENT
    function: str  # the probed function, for spans
    definition: str | None  # the kprobe_events/uprobe_events line; None for tracepoints
    args: tuple[ArgSpec, ...] = ()
    filter: str | None = None
    labels: tuple[str, ...] = ()
    counted: bool = True  # generated return probes feed pairs only
    key: bytes = b""  # how the event's name prints in trace text (see parser)
    raw: bool = False  # from a `raw:` line (errors name that field)

    @property
    def probe_kind(self) -> ProbeKind:
        """Its row of the kind table."""
        return KIND[self.kind]

    @property
    def is_return(self) -> bool:
        return self.probe_kind.returns or self.key.endswith(b" ")  # or a syscall's exit tracepoint

    @property
    def dynamic(self) -> bool:
        return self.definition is not None

    @property
    def probe_file(self) -> str:
        """The file its definition goes to ("" for a tracepoint: nothing to define)."""
        return self.probe_kind.probe_file or ""


@dataclass(frozen=True)
class PairSpec:
    name: str
    entry: str
    exit: str
    function: str
    spans: SpanSettings | None = None


@dataclass(frozen=True)
class KernelSpans:
    """A kernel-mode pair's slow calls: its synthetic latency event, streamed for spans (triggers.SpanStream)."""

    event: EventSpec  # the synthetic event, in the probe set's events
    pair: PairSpec


@dataclass(frozen=True)
class ProbeSet:
    group: str
    events: tuple[EventSpec, ...]
    pairs: tuple[PairSpec, ...]
    kernel_spans: tuple[KernelSpans, ...] = ()

    def event(self, name: str) -> EventSpec:
        return next(e for e in self.events if e.name == name)


def event_key(kind: ProbeKind, event: str) -> bytes:
    """The bytes that start an event's body in trace text, up to and including its separator.

    Syscall tracepoints print the syscall, not the event: sys_enter_openat shows as
    `sys_openat(...)` and sys_exit_openat as `sys_openat -> 0x3`. Everything else prints `NAME:`.
    """
    if not kind.dynamic and event.startswith("sys_enter_"):
        return b"sys_" + event[len("sys_enter_"):].encode() + b"("
    if not kind.dynamic and event.startswith("sys_exit_"):
        return b"sys_" + event[len("sys_exit_"):].encode() + b" "
    return event.encode() + b":"


def parse_fetcharg(probe: str, kind: ProbeKind, name: str, fetch: str) -> ArgSpec:
    """One fetcharg as the agent reads it back: its name, and whether it prints as a quoted string.

    Its grammar is the kernel's to judge (it grows: BTF names, `->`, eprobe fields, new types). Only what
    no kernel can parse is refused here: whitespace, a second command, a comment, unbalanced parentheses.
    """
    fld = f"args.{name}"
    check_field(probe, fld, fetch)
    if fetch.count("(") != fetch.count(")"):
        raise probe_error(probe, fld, "unbalanced parentheses")
    body, _, typ = fetch.rpartition(":") if re.search(r":[A-Za-z][\w@/\[\]]*$", fetch) else (fetch, "", "")
    base = typ.split("[", 1)[0]
    return ArgSpec(name, fetch, base in _STRING_TYPES or (body == "$comm" and base in ("", "string")))


def check_field(probe: str, fld: str, value: str) -> None:
    try:
        check_tracefs_text(value)
    except ValueError as e:
        raise probe_error(probe, fld, str(e)) from None
    if any(c.isspace() for c in value):
        raise probe_error(probe, fld, "must not contain whitespace")
    if "#" in value:
        raise probe_error(probe, fld, "must not contain '#' (the kernel reads the rest of the line as a comment)")


Resolver = Callable[[str, str], int]


def _uprobe_target(probe: str, fld: str, spec: str, resolve: Resolver | None) -> tuple[str, str]:
    """(PATH:0xOFFSET, function name) for a uprobe given as PATH:SYMBOL or PATH:0xOFFSET."""
    check_field(probe, fld, spec)
    path, sep, where = spec.rpartition(":")
    if not sep or not path or not where:
        raise probe_error(probe, fld, f"{spec!r} is not PATH:SYMBOL or PATH:0xOFFSET")
    if not path.startswith("/"):
        raise probe_error(probe, fld, f"{path!r} must be an absolute path")
    if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", where):
        return f"{path}:{int(where, 0):#x}", spec
    if resolve is None:
        return f"{path}:{where}", where
    try:
        offset = resolve(path, where)
    except symbols.SymbolError as e:
        raise probe_error(probe, fld, str(e)) from None
    return f"{path}:{offset:#x}", where


def _args(probe: str, kind: ProbeKind, cfg_args: dict[str, str]) -> tuple[ArgSpec, ...]:
    return tuple(parse_fetcharg(probe, kind, n, f) for n, f in cfg_args.items())


def _definition(kind: ProbeKind, group: str, name: str, target: str, args: tuple[ArgSpec, ...]) -> str:
    return definition_line(kind, group, name, target, tuple(f"{a.name}={a.fetch}" for a in args))


def _raw(probe_cfg: ProbeConfig, group: str, resolve: Resolver | None) -> EventSpec:
    """A definition line of any kind, put into our group; the kernel judges the rest of it."""
    line = probe_cfg.target
    d = parse_definition(line)
    if d is None or d.kind is None or not d.kind.dynamic or not d.target:
        raise probe_error("raw line", RAW_KEY, f"{line!r} is not 'p|r|f|t|e[:[GRP/]EVENT] TARGET [FETCHARGS]'")
    if d.event is None:
        raise probe_error("raw line", RAW_KEY, "the line needs an event name: 'p:NAME TARGET ...'")
    event, kind, probe = d.event, d.kind, f"{d.event!r}"
    try:
        check_name(event)
    except ValueError as e:
        raise probe_error(probe, RAW_KEY, f"event name {e}") from None
    if len(d.fetchargs) > MAX_ARGS:
        raise probe_error(probe, RAW_KEY, f"has {len(d.fetchargs)} args; the kernel takes at most {MAX_ARGS}")
    if kind.exit and KIND[kind.exit].letter == kind.letter and any("$retval" in t for t in d.fetchargs):
        kind = KIND[kind.exit]  # `f:E SYM $retval` is an exit probe: the kernel adds the %return itself
    args, written = _raw_args(probe, kind, d.fetchargs)
    if kind.user:
        target, function = _uprobe_target(probe, RAW_KEY, d.target, resolve)
    else:
        check_field(probe, RAW_KEY, d.target)
        target, function = d.target, d.target.split("+", 1)[0]
    definition = replace(d, target=target).line(group, event, written)
    return EventSpec(event, kind.key, group, target, function, definition, args, probe_cfg.filter,
                     tuple(probe_cfg.labels), key=event_key(kind, event), raw=True)


_BTF_NAME_RE = re.compile(r"([A-Za-z_]\w*)(?::[^=]*)?")
# `$arg*` and an unnamed `$argN`: the kernel names (and, with BTF, types) them by the function's parameters,
# and refuses a `$argN` past them that it would take once named (6.12: `$arg9` no, `a=$arg9` yes)
_KERNEL_NAMED_RE = re.compile(r"\$arg(?:\*|\d+(?::[^=]*)?)")


def _raw_args(probe: str, kind: ProbeKind, tokens: tuple[str, ...]) -> tuple[tuple[ArgSpec, ...], tuple[str, ...]]:
    """The args the agent reads and the fetchargs it writes, named as the kernel lists them.

    A named arg keeps its name; a bare BTF name (`count`) is named by itself, as the kernel names it; any
    other unnamed arg is written `argN=...` by its position, the kernel's own name for it where BTF does not
    name it. `$arg*` and an unnamed `$argN` are written as they are: the kernel names them after parameters
    only it knows, so the event's args are not read (their text would run into the others').
    """
    args: list[ArgSpec] = []
    written: list[str] = []
    for i, tok in enumerate(tokens, 1):
        if _KERNEL_NAMED_RE.fullmatch(tok):
            check_field(probe, RAW_KEY, tok)
            written.append(tok)
            continue
        name, eq, fetch = tok.partition("=")
        m = None if eq else _BTF_NAME_RE.fullmatch(tok)
        if not eq:
            name, fetch = (m.group(1) if m else f"arg{i}"), tok
        arg = parse_fetcharg(probe, kind, name, fetch)
        args.append(arg if eq or m else replace(arg, named=False))
        written.append(tok if eq or m else f"{name}={fetch}")
    if any(_KERNEL_NAMED_RE.fullmatch(t) for t in tokens):
        args = []
    return tuple(args), tuple(written)


def _probe_events(p: ProbeConfig, group: str, resolve: Resolver | None) -> tuple[list[EventSpec], PairSpec | None]:
    """A probe's event, its generated return event when `latency: true`, and the pair of the two."""
    ev = _raw_event(p, group, resolve) if p.kind == RAW_KEY else _entry_event(p, group, resolve)
    events = [ev]
    probe = f"{ev.name!r}"
    if p.filter is not None:
        try:
            check_tracefs_text(p.filter)
        except ValueError as e:
            raise probe_error(probe, "filter", str(e)) from None
    _check_labels(probe, p, ev)
    pair: PairSpec | None = None
    if p.latency:
        ret = _return_event(ev, group)
        events.append(ret)
        pair = PairSpec(ev.name, ev.name, ret.name, ev.function, p.spans)
    elif p.spans is not None:
        raise probe_error(probe, "spans", "spans are made from entry/exit pairs: set 'latency: true' or declare a pair")
    return events, pair


def _raw_event(p: ProbeConfig, group: str, resolve: Resolver | None) -> EventSpec:
    if p.name is not None:
        raise probe_error(f"{p.name!r}", "name", "a raw line takes its name from the line; drop 'name'")
    if p.args:
        raise probe_error(f"{raw_name(p)!r}", "args", "a raw line carries its own fetchargs; drop 'args'")
    if p.container or p.cgroup:
        raise probe_error(f"{raw_name(p)!r}", "container" if p.container else "cgroup",
                          "is for 'uprobe:' and 'uretprobe:' probes, not a raw line")
    return _raw(p, group, resolve)


def _entry_event(p: ProbeConfig, group: str, resolve: Resolver | None) -> EventSpec:
    """The event of a probe given by its kind's key (`kprobe: SYMBOL`, `tracepoint: GROUP/EVENT`, ...)."""
    kind = KIND[p.kind]
    name = p.name or default_name(p)
    probe = f"{name!r}"
    try:
        check_name(name)
    except ValueError as e:
        raise probe_error(probe, "name", str(e)) from None
    if (p.container or p.cgroup) and not kind.user:
        raise probe_error(probe, "container" if p.container else "cgroup", f"is for uprobes; a {kind.key} "
                          "sees the host's kernel (use the cgroup labels to tell containers apart)")
    if not kind.dynamic:
        m = _TRACEPOINT_RE.match(p.target)
        if not m:
            raise probe_error(probe, kind.key, f"{p.target!r} is not GROUP/EVENT (e.g. syscalls/sys_enter_openat)")
        if p.args:
            raise probe_error(probe, "args", "a tracepoint has fixed fields; 'args' is for kprobes and uprobes")
        tp_group, tp_event = m.groups()
        return EventSpec(name, kind.key, tp_group, p.target, tp_event.removeprefix("sys_enter_"), None, (),
                         p.filter, tuple(p.labels), key=event_key(kind, tp_event))
    if kind.user:
        target, function = _uprobe_target(probe, kind.key, _in_container(probe, p, resolve), resolve)
        function = p.target if _selector(p) and function.startswith("/") else function  # no PID in it
    else:
        check_field(probe, kind.key, p.target)  # the kernel judges the target: SYMBOL[+OFFS], MOD:SYM, ...
        target, function = p.target, p.target.split("+", 1)[0]
    args = _args(probe, kind, p.args)
    return EventSpec(name, kind.key, group, target, function, _definition(kind, group, name, target, args), args,
                     p.filter, tuple(p.labels), key=event_key(kind, name))


def _check_labels(probe: str, p: ProbeConfig, ev: EventSpec) -> None:
    arg_names = {a.name for a in ev.args}
    for label in p.labels:
        if _PID_LABEL_RE.search(label):
            raise probe_error(probe, "labels", f"label {label!r}: pid and tid are never labels (one series per "
                             "process or thread grows without bound); use 'comm'")
        if label in THREAD_LABELS or label in arg_names:
            continue
        if not ev.dynamic and re.fullmatch(r"[A-Za-z_]\w*", label):
            continue  # tracepoint fields are checked against the format file at install
        near = difflib.get_close_matches(label, [*arg_names, *THREAD_LABELS], n=1)
        known = ", ".join(sorted(arg_names)) or "none"
        hint = f"; did you mean {near[0]!r}?" if near else f"; labels name args ({known}), 'comm' or a cgroup label"
        raise probe_error(probe, "labels", f"label {label!r} is not an arg of this probe{hint}")
    if len(set(p.labels)) != len(p.labels):
        raise probe_error(probe, "labels", "a label is listed twice")


def raw_name(p: ProbeConfig) -> str:
    d = parse_definition(p.target)
    ok = d is not None and d.kind is not None and d.kind.accepted and d.kind.dynamic and d.target
    return (d.event if ok and d is not None else None) or "raw line"


def default_name(p: ProbeConfig) -> str:
    target = p.target
    kind = KIND[p.kind]
    if not kind.dynamic:
        return target.rpartition("/")[2]
    if kind.user:
        target = target.rpartition(":")[2]
    if kind.key == "eprobe":  # SYSTEM/EVENT or SYSTEM.EVENT: the event's name
        target = re.split(r"[/.]", target)[-1]
    return re.sub(r"\W", "_", target.split("+", 1)[0])


def _return_event(ev: EventSpec, group: str) -> EventSpec:
    """The return event `latency: true` adds: the kind's return kind, or a syscall's exit tracepoint."""
    probe, kind = f"{ev.name!r}", ev.probe_kind
    if kind.returns:
        raise probe_error(probe, "latency", f"a {kind.key} is already the return; put latency on the entry probe")
    name = f"{ev.name}_ret"
    if not kind.dynamic:
        tp_group, _, tp_event = ev.target.partition("/")
        if not tp_event.startswith("sys_enter_"):
            raise probe_error(probe, "latency", f"tracepoint {ev.target} has no matching return event; "
                             "declare an explicit pair of two tracepoints under 'pairs:'")
        exit_event = "sys_exit_" + tp_event[len("sys_enter_"):]
        return EventSpec(name, kind.key, tp_group, f"{tp_group}/{exit_event}", ev.function, None, (),
                         None, (), counted=False, key=event_key(kind, exit_event))
    if "+" in ev.target.rpartition(":")[2] and not kind.user:
        raise probe_error(probe, "latency", "latency needs the function entry: drop +OFFSET")
    if kind.exit is None:
        raise probe_error(probe, "latency", f"a {kind.key} has no return event; declare a pair under 'pairs:'")
    ret_kind = KIND[kind.exit]
    ret_arg = (ArgSpec("ret", "$retval", False),)
    return EventSpec(name, ret_kind.key, group, ev.target, ev.function,
                     _definition(ret_kind, group, name, ev.target, ret_arg), ret_arg, None, (),
                     counted=False, key=event_key(ret_kind, name))


def build_probe_set(config: Config, path: str = "<config>", resolve: Resolver | None = symbols.resolve) -> ProbeSet:
    """All events and pairs a config asks for; raises UserError naming file, probe and field.

    With resolve=None, uprobe symbols stay unresolved (replay needs no binaries).
    """
    try:
        return _build(config, resolve)
    except UserError as e:
        raise e.in_file(path) from None


def _build(config: Config, resolve: Resolver | None) -> ProbeSet:
    group = config.instance
    events: list[EventSpec] = []
    pairs: list[PairSpec] = []
    for p in config.probes:
        evs, pair = _probe_events(p, group, resolve)
        events.extend(evs)
        if pair:
            pairs.append(pair)
    seen: dict[str, EventSpec] = {}
    keys: dict[bytes, EventSpec] = {}
    for ev in events:
        if ev.name in seen:
            raise probe_error(f"{ev.name!r}", "name", "duplicate name; each probe needs a unique name "
                             "(and 'latency: true' takes NAME_ret for the return probe)")
        if ev.key in keys:
            other = keys[ev.key]
            raise probe_error(f"{ev.name!r}", "tracepoint", f"prints the same as probe {other.name!r} "
                             f"({ev.key.decode()!r}); the two could not be told apart")
        seen[ev.name] = ev
        keys[ev.key] = ev
    pair_names = {p.name for p in pairs}
    for pc in config.pairs:
        probe = f"pair {pc.name!r}"
        for role in ("entry", "exit"):
            ref = getattr(pc, role)
            if ref not in seen:
                near = difflib.get_close_matches(ref, list(seen), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise probe_error(probe, role, f"names unknown event {ref!r}{hint}")
        if pc.name in pair_names:
            raise probe_error(probe, "name", "duplicate pair name")
        if pc.entry == pc.exit:
            raise probe_error(probe, "exit", "entry and exit must be two different events")
        pair_names.add(pc.name)
        pairs.append(PairSpec(pc.name, pc.entry, pc.exit, seen[pc.entry].function, pc.spans))
    used: dict[str, str] = {}
    for pr in pairs:
        for ev_name in (pr.entry, pr.exit):
            if ev_name in used:
                raise probe_error(f"pair {pr.name!r}", "entry",
                                 f"event {ev_name!r} is already in pair {used[ev_name]!r}; an event is in one pair")
            used[ev_name] = pr.name
    span_entries = {pr.entry for pr in pairs if pr.spans is not None}
    events = [_with_comm(ev) if "comm" in ev.labels or ev.name in span_entries else ev for ev in events]
    return ProbeSet(group, tuple(events), tuple(pairs))


def _with_comm(ev: EventSpec) -> EventSpec:
    """A dynamic probe that also records `$comm` as COMM_ARG (tracepoints carry what they carry)."""
    if not ev.dynamic or len(ev.args) >= MAX_ARGS or any(a.name == COMM_ARG for a in ev.args):
        return ev
    return replace(ev, args=(*ev.args, ArgSpec(COMM_ARG, "$comm", True)),
                   definition=f"{ev.definition} {COMM_ARG}=$comm")


# --- uprobes in containers (issue #16) -------------------------------------------------------------

def _selector(p: ProbeConfig) -> symbols.ContainerSelector | None:
    return symbols.ContainerSelector(p.container, p.cgroup) if p.container or p.cgroup else None


def _in_container(probe: str, p: ProbeConfig, resolve: Resolver | None) -> str:
    """A uprobe target whose path is inside a container, as the host reaches it (/proc/PID/root/...);
    as given without a selector, or when nothing is resolved (replay)."""
    sel = _selector(p)
    if sel is None or resolve is None:
        return p.target
    if p.container and p.cgroup:
        raise probe_error(probe, "cgroup", "give 'container' or 'cgroup', not both")
    fld = "container" if p.container else "cgroup"
    path, sep, where = p.target.rpartition(":")
    if not sep or not path.startswith("/"):
        return p.target  # _uprobe_target says what is wrong with it
    try:
        _, host = symbols.in_container(sel, path)
    except symbols.SymbolError as e:
        raise probe_error(probe, fld, str(e)) from None
    return f"{host}:{where}"


def container_targets(config: Config, probes: ProbeSet) -> symbols.ContainerTargets:
    """The events of `probes` whose binaries are inside containers, to be watched for restarts."""
    out = symbols.ContainerTargets()
    by_name = {ev.name: ev for ev in probes.events}
    for p in config.probes:
        sel = _selector(p)
        if sel is None or p.kind == RAW_KEY or not KIND[p.kind].user:
            continue
        name = p.name or default_name(p)
        for ev in (by_name.get(name), by_name.get(f"{name}_ret")):
            if ev is not None and ev.probe_kind.user:
                out.add(ev.name, sel, p.target.rpartition(":")[0], ev.target.rpartition(":")[0])
    return out
