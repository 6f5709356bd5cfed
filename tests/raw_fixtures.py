"""Raw fixtures: real pages from this kernel (6.18) and Debian's 6.1 (kernel lab), loaded for the tests.

Each fixture directory (tests/make_raw_fixtures.py) holds the pages read from per_cpu/cpuN/trace_pipe_raw,
the header and event formats needed to decode them, and the instance's `trace` text of the same
events read just before: every decoded event must be the text's line, field for field (thread, CPU,
timestamp to the microsecond the text shows, and the body the kernel printed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import raw_reference
from kprobe_exporter import config, kernel, parser, probes
from kprobe_exporter.probes import ProbeSet
from kprobe_exporter.raw import args as raw_args
from kprobe_exporter.raw import formats as raw_formats
from kprobe_exporter.raw import pages as raw_pages

RAW = Path(__file__).resolve().parent / "fixtures" / "raw"
K618 = RAW / "linux-6.18"
K61 = RAW / "linux-6.1-debian"
ALL = sorted(p for p in RAW.glob("*/*") if (p / "meta.json").exists())


@dataclass
class Fixture:
    path: Path
    meta: dict[str, object]
    probes: ProbeSet
    layout: raw_formats.PageLayout
    events: raw_args.RawEvents
    pages: dict[int, bytes]  # per CPU, its pages concatenated
    batch: raw_pages.Batch

    def body(self, i: int) -> bytes:
        """The kernel's text of event i from its name on, rendered from its record."""
        e = int(self.batch.ev[i])
        fmt = self.events.formats[e]
        assert fmt is not None
        return raw_reference.make_renderer(self.probes.events[e], fmt, self.events.kernel)(self.batch.record(i))

    def stats(self, cpu: int) -> dict[str, str]:
        text = (self.path / f"cpu{cpu}.stats").read_text()
        return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def probe_set(sc: dict[str, object]) -> ProbeSet:
    """The config that installs a scenario's events, as the agent would build it."""
    lines = [f"instance: {sc['instance']}", "probes:"]
    defs = {line.split()[0].split(":", 1)[1]: line for _, line in sc["definitions"]}  # type: ignore[attr-defined]
    for ev in sc["events"]:  # type: ignore[attr-defined]
        if ev in defs:
            letter, rest = defs[ev].split(":", 1)
            name_part, tail = rest.split(" ", 1)
            lines.append(f"  - raw: '{letter}:{name_part.split('/')[1]} {tail}'")
        else:
            lines.append(f"  - tracepoint: {ev}")
    return probes.build_probe_set(config.load_text("\n".join(lines) + "\n"), resolve=None)


def load(path: Path) -> Fixture:
    meta = json.loads((path / "meta.json").read_text())
    ps = probe_set(meta["scenario"])
    layout = raw_formats.parse_header_page((path / "header_page").read_text())
    raw_formats.check_header_event((path / "header_event").read_text())
    formats = []
    for ev in ps.events:
        group, name = (ev.group, ev.name) if ev.dynamic else ev.target.split("/")
        formats.append(raw_formats.parse_format((path / "events" / group / name / "format").read_text()))
    events = raw_args.RawEvents(ps, formats, kernel.version(meta["release"]))
    pages = {int(f.stem[3:]): f.read_bytes() for f in sorted(path.glob("cpu*.raw"))}
    runs, off = [], 0
    for cpu, data in pages.items():
        runs.append((cpu, off, len(data) // layout.page_size))
        off += len(data)
    batch = raw_pages.batch_from_pages(b"".join(pages.values()), runs, layout, events.lut)
    return Fixture(path, meta, ps, layout, events, pages, batch)


def text_lines(path: Path) -> list[parser.TraceLine]:
    raw = (path / "trace.txt").read_bytes().split(b"\n")
    return [parser.parse_line(x) for x in raw if x and not x.startswith(b"#")]


def usec(ts_ns: int) -> int:
    """The text's microseconds: the kernel rounds (ns2usecs adds 500 before dividing)."""
    return (ts_ns + 500) // 1000


def after_ip(body: bytes) -> bytes:
    """A probe body from its args on: a kprobe's ip prints as `sym+off/size` in text, as hex here."""
    return body[body.find(b")") + 1:]
