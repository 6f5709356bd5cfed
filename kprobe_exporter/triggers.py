"""Triggers: a probe's in-kernel aggregation as hist-trigger and synthetic-event lines, and their removal.

Counts come from a hist trigger on the probe's own event, keyed by its label fields. Latency comes
from three pieces: the entry event saves `common_timestamp` per thread in a variable, the return event
computes the difference and `onmatch()` emits it as a synthetic event, and a hist on that synthetic
event keeps `.log2` buckets of the nanoseconds with their sum. Everything is named after the agent's
group, so removal never touches anyone else's; removal runs in the reverse order of installation.
"""

from __future__ import annotations

from dataclasses import dataclass

SYNTHETIC_EVENTS = "synthetic_events"  # top-level: synthetic events are global definitions
SYNTHETIC_GROUP = "synthetic"  # the events/ group of every synthetic event, in every instance
HIST_SIZE = 2048  # the kernel's default table size (entries); a full table counts `Dropped:`
# A table keyed by thread keeps a row for every thread that ever called (the kernel never deletes one, and
# refuses `:clear` on a trigger that defines a variable: EINVAL on 6.1 and 6.12). Past this many rows the
# agent replaces a pair's two thread tables with empty ones (KernelSource._renew_locked) before the table fills.
THREAD_RENEW_AT = HIST_SIZE // 2
# The default `global` clock clamps a CPU whose clock runs behind another's to the last time seen, so
# under skew (seen in the qemu lab: 3,065 of 4,000 calls measured 0 ns) latencies collapse to zero;
# `mono` is consistent across CPUs and cheap.
CLOCK = "mono"


@dataclass(frozen=True)
class Trigger:
    """One line written to an event's `trigger` file in the agent's instance."""

    event: str  # "GROUP/EVENT" (events/GROUP/EVENT/trigger under the instance)
    line: str

    @property
    def path(self) -> str:
        return f"events/{self.event}/trigger"

    @property
    def removal(self) -> str:
        return "!" + self.line


# One field: the hist keys the duration alone, and each field is work at every return (6.12 lab: 85 -> 36 µs
# a call without `pid`, bench/README). With spans the event also carries the entry's timestamp (the span's
# start, on the instance's clock) and the thread: `int`, not `pid_t`, as common_pid is an int and the
# kernel checks types.
LAT_FIELDS = "u64 lat"
SPAN_FIELDS = "u64 lat; u64 ts0; int pid"
SPAN_RET = "; u64 ret"  # and the return value where the return probe records one (`ret`, kprobes.py)


@dataclass(frozen=True)
class SpanStream:
    """A synthetic event enabled in the agent's instance behind a filter: only calls at or above the
    spans' min_duration reach the ring buffer (the hist triggers still see every call)."""

    event: str  # "synthetic/NAME"
    min_ns: int

    @property
    def filter(self) -> str:
        return f"lat >= {self.min_ns}"

    def path(self, file: str) -> str:
        return f"events/{self.event}/{file}"


@dataclass(frozen=True)
class Synthetic:
    """A synthetic event definition, written to the top-level `synthetic_events`."""

    name: str
    fields: str = LAT_FIELDS

    @property
    def line(self) -> str:
        return f"{self.name} {self.fields}"

    @property
    def removal(self) -> str:
        return "!" + self.name


@dataclass(frozen=True)
class KernelPlan:
    """What one probe's in-kernel aggregation installs, in installation order."""

    synthetics: tuple[Synthetic, ...]
    triggers: tuple[Trigger, ...]
    streams: tuple[SpanStream, ...] = ()  # written after the triggers: filter, then enable
    threads: tuple[Trigger, ...] = ()  # the tables keyed by thread (entry, return): renewed when they grow

    def removal(self) -> tuple[tuple[str, str], ...]:
        """(file, line) pairs that undo the plan: streamed events disabled (an enabled synthetic event is
        busy), triggers newest first, then the synthetic events."""
        out = [(s.path("enable"), "0") for s in self.streams]
        out += [(t.path, t.removal) for t in reversed(self.triggers)]
        out += [(SYNTHETIC_EVENTS, s.removal) for s in reversed(self.synthetics)]
        return tuple(out)


def _keys(labels: tuple[str, ...]) -> str:
    # An event with no labels still needs a key; common_pid.execname would grow with processes, a
    # constant-size key does not: `common_cpu` has at most one entry per CPU, and Totals' Hits is the count.
    return ",".join(labels) if labels else "common_cpu"


def _filter(where: str) -> str:
    return f" if {where}" if where else ""


def count_trigger(event: str, labels: tuple[str, ...] = (), where: str = "") -> Trigger:
    """Counts of `event` per label set (a hist keyed by the label fields)."""
    return Trigger(event, f"hist:keys={_keys(labels)}:vals=hitcount:sort=hitcount:size={HIST_SIZE}{_filter(where)}")


def synthetic_name(group: str, pair: str) -> str:
    return f"{group}_{pair}_lat"


def latency_plan(group: str, entry: str, exit_: str, pair: str, where: str = "",
                 exit_where: str | None = None, span_min_ns: int | None = None, span_ret: bool = False) -> KernelPlan:
    """Entry → return latency of `pair` per thread, as a `.log2` hist of ns with the sum.

    `entry`/`exit_` are "GROUP/EVENT" (a bare EVENT is in `group`); the synthetic event is named for
    `group` and the pair. The timestamp variable is named for the pair: the kernel refuses a `$var`
    that more than one trigger defines unless it is fully qualified. `exit_where` filters the return
    (default: `where`); a filter on entry arguments cannot apply there, so the agent passes "".
    With `span_min_ns` the synthetic event carries the entry's timestamp too and is streamed into the
    instance for calls of at least that many ns (SpanStream); `span_ret` adds the return's `ret` field.
    """
    exit_filter = where if exit_where is None else exit_where
    entry, exit_ = (e if "/" in e else f"{group}/{e}" for e in (entry, exit_))
    ts, lat = f"{pair}_ts0", f"{pair}_lat"
    spans = span_min_ns is not None
    synth = Synthetic(synthetic_name(group, pair), SPAN_FIELDS + SPAN_RET * span_ret if spans else LAT_FIELDS)
    on_entry = Trigger(entry, f"hist:keys=common_pid:{ts}=common_timestamp:clock={CLOCK}{_filter(where)}")
    on_exit = Trigger(
        exit_,
        f"hist:keys=common_pid:{lat}=common_timestamp-${ts}"
        f":clock={CLOCK}:onmatch({entry.replace('/', '.')})"
        f".trace({synth.name},${lat}{f',${ts},common_pid' if spans else ''}{',ret' * (spans and span_ret)})"
        f"{_filter(exit_filter)}",
    )
    buckets = Trigger(f"synthetic/{synth.name}", f"hist:keys=lat.log2:vals=hitcount,lat:sort=lat:size={HIST_SIZE}")
    streams = (SpanStream(f"synthetic/{synth.name}", span_min_ns),) if span_min_ns is not None else ()
    return KernelPlan((synth,), (on_entry, on_exit, buckets), streams, (on_entry, on_exit))


def listed(line: str) -> str:
    """A trigger line as the kernel lists it back in `trigger`/`hist` (for matching what we installed)."""
    return line.removesuffix(" [active]").removesuffix(" [paused]").strip()
