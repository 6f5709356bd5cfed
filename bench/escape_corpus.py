"""A replay corpus with unmatched entries: real uprobe/uretprobe text of calls that escape with longjmp.

tests/progs/escaper.c: 4 threads call `work` (which calls `leaf`); first PREFIX calls a thread
escape every time (the pending entries, built up front), then 9 in every 250 escape (the rate seen in
a real program). Both functions are probed with uprobe + uretprobe through the agent's own config
(instance kpe_bench_escape) and streamed with `cat trace_pipe`: an escaped call leaves its entry
and no exit. The capture (~0.35M lines) is then repeated to the wanted length, the copies after the
first without the prefix, timestamps shifted past the previous copy and thread ids kept (so the
same threads' stacks stay deep, as a long-running program's would).

Two corpora come out, the same lines but for the escaped entries:
  bench/out/escape.trace        every line; ~50k entries pending after the prefix, ~70k at the end
  bench/out/escape-none.trace   without the entries that never get an exit: nothing pending
and bench/out/escape.yaml (max_pending and max_age high enough that nothing is evicted).

    python3 bench/escape_corpus.py [--lines 2400000]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from capture import stream
from common import OUT, build

INSTANCE = "kpe_bench_escape"
THREADS, CALLS, K, PREFIX = 4, 12_500, 9, 12_500  # 50k entries pending after the prefix

CONFIG = """\
instance: {instance}
pending: {{max_pending: 1000000, max_age: 1h}}
probes:
  - name: work
    uprobe: {exe}:work
    args: {{i: "%di:s64"}}
    latency: true
  - name: leaf
    uprobe: {exe}:leaf
    args: {{i: "%di:s64"}}
    latency: true
"""
HEAD = re.compile(rb"^(.{16}-)(\d+)(.*? )(\d+)\.(\d{6}): (\w+)")


def capture(exe: Path, cfg_path: Path) -> list[bytes]:
    """One run of escaper under uprobe+uretprobe: its trace lines (raises on any loss)."""
    out = OUT / "escape-capture.trace"

    def workload() -> int:
        return int(subprocess.run([str(exe), str(THREADS), str(CALLS), str(K), str(PREFIX)], check=True,
                                  capture_output=True, text=True).stdout)

    made, lost = stream(cfg_path, INSTANCE, 131072, out, workload)
    lines = out.read_bytes().splitlines()
    out.unlink()
    if lost or any(b"LOST" in ln for ln in lines):
        raise RuntimeError(f"the capture lost {lost} events: a busy machine; run again")
    if made != THREADS * (PREFIX + CALLS // 250 * K + min(CALLS % 250, K)):
        raise RuntimeError(f"escaper made {made} escapes")
    return lines


def unmatched_entries(lines: list[bytes]) -> set[int]:
    """Indices of the entry lines that never get their exit (a stack per thread and function)."""
    stacks: dict[tuple[bytes, bytes], list[int]] = {}
    for i, ln in enumerate(lines):
        m = HEAD.match(ln)
        if not m:
            continue
        tid, ev = m.group(2), m.group(6)
        if ev.endswith(b"_ret"):
            s = stacks.get((tid, ev[:-4]))
            if s:
                s.pop()
        else:
            stacks.setdefault((tid, ev), []).append(i)
    return {i for s in stacks.values() for i in s}


def build_corpus(lines_wanted: int) -> tuple[Path, Path, Path, dict[str, int]]:
    exe = build("escaper")
    cfg_path = OUT / "escape.yaml"
    cfg_path.write_text(CONFIG.format(instance=INSTANCE, exe=exe))
    lines = capture(exe, cfg_path)
    parsed = []
    for ln in lines:
        m = HEAD.match(ln)
        if not m:
            raise RuntimeError(f"unexpected line {ln[:120]!r}")
        parsed.append((m.group(1) + m.group(2) + m.group(3), int(m.group(4)) * 10**6 + int(m.group(5)),
                       ln[m.end(5):]))
    # the body (calls after each thread's prefix): every line of a thread after its PREFIX-th escape
    seen: dict[bytes, int] = {}
    body = []
    for i, ln in enumerate(lines):
        m = HEAD.match(ln)
        assert m is not None
        tid = m.group(2)
        if m.group(6) == b"work":
            seen[tid] = seen.get(tid, 0) + 1
        if seen.get(tid, 0) > PREFIX:
            body.append(i)
    span = parsed[-1][1] - parsed[0][1] + 1
    body_span = parsed[body[-1]][1] - parsed[body[0]][1] + 1
    copies: list[tuple[int, int]] = [(i, 0) for i in range(len(lines))]  # (line, µs shift)
    shift = span
    while len(copies) < lines_wanted:
        copies += [(i, shift - (parsed[body[0]][1] - parsed[0][1])) for i in body]
        shift += body_span
    escaped_once = unmatched_entries(lines)
    escape_path, none_path = OUT / "escape.trace", OUT / "escape-none.trace"
    pending = 0
    with open(escape_path, "wb") as fa, open(none_path, "wb") as fb:
        for i, sh in copies:
            head, ts, rest = parsed[i]
            ln = b"%s%d.%06d%s\n" % (head, (ts + sh) // 10**6, (ts + sh) % 10**6, rest)
            fa.write(ln)
            if i in escaped_once:
                pending += 1
            else:
                fb.write(ln)
    info = {"lines": len(copies), "lines_none": len(copies) - pending, "pending_end": pending,
            "pending_after_prefix": THREADS * PREFIX, "capture_lines": len(lines)}
    print(f"{escape_path}: {info}", file=sys.stderr)
    return escape_path, none_path, cfg_path, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=2_400_000)
    args = ap.parse_args()
    build_corpus(args.lines)


if __name__ == "__main__":
    main()
