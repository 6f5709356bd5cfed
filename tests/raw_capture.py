"""Capture ring-buffer pages for the raw reader's fixtures: the binary pages of an instance and its text.

Standard library only: it runs on this machine and inside the kernel-lab guest alike.

    python3 tests/raw_capture.py OUT_DIR SCENARIO_JSON

A scenario (JSON) says what to define, enable and run:

    {"instance": "kpe_rawcap", "definitions": [["uprobe_events", "p:kpe_rawcap/f /bin/x:0x1139 a=%di:s32"]],
     "events": ["kpe_rawcap/f", "syscalls/sys_enter_openat"], "buffer_size_kb": 64, "subbuf_kb": 4,
     "cpu": 0, "workload": [["/bin/x", "open", "3"]]}

OUT_DIR gets: meta.json, header_page, header_event, events/GROUP/NAME/format of each event,
cpuN.raw (the pages read from per_cpu/cpuN/trace_pipe_raw until it had no more, concatenated),
cpuN.stats, and trace.txt: the instance's `trace` text, read before the pages (the same events).
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


def capture(out: Path, sc: dict[str, object]) -> None:
    if not (ROOT / "events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(ROOT)], check=True)
    name = str(sc.get("instance", "kpe_rawcap"))
    inst = ROOT / "instances" / name
    defs = [tuple(d) for d in sc.get("definitions", [])]  # type: ignore[attr-defined]
    events = [str(e) for e in sc.get("events", [])]  # type: ignore[attr-defined]
    out.mkdir(parents=True, exist_ok=True)
    inst.mkdir()
    try:
        if sc.get("subbuf_kb") and (inst / "buffer_subbuf_size_kb").exists():
            write(inst / "buffer_subbuf_size_kb", str(sc["subbuf_kb"]))
        if sc.get("buffer_size_kb"):
            write(inst / "buffer_size_kb", str(sc["buffer_size_kb"]))
        write(inst / "trace_clock", "mono")
        write(inst / "options" / "irq-info", "0")
        for probe_file, line in defs:
            write(ROOT / probe_file, line + "\n", append=True)
        for ev in events:
            write(inst / "events" / ev / "enable", "1")
        cpu = sc.get("cpu")
        pin = None if cpu is None else {int(str(cpu))}
        for cmd in sc.get("workload", []):  # type: ignore[attr-defined]
            subprocess.run(list(cmd), check=False, stdout=subprocess.DEVNULL,
                           preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None)
        write(inst / "tracing_on", "0")
        time.sleep(0.05)
        (out / "trace.txt").write_bytes((inst / "trace").read_bytes())
        ps = page_size(inst)
        for d in sorted((inst / "per_cpu").glob("cpu[0-9]*")):
            (out / f"{d.name}.stats").write_text((d / "stats").read_text())
            fd = os.open(d / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK)
            pages = []
            try:
                while True:
                    try:
                        b = os.read(fd, ps)
                    except BlockingIOError:
                        break
                    if not b:
                        break
                    pages.append(b.ljust(ps, b"\0"))
            finally:
                os.close(fd)
            (out / f"{d.name}.raw").write_bytes(b"".join(pages))
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
        for ev in events:
            try:
                write(inst / "events" / ev / "enable", "0")
            except OSError:
                pass
        for _ in range(50):
            try:
                inst.rmdir()
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
