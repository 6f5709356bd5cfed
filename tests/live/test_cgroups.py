"""cgroups on real cgroups: hierarchies named as the kubelet and the runtimes name them, real processes
moved into them, and the exact labels the resolver gives; exits, a thread gone before lookup, real
migration and real tid reuse (a pid taken again through ns_last_pid). Both layouts: the cgroup v2
(unified) mount and, on v1/hybrid hosts, the v1 memory controller as the cgroupfs driver uses it.
Every cgroup made here is removed afterwards (shared parents only when empty).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_root
from kprobe_exporter.cgroups import LABELS, UNKNOWN, CgroupLabels, CgroupOf


def _mounts() -> dict[str, Path]:
    """cgroup2 mount as "v2", v1 hierarchies by their controller list."""
    out: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, opts = right.split(" ", 2)
        point = Path(left.split()[4])
        if fstype == "cgroup2":
            out.setdefault("v2", point)
        elif fstype == "cgroup":
            for o in opts.split(","):
                if o in ("memory", "pids") or o.startswith("name="):
                    out.setdefault(o, point)
    return out


class Cgroups:
    """Makes cgroups and workloads; removes them at teardown, deepest first."""

    def __init__(self) -> None:
        self.made: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def make(self, root: Path, rel: str) -> Path:
        d = root
        for part in rel.strip("/").split("/"):
            d = d / part
            try:
                d.mkdir()
            except FileExistsError:  # a shared parent (another test run may have made it)
                continue
            self.made.append(d)
        return d

    def spawn(self, into: Path | None, argv: list[str] | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv or ["sleep", "300"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.procs.append(p)
        if into is not None:
            move(p.pid, into)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for d in reversed(self.made):
            try:
                d.rmdir()
            except OSError:  # a shared parent someone else still uses
                pass


def move(pid: int, cgroup: Path) -> None:
    (cgroup / "cgroup.procs").write_text(f"{pid}\n")


@pytest.fixture
def cg() -> Iterator[Cgroups]:
    need_root()
    c = Cgroups()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def v2() -> Path:
    m = _mounts().get("v2")
    if m is None:
        pytest.skip("no cgroup2 mount")
    return m


def _ids() -> tuple[str, str, str]:
    uid = str(uuid.uuid4())
    return uid, uid.replace("-", "_"), secrets.token_hex(32)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_kubelet_and_runtime_shapes_on_cgroup_v2(cg: Cgroups, v2: Path) -> None:
    uid1, uid1_, cid1 = _ids()
    uid2, uid2_, cid2 = _ids()
    _, _, cid3 = _ids()
    unit = f"kpe-test-{secrets.token_hex(4)}.service"
    paths = {
        "containerd": f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid1_}.slice/"
                      f"cri-containerd-{cid1}.scope",
        "crio": f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid2_}.slice/crio-{cid2}.scope",
        "docker": f"/system.slice/docker-{cid3}.scope",
        "service": f"/system.slice/{unit}",
    }
    procs = [cg.spawn(cg.make(v2, p)) for p in paths.values()]
    gone = cg.spawn(None, ["true"])
    gone.wait()
    labels = CgroupLabels(LABELS, CgroupOf())
    tids = [p.pid for p in procs] * 3 + [gone.pid]
    cols = labels.columns(tids)
    assert cols == {
        "cgroup": [*paths.values()] * 3 + [UNKNOWN],
        "container_id": [cid1, cid2, cid3, ""] * 3 + [UNKNOWN],
        "pod_uid": [uid1, uid2, "", ""] * 3 + [UNKNOWN],
        "systemd_unit": ["", "", "", unit] * 3 + [UNKNOWN],
    }
    assert (labels.of.counts.reads, labels.of.counts.gone) == (5, 1)


def _own_v1_path(hierarchy: str) -> str:
    return next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":")[1] == hierarchy)


def test_v1_hierarchies_cgroupfs_driver_and_systemd_unit(cg: Cgroups) -> None:
    m = _mounts()
    if "memory" not in m or "name=systemd" not in m:
        pytest.skip("no cgroup v1 memory and name=systemd hierarchies (a pure v2 host)")
    # stay inside this test's own cgroups: their limits keep applying to the workloads
    here = _own_v1_path("memory").rstrip("/")
    uid, _, cid = _ids()
    rel = f"{here}/kubepods/burstable/pod{uid}/{cid}"
    pod = cg.spawn(cg.make(m["memory"], rel))
    unit = f"kpe-test-{secrets.token_hex(4)}.service"
    srel = f"{_own_v1_path('name=systemd').rstrip('/')}/system.slice/{unit}"
    svc = cg.spawn(cg.make(m["name=systemd"], srel))
    got = CgroupLabels(LABELS, CgroupOf()).values([pod.pid, svc.pid])
    assert got == [(rel, cid, uid, ""), (srel, "", "", unit)]


def test_exit_before_lookup_seen_before_and_thread_of_a_live_process(cg: Cgroups, v2: Path) -> None:
    _, uid_, cid = _ids()
    path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{cid}.scope"
    scope = cg.make(v2, path)
    clock = Clock()
    of = CgroupOf(clock=clock)
    # seen while alive, then gone: its last value stays for events still in the buffer
    seen = cg.spawn(scope)
    assert of.values([seen.pid]) == [path]
    seen.kill()
    seen.wait()
    clock.t += 5
    assert of.values([seen.pid]) == [path]
    assert of.counts.exited_kept == 1
    # a thread that ended before any lookup, in a process that lives on: its process answers
    prog = "import threading\nt = threading.Thread(target=lambda: print(threading.get_native_id(), flush=True))\n" \
           "t.start(); t.join(); print('done', flush=True); input()\n"
    p = cg.spawn(None, [sys.executable, "-c", prog])
    move(p.pid, scope)  # v2 moves every thread of the process
    assert p.stdout is not None
    tid = int(p.stdout.readline())
    assert p.stdout.readline() == b"done\n"
    # join() returns when the Python thread is done; the kernel reaps the task a moment later (on a busy
    # machine, a noticeable one): wait for that, bounded, before asking about it
    for _ in range(1000):
        if not Path(f"/proc/{tid}").exists():
            break
        time.sleep(0.01)
    assert not Path(f"/proc/{tid}").exists()
    assert of.values([tid], tgids=[p.pid]) == [path]
    assert of.counts.via_tgid == 1
    # never seen, process gone too: attribution is impossible, `unknown`
    p.kill()
    p.wait()
    assert of.values([tid], tgids=[p.pid]) == [path]  # the process's answer stands for the window
    clock.t += 5
    assert of.values([tid], tgids=[p.pid]) == [UNKNOWN]
    assert of.counts.gone == 1


def test_migration_seen_after_the_recheck_window(cg: Cgroups, v2: Path) -> None:
    a = f"/system.slice/kpe-test-{secrets.token_hex(4)}.service"
    b = f"/system.slice/docker-{secrets.token_hex(32)}.scope"
    ga, gb = cg.make(v2, a), cg.make(v2, b)
    p = cg.spawn(ga)
    clock = Clock()
    of = CgroupOf(recheck_s=1.0, clock=clock)
    assert of.values([p.pid]) == [a]
    move(p.pid, gb)
    clock.t += 0.5
    assert of.values([p.pid]) == [a]  # documented: within the window the cached value stands
    clock.t += 0.6
    assert of.values([p.pid]) == [b]
    assert (of.counts.migrated, of.counts.reused) == (1, 0)


def _spawn_with_pid(want: int, into: Path, cg: Cgroups) -> subprocess.Popen[bytes] | None:
    """A process with pid `want` (ns_last_pid set just below it), placed into `into` before it execs."""
    procs = into / "cgroup.procs"
    for _ in range(300):  # other engineers' forks race us on this busy machine
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(want - 1))
        p = subprocess.Popen(["sleep", "300"], preexec_fn=lambda: procs.write_text("0"))
        if p.pid == want:
            cg.procs.append(p)
            return p
        p.send_signal(signal.SIGKILL)
        p.wait()
    return None


def test_tid_reuse_told_by_start_time(cg: Cgroups, v2: Path) -> None:
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("ns_last_pid not writable")
    _, uid_, cid = _ids()
    a = f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{cid}.scope"
    b = f"/system.slice/kpe-test-{secrets.token_hex(4)}.service"
    ga, gb = cg.make(v2, a), cg.make(v2, b)
    first = cg.spawn(ga)
    clock = Clock()
    of = CgroupOf(clock=clock)
    assert of.values([first.pid]) == [a]
    first.kill()
    first.wait()
    # /proc's start time counts clock ticks (10 ms): a successor started within the same tick would look
    # like the old thread moved, not like a new one; start it a tick or more later
    time.sleep(0.05)
    second = _spawn_with_pid(first.pid, gb, cg)
    if second is None:
        pytest.fail(f"could not take pid {first.pid} again in 300 tries")
    assert Path(f"/proc/{second.pid}/cgroup").read_text().endswith(f"0::{b}\n")
    assert of.values([second.pid]) == [a]  # within the window: the old holder's value (documented)
    clock.t += 1.1
    assert of.values([second.pid]) == [b]
    assert (of.counts.reused, of.counts.migrated, of.counts.exited_kept) == (1, 0, 0)
