"""Faults the agent survives, each on the real kernel: crashes, neighbours, reloads, clients, binaries, tracefs."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_proc import group_definitions, value
from hard_helpers import (
    LoggedAgent,
    enabled,
    force_cleanup,
    logged_agent,
    nothing_left,
    run,
    uprobe_hits,
)

pytestmark = pytest.mark.root


@pytest.fixture
def cleanup_after() -> Iterator[list[str]]:
    """Instances a test uses: whatever happens, nothing of them stays in the kernel."""
    instances: list[str] = []
    yield instances
    for inst in instances:
        force_cleanup(inst)
        assert nothing_left(inst), inst


# --- crashes and restarts ------------------------------------------------------------------------------
def test_sigkill_mid_run_then_restart_cleans_up_and_resumes(tracefs: Path, progs: dict[str, Path], tmp_path: Path,
                                                            cleanup_after: list[str]) -> None:
    inst = "kpe_t_f_kill"
    cleanup_after.append(inst)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""instance: {inst}
probes:
  - {{name: compute, uprobe: '{progs['pie']}:compute', latency: true}}
  - {{name: openat, tracepoint: syscalls/sys_enter_openat, filter: 'comm == "fxgen"', latency: true}}
""")
    first = LoggedAgent(cfg, tmp_path / "first.log").wait_ready()
    load = subprocess.Popen([progs["pie"], "compute", "2000000"])  # events flowing when the agent dies
    try:
        assert first.wait_value("kprobe_events_total", 1000, probe="compute")
        first.stop(signal.SIGKILL)
    finally:
        load.kill()
        load.wait()
    assert len(group_definitions(inst)) == 2 and (tracefs / "instances" / inst).is_dir()  # a killed agent's mess
    assert uprobe_hits(inst, "compute") >= 1000
    with logged_agent(cfg, tmp_path / "second.log") as second:
        assert len(group_definitions(inst)) == 2, group_definitions(inst)  # its own again, not doubled
        assert uprobe_hits(inst, "compute") == 0  # defined anew
        assert enabled(inst, "sys_enter_openat", "syscalls")
        run(progs["pie"], "compute", 77)
        assert second.wait_value("kprobe_events_total", 77, probe="compute") == 77  # fresh counts, exact
        assert value(second.scrape(), "kprobe_latency_seconds_count", probe="compute") == 77
    assert second.proc.returncode == 0, second.log()
    assert nothing_left(inst)


def test_two_agents_side_by_side_neither_touches_the_other(tracefs: Path, progs: dict[str, Path], tmp_path: Path,
                                                           cleanup_after: list[str]) -> None:
    a_inst, b_inst = "kpe_t_f_side_a", "kpe_t_f_side_b"
    cleanup_after += [a_inst, b_inst]
    cfg_a, cfg_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    # The same function in both: two uprobes on one address, one per group.
    cfg_a.write_text(f"instance: {a_inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute', "
                     f"latency: true}}\n  - {{name: recurse, uprobe: '{progs['pie']}:recurse'}}\n")
    cfg_b.write_text(f"instance: {b_inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute', "
                     "latency: true}\n")
    a = LoggedAgent(cfg_a, tmp_path / "a.log").wait_ready()
    try:
        with logged_agent(cfg_b, tmp_path / "b.log") as b:
            a_defs = group_definitions(a_inst)
            assert len(a_defs) == 3 and len(group_definitions(b_inst)) == 2
            run(progs["pie"], "compute", 123)
            run(progs["pie"], "recurse", 10, 2)
            assert a.wait_value("kprobe_events_total", 123, probe="compute") == 123
            assert b.wait_value("kprobe_events_total", 123, probe="compute") == 123
            assert a.wait_value("kprobe_events_total", 30, probe="recurse") == 30
            assert value(b.scrape(), "kprobe_events_total", probe="recurse") is None
            assert value(a.scrape(), "kprobe_latency_seconds_count", probe="compute") == 123
            assert value(b.scrape(), "kprobe_latency_seconds_count", probe="compute") == 123
            # One stops: the other's definitions, instance and counts are untouched, and it goes on.
            assert a.stop() == 0, a.log()
            assert nothing_left(a_inst)
            assert len(group_definitions(b_inst)) == 2 and (tracefs / "instances" / b_inst).is_dir()
            run(progs["pie"], "compute", 10)
            assert b.wait_value("kprobe_events_total", 133, probe="compute") == 133
            assert value(b.scrape(), "kprobe_latency_seconds_count", probe="compute") == 133
        assert nothing_left(b_inst)
    finally:
        a.stop()


# --- hot reload --------------------------------------------------------------------------------------
def _reload(agent: LoggedAgent, cfg: Path, text: str, expect: str) -> str:
    start = len(agent.log())
    cfg.write_text(text)
    agent.kill(signal.SIGHUP)
    return agent.wait_log(expect, start=start).group(0)


def test_sighup_reload_changes_only_what_changed_and_keeps_counts(tracefs: Path, progs: dict[str, Path],
                                                                  tmp_path: Path, cleanup_after: list[str]) -> None:
    inst = "kpe_t_f_reload"
    cleanup_after.append(inst)
    pie = progs["pie"]
    head = f"instance: {inst}\nprobes:\n"
    compute = f"  - {{name: compute, uprobe: '{pie}:compute', args: {{a: '%di:s32'}}, latency: true}}\n"
    labelled = f"  - {{name: recurse, uprobe: '{pie}:recurse', args: {{depth: '%di:s32'}}, labels: [depth]}}\n"
    openat = "  - {name: openat, tracepoint: syscalls/sys_enter_openat, filter: 'comm == \"fxgen\"', latency: true}\n"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(head + compute + labelled + openat)
    agent = LoggedAgent(cfg, tmp_path / "agent.log").wait_ready()
    try:
        run(pie, "compute", 50)
        run(pie, "recurse", 10, 2)
        assert agent.wait_value("kprobe_events_total", 50, probe="compute") == 50
        assert agent.wait_value("kprobe_events_total", 10, probe="recurse", depth="2") == 10
        hits = {e: uprobe_hits(inst, e) for e in ("compute", "compute_ret", "recurse")}
        assert hits == {"compute": 50, "compute_ret": 50, "recurse": 30}
        before_lines = agent.scrape()
        openat_before = value(before_lines, "kprobe_events_total", probe="openat")
        assert openat_before and openat_before > 0

        # Kept: compute (and its pair); changed: recurse (no labels now); removed: openat; added: open_path.
        recurse2 = f"  - {{name: recurse, uprobe: '{pie}:recurse'}}\n"
        open_path = f"  - {{name: open_path, uprobe: '{pie}:open_path', args: {{path: '+0(%di):string'}}}}\n"
        line = _reload(agent, cfg, head + compute + recurse2 + open_path, r"reloaded: .*")
        assert "2 kept, 3 removed, 2 added" in line, line  # recurse out and in, openat (+its exit) out
        # kept: never taken out (their hit counts go on); changed: defined anew (from 0)
        assert uprobe_hits(inst, "compute") == 50 and uprobe_hits(inst, "compute_ret") == 50
        assert uprobe_hits(inst, "recurse") == 0 and uprobe_hits(inst, "open_path") == 0
        assert not enabled(inst, "sys_enter_openat", "syscalls") and not enabled(inst, "sys_exit_openat", "syscalls")
        assert sorted(ln.split()[0] for ln in group_definitions(inst)) == sorted(
            [f"p:{inst}/compute", f"r:{inst}/compute_ret", f"p:{inst}/recurse", f"p:{inst}/open_path"])

        run(pie, "compute", 30)
        run(pie, "recurse", 4, 1)
        run(pie, "open", 7, "/etc/hostname")
        assert agent.wait_value("kprobe_events_total", 80, probe="compute") == 80  # continued, not reset
        text = agent.scrape()
        assert value(text, "kprobe_latency_seconds_count", probe="compute") == 80
        assert value(text, "kprobe_latency_seconds_bucket", probe="compute", le="+Inf") == 80
        assert value(text, "kprobe_events_total", probe="recurse") == 8  # a changed probe starts over
        assert value(text, "kprobe_events_total", probe="open_path") == 7
        assert value(text, "kprobe_events_total", probe="openat") is None  # removed: its series are gone
        assert value(text, "kprobe_exporter_probe_installed", probe="open_path") == 1
        lines_before = value(before_lines, "kprobe_exporter_lines_read_total")
        assert value(text, "kprobe_exporter_lines_read_total") >= lines_before

        # Invalid configs are refused and the old one keeps running untouched.
        defs = group_definitions(inst)
        hits = {e: uprobe_hits(inst, e) for e in ("compute", "compute_ret", "recurse", "open_path")}
        for bad, why in [
            (head + compute + "  - {name: x, uprobe: [\n", r"reload refused.*YAML error at line"),
            (head + compute + f"  - {{name: x, uprobe: '{pie}:compuet'}}\n", r"reload refused.*did you mean compute"),
            (head + compute + f"  - {{name: x, uprobe: '{pie}:recurse', filter: 'nosuch == 1'}}\n",
             r"reload refused.*rejected the filter 'nosuch == 1'"),
            (head + compute + f"  - {{name: x, uprobe: '{pie}:recurse', args: {{v: '%di:b4@70/64'}}}}\n",
             r"reload refused.*the kernel rejected 'p:kpe_t_f_reload/x"),
            (f"instance: kpe_t_f_other\nprobes:\n{compute}",
             r"reload refused.*instance cannot change without a restart"),
        ]:
            _reload(agent, cfg, bad, why)
            assert group_definitions(inst) == defs
            assert {e: uprobe_hits(inst, e) for e in hits} == hits
            assert not list((tracefs / "instances").glob("kpe_reload_*"))
            assert not any("kpe_reload_" in ln for ln in (tracefs / "uprobe_events").read_text().splitlines())
        run(pie, "compute", 5)
        assert agent.wait_value("kprobe_events_total", 85, probe="compute") == 85
        assert agent.proc.poll() is None
        # Back to a valid file with nothing changed: a no-op.
        _reload(agent, cfg, head + compute + recurse2 + open_path, r"reload: the config is unchanged")
        assert uprobe_hits(inst, "compute") == 85
        assert agent.stop() == 0, agent.log()
        assert nothing_left(inst)
    finally:
        agent.stop()


def test_reload_keeps_label_caps_and_counts_pending_entries(tracefs: Path, progs: dict[str, Path], tmp_path: Path,
                                                            cleanup_after: list[str]) -> None:
    """Across a reload, a kept labelled probe stays within its cap; a call in flight is counted, not lost."""
    inst = "kpe_t_f_reload_cap"
    cleanup_after.append(inst)
    pie = progs["pie"]
    paths = [f"/tmp/kpe-cap-{i}" for i in range(6)]
    opener = f"  - {{name: open_path, uprobe: '{pie}:open_path', args: {{p: '+0(%di):string'}}, labels: [p]}}\n"
    sleeper = f"  - {{name: sleep_us, uprobe: '{pie}:sleep_us', latency: true}}\n"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nlabel_limit: 3\nprobes:\n{opener}{sleeper}")
    with logged_agent(cfg, tmp_path / "agent.log") as agent:
        for p in paths[:2]:
            run(pie, "open", 1, p)
        hang = subprocess.Popen([pie, "hang", "3"])  # sleep_us(3 s): its entry is pending during the reload
        try:
            assert agent.wait_value("kprobe_exporter_pairs_pending", 1, probe="sleep_us") == 1
            _reload(agent, cfg, f"instance: {inst}\nlabel_limit: 3\nprobes:\n{opener}{sleeper}"
                    f"  - {{name: compute, uprobe: '{pie}:compute'}}\n", r"reloaded: ")
            for p in paths[2:]:
                run(pie, "open", 1, p)
        finally:
            hang.wait()
        text = agent.scrape()
        seen = {p for p in paths if value(text, "kprobe_events_total", probe="open_path", p=p)}
        assert seen == set(paths[:3]), seen  # the cap (3) holds across the reload
        assert value(text, "kprobe_events_total", probe="open_path", p="__overflow__") == 3
        assert value(text, "kprobe_exporter_label_overflow_total", probe="open_path", label="p") == 3
        assert value(text, "kprobe_events_total", probe="open_path") == 6
        assert agent.wait_value("kprobe_exporter_pairs_unmatched_total", 1, probe="sleep_us") == 1
        text = agent.scrape()
        assert value(text, "kprobe_exporter_pairs_evicted_total", probe="sleep_us", reason="reload") == 1
        assert value(text, "kprobe_exporter_pairs_pending", probe="sleep_us") == 0
    assert nothing_left(inst)


# --- clients ---------------------------------------------------------------------------------------------
def test_stalled_and_many_clients_do_not_stop_the_reader(tracefs: Path, progs: dict[str, Path], tmp_path: Path,
                                                         cleanup_after: list[str]) -> None:
    inst = "kpe_t_f_clients"
    cleanup_after.append(inst)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute'}}\n")
    with logged_agent(cfg, tmp_path / "agent.log") as agent:
        stalled = []
        try:
            for i in range(100):  # connect and say nothing, or half a request
                s = socket.create_connection(("127.0.0.1", agent.port))
                if i % 2:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                stalled.append(s)
            t0 = time.time()
            run(progs["pie"], "compute", 500)
            assert agent.wait_value("kprobe_events_total", 500, probe="compute", timeout=8) == 500
            text = agent.scrape()
            assert value(text, "kprobe_exporter_last_read_timestamp_seconds") >= t0
            # Many at once, beyond the cap: refused at once, a bounded number of threads.
            flood = [socket.create_connection(("127.0.0.1", agent.port)) for _ in range(300)]
            stalled += flood
            time.sleep(0.5)
            assert agent.threads() <= 128 + 16, agent.threads()
            run(progs["pie"], "compute", 100)
        finally:
            for s in stalled:
                s.close()
        assert agent.wait_value("kprobe_events_total", 600, probe="compute", timeout=15) == 600
        assert agent.get("/healthz")[0] == 200
    assert agent.proc.returncode == 0


# --- the traced binary and the traced process ----------------------------------------------------------
def test_traced_binary_replaced_or_deleted(tracefs: Path, progs: dict[str, Path], tmp_path: Path,
                                           cleanup_after: list[str]) -> None:
    inst = "kpe_t_f_binary"
    cleanup_after.append(inst)
    app = tmp_path / "bin" / "app"
    app.parent.mkdir()
    shutil.copy(progs["pie"], app)
    cfg = tmp_path / "c.yaml"
    text = (f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{app}:compute'}}\n"
            f"  - {{name: sleep_us, uprobe: '{app}:sleep_us'}}\n")
    cfg.write_text(text)
    with logged_agent(cfg, tmp_path / "agent.log") as agent:
        run(app, "compute", 20)
        assert agent.wait_value("kprobe_events_total", 20, probe="compute") == 20
        # Replaced the way package managers do it (a new file renamed over the path): the uprobe stays
        # on the old inode, so the new binary is not traced until a reload defines it again.
        shutil.copy(progs["pie"], app.with_suffix(".new"))
        os.rename(app.with_suffix(".new"), app)
        run(app, "compute", 5)
        time.sleep(0.5)
        assert value(agent.scrape(), "kprobe_events_total", probe="compute") == 20
        assert agent.get("/healthz")[0] == 200
        assert uprobe_hits(inst, "compute") == 20
        line = _reload(agent, cfg, text, r"reloaded: .*")
        assert "binary replaced under compute, sleep_us" in line, line
        assert uprobe_hits(inst, "compute") == 0  # defined again, on the new file
        run(app, "compute", 7)
        assert agent.wait_value("kprobe_events_total", 27, probe="compute") == 27  # the count carried on
        # Deleted under a running process: that process is still traced to its end.
        sleeper = subprocess.Popen([app, "sleep", "40", "20000"])  # 40 calls of 20 ms
        time.sleep(0.2)
        app.unlink()
        assert sleeper.wait(30) == 0
        assert agent.wait_value("kprobe_events_total", 40, probe="sleep_us") == 40
        # A reload now cannot resolve the binary: refused, the running probes stay.
        _reload(agent, cfg, text, r"reload refused.*no such file")
        assert len(group_definitions(inst)) == 2
        assert agent.get("/healthz")[0] == 200
    assert agent.proc.returncode == 0, agent.log()
    assert nothing_left(inst)


def test_probed_process_exits_mid_call_pending_evicted_by_age(tracefs: Path, progs: dict[str, Path],
                                                              tmp_path: Path, cleanup_after: list[str]) -> None:
    inst = "kpe_t_f_hang"
    cleanup_after.append(inst)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\npending: {{max_age: 1s}}\n"
                   f"probes:\n  - {{name: sleep_us, uprobe: '{progs['pie']}:sleep_us', latency: true}}\n")
    with logged_agent(cfg, tmp_path / "agent.log") as agent:
        hang = subprocess.Popen([progs["pie"], "hang", "60"])
        try:
            assert agent.wait_value("kprobe_exporter_pairs_pending", 1, probe="sleep_us") == 1
        finally:
            hang.kill()  # dies inside sleep_us: its return never comes
            hang.wait()
        assert agent.wait_value("kprobe_exporter_pairs_evicted_total", 1, probe="sleep_us", reason="age",
                                timeout=10) == 1
        text = agent.scrape()
        assert value(text, "kprobe_exporter_pairs_pending", probe="sleep_us") == 0
        assert value(text, "kprobe_latency_seconds_count", probe="sleep_us") == 0
        assert value(text, "kprobe_exporter_pairs_unmatched_total", probe="sleep_us") == 0


# --- trace_pipe and tracefs -----------------------------------------------------------------------------
def test_signals_during_reads_lose_nothing(tracefs: Path, progs: dict[str, Path], tmp_path: Path,
                                           cleanup_after: list[str]) -> None:
    """EINTR: a signal with a handler (SIGHUP, an unchanged config) lands in poll() and read() again and again."""
    inst = "kpe_t_f_eintr"
    cleanup_after.append(inst)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute', "
                   "latency: true}\n")
    with logged_agent(cfg, tmp_path / "agent.log") as agent:
        load = subprocess.Popen([progs["pie"], "compute", "20000"])
        sent = 0
        while load.poll() is None or sent < 200:
            agent.kill(signal.SIGHUP)
            sent += 1
            time.sleep(0.005)
        assert agent.wait_value("kprobe_events_total", 20000, probe="compute") == 20000
        assert value(agent.scrape(), "kprobe_latency_seconds_count", probe="compute") == 20000
        assert agent.proc.poll() is None and agent.get("/healthz")[0] == 200
        assert "reload: the config is unchanged" in agent.log()
        assert "Traceback" not in agent.log()
    assert agent.proc.returncode == 0


def test_trace_pipe_read_error_stops_cleanly(tracefs: Path, progs: dict[str, Path], tmp_path: Path,
                                             cleanup_after: list[str]) -> None:
    """A read that fails for good (here EISDIR, from the real reader on a directory) stops the agent,
    non-zero, with what failed in the log and health, and everything removed."""
    from kprobe_exporter import agent as agent_mod
    from kprobe_exporter import config, probes
    from kprobe_exporter.probes import ProbeSet
    from kprobe_exporter.reader import TextReader
    from kprobe_exporter.tasks import Tasks

    inst = "kpe_t_f_readerr"
    cleanup_after.append(inst)
    cfg = config.load_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute'}}\n")
    a = agent_mod.Agent(cfg, probes.build_probe_set(cfg), "127.0.0.1:0")
    seen: list[bool] = []

    class Broken(TextReader):
        def __init__(self, path: str, probe_set: ProbeSet, tasks: Tasks | None = None) -> None:
            seen.append(os.path.exists(path))
            super().__init__(tmp_path.as_posix(), probe_set, tasks)  # a directory: read() answers EISDIR

    orig = agent_mod.TextReader
    agent_mod.TextReader = Broken  # type: ignore[misc]
    try:
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(a.run()))
        t.start()
        t.join(30)
    finally:
        agent_mod.TextReader = orig  # type: ignore[misc]
    assert seen == [True]
    assert result == [1]
    assert a.fatal and os.strerror(errno.EISDIR) in a.fatal, a.fatal
    assert a.healthy() == (False, a.fatal)
    assert nothing_left(inst)


def _in_mount_namespace(argv: list[str]) -> list[str]:
    return ["unshare", "-m", "--propagation", "private", *argv]


def test_tracefs_unmounted_under_the_agent(tracefs: Path, progs: dict[str, Path], tmp_path: Path,
                                           cleanup_after: list[str]) -> None:
    """umount -l of tracefs in the agent's mount namespace: a clear error, exit 1, and no half state."""
    inst = "kpe_t_f_umount"
    cleanup_after.append(inst)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute', "
                   "latency: true}\n  - {name: openat, tracepoint: syscalls/sys_enter_openat}\n")
    agent = LoggedAgent(cfg, tmp_path / "agent.log", prefix=["unshare", "-m", "--propagation", "private"])
    try:
        agent.wait_ready()
        run(progs["pie"], "compute", 10)
        assert agent.wait_value("kprobe_events_total", 10, probe="compute") == 10
        # Someone removing the instance while the agent reads it: the kernel says EBUSY, nothing changes.
        with pytest.raises(OSError) as e:
            os.rmdir(tracefs / "instances" / inst)
        assert e.value.errno == errno.EBUSY
        assert agent.get("/healthz")[0] == 200
        # tracefs gone from the agent's view (busy, so only a lazy unmount can do it).
        subprocess.run(["nsenter", "-t", str(agent.pid), "-m", "umount", "-l", "/sys/kernel/tracing"], check=True)
        assert not os.path.exists(f"/proc/{agent.pid}/root/sys/kernel/tracing/instances")
        rc = agent.wait_exit(15)
    finally:
        agent.stop()
    assert rc == 1, agent.log()
    assert "tracefs was unmounted from /sys/kernel/tracing under the agent; stopping and removing" in agent.log()
    assert "removing probes:" not in agent.log()  # everything came out through the agent's pinned descriptor
    assert nothing_left(inst)
    assert not enabled(inst, "sys_enter_openat", "syscalls")


def test_agent_mounts_tracefs_when_it_is_not_mounted(tracefs: Path, progs: dict[str, Path], tmp_path: Path,
                                                     cleanup_after: list[str]) -> None:
    inst = "kpe_t_f_mount"
    cleanup_after.append(inst)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute'}}\n")
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'umount -l /sys/kernel/tracing && exec "$@"',
              "sh"]
    agent = LoggedAgent(cfg, tmp_path / "agent.log", prefix=prefix)
    try:
        agent.wait_ready()
        assert (tracefs / "instances" / inst).is_dir()
        run(progs["pie"], "compute", 12)
        assert agent.wait_value("kprobe_events_total", 12, probe="compute") == 12
    finally:
        assert agent.stop() == 0, agent.log()
    assert nothing_left(inst)


# --- spans: a collector that is down or hangs -------------------------------------------------------
def test_otlp_collector_down_or_hanging_does_not_stop_the_reader(tracefs: Path, progs: dict[str, Path],
                                                                 tmp_path: Path, cleanup_after: list[str]) -> None:
    inst = "kpe_t_f_otlp"
    cleanup_after.append(inst)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute', "
                   "latency: true, spans: {}}\n")
    hang = socket.socket()  # accepts connections (the backlog) and never answers: a hung collector
    hang.bind(("127.0.0.1", 0))
    hang.listen(1024)
    try:
        for name, endpoint in [("hang", f"http://127.0.0.1:{hang.getsockname()[1]}"),
                               ("down", f"http://127.0.0.1:{_closed_port()}")]:
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                   "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}
            with logged_agent(cfg, tmp_path / f"{name}.log", env=env) as agent:
                t0 = time.time()
                run(progs["pie"], "compute", 5000)
                assert agent.wait_value("kprobe_latency_seconds_count", 5000, probe="compute", timeout=20) == 5000
                text = agent.scrape()
                assert value(text, "kprobe_exporter_last_read_timestamp_seconds") >= t0
                assert agent.get("/healthz")[0] == 200
                # the exporter really tried, and failed, while the reader went on
                assert agent.wait_value("kprobe_exporter_spans_dropped_total", 1, reason="export_failed", timeout=15)
                assert value(agent.scrape(), "kprobe_exporter_spans_exported_total") == 0
                t1 = time.monotonic()
            assert agent.proc.returncode == 0, agent.log()
            assert time.monotonic() - t1 < 30  # stopping waits for a collector that never answers a bounded time
            assert nothing_left(inst)
    finally:
        hang.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: connections are refused

