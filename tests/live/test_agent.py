"""The real agent on the real kernel: uprobes, uretprobes and syscall tracepoints, end to end."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent_proc import AgentProcess, free_port, group_definitions, running_agent, value

pytestmark = pytest.mark.root


def run(*args: object) -> None:
    subprocess.run([str(a) for a in args], check=True)


def test_uprobe_latency_counts_exactly(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    cfg = write_config(f"""
instance: kpe_t_uprobe
probes:
  - name: open_path
    uprobe: {progs["pie"]}:open_path
    args: {{path: "+0(%di):string"}}
    labels: [path]
    latency: true
""")
    with running_agent(cfg) as agent:
        n = 137
        run(progs["pie"], "open", n, "/etc/hostname")
        got = agent.wait_value("kprobe_events_total", n, probe="open_path", path="/etc/hostname")
        assert got == n
        text = agent.scrape()
        assert value(text, "kprobe_latency_seconds_count", probe="open_path") == n
        assert value(text, "kprobe_latency_seconds_bucket", probe="open_path", le="+Inf") == n
        assert value(text, "kprobe_exporter_pairs_pending", probe="open_path") == 0
        assert value(text, "kprobe_exporter_pairs_unmatched_total", probe="open_path") == 0
        assert value(text, "kprobe_exporter_probe_installed", probe="open_path") == 1
        assert value(text, "kprobe_exporter_probe_hits_total", probe="open_path") >= n
        assert 0 < value(text, "kprobe_latency_seconds_sum", probe="open_path") < n * 0.01


def test_recursion_pairs_each_level(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    cfg = write_config(f"""
instance: kpe_t_recurse
probes:
  - name: recurse
    uprobe: {progs["pie"]}:recurse
    args: {{depth: "%di:s32"}}
    labels: [depth]
    latency: true
""")
    with running_agent(cfg) as agent:
        calls, depth = 25, 5
        run(progs["pie"], "recurse", calls, depth)
        total = calls * (depth + 1)
        assert agent.wait_value("kprobe_latency_seconds_count", total, probe="recurse") == total
        text = agent.scrape()
        for d in range(depth + 1):
            assert value(text, "kprobe_events_total", probe="recurse", depth=str(d)) == calls
        assert value(text, "kprobe_exporter_pairs_unmatched_total", probe="recurse") == 0
        assert value(text, "kprobe_exporter_pairs_pending", probe="recurse") == 0


@pytest.mark.parametrize("build", ["nopie", "libdriver"])
def test_uprobe_resolves_non_pie_and_shared_library(
    tracefs: Path, progs: dict[str, Path], write_config, build: str
) -> None:
    target = progs["lib"] if build == "libdriver" else progs["nopie"]
    cfg = write_config(f"""
instance: kpe_t_{build}
probes:
  - name: compute
    uprobe: {target}:compute
    args: {{a: "%di:s32"}}
    latency: true
""")
    with running_agent(cfg) as agent:
        run(progs[build], "compute", 41)
        assert agent.wait_value("kprobe_events_total", 41, probe="compute") == 41
        assert value(agent.scrape(), "kprobe_latency_seconds_count", probe="compute") == 41


def test_syscall_tracepoint_pair(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    cfg = write_config("""
instance: kpe_t_sys
probes:
  - name: openat
    tracepoint: syscalls/sys_enter_openat
    filter: 'comm == "kpe_fxsys"'
    latency: true
""")
    exe = progs["pie"].with_name("kpe_fxsys")  # a comm no other process on the machine has
    exe.write_bytes(progs["pie"].read_bytes())
    exe.chmod(0o755)
    with running_agent(cfg) as agent:
        run(exe, "open", 0)  # the loader's own openat calls, as a baseline
        time.sleep(1)
        base = value(agent.scrape(), "kprobe_events_total", probe="openat") or 0
        assert base > 0
        run(exe, "open", 300)
        want = 2 * base + 300
        assert agent.wait_value("kprobe_events_total", want, probe="openat") == want
        text = agent.scrape()
        assert value(text, "kprobe_latency_seconds_count", probe="openat") == want
        assert value(text, "kprobe_latency_seconds_sum", probe="openat") > 0


def _other_probe(progs: dict[str, Path]) -> str:
    line = f"p:kpe_other/keepme {progs['pie']}:0x1000"
    with open("/sys/kernel/tracing/uprobe_events", "a+b", buffering=0) as f:
        f.write(line.encode() + b"\n")
    return line


def _drop_other() -> None:
    import os

    fd = os.open("/sys/kernel/tracing/uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"-:kpe_other/keepme\n")
    finally:
        os.close(fd)


@pytest.fixture
def other_probe(tracefs: Path, progs: dict[str, Path]):  # type: ignore[no-untyped-def]
    import os

    fd = os.open(tracefs / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    os.write(fd, f"p:kpe_other/keepme {progs['pie']}:0x1000\n".encode())
    os.close(fd)
    (tracefs / "instances" / "kpe_other_inst").mkdir(exist_ok=True)
    yield
    (tracefs / "instances" / "kpe_other_inst").rmdir()
    _drop_other()


def _cfg_for(progs: dict[str, Path], instance: str) -> str:
    return f"""
instance: {instance}
probes:
  - name: compute
    uprobe: {progs["pie"]}:compute
    latency: true
  - name: openat
    tracepoint: syscalls/sys_enter_openat
    latency: true
"""


def test_sigterm_removes_everything_and_spares_others(
    tracefs: Path, progs: dict[str, Path], write_config, other_probe: None
) -> None:
    cfg = write_config(_cfg_for(progs, "kpe_t_term"))
    agent = AgentProcess(cfg, free_port())
    agent.wait_ready()
    assert len(group_definitions("kpe_t_term")) == 2
    assert (tracefs / "instances" / "kpe_t_term").is_dir()
    rc, err = agent.stop(signal.SIGTERM)
    assert rc == 0, err
    assert group_definitions("kpe_t_term") == []
    assert not (tracefs / "instances" / "kpe_t_term").exists()
    assert group_definitions("kpe_other") != []
    assert (tracefs / "instances" / "kpe_other_inst").is_dir()
    assert (tracefs / "events/syscalls/sys_enter_openat/enable").read_text().strip() == "0"


def test_sigkill_leftovers_removed_by_cleanup_and_by_next_start(
    tracefs: Path, progs: dict[str, Path], write_config, other_probe: None
) -> None:
    cfg = write_config(_cfg_for(progs, "kpe_t_kill"))
    for remover in ("cleanup", "restart"):
        agent = AgentProcess(cfg, free_port())
        agent.wait_ready()
        agent.stop(signal.SIGKILL)
        assert len(group_definitions("kpe_t_kill")) == 2  # a killed agent leaves its probes
        assert (tracefs / "instances" / "kpe_t_kill").is_dir()
        if remover == "cleanup":
            subprocess.run(
                ["python", "-m", "kprobe_exporter", "cleanup", "--instance", "kpe_t_kill"],
                check=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        else:
            with running_agent(cfg) as again:
                run(progs["pie"], "compute", 9)
                assert again.wait_value("kprobe_latency_seconds_count", 9, probe="compute") == 9
        assert group_definitions("kpe_t_kill") == []
        assert not (tracefs / "instances" / "kpe_t_kill").exists()
        assert group_definitions("kpe_other") != []


def test_agent_never_feeds_its_own_probes(tracefs: Path, write_config) -> None:
    """A uprobe on the libc calls the reader itself makes would be a feedback loop without the pid exclusion."""
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    # Only the agent's reader thread (its pid) counts: other processes, other agents included, may call these.
    cfg = write_config(f"""
instance: kpe_t_self
probes:
  - {{name: readv, uprobe: '{libc}:readv', filter: 'common_pid == __AGENT_PID__'}}
  - {{name: poll, uprobe: '{libc}:poll', filter: 'common_pid == __AGENT_PID__'}}
""")
    agent = AgentProcess(cfg, free_port(), pid_placeholder=True)
    try:
        agent.wait_ready()
        time.sleep(3)
        for _ in range(5):
            agent.scrape()
        time.sleep(1)
        text = agent.scrape()
        assert f"common_pid == {agent.proc.pid}" in cfg.read_text()
        # The agent polls ~10 times a second and reads after each: with itself traced this runs away.
        assert value(text, "kprobe_events_total", probe="readv") == 0
        assert value(text, "kprobe_events_total", probe="poll") == 0
        assert value(text, "kprobe_exporter_probe_installed", probe="poll") == 1
    finally:
        agent.stop()
