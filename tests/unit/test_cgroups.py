"""cgroups: attribution from the path shapes runtimes and the kubelet create, hierarchy choice on v1,
v2 and hybrid hosts, rewrite rules, and the tid cache's invalidation and budget.

The cache tests read a /proc stand-in in a temporary directory (files shaped as the kernel writes
them, this process's own stat line with its start time replaced) so that exits, tid reuse and
migrations happen on cue; tests/live/test_cgroups.py does the same with real cgroups and processes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kprobe_exporter.cgroups import (
    LABELS,
    OTHER,
    UNKNOWN,
    Attribution,
    CgroupLabels,
    CgroupOf,
    Rewrite,
    RewriteRule,
    SavedTgids,
    attribution,
    pick_path,
)

UID = "1f2e3d4c-5b6a-4789-8abc-0123456789ab"
UID_ = UID.replace("-", "_")  # the systemd driver's spelling in slice names
CID = "4c01db0b339c7c1f1a0e6f7c3b5b3e1d9a2f8e7d6c5b4a3928171605f4e3d2c1"
STATIC = "c4ca4238a0b923820dcc509a6f75849b"
NODE = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

SHAPES = [
    # kubelet systemd driver + containerd, the three QoS classes (guaranteed pods sit in kubepods.slice)
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     Attribution(CID, UID, "")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
     Attribution(CID, UID, "")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope", Attribution(CID, UID, "")),
    # the pause container's and a pod-level thread's view: the pod, no container
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice", Attribution("", UID, "")),
    # kubelet cgroupfs driver (containerd / docker): plain directories, the id bare
    (f"/kubepods/burstable/pod{UID}/{CID}", Attribution(CID, UID, "")),
    (f"/kubepods/pod{UID}/{CID}", Attribution(CID, UID, "")),
    # a static pod (kube-apiserver, etcd): its uid is the manifest's hash, no dashes
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice/cri-containerd-{CID}.scope",
     Attribution(CID, STATIC, "")),
    (f"/kubepods/burstable/pod{STATIC}/{CID}", Attribution(CID, STATIC, "")),
    # CRI-O, systemd and cgroupfs; its conmon monitor is a unit of the pod, not the container
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope",
     Attribution(CID, UID, "")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope",
     Attribution("", UID, f"crio-conmon-{CID}.scope")),
    (f"/kubepods/besteffort/pod{UID}/crio-{CID}", Attribution(CID, UID, "")),
    # Docker, Podman (root and rootless, whose payload sits in a `container` child), nerdctl
    (f"/system.slice/docker-{CID}.scope", Attribution(CID, "", "")),
    (f"/docker/{CID}", Attribution(CID, "", "")),
    (f"/machine.slice/libpod-{CID}.scope", Attribution(CID, "", "")),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container",
     Attribution(CID, "", "")),
    (f"/system.slice/nerdctl-{CID}.scope", Attribution(CID, "", "")),
    # systemd services, sessions and user units
    ("/system.slice/nginx.service", Attribution("", "", "nginx.service")),
    ("/system.slice/system-getty.slice/getty@tty1.service", Attribution("", "", "getty@tty1.service")),
    ("/user.slice/user-1000.slice/session-3.scope", Attribution("", "", "session-3.scope")),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", Attribution("", "", "foo.service")),
    ("/init.scope", Attribution("", "", "init.scope")),
    # kind: a node is a docker container; the kubelet's tree (cgroup root /kubelet) nests inside it
    (f"/system.slice/docker-{NODE}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
     f"kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope", Attribution(CID, UID, "")),
    # a reader in a private cgroup namespace sees other namespaces' paths relative to its own root
    (f"/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope", Attribution(CID, UID, "")),
    ("/", Attribution("", "", "")),
    # near misses: short ids, a uid with a bad group, a slice that is not a pod's
    (f"/system.slice/docker-{CID[:12]}.scope", Attribution("", "", f"docker-{CID[:12]}.scope")),
    (f"/kubepods/burstable/pod{UID[:-1]}", Attribution("", "", "")),
    ("/kubepods.slice/kubepods-burstable.slice", Attribution("", "", "")),
]


@pytest.mark.parametrize(("path", "want"), SHAPES, ids=[s[0][-60:] for s in SHAPES])
def test_attribution_of_real_path_shapes(path: str, want: Attribution) -> None:
    assert attribution(path) == want


V1_CGROUPFS = f"""12:pids:/kubepods/burstable/pod{UID}/{CID}
11:cpuset:/kubepods/burstable/pod{UID}/{CID}
10:memory:/kubepods/burstable/pod{UID}/{CID}
9:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}
1:name=systemd:/system.slice/containerd.service
0::/system.slice/containerd.service
"""


def test_hybrid_host_cgroupfs_driver_takes_the_v1_path_that_names_the_container() -> None:
    # runc's cgroupfs manager places the container in every v1 controller; systemd's hierarchies still
    # show where the task was forked (containerd's service)
    assert pick_path(V1_CGROUPFS) == f"/kubepods/burstable/pod{UID}/{CID}"


def test_v2_host_takes_the_unified_path() -> None:
    p = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
    assert pick_path(f"0::{p}\n") == p


def test_v1_only_host_takes_systemds_hierarchy_then_memory() -> None:
    v1 = "7:memory:/user.slice\n3:cpu,cpuacct:/system.slice/ssh.service\n1:name=systemd:/system.slice/ssh.service\n"
    assert pick_path(v1) == "/system.slice/ssh.service"
    assert pick_path("7:memory:/user.slice\n3:cpu,cpuacct:/x\n") == "/user.slice"


def test_hybrid_host_root_in_unified_falls_to_the_first_v1_path_that_is_not_root() -> None:
    # this machine's own shape: placed by a v1-only tool, the unified hierarchy says "/"
    text = "9:name=systemd:/\n4:memory:/process_api/af34acbf71961baa4d94e50a2159fd4a\n0::/\n"
    assert pick_path(text) == "/process_api/af34acbf71961baa4d94e50a2159fd4a"
    assert pick_path("9:name=systemd:/\n0::/\n") == "/"
    assert pick_path("") == "/"


def test_rewrite_first_match_wins_groups_expand_unmatched_is_other() -> None:
    rw = Rewrite.from_config([
        {"match": r"-pod([0-9a-f_]+)\.slice/cri-containerd-([0-9a-f]{12})", "replace": r"pod/\2"},
        {"match": r"\.slice/(?P<unit>[^/]+)\.service$", "replace": r"svc/\g<unit>"},
        {"match": r"\.service$", "replace": "never-reached"},
    ])
    pod = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
    assert rw(pod) == f"pod/{CID[:12]}"
    assert rw("/system.slice/nginx.service") == "svc/nginx"
    assert rw("/user.slice/user-1000.slice/session-3.scope") == OTHER
    assert rw(UNKNOWN) == UNKNOWN
    assert rw(pod) == f"pod/{CID[:12]}"  # the kept answer is the computed one


def test_rewrite_without_rules_is_the_path_and_its_memory_is_bounded() -> None:
    rw = Rewrite(max_kept=3)
    assert [rw(f"/a{i}") for i in range(10)] == [f"/a{i}" for i in range(10)]
    assert len(rw._kept) <= 3
    one = Rewrite([RewriteRule(re.compile("a"), "A")], max_kept=2)
    assert [one(p) for p in ("/a", "/b", "/a", "/c", "/a")] == ["A", OTHER, "A", OTHER, "A"]


def test_rewrite_bad_regex_raises() -> None:
    with pytest.raises(re.error):
        Rewrite.from_config([{"match": "(", "replace": "x"}])


class FakeProc:
    """A /proc stand-in: TID/stat (this process's real line, start time replaced) and TID/cgroup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stat = Path("/proc/self/stat").read_text()

    def put(self, tid: int, start: int, cgroup_text: str, comm: str = "a (b) c") -> None:
        d = self.root / str(tid)
        d.mkdir(exist_ok=True)
        _, _, tail = self.stat.rpartition(")")
        fields = tail.split()
        fields[19] = str(start)
        (d / "stat").write_text(f"{tid} ({comm}) {' '.join(fields)}\n")
        (d / "cgroup").write_text(cgroup_text)

    def kill(self, tid: int) -> None:
        for f in ("stat", "cgroup"):
            (self.root / str(tid) / f).unlink()
        (self.root / str(tid)).rmdir()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def test_cached_within_window_then_migration_seen(proc: FakeProc) -> None:
    clock = Clock()
    of = CgroupOf(proc=str(proc.root), recheck_s=1.0, clock=clock)
    proc.put(100, 555, "0::/system.slice/a.service\n")
    assert of.values([100, 100, 100]) == ["/system.slice/a.service"] * 3
    assert of.counts.reads == 1
    proc.put(100, 555, "0::/system.slice/b.service\n")
    clock.t += 0.5
    assert of.values([100]) == ["/system.slice/a.service"]  # within the window: no /proc read
    assert of.counts.reads == 1
    clock.t += 0.6
    assert of.values([100]) == ["/system.slice/b.service"]
    assert (of.counts.reads, of.counts.migrated, of.counts.reused) == (2, 1, 0)


def test_tid_reuse_is_told_by_start_time(proc: FakeProc) -> None:
    clock = Clock()
    of = CgroupOf(proc=str(proc.root), clock=clock)
    proc.put(200, 10, "0::/system.slice/a.service\n")
    assert of.values([200]) == ["/system.slice/a.service"]
    proc.kill(200)
    proc.put(200, 11, "0::/system.slice/a.service\n")  # same cgroup, new thread: a reuse, not a migration
    clock.t += 2
    assert of.values([200]) == ["/system.slice/a.service"]
    assert (of.counts.reused, of.counts.migrated) == (1, 0)
    proc.put(200, 12, "0::/system.slice/c.service\n")
    clock.t += 2
    assert of.values([200]) == ["/system.slice/c.service"]
    assert (of.counts.reused, of.counts.migrated) == (2, 0)


def test_exited_thread_keeps_its_value_never_seen_one_is_unknown(proc: FakeProc) -> None:
    clock = Clock()
    of = CgroupOf(proc=str(proc.root), clock=clock)
    proc.put(300, 1, "0::/system.slice/a.service\n")
    assert of.values([300]) == ["/system.slice/a.service"]
    proc.kill(300)
    clock.t += 2
    assert of.values([300, 301]) == ["/system.slice/a.service", UNKNOWN]
    assert (of.counts.exited_kept, of.counts.gone) == (1, 1)
    assert of.values([301]) == [UNKNOWN]  # a gone tid is asked about once per window, not per batch
    assert (of.counts.gone, of.counts.reads) == (1, 3)
    clock.t += 2
    proc.put(301, 7, "0::/system.slice/b.service\n")  # the tid taken by a new thread
    assert of.values([301]) == ["/system.slice/b.service"]
    assert (of.counts.gone, of.counts.reads) == (1, 4)


def test_gone_thread_answered_by_its_live_process(proc: FakeProc) -> None:
    of = CgroupOf(proc=str(proc.root), clock=Clock())
    proc.put(400, 1, "0::/system.slice/a.service\n")
    assert of.values([401, 402, 401], tgids=[400, 402, 400]) == ["/system.slice/a.service", UNKNOWN,
                                                                 "/system.slice/a.service"]
    assert (of.counts.via_tgid, of.counts.gone, of.counts.reads) == (1, 1, 2)
    assert of.values([401], tgids=[400]) == ["/system.slice/a.service"]  # kept for the window
    assert of.counts.reads == 2


def test_budget_bounds_reads_per_batch(proc: FakeProc) -> None:
    clock = Clock()
    of = CgroupOf(proc=str(proc.root), budget=2, clock=clock)
    for t in range(500, 505):
        proc.put(t, 1, f"0::/s/{t}.service\n")
    tids = [500, 501, 502, 503, 504, 500]
    assert of.values(tids) == ["/s/500.service", "/s/501.service", UNKNOWN, UNKNOWN, UNKNOWN, "/s/500.service"]
    assert (of.counts.reads, of.counts.over_budget) == (2, 3)
    assert of.values(tids) == ["/s/500.service", "/s/501.service", "/s/502.service", "/s/503.service", UNKNOWN,
                               "/s/500.service"]
    assert (of.counts.reads, of.counts.over_budget) == (4, 4)
    # past the window every entry is stale: two are rechecked, the rest keep their value this batch
    for t in range(500, 505):
        proc.put(t, 1, f"0::/moved/{t}.service\n")
    clock.t += 2
    assert of.values(tids) == ["/moved/500.service", "/moved/501.service", "/s/502.service", "/s/503.service",
                               UNKNOWN, "/moved/500.service"]
    assert (of.counts.reads, of.counts.over_budget) == (6, 5)


def test_entries_not_rechecked_are_forgotten(proc: FakeProc) -> None:
    clock = Clock()
    of = CgroupOf(proc=str(proc.root), forget_s=30, clock=clock)
    proc.put(600, 1, "0::/a.service\n")
    proc.put(601, 1, "0::/b.service\n")
    of.values([600, 601])
    for _ in range(40):
        clock.t += 1
        of.values([600])
    assert set(of._cache) == {600}
    of.forget([600])
    assert of._cache == {}


def test_a_cgroup_file_longer_than_a_page(proc: FakeProc) -> None:
    deep = "/".join(f"level-{i:03d}-{'x' * 40}.slice" for i in range(120)) + f"/docker-{CID}.scope"
    text = "".join(f"{i}:ctl{i}:/{deep[:-80]}\n" for i in range(12, 0, -1)) + f"0::/{deep}\n"
    assert len(text) > 3 * 4096
    proc.put(900, 1, text)
    assert CgroupOf(proc=str(proc.root), clock=Clock()).values([900]) == [f"/{deep}"]


def test_numpy_columns_and_start_time_after_a_comm_with_parens(proc: FakeProc) -> None:
    of = CgroupOf(proc=str(proc.root), clock=Clock())
    proc.put(700, 42, "0::/a.service\n", comm="x) 1 2 (y")
    assert of.values(np.array([700, 700], dtype=np.int64)) == ["/a.service", "/a.service"]
    assert of._cache[700].start == b"42"


def test_labels_share_one_lookup(proc: FakeProc) -> None:
    of = CgroupOf(proc=str(proc.root), clock=Clock())
    path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
    proc.put(800, 1, f"0::{path}\n")
    proc.put(801, 1, "0::/system.slice/nginx.service\n")
    rw = Rewrite.from_config([{"match": r"cri-containerd-(\w{6})", "replace": r"c-\1"}])
    labels = CgroupLabels(LABELS, of, rw)
    tids = [800, 801, 802, 800]
    assert labels.columns(tids) == {
        "cgroup": [f"c-{CID[:6]}", OTHER, UNKNOWN, f"c-{CID[:6]}"],
        "container_id": [CID, "", UNKNOWN, CID],
        "pod_uid": [UID, "", UNKNOWN, UID],
        "systemd_unit": ["", "nginx.service", UNKNOWN, ""],
    }
    assert of.counts.reads == 3  # three distinct tids, read once for all four labels
    assert labels.by_tid(np.array(tids)) == {800: (f"c-{CID[:6]}", CID, UID, ""),
                                             801: (OTHER, "", "", "nginx.service"),
                                             802: (UNKNOWN,) * 4}
    assert of.lookup([801, 801]) == {801: "/system.slice/nginx.service"}
    assert CgroupLabels(["systemd_unit", "cgroup"], of).values([801, 800]) == [
        ("nginx.service", "/system.slice/nginx.service"), ("", path)]
    assert labels.columns([]) == {n: [] for n in LABELS}
    assert of.values(np.array([], dtype=np.int64)) == []
    with pytest.raises(ValueError, match="not a cgroup label: 'pod'"):
        CgroupLabels(["cgroup", "pod"], of)


def test_gone_thread_without_tgids_asks_saved_tgids(proc: FakeProc, tmp_path: Path) -> None:
    """The agent's batches carry no tgid column: a gone tid's process comes from the kernel's table
    (the file here has the kernel's `TID TGID` line format; the live tier reads the real one)."""
    table = tmp_path / "tracefs"
    table.mkdir()
    (table / "saved_tgids").write_text("500 500\n501 500\n")
    clock = Clock()
    saved = SavedTgids(str(table), clock=clock)
    of = CgroupOf(proc=str(proc.root), clock=clock, tgid_of=saved)
    proc.put(500, 1, "0::/system.slice/a.service\n")
    assert of.values([501, 502]) == ["/system.slice/a.service", UNKNOWN]  # 502: in no table
    assert (of.counts.via_tgid, of.counts.gone) == (1, 1)
    (table / "saved_tgids").write_text("500 500\n501 500\n503 500\n")
    assert saved(503) == -1  # missing, but the copy was read under min_interval ago
    clock.t += 0.02
    assert saved(503) == 500  # missing: read again
    (table / "saved_tgids").write_text("503 0\n")
    clock.t += 2
    assert saved(503) == -1  # older than max_age: read again; 0 means no process known
