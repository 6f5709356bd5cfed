"""Capture the replay corpus on this kernel: real trace text, installed through the agent's own config.

uprobe/uretprobe pairs with string and integer args from several threads (tests/progs/fxgen.c:
open_path, compute, recurse, `threads` mode) and the syscall tracepoint pair openat, streamed from
a tracefs instance of our own (kpe_bench_corpus) with `cat trace_pipe`. Writes bench/out/corpus.trace
and bench/out/corpus.yaml (the config replay needs).

    python3 bench/capture.py [--lines 2400000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from common import OUT, build, cpu_stats_lost, ensure_tracefs

from kprobe_exporter import config as config_mod
from kprobe_exporter import probes as probes_mod
from kprobe_exporter.tracefs import Tracefs

INSTANCE = "kpe_bench_corpus"

CONFIG = """\
instance: {instance}
probes:
  - name: open_path
    uprobe: {exe}:open_path
    args: {{path: "+0(%di):string", flags: "%si:x32"}}
    labels: [path]
    latency: true
  - name: compute
    uprobe: {exe}:compute
    args: {{a: "%di:s32", b: "%si:u32"}}
    latency: true
  - name: recurse
    uprobe: {exe}:recurse
    args: {{depth: "%di:s32"}}
    latency: true
  - name: openat
    tracepoint: syscalls/sys_enter_openat
    latency: true
"""


def corpus_config(exe: Path, instance: str = INSTANCE) -> str:
    return CONFIG.format(exe=exe, instance=instance)


T = TypeVar("T")


def stream(cfg_path: Path, instance: str, buffer_kb: int, out: Path, workload: Callable[[], T]) -> tuple[T, int]:
    """Install a config in an instance of our own, run `workload` while `cat trace_pipe` streams into
    `out` until it stops growing, remove the instance: the workload's result and the events the per-CPU
    stats say were lost."""
    cfg = config_mod.load(str(cfg_path))
    ps = probes_mod.build_probe_set(cfg, str(cfg_path))
    tfs = Tracefs(ensure_tracefs(), instance)
    # no own_tids: with event-fork an excluded pid takes its children (the workload) along
    tfs.install(ps, buffer_kb, record_tgid=False, own_tids=[])
    try:
        with open(out, "wb") as f:
            cat = subprocess.Popen(["cat", str(tfs.inst / "trace_pipe")], stdout=f)
            try:
                result = workload()
                last = -1
                while out.stat().st_size != last:  # drained when the file stops growing
                    last = out.stat().st_size
                    time.sleep(0.5)
            finally:
                cat.terminate()
                cat.wait()
        return result, cpu_stats_lost(tfs.inst)
    finally:
        problems = tfs.remove()
        if problems:
            print("cleanup problems:", problems, file=sys.stderr)


def capture(lines: int) -> tuple[Path, Path]:
    exe = build("fxgen")
    cfg_path = OUT / "corpus.yaml"
    cfg_path.write_text(corpus_config(exe))
    out = OUT / "corpus.trace"

    def workload() -> None:
        # ~6 lines per `threads` iteration (compute, open_path, openat pairs), 10 per recurse 4
        rounds = max(1, lines // 50_000)
        for i in range(rounds):
            procs = [subprocess.Popen([str(exe), "threads", "2000", "4"]),
                     subprocess.Popen([str(exe), "recurse", "300", "4"]),
                     subprocess.Popen([str(exe), "open", "200", f"/no/such dir/\"q\"\t{i}"])]
            for p in procs:
                p.wait()
            if i % 10 == 0:
                print(f"round {i + 1}/{rounds}: {out.stat().st_size / 1e6:.0f} MB", file=sys.stderr)

    stream(cfg_path, INSTANCE, 65536, out, workload)
    n = sum(1 for _ in open(out, "rb"))
    print(f"{out}: {n} lines, {out.stat().st_size / 1e6:.0f} MB", file=sys.stderr)
    return out, cfg_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=2_400_000)
    args = ap.parse_args()
    capture(args.lines)


if __name__ == "__main__":
    main()
