"""Agent: wires config → probes → tracefs → reader → aggregate → metrics/spans, and runs the loop."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client.registry import CollectorRegistry

from kprobe_exporter import aggmode, raw
from kprobe_exporter import reload as reload_mod
from kprobe_exporter import tracefs as tfs_mod
from kprobe_exporter.aggmode import KernelSupport, ProbeMode
from kprobe_exporter.aggregate import Aggregate, Snapshot
from kprobe_exporter.cgroups import CgroupOf, Rewrite, SavedTgids
from kprobe_exporter.config import Config, split_host_port
from kprobe_exporter.errors import TracefsError, UserError
from kprobe_exporter.kernelagg import KernelSource, KernelView
from kprobe_exporter.kinds import PROBE_FILES, parse_definition
from kprobe_exporter.kube import KUBE_LABELS, PodMetadata, PodSource
from kprobe_exporter.labels import LabelContext, needs_tgid
from kprobe_exporter.metrics import Sources, SpanCounts, make_registry
from kprobe_exporter.notify import SystemdNotifier
from kprobe_exporter.probes import EventSpec, ProbeSet, container_targets
from kprobe_exporter.reader import EventReader, ReaderError, TextReader
from kprobe_exporter.spans import SpanShipper
from kprobe_exporter.tasks import Tasks
from kprobe_exporter.tracefs import InstanceLock, Tracefs
from kprobe_exporter.web import WebServer, make_handler

if TYPE_CHECKING:
    from kprobe_exporter.otlp_metrics import OtlpMetricsPush

log = logging.getLogger("kprobe_exporter")

HOUSEKEEPING_S = 1.0


def set_thread_name(name: str = "kprobe-exporter") -> None:
    """Name the thread (and so every thread it starts later) for ps, top and the trace's comm column."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def pod_list(probes: ProbeSet) -> PodMetadata | None:
    """The node's pod list (not yet started) when a probe has a pod label and the agent runs in
    Kubernetes (a service-account token, NODE_NAME and the API server's address); else None."""
    if not any(lb in KUBE_LABELS for ev in probes.events for lb in ev.labels):
        return None
    src = PodSource.from_env()
    return PodMetadata(src.fetch) if src is not None else None


def kernel_support() -> KernelSupport:
    """What this kernel offers for kernel aggregation (nothing when tracefs is not there to tell)."""
    try:
        return KernelSupport.detect(tfs_mod.find_tracefs())
    except TracefsError:
        return KernelSupport(False, False)


def resolve_modes(config: Config, probes: ProbeSet, support: KernelSupport | None = None,
                  ) -> tuple[dict[str, ProbeMode], ProbeSet]:
    """Each probe's aggregation mode and the probe set that streams (raises UserError for an
    unhonourable `kernel`)."""
    modes = aggmode.resolve(config, probes, support if support is not None else kernel_support())
    return modes, aggmode.streamed(probes, modes)


def own_tids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [os.getpid()]


def make_aggregate(config: Config, probes: ProbeSet, cgroup_of: CgroupOf | None = None,
                   pods: PodMetadata | None = None) -> Aggregate:
    """`cgroup_of`: the agent's one tid -> cgroup cache, kept across reloads (a new one per call without);
    `pods`: the node's pod list, None outside Kubernetes (the pod labels are left out)."""
    rewrite = Rewrite.from_config(r.model_dump() for r in config.cgroup_rewrite) if config.cgroup_rewrite else None
    ctx = LabelContext(cgroup_of if cgroup_of is not None else CgroupOf(), rewrite, pods)
    return Aggregate(probes, config.buckets, config.label_limit, config.pending.max_pending,
                     config.pending.max_age, ctx)


@dataclass
class Agent:
    config: Config
    probes: ProbeSet
    listen: str
    notifier: SystemdNotifier = field(default_factory=SystemdNotifier)
    wrap_socket: Callable[[socket.socket], socket.socket] | None = None
    authorize: Callable[..., bool] | None = None
    # SIGHUP reloads from here: the config file read again and its probe set (raises UserError)
    reload_source: Callable[[], tuple[Config, ProbeSet]] | None = None
    support: KernelSupport | None = None  # None: detected from tracefs

    def __post_init__(self) -> None:
        self.stop_event = threading.Event()
        self.cgroup_of = CgroupOf()
        self.pods = pod_list(self.probes)
        # self.probes: every event the agent defines; self.stream: the ones the reader and aggregate get
        self.modes, self.stream = resolve_modes(self.config, self.probes, self.support)
        self.kernel: KernelSource | None = None
        self.aggregate = make_aggregate(self.config, self.stream, self.cgroup_of, self.pods)
        self.heartbeat = time.time()
        self.tracefs: Tracefs | None = None
        self.profile: dict[str, tuple[int, int]] = {}
        self.fatal: str | None = None
        self.reload_requested = False
        self.sources: Sources | None = None
        # Counts carried over from the configs before a reload (see reload.py), and what scrapes read:
        # one tuple, replaced whole, so a scrape never sees a base without its aggregate.
        self.base: Snapshot | None = None
        self._view: tuple[Snapshot | None, Aggregate, int] = (None, self.aggregate, self.config.label_limit)
        self._stats_seen: dict[int, int] = {}  # per-CPU loss totals of the instance, as last read
        self._stats_offset: dict[int, int] = {}  # the part of them counted by aggregates before a reload
        self._binaries: dict[str, tuple[int, int] | None] = {}  # uprobe -> the binary it was defined on
        self.shipper: SpanShipper | None = None
        self._attach_spans(self.aggregate, self.stream)
        self.containers = container_targets(self.config, self.probes)  # issue #16: see _recontain

    def _attach_spans(self, agg: Aggregate, probes: ProbeSet) -> None:
        """Pairs with `spans:` feed the shipper; it starts with the first such pair and stays for reloads."""
        policies = {p.name: p.spans for p in probes.pairs if p.spans is not None}
        policies |= {ks.pair.name: ks.pair.spans for ks in probes.kernel_spans if ks.pair.spans is not None}
        if not policies:
            return
        if self.shipper is None:
            try:
                self.shipper = SpanShipper(policies=policies)
            except ValueError as e:  # an unsupported OTEL_EXPORTER_OTLP_PROTOCOL
                raise UserError(str(e), "", "OTEL_EXPORTER_OTLP_PROTOCOL") from None
            if self.sources is not None:  # added by a reload: the agent already runs
                if self.tracefs is not None:
                    self.tracefs.set_option("record-tgid", True)
                self.shipper.start()
        else:
            self.shipper.set_policies(policies)
        for name, policy in policies.items():
            agg.set_sink(name, policy, self.shipper.sink)

    def span_counts(self) -> SpanCounts | None:
        s = self.shipper
        return SpanCounts(s.exported, s.dropped) if s is not None else None

    def exemplar(self, pair: str) -> tuple[str, float, float] | None:
        ex = self.shipper.exemplar(pair) if self.shipper is not None else None
        return (ex.trace_id, ex.duration_s, ex.timestamp_s) if ex is not None else None

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.stop_event.set()

    def request_reload(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.reload_requested = True  # the loop applies it; nothing else is safe in a signal handler

    def snapshot(self) -> Snapshot:
        base, agg, label_limit = self._view
        return reload_mod.merge(base, agg.snapshot(), label_limit)

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
            tfs = self.tracefs = Tracefs(root, self.config.instance, pin=True)
            self.cgroup_of.tgid_of = SavedTgids(str(root))  # issue #16: a gone thread's process
            tfs.check_kinds(self.probes.events)
            # A killed predecessor of this instance left its group behind: ours to remove.
            for problem in tfs_mod.cleanup(root, self.config.instance):
                log.warning("cleanup of a previous run: %s", problem)
            web, push = self._web(tfs, host, port)
            try:
                # process.pid of a span is the tgid: the trace prints it only with record-tgid on
                tfs.install(self.probes, self.config.buffer_size_kb,
                            record_tgid=self.shipper is not None or needs_tgid(self.stream.events),
                            own_tids=own_tids(), define_only=self._kernel_names(self.modes))
                self.kernel = KernelSource(tfs.root, tfs.inst, self.probes.group, self.config.label_limit)
                self.kernel.install(self.modes.values())
                reader = self._open_reader(tfs)
                self._binaries = {ev.name: reload_mod.file_identity(ev) for ev in self.probes.events}
            except BaseException:
                web.httpd.server_close()
                if self.kernel is not None:
                    self.kernel.remove()
                tfs.remove()
                raise
            web.start()
            if self.shipper is not None:
                self.shipper.start()
            if self.pods is not None:
                self.pods.start()
            if push is not None:
                push.start()
            tfs.exclude_pids(own_tids())  # the web and span threads, now that they exist
            log.info("installed %d events in instance %s; serving on %s", len(self.probes.events),
                     self.config.instance, self.listen)
            self.notifier.send("READY=1")
            try:
                self._loop(reader, tfs)
            finally:
                self._stop(reader, tfs, web, push)
                if self.pods is not None:
                    self.pods.stop()
            return 1 if self.fatal else 0
        finally:
            if self.tracefs is not None:
                self.tracefs.close()
            lock.release()

    @staticmethod
    def _kernel_names(modes: dict[str, ProbeMode]) -> frozenset[str]:
        return frozenset(ev.name for ev in aggmode.kernel_events(modes))

    def probe_modes(self) -> list[tuple[str, str, str]]:
        return [(name, m.mode, m.reason) for name, m in self.modes.items()]

    def kernel_view(self) -> KernelView | None:
        return self.kernel.read() if self.kernel is not None else None

    def _web(self, tfs: Tracefs, host: str, port: int) -> tuple[WebServer, OtlpMetricsPush | None]:
        """The collector's sources, the web server (bound, not yet serving) and the OTLP metrics push."""
        sources = self.sources = Sources(
            snapshot=self.snapshot,
            probes=self.probes,
            installed=tfs.installed_names,
            profile=lambda: self.profile,
            heartbeat=lambda: self.heartbeat,
            spans=self.span_counts,
            exemplar=self.exemplar,
            kernel=self.kernel_view,
            modes=lambda: self.modes,
        )
        registry = make_registry(sources)
        push = self._metrics_push(registry, sources)
        try:
            handler = make_handler(registry, self.healthy, self.authorize, self.probe_modes)
            web = WebServer(host, port, handler, self.wrap_socket)
        except OSError as e:
            raise UserError(f"cannot listen on {self.listen}: {e.strerror}", "", "web.listen-address") from None
        return web, push

    def _stop(self, reader: EventReader, tfs: Tracefs, web: WebServer, push: OtlpMetricsPush | None) -> None:
        self.notifier.send("STOPPING=1")
        reader.close()
        problems = self.kernel.remove() if self.kernel is not None else []  # triggers before probes
        problems += tfs.remove()
        if self.shipper is not None:
            self.shipper.shutdown(timeout_s=5.0)  # flush what is queued, bounded
        if push is not None:
            push.shutdown()  # the final counts, bounded by the exporter's timeout
        for p in problems:
            log.error("removing probes: %s", p)
        web.stop()

    def _metrics_push(self, registry: CollectorRegistry, sources: Sources) -> OtlpMetricsPush | None:
        if self.config.otlp_metrics is None:
            return None
        from kprobe_exporter.otlp_metrics import OtlpMetricsPush  # the OTel SDK loads only when asked for

        try:
            push = OtlpMetricsPush(registry, self.config.otlp_metrics.interval)
        except ValueError as e:  # an unsupported OTEL_EXPORTER_OTLP_PROTOCOL
            raise UserError(str(e), "", "OTEL_EXPORTER_OTLP_PROTOCOL") from None
        sources.extra.append(push.families)
        return push

    def _open_reader(self, tfs: Tracefs) -> EventReader:
        """`reader: raw` reads the per-CPU ring buffers; where they cannot be read or decoded, the text
        reader, with the reason logged (no numbers at all beat wrong ones, and text is never wrong)."""
        if self.config.reader == "raw":
            try:
                reader = raw.RawReader.open(tfs.inst, tfs.root, self.stream, tfs.event_dir,
                                             spans=self.shipper is not None)
                log.info("reader: raw (per-CPU trace_pipe_raw, %d-byte pages, nanosecond timestamps)",
                         reader.layout.page_size)
                return reader
            except raw.RawUnsupported as e:
                log.warning("reader: the raw reader cannot serve this config here (%s); reading trace_pipe text", e)
        # live: a `<...>` the kernel printed can still be named, from /proc (its tables had no entry)
        return TextReader(str(tfs.inst / "trace_pipe"), self.stream, Tasks(tfs.root))

    def _loop(self, reader: EventReader, tfs: Tracefs) -> None:
        agg = self.aggregate
        next_housekeeping = 0.0
        while not self.stop_event.is_set():
            try:
                batch = reader.read(0.1)
            except ReaderError as e:
                self.fatal = str(e)
                log.error("%s; stopping and removing what is left", e)
                return
            if batch is not None:
                agg.feed(batch)
            if self.reload_requested:
                try:
                    self._reload(reader, tfs)
                except ReaderError as e:
                    self.fatal = str(e)
                    log.error("%s; stopping and removing what is left", e)
                    return
                agg = self.aggregate
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_S
                self._housekeeping(tfs)
            self.heartbeat = time.time()
            self.notifier.ping()

    def _housekeeping(self, tfs: Tracefs) -> None:
        if not tfs.mounted():
            self.fatal = f"tracefs was unmounted from {tfs.mount} under the agent"
        elif not tfs.inst.exists():
            self.fatal = f"instance {tfs.show(tfs.inst)} disappeared under the agent"
        if self.fatal:
            log.error("%s; stopping and removing what is left", self.fatal)
            self.stop_event.set()
            return
        try:
            for cpu, total in tfs.cpu_stats().items():
                self._stats_seen[cpu] = total
                self.aggregate.set_stats_lost(cpu, total - self._stats_offset.get(cpu, 0))
            self.profile = tfs.profile()
        except (OSError, ValueError) as e:
            log.warning("reading tracefs stats: %s", e)
        self.aggregate.sweep(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        self._recontain()

    # --- uprobes in containers (issue #16) ----------------------------------------------------------
    def _recontain(self) -> None:
        """A container-bound uprobe whose container restarted onto another file is defined again, by the
        reload path (the config file read again, the PID resolved anew, counts carried)."""
        if self.containers.targets and self.containers.moved():
            log.info("containers restarted: %s; defining their probes again", "; ".join(self.containers.notes))
            self.containers.notes.clear()
            self.reload_requested = True

    # --- hot reload (SIGHUP) ----------------------------------------------------------------
    def _reload(self, reader: EventReader, tfs: Tracefs) -> None:
        """Apply the config file's new version: only the probes that changed go and come.

        Everything that can fail is tried before anything changes: the file, the probe set, the
        kernel's verdict on the new events (installed in a scratch instance and group, then removed).
        A refused reload logs why and leaves the running config as it was.
        """
        self.reload_requested = False
        if self.reload_source is None:
            log.warning("reload: this agent has no config file to reload")
            return
        try:
            checked = self._checked_reload(reader, tfs)
        except UserError as e:
            log.error("reload refused, the running config stays: %s", e.line())
            return
        if checked is None:
            log.info("reload: the config is unchanged")
            return
        new_cfg, new_probes, plan, (modes, stream) = checked
        for problem in tfs.disable_events(plan.remove):
            log.warning("reload: %s", problem)
        self._drain(reader)  # what the removed events left in the buffer still counts, in the old aggregate
        if new_cfg.buffer_size_kb != self.config.buffer_size_kb:
            try:
                tfs.set_buffer_size(new_cfg.buffer_size_kb)
            except TracefsError as e:
                log.warning("reload: %s; the buffer keeps its size", e.message)
        base = reload_mod.carry(self.base, self.aggregate.snapshot(), new_cfg.label_limit, plan.keep,
                                plan.keep_pairs)
        if self.pods is None and (pods := pod_list(new_probes)) is not None:
            self.pods = pods
            pods.start()
        agg = make_aggregate(new_cfg, stream, self.cgroup_of, self.pods)
        self._attach_spans(agg, stream)
        self._stats_offset = dict(self._stats_seen)
        self.config, self.probes, self.aggregate, self.base = new_cfg, new_probes, agg, base
        self.modes, self.stream = modes, stream
        self._view = (base, agg, new_cfg.label_limit)
        if self.sources is not None:
            self.sources.probes = new_probes
        self._swap_events(tfs, plan, modes, new_cfg.label_limit)
        self._set_events(reader, stream)
        added = {ev.name for ev in plan.add}
        self._binaries = {ev.name: reload_mod.file_identity(ev) if ev.name in added else self._binaries.get(ev.name)
                          for ev in new_probes.events}
        self.containers = container_targets(new_cfg, new_probes)
        log.info("reloaded: %s", plan.summary())

    def _swap_events(self, tfs: Tracefs, plan: reload_mod.Plan, modes: dict[str, ProbeMode], label_limit: int) -> None:
        """Triggers of changed kernel-mode probes out (their values carried), old events out, new in,
        then the new triggers: the order the kernel needs (an event with a trigger is busy)."""
        if self.kernel is not None:
            self.kernel.retire(modes, (ev.name for ev in plan.remove), label_limit)
        for problem in tfs.undefine_events(plan.remove):
            log.warning("reload: %s", problem)
        try:
            tfs.add_events(plan.add, define_only=self._kernel_names(modes))
            if self.kernel is not None:
                self.kernel.install(self.kernel.missing(modes))
        except TracefsError as e:  # the trial passed a moment ago: a race with someone else's change
            log.error("reload: the new probes could not be installed (%s); the kept ones run on, "
                      "kprobe_exporter_probe_installed shows which are missing", e.message)

    def _checked_reload(self, reader: EventReader, tfs: Tracefs,
                        ) -> tuple[Config, ProbeSet, reload_mod.Plan, tuple[dict[str, ProbeMode], ProbeSet]] | None:
        """The new config, its probe set, the plan and the modes, once all of it passed (None: nothing changed)."""
        assert self.reload_source is not None
        new_cfg, new_probes = self.reload_source()
        plan = reload_mod.plan(self.config, self.probes, new_cfg, new_probes, self._binaries)
        if plan.restart:
            raise UserError(f"{', '.join(plan.restart)} cannot change without a restart")
        if not plan.changed:
            return None
        modes, stream = resolve_modes(new_cfg, new_probes, self.support)
        moved = sorted(n for n, m in modes.items() if n in self.modes and self.modes[n].mode != m.mode)
        if moved:
            raise UserError(f"the aggregation mode of {', '.join(moved)} cannot change without a restart")
        tfs.check_kinds(plan.add)
        try:
            reader.check(stream, spans=any(p.spans is not None for p in stream.pairs) or bool(stream.kernel_spans))
        except raw.RawUnsupported as e:
            raise UserError(f"the raw reader: {e}; such probes need `reader: text` (a restart)") from None
        self._trial(tfs, plan.add)
        return new_cfg, new_probes, plan, (modes, stream)

    def _set_events(self, reader: EventReader, probes: ProbeSet) -> None:
        try:  # the new set's events (a redefined probe gets a new id)
            reader.set_events(probes)
        except raw.RawUnsupported as e:
            self.fatal = f"reload: the raw reader cannot decode the new events: {e}"
            log.error("%s; stopping and removing what is left", self.fatal)
            self.stop_event.set()

    def _trial(self, tfs: Tracefs, events: tuple[EventSpec, ...]) -> None:
        """Install events in a scratch instance and group and remove them: the kernel's verdict, no effect."""
        if not events:
            return
        scratch = f"kpe_reload_{os.getpid()}"
        trial = Tracefs(tfs.root, scratch)
        try:
            trial.install(ProbeSet(scratch, reload_mod.regroup(events, self.config.instance, scratch), ()), 64,
                          record_tgid=False, own_tids=[])
        except TracefsError as e:
            raise TracefsError(e.message.replace(scratch, self.config.instance), e.probe, e.field) from None
        finally:
            problems = trial.remove()
        if problems:
            log.warning("reload: removing the trial: %s", "; ".join(problems))

    def _drain(self, reader: EventReader) -> None:
        for _ in range(10000):
            batch = reader.flush()
            if batch is None:
                return
            self.aggregate.feed(batch)


def install_signal_handlers(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    signal.signal(signal.SIGHUP, agent.request_reload)


def check(config: Config, probes_for: Callable[[Config], ProbeSet]) -> list[str]:
    """Install into a scratch instance and group, read the kernel's view back, remove; lines to print."""
    scratch = f"kpe_check_{os.getpid()}"
    cfg = config.model_copy(update={"instance": scratch})
    probes = probes_for(cfg)
    root = tfs_mod.find_tracefs()
    modes, _ = resolve_modes(cfg, probes, KernelSupport.detect(root))
    tfs = Tracefs(root, scratch)
    tfs.check_kinds(probes.events)
    ksrc = KernelSource(root, tfs.inst, scratch, cfg.label_limit)
    out: list[str] = []
    try:
        try:
            tfs.install(probes, 64, record_tgid=False, own_tids=[], define_only=Agent._kernel_names(modes))
            ksrc.install(modes.values())  # the kernel's verdict on the triggers too
        except TracefsError as e:  # name the user's group, not the scratch one
            raise TracefsError(e.message.replace(scratch, config.instance), e.probe, e.field) from None
        readback: dict[str, tuple[str, str]] = {}  # event: (the kernel's line, the kind it makes)
        for probe_file in PROBE_FILES:
            path = root / probe_file.name
            if path.exists():
                for line in tfs_mod.read_text(path).splitlines():
                    d = parse_definition(line)
                    if d is not None and d.group == scratch and d.event is not None:
                        readback[d.event] = (line, d.kind.key if d.kind else "?")
        for ev in probes.events:
            if ev.dynamic:
                assert ev.definition is not None
                mine = ev.definition.replace(scratch, config.instance)
                kernel, kind = readback.get(ev.name, ("(missing)", "?"))
                out.append(f"{ev.name}: {mine}\n  kernel: {kernel.replace(scratch, config.instance)}\n"
                           f"  kind: {kind} (in {ev.probe_file})")
            else:
                out.append(f"{ev.name}: tracepoint {ev.target} (enabled in instance {config.instance})")
        out = [line + _mode_line(modes.get(line.split(":", 1)[0])) for line in out]
    finally:
        problems = ksrc.remove() + tfs.remove()
    if problems:
        raise TracefsError("; ".join(problems))
    return out


def _mode_line(m: ProbeMode | None) -> str:
    """`check`'s line on a probe's aggregation mode, and why `auto` chose streaming."""
    if m is None:
        return ""
    return f"\n  aggregation: {m.mode}" + ("" if m.reason in ("auto", "configured") else f" ({m.reason})")


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
