"""The container image, built for real from the Containerfile and run the way the DaemonSet runs it.

deploy/image/build_image.py builds it as the README says: a Python base debootstrapped from Debian
packages (cached in /var/cache/kprobe-exporter-image, keyed by its inputs), then ``buildah bud
--layers``: 7 to 13 minutes the first time on this busy 2-core machine, 15 s when nothing changed,
about 2 minutes after a source change. No registry is reachable here, so the Containerfile's
default base (Python's official slim image) is never pulled or tested here.

The container is run by runc, the OCI runtime under containerd and CRI-O, on a container layer over
the image (``buildah from`` + ``buildah mount``, as a snapshotter prepares one) with a runtime spec
this test writes from deploy/kubernetes/daemonset.yaml: its command and args, its env (with
``$(VAR)`` expanded as the kubelet does), uid 0, a read-only root, no PID and no network namespace
(hostPID, hostNetwork; the host's UTS namespace too, as with hostNetwork), the node's
/sys/kernel/tracing bind-mounted with HostToContainer (rslave) propagation, the config read-only at
the ConfigMap's mount path, sysfs read-write and no seccomp or AppArmor profile (privileged), the
capabilities the securityContext grants, and the memory limit and CPU shares of its resources.
``podman run`` cannot start containers on this machine (it asks for rlimits above this machine's
hard limits, and the bounding set here lacks CAP_SYS_RESOURCE to raise them); runc with a spec that
sets no rlimits runs fine.

What a real Kubernetes node does differently:
- privileged grants every capability. This machine's bounding set lacks CAP_SYS_RESOURCE, so the
  container gets all the others; the test checks the agent holds exactly that set.
- kubelet and the CRI runtime write the spec: a pod sandbox (pause container) owns the IPC namespace
  (here the container has its own), cgroups go under kubepods (here a cgroup of its own, same
  cgroup v1 controllers and limits), privileged adds every host device to /dev (here runc's default
  devices; the agent opens none), and /etc/hosts, /etc/resolv.conf and /dev/termination-log are
  mounted (here the image's own; the agent reads none of them).
- hostPort 10111 becomes a free port: several test runs share this machine.
- spec.nodeName is this host's name, status.hostIP 127.0.0.1, metadata.name a fixed pod name.
- The ConfigMap's config probes kernel functions, which this kernel (no kprobe_events) refuses, so
  the mounted config is the image's own embedded default for this kernel (syscall tracepoints, as
  `kprobe-exporter default-config` in the container prints it) with a comm label on openat and an
  instance name of its own. The kubelet mounts a ConfigMap as a directory of symlinks; here a file.
- The kubelet's httpGet probes are the test's GETs of /healthz from the host (same port, host
  network); the image's HEALTHCHECK (which Kubernetes ignores and Podman/Docker run) is run in the
  container with `runc exec`.
- Stopping is what the kubelet asks the runtime for: SIGTERM (`runc kill`), SIGKILL only after
  terminationGracePeriodSeconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from agent_proc import free_port, group_definitions, value

ROOT = Path(__file__).resolve().parents[2]
TRACEFS = Path("/sys/kernel/tracing")
INSTANCE = "kpe_image"
WORKLOAD_COMM = "kpe_img_opener"  # the workload's file name, so its comm (15 bytes at most)
OPENS = 257
TOOLS = ("buildah", "podman", "runc", "debootstrap", "gcc")

# Linux capability numbers (include/uapi/linux/capability.h), 0 .. CAP_LAST_CAP (40).
CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
    "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT "
    "SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE "
    "AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ "
    "PERFMON BPF CHECKPOINT_RESTORE"
).split()
# containerd's and CRI-O's default set for a container that is not privileged.
RUNTIME_DEFAULT_CAPS = {"CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE"}
COMPILER = re.compile(r"^((x86_64-linux-gnu-)?(gcc|g\+\+|c\+\+|cc|cpp|clang|clang\+\+|tcc|as|ld|ld\.bfd|ld\.gold)"
                      r"(-\d+)?|cc1|cc1plus|collect2)$")


def load_build_image() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_image", ROOT / "deploy" / "image" / "build_image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_image = load_build_image()


def daemonset() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "daemonset.yaml").read_text())
    assert doc["kind"] == "DaemonSet"
    return doc  # type: ignore[no-any-return]


def container_spec() -> dict[str, Any]:
    [container] = daemonset()["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def need_tools() -> None:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS):
        msg = f"needs root and {', '.join(TOOLS)} (sh tests/setup.sh)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built (or found in buildah's layer cache) from this checkout."""
    need_tools()
    return str(build_image.build(build_image.default_tag()))


@pytest.fixture(scope="module")
def inspect(image: str) -> dict[str, Any]:
    out = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True).stdout
    [doc] = json.loads(out)
    return doc  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def rootfs(image: str) -> Iterator[Path]:
    """A container layer over the image, mounted: what a snapshotter hands the runtime."""
    name = f"kpe-image-test-{os.getpid()}"
    subprocess.run(["buildah", "from", "--pull-never", "--name", name, image], capture_output=True, check=True)
    try:
        mount = subprocess.run(["buildah", "mount", name], capture_output=True, text=True, check=True).stdout
        yield Path(mount.strip())
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True, check=False)


def granted_capabilities(security: dict[str, Any]) -> set[str]:
    """The capabilities a securityContext gives a container (privileged: every one)."""
    if security.get("privileged"):
        return set(CAPABILITIES)
    caps = security.get("capabilities", {})
    drop = {c.removeprefix("CAP_") for c in caps.get("drop", [])}
    base = set() if "ALL" in drop else RUNTIME_DEFAULT_CAPS - drop
    return base | {c.removeprefix("CAP_") for c in caps.get("add", [])}


def cap_mask(names: set[str]) -> int:
    return sum(1 << CAPABILITIES.index(n) for n in names)


def host_bounding_set() -> set[str]:
    status = Path("/proc/self/status").read_text()
    mask = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return {n for i, n in enumerate(CAPABILITIES) if mask >> i & 1}


def quantity(text: str) -> float:
    """A Kubernetes resource quantity (100m, 512Mi, 1G) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, text
    return float(match.group(1)) * units.get(match.group(2), 1)


def pod_env(container: dict[str, Any], image_env: list[str]) -> list[str]:
    """The container's environment as the kubelet makes it: the image's, then the pod's, $(VAR) expanded."""
    fields = {"spec.nodeName": socket.gethostname(), "status.hostIP": "127.0.0.1",
              "metadata.name": "kprobe-exporter-test"}
    env: dict[str, str] = dict(e.split("=", 1) for e in image_env)
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
    return [f"{k}={v}" for k, v in env.items()]


def runtime_spec(rootfs: Path, args: list[str], env: list[str], config_dir: Path, cgroup: str) -> dict[str, Any]:
    """An OCI runtime spec for the DaemonSet's container (see the module docstring for what differs)."""
    container = container_spec()
    security = container["securityContext"]
    pod = daemonset()["spec"]["template"]["spec"]
    caps = sorted(f"CAP_{c}" for c in granted_capabilities(security) & host_bounding_set())
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    tracefs = mounts["tracefs"]
    propagation = {"HostToContainer": "rslave", "Bidirectional": "rshared"}.get(
        tracefs.get("mountPropagation", ""), "rprivate")
    namespaces = [{"type": "mount"}, {"type": "ipc"}]
    if not pod.get("hostPID"):
        namespaces.append({"type": "pid"})
    if not pod.get("hostNetwork"):
        namespaces += [{"type": "network"}, {"type": "uts"}]
    sys_options = ["nosuid", "noexec", "nodev"] + ([] if security.get("privileged") else ["ro"])
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": security.get("runAsUser", 0), "gid": security.get("runAsGroup", 0)},
            "args": args,
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": security.get("allowPrivilegeEscalation") is False,
        },
        "root": {"path": str(rootfs), "readonly": bool(security.get("readOnlyRootFilesystem"))},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options},
            {"destination": tracefs["mountPath"], "type": "bind", "source": volumes["tracefs"]["hostPath"]["path"],
             "options": ["rbind", propagation]},
            {"destination": mounts["config"]["mountPath"], "type": "bind", "source": str(config_dir),
             "options": ["rbind", "ro"] if mounts["config"].get("readOnly") else ["rbind"]},
        ],
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroup,
            "resources": {"memory": {"limit": int(quantity(limits["memory"]))},
                          "cpu": {"shares": max(2, int(quantity(requests["cpu"]) * 1024))}},
        },
    }  # fmt: skip


class RuncContainer:
    """One container run by runc in the foreground (runc run), stopped as the kubelet stops it."""

    def __init__(self, bundle: Path, spec: dict[str, Any], name: str) -> None:
        bundle.mkdir(parents=True, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))
        self.name = name
        self.log_path = bundle / "container.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["runc", "run", "--bundle", str(bundle), name],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> dict[str, Any]:
        out = subprocess.run(["runc", "state", self.name], capture_output=True, text=True, check=True).stdout
        return json.loads(out)  # type: ignore[no-any-return]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, grace: float) -> int:
        """SIGTERM, then after the grace period SIGKILL; the exit code (-9 if it had to be killed)."""
        subprocess.run(["runc", "kill", self.name, "TERM"], capture_output=True, check=False)
        try:
            return self.wait(grace)
        except subprocess.TimeoutExpired:
            subprocess.run(["runc", "kill", self.name, "KILL"], capture_output=True, check=False)
            self.wait(30)
            return -9

    def remove(self) -> None:
        if self.proc.poll() is None:
            self.stop(5)
        subprocess.run(["runc", "delete", "--force", self.name], capture_output=True, check=False)


def run_once(rootfs: Path, tmp: Path, args: list[str], name: str,
             configmap: dict[str, str] | None = None) -> tuple[int, str]:
    """Run one command in the image with the DaemonSet's spec and a ConfigMap's files; its exit code and output."""
    config_dir = tmp / f"{name}-config"
    config_dir.mkdir()
    for file_name, text in (configmap or {}).items():
        (config_dir / file_name).write_text(text)
    spec = runtime_spec(rootfs, args, ["PATH=/opt/kprobe-exporter/bin:/usr/bin:/bin"], config_dir, f"/{name}")
    container = RuncContainer(tmp / name, spec, name)
    try:
        return container.wait(120), container.log()
    finally:
        container.remove()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_image_is_built_as_designed(image: str, inspect: dict[str, Any], rootfs: Path) -> None:
    version = build_image.project_version()
    project = build_image.pyproject()["project"]
    config = inspect["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.revision"] == build_image.git_revision()
    # a non-shell entrypoint, the one the DaemonSet's command names
    assert config["Entrypoint"] == ["kprobe-exporter"] == container_spec()["command"]
    assert inspect.get("Healthcheck"), "no HEALTHCHECK (or built in the OCI format, which drops it)"
    healthcheck = inspect["Healthcheck"]["Test"]
    assert healthcheck[0] == "CMD", "a shell would run it with CMD-SHELL"
    default_url = re.search(r"'http://127\.0\.0\.1:(\d+)/healthz'", " ".join(healthcheck))
    assert default_url and int(default_url.group(1)) == container_spec()["ports"][0]["containerPort"]
    # the DaemonSet and the kustomization name the image this build produces
    assert container_spec()["image"] == image
    kustomization = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "kustomization.yaml").read_text())
    [entry] = kustomization["images"]
    repository, tag = image.rsplit(":", 1)
    assert entry["name"] == repository and entry["newTag"] == tag == version
    # installed from the wheel, with the files it carries; nothing of the build stage left
    venv = rootfs / "opt" / "kprobe-exporter"
    dist_info = list(venv.glob(f"lib/python3*/site-packages/kprobe_exporter-{version}.dist-info"))
    assert len(dist_info) == 1 and (dist_info[0] / "WHEEL").exists()
    assert (venv / "share/kprobe-exporter/systemd/kprobe-exporter.service").read_bytes() == \
        (ROOT / "systemd/kprobe-exporter.service").read_bytes()
    # this checkout's code, not a layer cached from an older one
    [package] = venv.glob("lib/python3*/site-packages/kprobe_exporter")
    for source in (ROOT / "kprobe_exporter").iterdir():
        if source.is_file():
            assert (package / source.name).read_bytes() == source.read_bytes(), source.name
    for gone in ("wheels", "opt/build", "src"):
        assert not (rootfs / gone).exists(), gone
    assert not list(venv.glob("lib/python3*/site-packages/pip")), "pip left in the image"
    compilers = [str(p.relative_to(rootfs)) for p in rootfs.rglob("*")
                 if COMPILER.match(p.name) and not p.is_dir() and os.access(p, os.X_OK)]
    assert compilers == []


@pytest.fixture
def clean_instance() -> Iterator[None]:
    from hard_helpers import force_cleanup

    force_cleanup(INSTANCE)
    yield
    force_cleanup(INSTANCE)


def workload(tmp: Path) -> Path:
    """tests/progs/kpe_opener, static (no loader opening libraries), named so that its comm is WORKLOAD_COMM."""
    exe = tmp / WORKLOAD_COMM
    subprocess.run(["gcc", "-O1", "-static", "-o", str(exe), str(ROOT / "tests/progs/kpe_opener.c")], check=True)
    return exe


def daemonset_config(rootfs: Path, tmp: Path) -> str:
    """The image's embedded default for this kernel, with a comm label on openat and an instance of its own."""
    code, out = run_once(rootfs, tmp, ["kprobe-exporter", "default-config"], f"kpe-image-default-{os.getpid()}")
    assert code == 0, out
    kind = "kprobe" if (TRACEFS / "kprobe_events").exists() else "tracepoint"
    config = yaml.safe_load(out)
    assert {p.get("name"): next(k for k in p if k != "name" and k != "latency") for p in config["probes"]} == \
        dict.fromkeys(("openat", "read", "write"), kind)
    config["instance"] = INSTANCE
    [openat] = [p for p in config["probes"] if p["name"] == "openat"]
    openat["labels"] = ["comm"]
    return yaml.safe_dump(config)


def test_image_runs_as_the_daemonset(rootfs: Path, inspect: dict[str, Any], tmp_path: Path,
                                     clean_instance: None) -> None:
    container = container_spec()
    argv = [*container["command"], *container["args"]]
    config_path = Path(argv[argv.index("--config") + 1])
    port = free_port()
    listen = argv.index("--web.listen-address") + 1
    argv[listen] = re.sub(r":\d+$", f":{port}", argv[listen])
    config_dir = tmp_path / "configmap"
    config_dir.mkdir()
    (config_dir / config_path.name).write_text(daemonset_config(rootfs, tmp_path))
    assert config_path.parent == Path(next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config"))
    name = f"kpe-image-{os.getpid()}"
    spec = runtime_spec(rootfs, argv, pod_env(container, inspect["Config"]["Env"]), config_dir, f"/{name}")
    exe = workload(tmp_path)
    agent = RuncContainer(tmp_path / "bundle", spec, name)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while get_status(url + "/healthz") != 200:
            assert agent.proc.poll() is None, f"the container exited {agent.proc.returncode}:\n{agent.log()}"
            assert time.monotonic() < deadline, f"/healthz never answered 200:\n{agent.log()}"
            time.sleep(0.2)
        pid = agent.state()["pid"]
        check_namespaces_and_privileges(pid, spec)
        # the agent excludes its own threads by host PID: right only in the host's PID namespace
        notrace = (TRACEFS / "instances" / INSTANCE / "set_event_notrace_pid").read_text().split()
        assert str(pid) in notrace, (pid, notrace)
        subprocess.run([str(exe), "/etc/hostname", str(OPENS)], check=True, capture_output=True)
        metrics = wait_for_count(url, OPENS)
        for probe in ("openat", "read", "write"):
            assert value(metrics, "kprobe_exporter_probe_installed", probe=probe) == 1
        counted = value(metrics, "kprobe_events_total", probe="openat", comm=WORKLOAD_COMM)
        lost = value(metrics, "kprobe_exporter_lost_events_total")
        assert counted == OPENS, f"{counted} openat of {WORKLOAD_COMM} counted, {OPENS} made; {lost} events lost"
        check_healthcheck(agent.name, inspect, port)
        grace = daemonset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        code = agent.stop(grace)
        assert code == 0, f"exit {code} after SIGTERM:\n{agent.log()}"
    finally:
        agent.remove()
    assert not (TRACEFS / "instances" / INSTANCE).exists(), "the instance outlived the container"
    assert group_definitions(INSTANCE) == []
    assert not any(f":{INSTANCE}/" in line for line in (TRACEFS / "dynamic_events").read_text().splitlines())


def get_status(url: str) -> int | None:
    try:
        return get(url)[0]
    except OSError:
        return None


def wait_for_count(url: str, want: int) -> str:
    """Scrape until the workload's openat count stops short of nothing (the reader lags the kernel a little)."""
    deadline = time.monotonic() + 30
    while True:
        status, text = get(url + "/metrics")
        assert status == 200
        got = value(text, "kprobe_events_total", probe="openat", comm=WORKLOAD_COMM)
        if (got is not None and got >= want) or time.monotonic() > deadline:
            time.sleep(1)  # one more read: a count above want must show too
            return get(url + "/metrics")[1]
        time.sleep(0.2)


def check_namespaces_and_privileges(pid: int, spec: dict[str, Any]) -> None:
    """The agent's process as the spec asked: host PID and network namespaces, its own mount namespace,
    exactly the granted capabilities, the memory limit."""
    proc = Path(f"/proc/{pid}")
    for ns in ("pid", "net"):
        assert os.readlink(proc / "ns" / ns) == os.readlink(f"/proc/self/ns/{ns}"), ns
    assert os.readlink(proc / "ns" / "mnt") != os.readlink("/proc/self/ns/mnt")
    status = (proc / "status").read_text()
    caps = {c.removeprefix("CAP_") for c in spec["process"]["capabilities"]["effective"]}
    for field in ("CapEff", "CapBnd"):
        got = int(re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
        assert got == cap_mask(caps), (field, hex(got), hex(cap_mask(caps)))
    assert (proc / "comm").read_text().strip() == "kprobe-exporter"
    memory = next(line.split(":", 2)[2] for line in (proc / "cgroup").read_text().splitlines()
                  if line.split(":")[1] == "memory")
    limit = int(Path(f"/sys/fs/cgroup/memory{memory}/memory.limit_in_bytes").read_text())
    assert limit == spec["linux"]["resources"]["memory"]["limit"]


def check_healthcheck(name: str, inspect: dict[str, Any], port: int) -> None:
    """The image's HEALTHCHECK, run in the container: passes against the agent, fails against a closed port."""
    test = inspect["Healthcheck"]["Test"]
    assert test[0] == "CMD"
    for target, ok in ((port, True), (free_port(), False)):
        env = f"KPROBE_EXPORTER_HEALTHZ=http://127.0.0.1:{target}/healthz"
        done = subprocess.run(["runc", "exec", "--env", env, name, *test[1:]], capture_output=True, text=True,
                              timeout=60, check=False)
        assert (done.returncode == 0) == ok, (target, done.returncode, done.stderr[-2000:])


def test_shipped_configmap_on_this_kernel(rootfs: Path, tmp_path: Path) -> None:
    """The DaemonSet as shipped, its ConfigMap's kprobes included: on a node without kprobe_events the
    container exits 2 with the one line that says so (a crash loop an operator can read), no traceback."""
    if (TRACEFS / "kprobe_events").exists():
        pytest.skip("this kernel has kprobes: the ConfigMap's config would run (the kernel lab covers kprobes)")
    container = container_spec()
    argv = [*container["command"], *container["args"]]
    listen = argv.index("--web.listen-address") + 1
    argv[listen] = re.sub(r":\d+$", f":{free_port()}", argv[listen])
    configmap = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    assert Path(argv[argv.index("--config") + 1]).name in configmap["data"]
    code, out = run_once(rootfs, tmp_path, argv, f"kpe-image-cm-{os.getpid()}", configmap["data"])
    assert code == 2, out
    [line] = out.strip().splitlines()
    assert "this kernel has no kprobe_events" in line and "Traceback" not in out
