"""Kube: pod name, namespace and container name by pod uid and container id, for labels.

From the API server's pod list for this node (or the kubelet's), fetched by a background thread every
interval and on demand when an unseen pod shows up, never per event; label lookups read an immutable
snapshot. Outside Kubernetes (no service-account token) there is no source and the labels are absent.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kprobe_exporter.cgroups import UNKNOWN, CgroupOf, attribution, distinct, spread

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIRROR = "kubernetes.io/config.mirror"  # a static pod's mirror: its cgroups carry this uid, not metadata.uid
KUBE_LABELS = ("pod", "namespace", "container")


@dataclass(frozen=True)
class Pod:
    uid: str
    name: str
    namespace: str


@dataclass(frozen=True)
class PodIndex:
    """One pod list, by pod uid and by container id (the id without its `runtime://` scheme)."""

    pods: Mapping[str, Pod] = field(default_factory=dict)
    containers: Mapping[str, str] = field(default_factory=dict)  # container id -> container name


def index_pod_list(doc: Mapping[str, Any]) -> PodIndex:
    """A v1 PodList (kubelet /pods or API server /api/v1/pods) as a PodIndex.

    Containers are taken from containerStatuses, initContainerStatuses and
    ephemeralContainerStatuses (`containerID: containerd://<id>`, `cri-o://`, `docker://`); a pod
    still pending has none yet.
    """
    pods: dict[str, Pod] = {}
    containers: dict[str, str] = {}
    for item in doc.get("items") or ():
        meta = item.get("metadata") or {}
        uid, name, ns = meta.get("uid"), meta.get("name"), meta.get("namespace")
        if not (uid and name and ns):
            continue
        pod = Pod(uid, name, ns)
        pods[uid] = pod
        mirror = (meta.get("annotations") or {}).get(MIRROR)
        if mirror:
            pods[mirror] = Pod(mirror, name, ns)
        status = item.get("status") or {}
        for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            for cs in status.get(key) or ():
                cid = (cs.get("containerID") or "").partition("://")[2]
                if cid and cs.get("name"):
                    containers[cid] = cs["name"]
    return PodIndex(pods, containers)


@dataclass(frozen=True)
class PodSource:
    """Where the pod list comes from: a URL, a bearer token file, and how to check the server.

    The token is read at every fetch (projected service-account tokens rotate).
    """

    url: str
    token_path: Path
    ca_path: Path | None
    verify: bool = True
    timeout_s: float = 10.0

    @classmethod
    def from_env(cls, kind: str = "apiserver", env: Mapping[str, str] | None = None,
                 sa_dir: Path = SERVICE_ACCOUNT, verify: bool = True) -> PodSource | None:
        """This node's pod list, or None outside Kubernetes (no token, or no node name / address).

        `apiserver`: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/pods
        ?fieldSelector=spec.nodeName=$NODE_NAME (RBAC: pods list). `kubelet`:
        https://$HOST_IP:10250/pods (RBAC: nodes/proxy get; kubelet serving certificates are often
        self-signed, hence `verify`).
        """
        e = os.environ if env is None else env
        token = sa_dir / "token"
        if not token.is_file():
            return None
        ca = sa_dir / "ca.crt" if (sa_dir / "ca.crt").is_file() else None
        if kind == "kubelet":
            host = e.get("HOST_IP") or e.get("NODE_NAME")
            if not host:
                return None
            return cls(f"https://{_host(host)}:10250/pods", token, ca, verify)
        if kind != "apiserver":
            raise ValueError(f"pod list source must be apiserver or kubelet, not {kind!r}")
        api, port, node = e.get("KUBERNETES_SERVICE_HOST"), e.get("KUBERNETES_SERVICE_PORT", "443"), e.get("NODE_NAME")
        if not (api and node):
            return None
        query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={node}"})
        return cls(f"https://{_host(api)}:{port}/api/v1/pods?{query}", token, ca, verify)

    def fetch(self) -> PodIndex:
        """One request; raises OSError (URLError, HTTPError) or ValueError (not a PodList)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_path) if self.ca_path else None)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        token = self.token_path.read_text().strip()
        req = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {token}",
                                                        "Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s, context=ctx) as r:
            doc = json.loads(r.read())
        if not isinstance(doc, dict) or doc.get("kind") != "PodList":
            raise ValueError(f"{self.url}: not a PodList")
        return index_pod_list(doc)


def _host(h: str) -> str:
    return f"[{h}]" if ":" in h else h  # IPv6 literal


@dataclass
class PodCounts:
    refreshes: int = 0
    failures: int = 0
    last_error: str = ""


class PodMetadata:
    """The current PodIndex, refreshed by a daemon thread every `interval_s`, and sooner (at most
    every `min_interval_s`) when a lookup asks for a pod it does not know. A failed fetch keeps the
    previous index and is counted. Readers take `self.index` (swapped whole: no lock)."""

    def __init__(self, source: Callable[[], PodIndex], interval_s: float = 30.0,
                 min_interval_s: float = 5.0) -> None:
        self.source = source
        self.interval_s = interval_s
        self.min_interval_s = min_interval_s
        self.index = PodIndex()
        self.counts = PodCounts()
        self.refreshed = threading.Event()  # set after each attempt (tests and readiness wait on it)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pod-metadata", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def want_refresh(self) -> None:
        """A lookup met a pod it does not know: fetch again soon (no more often than min_interval_s)."""
        self._wake.set()

    def refresh(self) -> None:
        try:
            self.index = self.source()
            self.counts.refreshes += 1
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors; JSON errors ValueErrors
            self.counts.failures += 1
            self.counts.last_error = str(e)
        self.refreshed.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            done = time.monotonic()
            self._wake.wait(self.interval_s)
            self._wake.clear()
            rest = self.min_interval_s - (time.monotonic() - done)
            if rest > 0:
                self._stop.wait(rest)


class KubeLabels:
    """The `pod`, `namespace` and `container` labels of one probe as one registry entry, over the
    cgroup lookup. "" for a thread in no pod (or a pod-level thread with no container); `unknown`
    where the cgroup is unknown or the pod is not (yet) in the list."""

    def __init__(self, names: Sequence[str], of: CgroupOf, meta: PodMetadata) -> None:
        bad = [n for n in names if n not in KUBE_LABELS]
        if bad:
            raise ValueError(f"not a Kubernetes label: {bad[0]!r} (one of {', '.join(KUBE_LABELS)})")
        self.names = tuple(names)
        self.of = of
        self.meta = meta

    @classmethod
    def from_env(cls, names: Sequence[str], of: CgroupOf, kind: str = "apiserver", interval_s: float = 30.0,
                 env: Mapping[str, str] | None = None, sa_dir: Path = SERVICE_ACCOUNT,
                 verify: bool = True) -> KubeLabels | None:
        """The labels with their refresher thread started, or None outside Kubernetes (then leave
        the labels out: absent, not empty). Stop with `.meta.stop()`."""
        src = PodSource.from_env(kind, env, sa_dir, verify)
        if src is None:
            return None
        meta = PodMetadata(src.fetch, interval_s)
        labels = cls(names, of, meta)
        meta.start()
        return labels

    def by_tid(self, tids: Sequence[int], tgids: Sequence[int] | None = None) -> dict[int, tuple[str, ...]]:
        """One tuple of label values (in `names` order) per distinct tid."""
        paths = self.of.lookup(tids, tgids)
        index = self.meta.index
        rows = {p: self.row(p, index) for p in set(paths.values())}
        return {t: rows[p] for t, p in paths.items()}

    def columns(self, tids: Sequence[int], tgids: Sequence[int] | None = None) -> dict[str, list[str]]:
        """Each label's value for each event, in batch order."""
        u, owners, inv = distinct(tids, tgids)
        index = self.meta.index
        rows = [self.row(p, index) for p in self.of.lookup(u, owners).values()]
        return {n: spread([r[i] for r in rows], inv) for i, n in enumerate(self.names)}

    def row(self, path: str, index: PodIndex) -> tuple[str, ...]:
        if path == UNKNOWN:
            return (UNKNOWN,) * len(self.names)
        a = attribution(path)
        if not a.pod_uid:
            return ("",) * len(self.names)
        pod = index.pods.get(a.pod_uid)
        if pod is None:
            self.meta.want_refresh()
            return (UNKNOWN,) * len(self.names)
        have = {"pod": pod.name, "namespace": pod.namespace,
                "container": index.containers.get(a.container_id, UNKNOWN) if a.container_id else ""}
        return tuple(have[n] for n in self.names)
