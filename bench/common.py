"""Shared bench helpers: build the C load generators, own a tracefs instance, describe the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
TRACEFS = Path("/sys/kernel/tracing")
sys.path.insert(0, str(REPO))

from kprobe_exporter import tracefs  # noqa: E402  (after the path, so a checkout works uninstalled)

# A syscall tracepoint pair at one core's full rate (getppid is the cheapest syscall there is),
# optionally throttled to RATE pairs/s in 1 ms steps.
LOADGEN_C = r"""
#define _GNU_SOURCE
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 5, rate = argc > 2 ? atof(argv[2]) : 0;
    double t0 = now(), end = t0 + secs; long done = 0;
    for (;;) {
        if (rate > 0) {
            double t = now(); if (t >= end) break;
            long want = (long)((t - t0) * rate);
            if (done >= want) { struct timespec ts = {0, 200000}; nanosleep(&ts, NULL); continue; }
            for (long i = done; i < want && i < done + 1000; i++) syscall(SYS_getppid);
            done = want < done + 1000 ? want : done + 1000;
        } else {
            for (int i = 0; i < 4096; i++) syscall(SYS_getppid);
            if (now() >= end) break;
        }
    }
    return 0;
}
"""

# Threads each leaving one unmatched entry: uprobe `leak` is entered and its thread exits inside it
# (pthread_exit), so the return never fires.
LEAKGEN_C = r"""
#include <pthread.h>
#include <stdlib.h>
__attribute__((noinline)) void leak(int i) { (void)i; pthread_exit(NULL); }
static void *worker(void *p) { leak((int)(long)p); return NULL; }
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    for (long i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)i)) return 1;
        pthread_join(t, NULL);
    }
    return 0;
}
"""

# The raw reader's ceiling: every CPU's per_cpu/cpuN/trace_pipe_raw read a page at a time until it
# would block, as ringbuf.RawReader reads (O_NONBLOCK; poll() after a short drain, buffer_percent 25),
# the pages thrown away. rawpages INSTANCE_DIR; runs until killed.
RAWPAGES_C = r"""
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char path[4096], page[4096];
    struct pollfd fds[256];
    int n = 0;
    if (argc < 2) return 2;
    snprintf(path, sizeof path, "%s/buffer_percent", argv[1]);
    int bp = open(path, O_WRONLY);
    if (bp >= 0) { if (write(bp, "25", 2) < 0) return 1; close(bp); }
    for (int cpu = 0; cpu < 256; cpu++) {
        snprintf(path, sizeof path, "%s/per_cpu/cpu%d/trace_pipe_raw", argv[1], cpu);
        int fd = open(path, O_RDONLY | O_NONBLOCK);
        if (fd < 0) break;
        fds[n].fd = fd;
        fds[n++].events = POLLIN;
    }
    if (n == 0) return 1;
    for (;;) {
        long got = 0;
        for (int i = 0; i < n; i++)
            for (int p = 0; p < 256; p++) {
                ssize_t r = read(fds[i].fd, page, sizeof page);
                if (r <= 0) break;
                got++;
            }
        if (got < 16) poll(fds, n, 100);
    }
}
"""


def build(name: str) -> Path:
    """Compile one of the bench's C programs (or one of tests/progs/) into bench/out/."""
    OUT.mkdir(exist_ok=True)
    exe = OUT / name
    if (REPO / "tests" / "progs" / f"{name}.c").exists():  # fxgen, escaper
        src = REPO / "tests" / "progs" / f"{name}.c"
    else:
        src = OUT / f"{name}.c"
        src.write_text({"loadgen": LOADGEN_C, "leakgen": LEAKGEN_C, "rawpages": RAWPAGES_C}[name])
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        # -O1 as the tests build it: -O2 clones fxgen's functions (open_path.constprop.0) past the probes
        subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def ensure_tracefs() -> Path:
    if not (TRACEFS / "instances").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
    return TRACEFS


def write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@contextmanager
def plain_instance(name: str, events: list[str], buffer_kb: int = 4096) -> Iterator[Path]:
    """A tracefs instance with tracepoints enabled the way the agent configures its own (mono, no irq-info)."""
    inst = ensure_tracefs() / "instances" / name
    if inst.exists():
        remove_instance(inst)
    inst.mkdir()
    try:
        write(inst / "buffer_size_kb", str(buffer_kb))
        write(inst / "trace_clock", "mono")
        write(inst / "options" / "irq-info", "0")
        for ev in events:
            write(inst / "events" / ev / "enable", "1")
        yield inst
    finally:
        remove_instance(inst)


def remove_instance(inst: Path) -> None:
    tracefs.remove_instance(inst)  # the agent's own teardown: disable every event, then rmdir


def cpu_stats_lost(inst: Path) -> int:
    lost = 0
    for d in inst.glob("per_cpu/cpu*"):
        for line in (d / "stats").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("overrun", "dropped events"):
                lost += int(value)
    return lost


def cpu_stats_entries(inst: Path) -> int:
    """Events written into the instance's ring buffer (read + still there + lost)."""
    total = 0
    for d in inst.glob("per_cpu/cpu*"):
        stats = dict(ln.split(":", 1) for ln in (d / "stats").read_text().splitlines() if ":" in ln)
        total += int(stats.get("entries", 0)) + int(stats.get("overrun", 0)) + int(stats.get("read events", 0))
    return total


def machine() -> str:
    model = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}x {model}, Linux {platform.release()}, Python {platform.python_version()}"


def proc_cpu_s(pid: int) -> float:
    """user+sys seconds of a live process (children excluded)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
