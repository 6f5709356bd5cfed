"""Errors: one type, one line: `FILE: probe 'a', field 'x': MESSAGE`, each part only when there is one."""

from __future__ import annotations

import pytest

from kprobe_exporter.errors import TracefsError, UserError, format_error


@pytest.mark.parametrize(("file", "who", "field", "line"), [
    ("c.yaml", "probe 'a'", "args.x", "c.yaml: probe 'a', field 'args.x': bad"),
    ("c.yaml", "pair 'p'", "", "c.yaml: pair 'p': bad"),
    ("c.yaml", "", "instance", "c.yaml: field 'instance': bad"),
    ("c.yaml", "", "", "c.yaml: bad"),
    ("", "probe 'a'", "kind", "probe 'a', field 'kind': bad"),
    ("", "", "", "bad"),
])
def test_format_error_names_only_what_there_is(file: str, who: str, field: str, line: str) -> None:
    assert format_error(file, who, field, "bad") == line


def test_an_error_is_put_on_a_file_only_when_it_has_none() -> None:
    e = TracefsError("the kernel rejected it", "open", "args.x")
    assert isinstance(e, UserError) and e.who == "probe 'open'" and e.message == "the kernel rejected it"
    assert e.line() == "probe 'open', field 'args.x': the kernel rejected it"
    assert e.in_file("c.yaml").in_file("other.yaml").line() == \
        "c.yaml: probe 'open', field 'args.x': the kernel rejected it"
    assert str(UserError("m", who="probe #2", file="f")) == "f: probe #2: m"
