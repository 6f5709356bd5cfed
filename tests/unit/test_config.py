"""Config: the model's defaults and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kprobe_exporter import config
from kprobe_exporter.errors import UserError


def test_defaults() -> None:
    c = config.load_text("probes: []\n")
    assert c.instance == "kprobe_exporter" and c.listen_address == "0.0.0.0:10111"
    assert c.buckets[0] == 1e-6 and 8 < c.buckets[-1] < 10 and len(c.buckets) == 24
    assert c.label_limit == 100 and c.pending.max_age == 60.0


@pytest.mark.parametrize(("value", "seconds"), [("250ms", 0.25), ("10s", 10.0), ("2m", 120.0), (3, 3.0), ("5us", 5e-6)])
def test_durations(value: object, seconds: float) -> None:
    assert config.parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("probes: [\n", "YAML error at line 2, column 1"),
        ("", "the file is empty"),
        ("- a\n", "top level must be a mapping"),
        (
            "probes:\n  - {name: a, kprobe: f, lables: [x]}\n",
            "probe 'a', field 'lables': unknown key 'lables'; did you mean 'labels'?",
        ),
        ("instanse: x\nprobes: []\n", "did you mean 'instance'?"),
        ("probes:\n  - {name: a}\n", "probe 'a': needs exactly one kind"),
        ("probes:\n  - {name: a, kprobe: f, uprobe: '/x:y'}\n", "has two kinds (kprobe and uprobe)"),
        ("probes:\n  - {name: 'a-b', kprobe: f}\n", "field 'name'"),
        ("probes:\n  - {name: " + "a" * 70 + ", kprobe: f}\n", "at most 63"),
        ('probes:\n  - {name: a, kprobe: "f\\nr:x/y f"}\n', "field 'kprobe': must not contain a newline"),
        ("probes:\n  - {name: a, kprobe: f, filter: 'x == 1; y'}\n", "field 'filter'"),
        ("probes:\n  - {name: a, kprobe: f, args: {x: '-:kprobes/foo'}}\n", "field 'args'"),
        ("probes:\n  - {name: a, kprobe: f, latency: maybe}\n", "field 'latency'"),
        ("buckets: [0.1, 0.01]\nprobes: []\n", "field 'buckets'"),
        ("listen_address: nope\nprobes: []\n", "field 'listen_address'"),
        ("probes:\n  - {name: a, kprobe: f, latency: true, spans: {sample_ratio: 2}}\n", "spans.sample_ratio"),
        ("cgroup_rewrite: [{match: 'pod([', replace: x}]\nprobes: []\n",
         "field 'cgroup_rewrite[0].match': 'pod([' is not a regular expression"),
        ("cgroup_rewrite: [{match: '(a)', replace: '\\2'}]\nprobes: []\n",
         "field 'cgroup_rewrite[0].replace': '\\\\2': invalid group reference 2"),
        ("cgroup_rewrite: [{match: a}]\nprobes: []\n", "field 'cgroup_rewrite[0].replace'"),
    ],
)
def test_errors_are_one_line_naming_file_probe_field(text: str, needle: str) -> None:
    with pytest.raises(UserError) as e:
        config.load_text(text, "cfg.yaml")
    assert e.value.line().startswith("cfg.yaml: ") and needle in e.value.line(), e.value.line()
    assert "\n" not in e.value.line()


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such config file"):
        config.load(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="is a directory"):
        config.load(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"probes: [\xff]\n")
    with pytest.raises(UserError, match="not UTF-8"):
        config.load(bad)
