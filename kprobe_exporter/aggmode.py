"""Aggregation mode: which probes the kernel aggregates (hist triggers) and which stream, decided once.

Each probe's mode comes from its `aggregation` (else the top level's), what the running kernel has
(hist triggers, synthetic events: found by their files, never by version) and whether the kernel can
express the probe: its labels as hist keys, its latency as an entry/return pair keyed by thread.
`auto` takes the kernel where it can and says why not where it cannot; `kernel` that cannot be
honoured is a UserError naming the probe and the field `aggregation`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kprobe_exporter import triggers
from kprobe_exporter.config import Config, ProbeConfig
from kprobe_exporter.errors import UserError
from kprobe_exporter.kinds import KIND, RAW_KEY
from kprobe_exporter.probes import (
    COMM_ARG,
    ArgSpec,
    EventSpec,
    KernelSpans,
    PairSpec,
    ProbeSet,
    default_name,
    event_key,
    raw_name,
)

KERNEL, STREAM = "kernel", "stream"
KEYS_MAX = 3  # TRACING_MAP_KEYS_MAX (kernel/trace/tracing_map.h): fields in one hist key
# HIST_KEY_SIZE_MAX is MAX_FILTER_STR_VAL (256) + 128: a string key takes 256 bytes, so one fits, two do not
STRING_KEYS_MAX = 1
_INT_TYPE = re.compile(r"^([usx])(8|16|32|64)$")


@dataclass(frozen=True)
class KernelSupport:
    """What this kernel offers for in-kernel aggregation, found by the files tracefs shows."""

    hist: bool  # CONFIG_HIST_TRIGGERS: events have a `trigger` file and hist triggers
    synthetic: bool  # CONFIG_SYNTH_EVENTS: the top-level `synthetic_events` file

    @classmethod
    def detect(cls, root: Path) -> KernelSupport:
        return cls(_has_hist(root), (root / triggers.SYNTHETIC_EVENTS).exists())


def _has_hist(root: Path) -> bool:
    """A `hist` file beside some event's `trigger` (the trigger file alone exists without HIST_TRIGGERS)."""
    try:
        for group in os.scandir(root / "events"):
            if group.is_dir():
                for ev in os.scandir(group.path):
                    if ev.is_dir():
                        return os.path.exists(os.path.join(ev.path, "hist"))
    except OSError:
        return False
    return False


@dataclass(frozen=True)
class KeyField:
    """One label as a hist key: the label's name, the event field keyed on, how its value prints in trace
    text (so both modes export the same value): `str`, `u`, `s` or `x` with its width in bits."""

    label: str
    field: str
    fmt: str = "u"
    bits: int = 64

    def value(self, printed: str) -> str:
        if self.fmt == "str":
            return printed
        v = int(printed) & ((1 << self.bits) - 1)
        if self.fmt == "x":
            return f"{v:#x}"
        if self.fmt == "s" and v >= 1 << (self.bits - 1):
            v -= 1 << self.bits
        return str(v)


@dataclass(frozen=True)
class ProbeMode:
    """One probe's mode, why, and (in kernel mode) the events and keys its triggers use."""

    probe: str
    mode: str  # KERNEL or STREAM
    reason: str  # why: "configured", or what made `auto` stream
    event: EventSpec | None = None
    keys: tuple[KeyField, ...] = ()
    pair: PairSpec | None = None
    exit: EventSpec | None = None

    @property
    def kernel(self) -> bool:
        return self.mode == KERNEL


def probe_name(p: ProbeConfig) -> str:
    return p.name or (raw_name(p) if p.kind == RAW_KEY else default_name(p))


def key_field(ev: EventSpec, label: str) -> KeyField | str:
    """The hist key of a label, or why the kernel cannot key on it."""
    args = {a.name: a for a in ev.args}
    if label == "comm":
        if COMM_ARG in args:
            return KeyField(label, COMM_ARG, "str")
        return "a tracepoint's comm is known only in user space (no $comm recorded)"
    if not ev.dynamic:
        return f"label {label!r}: tracepoint fields print the tracepoint's own way, not as hist keys do"
    arg = args.get(label)
    if arg is None:
        return f"label {label!r} is known only in user space"
    if arg.is_string:
        return KeyField(label, label, "str")
    typ = arg.fetch.rpartition(":")[2] if re.search(r":[A-Za-z][\w@/\[\]]*$", arg.fetch) else "x64"
    m = _INT_TYPE.match(typ)
    if m is None:
        return f"label {label!r}: its type {typ!r} is not a number or string a hist can key on"
    return KeyField(label, label, m.group(1), int(m.group(2)))


def _kernel_keys(ev: EventSpec) -> tuple[KeyField, ...] | str:
    keys: list[KeyField] = []
    for label in ev.labels:
        k = key_field(ev, label)
        if isinstance(k, str):
            return k
        keys.append(k)
    if len(keys) > KEYS_MAX:
        return f"{len(keys)} labels: a hist key takes at most {KEYS_MAX} fields (TRACING_MAP_KEYS_MAX)"
    if sum(k.fmt == "str" for k in keys) > STRING_KEYS_MAX:
        return "two string labels: a hist key holds one string (HIST_KEY_SIZE_MAX)"
    return tuple(keys)


def _why_not(p: ProbeConfig, ev: EventSpec, pair: PairSpec | None, explicit: set[str],
             support: KernelSupport) -> tuple[KeyField, ...] | str:
    """The probe's hist keys if the kernel can aggregate it, else the reason it cannot: what the config
    asks for first (the same answer on every kernel), then what this kernel lacks."""
    if ev.name in explicit:
        return "its event is in a `pairs:` entry, which streams"
    if pair is not None and p.recursive:
        return "recursive: one pending timestamp per thread cannot pair nested calls"
    if pair is not None and pair.spans is not None and any(a.name != COMM_ARG for a in ev.args):
        return "spans carry the entry's args, which kernel mode keeps in the kernel"
    keys = _kernel_keys(ev)
    if isinstance(keys, str):
        return keys
    if not support.hist:
        return "this kernel has no hist triggers (CONFIG_HIST_TRIGGERS)"
    if pair is not None and not support.synthetic:
        return "latency needs synthetic events, which this kernel lacks (CONFIG_SYNTH_EVENTS)"
    return keys


def resolve(config: Config, probes: ProbeSet, support: KernelSupport, path: str = "") -> dict[str, ProbeMode]:
    """Every configured probe's mode, by probe name; raises UserError for `kernel` that cannot be had."""
    explicit = {e for pc in config.pairs for e in (pc.entry, pc.exit)}
    pairs = {pr.name: pr for pr in probes.pairs}
    out: dict[str, ProbeMode] = {}
    for p in config.probes:
        name = probe_name(p)
        ev = probes.event(name)
        pair = pairs.get(name) if p.latency else None
        wanted = p.aggregation or config.aggregation
        if wanted == STREAM:
            out[name] = ProbeMode(name, STREAM, "configured")
            continue
        keys = _why_not(p, ev, pair, explicit, support)
        if isinstance(keys, str):
            if wanted == KERNEL:
                raise UserError(f"'kernel' cannot be honoured: {keys}", name, "aggregation", path)
            out[name] = ProbeMode(name, STREAM, keys)
            continue
        exit_ = probes.event(pair.exit) if pair is not None else None
        out[name] = ProbeMode(name, KERNEL, "configured" if wanted == KERNEL else "auto", ev, keys, pair, exit_)
    return out


SPAN_GROUP = triggers.SYNTHETIC_GROUP
_SPAN_ARGS = (ArgSpec("lat", "u64", False), ArgSpec("ts0", "u64", False), ArgSpec("pid", "s32", False))


def span_events(group: str, modes: dict[str, ProbeMode]) -> tuple[KernelSpans, ...]:
    """The synthetic latency events of kernel-mode pairs with `spans:` (triggers.SPAN_FIELDS): read like
    any event, enabled by the kernel source behind its `lat >=` filter, never by tracefs."""
    out = []
    for m in modes.values():
        if m.kernel and m.pair is not None and m.pair.spans is not None:
            name = triggers.synthetic_name(group, m.pair.name)
            out.append(KernelSpans(span_event(name, m.pair.function, span_ret(m.exit)), m.pair))
    return tuple(out)


def span_ret(exit_: EventSpec | None) -> bool:
    """Whether the return probe records the return value a span carries (`ret=$retval`, probes.py)."""
    return exit_ is not None and exit_.dynamic and any(a.name == "ret" for a in exit_.args)


def span_event(name: str, function: str, ret: bool = False) -> EventSpec:
    """The synthetic event `name` as the readers see it: a tracepoint of group `synthetic`, never counted."""
    return EventSpec(name, "tracepoint", SPAN_GROUP, f"{SPAN_GROUP}/{name}", function, None,
                     _SPAN_ARGS + (ArgSpec("ret", "u64", False),) * ret, counted=False,
                     key=event_key(KIND["tracepoint"], name))


def streamed(probes: ProbeSet, modes: dict[str, ProbeMode]) -> ProbeSet:
    """The probe set the reader and the aggregate get: without the kernel-mode probes' events and pairs,
    with the synthetic events that carry kernel-mode pairs' slow calls for spans."""
    kernel_events = {e.name for m in modes.values() if m.kernel for e in (m.event, m.exit) if e is not None}
    kernel_pairs = {m.pair.name for m in modes.values() if m.kernel and m.pair is not None}
    spans = span_events(probes.group, modes)
    return ProbeSet(probes.group, tuple(e for e in probes.events if e.name not in kernel_events)
                    + tuple(ks.event for ks in spans),
                    tuple(pr for pr in probes.pairs if pr.name not in kernel_pairs), spans)


def kernel_events(modes: dict[str, ProbeMode]) -> tuple[EventSpec, ...]:
    """The events kernel-mode probes define (and never enable for reading)."""
    return tuple(e for m in modes.values() if m.kernel for e in (m.event, m.exit) if e is not None)
