"""Raw formats: the ring buffer's page layout (`events/header_page`, `header_event`) and event
`format` files (fields, offsets, print fmt), parsed once for the raw reader and tracefs' label checks."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


class RawUnsupported(Exception):
    """The raw reader cannot serve this instance or probe set; the message says why (the text reader can)."""


class FormatError(RawUnsupported):
    """A header or event format file this decoder does not understand."""


_FIELD_RE = re.compile(
    r"^\s*field:\s*(?P<decl>[^;]*?)\s*;\s*offset:\s*(?P<off>\d+)\s*;\s*size:\s*(?P<size>\d+)\s*;"
    r"(?:\s*signed:\s*(?P<signed>-?\d+)\s*;)?",
    re.MULTILINE,
)


@dataclass(frozen=True)
class PageLayout:
    """Where a ring-buffer page keeps its timestamp, commit and data (from `events/header_page`)."""

    ts_off: int = 0
    commit_off: int = 8
    commit_size: int = 8
    data_off: int = 16
    data_size: int = 4080

    @property
    def page_size(self) -> int:
        return self.data_off + self.data_size


def parse_header_page(text: str) -> PageLayout:
    fields = {m.group("decl").split()[-1]: (int(m.group("off")), int(m.group("size")))
              for m in _FIELD_RE.finditer(text)}
    try:
        ts_off, ts_size = fields["timestamp"]
        commit_off, commit_size = fields["commit"]
        data_off, data_size = fields["data"]
    except KeyError as e:
        raise FormatError(f"header_page has no field {e.args[0]!r}") from None
    if ts_size != 8 or commit_size not in (4, 8) or ts_off % 4 or commit_off % 4 or data_off % 8:
        raise FormatError(f"header_page layout not understood: timestamp {ts_off}/{ts_size}, "
                          f"commit {commit_off}/{commit_size}, data {data_off}/{data_size}")
    if (data_off + data_size) % 4096 or data_size <= 0:
        raise FormatError(f"header_page: a page of {data_off + data_size} bytes is not whole 4 KiB pages")
    return PageLayout(ts_off, commit_off, commit_size, data_off, data_size)


def check_header_event(text: str) -> None:
    """The compressed event header this decoder implements; anything else is a FormatError."""
    want = {
        "type_len": r"type_len\s*:\s*5 bits",
        "time_delta": r"time_delta\s*:\s*27 bits",
        "padding": r"padding\s*:\s*type == 29",
        "time_extend": r"time_extend\s*:\s*type == 30",
        "data max": r"data max type_len\s*==\s*28",
    }
    missing = [name for name, pat in want.items() if not re.search(pat, text)]
    # "time_stamp : type == 31" appeared with absolute timestamps (4.x); older kernels lack it
    if missing:
        raise FormatError(f"header_event not understood ({', '.join(missing)})")


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str  # the declared type without the name: "int", "unsigned long", "__data_loc char[]", "u8[]"
    offset: int
    size: int
    signed: bool
    data_loc: bool = False  # u32: offset of the data in the record (low 16 bits), length (high 16)
    count: int = 1  # array elements (size / element size)

    @property
    def elem_size(self) -> int:
        return self.size // self.count if self.count else self.size


@dataclass(frozen=True)
class EventFormat:
    name: str
    id: int
    fields: tuple[Field, ...]
    print_fmt: str

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    @property
    def own_fields(self) -> tuple[Field, ...]:
        """The fields after the common ones."""
        return tuple(f for f in self.fields if not f.name.startswith("common_"))


_ELEM_SIZES = {"char": 1, "u8": 1, "s8": 1, "u16": 2, "s16": 2, "short": 2, "u32": 4, "s32": 4, "int": 4,
               "u64": 8, "s64": 8, "long": 8}


_DECL_RE = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>\w+)\s*(?P<arr>\[\s*\d*\s*\])?$")


def field_names(text: str) -> list[str]:
    """The field names of a `format` file, common ones included, whatever their types."""
    names = []
    for m in _FIELD_RE.finditer(text):
        am = _DECL_RE.match(m.group("decl").strip())
        if am:
            names.append(am.group("name"))
    return names


def parse_format(text: str) -> EventFormat:
    """An `events/GROUP/NAME/format` file."""
    m_name = re.search(r"^name:\s*(\S+)", text, re.MULTILINE)
    m_id = re.search(r"^ID:\s*(\d+)", text, re.MULTILINE)
    if not m_name or not m_id:
        raise FormatError("format file without name or ID")
    fields = []
    for m in _FIELD_RE.finditer(text):
        decl = m.group("decl").strip()
        off, size = int(m.group("off")), int(m.group("size"))
        signed = m.group("signed") == "1"
        data_loc = decl.startswith("__data_loc ") or decl.startswith("__rel_loc ")
        if decl.startswith("__rel_loc "):
            raise FormatError(f"field {decl!r}: __rel_loc is not supported")
        am = _DECL_RE.match(decl)
        if not am:
            raise FormatError(f"field declaration {decl!r} not understood")
        name, ctype, arr = am.group("name"), am.group("type").strip(), am.group("arr")
        count = 1
        if arr is not None and not data_loc:
            n = arr.strip("[] ")
            base = ctype.split()[-1] if ctype else "char"
            elem = int(n) and size // int(n) if n else _ELEM_SIZES.get(base, 0)
            if not elem or size % elem:
                raise FormatError(f"array field {decl!r} of {size} bytes not understood")
            count = size // elem
            ctype += "[]"
        elif data_loc:
            if size != 4:
                raise FormatError(f"__data_loc field {name!r} of {size} bytes")
            ctype = ctype.removeprefix("__data_loc ").strip() + ("[]" if arr is not None else "")
        fields.append(Field(name, ctype, off, size, signed, data_loc, count))
    pm = re.search(r"^print fmt:\s*(.*)$", text, re.MULTILINE)
    fmt = EventFormat(m_name.group(1), int(m_id.group(1)), tuple(fields), pm.group(1) if pm else "")
    for need, size in (("common_type", 2), ("common_pid", 4)):
        f = fmt.field(need)
        if f is None or f.size != size:
            raise FormatError(f"{fmt.name}: no {need} of {size} bytes")
    if fmt.field("common_type").offset != 0 or fmt.field("common_pid").offset != 4:  # type: ignore[union-attr]
        raise FormatError(f"{fmt.name}: common fields not at their usual offsets")
    return fmt


def load_layout(inst: Path, tracefs_root: Path | None = None) -> PageLayout:
    """The page layout of an instance, from its own events/header_page (which follows the instance's
    buffer_subbuf_size_kb), else the root's; its header_event must be the encoding decoded here.

    Without either (kernels before they existed), a page is the machine's page: 4 KiB or unsupported.
    """
    candidates = [inst / "events"]
    if tracefs_root is not None:
        candidates.append(tracefs_root / "events")
    for events in candidates:
        try:
            text = (events / "header_page").read_text()
        except OSError:
            continue
        layout = parse_header_page(text)
        try:
            check_header_event((events / "header_event").read_text())
        except OSError:
            pass  # header_page without header_event: never seen; the page format is the judge
        if events != candidates[0] and (inst / "buffer_subbuf_size_kb").exists():
            kb = int((inst / "buffer_subbuf_size_kb").read_text().strip() or 0)
            if kb * 1024 != layout.page_size:
                raise FormatError(f"sub-buffers of {kb} KiB but header_page says {layout.page_size} bytes")
        return layout
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        raise RawUnsupported("no events/header_page and pages are not 4 KiB")
    return PageLayout()
