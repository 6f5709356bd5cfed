"""labels: the label-source registry; what the aggregate counts comes from its entries, comm included."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from feeding import feed_text
from kprobe_exporter import agent, cgroups, config, labels, probes
from kprobe_exporter.aggregate import Aggregate, CompletedPair
from kprobe_exporter.cgroups import CgroupOf
from kprobe_exporter.events import EventBatch
from kprobe_exporter.kube import PodMetadata, index_pod_list
from kprobe_exporter.probes import EventSpec
from unit import test_kube
from unit.test_kube import kube, sa  # noqa: F401 (fixtures: the local HTTPS stand-in for the kubelet)

CFG = """
probes:
  - name: f
    uprobe: /bin/x:0x10
    args: {n: "%di:s32", m: "%si:s32"}
    labels: [m, comm, n]
"""


def line(comm: str, tid: int, ts_us: int, body: str) -> bytes:
    return f"{comm:>16}-{tid:<7} [000] ..... {ts_us // 10**6:5d}.{ts_us % 10**6:06d}: {body}".encode()


def make() -> Aggregate:
    cfg = config.load_text(CFG)
    return Aggregate(probes.build_probe_set(cfg, resolve=None), cfg.buckets, label_limit=2)


def counts(agg: Aggregate) -> dict[tuple[tuple[str, str], ...], int]:
    return {lbls: v for (_, lbls), v in agg.snapshot().events.items()}


def test_sources_split_an_events_labels() -> None:
    ev = make().probes.events[0]
    got = [(type(s).__name__, s.labels, at) for s, at in labels.sources_for(ev, 0, ev.labels)]
    assert got == [("ArgSource", ("m", "n"), (0, 2)), ("CommSource", ("comm",), (1,))]
    assert labels.arg_labels(ev) == ("m", "n")


@pytest.mark.parametrize("repeat", [1, 200])  # the per-line parse and the columnar one
def test_values_land_in_label_order_and_the_cap_applies(repeat: int) -> None:
    agg = make()
    feed_text(agg, b"\n".join(repeat * [
        line("a", 1, 10, "f: (0x1) n=1 m=2"), line("b", 2, 11, "f: (0x1) n=1 m=2"),
        line("a", 1, 12, "f: (0x1) n=3 m=4"), line("c", 3, 13, "f: (0x1) n=5 m=6"),
    ]) + b"\n")
    assert counts(agg) == {
        (("m", "2"), ("comm", "a"), ("n", "1")): repeat,
        (("m", "2"), ("comm", "b"), ("n", "1")): repeat,
        (("m", "4"), ("comm", "a"), ("n", "3")): repeat,
        (("m", config.OVERFLOW_VALUE), ("comm", config.OVERFLOW_VALUE), ("n", config.OVERFLOW_VALUE)): repeat,
    }
    assert agg.snapshot().label_overflow == {("f", "m"): repeat, ("f", "comm"): repeat, ("f", "n"): repeat}


class ByThread:
    """A source keyed by thread id, as a cgroup source would be: an entry in the registry is all it takes."""

    labels: tuple[str, ...] = ("comm",)
    asked: ClassVar[list[list[Hashable]]] = []

    def __init__(self, ev: EventSpec, ev_idx: int, names: tuple[str, ...], ctx: labels.LabelContext) -> None:
        pass

    def keys(self, batch: EventBatch, rows: Sequence[int]) -> Sequence[Hashable]:
        return batch.tid[list(rows)].tolist()

    def values(self, batch: EventBatch, keys: Sequence[Hashable]) -> list[tuple[str, ...]]:
        ByThread.asked.append(list(keys))
        return [(f"t{k}",) for k in keys]


def test_a_registry_entry_fills_its_label(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(labels.SOURCES, "comm", ByThread)
    ByThread.asked = []
    agg = make()
    feed_text(agg, b"\n".join([line("a", 1, 10, "f: (0x1) n=1 m=2"), line("a", 1, 11, "f: (0x1) n=1 m=2"),
                               line("a", 7, 12, "f: (0x1) n=1 m=2")]) + b"\n")
    assert counts(agg) == {(("m", "2"), ("comm", "t1"), ("n", "1")): 2, (("m", "2"), ("comm", "t7"), ("n", "1")): 1}
    assert ByThread.asked == [[1, 7]]  # once per distinct key


UID = "1f2e3d4c-5b6a-4789-8abc-0123456789ab"
CID = "4c01db0b339c7c1f1a0e6f7c3b5b3e1d9a2f8e7d6c5b4a3928171605f4e3d2c1"
POD = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
CGROUP_CFG = """
cgroup_rewrite:
  - {match: 'kubepods.*-pod([0-9a-f_]+)\\.slice', replace: 'pod:\\1'}
  - {match: '^/system\\.slice/(.*)$', replace: '\\1'}
probes:
  - name: f
    uprobe: /bin/x:0x10
    labels: [container_id, comm, pod_uid, cgroup, systemd_unit]
"""


def fake_proc(root: Path, paths: dict[int, str]) -> None:
    """A /proc stand-in (TID/stat, TID/cgroup as the kernel writes them; tests/unit/test_cgroups.py
    tests the reading of the real files): each tid in the v2 cgroup given."""
    stat = Path("/proc/self/stat").read_text()
    for tid, path in paths.items():
        d = root / str(tid)
        d.mkdir()
        (d / "stat").write_text(f"{tid} (x) {stat.rpartition(')')[2].strip()}\n")
        (d / "cgroup").write_text(f"0::{path}\n")


def test_cgroup_labels_come_from_the_thread_one_source_one_lookup(tmp_path: Path) -> None:
    paths = {1: f"{POD}/cri-containerd-{CID}.scope", 2: POD, 3: "/system.slice/cron.service", 4: "/user.slice"}
    fake_proc(tmp_path, paths)
    cfg = config.load_text(CGROUP_CFG)
    agg = agent.make_aggregate(cfg, probes.build_probe_set(cfg, resolve=None), CgroupOf(proc=str(tmp_path)))
    rec = agg._events[0]
    assert [(type(s).__name__, s.labels, at) for s, at in rec.sources] == [
        ("CgroupSource", ("container_id", "pod_uid", "cgroup", "systemd_unit"), (0, 2, 3, 4)),
        ("CommSource", ("comm",), (1,))]
    feed_text(agg, b"\n".join(
        3 * [line("a", 1, 10, "f: (0x1)")] + 2 * [line("a", 2, 11, "f: (0x1)")] + [line("a", 3, 12, "f: (0x1)")]
        + [line("a", 4, 13, "f: (0x1)"), line("a", 5, 14, "f: (0x1)")]) + b"\n")
    pod = f"pod:{UID.replace('-', '_')}"
    assert counts(agg) == {
        (("container_id", CID), ("comm", "a"), ("pod_uid", UID), ("cgroup", pod), ("systemd_unit", "")): 3,
        (("container_id", ""), ("comm", "a"), ("pod_uid", UID), ("cgroup", pod), ("systemd_unit", "")): 2,
        (("container_id", ""), ("comm", "a"), ("pod_uid", ""), ("cgroup", "cron.service"),
         ("systemd_unit", "cron.service")): 1,
        (("container_id", ""), ("comm", "a"), ("pod_uid", ""), ("cgroup", "other"), ("systemd_unit", "")): 1,
        (("container_id", "unknown"), ("comm", "a"), ("pod_uid", "unknown"), ("cgroup", "unknown"),
         ("systemd_unit", "unknown")): 1,  # tid 5: no /proc entry
    }
    assert agg.label_context.cgroup_of.counts.reads == 5  # one /proc look per distinct tid


def test_cgroup_values_past_the_label_limit_fold_into_overflow(tmp_path: Path) -> None:
    fake_proc(tmp_path, {t: f"/system.slice/s{t}.service" for t in range(1, 5)})
    cfg = config.load_text("label_limit: 2\nprobes:\n  - {name: f, uprobe: '/bin/x:0x10', labels: [cgroup]}\n")
    agg = agent.make_aggregate(cfg, probes.build_probe_set(cfg, resolve=None), CgroupOf(proc=str(tmp_path)))
    feed_text(agg, b"\n".join(line("a", t, 10 + t, "f: (0x1)") for t in (1, 2, 3, 4, 4)) + b"\n")
    assert counts(agg) == {(("cgroup", "/system.slice/s1.service"),): 1, (("cgroup", "/system.slice/s2.service"),): 1,
                           (("cgroup", config.OVERFLOW_VALUE),): 3}
    assert agg.snapshot().label_overflow == {("f", "cgroup"): 3}


@pytest.mark.parametrize("kind", ["uprobe: /bin/x:0x10", "uretprobe: /bin/x:0x10", "tracepoint: sched/sched_switch",
                                  "kprobe: vfs_read"])
def test_every_kind_takes_the_cgroup_labels(kind: str) -> None:
    cfg = config.load_text(f"probes:\n  - {{name: f, {kind}, labels: [cgroup, container_id, pod_uid, systemd_unit]}}\n")
    ev = probes.build_probe_set(cfg, resolve=None).events[0]
    assert labels.arg_labels(ev) == ()


class AllSpans:
    sample_ratio = 1.0
    min_duration_ns = 0


@pytest.mark.parametrize("names", [["container_id", "pod_uid", "cgroup", "systemd_unit"], ["pod_uid"], []])
def test_spans_carry_the_probes_cgroup_labels_under_otel_names(tmp_path: Path, names: list[str]) -> None:
    paths = {1: f"{POD}/cri-containerd-{CID}.scope", 3: "/system.slice/cron.service"}
    fake_proc(tmp_path, paths)
    cfg = config.load_text(f"probes:\n  - {{name: f, uprobe: '/bin/x:0x10', labels: {names}, latency: true, "
                           "spans: {}}\n")
    agg = agent.make_aggregate(cfg, probes.build_probe_set(cfg, resolve=None), CgroupOf(proc=str(tmp_path)))
    got: list[CompletedPair] = []
    agg.set_sink("f", AllSpans(), got.append)
    feed_text(agg, b"\n".join(line("a", t, 10 + 2 * i, "f: (0x1)") + b"\n" +
                              line("a", t, 11 + 2 * i, "f_ret: (0x2 <- 0x1) ret=0") for i, t in enumerate((1, 3, 5)))
              + b"\n")
    full = {1: (("container.id", CID), ("k8s.pod.uid", UID), ("process.linux.cgroup", paths[1])),
            3: (("process.linux.cgroup", paths[3]),),  # no container, no pod: left out, not ""
            5: ()}  # no /proc entry: `unknown` left out
    keys = {cgroups.SPAN_ATTRIBUTES[n] for n in names if n != "systemd_unit"}  # it has no OTel name
    want = {t: tuple(sorted(kv for kv in where if kv[0] in keys)) for t, where in full.items()}
    assert {p.tid: tuple(sorted(p.where)) for p in got} == want


KUBE_CFG = "probes:\n  - {name: f, uprobe: '/bin/x:0x10', labels: [pod, container_id, namespace, container]}\n"


def test_pod_labels_are_absent_outside_kubernetes(tmp_path: Path) -> None:
    fake_proc(tmp_path, {1: f"{POD}/cri-containerd-{CID}.scope"})
    cfg = config.load_text(KUBE_CFG)
    agg = agent.make_aggregate(cfg, probes.build_probe_set(cfg, resolve=None), CgroupOf(proc=str(tmp_path)))
    feed_text(agg, line("a", 1, 10, "f: (0x1)") + b"\n")
    assert counts(agg) == {(("container_id", CID),): 1}  # no pod, namespace, container: absent, not ""


def test_pod_labels_from_the_pod_list_in_kubernetes(tmp_path: Path) -> None:
    """The pod list is a PodList document in the API's schema handed to the index (tests/unit/test_kube.py
    fetches the same from a local HTTPS server standing in for the API server and the kubelet)."""
    fake_proc(tmp_path, {1: f"{POD}/cri-containerd-{CID}.scope", 2: "/system.slice/cron.service"})
    doc = test_kube.pod_list(test_kube.pod("web-0", "shop", UID, [("nginx", f"containerd://{CID}")]))
    pods = PodMetadata(lambda: index_pod_list(doc))
    pods.refresh()
    cfg = config.load_text(KUBE_CFG)
    agg = agent.make_aggregate(cfg, probes.build_probe_set(cfg, resolve=None), CgroupOf(proc=str(tmp_path)), pods)
    feed_text(agg, b"\n".join([line("a", 1, 10, "f: (0x1)"), line("a", 1, 11, "f: (0x1)"),
                               line("a", 2, 12, "f: (0x1)")]) + b"\n")
    assert counts(agg) == {
        (("pod", "web-0"), ("container_id", CID), ("namespace", "shop"), ("container", "nginx")): 2,
        (("pod", ""), ("container_id", ""), ("namespace", ""), ("container", "")): 1,
    }


@pytest.mark.parametrize("in_kubernetes", [True, False])
def test_spans_carry_pod_names_from_the_kubelets_pod_list(tmp_path: Path, kube: test_kube.FakeKube,  # noqa: F811
                                                          sa: Path, in_kubernetes: bool) -> None:  # noqa: F811
    """The pod list is fetched from the local HTTPS server standing in for the kubelet (tests/unit/test_kube.py:
    a v1 PodList in the API's documented schema, bearer token, CA): k8s.pod.name, k8s.namespace.name and
    k8s.container.name on the spans of a probe with pod labels; a pod the list does not have and a thread in
    no pod leave them out. Outside Kubernetes (no pod list) they are absent."""
    other_uid = "22222222-3333-4444-5555-666666666666"
    paths = {1: f"{POD}/cri-containerd-{CID}.scope", 2: "/system.slice/cron.service",
             3: POD.replace(UID.replace("-", "_"), other_uid.replace("-", "_")) + f"/cri-containerd-{'ab' * 32}.scope"}
    fake_proc(tmp_path, paths)
    kube.items = [test_kube.pod("web-0", "shop", UID, [("nginx", f"containerd://{CID}")])]
    pods = None
    if in_kubernetes:
        src = test_kube.PodSource.from_env("kubelet", env=test_kube.api_env(kube), sa_dir=sa, verify=False)
        assert src is not None
        src = test_kube.dataclasses.replace(src, url=f"https://127.0.0.1:{kube.port}/pods", verify=True)
        pods = PodMetadata(src.fetch)
        pods.refresh()
        assert pods.counts.refreshes == 1, pods.counts.last_error
    cfg = config.load_text("probes:\n  - {name: f, uprobe: '/bin/x:0x10', labels: [pod, namespace, container, "
                           "container_id], latency: true, spans: {}}\n")
    agg = agent.make_aggregate(cfg, probes.build_probe_set(cfg, resolve=None), CgroupOf(proc=str(tmp_path)), pods)
    got: list[CompletedPair] = []
    agg.set_sink("f", AllSpans(), got.append)
    feed_text(agg, b"\n".join(line("a", t, 10 + 2 * i, "f: (0x1)") + b"\n" +
                              line("a", t, 11 + 2 * i, "f_ret: (0x2 <- 0x1) ret=0") for i, t in enumerate((1, 2, 3)))
              + b"\n")
    names = {"k8s.pod.name": "web-0", "k8s.namespace.name": "shop", "k8s.container.name": "nginx"}
    want = {1: {"container.id": CID, **(names if in_kubernetes else {})}, 2: {},
            3: {"container.id": "ab" * 32}}  # a pod not (yet) in the list: its names are unknown, left out
    assert {p.tid: dict(p.where) for p in got} == want
