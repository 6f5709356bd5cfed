"""Tracefs: find or mount it, own one instance and one event group, install and remove exactly those.

Never touches another group's probes, another instance, or the global buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import errno
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kprobe_exporter.probes import EventSpec, ProbeSet

CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_DEF_RE = re.compile(r"^[pr]\d*:([^/\s]+)/(\S+)\s")


class TracefsError(Exception):
    """The kernel refused something, or tracefs is unusable; the text says what and why."""

    def __init__(self, message: str, probe: str = "", field: str = "") -> None:
        super().__init__(message)
        self.message, self.probe, self.field = message, probe, field


def _mount_tracefs(where: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(b"nodev", where.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise TracefsError(f"tracefs is not mounted and mounting it at {where} failed: {os.strerror(err)}")


def find_tracefs(mount: bool = True) -> Path:
    """The tracefs root; mounts it at /sys/kernel/tracing when absent and we are root."""
    for c in CANDIDATES:
        if os.path.exists(os.path.join(c, "instances")):
            return Path(c)
    if not mount:
        raise TracefsError("tracefs is not mounted (looked in " + ", ".join(CANDIDATES) + ")")
    if os.geteuid() != 0:
        raise TracefsError("tracefs is not mounted and only root can mount it: "
                           "run as root or 'mount -t tracefs nodev /sys/kernel/tracing'")
    if not os.path.isdir(CANDIDATES[0]):
        raise TracefsError(f"{CANDIDATES[0]} does not exist: is this kernel built with CONFIG_TRACING?")
    _mount_tracefs(CANDIDATES[0])
    return Path(CANDIDATES[0])


def write_file(path: Path | str, text: str, append: bool = False) -> None:
    # open(path, "a") seeks and fails with EINVAL on *_events files; a plain O_APPEND write does not.
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_text(path: Path | str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def error_log_entries(text: str) -> list[str]:
    """Entries of tracefs error_log: each starts with '[timestamp]' and spans following lines."""
    entries: list[str] = []
    for line in text.splitlines():
        if line.startswith("[") or not entries:
            entries.append(line)
        else:
            entries[-1] += "\n" + line
    return [e for e in entries if e.strip()]


def kernel_reason(entry: str) -> str:
    """'error: Invalid register name' and the caret position squeezed into one line."""
    lines = entry.splitlines()
    head = re.sub(r"^\[\s*[\d.]+\]\s*", "", lines[0]) if lines else entry
    if len(lines) >= 3 and "Command:" in lines[1]:
        cmd_line, caret_line = lines[1], lines[2]
        col = caret_line.find("^")
        start = cmd_line.find("Command:") + len("Command: ")
        if col >= start:
            token = cmd_line[col:].split(" ", 1)[0]
            head += f" (at {token!r})"
    return head


@dataclass
class InstanceLock:
    """A live agent holds its instance through an abstract unix socket; a dead one's is gone."""

    sock: socket.socket

    @classmethod
    def acquire(cls, instance: str) -> InstanceLock:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(f"\0kprobe-exporter/{instance}")
        except OSError as e:
            s.close()
            if e.errno == errno.EADDRINUSE:
                raise TracefsError(f"instance {instance!r} is held by another live kprobe-exporter; "
                                   "give this one another 'instance' name") from None
            raise
        return cls(s)

    def release(self) -> None:
        self.sock.close()


class Tracefs:
    """One agent's view of tracefs: its instance directory and its event group."""

    def __init__(self, root: Path, instance: str, group: str | None = None) -> None:
        self.root = root
        self.instance = instance
        self.group = group or instance
        self.inst = root / "instances" / instance
        self._defined: list[tuple[str, str]] = []  # (probe file, event name) we defined
        self._enabled: list[EventSpec] = []
        self._lock = threading.Lock()

    # --- capability -------------------------------------------------------------------
    def supports(self, probe_file: str) -> bool:
        return (self.root / probe_file).exists()

    def check_kinds(self, events: Iterable[EventSpec]) -> None:
        need: dict[str, list[str]] = {}
        for ev in events:
            if ev.dynamic and not self.supports(ev.probe_file):
                need.setdefault(ev.probe_file, []).append(ev.name)
        for probe_file, names in need.items():
            option = "CONFIG_KPROBE_EVENTS" if probe_file == "kprobe_events" else "CONFIG_UPROBE_EVENTS"
            raise TracefsError(f"this kernel has no {probe_file} (it lacks {option}); "
                               f"probes that need it: {', '.join(names)}", names[0], "kind")
        for ev in events:
            if ev.kind == "tracepoint" and not (self.root / "events" / ev.target).is_dir():
                group, _, name = ev.target.partition("/")
                known = [p.name for p in (self.root / "events" / group).glob("*") if p.is_dir()]
                near = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {group}/{near[0]}?" if near else ""
                raise TracefsError(f"no tracepoint {ev.target} in this kernel{hint}", ev.name, "tracepoint")

    # --- group definitions ---------------------------------------------------------
    def own_definitions(self, group: str | None = None) -> list[tuple[str, str]]:
        """(probe file, event) of every definition in our group, from kprobe_events and uprobe_events."""
        group = group or self.group
        found = []
        for probe_file in ("kprobe_events", "uprobe_events"):
            path = self.root / probe_file
            if not path.exists():
                continue
            for line in read_text(path).splitlines():
                m = _DEF_RE.match(line + " ")
                if m and m.group(1) == group:
                    found.append((probe_file, m.group(2)))
        return found

    def define(self, ev: EventSpec) -> None:
        assert ev.definition is not None
        path = self.root / ev.probe_file
        log = self.root / "error_log"
        before = read_text(log) if log.exists() else ""
        try:
            write_file(path, ev.definition + "\n", append=True)
        except OSError as e:
            after = read_text(log) if log.exists() else ""
            new = [x for x in error_log_entries(after) if x not in error_log_entries(before)]
            reason = kernel_reason(new[-1]) if new else os.strerror(e.errno or 0)
            hint = self._symbol_hint(ev) if ev.kind in ("kprobe", "kretprobe") else ""
            raise TracefsError(f"the kernel rejected '{ev.definition}': {reason}{hint}", ev.name,
                               ev.kind) from None
        self._defined.append((ev.probe_file, ev.name))

    def _symbol_hint(self, ev: EventSpec) -> str:
        symbol = ev.function
        names = self.kernel_symbols()
        if not names or symbol in names:
            return ""
        near = difflib.get_close_matches(symbol, names, n=3, cutoff=0.6)
        hint = f", did you mean {', '.join(near)}?" if near else ""
        return f"; unknown symbol {symbol!r}{hint}"

    def kernel_symbols(self) -> list[str]:
        for path in (self.root / "available_filter_functions", Path("/proc/kallsyms")):
            try:
                text = read_text(path)
            except OSError:
                continue
            if path.name == "kallsyms":
                return list({ln.split()[2] for ln in text.splitlines() if len(ln.split()) >= 3})
            return list({ln.split()[0] for ln in text.splitlines() if ln.strip()})
        return []

    def undefine(self, probe_file: str, event: str, group: str | None = None) -> None:
        group = group or self.group
        for attempt in range(50):
            try:
                write_file(self.root / probe_file, f"-:{group}/{event}\n", append=True)
                return
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                if e.errno != errno.EBUSY or attempt == 49:
                    raise TracefsError(f"cannot remove {group}/{event}: {os.strerror(e.errno or 0)}") from None
                time.sleep(0.1)

    # --- instance -----------------------------------------------------------------
    def create_instance(self) -> None:
        try:
            self.inst.mkdir()
        except FileExistsError:
            raise TracefsError(f"instance {self.instance} exists; run 'kprobe-exporter cleanup'") from None
        except OSError as e:
            raise TracefsError(f"cannot create instance {self.inst}: {e.strerror}") from None

    def configure(self, buffer_size_kb: int, record_tgid: bool, own_tids: Iterable[int]) -> None:
        write_file(self.inst / "buffer_size_kb", str(buffer_size_kb))
        clocks = read_text(self.inst / "trace_clock")
        # 'mono' timestamps convert to wall time for spans; 'local' is not comparable across CPUs.
        write_file(self.inst / "trace_clock", "mono" if "mono" in clocks.split() or "[mono]" in clocks else "global")
        self.set_option("irq-info", False)  # less text for the kernel to format per event
        self.set_option("record-tgid", record_tgid)
        self.set_option("event-fork", True)  # threads we start later stay excluded
        self.exclude_pids(own_tids)

    def set_option(self, name: str, on: bool) -> None:
        path = self.inst / "options" / name
        if path.exists():
            write_file(path, "1" if on else "0")

    def exclude_pids(self, tids: Iterable[int]) -> None:
        """Our own threads never feed our probes (a uprobe on libc read + a reader is a loop)."""
        path = self.inst / "set_event_notrace_pid"
        if path.exists():
            for tid in tids:
                try:
                    write_file(path, f"{tid}\n", append=True)
                except OSError:
                    pass  # a thread that ended meanwhile

    def event_dir(self, ev: EventSpec) -> Path:
        return self.inst / "events" / ev.group / (ev.name if ev.dynamic else ev.target.partition("/")[2])

    def set_filter(self, ev: EventSpec) -> None:
        filt = ev.filter
        pidfilter = not (self.inst / "set_event_notrace_pid").exists()
        if pidfilter:  # old kernels: exclude our pid by filter instead
            own = f"common_pid != {os.getpid()}"
            filt = f"({filt}) && {own}" if filt else own
        if not filt:
            return
        path = self.event_dir(ev) / "filter"
        try:
            write_file(path, filt + "\n")
        except OSError:
            text = read_text(path).strip().splitlines()
            reason = " ".join(x.strip() for x in text if x.strip().startswith("parse_error")) or "rejected"
            caret = next((x.find("^") for x in text if "^" in x), -1)
            where = f" at {filt[caret:].split(' ', 1)[0]!r}" if 0 <= caret < len(filt) else ""
            raise TracefsError(f"the kernel rejected the filter {ev.filter!r}: {reason}{where}", ev.name,
                               "filter") from None

    def check_labels(self, ev: EventSpec) -> None:
        if ev.kind != "tracepoint":
            return
        fmt = read_text(self.event_dir(ev) / "format")
        fields = set(re.findall(r"field:[^;]*?(\w+)(?:\[\d*\])?;", fmt))
        for label in ev.labels:
            if label != "comm" and label not in fields:
                raise TracefsError(f"label {label!r} is not a field of {ev.target} "
                                   f"(fields: {', '.join(sorted(f for f in fields if not f.startswith('common_')))})",
                                   ev.name, "labels")

    def enable(self, ev: EventSpec) -> None:
        write_file(self.event_dir(ev) / "enable", "1")
        self._enabled.append(ev)

    def install(self, probes: ProbeSet, buffer_size_kb: int, record_tgid: bool, own_tids: Iterable[int]) -> None:
        """Instance, definitions, filters, enable; on any failure remove all of it and raise."""
        try:
            self.create_instance()
            self.configure(buffer_size_kb, record_tgid, own_tids)
            for ev in probes.events:
                if ev.dynamic:
                    self.define(ev)
            for ev in probes.events:
                self.check_labels(ev)
                self.set_filter(ev)
            for ev in probes.events:
                self.enable(ev)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> list[str]:
        """Disable, rmdir the instance, then undefine; the order the kernel needs. Returns problems."""
        problems: list[str] = []
        with self._lock:
            for ev in self._enabled:
                try:
                    write_file(self.event_dir(ev) / "enable", "0")
                except OSError as e:
                    problems.append(f"disable {ev.name}: {e.strerror}")
            self._enabled.clear()
            problems += remove_instance(self.inst)
            for probe_file, name in reversed(self._defined):
                try:
                    self.undefine(probe_file, name)
                except TracefsError as e:
                    problems.append(e.message)
            self._defined.clear()
        return problems

    def installed_names(self) -> set[str]:
        return {name for _, name in self._defined} | {ev.name for ev in self._enabled}

    def profile(self) -> dict[str, tuple[int, int]]:
        """Hits and misses per event of our group from kprobe_profile and uprobe_profile."""
        ours = {name for _, name in self._defined}
        out: dict[str, tuple[int, int]] = {}
        for probe_file in ("kprobe_profile", "uprobe_profile"):
            path = self.root / probe_file
            if not path.exists():
                continue
            for line in read_text(path).splitlines():
                cols = line.split()
                if probe_file == "kprobe_profile" and len(cols) >= 3:
                    name, hits, misses = cols[-3].rpartition("/")[2], cols[-2], cols[-1]
                elif probe_file == "uprobe_profile" and len(cols) >= 3:
                    name, hits, misses = cols[-2].rpartition("/")[2], cols[-1], "0"
                else:
                    continue
                if name in ours and hits.isdigit() and misses.isdigit():
                    out[name] = (int(hits), int(misses))
        return out

    def cpu_stats(self) -> dict[int, int]:
        """Per CPU, events the ring buffer lost: overrun plus dropped events."""
        out: dict[int, int] = {}
        per_cpu = self.inst / "per_cpu"
        for d in per_cpu.glob("cpu*"):
            try:
                text = read_text(d / "stats")
            except OSError:
                continue
            lost = 0
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("overrun", "dropped events"):
                    lost += int(value.strip() or 0)
            out[int(d.name[3:])] = lost
        return out


def remove_instance(inst: Path) -> list[str]:
    """Disable every event in an instance of ours and rmdir it (retrying while a reader lets go)."""
    problems: list[str] = []
    if not inst.exists():
        return problems
    for enable in inst.glob("events/*/*/enable"):
        try:
            if read_text(enable).strip() not in ("0", ""):
                write_file(enable, "0")
        except OSError:
            pass
    for attempt in range(50):
        try:
            inst.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError as e:
            if e.errno != errno.EBUSY or attempt == 49:
                problems.append(f"rmdir {inst}: {e.strerror}")
                break
            time.sleep(0.1)
    return problems


def cleanup(root: Path, instance: str, group: str | None = None) -> list[str]:
    """Remove what a dead agent of this instance left: its instance, then its group's definitions."""
    tfs = Tracefs(root, instance, group)
    problems = remove_instance(tfs.inst)
    for probe_file, name in tfs.own_definitions():
        try:
            tfs.undefine(probe_file, name)
        except TracefsError as e:
            problems.append(e.message)
    return problems


def leftovers(root: Path, instance: str, group: str | None = None) -> Iterator[str]:
    tfs = Tracefs(root, instance, group)
    if tfs.inst.exists():
        yield f"instance {tfs.inst}"
    for probe_file, name in tfs.own_definitions():
        yield f"{probe_file}: {tfs.group}/{name}"
