"""ELF symbols to uprobe file offsets (pyelftools), for PIE, non-PIE executables and shared libraries;
binaries seen inside a container, found on the host through /proc/PID/root."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection


class SymbolError(Exception):
    """A uprobe target that cannot be resolved; the message says why and what is near."""


_FUNC_TYPES = ("STT_FUNC", "STT_GNU_IFUNC")
# Reading a symbol table with pyelftools costs ~10 µs a symbol: a config with several uprobes in one
# binary (or libc) reads it once. Keyed by the file's identity, so a rebuilt binary is read again.
_CACHE: dict[tuple[str, int, int, int, int], tuple[dict[str, int], bool]] = {}
_CACHE_MAX = 32


def _functions(elf: ELFFile) -> tuple[dict[str, int], bool]:
    """Defined function symbols by name (versions stripped), and whether a .symtab exists."""
    found: dict[str, int] = {}
    has_symtab = False
    for section_name in (".symtab", ".dynsym"):
        section = elf.get_section_by_name(section_name)
        if not isinstance(section, SymbolTableSection):
            continue
        has_symtab = has_symtab or section_name == ".symtab"
        for sym in section.iter_symbols():
            if sym["st_info"]["type"] not in _FUNC_TYPES or sym["st_shndx"] == "SHN_UNDEF":
                continue
            if not sym["st_value"]:
                continue
            name = sym.name.split("@", 1)[0]
            found.setdefault(name, sym["st_value"])
    return found, has_symtab


def vaddr_to_offset(elf: ELFFile, vaddr: int) -> int:
    """File offset of a virtual address, through the PT_LOAD segment that maps it."""
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD":
            continue
        start = seg["p_vaddr"]
        if start <= vaddr < start + seg["p_filesz"]:
            return int(vaddr - start + seg["p_offset"])
    raise SymbolError(f"address {vaddr:#x} is in no loadable segment")


def resolve(path: str, symbol: str) -> int:
    """The file offset where `symbol` starts in the ELF file at `path`."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            st = os.fstat(f.fileno())
            key = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            elf = ELFFile(f)
            cached = _CACHE.get(key)
            if cached is None:
                if len(_CACHE) >= _CACHE_MAX:
                    _CACHE.clear()
                cached = _CACHE[key] = _functions(elf)
            functions, has_symtab = cached
            if symbol not in functions:
                if not functions and not has_symtab:
                    raise SymbolError(f"{path} is stripped (no .symtab and no function in .dynsym)")
                near = difflib.get_close_matches(symbol, list(functions), n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                stripped = "" if has_symtab else " (the binary is stripped: only .dynsym was searched)"
                raise SymbolError(f"no function {symbol!r} in {path}{stripped}{hint}")
            return vaddr_to_offset(elf, functions[symbol])
    except FileNotFoundError:
        raise SymbolError(f"no such file {path}") from None
    except IsADirectoryError:
        raise SymbolError(f"{path} is a directory, not an ELF file") from None
    except PermissionError:
        raise SymbolError(f"cannot read {path} (permission denied)") from None
    except ELFError:
        raise SymbolError(f"{path} is not an ELF file") from None


# --- binaries inside containers (issue #16) -------------------------------------------------------

@dataclass(frozen=True)
class ContainerSelector:
    """Which container a uprobe's path is seen in: a runtime's container name (podman, docker) or a
    cgroup path regexp (re.search over the path the cgroup labels use): any runtime, Kubernetes too."""

    container: str | None = None
    cgroup: str | None = None

    def __str__(self) -> str:
        return f"container {self.container!r}" if self.container else f"cgroup matching {self.cgroup!r}"


def pid_of_container(name: str) -> int:
    """The host PID of a running container's init, from the first runtime CLI present (podman, docker)."""
    tried = []
    for cli in ("podman", "docker"):
        exe = shutil.which(cli)
        if exe is None:
            continue
        try:
            out = subprocess.run([exe, "inspect", "--format", "{{.State.Pid}}", name], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f"{cli}: {e}")
            continue
        if out.returncode == 0 and out.stdout.strip().isdigit():
            pid = int(out.stdout.strip())
            if pid > 0:
                return pid
            raise SymbolError(f"container {name!r} is not running ({cli} inspect: pid 0)")
        tried.append(f"{cli}: {(out.stderr.strip().splitlines() or ['no such container'])[-1]}")
    if not tried:
        raise SymbolError(f"container {name!r}: neither podman nor docker is here; select it with 'cgroup:'")
    raise SymbolError(f"no running container {name!r} ({'; '.join(tried)})")


def pids_in_cgroup(pattern: str, proc: str = "/proc") -> list[int]:
    """PIDs (processes, not threads) whose cgroup path matches `pattern`, the longest-running first."""
    from kprobe_exporter.cgroups import pick_path  # cgroups imports numpy: only for this route

    rx = re.compile(pattern)
    found: list[tuple[int, int]] = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            cg = Path(f"{proc}/{name}/cgroup").read_text("utf-8", "backslashreplace")
            if not rx.search(pick_path(cg)):
                continue
            start = int(Path(f"{proc}/{name}/stat").read_text().rpartition(")")[2].split()[19])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        found.append((start, int(name)))
    return [pid for _, pid in sorted(found)]


def path_in_root(root: str, path: str, max_links: int = 40) -> str:
    """`path` as a process with root `root` sees it, as a host path under `root` with no symlink left:
    an absolute symlink inside a container points into the container, not to the host (the kernel,
    given /proc/PID/root/..., would resolve it against the agent's root)."""
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, part)
        if os.path.islink(here):
            links += 1
            if links > max_links:
                raise SymbolError(f"{path}: too many levels of symbolic links in the container")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        done.append(part)
    return os.path.join(root, *done)


def in_container(sel: ContainerSelector, path: str, proc: str = "/proc") -> tuple[int, str]:
    """(PID, host path) of the file `path` names inside the selected container: the first PID in it
    (the longest-running) whose root holds the file, and /proc/PID/root/... with symlinks resolved."""
    pids = [pid_of_container(sel.container)] if sel.container else pids_in_cgroup(sel.cgroup or "", proc)
    if not pids:
        raise SymbolError(f"no process in a cgroup matching {sel.cgroup!r}")
    for pid in pids:
        try:
            host = path_in_root(f"{proc}/{pid}/root", path)
        except OSError:
            continue
        if os.path.isfile(host):
            return pid, host
    raise SymbolError(f"no file {path} inside {sel} (looked in the root of PID {', '.join(map(str, pids[:3]))})")


def unpinned(text: str) -> str:
    """A uprobe target or definition without the PID it was resolved through (equal across restarts)."""
    return re.sub(r"/proc/\d+/root(?=/)", "/proc/*/root", text)


def start_time(pid: int, proc: str = "/proc") -> bytes | None:
    try:
        return Path(f"{proc}/{pid}/stat").read_bytes().rpartition(b")")[2].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class ContainerTarget:
    """One uprobe event whose binary lives in a container, as installed: through which PID, on which file."""

    event: str
    selector: ContainerSelector
    path: str  # as seen inside the container
    pid: int
    start: bytes | None  # the PID's start time: a reused PID is another process
    identity: tuple[int, int] | None  # (st_dev, st_ino) of the file the probe was defined on


@dataclass
class ContainerTargets:
    """The container-bound uprobes of a probe set, checked at housekeeping: when a container restarts
    (its PID gone or reused) the file is found again through the new PID; `moved` says whether any now
    is another file (another inode: a probe defined on the old one no longer fires), so the agent
    defines those probes again (a reload: counts carry). Same inode: the installed probe still fires."""

    targets: list[ContainerTarget] = field(default_factory=list)
    proc: str = "/proc"
    notes: list[str] = field(default_factory=list)  # what changed, for the agent's log

    def add(self, event: str, selector: ContainerSelector, path: str, host: str) -> None:
        m = re.match(rf"{re.escape(self.proc)}/(\d+)/root(?=/)", host)
        if m is None:
            return
        pid = int(m.group(1))
        self.targets.append(ContainerTarget(event, selector, path, pid, start_time(pid, self.proc), _identity(host)))

    def moved(self) -> bool:
        """Whether a container-bound probe must be defined again (the agent reloads, counts kept)."""
        redo = False
        for t in self.targets:
            if t.start is not None and start_time(t.pid, self.proc) == t.start:
                continue
            try:
                pid, host = in_container(t.selector, t.path, self.proc)
            except SymbolError:
                t.start = None  # not running (yet): the installed probe stays; looked for again next time
                continue
            ident = _identity(host)
            if ident != t.identity:
                redo = True
                self.notes.append(f"{t.event}: {t.selector} restarted (PID {pid}), {t.path} is another file")
            t.pid, t.start, t.identity = pid, start_time(pid, self.proc), ident
        return redo


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
