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

from kprobe_exporter import kernel, triggers
from kprobe_exporter.errors import TracefsError
from kprobe_exporter.kinds import PROBE_FILES, ProbeFile, ProbeKind, parse_definition
from kprobe_exporter.labels import arg_labels
from kprobe_exporter.probes import EventSpec, ProbeSet
from kprobe_exporter.raw.formats import field_names

CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# (type, (major, minor) kernels, what was seen): types a kernel accepts but that break it once the probe
# fires. symstr on Debian's 6.1.192 (a backport): a kprobe with %ip:symstr on do_sys_openat2 corrupts the
# slab within seconds of opens (GPF in kmem_cache_alloc, list_del corruption); see tests/test_kernel_lab.py.
BROKEN_TYPES: tuple[tuple[str, tuple[tuple[int, ...], ...], str], ...] = (
    ("symstr", ((6, 1),), "Debian 6.1.192: general protection faults in kmem_cache_alloc once the probe fires"),
)


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


# x86_64 pt_regs names the kernel's regs_query_register_offset() accepts, for a hint after it refused one.
X86_64_REGS = "ax bx cx dx si di bp sp ip flags cs ss orig_ax r8 r9 r10 r11 r12 r13 r14 r15 ds es fs gs".split()


def register_hint(reason: str) -> str:
    """`; did you mean %di?` after the kernel's `Invalid register name (at '%rdi')`."""
    m = re.search(r"Invalid register name \(at '%(\w+)", reason)
    near = difflib.get_close_matches(m.group(1), X86_64_REGS, n=1, cutoff=0.5) if m else []
    return f"; did you mean %{near[0]}?" if near else ""


def version_hint(kind: ProbeKind, release: str) -> str:
    """Why a kernel older than the kind may refuse it (the README's version table, from kinds.py's rows)."""
    have = kernel.version(release)
    if have == (0, 0) or have >= kind.since[:2]:
        return ""
    since = ".".join(map(str, kind.since))
    return f"; {kind.key} events came in Linux {since} ({kind.option}), this kernel is {release}"


def rejected_field(ev: EventSpec, entry: str) -> str:
    """The config field an error_log entry's caret points into: `args.NAME`, else the probe's kind (or `raw`)."""
    lines = entry.splitlines()
    if not ev.raw and ev.definition and len(lines) >= 3 and "Command: " in lines[1]:
        pos = lines[2].find("^") - (lines[1].find("Command: ") + len("Command: "))
        tokens = ev.definition.split(" ")
        end = -1
        for i, token in enumerate(tokens):
            end += len(token) + 1
            if pos <= end:
                if i >= 2 and i - 2 < len(ev.args):
                    return f"args.{ev.args[i - 2].name}"
                break
    return "raw" if ev.raw else ev.kind


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

    def __init__(self, root: Path, instance: str, group: str | None = None, pin: bool = False) -> None:
        self.mount = root  # where tracefs is mounted: for messages, and to notice it being unmounted
        self._root_fd = -1
        if pin:
            # Everything goes through a descriptor of the root, so that a tracefs unmounted under us
            # (umount -l) still lets us remove what we installed: no half state left in the kernel.
            self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            root = Path(f"/proc/self/fd/{self._root_fd}")
        self.root = root
        self.instance = instance
        self.group = group or instance
        self.inst = root / "instances" / instance
        self._defined: list[tuple[str, str]] = []  # (probe file, event name) we defined
        self._enabled: list[EventSpec] = []
        self._lock = threading.Lock()

    def show(self, path: Path | str) -> str:
        """A path as the user knows it (the mount point, not our pinned descriptor)."""
        return str(path).replace(str(self.root), str(self.mount)) if self._root_fd >= 0 else str(path)

    def mounted(self) -> bool:
        """Whether tracefs is still reachable where it was mounted (False after an unmount under us)."""
        if self._root_fd < 0:
            return (self.root / "instances").is_dir()
        try:
            here, ours = os.stat(self.mount / "instances"), os.stat(self.root / "instances")
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # --- capability -------------------------------------------------------------------
    def supports(self, probe_file: str) -> bool:
        return (self.root / probe_file).exists()

    def check_kinds(self, events: Iterable[EventSpec]) -> None:
        need: dict[str, list[EventSpec]] = {}
        for ev in events:
            if ev.dynamic and not self.supports(ev.probe_file):
                need.setdefault(ev.probe_file, []).append(ev)
        for probe_file, lacking in need.items():
            names = [ev.name for ev in lacking]
            raise TracefsError(f"this kernel has no {probe_file} (it lacks {lacking[0].probe_kind.option}); "
                               f"probes that need it: {', '.join(names)}", names[0], "kind")
        for ev in events:
            if not ev.dynamic and not (self.root / "events" / ev.target).is_dir():
                group, _, name = ev.target.partition("/")
                known = [p.name for p in (self.root / "events" / group).glob("*") if p.is_dir()]
                near = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {group}/{near[0]}?" if near else ""
                raise TracefsError(f"no tracepoint {ev.target} in this kernel{hint}", ev.name, ev.kind)
        self.check_types(events)

    def check_types(self, events: Iterable[EventSpec], release: str | None = None) -> None:
        """Refuse fetcharg types that this kernel takes but that corrupt its memory when the probe fires."""
        release = release or kernel.release()
        version = kernel.version(release)
        for ev in events:
            if not ev.dynamic or ev.probe_kind.user:
                continue  # the types seen breaking a kernel were in kernel probes
            for arg in ev.args:
                typ = re.search(r":(\w+)(?:\[\d+\])?$", arg.fetch)
                for broken, versions, seen in BROKEN_TYPES:
                    if typ and typ.group(1) == broken and version in versions:
                        raise TracefsError(
                            f"type '{broken}' corrupts kernel memory on this kernel ({release}; seen on {seen}); "
                            "use ':symbol' (the same text in the trace)", ev.name,
                            "raw" if ev.raw else f"args.{arg.name}")

    # --- group definitions ---------------------------------------------------------
    def own_definitions(self, group: str | None = None) -> list[tuple[str, str]]:
        """(probe file, event) of every definition in our group, from the probe files (kinds.PROBE_FILES)."""
        group = group or self.group
        found: list[tuple[str, str]] = []
        seen: set[str] = set()
        for probe_file in PROBE_FILES:
            path = self.root / probe_file.name
            if not path.exists():
                continue
            for line in read_text(path).splitlines():
                d = parse_definition(line)
                # dynamic_events lists the other files' definitions again: each event once, by its own file
                if d is not None and d.group == group and d.event is not None and d.event not in seen:
                    found.append((probe_file.name, d.event))
                    seen.add(d.event)
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
            # error_log is global: another writer's error can land meanwhile; ours echoes our command
            mine = [x for x in new if f"Command: {ev.definition}" in x] or new
            reason = kernel_reason(mine[-1]) if mine else os.strerror(e.errno or 0)
            for a in ev.args:  # the kernel points at the token as the user wrote it, not at the name we added
                if not a.named:
                    reason = reason.replace(f"(at '{a.name}={a.fetch}')", f"(at '{a.fetch}')")
            hint = self._symbol_hint(ev) if ev.probe_kind.symbol else ""
            hint += register_hint(reason) + version_hint(ev.probe_kind, kernel.release())
            raise TracefsError(f"the kernel rejected '{ev.definition}': {reason}{hint}", ev.name,
                               rejected_field(ev, mine[-1] if mine else "")) from None
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
            raise TracefsError(f"cannot create instance {self.show(self.inst)}: {e.strerror}") from None

    def configure(self, buffer_size_kb: int, record_tgid: bool, own_tids: Iterable[int]) -> None:
        self.set_buffer_size(buffer_size_kb)
        clocks = read_text(self.inst / "trace_clock")
        # 'mono' timestamps convert to wall time for spans; 'local' is not comparable across CPUs.
        write_file(self.inst / "trace_clock", "mono" if "mono" in clocks.split() or "[mono]" in clocks else "global")
        self.set_option("irq-info", False)  # less text for the kernel to format per event
        self.set_option("record-tgid", record_tgid)
        self.set_option("event-fork", True)  # threads we start later stay excluded
        self.exclude_pids(own_tids)

    def set_buffer_size(self, buffer_size_kb: int) -> None:
        try:
            write_file(self.inst / "buffer_size_kb", str(buffer_size_kb))
        except OSError as e:
            raise TracefsError(f"the kernel refused a ring buffer of {buffer_size_kb} KiB per CPU: {e.strerror}",
                               "", "buffer_size_kb") from None

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
            where = ""
            if 0 <= caret < len(filt):  # the kernel points at the operator after an unknown field: show both
                before = filt[:caret].split()
                near = " ".join([*before[-1:], filt[caret:].split(" ", 1)[0]])
                where = f" near {near!r}"
            raise TracefsError(f"the kernel rejected the filter {ev.filter!r}: {reason}{where}", ev.name,
                               "filter") from None

    def check_labels(self, ev: EventSpec) -> None:
        if ev.dynamic:
            return  # a probe's labels name its args, checked with the config
        fields = set(field_names(read_text(self.event_dir(ev) / "format")))
        for label in arg_labels(ev):  # the others come from label sources, not the record
            if label not in fields:
                raise TracefsError(f"label {label!r} is not a field of {ev.target} "
                                   f"(fields: {', '.join(sorted(f for f in fields if not f.startswith('common_')))})",
                                   ev.name, "labels")

    def enable(self, ev: EventSpec) -> None:
        write_file(self.event_dir(ev) / "enable", "1")
        self._enabled.append(ev)

    def install(self, probes: ProbeSet, buffer_size_kb: int, record_tgid: bool, own_tids: Iterable[int],
                define_only: frozenset[str] = frozenset()) -> None:
        """Instance, definitions, filters, enable; on any failure remove all of it and raise.

        `define_only`: events hist triggers aggregate in the kernel: defined, never enabled for reading."""
        try:
            self.create_instance()
            self.configure(buffer_size_kb, record_tgid, own_tids)
            self._add(probes.events, define_only)
        except BaseException as e:
            self.remove()
            if isinstance(e, OSError):
                raise TracefsError(f"{self.show(e.filename or self.inst)}: {e.strerror}") from None
            raise

    def _add(self, events: Iterable[EventSpec], define_only: frozenset[str] = frozenset()) -> None:
        events = list(events)
        for ev in events:
            if ev.dynamic:
                self.define(ev)
        for ev in events:
            self.check_labels(ev)
        streamed = [ev for ev in events if ev.name not in define_only]
        for ev in streamed:
            self.set_filter(ev)
        for ev in streamed:
            self.enable(ev)

    # --- changes on a live instance (reload) ----------------------------------------------
    def add_events(self, events: Iterable[EventSpec], define_only: frozenset[str] = frozenset()) -> None:
        """Define, filter and enable more events in the live instance; on failure take them back out."""
        events = list(events)
        defined, enabled = len(self._defined), len(self._enabled)
        try:
            self._add(events, define_only)
        except BaseException as e:
            with self._lock:
                for ev in self._enabled[enabled:]:
                    self._disable(ev)
                del self._enabled[enabled:]
                for probe_file, name in reversed(self._defined[defined:]):
                    try:
                        self.undefine(probe_file, name)
                    except TracefsError:
                        pass
                del self._defined[defined:]
            if isinstance(e, OSError):
                raise TracefsError(f"{self.show(e.filename or self.inst)}: {e.strerror}") from None
            raise

    def disable_events(self, events: Iterable[EventSpec]) -> list[str]:
        """Stop events in the live instance (their definitions stay until undefine_events). Problems."""
        problems = []
        names = {ev.name for ev in events}
        with self._lock:
            for ev in [e for e in self._enabled if e.name in names]:
                problem = self._disable(ev)
                if problem:
                    problems.append(problem)
            self._enabled = [e for e in self._enabled if e.name not in names]
        return problems

    def undefine_events(self, events: Iterable[EventSpec]) -> list[str]:
        """Remove the definitions of disabled events of ours. Problems."""
        problems = []
        names = {ev.name for ev in events if ev.dynamic}
        with self._lock:
            for probe_file, name in [d for d in self._defined if d[1] in names]:
                try:
                    self.undefine(probe_file, name)
                except TracefsError as e:
                    problems.append(e.message)
            self._defined = [d for d in self._defined if d[1] not in names]
        return problems

    def event_id(self, ev: EventSpec) -> int | None:
        """The kernel's id of an event: a definition removed and made again gets a new one."""
        try:
            return int(read_text(self.event_dir(ev) / "id"))
        except (OSError, ValueError):
            return None

    def _disable(self, ev: EventSpec) -> str:
        try:
            write_file(self.event_dir(ev) / "enable", "0")
        except OSError as e:
            return f"disable {ev.name}: {e.strerror}"
        return ""

    def remove(self) -> list[str]:
        """Disable, rmdir the instance, then undefine; the order the kernel needs. Returns problems."""
        problems: list[str] = []
        with self._lock:
            for ev in self._enabled:
                problem = self._disable(ev)
                if problem:
                    problems.append(problem)
            self._enabled.clear()
            problems += [self.show(p) for p in remove_instance(self.inst)]
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
        """Hits and misses per event of our group from kprobe_profile and uprobe_profile.

        The profile files print an event's name without its group, so another agent's event of the
        same name would be indistinguishable; both files list the definitions in the order of
        kprobe_events/uprobe_events, so lines are matched to definitions by position instead.
        """
        out: dict[str, tuple[int, int]] = {}
        for probe_file in PROBE_FILES:
            for name, cols in profile_rows(self.root, probe_file, self.group):
                _, hits, misses = probe_file.profile_counts(cols)
                if hits.isdigit() and misses.isdigit():
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


def profile_rows(root: Path, probe_file: ProbeFile, group: str) -> list[tuple[str, list[str]]]:
    """(event, columns of its profile line) for the definitions of one group, matched by position."""
    if probe_file.profile is None or not (root / probe_file.profile).exists():
        return []
    for _ in range(5):  # the lists can change between the two reads: then read both again
        defs = [ln for ln in read_text(root / probe_file.name).splitlines() if ln.strip()]
        rows = [ln.split() for ln in read_text(root / probe_file.profile).splitlines() if ln.strip()]
        parsed = [parse_definition(d) for d in defs]
        if len(rows) == len(defs) and all(
                d is not None and d.group is not None and len(r) >= 3
                and probe_file.profile_counts(r)[0].rpartition("/")[2] == d.event
                for d, r in zip(parsed, rows, strict=True)):
            return [(d.event, r) for d, r in zip(parsed, rows, strict=True)
                    if d is not None and d.event is not None and d.group == group]
    return []


def _ls(path: Path) -> list[Path]:
    try:
        return [path / name for name in os.listdir(path)]
    except OSError:
        return []


def _enable_files(inst: Path) -> list[Path]:
    # Groups come and go while we list (other agents define and remove theirs): each level may vanish.
    return [ev / "enable" for group in _ls(inst / "events") for ev in _ls(group)]


def remove_instance(inst: Path) -> list[str]:
    """Disable every event in an instance of ours and rmdir it (retrying while a reader lets go)."""
    problems: list[str] = []
    if not inst.exists():
        return problems
    for enable in _enable_files(inst):
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
    synthetics, problems = strip_instance(root, tfs.inst)  # triggers before the synthetic events they feed
    problems += remove_instance(tfs.inst)
    problems += remove_synthetics(root, synthetics)
    for probe_file, name in tfs.own_definitions():
        try:
            tfs.undefine(probe_file, name)
        except TracefsError as e:
            problems.append(e.message)
    return problems


_TRACE_TO = re.compile(r"\.trace\(([A-Za-z_][A-Za-z0-9_]*),|onmatch\([^)]*\)\.([A-Za-z_][A-Za-z0-9_]*)\(")


def strip_instance(root: Path, inst: Path) -> tuple[list[str], list[str]]:
    """A dead agent's triggers out of its own instance (every trigger there is its own).

    A trigger that defines a variable is busy while another reads it (seen on 6.1: the entry's
    timestamp trigger answers EBUSY until the return's `onmatch` trigger is gone), so removal goes
    round in passes until one removes nothing. Returns (the synthetic events they fed or sat on, problems).
    """
    synthetics: list[str] = []
    pending: list[tuple[Path, str]] = []
    events = inst / "events"
    for trig in sorted(events.glob("*/*/trigger")) if events.is_dir() else []:
        try:
            lines = [ln for ln in read_text(trig).splitlines() if ln.strip() and not ln.startswith("#")]
        except OSError:
            continue
        if lines and trig.parent.parent.name == triggers.SYNTHETIC_GROUP:
            synthetics.append(trig.parent.name)
        for line in reversed(lines):
            synthetics += [m.group(1) for m in _TRACE_TO.finditer(line) if m.group(1)]
            pending.append((trig, "!" + triggers.listed(line)))
    failed: list[tuple[Path, str, str]] = []
    while pending:
        failed = []
        for trig, line in pending:
            try:
                write_file(trig, line + "\n", append=True)
            except OSError as e:
                failed.append((trig, line, e.strerror or str(e)))
        if len(failed) == len(pending):
            break
        pending = [(t, ln) for t, ln, _ in failed]
    return list(dict.fromkeys(synthetics)), [f"{line} in {trig}: {why}" for trig, line, why in failed]


def remove_synthetics(root: Path, names: Iterable[str]) -> list[str]:
    problems = []
    path = root / triggers.SYNTHETIC_EVENTS
    defined = {ln.split()[0] for ln in read_text(path).splitlines() if ln.strip()} if path.exists() else set()
    for name in names:
        if name in defined:
            try:
                write_file(path, f"!{name}\n", append=True)
            except OSError as e:
                problems.append(f"!{name} in synthetic_events: {e.strerror}")
    return problems


def leftovers(root: Path, instance: str, group: str | None = None) -> Iterator[str]:
    tfs = Tracefs(root, instance, group)
    if tfs.inst.exists():
        yield f"instance {tfs.inst}"
    for probe_file, name in tfs.own_definitions():
        yield f"{probe_file}: {tfs.group}/{name}"
