"""Uprobes in containers: a probe names a binary as seen inside a container, the agent finds it through
/proc/PID/root, and defines it again when the container restarts onto another file.

Two real containers, no registry needed: the image is a directory holding one statically linked
program (gcc -static), at /opt/app/prog, reached through an absolute symlink /bin/app (inside the
container it points into the container; resolved on the host it would not exist).

- `cgroup:` selector (the generic route, any runtime): the "container" is a real mount namespace and
  chroot (`unshare -m chroot ROOT /bin/app`) in a real cgroup v2 scope named as containerd names it.
- `container:` name: a real podman container (`podman run --rootfs ROOT`). This machine's hard rlimits
  are below podman's defaults, so the test passes `--ulimit` values within them.

Each container's program calls compute() N times per line it reads and answers "done N"; the counts
must be exact. Then the container restarts with its program replaced (a new inode, as an image update
gives): the probe must be defined again through the new PID, and the counter continue from where it was.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_proc import group_definitions, running_agent
from live.test_cgroups import Cgroups, _ids, cg, v2  # noqa: F401 (fixtures)

pytestmark = pytest.mark.root

PROG_C = r"""#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) long compute(int a) { volatile long x = a; return x * 3; }
int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        long n = atol(line), acc = 0;
        for (long i = 0; i < n; i++) acc += compute((int)i);
        printf("done %ld %ld\n", n, acc);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cprog")
    (d / "prog.c").write_text(PROG_C)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(d / "prog"), str(d / "prog.c")], check=True)
    return d / "prog"


def make_root(base: Path, prog: Path) -> Path:
    root = base / "rootfs"
    (root / "opt" / "app").mkdir(parents=True)
    (root / "bin").mkdir()
    shutil.copy(prog, root / "opt" / "app" / "prog")
    (root / "bin" / "app").symlink_to("/opt/app/prog")  # absolute: means the container's /opt
    return root


def replace_binary(root: Path, prog: Path) -> None:
    """A new file under the same path (a new inode): what an image update gives a restarted container."""
    tmp = root / "opt" / "app" / ".prog.new"
    shutil.copy(prog, tmp)
    tmp.rename(root / "opt" / "app" / "prog")


class Workload:
    """The program running in a container, driven line by line."""

    def __init__(self, argv: list[str]) -> None:
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        first = self.p.stdout.readline()
        assert first == "ready\n", first

    def calls(self, n: int) -> None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(f"{n}\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().startswith(f"done {n} ")

    def stop(self) -> None:
        if self.p.poll() is None:
            assert self.p.stdin is not None
            self.p.stdin.close()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def pids_in_definitions(group: str) -> set[int]:
    return {int(m) for line in group_definitions(group) for m in re.findall(r"/proc/(\d+)/root/", line)}


def wait_redefined(group: str, pid: int, timeout: float = 30) -> set[int]:
    """The probe's definition names the new container's PID (housekeeping runs every second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pids_in_definitions(group)
        if got == {pid}:
            return got
        time.sleep(0.2)
    return pids_in_definitions(group)


def in_chroot(scope: Path, root: Path) -> Workload:
    return Workload(["sh", "-c", f'echo $$ > {scope / "cgroup.procs"} && exec unshare -m chroot {root} /bin/app'])


def test_cgroup_selector_chroot_container_counts_and_restart(tmp_path: Path, prog: Path, write_config,
                                                             cg: Cgroups, v2: Path) -> None:  # noqa: F811
    _, uid_, cid = _ids()
    scope = cg.make(v2, f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/"
                        f"cri-containerd-{cid}.scope")
    root = make_root(tmp_path, prog)
    assert not Path("/opt/app/prog").exists()  # on the host, the symlink's target is not there
    first = in_chroot(scope, root)
    cfg = write_config(f"""
instance: kpe_t_incont
probes:
  - name: compute
    uprobe: /bin/app:compute
    cgroup: 'cri-containerd-{cid}\\.scope$'
""")
    try:
        with running_agent(cfg) as agent:
            assert pids_in_definitions("kpe_t_incont") == {first.p.pid}
            first.calls(37)
            assert agent.wait_value("kprobe_events_total", 37, probe="compute") == 37
            first.stop()
            replace_binary(root, prog)
            second = in_chroot(scope, root)
            try:
                assert wait_redefined("kpe_t_incont", second.p.pid) == {second.p.pid}
                second.calls(29)
                assert agent.wait_value("kprobe_events_total", 66, probe="compute") == 37 + 29
            finally:
                second.stop()
            # restarted on the same file: the probe installed on it still fires, nothing is redefined
            third = in_chroot(scope, root)
            try:
                third.calls(11)
                assert agent.wait_value("kprobe_events_total", 77, probe="compute") == 37 + 29 + 11
                assert pids_in_definitions("kpe_t_incont") == {second.p.pid}
            finally:
                third.stop()
    finally:
        first.stop()


PODMAN_RUN = ["podman", "run", "--rm", "-i", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
              "--network", "none"]


@pytest.fixture
def podman_name() -> Iterator[str]:
    if shutil.which("podman") is None:
        pytest.fail("podman is needed (tests/setup.sh installs it)")
    name = f"kpe-t-{_ids()[2][:12]}"
    yield name
    subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)


def podman_pid(name: str) -> int:
    out = subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", name], capture_output=True,
                         text=True, check=True)
    return int(out.stdout)


def test_container_name_podman_counts_and_restart(tmp_path: Path, prog: Path, write_config,
                                                  podman_name: str) -> None:
    root = make_root(tmp_path, prog)
    run = [*PODMAN_RUN, "--name", podman_name, "--rootfs", str(root), "/bin/app"]
    first = Workload(run)
    cfg = write_config(f"""
instance: kpe_t_podman
probes:
  - name: compute
    uprobe: /bin/app:compute
    container: {podman_name}
""")
    try:
        with running_agent(cfg) as agent:
            pid = podman_pid(podman_name)
            assert pids_in_definitions("kpe_t_podman") == {pid}
            first.calls(41)
            assert agent.wait_value("kprobe_events_total", 41, probe="compute") == 41
            first.stop()  # stdin closed: the program exits, podman removes the container (--rm)
            replace_binary(root, prog)
            second = Workload(run)
            try:
                new_pid = podman_pid(podman_name)
                assert new_pid != pid
                assert wait_redefined("kpe_t_podman", new_pid) == {new_pid}
                second.calls(23)
                assert agent.wait_value("kprobe_events_total", 64, probe="compute") == 41 + 23
            finally:
                second.stop()
    finally:
        first.stop()
