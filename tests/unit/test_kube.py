"""kube: pod names from a pod list, fetched over HTTPS with a bearer token, refreshed in the background.

No kubelet or API server can run here: a local HTTPS server on 127.0.0.1 (self-signed certificate,
bearer-token check) stands in for both, serving PodLists written to the Kubernetes API's documented
v1 schema (metadata.uid/name/namespace/annotations, status.containerStatuses[].containerID as
`containerd://<id>`, `cri-o://<id>`, `docker://<id>`, initContainerStatuses, a static pod's mirror
annotation). The cgroup side reads a /proc stand-in in a temporary directory.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kprobe_exporter.cgroups import UNKNOWN, CgroupOf
from kprobe_exporter.kube import KubeLabels, Pod, PodMetadata, PodSource, index_pod_list
from unit.test_web import make_cert

TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.test-token.sig"
NODE = "node-a"
UID_WEB = "0f8fad5b-d9cb-469f-a165-70867728950e"
UID_DNS = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
UID_STATIC = "c4ca4238a0b923820dcc509a6f75849b"  # a static pod's config hash, as its cgroups name it
UID_MIRROR = "a87ff679-a2f3-471d-a181-a67b7542122c"
CID_NGINX = "3b18e512dba79e4c8300dd08aeb37f8e728b8dad4b3c5c5d5e6f7a8b9c0d1e2f"
CID_SIDECAR = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
CID_INIT = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
CID_DNS = "fd61a03af4f77d870fc21e05e7e80678095c92d808cfb3b5c279ee04c74aca13"
CID_ETCD = "a4e624d686e03ed2767c0abd85c14426b0b1157d2ce81d27bb4fe4f6f01d688a"


def pod(name: str, ns: str, uid: str, containers: list[tuple[str, str]], init: list[tuple[str, str]] = (),
        annotations: dict[str, str] | None = None, phase: str = "Running") -> dict[str, Any]:
    """One item of a v1 PodList, in the shape the API server and the kubelet serve."""

    def status(n: str, cid: str) -> dict[str, Any]:
        return {"name": n, "containerID": cid, "image": "docker.io/library/nginx:1.27",
                "imageID": "docker.io/library/nginx@sha256:" + "0" * 64, "ready": True, "restartCount": 0,
                "started": True, "state": {"running": {"startedAt": "2026-11-30T16:00:00Z"}}}

    return {
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "4711",
                     "creationTimestamp": "2026-11-30T15:59:58Z", "labels": {"app": name},
                     "annotations": annotations or {}},
        "spec": {"nodeName": NODE, "containers": [{"name": n, "image": "nginx"} for n, _ in containers],
                 "restartPolicy": "Always", "serviceAccountName": "default"},
        "status": {"phase": phase, "hostIP": "10.0.0.5", "podIP": "10.244.1.7", "qosClass": "Burstable",
                   "startTime": "2026-11-30T15:59:58Z",
                   **({"containerStatuses": [status(n, c) for n, c in containers]} if containers else {}),
                   **({"initContainerStatuses": [status(n, c) for n, c in init]} if init else {})},
    }


def pod_list(*items: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "4712"}, "items": list(items)}


BASE = [
    pod("web-7d4b9c8f6-x2x9k", "shop", UID_WEB,
        [("nginx", f"containerd://{CID_NGINX}"), ("sidecar", f"containerd://{CID_SIDECAR}")],
        init=[("migrate", f"containerd://{CID_INIT}")]),
    pod("coredns-5d78c9869d-abcde", "kube-system", UID_DNS, [("coredns", f"cri-o://{CID_DNS}")]),
    pod("etcd-node-a", "kube-system", UID_MIRROR, [("etcd", f"docker://{CID_ETCD}")],
        annotations={"kubernetes.io/config.mirror": UID_STATIC, "kubernetes.io/config.source": "file"}),
    pod("pending-0", "shop", "11111111-2222-3333-4444-555555555555", [], phase="Pending"),
]


def test_index_of_a_pod_list() -> None:
    idx = index_pod_list(pod_list(*BASE))
    assert idx.pods[UID_WEB] == Pod(UID_WEB, "web-7d4b9c8f6-x2x9k", "shop")
    assert idx.pods[UID_STATIC] == Pod(UID_STATIC, "etcd-node-a", "kube-system")
    assert idx.pods[UID_MIRROR].name == "etcd-node-a"
    assert idx.pods["11111111-2222-3333-4444-555555555555"].name == "pending-0"
    assert dict(idx.containers) == {CID_NGINX: "nginx", CID_SIDECAR: "sidecar", CID_INIT: "migrate",
                                    CID_DNS: "coredns", CID_ETCD: "etcd"}
    assert index_pod_list({"kind": "PodList", "items": None}).pods == {}


class FakeKube:
    """The stand-in server: /pods as the kubelet serves it, /api/v1/pods as the API server does."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.items = list(BASE)
        self.requests: list[str] = []
        self.fail_with = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                url = urllib.parse.urlsplit(self.path)
                items = outer.items
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"kind": "Status", "status": "Failure", "reason": "Unauthorized",
                                            "code": 401})
                if outer.fail_with:
                    return self._send(outer.fail_with, {"kind": "Status", "code": outer.fail_with})
                if url.path == "/api/v1/pods":
                    sel = urllib.parse.parse_qs(url.query).get("fieldSelector", [""])[0]
                    _, _, node = sel.partition("spec.nodeName=")
                    items = [i for i in items if i["spec"]["nodeName"] == node]
                elif url.path != "/pods":
                    return self._send(404, {"kind": "Status", "code": 404})
                return self._send(200, pod_list(*items))

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sa(tmp_path: Path) -> Path:
    """A service-account directory as the DaemonSet's projected volume mounts it."""
    d = tmp_path / "serviceaccount"
    d.mkdir()
    cert, key = make_cert(tmp_path, ("127.0.0.1",))
    (d / "token").write_text(TOKEN + "\n")
    (d / "ca.crt").write_bytes(cert.read_bytes())
    (d / "namespace").write_text("kprobe-exporter")
    (tmp_path / "key-path").write_text(str(key))
    return d


@pytest.fixture
def kube(sa: Path) -> Iterator[FakeKube]:
    k = FakeKube(sa / "ca.crt", Path((sa.parent / "key-path").read_text()))
    yield k
    k.close()


def api_env(k: FakeKube) -> dict[str, str]:
    return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(k.port), "NODE_NAME": NODE,
            "HOST_IP": "127.0.0.1"}


def test_outside_kubernetes_there_is_no_source(tmp_path: Path, sa: Path) -> None:
    assert PodSource.from_env(env={"NODE_NAME": NODE, "KUBERNETES_SERVICE_HOST": "10.96.0.1"},
                              sa_dir=tmp_path / "none") is None
    assert PodSource.from_env(env={}, sa_dir=sa) is None
    assert PodSource.from_env("kubelet", env={}, sa_dir=sa) is None
    with pytest.raises(ValueError, match="apiserver or kubelet"):
        PodSource.from_env("etcd", env={}, sa_dir=sa)


def test_apiserver_source_asks_for_this_node_with_the_token_and_checks_the_ca(kube: FakeKube, sa: Path) -> None:
    other = pod("elsewhere", "shop", "99999999-2222-3333-4444-555555555555", [])
    other["spec"]["nodeName"] = "node-b"
    kube.items.append(other)
    src = PodSource.from_env(env=api_env(kube), sa_dir=sa)
    assert src is not None
    assert src.url == f"https://127.0.0.1:{kube.port}/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a"
    idx = src.fetch()
    assert set(idx.pods) == {UID_WEB, UID_DNS, UID_STATIC, UID_MIRROR, "11111111-2222-3333-4444-555555555555"}
    assert kube.requests == ["/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a"]
    (sa / "token").write_text("rotated-but-wrong")  # read at each fetch
    with pytest.raises(OSError, match="401"):
        src.fetch()


def test_kubelet_source(kube: FakeKube, sa: Path) -> None:
    src = PodSource.from_env("kubelet", env=api_env(kube), sa_dir=sa, verify=False)
    assert src is not None and src.url == "https://127.0.0.1:10250/pods"
    # the stand-in cannot take the kubelet's port: same source, the server's port
    idx = dataclasses.replace(src, url=f"https://127.0.0.1:{kube.port}/pods").fetch()
    assert idx.containers[CID_DNS] == "coredns"
    untrusted = dataclasses.replace(src, url=f"https://127.0.0.1:{kube.port}/pods", ca_path=None, verify=True)
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.fetch()


class FakeProc:
    """/proc stand-in: TID/stat (this process's real line) and TID/cgroup."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, tid: int, path: str) -> None:
        d = self.root / str(tid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(Path("/proc/self/stat").read_text())
        (d / "cgroup").write_text(f"0::{path}\n")


def _slice(uid: str) -> str:
    u = uid.replace("-", "_")
    return f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"


def test_labels_from_cgroups_and_the_pod_list_refreshed_in_the_background(tmp_path: Path, kube: FakeKube,
                                                                          sa: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.root.mkdir()
    new_uid, new_cid = "22222222-3333-4444-5555-666666666666", "ab" * 32
    proc.put(10, f"{_slice(UID_WEB)}/cri-containerd-{CID_NGINX}.scope")
    proc.put(11, f"{_slice(UID_WEB)}/cri-containerd-{CID_SIDECAR}.scope")
    proc.put(12, f"/kubepods/besteffort/pod{UID_DNS}/crio-{CID_DNS}")
    proc.put(13, f"/kubepods/pod{UID_STATIC}/{CID_ETCD}")
    proc.put(14, "/system.slice/kubelet.service")
    proc.put(15, _slice(UID_WEB))  # a pod-level thread: a pod, no container
    proc.put(16, f"{_slice(new_uid)}/cri-containerd-{new_cid}.scope")
    src = PodSource.from_env(env=api_env(kube), sa_dir=sa)
    assert src is not None
    meta = PodMetadata(src.fetch, interval_s=3600, min_interval_s=0)
    meta.start()
    try:
        assert meta.refreshed.wait(30)
        labels = KubeLabels(["namespace", "pod", "container"], CgroupOf(proc=str(proc.root)), meta)
        tids = [10, 11, 12, 13, 14, 15, 99] * 1000
        meta.refreshed.clear()
        cols = labels.columns(tids)
        assert len(kube.requests) == 1  # 7000 events, no request
        assert cols == {
            "namespace": ["shop", "shop", "kube-system", "kube-system", "", "shop", UNKNOWN] * 1000,
            "pod": ["web-7d4b9c8f6-x2x9k", "web-7d4b9c8f6-x2x9k", "coredns-5d78c9869d-abcde", "etcd-node-a", "",
                    "web-7d4b9c8f6-x2x9k", UNKNOWN] * 1000,
            "container": ["nginx", "sidecar", "coredns", "etcd", "", "", UNKNOWN] * 1000,
        }
        assert not meta.refreshed.is_set()
        assert labels.by_tid([10, 14, 10]) == {10: ("shop", "web-7d4b9c8f6-x2x9k", "nginx"), 14: ("", "", "")}
        # a pod the list does not have yet: unknown now, and the thread fetches again
        kube.items.append(pod("new-0", "jobs", new_uid, [("work", f"containerd://{new_cid}")]))
        assert labels.columns([16])["pod"] == [UNKNOWN]
        assert meta.refreshed.wait(30)
        assert labels.columns([16, 16]) == {"namespace": ["jobs"] * 2, "pod": ["new-0"] * 2,
                                           "container": ["work"] * 2}
        assert (meta.counts.refreshes, meta.counts.failures, len(kube.requests)) == (2, 0, 2)
    finally:
        meta.stop()


def test_from_env_starts_the_refresher_or_gives_none_outside_kubernetes(tmp_path: Path, kube: FakeKube,
                                                                         sa: Path) -> None:
    assert KubeLabels.from_env(["pod"], CgroupOf(), env=api_env(kube), sa_dir=tmp_path / "none") is None
    proc = FakeProc(tmp_path / "proc")
    proc.root.mkdir()
    proc.put(20, "/system.slice/sshd.service")
    proc.put(21, f"/kubepods/besteffort/pod{UID_DNS}/crio-{CID_DNS}")
    labels = KubeLabels.from_env(["pod", "namespace"], CgroupOf(proc=str(proc.root)), env=api_env(kube), sa_dir=sa)
    assert labels is not None
    try:
        assert labels.meta.refreshed.wait(30)
        assert labels.columns([20, 21]) == {"pod": ["", "coredns-5d78c9869d-abcde"], "namespace": ["", "kube-system"]}
    finally:
        labels.meta.stop()


def test_failed_refresh_keeps_the_last_list_and_is_counted(kube: FakeKube, sa: Path) -> None:
    src = PodSource.from_env(env=api_env(kube), sa_dir=sa)
    assert src is not None
    meta = PodMetadata(src.fetch)
    meta.refresh()
    kube.fail_with = 500
    meta.refresh()
    assert (meta.counts.refreshes, meta.counts.failures) == (1, 1)
    assert "500" in meta.counts.last_error
    assert meta.index.pods[UID_WEB].name == "web-7d4b9c8f6-x2x9k"
    kube.close()
    meta.refresh()
    assert meta.counts.failures == 2
    with pytest.raises(ValueError, match="not a Kubernetes label"):
        KubeLabels(["pod_name"], CgroupOf(), meta)
