"""Agent: wires config → probes → tracefs → reader → aggregate → metrics/spans, and runs the loop."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from kprobe_exporter import tracefs as tfs_mod
from kprobe_exporter.aggregate import Aggregate
from kprobe_exporter.config import Config, split_host_port
from kprobe_exporter.metrics import Sources, make_registry
from kprobe_exporter.notify import SystemdNotifier
from kprobe_exporter.probes import ProbeSet
from kprobe_exporter.reader import ReaderError, TracePipeReader
from kprobe_exporter.tracefs import InstanceLock, Tracefs, TracefsError
from kprobe_exporter.web import WebServer, make_handler

log = logging.getLogger("kprobe_exporter")

HOUSEKEEPING_S = 1.0


class StartupError(Exception):
    """The environment refuses what the config asks (port in use, kernel lacks a probe kind, ...)."""

    def __init__(self, message: str, probe: str = "", field: str = "") -> None:
        super().__init__(message)
        self.message, self.probe, self.field = message, probe, field


def set_thread_name(name: str = "kprobe-exporter") -> None:
    """Name the thread (and so every thread it starts later) for ps, top and the trace's comm column."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def own_tids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [os.getpid()]


def make_aggregate(config: Config, probes: ProbeSet) -> Aggregate:
    return Aggregate(probes, config.buckets, config.label_limit, config.pending.max_pending,
                     config.pending.max_age)


@dataclass
class Agent:
    config: Config
    probes: ProbeSet
    listen: str
    notifier: SystemdNotifier = field(default_factory=SystemdNotifier)
    wrap_socket: Callable[..., object] | None = None
    authorize: Callable[..., bool] | None = None

    def __post_init__(self) -> None:
        self.stop_event = threading.Event()
        self.aggregate = make_aggregate(self.config, self.probes)
        self.heartbeat = time.time()
        self.tracefs: Tracefs | None = None
        self.profile: dict[str, tuple[int, int]] = {}
        self.fatal: str | None = None

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.stop_event.set()

    def healthy(self) -> tuple[bool, str]:
        age = time.time() - self.heartbeat
        if self.fatal:
            return False, self.fatal
        if age > 10:
            return False, f"reader loop stalled for {age:.0f}s"
        return True, "ok"

    def run(self) -> int:
        host, port = split_host_port(self.listen)
        set_thread_name()  # before any thread starts, so all of ours carry it
        lock = InstanceLock.acquire(self.config.instance)
        try:
            root = tfs_mod.find_tracefs()
            tfs = self.tracefs = Tracefs(root, self.config.instance)
            tfs.check_kinds(self.probes.events)
            # A killed predecessor of this instance left its group behind: ours to remove.
            for problem in tfs_mod.cleanup(root, self.config.instance):
                log.warning("cleanup of a previous run: %s", problem)
            sources = Sources(
                snapshot=self.aggregate.snapshot,
                probes=self.probes,
                installed=tfs.installed_names,
                profile=lambda: self.profile,
                heartbeat=lambda: self.heartbeat,
            )
            registry = make_registry(sources)
            try:
                web = WebServer(host, port, make_handler(registry, self.healthy, self.authorize))
            except OSError as e:
                raise StartupError(f"cannot listen on {self.listen}: {e.strerror}", "", "web.listen-address") from None
            try:
                tfs.install(self.probes, self.config.buffer_size_kb, record_tgid=False, own_tids=own_tids())
                reader = TracePipeReader(str(tfs.inst / "trace_pipe"))
            except BaseException:
                web.httpd.server_close()
                tfs.remove()
                raise
            web.start()
            tfs.exclude_pids(own_tids())  # the web thread, now that it exists
            log.info("installed %d events in instance %s; serving on %s", len(self.probes.events),
                     self.config.instance, self.listen)
            self.notifier.send("READY=1")
            try:
                self._loop(reader, tfs)
            finally:
                self.notifier.send("STOPPING=1")
                reader.close()
                problems = tfs.remove()
                for p in problems:
                    log.error("removing probes: %s", p)
                web.stop()
            return 1 if self.fatal else 0
        finally:
            lock.release()

    def _loop(self, reader: TracePipeReader, tfs: Tracefs) -> None:
        agg = self.aggregate
        next_housekeeping = 0.0
        while not self.stop_event.is_set():
            try:
                chunk = reader.read_chunk(0.1)
            except ReaderError as e:
                self.fatal = str(e)
                log.error("%s; stopping and removing what is left", e)
                return
            if chunk:
                agg.feed(chunk)
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_S
                self._housekeeping(tfs)
            self.heartbeat = time.time()
            self.notifier.ping()

    def _housekeeping(self, tfs: Tracefs) -> None:
        if not tfs.inst.exists():
            self.fatal = f"instance {tfs.inst} disappeared under the agent"
            self.stop_event.set()
            return
        try:
            for cpu, total in tfs.cpu_stats().items():
                self.aggregate.set_stats_lost(cpu, total)
            self.profile = tfs.profile()
        except (OSError, ValueError) as e:
            log.warning("reading tracefs stats: %s", e)
        self.aggregate.sweep(time.clock_gettime_ns(time.CLOCK_MONOTONIC))


def install_signal_handlers(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)


def check(config: Config, probes_for: Callable[[Config], ProbeSet]) -> list[str]:
    """Install into a scratch instance and group, read the kernel's view back, remove; lines to print."""
    scratch = f"kpe_check_{os.getpid()}"
    cfg = config.model_copy(update={"instance": scratch})
    probes = probes_for(cfg)
    root = tfs_mod.find_tracefs()
    tfs = Tracefs(root, scratch)
    tfs.check_kinds(probes.events)
    out: list[str] = []
    try:
        tfs.install(probes, 64, record_tgid=False, own_tids=[])
        readback = {}
        for probe_file in ("kprobe_events", "uprobe_events"):
            path = root / probe_file
            if path.exists():
                for line in tfs_mod.read_text(path).splitlines():
                    if f":{scratch}/" in line:
                        readback[line.split()[0].split("/", 1)[1]] = line
        for ev in probes.events:
            if ev.dynamic:
                assert ev.definition is not None
                mine = ev.definition.replace(scratch, config.instance)
                kernel = readback.get(ev.name, "(missing)").replace(scratch, config.instance)
                out.append(f"{ev.name}: {mine}\n  kernel: {kernel}")
            else:
                out.append(f"{ev.name}: tracepoint {ev.target} (enabled in instance {config.instance})")
    finally:
        problems = tfs.remove()
    if problems:
        raise TracefsError("; ".join(problems))
    return out


def leftovers(instance: str) -> list[str]:
    root = tfs_mod.find_tracefs(mount=False)
    return list(tfs_mod.leftovers(root, instance))


def cleanup(instance: str) -> list[str]:
    try:
        root = tfs_mod.find_tracefs(mount=False)
    except TracefsError:
        return []  # nothing mounted, nothing left
    if Path(root / "instances" / instance).exists() or tfs_mod.Tracefs(root, instance).own_definitions():
        try:
            lock = InstanceLock.acquire(instance)
        except TracefsError:
            raise TracefsError(f"instance {instance!r} belongs to a live kprobe-exporter; stop it first") from None
        try:
            return tfs_mod.cleanup(root, instance)
        finally:
            lock.release()
    return []
