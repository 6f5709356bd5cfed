"""Kinds: every probe kind of tracefs as one table, and the one parser of definition lines.

A row says how a kind is written (letter, return form), where it is defined (probe file), whether it
probes user space, and which kernel option and version bring it. Code asks a row (`kind.user`,
`kind.returns`, `kind.dynamic`) instead of comparing kind names; adding a kind is a row plus tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RETURN_SUFFIX = "%return"


@dataclass(frozen=True)
class ProbeFile:
    """A tracefs file that takes definition lines, and the profile file that counts its probes' hits."""

    name: str
    profile: str | None = None
    # kprobe_profile ends `EVENT HITS MISSES`; uprobe_profile ends `PATH EVENT HITS` (no misses)
    profile_misses: bool = False

    def profile_counts(self, cols: list[str]) -> tuple[str, str, str]:
        """(event, hits, misses) of one profile line's columns."""
        if self.profile_misses:
            return cols[-3], cols[-2], cols[-1]
        return cols[-2], cols[-1], "0"


KPROBE_EVENTS = ProbeFile("kprobe_events", "kprobe_profile", profile_misses=True)
UPROBE_EVENTS = ProbeFile("uprobe_events", "uprobe_profile")
DYNAMIC_EVENTS = ProbeFile("dynamic_events")


@dataclass(frozen=True)
class ProbeKind:
    """One row of the table."""

    key: str  # the config key (`kprobe: SYMBOL`), and the `kind` label of kprobe_exporter_probe_info
    letter: str  # what its definition lines start with ("" : the kernel defines it, nothing to write)
    file: ProbeFile | None  # where its definitions go (None: not defined by us)
    returns: bool  # fires when the function returns
    # how a line says "return": "r" (letter), "r<N>" (letter with MAXACTIVE), "%return" (suffix on the entry's line)
    return_forms: tuple[str, ...]
    user: bool  # probes user space (PATH:OFFSET targets)
    symbol: bool  # the target is a kernel function (a rejected one earns a "did you mean")
    option: str  # the kernel's config option
    since: tuple[int, ...]  # first kernel version with it
    target: str  # the target's grammar, for messages and the README
    entry: str | None = None  # a return kind's entry kind
    exit: str | None = None  # an entry kind's return kind (`latency: true` pairs the two)
    accepted: bool = True  # the config takes it (others are recognised, not yet offered)
    suffix_since: tuple[int, ...] | None = None  # first kernel version with the %return form

    @property
    def dynamic(self) -> bool:
        """Defined by a line we write (a tracepoint exists in the kernel already)."""
        return self.file is not None

    @property
    def probe_file(self) -> str | None:
        return self.file.name if self.file is not None else None

    @property
    def maxactive(self) -> bool:
        return "r<N>" in self.return_forms

    def written_as(self, letter: str, suffix: bool) -> bool:
        """Whether a line with this letter (and a %return suffix or not) defines this kind."""
        if suffix:  # `p:... SYM%return`, and `r:... SYM%return` (the kernel takes both)
            return RETURN_SUFFIX in self.return_forms and self.entry is not None and letter in (
                KIND[self.entry].letter, self.letter)
        return bool(self.letter) and self.letter == letter and (not self.returns or self.letter in self.return_forms
                                                                 or self.maxactive)


KINDS: tuple[ProbeKind, ...] = (
    ProbeKind("kprobe", "p", KPROBE_EVENTS, False, (), False, True, "CONFIG_KPROBE_EVENTS", (2, 6, 33),
              "SYMBOL[+OFFSET]", exit="kretprobe"),
    ProbeKind("kretprobe", "r", KPROBE_EVENTS, True, ("r<N>", RETURN_SUFFIX), False, True, "CONFIG_KPROBE_EVENTS",
              (2, 6, 33), "SYMBOL", entry="kprobe", suffix_since=(5, 10)),
    ProbeKind("uprobe", "p", UPROBE_EVENTS, False, (), True, False, "CONFIG_UPROBE_EVENTS", (3, 5),
              "PATH:SYMBOL or PATH:0xOFFSET", exit="uretprobe"),
    ProbeKind("uretprobe", "r", UPROBE_EVENTS, True, ("r", RETURN_SUFFIX), True, False, "CONFIG_UPROBE_EVENTS",
              (3, 5), "PATH:SYMBOL or PATH:0xOFFSET", entry="uprobe", suffix_since=(5, 10)),
    ProbeKind("tracepoint", "", None, False, (), False, False, "CONFIG_EVENT_TRACING", (2, 6, 30), "GROUP/EVENT"),
    ProbeKind("fprobe", "f", DYNAMIC_EVENTS, False, (), False, True, "CONFIG_FPROBE_EVENTS", (6, 5), "SYMBOL",
              exit="fretprobe"),
    ProbeKind("fretprobe", "f", DYNAMIC_EVENTS, True, (RETURN_SUFFIX,), False, True, "CONFIG_FPROBE_EVENTS", (6, 5),
              "SYMBOL", entry="fprobe", suffix_since=(6, 5)),
    ProbeKind("tprobe", "t", DYNAMIC_EVENTS, False, (), False, False, "CONFIG_FPROBE_EVENTS", (6, 5), "TRACEPOINT"),
    ProbeKind("eprobe", "e", DYNAMIC_EVENTS, False, (), False, False, "CONFIG_EPROBE_EVENTS", (5, 15),
              "SYSTEM/EVENT"),
)
KIND: dict[str, ProbeKind] = {k.key: k for k in KINDS}
# The config's kind keys, in the order messages list them: the accepted kinds, then a raw definition line.
RAW_KEY = "raw"
CONFIG_KEYS: tuple[str, ...] = (*(k.key for k in KINDS if k.accepted), RAW_KEY)
# Files the agent writes definitions to and reads its own back from (dynamic_events repeats the others).
PROBE_FILES: tuple[ProbeFile, ...] = tuple(dict.fromkeys(k.file for k in KINDS if k.accepted and k.file))


def is_user_target(target: str) -> bool:
    """A uprobe target is PATH:OFFSET; a kernel one SYMBOL[+OFFSET], MOD:SYMBOL or an address."""
    return "/" in target and ":" in target


def kind_of(letter: str, target: str, suffix: bool) -> ProbeKind | None:
    """The kind a definition line's letter, target and %return suffix make, or None."""
    found = [k for k in KINDS if k.written_as(letter, suffix)]
    if len(found) > 1:  # p and r serve kernel and user space: the target tells which
        found = [k for k in found if k.user == is_user_target(target)]
    return found[0] if found else None


@dataclass(frozen=True)
class Definition:
    """One definition line: `p[:[GRP/][EVENT]] TARGET [FETCHARGS]`, `r[MAXACTIVE]:...`, `-:[GRP/]EVENT`."""

    letter: str  # "-" for a removal line
    maxactive: str  # the digits after the letter ("" when none)
    group: str | None
    event: str | None
    target: str  # without a %return suffix ("" in a removal line)
    fetchargs: tuple[str, ...]
    suffix: bool  # the target was written with %return
    kind: ProbeKind | None  # None for a removal line or a letter no kind has

    def line(self, group: str | None = None, event: str | None = None, fetchargs: tuple[str, ...] | None = None) -> str:
        """The line again, with group, event or fetchargs replaced."""
        group = group if group is not None else self.group
        event = event if event is not None else self.event
        head = self.letter + self.maxactive
        if group is not None or event is not None:
            head += ":" + (f"{group}/" if group is not None else "") + (event or "")
        if self.letter == "-":
            return head
        target = self.target + (RETURN_SUFFIX if self.suffix else "")
        return " ".join([head, target, *(self.fetchargs if fetchargs is None else fetchargs)])


_HEAD_RE = re.compile(r"(-|[a-z])(\d*)(?::(?:([^/\s]+)/)?([^\s/]+))?")


def parse_definition(line: str) -> Definition | None:
    """A definition line's parts, or None when it does not have the grammar's shape.

    A line with a group needs a non-empty group and event. A missing target is "" (the caller says
    whether it may be missing). A %return suffix no kind of the table has stays part of the target.
    """
    tokens = line.split()
    if not tokens:
        return None
    m = _HEAD_RE.fullmatch(tokens[0])
    if not m:
        return None
    letter, maxactive, group, event = m.groups()
    if letter == "-":
        if event is None or maxactive or len(tokens) > 1:
            return None
        return Definition("-", "", group, event, "", (), False, None)
    target, fetchargs = (tokens[1], tuple(tokens[2:])) if len(tokens) > 1 else ("", ())
    if target.endswith(RETURN_SUFFIX) and len(target) > len(RETURN_SUFFIX):
        kind = kind_of(letter, target[:-len(RETURN_SUFFIX)], True)
        if kind is not None:
            return Definition(letter, maxactive, group, event, target[:-len(RETURN_SUFFIX)], fetchargs, True, kind)
    kind = kind_of(letter, target, False)
    return Definition(letter, maxactive, group, event, target, fetchargs, False, kind)


def definition_line(kind: ProbeKind, group: str, event: str, target: str, fetchargs: tuple[str, ...]) -> str:
    """The line that defines an event of a kind: by its letter, or by its entry's letter and %return."""
    suffix = kind.returns and not kind.written_as(kind.letter, False)
    letter = KIND[kind.entry].letter if suffix and kind.entry else kind.letter
    return Definition(letter, "", group, event, target, fetchargs, suffix, kind).line()
