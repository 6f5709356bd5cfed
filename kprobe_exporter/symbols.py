"""ELF symbols to uprobe file offsets (pyelftools), for PIE, non-PIE executables and shared libraries."""

from __future__ import annotations

import difflib
import os
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
