"""raw.formats: page layouts, header encodings and event format files, as the kernel writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kprobe_exporter.raw import formats as raw_formats
from raw_fixtures import K61, K618

# --- formats ----------------------------------------------------------------------------------------


def test_header_page_layouts() -> None:
    usual = raw_formats.PageLayout()
    assert raw_formats.parse_header_page((K618 / "uprobes-syscalls" / "header_page").read_text()) == usual
    assert raw_formats.parse_header_page((K61 / "missed-events" / "header_page").read_text()) == usual
    big = raw_formats.parse_header_page((K618 / "subbuf8k-long-records" / "header_page").read_text())
    assert (big.data_off, big.data_size, big.page_size) == (16, 8176, 8192)
    with pytest.raises(raw_formats.FormatError):
        raw_formats.parse_header_page("\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n")


def test_header_event_must_be_the_known_encoding() -> None:
    raw_formats.check_header_event((K61 / "missed-events" / "header_event").read_text())
    text = (K618 / "missed-events" / "header_event").read_text()
    with pytest.raises(raw_formats.FormatError, match="type_len"):
        raw_formats.check_header_event(text.replace("5 bits", "6 bits"))


def test_format_fields_data_loc_and_arrays() -> None:
    text = (K618 / "uprobes-syscalls" / "events" / "kpe_rawcap" / "open_path" / "format").read_text()
    fmt = raw_formats.parse_format(text)
    path, arr, c = fmt.field("path"), fmt.field("arr"), fmt.field("c")
    assert path is not None and path.data_loc and path.size == 4
    assert arr is not None and (arr.count, arr.elem_size, arr.offset) == (4, 1, 24)
    assert c is not None and (c.size, c.signed) == (1, False)
    assert [f.name for f in fmt.own_fields] == ["__probe_ip", "path", "flags", "arr", "c"]
    with pytest.raises(raw_formats.FormatError):
        raw_formats.parse_format("name: x\nID: 5\nformat:\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n")


def test_load_layout_follows_the_instances_subbuffers(tmp_path: Path) -> None:
    inst, root = tmp_path / "inst", tmp_path / "root"
    for d, fx in ((inst, "subbuf8k-long-records"), (root, "uprobes-syscalls")):
        (d / "events").mkdir(parents=True)
        for f in ("header_page", "header_event"):
            (d / "events" / f).write_text((K618 / fx / f).read_text())
    assert raw_formats.load_layout(inst, root).page_size == 8192
    (inst / "events" / "header_page").unlink()
    (inst / "buffer_subbuf_size_kb").write_text("8\n")
    with pytest.raises(raw_formats.FormatError, match="8 KiB"):
        raw_formats.load_layout(inst, root)  # the root's 4 KiB pages would misread 8 KiB sub-buffers
    (inst / "buffer_subbuf_size_kb").write_text("4\n")
    assert raw_formats.load_layout(inst, root).page_size == 4096


def test_field_names_for_the_label_checks() -> None:
    text = (K618 / "uprobes-syscalls" / "events" / "syscalls" / "sys_enter_openat" / "format").read_text()
    names = raw_formats.field_names(text)
    assert names[:4] == ["common_type", "common_flags", "common_preempt_count", "common_pid"]
    assert {"dfd", "filename", "flags", "mode"} <= set(names)
    assert names == [f.name for f in raw_formats.parse_format(text).fields]
