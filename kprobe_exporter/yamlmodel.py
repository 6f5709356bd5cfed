"""YAML model files: a file read, parsed as YAML and validated into a pydantic model; each mistake one UserError.

The config and the web config both load through here, so their YAML and validation errors read alike.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kprobe_exporter.errors import UserError

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class FileKind:
    """What differs between the files: their name in messages, and what an empty or odd file means."""

    what: str  # "config", "web config"
    top_level: str  # the message when the top level is no mapping; {type} is what it is instead
    empty: str | None = None  # the message for an empty file; None: empty means every default
    mapping_hint: str | None = None  # keys to name when a mapping is expected; None: pydantic's words
    unique_keys: bool = True  # refuse a key given twice (PyYAML keeps the last silently)
    max_bytes: int | None = None
    # list sections whose items messages name: section -> the word ("probe"), and how an item is named
    sections: Mapping[str, str] = field(default_factory=dict)
    item_name: Callable[[Any], str | None] = lambda item: None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping below reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the second would silently win)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_file(path: str | Path, kind: FileKind) -> str:
    """The file's text; the error names the path as given."""
    name, what = str(path), kind.what
    try:
        with open(path, "rb") as f:
            data = f.read(kind.max_bytes + 1 if kind.max_bytes is not None else -1)
        if kind.max_bytes is not None and len(data) > kind.max_bytes:
            raise UserError(f"the {what} file is over {kind.max_bytes >> 20} MiB; is it the right file?", file=name)
        return data.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"no such {what} file", file=name) from None
    except IsADirectoryError:
        raise UserError(f"is a directory, not a {what} file", file=name) from None
    except PermissionError:
        raise UserError(f"cannot read the {what} file (permission denied)", file=name) from None
    except UnicodeDecodeError:
        raise UserError(f"the {what} file is not UTF-8 text", file=name) from None
    except OSError as e:
        raise UserError(f"cannot read the {what} file ({e.strerror})", file=name) from None


def _line_col(text: str, position: int) -> str:
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return f"line {line}, column {column}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse_yaml(text: str, path: str, kind: FileKind) -> Any:
    """The YAML document (safe types only); errors say line and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader if kind.unique_keys else yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UserError(f"YAML error at {where}{_one_line(e.problem or e.context or '')}", file=path) from None
    except yaml.reader.ReaderError as e:
        char = chr(e.character) if isinstance(e.character, int) else str(e.character)
        raise UserError(f"YAML error at {_line_col(text, e.position)}: character {char!r} is not allowed in YAML",
                        file=path) from None
    except yaml.YAMLError as e:
        raise UserError(f"YAML error: {_one_line(str(e))}", file=path) from None


def load_text(model: type[M], text: str, path: str, kind: FileKind) -> M:
    data = parse_yaml(text, path, kind)
    if data is None:
        if kind.empty is not None:
            raise UserError(kind.empty, file=path)
        data = {}
    if not isinstance(data, dict):
        raise UserError(kind.top_level.format(type=type(data).__name__), file=path)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(model, data, err, path, kind) from None


def load_file(model: type[M], path: str | Path, kind: FileKind) -> M:
    return load_text(model, read_file(path, kind), str(path), kind)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds (`X`, `X | None`, `list[X]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that the value at a pydantic location is (list indices step into the items)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        if current is None:
            return None
        by_key = {f.alias or name: f for name, f in current.model_fields.items()}
        info = by_key.get(str(part))
        current = _model_in(info.annotation) if info is not None else None
    return current


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _who(data: dict[Any, Any], loc: tuple[Any, ...], kind: FileKind) -> tuple[str, int]:
    """How a message names the list item a location is in ("probe 'a'", "pair #2"), and the parts it takes."""
    if len(loc) > 1 and loc[0] in kind.sections and isinstance(loc[1], int):
        items = data.get(loc[0])
        item = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else None
        name = kind.item_name(item)
        word = kind.sections[loc[0]]
        return (f"{word} {name!r}" if isinstance(name, str) else f"{word} #{loc[1] + 1}"), 2
    return "", 0


def validation_error(model: type[BaseModel], data: dict[Any, Any], err: ValidationError, path: str,
                     kind: FileKind) -> UserError:
    """The first validation error as one line: the item it is in, the field's path, what is wrong."""
    e = err.errors()[0]
    loc = tuple(e["loc"])
    who, skip = _who(data, loc, kind)
    parts: list[str] = []
    for part in loc[skip:]:
        parts.append(f"[{part}]" if isinstance(part, int) else ("." if parts else "") + str(part))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        key = str(loc[-1])
        parent = _model_at(model, loc[:-1])
        names = _keys(parent) if parent is not None else []
        near = difflib.get_close_matches(key, names, n=1)
        msg = f"unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(names)}")
    elif e["type"] == "missing":
        msg = "is required"
    elif e["type"] == "model_type" and kind.mapping_hint is not None:
        msg = f"must be a mapping of keys (like {kind.mapping_hint}), not {type(e.get('input')).__name__}"
    return UserError(msg, field="".join(parts), file=path, who=who)
