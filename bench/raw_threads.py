"""One thread polling every CPU's trace_pipe_raw, or one reader thread per CPU: which drains more?

    python3 bench/raw_threads.py [--seconds 3] [--rounds 2]

A getppid loop at one core's full rate on CPU 0 (the overload of bench/run.py's drain row) and at
200k events/s; the reader process on CPU 1 reads and decodes pages (raw_reader.RawReader, no
aggregate), either from its own thread for all CPUs (what the agent does) or with a thread per CPU
that reads pages and hands them over a queue to the decoding thread. Rounds alternate the two;
prints events delivered, loss and CPU per event of each.
"""

from __future__ import annotations

import argparse
import os
import queue
import select
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
from common import build, plain_instance

from kprobe_exporter import config, probes
from kprobe_exporter.raw import args as raw_args
from kprobe_exporter.raw import formats as raw_formats
from kprobe_exporter.raw import pages as raw_pages
from kprobe_exporter.raw import reader as raw_reader

EVENTS = ["syscalls/sys_enter_getppid", "syscalls/sys_exit_getppid"]


def raw_events(inst: Path) -> raw_args.RawEvents:
    ps = probes.build_probe_set(config.load_text(
        "probes:\n  - tracepoint: syscalls/sys_enter_getppid\n    latency: true\n"), resolve=None)
    dirs = [inst / "events" / ev.target for ev in ps.events]
    return raw_args.RawEvents.load(dirs, ps)


def single(inst: Path, stop: threading.Event, out: list[int]) -> None:
    r = raw_reader.RawReader(inst, raw_events(inst), tracefs_root=inst.parent.parent)
    n = 0
    while not stop.is_set():
        b = r.read(0.1)
        n += int(np.count_nonzero(b.ev >= 0)) if b is not None else 0
    while (b := r.flush()) is not None:
        n += int(np.count_nonzero(b.ev >= 0))
    r.close()
    out.append(n)


def per_cpu_threads(inst: Path, stop: threading.Event, out: list[int]) -> None:
    events = raw_events(inst)
    layout = raw_formats.load_layout(inst)
    ps = layout.page_size
    q: queue.Queue[tuple[int, bytes]] = queue.Queue(maxsize=64)
    done = threading.Event()

    def reader(cpu: int) -> None:
        fd = os.open(inst / "per_cpu" / f"cpu{cpu}" / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK)
        p = select.poll()
        p.register(fd, select.POLLIN)
        buf = bytearray(ps * 256)
        pages = [memoryview(buf)[i * ps:(i + 1) * ps] for i in range(256)]
        while True:
            n = 0
            while n < 256:
                try:
                    if not os.readv(fd, [pages[n]]):
                        break
                except BlockingIOError:
                    break
                n += 1
            if n:
                q.put((cpu, bytes(buf[:n * ps])))
            elif done.is_set():
                break
            else:
                p.poll(100)
        os.close(fd)

    cpus = sorted(int(d.name[3:]) for d in (inst / "per_cpu").glob("cpu[0-9]*"))
    threads = [threading.Thread(target=reader, args=(c,)) for c in cpus]
    for t in threads:
        t.start()
    n = 0

    def consume(timeout: float) -> None:
        nonlocal n
        try:
            cpu, data = q.get(timeout=timeout)
        except queue.Empty:
            return
        b = raw_pages.batch_from_pages(data, [(cpu, 0, len(data) // ps)], layout, events.lut)
        n += int(np.count_nonzero(b.ev >= 0))

    while not stop.is_set():
        consume(0.1)
    done.set()
    for t in threads:
        t.join()
    while not q.empty():
        consume(0)
    out.append(n)


def run(kind: str, seconds: float, rate: int, loadgen: Path) -> tuple[int, int, float]:
    with plain_instance("kpe_bench_rawthreads", EVENTS, buffer_kb=4096) as inst:
        (inst / "buffer_percent").write_text("50")
        stop = threading.Event()
        out: list[int] = []
        target = single if kind == "single" else per_cpu_threads
        t = threading.Thread(target=target, args=(inst, stop, out))
        c0 = time.process_time()
        t.start()
        time.sleep(0.3)
        subprocess.run(["taskset", "-c", "0", str(loadgen), str(seconds), str(rate)], check=True)
        time.sleep(0.5)
        stop.set()
        t.join()
        cpu = time.process_time() - c0
        lost = 0
        for d in inst.glob("per_cpu/cpu*"):
            for line in (d / "stats").read_text().splitlines():
                k, _, v = line.partition(":")
                if k.strip() in ("overrun", "dropped events"):
                    lost += int(v)
    return out[0], lost, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    loadgen = build("loadgen")
    for rate, label in ((0, "overload"), (100_000, "200k ev/s")):
        for _ in range(args.rounds):
            for kind in ("single", "threads"):
                n, lost, cpu = run(kind, args.seconds, rate, loadgen)
                print(f"{label:10} {kind:8} delivered {n / args.seconds / 1e6:5.2f} M ev/s  "
                      f"loss {100 * lost / max(n + lost, 1):5.1f}%  cpu {cpu / max(n, 1) * 1e6:.3f} us/event",
                      flush=True)


if __name__ == "__main__":
    main()
