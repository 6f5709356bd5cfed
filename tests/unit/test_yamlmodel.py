"""YAML model files: the one loader of the config and the web config, on small models of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from kprobe_exporter.errors import UserError
from kprobe_exporter.yamlmodel import FileKind, load_file, load_text


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wait_ns: int = Field(default=0, alias="wait")
    depth: int = 1


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    inner: Inner | None = None


class Top(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[Item] = Field(default_factory=list)
    inner: Inner = Field(default_factory=Inner)


KIND = FileKind("test file", top_level="the top must be a mapping, not {type}", empty="the file is empty",
                mapping_hint="name, inner", sections={"items": "item"},
                item_name=lambda item: item.get("name") if isinstance(item, dict) else None)
LOOSE = FileKind("loose", top_level="a mapping please", unique_keys=False, max_bytes=64)


@pytest.mark.parametrize(("text", "line"), [
    ("items:\n  - {name: a, inner: {wiat: 1}}\n",
     "t.yaml: item 'a', field 'inner.wiat': unknown key 'wiat'; did you mean 'wait'?"),  # aliases, nested
    ("inner: {depht: 2}\n", "t.yaml: field 'inner.depht': unknown key 'depht'; did you mean 'depth'?"),
    ("items:\n  - {nmae: a}\n", "t.yaml: item #1, field 'nmae': unknown key 'nmae'; did you mean 'name'?"),
    ("items: [3]\n", "t.yaml: item #1: must be a mapping of keys (like name, inner), not int"),
    ("inner: {depth: x}\n",
     "t.yaml: field 'inner.depth': Input should be a valid integer, unable to parse string as an integer"),
    ("", "t.yaml: the file is empty"),
    ("[1]\n", "t.yaml: the top must be a mapping, not list"),
    ("inner: {}\ninner: {}\n",
     "t.yaml: YAML error at line 2, column 1: duplicate key 'inner' (the second would silently win)"),
    ("a: \"\x00\"\n", "t.yaml: YAML error at line 1, column 5: character '\\x00' is not allowed in YAML"),
])
def test_one_line_per_mistake(text: str, line: str) -> None:
    with pytest.raises(UserError) as e:
        load_text(Top, text, "t.yaml", KIND)
    assert e.value.line() == line


def test_what_a_file_kind_lets_through(tmp_path: Path) -> None:
    assert load_text(Top, "", "t.yaml", LOOSE) == Top()  # empty: every default
    assert load_text(Top, "inner: {depth: 2}\ninner: {depth: 3}\n", "t.yaml", LOOSE).inner.depth == 3  # last wins
    with pytest.raises(UserError, match=r"^t\.yaml: item #1: Input should be a valid dictionary"):
        load_text(Top, "items: [3]\n", "t.yaml", FileKind("x", top_level="", sections={"items": "item"}))
    big = tmp_path / "big.yaml"
    big.write_text("#" * 65)
    with pytest.raises(UserError) as e:
        load_file(Top, big, LOOSE)
    assert e.value.line() == f"{big}: the loose file is over 0 MiB; is it the right file?"
    with pytest.raises(UserError) as e:
        load_file(Top, tmp_path, LOOSE)
    assert e.value.line() == f"{tmp_path}: is a directory, not a loose file"
