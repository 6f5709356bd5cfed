"""Capture ring-buffer pages for the raw reader's fixtures: the binary pages of an instance and its text.

Standard library only: it runs on this machine and inside the kernel-lab guest alike.

    python3 tests/raw_capture.py OUT_DIR SCENARIO_JSON

A scenario (JSON) says what to define, enable and run:

    {"instance": "kpe_rawcap", "definitions": [["uprobe_events", "p:kpe_rawcap/f /bin/x:0x1139 a=%di:s32"]],
     "events": ["kpe_rawcap/f", "syscalls/sys_enter_openat"], "buffer_size_kb": 64, "subbuf_kb": 4,
     "cpu": 0, "workload": [["/bin/x", "open", "3"]], "text_instances": {"kpe_text": false, "kpe_tgid": true},
     "options": {"record-tgid": 1}}

OUT_DIR gets: meta.json, header_page, header_event, events/GROUP/NAME/format of each event,
cpuN.raw (the pages read from per_cpu/cpuN/trace_pipe_raw until it had no more, concatenated),
cpuN.stats, and trace.txt: the instance's `trace` text, read before the pages (the same events).
With "text_instances" (name: record-tgid), each such instance (irq-info off, as the agent sets it) traces
the same events alongside, and its trace_pipe comes back as NAME.trace_pipe. "options" are set in the
capture's own instance after irq-info (off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/sys/kernel/tracing")


def write(path: Path, text: str, append: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def page_size(inst: Path) -> int:
    text = (inst / "events" / "header_page").read_text()
    for line in text.splitlines():
        if "char data;" in line:
            parts = dict(p.strip().split(":", 1) for p in line.split(";") if ":" in p and "field" not in p)
            return int(parts["offset"]) + int(parts["size"])
    raise RuntimeError("no data field in header_page")


def drain(path: Path, size: int, pad: bool = False) -> bytes:
    """Read a pipe file (trace_pipe, trace_pipe_raw) without blocking until it has no more."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    chunks = []
    try:
        while True:
            try:
                b = os.read(fd, size)
            except BlockingIOError:
                break
            if not b:
                break
            chunks.append(b.ljust(size, b"\0") if pad else b)
    finally:
        os.close(fd)
    return b"".join(chunks)


def capture(out: Path, sc: dict[str, object]) -> None:
    if not (ROOT / "events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(ROOT)], check=True)
    name = str(sc.get("instance", "kpe_rawcap"))
    inst = ROOT / "instances" / name
    defs = [tuple(d) for d in sc.get("definitions", [])]  # type: ignore[attr-defined]
    events = [str(e) for e in sc.get("events", [])]  # type: ignore[attr-defined]
    text_instances: dict[str, bool] = sc.get("text_instances", {})  # type: ignore[assignment]
    texts = {ROOT / "instances" / n: bool(t) for n, t in text_instances.items()}
    out.mkdir(parents=True, exist_ok=True)
    inst.mkdir()
    try:
        if sc.get("subbuf_kb") and (inst / "buffer_subbuf_size_kb").exists():
            write(inst / "buffer_subbuf_size_kb", str(sc["subbuf_kb"]))
        if sc.get("buffer_size_kb"):
            write(inst / "buffer_size_kb", str(sc["buffer_size_kb"]))
        write(inst / "trace_clock", "mono")
        write(inst / "options" / "irq-info", "0")
        for option, value in sc.get("options", {}).items():  # type: ignore[attr-defined]
            write(inst / "options" / str(option), str(value))
        for probe_file, line in defs:
            write(ROOT / probe_file, line + "\n", append=True)
        for text_inst, record_tgid in texts.items():
            text_inst.mkdir()
            write(text_inst / "options" / "irq-info", "0")
            write(text_inst / "trace_clock", "mono")
            write(text_inst / "options" / "record-tgid", "1" if record_tgid else "0")
        for ev in events:
            for i in (inst, *texts):
                write(i / "events" / ev / "enable", "1")
        cpu = sc.get("cpu")
        pin = None if cpu is None else {int(str(cpu))}
        for cmd in sc.get("workload", []):  # type: ignore[attr-defined]
            subprocess.run(list(cmd), check=False, stdout=subprocess.DEVNULL,
                           preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None)
        write(inst / "tracing_on", "0")
        for text_inst in texts:
            write(text_inst / "tracing_on", "0")
        time.sleep(0.05)
        (out / "trace.txt").write_bytes((inst / "trace").read_bytes())
        for text_inst in texts:
            (out / f"{text_inst.name}.trace_pipe").write_bytes(drain(text_inst / "trace_pipe", 65536))
        ps = page_size(inst)
        for d in sorted((inst / "per_cpu").glob("cpu[0-9]*")):
            (out / f"{d.name}.stats").write_text((d / "stats").read_text())
            pages = drain(d / "trace_pipe_raw", ps, pad=True)
            (out / f"{d.name}.raw").write_bytes(pages)
        for f in ("header_page", "header_event"):
            (out / f).write_text((inst / "events" / f).read_text())
        for ev in events:
            (out / "events" / ev).mkdir(parents=True, exist_ok=True)
            (out / "events" / ev / "format").write_text((inst / "events" / ev / "format").read_text())
        meta = {
            "release": os.uname().release,
            "page_size": ps,
            "clock": (inst / "trace_clock").read_text().strip(),
            "timestamp_mode": (inst / "timestamp_mode").read_text().strip(),
            "subbuf_kb": (inst / "buffer_subbuf_size_kb").read_text().strip()
            if (inst / "buffer_subbuf_size_kb").exists() else None,
            "buffer_size_kb": (inst / "buffer_size_kb").read_text().strip(),
            "scenario": sc,
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    finally:
        for i in (inst, *texts):
            for ev in events:
                try:
                    write(i / "events" / ev / "enable", "0")
                except OSError:
                    pass
            for _ in range(50):
                try:
                    i.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        for probe_file, line in reversed(defs):
            ev = line.split()[0].split(":", 1)[1]
            try:
                write(ROOT / probe_file, f"-:{ev}\n", append=True)
            except OSError:
                pass


if __name__ == "__main__":
    capture(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
