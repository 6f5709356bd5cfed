"""The guest side of bench/lab_kernel_findings.py: recursion, synthetic events in instances, scrape cost.

`python3 lab_kernel_findings_guest.py [recursion,instances,scrape]`; writes $LAB_OUT/findings.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kprobe_exporter import hist, symbols, triggers

T = Path("/sys/kernel/tracing")
LAB_IN = Path(os.environ.get("LAB_IN", "."))
OUT = Path(os.environ.get("LAB_OUT", "/tmp"))


def write(path: Path, line: str) -> str:
    """Write one line; "ok" or the errno's name (and the kernel's error_log tail, if it says more)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as e:
        return f"open: {os.strerror(e.errno or 0)}"
    try:
        os.write(fd, (line + "\n").encode())
        return "ok"
    except OSError as e:
        return f"{os.strerror(e.errno or 0)}"
    finally:
        os.close(fd)


def must(path: Path, line: str) -> None:
    if (r := write(path, line)) != "ok":
        log = (T / "error_log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{path} <- {line!r}: {r}; {log}")


def error_log(inst: Path | None = None) -> list[str]:
    p = (inst or T) / "error_log"
    return p.read_text().strip().splitlines()[-4:] if p.exists() else []


def events(path: Path) -> list[tuple[int, int]]:
    """(hits+dropped, rows) of each table of a hist file."""
    return [(t.events, len(t.rows)) for t in hist.parse(path.read_text())]


def loop(n: int) -> int:
    return int(subprocess.run([str(LAB_IN / "kagg_loop"), str(n)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def recursion() -> dict[str, object]:
    """A uprobe pair on a function recursing D deep, M outer calls: what kernel mode counts and measures."""
    g, inst = "kpe_rec", T / "instances" / "kpe_rec"
    prog = str(LAB_IN / "kagg_rec")
    off = symbols.resolve(prog, "rec")
    must(T / "uprobe_events", f"p:{g}/rec {prog}:{off:#x}")
    must(T / "uprobe_events", f"r:{g}/rec_ret {prog}:{off:#x}")
    inst.mkdir()
    (inst / "buffer_size_kb").write_text("8192\n")
    (inst / "trace_clock").write_text("mono\n")
    plan = triggers.latency_plan(g, "rec", "rec_ret", "rec")
    counts = (triggers.count_trigger(f"{g}/rec"), triggers.count_trigger(f"{g}/rec_ret"))
    out: dict[str, object] = {}
    for depth in (1, 4):
        for s in plan.synthetics:
            must(T / triggers.SYNTHETIC_EVENTS, s.line)
        for t in (*counts, *plan.triggers):
            must(inst / t.path, t.line)
        for e in ("rec", "rec_ret"):
            (inst / "events" / g / e / "enable").write_text("1\n")  # the truth: every event recorded
        m = 500
        made, outer_ns = subprocess.run([prog, str(m), str(depth)], capture_output=True, text=True,
                                        check=True).stdout.split()
        for e in ("rec", "rec_ret"):
            (inst / "events" / g / e / "enable").write_text("0\n")
        synth = hist.parse((inst / plan.triggers[2].path.replace("trigger", "hist")).read_text())[0]
        kernel_buckets = {hist.log2_upper_bound(r.keys[0]): r.values["hitcount"] for r in synth.rows}
        truth = true_latencies(inst / "trace")
        out[f"depth {depth}"] = {
            "calls made": int(made), "outer call ns (program)": float(outer_ns),
            "entry hits": hist.parse((inst / f"events/{g}/rec/hist").read_text())[0].events,
            "exit hits": hist.parse((inst / f"events/{g}/rec_ret/hist").read_text())[0].events,
            "latency samples (kernel)": synth.events, "latency sum ns (kernel)": sum(r.values.get("lat", 0)
                                                                               for r in synth.rows),
            "kernel log2 buckets": kernel_buckets,
            "truth pairs (trace, stack per thread)": len(truth),
            "truth log2 buckets": log2_buckets(truth),
            "truth innermost-only log2 buckets": log2_buckets(truth[::depth] if depth > 1 else truth),
        }
        for path, line in plan.removal():
            must((T if path == triggers.SYNTHETIC_EVENTS else inst) / path, line)
        for t in reversed(counts):
            must(inst / t.path, t.removal)
        (inst / "trace").write_text("")
    inst.rmdir()
    must(T / "uprobe_events", f"-:{g}/rec")
    must(T / "uprobe_events", f"-:{g}/rec_ret")
    return out


def true_latencies(trace: Path) -> list[int]:
    """Entry→return ns of every call in a recorded trace, paired by a stack per thread (µs resolution)."""
    stacks: dict[str, list[int]] = {}
    lats: list[int] = []
    for line in trace.read_text().splitlines():
        if line.startswith("#") or ": rec" not in line:
            continue
        head, _, rest = line.partition(": rec")
        tid = head.split("[")[0].rsplit("-", 1)[-1].strip()
        ts = round(float(head.rsplit(" ", 1)[-1]) * 1e9)
        if rest.startswith("_ret:"):
            if stacks.get(tid):
                lats.append(ts - stacks[tid].pop())
        else:
            stacks.setdefault(tid, []).append(ts)
    return lats


def log2_buckets(ns: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in ns:
        b = 1 << max(0, (v - 1).bit_length()) if v > 0 else 0
        out[b] = out.get(b, 0) + 1
    return dict(sorted(out.items()))


def instances() -> dict[str, object]:
    """Synthetic event + onmatch inside non-top-level instances: fill, cross-talk, recording, removal, reload."""
    g = "kpe_syn"
    a, b = T / "instances" / "kpe_syn_a", T / "instances" / "kpe_syn_b"
    must(T / "kprobe_events", f"p:{g}/ppid __x64_sys_getppid")
    must(T / "kprobe_events", f"r:{g}/ppid_ret __x64_sys_getppid")
    a.mkdir()
    b.mkdir()
    plan = triggers.latency_plan(g, "ppid", "ppid_ret", "ppid")
    name = plan.synthetics[0].name
    synth_hist = plan.triggers[2]
    r: dict[str, object] = {}
    n = 1000
    for cycle in (1, 2):  # 2: the same install after a full removal (a reload)
        steps: dict[str, object] = {}
        steps["define synthetic (top level)"] = write(T / "synthetic_events", plan.synthetics[0].line)
        for t in plan.triggers:
            steps[f"A: {t.line[:40]}..."] = write(a / t.path, t.line)
        steps["B: synthetic hist only"] = write(b / synth_hist.path, synth_hist.line)
        calls = loop(n)
        steps["calls"] = calls
        steps["A entry hist (events, rows)"] = events(a / f"events/{g}/ppid/hist")
        steps["A synthetic hist (events, rows)"] = events(a / f"events/synthetic/{name}/hist")
        steps["B synthetic hist, fed by A's onmatch (events, rows)"] = events(b / f"events/synthetic/{name}/hist")
        steps["top-level synthetic hist file"] = (T / f"events/synthetic/{name}/hist").read_text().count("{")
        # spans path: the synthetic event recorded into A's buffer
        steps["A: enable synthetic"] = write(a / f"events/synthetic/{name}/enable", "1")
        (T / "trace").write_text("")
        loop(100)
        steps["A: enable synthetic"] = write(a / f"events/synthetic/{name}/enable", "0")
        steps["recorded in A's buffer (lines)"] = (a / "trace").read_text().count(f"{name}:")
        steps["recorded in top-level buffer (lines)"] = (T / "trace").read_text().count(f"{name}:")
        steps["recorded in B's buffer (lines)"] = (b / "trace").read_text().count(f"{name}:")
        # wrong orders first: what the kernel says
        steps["remove synthetic while triggers exist"] = write(T / "synthetic_events", "!" + name)
        steps["rmdir A with triggers"] = rmdir(a) if cycle == 2 else "not tried in cycle 1"
        if cycle == 2 and not a.exists():
            left = events(b / f"events/synthetic/{name}/hist")
            steps["after rmdir A: B's synthetic hist still (events, rows)"] = left
            steps["after rmdir A: remove synthetic while B's hist exists"] = write(T / "synthetic_events", "!" + name)
        else:
            for path, line in plan.removal()[:-1]:
                steps[f"A: remove {line[:40]}..."] = write(a / path, line)
        steps["B: remove synthetic hist"] = write(b / synth_hist.path, synth_hist.removal)
        steps["remove synthetic"] = write(T / "synthetic_events", "!" + name)
        steps["synthetic still listed"] = name in (T / "synthetic_events").read_text()
        steps["error_log (top, A)"] = error_log() + error_log(a if a.exists() else None)
        r[f"cycle {cycle}"] = steps
    if a.exists():
        r["rmdir A at the end"] = rmdir(a)
    r["rmdir B at the end"] = rmdir(b)
    r["remove probes"] = [write(T / "kprobe_events", f"-:{g}/ppid"), write(T / "kprobe_events", f"-:{g}/ppid_ret")]
    return r


def pidtable() -> dict[str, object]:
    """The entry trigger's table is keyed by common_pid and never shrinks: what happens once it is full.

    latency_plan's entry trigger with size=128 (the kernel's smallest; the default is 2048), then 300 short
    processes making 10 calls each.
    """
    g, inst = "kpe_pid", T / "instances" / "kpe_pid"
    must(T / "kprobe_events", f"p:{g}/ppid __x64_sys_getppid")
    must(T / "kprobe_events", f"r:{g}/ppid_ret __x64_sys_getppid")
    inst.mkdir()
    plan = triggers.latency_plan(g, "ppid", "ppid_ret", "ppid")
    entry = triggers.Trigger(plan.triggers[0].event, plan.triggers[0].line.replace(":clock=", ":size=128:clock="))
    trigs = (entry, *plan.triggers[1:])
    for s in plan.synthetics:
        must(T / triggers.SYNTHETIC_EVENTS, s.line)
    for t in trigs:
        must(inst / t.path, t.line)
    out = subprocess.run([str(LAB_IN / "kagg_loop"), "10", "300"], capture_output=True, text=True, check=True)
    made = int(out.stdout.split()[0])
    e = hist.parse((inst / f"events/{g}/ppid/hist").read_text())[0]
    x = hist.parse((inst / f"events/{g}/ppid_ret/hist").read_text())[0]
    syn = hist.parse((inst / plan.triggers[2].path.replace("trigger", "hist")).read_text())[0]
    r = {"entry trigger": entry.line, "calls made (300 processes x 10)": made,
         "entry table: hits, dropped, rows": [e.hits, e.dropped, len(e.rows)],
         "exit table: hits, dropped, rows": [x.hits, x.dropped, len(x.rows)],
         "latency samples": syn.events}
    for path, line in ((t.path, t.removal) for t in reversed(trigs)):
        must(inst / path, line)
    for sy in plan.synthetics:
        must(T / triggers.SYNTHETIC_EVENTS, sy.removal)
    inst.rmdir()
    must(T / "kprobe_events", f"-:{g}/ppid")
    must(T / "kprobe_events", f"-:{g}/ppid_ret")
    return r


def rmdir(p: Path) -> str:
    try:
        p.rmdir()
        return "ok"
    except OSError as e:
        return os.strerror(e.errno or 0)


def scrape(keys: int = 10_000, reads: int = 201) -> dict[str, object]:
    """A hist of `keys` distinct keys (sys_enter_getpgid keyed by its pid argument): read and parse cost."""
    inst = T / "instances" / "kpe_scrape"
    inst.mkdir()
    line = f"hist:keys=pid:vals=hitcount:sort=hitcount:size={1 << (keys * 2 - 1).bit_length()}"
    path = inst / "events/syscalls/sys_enter_getpgid"
    must(path / "trigger", line)
    for pid in range(100_000, 100_000 + keys):
        try:
            os.getpgid(pid)
        except OSError:
            pass
    text = (path / "hist").read_text()
    plain = Path("/tmp/plain.txt")
    plain.write_text("".join(f"{i:0{max(1, len(text) // (keys + 10) - 1)}d}\n" for i in range(keys)))
    read_ns, parse_ns, both_ns, plain_ns = [], [], [], []
    for _ in range(reads):
        t0 = time.perf_counter_ns()
        got = (path / "hist").read_text()
        t1 = time.perf_counter_ns()
        tables = hist.parse(got)
        t2 = time.perf_counter_ns()
        plain.read_text()
        t3 = time.perf_counter_ns()
        read_ns.append(t1 - t0)
        parse_ns.append(t2 - t1)
        both_ns.append(t2 - t0)
        plain_ns.append(t3 - t2)
    must(path / "trigger", "!" + line)
    inst.rmdir()
    (OUT / "hist-10k.txt").write_text(text)

    def q(xs: list[int]) -> dict[str, float]:
        xs = sorted(xs)
        return {"p50 ms": xs[len(xs) // 2] / 1e6, "p99 ms": xs[int(len(xs) * 0.99)] / 1e6, "max ms": xs[-1] / 1e6}

    return {
        "keys in the table": len(tables[0].rows), "events": tables[0].events, "hist bytes": len(text),
        "plain file bytes": plain.stat().st_size, "reads": reads,
        "read": q(read_ns), "parse": q(parse_ns), "read+parse": q(both_ns), "plain 10k-line file read": q(plain_ns),
        "read+parse / plain read (medians)": statistics.median(both_ns) / statistics.median(plain_ns),
    }


def main() -> int:
    wanted = sys.argv[1].split(",") if len(sys.argv) > 1 else ["recursion", "instances", "scrape"]
    for exe in ("kagg_loop", "kagg_rec"):
        os.chmod(LAB_IN / exe, 0o755)
    found: dict[str, object] = {"kernel": os.uname().release}
    for what in wanted:
        try:
            found[what] = {"recursion": recursion, "instances": instances, "scrape": scrape,
                           "pidtable": pidtable}[what]()
        except Exception as e:  # one finding failing must not hide the others
            found[what] = {"failed": repr(e), "error_log": error_log()}
        print(json.dumps({what: found[what]}, indent=1), flush=True)
        (OUT / "findings.json").write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
