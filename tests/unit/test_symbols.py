"""Symbols: ELF function symbols to uprobe file offsets, checked against the bytes and against nm/readelf."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from kprobe_exporter import symbols


def nm_offset(binary: Path, symbol: str) -> int:
    """The file offset of a symbol by binutils (nm for the address, readelf for the segments)."""
    nm = subprocess.run(["nm", "-D", "--defined-only", str(binary)] if binary.suffix == ".so" else
                        ["nm", "--defined-only", str(binary)], capture_output=True, text=True, check=True).stdout
    vaddr = next(int(ln.split()[0], 16) for ln in nm.splitlines() if ln.split()[-1] == symbol)
    segments = subprocess.run(["readelf", "-lW", str(binary)], capture_output=True, text=True, check=True).stdout
    for ln in segments.splitlines():
        cols = ln.split()
        if cols[:1] == ["LOAD"]:
            offset, start, size = int(cols[1], 16), int(cols[2], 16), int(cols[4], 16)
            if start <= vaddr < start + size:
                return vaddr - start + offset
    raise AssertionError(f"{symbol} in no LOAD segment")


@pytest.mark.parametrize("build", ["pie", "nopie", "lib"])
def test_offsets_agree_with_binutils(progs: dict[str, Path], build: str) -> None:
    for symbol in ("compute", "recurse"):
        assert symbols.resolve(str(progs[build]), symbol) == nm_offset(progs[build], symbol)


def test_non_pie_offset_differs_from_its_address(progs: dict[str, Path]) -> None:
    """A non-PIE executable is linked at 0x400000: the offset is not the address (a uprobe needs the offset)."""
    with open(progs["nopie"], "rb") as f:
        elf = ELFFile(f)
        sym = elf.get_section_by_name(".symtab").get_symbol_by_name("compute")[0]  # type: ignore[union-attr]
        vaddr = sym["st_value"]
        assert symbols.vaddr_to_offset(elf, vaddr) == symbols.resolve(str(progs["nopie"]), "compute") != vaddr


def test_mistakes_say_why_and_what_is_near(progs: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        (str(progs["pie"]), "compuet", f"no function 'compuet' in {progs['pie']}; did you mean compute?"),
        (str(progs["stripped"]), "compute", f"{progs['stripped']} is stripped (no .symtab and no function in .dynsym)"),
        ("/no/such/bin", "main", "no such file /no/such/bin"),
        (str(tmp_path), "main", f"{tmp_path} is a directory, not an ELF file"),
        ("/etc/hostname", "main", "/etc/hostname is not an ELF file"),
    ]
    for path, symbol, message in cases:
        with pytest.raises(symbols.SymbolError) as e:
            symbols.resolve(path, symbol)
        assert str(e.value) == message


def test_an_address_outside_every_segment_is_refused(progs: dict[str, Path]) -> None:
    with open(progs["pie"], "rb") as f, pytest.raises(symbols.SymbolError, match="in no loadable segment"):
        symbols.vaddr_to_offset(ELFFile(f), 1 << 60)


def test_path_in_root_resolves_symlinks_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "opt" / "app").mkdir(parents=True)
    (root / "opt" / "app" / "prog").write_bytes(b"x")
    (root / "bin").mkdir()
    (root / "bin" / "abs").symlink_to("/opt/app/prog")  # absolute: the container's /opt, not the host's
    (root / "bin" / "rel").symlink_to("../opt/app/prog")
    (root / "usr").symlink_to("/")  # a link to / stays in the root
    (root / "loop").symlink_to("loop")
    r = str(root)
    want = f"{r}/opt/app/prog"
    assert symbols.path_in_root(r, "/bin/abs") == want
    assert symbols.path_in_root(r, "/bin/rel") == want
    assert symbols.path_in_root(r, "/usr/usr/bin/abs") == want
    assert symbols.path_in_root(r, "/../../bin/./abs") == want  # no way out through ..
    with pytest.raises(symbols.SymbolError, match="too many levels"):
        symbols.path_in_root(r, "/loop")


def test_unpinned_drops_the_pid_only() -> None:
    a = "p:g/e /proc/123/root/bin/app:0x10 x=%di"
    assert symbols.unpinned(a) == symbols.unpinned(a.replace("123", "4567")) == "p:g/e /proc/*/root/bin/app:0x10 x=%di"
    assert symbols.unpinned("/proc/123/rootx/a") == "/proc/123/rootx/a"


class ContainerProc:
    """A /proc stand-in for container lookups: PID/cgroup, PID/stat (start time), PID/root (a directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stat = Path("/proc/self/stat").read_text()

    def put(self, pid: int, start: int, cgroup: str, rootfs: Path) -> None:
        d = self.root / str(pid)
        d.mkdir()
        fields = self.stat.rpartition(")")[2].split()
        fields[19] = str(start)
        (d / "stat").write_text(f"{pid} (app) {' '.join(fields)}\n")
        (d / "cgroup").write_text(f"0::{cgroup}\n")
        (d / "root").symlink_to(rootfs)

    def kill(self, pid: int) -> None:
        d = self.root / str(pid)
        for f in ("stat", "cgroup", "root"):
            (d / f).unlink()
        d.rmdir()


def test_container_targets_follow_restarts(tmp_path: Path) -> None:
    """A restart onto the same file needs nothing; onto another file (new inode) the probe is redone;
    while the container is down the installed probe stays and it is looked for again."""
    proc = ContainerProc(tmp_path / "proc")
    proc.root.mkdir()
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "app").write_bytes(b"v1")
    scope = "/system.slice/docker-" + "ab" * 32 + ".scope"
    proc.put(10, 500, "/user.slice", tmp_path)  # another cgroup: never picked
    proc.put(20, 1000, scope, rootfs)
    sel = symbols.ContainerSelector(cgroup="docker-abab")
    pid, host = symbols.in_container(sel, "/bin/app", str(proc.root))
    assert (pid, host) == (20, f"{proc.root}/20/root/bin/app")
    watch = symbols.ContainerTargets(proc=str(proc.root))
    watch.add("compute", sel, "/bin/app", host)
    assert not watch.moved()
    proc.kill(20)
    assert not watch.moved()  # down: nothing to redo, the installed probe stays
    assert watch.targets[0].start is None
    proc.put(21, 2000, scope, rootfs)  # back, same file
    assert not watch.moved() and watch.targets[0].pid == 21
    proc.kill(21)
    (rootfs / "bin" / ".app").write_bytes(b"v2")
    (rootfs / "bin" / ".app").rename(rootfs / "bin" / "app")  # an updated image: another inode
    proc.put(21, 3000, scope, rootfs)  # the same PID, reused: told by its start time
    assert watch.moved()
    assert watch.targets[0].pid == 21 and "restarted (PID 21)" in watch.notes[0]
    assert not watch.moved()
