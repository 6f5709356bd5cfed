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
