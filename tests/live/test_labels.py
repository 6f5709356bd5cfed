"""Label sources end to end: the real agent counts a real uprobe by where the thread ran.

fxgen runs inside cgroup v2 hierarchies named as the kubelet (systemd driver) with containerd and
CRI-O name them, and outside them, a known number of times each; /metrics must show exactly those
counts under each container_id, pod_uid and rewritten cgroup value. Each workload is kept alive
after its calls (a destructor waiting on stdin, preloaded) until the counts are in. The last test
is about threads gone before the agent reads their events, in a process that lives on.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_proc import running_agent, samples
from kprobe_exporter.cgroups import OTHER, attribution, pick_path
from live.test_cgroups import Cgroups, _ids, cg, v2  # noqa: F401 (fixtures)

pytestmark = pytest.mark.root

HOLD_C = """#include <unistd.h>
__attribute__((destructor)) static void kpe_hold(void) { char c; while (read(0, &c, 1) > 0) {} }
"""


@pytest.fixture(scope="module")
def hold(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A library that keeps a process alive after main returns, until its stdin closes."""
    d = tmp_path_factory.mktemp("hold")
    (d / "hold.c").write_text(HOLD_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "hold.so"), str(d / "hold.c")], check=True)
    yield d / "hold.so"


def start(fxgen: Path, hold: Path, n: int, into: Path | None) -> subprocess.Popen[bytes]:
    """fxgen compute N, moved into `into` (None: the test's own cgroup) before it execs."""
    move = f"echo $$ > {into / 'cgroup.procs'} && " if into is not None else ""
    return subprocess.Popen(["sh", "-c", f'{move}LD_PRELOAD={hold} exec "$@"', "sh", str(fxgen), "compute", str(n)],
                            stdin=subprocess.PIPE)


def series(text: str, probe: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted((k, v) for k, v in ls if k != "probe")): val
            for (name, ls), val in samples(text).items() if name == "kprobe_events_total" and ("probe", probe) in ls}


def test_counts_per_container_pod_and_rewritten_cgroup(tracefs: Path, progs: dict[str, Path], write_config,
                                                       hold: Path, cg: Cgroups, v2: Path) -> None:  # noqa: F811
    uid1, uid1_, cid1 = _ids()
    uid2, uid2_, cid2 = _ids()
    pod1 = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid1_}.slice"
    inside = {
        "containerd": (cg.make(v2, f"{pod1}/cri-containerd-{cid1}.scope"), 23, cid1, uid1),
        "crio": (cg.make(v2, f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid2_}.slice/"
                              f"crio-{cid2}.scope"), 31, cid2, uid2),
    }
    outside_n = 17
    # the workload run outside inherits this process's cgroup; what that says depends on the host
    here = attribution(pick_path(Path("/proc/self/cgroup").read_text()))
    assert cid1 not in here and cid2 not in here
    cfg = write_config(f"""
instance: kpe_t_cglabels
cgroup_rewrite:
  - match: 'kubepods-burstable-pod([0-9a-f_]+)\\.slice/cri-containerd-([0-9a-f]{{12}})'
    replace: 'burstable/\\1/\\2'
probes:
  - name: compute
    uprobe: {progs["pie"]}:compute
    labels: [container_id, pod_uid, cgroup]
""")
    with running_agent(cfg) as agent:
        procs = [start(progs["pie"], hold, n, d) for d, n, _, _ in inside.values()]
        procs.append(start(progs["pie"], hold, outside_n, None))
        total = sum(n for _, n, _, _ in inside.values()) + outside_n
        try:
            assert agent.wait_value("kprobe_events_total", total, probe="compute") == total
            got = series(agent.scrape(), "compute")
        finally:
            for p in procs:
                p.communicate(b"")
    assert [p.returncode for p in procs] == [0, 0, 0]
    want = {
        (("cgroup", f"burstable/{uid1_}/{cid1[:12]}"), ("container_id", cid1), ("pod_uid", uid1)): 23,
        (("cgroup", OTHER), ("container_id", cid2), ("pod_uid", uid2)): 31,  # CRI-O's: no rule matches
        (("cgroup", OTHER), ("container_id", here.container_id), ("pod_uid", here.pod_uid)): outside_n,
    }
    assert got == want


def test_threads_gone_before_their_events_are_read_count_under_their_process(
        tracefs: Path, progs: dict[str, Path], write_config, hold: Path, cg: Cgroups, v2: Path) -> None:  # noqa: F811
    """Worker threads call compute and exit within microseconds; their process lives on (held). The agent
    reads their events a moment later, when /proc has no entry for their tids: the kernel's saved_tgids
    (record-tgid on) names the process, whose cgroup stands in. A process gone as a whole before its
    events are read has nothing left to look at: README says `unknown`, which test_cgroups checks."""
    uid, uid_, cid = _ids()
    scope = cg.make(v2, f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/"
                        f"cri-containerd-{cid}.scope")
    n, threads = 40, 5
    cfg = write_config(f"""
instance: kpe_t_cgthreads
probes:
  - name: compute
    uprobe: {progs["pie"]}:compute
    labels: [container_id, pod_uid]
""")
    with running_agent(cfg) as agent:
        move = f"echo $$ > {scope / 'cgroup.procs'} && "
        p = subprocess.Popen(["sh", "-c", f'{move}LD_PRELOAD={hold} exec "$@"', "sh", str(progs["pie"]),
                              "threads", str(n), str(threads)], stdin=subprocess.PIPE)
        try:
            assert agent.wait_value("kprobe_events_total", n * threads, probe="compute") == n * threads
            got = series(agent.scrape(), "compute")
        finally:
            p.communicate(b"")
    assert p.returncode == 0
    assert got == {(("container_id", cid), ("pod_uid", uid)): n * threads}
