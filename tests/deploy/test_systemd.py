"""The systemd unit, checked by the tools that consume it.

- `systemd-analyze verify` must print nothing at all about the unit (it exits 0 even
  when it warns, so the test reads its output). verify refuses a unit whose ExecStart
  binary does not exist, so the test verifies a copy whose /usr/local/bin/kprobe-exporter
  points at a shim script in a temporary directory; every other line is the shipped one.
- `systemd-analyze security --offline=true` must rate the unit's exposure <= 2.5.
- A root test shows the capability model of the unit works on the real kernel: a uid-0
  process holding only the unit's CapabilityBoundingSet, with no_new_privs, can do every
  tracefs operation the agent needs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "kprobe-exporter.service"
DEFAULTS = ROOT / "systemd" / "kprobe-exporter.default"
BINARY = "/usr/local/bin/kprobe-exporter"
MAX_EXPOSURE = 2.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (repeated keys accumulate), comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def shimmed_unit(tmp_path: Path) -> Path:
    """A copy of the unit under its own name whose binary exists (a shim)."""
    shim = tmp_path / "bin" / "kprobe-exporter"
    shim.parent.mkdir()
    shim.write_text("#!/bin/sh\nexit 0\n")
    shim.chmod(0o755)
    text = UNIT.read_text()
    assert BINARY in text
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    copy = unit_dir / UNIT.name
    copy.write_text(text.replace(BINARY, str(shim)))
    return copy


def run_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_COLORS="0", LC_ALL="C.UTF-8")
    return subprocess.run([SYSTEMD_ANALYZE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def test_unit_contract(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] and service["WatchdogSec"][0] not in ("0", "infinity")
    assert service["ExecStart"] == [f"{BINARY} run --config /etc/kprobe-exporter/config.yaml $KPROBE_EXPORTER_ARGS"]
    assert service["ExecStopPost"] == [f"{BINARY} cleanup --config /etc/kprobe-exporter/config.yaml"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["EnvironmentFile"] == ["-/etc/default/kprobe-exporter"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert service["ReadWritePaths"] == ["/sys/kernel/tracing"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["PrivateTmp"] == ["yes"]
    assert "ProtectHome" in service
    # /sys must stay writable for tracefs: ProtectKernelTunables would remount it read-only.
    assert service.get("ProtectKernelTunables", ["no"]) == ["no"]
    caps = set(service["CapabilityBoundingSet"][0].split())
    assert "CAP_SYS_ADMIN" not in caps and "CAP_DAC_OVERRIDE" not in caps
    allow = [v for v in service["SystemCallFilter"] if not v.startswith("~")]
    deny = " ".join(v[1:] for v in service["SystemCallFilter"] if v.startswith("~")).split()
    assert allow == ["@system-service"]
    assert "@mount" in deny and "@privileged" in deny
    # No CAP_SYS_ADMIN, so tracefs must come from systemd's mount unit.
    assert "sys-kernel-tracing.mount" in unit["Unit"]["Requires"][0].split()
    assert "sys-kernel-tracing.mount" in unit["Unit"]["After"][0].split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_environment_file_defines_args() -> None:
    assignments: dict[str, str] = {}
    for raw in DEFAULTS.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"bad line {raw!r}"
        assignments[key] = value
    assert "KPROBE_EXPORTER_ARGS" in assignments
    # Whatever is set there must be accepted by the CLI grammar of `run`.
    args = assignments["KPROBE_EXPORTER_ARGS"].strip('"').split()
    for arg in args:
        if arg.startswith("--"):
            assert arg in ("--web.listen-address", "--web.config.file"), arg


@needs_analyze
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    copy = shimmed_unit(tmp_path)
    result = run_analyze("verify", str(copy), cwd=tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", f"systemd-analyze verify complained:\n{output}"


@needs_analyze
def test_systemd_analyze_verify_detects_breakage(tmp_path: Path) -> None:
    """The verify test above would notice a broken unit (guards against a silent tool)."""
    copy = shimmed_unit(tmp_path)
    copy.write_text(copy.read_text().replace("Type=notify", "Type=notifyy"))
    result = run_analyze("verify", str(copy), cwd=tmp_path)
    assert "notifyy" in result.stdout + result.stderr


def exposure_of(output: str, unit_name: str) -> float:
    match = re.search(rf"Overall exposure level for {re.escape(unit_name)}:\s*([0-9]+(?:\.[0-9]+)?)", output)
    assert match, f"no exposure line in:\n{output}"
    return float(match.group(1))


@needs_analyze
def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    copy = shimmed_unit(tmp_path)
    result = run_analyze("security", "--offline=true", "--no-pager", str(copy), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    exposure = exposure_of(output, UNIT.name)
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE, output
    # The same check through the tool's own threshold (exit status, not parsing).
    gated = run_analyze(
        "security",
        "--offline=true",
        "--no-pager",
        f"--threshold={int(MAX_EXPOSURE * 10)}",
        str(copy),
        cwd=tmp_path,
    )
    assert gated.returncode == 0, gated.stdout + gated.stderr


@needs_analyze
def test_exposure_parser_sees_a_weaker_unit(tmp_path: Path) -> None:
    """Without the hardening block the score is far above the bound: the parse is live."""
    copy = shimmed_unit(tmp_path)
    kept = [
        line
        for line in copy.read_text().splitlines()
        if not re.match(r"(Protect|Private|Restrict|Capability|SystemCall|NoNew|Lock|Memory)", line)
    ]
    copy.write_text("\n".join(kept) + "\n")
    result = run_analyze("security", "--offline=true", "--no-pager", str(copy), cwd=tmp_path)
    assert exposure_of(result.stdout + result.stderr, UNIT.name) > MAX_EXPOSURE


TRACEFS = Path("/sys/kernel/tracing")
# linux/capability.h numbers of the capabilities a unit may keep.
CAP_BITS = {
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYSLOG": 34,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}

CAPABILITY_SCRIPT = r"""
set -eu
T=/sys/kernel/tracing
G=$1
BIN=$2
EFF=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
[ "$((16#$EFF))" -eq "$3" ] || { grep Cap /proc/self/status; exit 90; }
grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/self/status || exit 91
mkdir "$T/instances/$G"
printf 'p:%s/entry %s:0x0\n' "$G" "$BIN" >> "$T/uprobe_events"
echo mono > "$T/instances/$G/trace_clock"
echo 1 > "$T/instances/$G/events/$G/entry/enable"
echo 1 > "$T/instances/$G/events/syscalls/sys_enter_getpid/enable"
echo 0 > "$T/instances/$G/events/syscalls/sys_enter_getpid/enable"
echo 0 > "$T/instances/$G/events/$G/entry/enable"
head -c 64 "$T/instances/$G/trace" > /dev/null
rmdir "$T/instances/$G"
printf -- '-:%s/entry\n' "$G" >> "$T/uprobe_events"
echo ALL-OK
"""


@pytest.mark.root
def test_unit_capabilities_suffice_for_tracefs(unit: dict[str, dict[str, list[str]]], tmp_path: Path) -> None:
    """uid 0 with only the unit's bounding set and no_new_privs drives tracefs fully."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not (TRACEFS / "uprobe_events").exists():
        pytest.skip("tracefs with uprobe_events not mounted at /sys/kernel/tracing")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed")
    caps = unit["Service"]["CapabilityBoundingSet"][0].split()
    capset = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    group = f"kpe_captest_{os.getpid()}"
    # A private copy of a binary in tmp, owned by root, as a uprobe target.
    target = tmp_path / "target"
    shutil.copy("/bin/true", target)
    mask = 0
    for cap in caps:
        mask |= 1 << CAP_BITS[cap]
    try:
        result = subprocess.run(
            [
                setpriv,
                "--no-new-privs",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                f"--bounding-set=-all,{capset}",
                "--",
                "bash",
                "-c",
                CAPABILITY_SCRIPT,
                "x",
                group,
                str(target),
                str(mask),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        # Leave nothing behind whatever failed.
        subprocess.run(["rmdir", str(TRACEFS / "instances" / group)], capture_output=True)
        fd = os.open(TRACEFS / "uprobe_events", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"-:{group}/entry\n".encode())
        except OSError:
            pass
        finally:
            os.close(fd)
    assert result.returncode == 0 and "ALL-OK" in result.stdout, result.stdout + result.stderr
    assert group not in (TRACEFS / "uprobe_events").read_text()


def _setpriv_prefix(caps: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed")
    capset = "".join(",+" + c.removeprefix("CAP_").lower() for c in caps)
    return [setpriv, "--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set=-all{capset}"]


def _hidden_binary(progs: dict[str, Path], tmp_path: Path) -> Path:
    """fxgen inside a 0700 directory of another user: root reads it only through
    CAP_DAC_READ_SEARCH (or CAP_DAC_OVERRIDE)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    target = hidden / "fxgen"
    shutil.copy(progs["pie"], target)
    os.chown(hidden, 65534, 65534)
    os.chown(target, 65534, 65534)
    target.chmod(0o700)
    hidden.chmod(0o700)
    tmp_path.chmod(0o755)
    return target


AGENT_CONFIG = """
instance: kpe_t_systemd_caps
probes:
  - name: openat
    tracepoint: syscalls/sys_enter_openat
    latency: true
  - name: open_path
    uprobe: {target}:open_path
    latency: true
"""


@pytest.fixture
def full_caps_process() -> Iterator[int]:
    """A root process with every capability: reaching its /proc/PID/root needs CAP_SYS_PTRACE."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.root
def test_agent_runs_with_the_units_capabilities(
    unit: dict[str, dict[str, list[str]]], tracefs: Path, progs: dict[str, Path], tmp_path: Path,
    full_caps_process: int,
) -> None:
    """The real agent, as uid 0 with only the unit's CapabilityBoundingSet and no_new_privs,
    installs a tracepoint pair and a uprobe on a binary it reaches only through another
    process's /proc/PID/root (CAP_SYS_PTRACE) inside a 0700 directory of another user
    (CAP_DAC_READ_SEARCH), counts the calls, and removes everything on SIGTERM."""
    import prom_server
    from agent_proc import group_definitions, value

    if not prom_server.agent_available():
        pytest.fail("the kprobe_exporter agent does not run (python -m kprobe_exporter --help)")
    target = _hidden_binary(progs, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(AGENT_CONFIG.format(target=f"/proc/{full_caps_process}/root{target}"))
    caps = unit["Service"]["CapabilityBoundingSet"][0].split()
    with prom_server.exporter_process(config=config, prefix=_setpriv_prefix(caps)) as address:
        subprocess.run([str(target), "open", "50"], check=True)
        deadline = time.monotonic() + 15
        while True:
            text = prom_server.http_get(f"http://{address}/metrics")[1].decode()
            if (value(text, "kprobe_latency_seconds_count", probe="open_path") or 0) >= 50 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert value(text, "kprobe_exporter_probe_installed", probe="open_path") == 1
        assert value(text, "kprobe_exporter_probe_installed", probe="openat") == 1
        assert value(text, "kprobe_latency_seconds_count", probe="open_path") == 50
        assert (value(text, "kprobe_events_total", probe="openat") or 0) > 0
    assert group_definitions("kpe_t_systemd_caps") == []
    assert not (tracefs / "instances" / "kpe_t_systemd_caps").exists()


@pytest.mark.root
@pytest.mark.parametrize("dropped", ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"])
def test_each_kept_capability_is_needed(
    unit: dict[str, dict[str, list[str]]], dropped: str, tracefs: Path, progs: dict[str, Path],
    tmp_path: Path, full_caps_process: int,
) -> None:
    """Without either kept capability the same uprobe cannot be set: both are load-bearing."""
    import prom_server

    target = _hidden_binary(progs, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(AGENT_CONFIG.format(target=f"/proc/{full_caps_process}/root{target}"))
    caps = [c for c in unit["Service"]["CapabilityBoundingSet"][0].split() if c != dropped]
    assert len(caps) == len(unit["Service"]["CapabilityBoundingSet"][0].split()) - 1
    try:
        with prom_server.exporter_process(config=config, prefix=_setpriv_prefix(caps),
                                          ready_timeout=20) as address:
            text = prom_server.http_get(f"http://{address}/metrics")[1].decode()
            assert 'kprobe_exporter_probe_installed{probe="open_path"} 1.0' not in text
    except RuntimeError as err:  # the agent refused to start: the expected outcome
        assert "permission denied" in str(err).lower(), err
    finally:
        subprocess.run([sys.executable, "-m", "kprobe_exporter", "cleanup", "--instance",
                        "kpe_t_systemd_caps"], cwd=ROOT, capture_output=True)


EXAMPLE_CONFIG = ROOT / "systemd" / "config.yaml"


def commented_probe_examples(text: str) -> list[str]:
    """The `# - name: ...` probe blocks commented out in the example config."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if m := re.match(r"\s*# (- name:.*)", line):
            current = ["  " + m.group(1)]
            blocks.append(current)
        elif current is not None and (m := re.match(r"\s*#   (\S.*)", line)):
            current.append("    " + m.group(1))
        else:
            current = None
    return ["\n".join(b) for b in blocks]


def test_example_config_loads() -> None:
    from kprobe_exporter import config, probes

    cfg = config.load(EXAMPLE_CONFIG)
    events = probes.build_probe_set(cfg, str(EXAMPLE_CONFIG), resolve=None).events
    assert {e.name for e in events} >= {"openat", "read", "write"}
    assert len(commented_probe_examples(EXAMPLE_CONFIG.read_text())) >= 2


@pytest.mark.root
def test_commented_examples_pass_check_on_this_kernel(tracefs: Path, tmp_path: Path) -> None:
    """The commented tracepoint and uprobe examples, uncommented, pass `kprobe-exporter check`
    against the running kernel (it installs them into a scratch group and removes them)."""
    blocks = commented_probe_examples(EXAMPLE_CONFIG.read_text())
    config = tmp_path / "examples.yaml"
    config.write_text("instance: kpe_t_examples\nprobes:\n" + "\n".join(blocks) + "\n")
    result = subprocess.run([sys.executable, "-m", "kprobe_exporter", "check", "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
