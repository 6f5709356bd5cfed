"""Run a bash script inside the kernel-lab guest (Debian's 6.1 or 6.12 kernel, real kprobes) and collect its results.

Each call boots a fresh guest under qemu (TCG, about 5 s): the cached root from build_guest.py
(read-only, /dev/vda) plus a small per-boot ext4 job disk (read-write, /dev/vdb, mounted at /job)
that holds this checkout's kprobe_exporter/ package, the script and the input files. In the guest:

    /job/src              the project's source, on PYTHONPATH before /opt/kprobe-lab/site (its dependencies)
    /job/bin              on PATH: `kprobe-exporter`, the project's console script
    /job/in  ($LAB_IN)    the input files; the script's working directory
    /out     ($LAB_OUT)   where the script leaves results: they come back as GuestResult.files
    /sys/kernel/tracing   tracefs; /proc, /sys, /dev, /dev/pts, /dev/shm, /run and /tmp are mounted too

The script runs as root under bash, stdin from /dev/null, HOME=/tmp, loopback up (127.0.0.1, ::1), no
other network. Its output goes to the serial console, which comes back as GuestResult.stdout. The script
gets `timeout` minus 30 s inside the guest (then it is killed and its exit status is 124, and whatever
it wrote to /out still comes back); the whole boot is killed at `timeout`: GuestTimeout.

A guest whose kernel faults (an oops or a panic: FAULT_MARKS on the console) is killed FAULT_GRACE_S
after the first such line, not left to its timeout; one whose user space stops (no heartbeat, only
kernel messages such as soft lockups and RCU stalls, for SILENT_LIMIT_S; the init prints a heartbeat
every 30 s) is frozen. Either way the job is run once more on a fresh boot and job disk, with a
warning that names the fault: under TCG's multi-threaded emulation the 6.1 and 6.12 kernels have
each frozen or oopsed while code was being patched (an RCU stall after a lost timer wakeup on the
other vCPU; an int3 trap in __schedule). A second fault fails the test (GuestFault), with both
console tails.
"""

from __future__ import annotations

import compileall
import py_compile
import re
import shutil
import subprocess
import tempfile
import threading
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from .build_guest import DEFAULT_KERNEL, KERNELS, REPO_ROOT, GuestImage, LabError, ensure_guest, run

__all__ = [
    "DEFAULT_KERNEL",
    "KERNELS",
    "GuestFault",
    "GuestImage",
    "GuestResult",
    "GuestTimeout",
    "LabError",
    "require_guest",
    "run_in_guest",
]

MEMORY_MB = 1024
OUT_SPACE_MB = 256  # free space on the job disk for the script's results (sparse on the host)
SCRIPT_MARGIN_S = 30.0  # boot + power-off allowance taken from `timeout` for the script's own limit
SILENT_LIMIT_S = 180.0  # a console silent this long (the init's heartbeat prints every 30 s): frozen
START_MARKER = "===== kernel-lab: script start ====="
END_MARKER = "===== kernel-lab: script end"

JOB_INIT = """#!/bin/sh
# PID 1 of a kernel-lab boot, written by guest.py: mount, run /job/script.sh, record its status, power off.
export PATH=/job/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/kprobe-lab/bin
bb=/opt/kprobe-lab/bin/busybox
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tracefs nodev /sys/kernel/tracing
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts
mount --bind /job/out /out
$bb hostname kernel-lab
$bb ifconfig lo 127.0.0.1 up
echo "@START@"
# a heartbeat on the console: after a GuestTimeout it tells a guest that froze from one that was only busy
( while $bb sleep 30; do echo "kernel-lab: alive, uptime $($bb cut -d' ' -f1 /proc/uptime) s"; done ) &
cd /job/in
HOME=/tmp LAB_IN=/job/in LAB_OUT=/out PYTHONPATH=/job/src:/opt/kprobe-lab/site PYTHONUNBUFFERED=1 \\
    timeout -k 5 @SCRIPT_TIMEOUT@ /bin/bash /job/script.sh </dev/null
rc=$?
echo "@END@ (exit status $rc) ====="
cd /
kill -KILL -1 2>/dev/null
umount /out 2>/dev/null
echo $rc > /job/returncode
sync
mount -o remount,ro /job 2>/dev/null || sync  # this script stays open on /job: no umount
$bb poweroff -f
"""


class GuestTimeout(LabError):
    """The guest did not power off within the timeout; the message holds the console's tail."""


class GuestFault(LabError):
    """The guest's kernel faulted (FAULT_MARKS): its first fault line and the console's tail."""

    def __init__(self, line: str, console_tail: str) -> None:
        super().__init__(f"the guest's kernel faulted: {line}; console tail:\n{console_tail}")
        self.line = line


@dataclass(frozen=True)
class GuestResult:
    """What one boot gave back."""

    stdout: str  # the serial console: kernel messages, the init's markers, the script's stdout and stderr
    returncode: int  # the script's exit status (124: killed by the in-guest timeout)
    files: dict[str, bytes]  # what the script left in /out, by path relative to /out
    boot_seconds: float  # from starting qemu to the script's start
    seconds: float  # the whole boot, from starting qemu to its exit


def require_guest(kernel: str = DEFAULT_KERNEL) -> GuestImage:
    """The built guest of `kernel` (building it if needed), or pytest.fail with the exact reason: never a skip."""
    import pytest

    try:
        return ensure_guest(kernel=kernel)
    except LabError as e:
        reason = str(e)
    pytest.fail(f"kernel lab unavailable: {reason}", pytrace=False)


def run_in_guest(
    script: str,
    files: dict[str, bytes] | None = None,
    timeout: float = 120,
    *,
    package_dir: Path | None = None,
    kernel: str = DEFAULT_KERNEL,
    one_host_thread: bool = False,
) -> GuestResult:
    """Boot the guest, run `script` (bash) in it with `files` under /job/in, return its results.

    package_dir is the Python package injected into /job/src (default: this checkout's kprobe_exporter/);
    kernel is the lab kernel to boot (build_guest.KERNELS). one_host_thread runs both vCPUs in one
    host thread (`-accel tcg,thread=single`): for a job that patches kernel text over and over, where
    multi-threaded TCG has frozen or oopsed a guest (module docstring); the vCPUs then take turns.
    Raises LabError when the guest cannot be built or booted, GuestTimeout past `timeout` seconds.
    """
    image = ensure_guest(kernel=kernel)
    package = package_dir or REPO_ROOT / "kprobe_exporter"
    if not package.is_dir():
        raise LabError(f"no package to inject at {package}")
    script_timeout = max(5, int(timeout - SCRIPT_MARGIN_S))
    accel = "tcg,thread=single" if one_host_thread else "tcg"
    try:
        return _run_once(image, script, files or {}, package, script_timeout, timeout, accel)
    except GuestFault as first:
        warnings.warn(
            f"kernel lab ({kernel}): the guest's kernel faulted, job run again on a fresh boot: {first.line}",
            stacklevel=2,
        )
        try:
            return _run_once(image, script, files or {}, package, script_timeout, timeout, accel)
        except GuestFault as second:
            raise GuestFault(second.line, f"{first}\n----- and on the second boot -----\n{second}") from None


def _run_once(
    image: GuestImage,
    script: str,
    files: dict[str, bytes],
    package: Path,
    script_timeout: int,
    timeout: float,
    accel: str,
) -> GuestResult:
    with tempfile.TemporaryDirectory(prefix="kprobe-lab-") as tmp_name:
        tmp = Path(tmp_name)
        disk = make_job_disk(tmp, script, files, package, script_timeout)
        console, boot_seconds, seconds = boot(image, disk, tmp, timeout, accel)
        returncode, out_files = read_results(disk, tmp / "results")
    if returncode is None:
        raise LabError(f"the guest stopped without the script's exit status; console tail:\n{tail(console)}")
    return GuestResult(console, returncode, out_files, boot_seconds, seconds)


def make_job_disk(tmp: Path, script: str, files: dict[str, bytes], package: Path, script_limit: int) -> Path:
    """The per-boot ext4 image: init.sh, script.sh, in/, out/, src/<package>, bin/ (console scripts)."""
    job = tmp / "job"
    for d in ("in", "out", "src", "bin"):
        (job / d).mkdir(parents=True)
    init = JOB_INIT.replace("@START@", START_MARKER).replace("@END@", END_MARKER)
    (job / "init.sh").write_text(init.replace("@SCRIPT_TIMEOUT@", str(script_limit)))
    (job / "init.sh").chmod(0o755)
    (job / "script.sh").write_text(script)
    for name, data in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise LabError(f"input file name must be relative, without '..': {name!r}")
        path = job / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    src = job / "src"
    shutil.copytree(package, src / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    add_distribution_metadata(src, job / "bin")
    # Bytecode made here: compiling under TCG costs seconds per boot. Same magic number (3.11) as the guest.
    compileall.compile_dir(src, quiet=2, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    used = sum(p.lstat().st_blocks * 512 for p in job.rglob("*"))
    disk = tmp / "job.ext4"
    size = f"{used // 2**20 + OUT_SPACE_MB}M"
    run(
        ["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-d", str(job), str(disk), size],
        "making the job disk",
    )
    return disk


def add_distribution_metadata(src: Path, bin_dir: Path) -> None:
    """A dist-info from pyproject.toml (so importlib.metadata sees the project) and its console scripts."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist = src / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    scripts: dict[str, str] = project.get("scripts", {})
    entry_points = "".join(f"{cmd} = {target}\n" for cmd, target in scripts.items())
    (dist / "entry_points.txt").write_text(f"[console_scripts]\n{entry_points}")
    for cmd, target in scripts.items():
        module, _, func = target.partition(":")
        wrapper = bin_dir / cmd
        wrapper.write_text(f"#!/usr/bin/python3\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        wrapper.chmod(0o755)


# Under TCG on a loaded host the kernel's IO-APIC timer check can miss its ticks and panic ("IO-APIC +
# timer doesn't work!", seen twice in one busy afternoon): no_timer_check skips that check.
APPEND = "console=ttyS0 panic=-1 quiet no_timer_check"
# What a kernel prints when it has faulted (its own lines only, KERNEL_LINE: a user program's
# "general protection fault" or a script's "Oops" is not one): the guest is killed FAULT_GRACE_S later.
FAULT_MARKS = (
    b"Kernel panic - not syncing",
    b"Oops: ",
    b"BUG: kernel NULL pointer",
    b"BUG: unable to handle",
    b" [#1] ",
)
STALL_MARKS = (b"BUG: soft lockup", b"self-detected stall", b"detected stalls on CPU")
KERNEL_LINE = re.compile(rb"^\[\s*\d+\.\d+\] ")  # a kernel message: not the heartbeat, not the script
FAULT_GRACE_S = 15.0  # after the first fault line: time for the kernel to print its trace


def boot(image: GuestImage, disk: Path, tmp: Path, timeout: float, accel: str = "tcg") -> tuple[str, float, float]:
    """Run qemu to power-off; return the console text, the seconds to the script's start and in all.
    GuestFault if the kernel faulted (a panic before the script's start too) or froze, GuestTimeout
    past timeout."""
    cmd = [
        "qemu-system-x86_64", "-accel", accel, "-cpu", "max", "-m", str(MEMORY_MB), "-smp", "2",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(image.vmlinux), "-initrd", str(image.initrd),
        "-drive", f"file={image.rootfs},format=raw,if=virtio,readonly=on",
        "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
        "-append", APPEND,
    ]  # fmt: skip
    lines: list[bytes] = []
    started = time.monotonic()
    script_started: list[float] = []

    heard = [started]
    faults: list[tuple[float, bytes]] = []

    stalls: list[bytes] = []

    def read_console(stream: IO[bytes]) -> None:
        for line in stream:
            now = time.monotonic()
            kernel = KERNEL_LINE.match(line)
            if not kernel:
                heard[0] = now  # only user space proves that the guest still runs
            if not script_started and START_MARKER.encode() in line:
                script_started.append(now)
            if kernel:
                if not faults and any(m in line for m in FAULT_MARKS):
                    faults.append((now, line))
                if not stalls and any(m in line for m in STALL_MARKS):
                    stalls.append(line)
            lines.append(line)

    with open(tmp / "qemu.stderr", "w+b") as stderr:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        except OSError as e:
            raise LabError(f"cannot start qemu: {e}") from e
        assert proc.stdout is not None
        reader = threading.Thread(target=read_console, args=(proc.stdout,), daemon=True)
        reader.start()
        while (stuck := stalled(proc, started, timeout, heard[0])) is None:
            if faults and time.monotonic() - faults[0][0] > FAULT_GRACE_S:
                stuck = "faulted"
                break
        if stuck:
            proc.kill()
            proc.wait()
        reader.join(5)
        proc.stdout.close()
        if faults:  # a panic powers off (-no-reboot) with the fault on the console: the same case
            raise GuestFault(faults[0][1].decode(errors="replace").strip(), tail(decode(lines)))
        if stuck.startswith("printed nothing"):
            why = stalls[0].decode(errors="replace").strip() if stalls else "no kernel message"
            raise GuestFault(f"frozen ({stuck}); {why}", tail(decode(lines)))
        if stuck:
            raise GuestTimeout(f"the guest {stuck}; console tail:\n{tail(decode(lines))}") from None
        seconds = time.monotonic() - started
        console = decode(lines)
        if proc.returncode != 0:
            stderr.seek(0)
            qemu_err = stderr.read().decode(errors="replace").strip()
            raise LabError(f"qemu exited {proc.returncode}: {qemu_err}\nconsole tail:\n{tail(console)}")
    boot_seconds = script_started[0] - started if script_started else seconds
    return console, boot_seconds, seconds


def stalled(proc: subprocess.Popen[bytes], started: float, timeout: float, heard: float) -> str | None:
    """After a wait of up to 5 s: "" once qemu has exited, why to kill it, or None to wait on."""
    try:
        proc.wait(5)
        return ""
    except subprocess.TimeoutExpired:
        now = time.monotonic()
    if now - started > timeout:
        return f"did not finish within {timeout} s"
    if now - heard > SILENT_LIMIT_S:
        return f"printed nothing for {SILENT_LIMIT_S} s but kernel messages (its heartbeat comes every 30 s)"
    return None


def read_results(disk: Path, dest: Path) -> tuple[int | None, dict[str, bytes]]:
    """The script's exit status and /out's files, read from the job disk with debugfs (no mount needed)."""
    dest.mkdir()
    commands = dest.parent / "debugfs.cmds"
    commands.write_text(f"rdump /out {dest}\ndump /returncode {dest / 'returncode'}\n")
    run(["debugfs", "-f", str(commands), str(disk)], "reading the job disk")
    rc_file = dest / "returncode"
    returncode = int(rc_file.read_text()) if rc_file.is_file() and rc_file.read_text().strip() else None
    out = dest / "out"
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return returncode, files


def decode(lines: list[bytes]) -> str:
    return b"".join(lines).decode(errors="replace").replace("\r\n", "\n")


def tail(text: str, count: int = 60) -> str:
    return "\n".join(text.splitlines()[-count:])
