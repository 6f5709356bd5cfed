"""Smoke tests of the kernel-lab tier: the guest boots, has real kprobes, runs the project, gives results back."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_lab import guest as guest_module
from kernel_lab.guest import KERNELS, GuestImage, require_guest, run_in_guest
from kernel_lab.labkit import MAX_SLOW_PCT

pytestmark = pytest.mark.kernel_lab

LABKIT = Path(__file__).resolve().parents[1] / "kernel_lab" / "labkit.py"
BOOT_MARGIN_S = 120.0  # booting and powering off, under load (a frozen guest is caught by its silence)

PROBE_PY = b"""
import os, time, urllib.request

T = "/sys/kernel/tracing"
INSTANCE = "instances/kernel_lab_smoke"


def write(path: str, line: str) -> None:
    # open(path, "a") fails with EINVAL on tracefs: it seeks to the end.
    fd = os.open(f"{T}/{path}", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode() + b"\\n")
    finally:
        os.close(fd)


write("kprobe_events", "p:kernel_lab_smoke/open do_sys_openat2 path=+0($arg2):ustring")
os.mkdir(f"{T}/{INSTANCE}")
write(f"{INSTANCE}/events/kernel_lab_smoke/open/filter", f"common_pid == {os.getpid()}")
write(f"{INSTANCE}/events/kernel_lab_smoke/open/enable", "1")
for _ in range(3):
    try:
        open("/kernel-lab-smoke-marker")
    except FileNotFoundError:
        pass
write(f"{INSTANCE}/tracing_on", "0")
with open(f"{T}/{INSTANCE}/trace") as f:
    trace = f.read()
write(f"{INSTANCE}/events/kernel_lab_smoke/open/enable", "0")
os.rmdir(f"{T}/{INSTANCE}")
write("kprobe_events", "-:kernel_lab_smoke/open")
with open(f"{T}/kprobe_events") as f:
    left = f.read()
out = os.environ["LAB_OUT"]
with open(f"{out}/trace.txt", "w") as f:
    f.write(trace)
with open(f"{out}/kprobe_events_after.txt", "w") as f:
    f.write(left)

# An HTTP server inside the guest, scraped from inside it over loopback; its start is given 20 s at an
# unloaded host's speed, scaled by the guest's measured slowness.
deadline = time.monotonic() + 20 * int(os.environ["LAB_SLOW_PCT"]) / 100
while True:
    try:
        body = urllib.request.urlopen("http://127.0.0.1:8123/hello.txt", timeout=2).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("no answer from the loopback HTTP server") from None
        time.sleep(0.1)
with open(f"{out}/http.txt", "wb") as f:
    f.write(body)
"""

SCRIPT = """
set -euo pipefail
export LAB_SLOW_PCT=$(python3 labkit.py calibrate)
uname -r > "$LAB_OUT/uname.txt"
python3 -m http.server 8123 --bind 127.0.0.1 --directory "$LAB_IN" >/dev/null 2>&1 &
python3 probe.py
python3 -c 'import kprobe_exporter; print(kprobe_exporter.__file__)' > "$LAB_OUT/import.txt"
mkdir -p "$LAB_OUT/nested" && cp hello.txt "$LAB_OUT/nested/"
echo "smoke script done"
"""


@pytest.fixture(scope="module", params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> str:
    """Each lab kernel (the test ids say which: [6.1], [6.12])."""
    return str(request.param)


@pytest.fixture(scope="module")
def guest(kernel: str) -> GuestImage:
    return require_guest(kernel)  # pytest.fail with the exact reason if it cannot be had, never a skip


def test_guest_runs_real_kprobes_and_the_project(guest: GuestImage, kernel: str) -> None:
    files = {"probe.py": PROBE_PY, "hello.txt": b"hello from the host\n", "labkit.py": LABKIT.read_bytes()}
    result = run_in_guest(SCRIPT, files=files, timeout=BOOT_MARGIN_S + 30 * MAX_SLOW_PCT / 100, kernel=kernel)
    assert result.returncode == 0, result.stdout
    assert "smoke script done" in result.stdout
    assert result.files["uname.txt"].decode().strip() == guest.kernel_release
    trace = result.files["trace.txt"].decode()
    assert trace.count('path="/kernel-lab-smoke-marker"') == 3, trace
    assert "kernel_lab_smoke" not in result.files["kprobe_events_after.txt"].decode()
    assert result.files["import.txt"].decode().strip() == "/job/src/kprobe_exporter/__init__.py"
    assert result.files["http.txt"] == b"hello from the host\n"
    assert result.files["nested/hello.txt"] == b"hello from the host\n"
    assert 0 < result.boot_seconds < result.seconds
    print(f"kernel lab: boot {result.boot_seconds:.1f} s, whole run {result.seconds:.1f} s")


def test_exit_status_and_console_come_back(guest: GuestImage, kernel: str) -> None:
    result = run_in_guest("echo to-stderr >&2; echo to-stdout; exit 7", timeout=BOOT_MARGIN_S, kernel=kernel)
    assert result.returncode == 7
    assert "to-stderr" in result.stdout and "to-stdout" in result.stdout
    assert result.files == {}


# Debian's 6.12 guest: fprobe events (entry and %return) and hist triggers, used for real, not only configured.
# 6.12 only: 6.1 has no fprobe events (CONFIG_FPROBE_EVENTS came with 6.5), so there is nothing to run there.
# A static busybox copied under its own name gives a comm to filter on and exactly READS read(2) calls
# (bs=1 count=READS; no dynamic loader reading libraries first).
READS = 100
FPROBE_SCRIPT = f"""
set -euo pipefail
T=/sys/kernel/tracing
I=$T/instances/lab_smoke
uname -r > "$LAB_OUT/uname.txt"
cp "/boot/config-$(uname -r)" "$LAB_OUT/config"
echo 'f:lab_smoke/fent vfs_read count' >> $T/dynamic_events
echo 'f:lab_smoke/fexit vfs_read%return ret=$retval' >> $T/dynamic_events
cat $T/dynamic_events > "$LAB_OUT/dynamic_events"
mkdir $I
echo 'hist:keys=common_pid:vals=hitcount if comm == "busybox-smoke"' > $I/events/lab_smoke/fent/trigger
echo 'comm == "busybox-smoke"' > $I/events/lab_smoke/fexit/filter
echo 1 > $I/events/lab_smoke/fexit/enable
cp /opt/kprobe-lab/bin/busybox /tmp/busybox-smoke
head -c {READS} /dev/zero > /tmp/data
/tmp/busybox-smoke dd if=/tmp/data of=/dev/null bs=1 count={READS} 2>/dev/null
echo 0 > $I/tracing_on
cat $I/events/lab_smoke/fent/hist > "$LAB_OUT/hist"
cat $I/trace > "$LAB_OUT/trace"
"""


@pytest.fixture(scope="module")
def guest_612() -> GuestImage:
    return require_guest("6.12")


def test_612_guest_has_fprobe_events_and_hist_triggers(guest_612: GuestImage) -> None:
    result = run_in_guest(FPROBE_SCRIPT, timeout=300, kernel="6.12")
    assert result.returncode == 0, result.stdout
    release = result.files["uname.txt"].decode().strip()
    assert release == guest_612.kernel_release and release.startswith("6.12."), release
    config = result.files["config"].decode().splitlines()
    for option in ("CONFIG_FPROBE_EVENTS=y", "CONFIG_PROBE_EVENTS_BTF_ARGS=y", "CONFIG_HIST_TRIGGERS=y"):
        assert option in config, option
    # The kernel lists the BTF-named argument back in its expanded form.
    assert result.files["dynamic_events"].decode().splitlines() == [
        "f:lab_smoke/fent vfs_read count=count",
        "f:lab_smoke/fexit vfs_read%return ret=$retval",
    ]
    hist = result.files["hist"].decode()
    assert f"Hits: {READS}\n" in hist, hist
    exits = [line for line in result.files["trace"].decode().splitlines() if "fexit:" in line]
    assert len(exits) == READS, result.files["trace"].decode()
    # $retval takes vfs_read's BTF return type (ssize_t): printed signed decimal, not the kprobe's 0x1.
    assert all(line.endswith("<- vfs_read) ret=1") for line in exits), exits[:3]


# A guest whose kernel faults is not left to its timeout: it is killed, and the job runs once more on a
# fresh boot. The fault is a real one: sysrq's crash, a kernel panic (the 6.1 guest, which is the default).
CRASH = "echo c > /proc/sysrq-trigger; sleep 600"


def test_a_kernel_fault_is_booted_again_and_a_second_fails_with_both_consoles(guest: GuestImage, kernel: str) -> None:
    with pytest.warns(UserWarning, match="the guest's kernel faulted, job run again"):
        with pytest.raises(guest_module.GuestFault) as caught:
            run_in_guest(CRASH, timeout=BOOT_MARGIN_S + 600, kernel=kernel)
    assert "Kernel panic - not syncing" in caught.value.line
    assert str(caught.value).count("sysrq") >= 2 and "second boot" in str(caught.value)


def test_a_job_whose_first_boot_faulted_passes_on_the_second(
    guest: GuestImage, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test chooses which boot crashes: the first boot's job disk gets CRASH for its script, the second
    # the job's own. Both boots and the crash are real.
    real = guest_module.make_job_disk
    scripts: list[str] = []

    def crash_first(tmp: Path, script: str, *rest: object) -> Path:
        scripts.append(CRASH if not scripts else script)
        return real(tmp, scripts[-1], *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(guest_module, "make_job_disk", crash_first)
    with pytest.warns(UserWarning, match="Kernel panic - not syncing"):
        result = run_in_guest("echo second boot ran; exit 3", timeout=BOOT_MARGIN_S, kernel=kernel)
    assert len(scripts) == 2 and result.returncode == 3 and "second boot ran" in result.stdout
    assert "Kernel panic" not in result.stdout
