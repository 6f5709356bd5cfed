"""The command line on bad input: exit 2, one line naming file/probe/field, nothing installed."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent_proc import REPO, free_port, group_definitions, running_agent

INSTANCE = "kpe_t_cli"
TESTS = Path(__file__).resolve().parents[1]


def kpe(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kprobe_exporter", *args]
    if user:  # a user namespace: euid 1000 inside, the files stay readable
        cmd = ["unshare", "--user", f"--map-user={user}", f"--map-group={user}", *cmd]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def nothing_installed(tracefs: Path) -> bool:
    return not group_definitions(INSTANCE) and not (tracefs / "instances" / INSTANCE).exists()


def cases(progs: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(id, config text, what the one line must say)."""
    pie = progs["pie"]
    head = f"instance: {INSTANCE}\nprobes:\n"
    return [
        ("yaml-error", head + "  - {name: a, uprobe: [\n", "YAML error at line"),
        ("unknown-key", head + f"  - {{name: a, uprobe: '{pie}:compute', lables: [x]}}\n", "did you mean 'labels'"),
        ("missing-binary", head + "  - {name: a, uprobe: '/no/such/bin:compute'}\n", "no such file /no/such/bin"),
        ("unknown-symbol", head + f"  - {{name: a, uprobe: '{pie}:compuet'}}\n", "did you mean compute"),
        ("stripped", head + f"  - {{name: a, uprobe: '{progs['stripped']}:compute'}}\n", "stripped"),
        (
            "duplicate",
            head + f"  - {{name: a, uprobe: '{pie}:compute'}}\n  - {{name: a, uprobe: '{pie}:recurse'}}\n",
            "duplicate name",
        ),
        (
            "newline",
            head + f"  - {{name: a, uprobe: '{pie}:compute', filter: \"x == 1\\n-:{INSTANCE}/a\"}}\n",
            "must not contain a newline",
        ),
        (
            "kernel-rejects-arg",
            head + f"  - {{name: a, uprobe: '{pie}:compute', args: {{x: '%di:b4@70/64'}}}}\n",
            "the kernel rejected",
        ),
        (
            "kernel-rejects-filter",
            head + f"  - {{name: a, uprobe: '{pie}:compute', filter: 'nosuch == 1'}}\n",
            "rejected the filter",
        ),
        ("kprobe-without-kprobes", head + "  - {name: a, kprobe: do_sys_openat2}\n", "CONFIG_KPROBE_EVENTS"),
        (
            "unknown-tracepoint",
            head + "  - {name: a, tracepoint: syscalls/sys_enter_opnat}\n",
            "did you mean syscalls/sys_enter_openat",
        ),
        (
            "tracepoint-label",
            head + "  - {name: a, tracepoint: syscalls/sys_enter_openat, labels: [nosuch]}\n",
            "not a field of syscalls/sys_enter_openat",
        ),
    ]


@pytest.mark.root
def test_bad_configs_exit_2_with_one_line_and_install_nothing(
    tracefs: Path, progs: dict[str, Path], tmp_path: Path
) -> None:
    if (tracefs / "kprobe_events").exists():
        pytest.fail("this test expects a kernel without kprobe_events (the kprobe case runs in the kernel lab)")
    for case_id, text, needle in cases(progs):
        cfg = tmp_path / f"{case_id}.yaml"
        cfg.write_text(text)
        r = kpe("run", "--config", str(cfg), "--web.listen-address", f"127.0.0.1:{free_port()}")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (case_id, r.stderr)
        assert len(lines) == 1 and "Traceback" not in r.stderr, (case_id, r.stderr)
        assert str(cfg) in lines[0] and needle in lines[0], (case_id, lines[0])
        if case_id not in ("yaml-error",):
            assert "probe 'a'" in lines[0], (case_id, lines[0])
        assert nothing_installed(tracefs), case_id


@pytest.mark.root
def test_port_in_use_and_instance_held(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    cfg = write_config(f"instance: {INSTANCE}\nprobes:\n  - {{name: a, uprobe: '{progs['pie']}:compute'}}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = kpe("run", "--config", str(cfg), "--web.listen-address", f"127.0.0.1:{port}")
        assert r.returncode == 2 and "cannot listen on" in r.stderr and len(r.stderr.splitlines()) == 1
        assert nothing_installed(tracefs)
    with running_agent(cfg):
        r = kpe("run", "--config", str(cfg), "--web.listen-address", f"127.0.0.1:{free_port()}")
        assert r.returncode == 2 and "held by another live kprobe-exporter" in r.stderr
        r = kpe("cleanup", "--instance", INSTANCE)
        assert r.returncode == 2 and "live" in r.stderr
        assert group_definitions(INSTANCE)  # the live agent's probes were not touched
    assert nothing_installed(tracefs)


@pytest.mark.root
def test_not_root(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    cfg = write_config(f"instance: {INSTANCE}\nprobes:\n  - {{name: a, uprobe: '{progs['pie']}:compute'}}\n")
    r = kpe("run", "--config", str(cfg), user="1000")
    assert r.returncode == 2 and "must run as root" in r.stderr and len(r.stderr.splitlines()) == 1


def test_replay_prints_exposition(tmp_path: Path) -> None:
    fix = TESTS / "fixtures" / "linux-6.18" / "uprobes-tracepoints.trace"
    r = kpe("replay", "--config", str(TESTS / "configs" / "fixture-6.18.yaml"), str(fix))
    assert r.returncode == 0, r.stderr
    assert 'kprobe_latency_seconds_count{probe="recurse"} 20.0' in r.stdout
    assert 'kprobe_events_total{comm="x)y:z [1]",probe="recurse"} 4.0' in r.stdout


def test_replay_missing_trace_is_one_line(tmp_path: Path) -> None:
    r = kpe("replay", "--config", str(TESTS / "configs" / "overload.yaml"), str(tmp_path / "nope"))
    assert r.returncode == 2 and "cannot read the trace" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.root
def test_check_installs_in_scratch_group_and_removes_it(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    cfg = write_config(f"""instance: {INSTANCE}
probes:
  - {{name: a, uprobe: '{progs["pie"]}:compute', args: {{x: '%di:s32', s: '+0(%si):string'}}, latency: true}}
  - {{name: openat, tracepoint: syscalls/sys_enter_openat, latency: true}}
  - {{raw: 'p:b {progs["pie"]}:compute%return $retval'}}
""")
    r = kpe("check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "OK, 5 events" in r.stdout
    assert f"kernel: p:{INSTANCE}/a {progs['pie']}:0x" in r.stdout
    # per probe, the kind the kernel's listing makes: `p:...%return` is listed back as `r:`
    kinds = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("kind: ")]
    assert kinds == ["kind: uprobe (in uprobe_events)", "kind: uretprobe (in uprobe_events)",
                     "kind: uretprobe (in uprobe_events)"], r.stdout
    assert f"kernel: r:{INSTANCE}/b {progs['pie']}:0x" in r.stdout
    assert not any("kpe_check_" in ln for ln in (tracefs / "uprobe_events").read_text().splitlines())
    assert not list((tracefs / "instances").glob("kpe_check_*"))
    assert nothing_installed(tracefs)
