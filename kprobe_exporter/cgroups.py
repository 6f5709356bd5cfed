"""Cgroups: the cgroup of a thread id, and the container, pod and systemd unit its path names.

Label sources for events: `CgroupOf` maps thread ids to cgroup paths from /proc/TID/cgroup, cached
and bounded per batch; `attribution` reads container_id, pod_uid and systemd_unit from a path as the
kubelet, containerd, CRI-O, Docker, Podman and systemd name their slices and scopes; `Rewrite` maps
paths to the values a user wants, anything unmatched to a fixed `other`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np

UNKNOWN = "unknown"  # no cgroup could be read for the thread (gone before first seen, or over budget)
OTHER = "other"  # rewrite rules are configured and none matched

# One path segment at a time. UIDs: 8-4-4-4-12 hex, the systemd cgroup driver writing the dashes as
# underscores (a dash separates slice levels); a static pod's is its config hash, 32 hex digits.
# Container ids are 64 hex digits.
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
_POD_SLICE = re.compile(rf"(?:[a-z]+-)*kubepods(?:-[a-z]+)*-pod({_UID})\.slice")  # systemd driver (kind too)
_POD_DIR = re.compile(rf"pod({_UID})")  # cgroupfs driver: /kubepods[/burstable|/besteffort]/pod<uid>
_RUNTIME_SCOPE = re.compile(r"(?:cri-containerd|crio|docker|libpod|nerdctl)-([0-9a-f]{64})(?:\.scope)?")
_BARE_ID = re.compile(r"[0-9a-f]{64}")  # cgroupfs driver (containerd, docker: /docker/<id>)
_UNIT = re.compile(r"[^/]+\.(?:service|scope)")


class Attribution(NamedTuple):
    """What a cgroup path says about where a thread ran; "" where it says nothing."""

    container_id: str
    pod_uid: str
    systemd_unit: str


@lru_cache(maxsize=4096)
def attribution(path: str) -> Attribution:
    """container_id, pod_uid and systemd_unit named by a cgroup path; the innermost wins.

    Innermost, because nested runtimes (kind, docker-in-docker) put a node's container above the
    pod's. A unit is the innermost .service or .scope that is not a container's own scope (a
    CRI-O `crio-conmon-<id>.scope` is the runtime's monitor: a unit, no container id).
    """
    container = pod = unit = ""
    for seg in path.split("/"):
        if m := _RUNTIME_SCOPE.fullmatch(seg):
            container, unit = m.group(1), ""
        elif _BARE_ID.fullmatch(seg):
            container, unit = seg, ""
        elif m := _POD_SLICE.fullmatch(seg) or _POD_DIR.fullmatch(seg):
            pod = m.group(1).replace("_", "-")
        elif _UNIT.fullmatch(seg):
            unit = seg
    return Attribution(container, pod, unit)


# Which hierarchy's path a thread's label comes from, in order of preference: the unified (v2)
# hierarchy, then systemd's own v1 hierarchy, then the v1 memory controller (the kubelet's
# cgroupfs driver creates its tree in every controller), then any other.
_PREFERRED = ("", "name=systemd", "memory")


def pick_path(text: str) -> str:
    """The path that attributes a thread, from the text of /proc/TID/cgroup (v2, v1 or hybrid).

    The first path in preference order that names a container or pod; else the first that is not
    the root (a hybrid host shows `0::/` for threads placed by v1-only tools); else "/".
    """
    by_ctl: dict[str, str] = {}
    rest: list[str] = []
    for line in text.splitlines():
        _, _, tail = line.partition(":")
        ctl, _, path = tail.partition(":")
        if not path:
            continue
        by_ctl.setdefault(ctl, path)
        if ctl not in _PREFERRED:
            rest.append(path)
    ordered = [by_ctl[c] for c in _PREFERRED if c in by_ctl] + rest
    for p in ordered:
        a = attribution(p)
        if a.container_id or a.pod_uid:
            return p
    return next((p for p in ordered if p != "/"), "/")


@dataclass(frozen=True)
class RewriteRule:
    """A path that `match` finds (re.search) becomes `replace`, expanded with its groups (\\1, \\g<name>)."""

    match: re.Pattern[str]
    replace: str


class Rewrite:
    """Cgroup paths to label values: the first matching rule wins; no rule matches: `other`.

    No rules at all: the path itself. `unknown` stays `unknown`. Results are kept per path (a few
    hundred distinct paths on a busy node; cleared past `max_kept` so short-lived cgroups cannot
    grow it without bound).
    """

    def __init__(self, rules: Iterable[RewriteRule] = (), max_kept: int = 16384) -> None:
        self.rules = tuple(rules)
        self.max_kept = max_kept
        self._kept: dict[str, str] = {}

    @classmethod
    def from_config(cls, items: Iterable[dict[str, str]]) -> Rewrite:
        """From `[{match: REGEX, replace: STR}, ...]`; a bad regex raises re.error (the config reports it)."""
        return cls(RewriteRule(re.compile(d["match"]), d["replace"]) for d in items)

    def __call__(self, path: str) -> str:
        v = self._kept.get(path)
        if v is None:
            v = self._apply(path)
            if len(self._kept) >= self.max_kept:
                self._kept.clear()
            self._kept[path] = v
        return v

    def _apply(self, path: str) -> str:
        if not self.rules or path == UNKNOWN:
            return path
        for rule in self.rules:
            m = rule.match.search(path)
            if m is not None:
                return m.expand(rule.replace)
        return OTHER


@dataclass
class CgroupCounts:
    """Why values were what they were, for self-metrics (monotonic counts)."""

    over_budget: int = 0  # tids answered `unknown` because the batch's /proc budget was spent
    gone: int = 0  # lookups that found thread (and process) gone before first seen: `unknown`
    via_tgid: int = 0  # thread gone, answered from its still-running process
    exited_kept: int = 0  # rechecks that found the thread gone: its last value kept
    reused: int = 0  # rechecks that found a new thread under the tid (other start time)
    migrated: int = 0  # rechecks that found the same thread in another cgroup
    reads: int = 0  # tids resolved from /proc (two small reads each)


@dataclass(slots=True)
class _Entry:
    start: bytes  # /proc/TID/stat field 22, the thread's start time in clock ticks since boot; b"": never seen
    path: str
    checked_at: float


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        parts = [os.read(fd, 8192)]
        while parts[-1]:  # a v1 host's file can pass a page (a dozen hierarchies, nested paths)
            parts.append(os.read(fd, 8192))
        return b"".join(parts)
    except OSError:
        return None
    finally:
        os.close(fd)


@dataclass
class CgroupOf:
    """Thread id -> cgroup path, for a batch of events at a time.

    A cached answer is trusted for `recheck_s` (default 1 s); then the next batch that needs it reads
    /proc again: a different start time means the tid was reused, the same start time and another
    path means the thread migrated. A tid gone before it was first seen answers for its process
    (given `tgids`, else through `tgid_of`) or `unknown`, and that answer too stands for `recheck_s`.
    Polling is the only sound signal: `cgroup.procs` cannot be watched, and `cgroup.events` changes only when a cgroup
    becomes (un)populated, not when one thread leaves it. Runtimes and systemd move a task before it
    execs its workload, so a migration after the first sighting is rare; a 1 s window costs two /proc
    reads per distinct tid per second (a few hundred tids: ~5 ms of CPU per second). A thread found
    gone keeps its last value: its events may still be in the ring buffer. At most `budget` tids per
    batch are resolved; the rest answer `unknown` (no entry yet) or their cached value (recheck
    deferred to the next batch). Entries not rechecked for `forget_s` are dropped.
    """

    proc: str = "/proc"
    recheck_s: float = 1.0
    budget: int = 128
    forget_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    counts: CgroupCounts = field(default_factory=CgroupCounts)
    # the process of a thread gone before its first lookup, where the caller has no tgids: the agent's
    # is the kernel's saved_tgids table (tasks.Tasks; filled with record-tgid on), -1 when unknown
    tgid_of: Callable[[int], int] | None = None

    def __post_init__(self) -> None:
        self._cache: dict[int, _Entry] = {}
        self._swept_at = self.clock()

    def values(self, tids: Sequence[int] | np.ndarray, tgids: Sequence[int] | None = None) -> list[str]:
        """The cgroup path of each tid (`unknown` where none can be had); `tgids`, when the
        records carry them, answer for threads that exited while their process lives on."""
        u, owners, inv = distinct(tids, tgids)
        return spread(list(self.lookup(u, owners).values()), inv)

    def lookup(self, tids: Sequence[int], tgids: Sequence[int] | None = None) -> dict[int, str]:
        """The cgroup path of each distinct tid: for a caller that has already grouped its events
        (a Counter keyed by tid), so the cost is per distinct thread, not per event."""
        if hasattr(tids, "tolist"):
            tids = tids.tolist()
        if tgids is not None and hasattr(tgids, "tolist"):
            tgids = tgids.tolist()
        now = self.clock()
        cache, horizon = self._cache, now - self.recheck_s
        # distinct tids first (C speed): a batch repeats a few hundred tids thousands of times
        owner = dict.fromkeys(tids) if tgids is None else dict(zip(tids, tgids, strict=True))
        out: dict[int, str] = {}
        spent = 0
        for tid, tgid in owner.items():
            e = cache.get(tid)
            if e is not None and e.checked_at > horizon:
                out[tid] = e.path
            elif spent < self.budget:
                spent += 1
                out[tid] = self._resolve(tid, e, now, tid if tgid is None else tgid)
            elif e is not None:
                out[tid] = e.path
            else:
                self.counts.over_budget += 1
                out[tid] = UNKNOWN
        if now - self._swept_at > self.forget_s:
            self._sweep(now)
        return out

    def forget(self, tids: Iterable[int]) -> None:
        """Drop the entries of threads known to have exited (e.g. from sched_process_exit)."""
        for t in tids:
            self._cache.pop(t, None)

    def _resolve(self, tid: int, e: _Entry | None, now: float, tgid: int) -> str:
        self.counts.reads += 1
        found = self._read_task(tid)
        if found is None:
            if e is not None and e.start:  # seen alive: its events may still be in the ring buffer
                self.counts.exited_kept += 1
                e.checked_at = now
                return e.path
            # never seen alive: its process's cgroup stands in, or none; either is kept for recheck_s
            # like any answer, so a gone tid costs one look per window, not one per batch
            if tgid == tid and self.tgid_of is not None:
                tgid = self.tgid_of(tid)
            if tgid > 0 and tgid != tid and (found := self._read_task(tgid)) is not None:
                self.counts.via_tgid += 1
                path = found[1]
            else:
                self.counts.gone += 1
                path = UNKNOWN
            self._cache[tid] = _Entry(b"", path, now)
            return path
        start, path = found
        if e is not None:
            if e.start != start:
                self.counts.reused += 1
            elif e.path != path:
                self.counts.migrated += 1
        self._cache[tid] = _Entry(start, path, now)
        return path

    def _read_task(self, tid: int) -> tuple[bytes, str] | None:
        stat = _read(f"{self.proc}/{tid}/stat")
        cg = _read(f"{self.proc}/{tid}/cgroup")
        if stat is None or cg is None:
            return None
        fields = stat.rpartition(b")")[2].split()
        if len(fields) < 20:
            return None
        return fields[19], pick_path(cg.decode("utf-8", "backslashreplace"))

    def _sweep(self, now: float) -> None:
        old = now - self.forget_s
        self._cache = {t: e for t, e in self._cache.items() if e.checked_at > old}
        self._swept_at = now


class SavedTgids:
    """tid -> tgid from the kernel's `saved_tgids` table (tracefs), for threads already gone from /proc.

    The kernel fills it when a task is switched out while record-tgid is on in some instance, and keeps
    it after the task exits: what a trace record does not carry, it does. The table (up to pid_max
    lines) is read again only when a tid is missing from the copy or the copy is older than `max_age_s`,
    at most every `min_interval_s`: it is asked only about threads gone before their first lookup.
    """

    def __init__(self, tracefs_root: str, max_age_s: float = 1.0, min_interval_s: float = 0.01,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = f"{tracefs_root}/saved_tgids"
        self.max_age_s, self.min_interval_s, self.clock = max_age_s, min_interval_s, clock
        self._table: dict[int, int] = {}
        self._read_at = -1e9

    def __call__(self, tid: int) -> int:
        now = self.clock()
        t = self._table.get(tid)
        if (t is None or now - self._read_at > self.max_age_s) and now - self._read_at >= self.min_interval_s:
            self._table, self._read_at = self._read(), now
            t = self._table.get(tid)
        return t if t is not None and t > 0 else -1

    def _read(self) -> dict[int, int]:
        text = _read(self.path) or b""
        out: dict[int, int] = {}
        for line in text.split(b"\n"):
            k, _, v = line.partition(b" ")
            if k.isdigit() and v.isdigit():
                out[int(k)] = int(v)
        return out


LABELS = ("cgroup", "container_id", "pod_uid", "systemd_unit")
# Span attributes under OpenTelemetry's semantic-convention names (kube.py's labels included);
# systemd_unit has none. Spans leave out "" and `unknown` values rather than send them.
SPAN_ATTRIBUTES = {"cgroup": "process.linux.cgroup", "container_id": "container.id", "pod_uid": "k8s.pod.uid",
                   "pod": "k8s.pod.name", "namespace": "k8s.namespace.name", "container": "k8s.container.name"}


class CgroupLabels:
    """The cgroup label sources of one probe as one registry entry: one lookup for all of them.

    `names` from LABELS. `cgroup` is the path through `rewrite` (none: the path itself); the others
    are fields of its attribution, "" where the path names none (Prometheus treats an empty label
    as absent). `unknown` stays `unknown` for every label.
    """

    def __init__(self, names: Sequence[str], of: CgroupOf, rewrite: Rewrite | None = None) -> None:
        bad = [n for n in names if n not in LABELS]
        if bad:
            raise ValueError(f"not a cgroup label: {bad[0]!r} (one of {', '.join(LABELS)})")
        self.names = tuple(names)
        self.of = of
        self._maps = [_label_map(n, rewrite) for n in self.names]

    def by_tid(self, tids: Sequence[int], tgids: Sequence[int] | None = None) -> dict[int, tuple[str, ...]]:
        """One tuple of label values (in `names` order) per distinct tid: the cheap form, for a
        caller that counts events by tid first and labels the distinct keys."""
        paths = self.of.lookup(tids, tgids)
        rows = {p: self.row(p) for p in set(paths.values())}
        return {t: rows[p] for t, p in paths.items()}

    def row(self, path: str) -> tuple[str, ...]:
        """The label values (in `names` order) of a cgroup path."""
        return tuple(f(path) for f in self._maps)

    def columns(self, tids: Sequence[int], tgids: Sequence[int] | None = None) -> dict[str, list[str]]:
        """Each label's value for each event, in batch order."""
        u, owners, inv = distinct(tids, tgids)
        paths = list(self.of.lookup(u, owners).values())
        return {n: spread([f(p) for p in paths], inv) for n, f in zip(self.names, self._maps, strict=True)}

    def values(self, tids: Sequence[int], tgids: Sequence[int] | None = None) -> list[tuple[str, ...]]:
        """One tuple of label values (in `names` order) per event."""
        cols = self.columns(tids, tgids)
        return list(zip(*(cols[n] for n in self.names), strict=True))


def distinct(tids: Sequence[int] | np.ndarray, tgids: Sequence[int] | None = None) -> tuple[list[int], list[int] | None,
                                                                               np.ndarray]:
    """A batch's distinct tids (with the tgid of each tid's first event) and, per event, the index of
    its tid among them: the lookups are per distinct thread, the spreading back is numpy's."""
    col = np.asarray(tids, dtype=np.int64)
    if tgids is None:
        u, inv = np.unique(col, return_inverse=True)
        return u.tolist(), None, inv.reshape(-1)
    u, first, inv = np.unique(col, return_index=True, return_inverse=True)
    return u.tolist(), np.asarray(tgids, dtype=np.int64)[first].tolist(), inv.reshape(-1)


def spread(per_distinct: list[str], inv: np.ndarray) -> list[str]:
    """Per-distinct values back to one per event."""
    vals = np.empty(len(per_distinct), dtype=object)
    vals[:] = per_distinct
    out: list[str] = vals[inv].tolist()
    return out


def _label_map(name: str, rewrite: Rewrite | None) -> Callable[[str], str]:
    if name == "cgroup":
        return rewrite if rewrite is not None else str
    idx = LABELS.index(name) - 1
    return lambda p: p if p == UNKNOWN else attribution(p)[idx]
