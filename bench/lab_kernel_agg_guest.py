"""The guest side of bench/lab_kernel_agg.py: every mode on the same getppid kprobe+kretprobe pair, one boot.

Run by lab_kernel_agg.py inside the bench guest (bench_guest.py: the lab guest plus bpftrace) as
`python3 lab_kernel_agg_guest.py N ROUNDS MODES`; writes $LAB_OUT/bench.json, one row per (round, mode).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from kprobe_exporter import hist, triggers

T = Path("/sys/kernel/tracing")
G = "kpe_bench"  # the group and instance of the trigger-driven modes (kprobe_exporter.triggers lines)
INST = T / "instances" / G
FUNC = "__x64_sys_getppid"
LAB_IN = Path(os.environ.get("LAB_IN", "."))
LOOP = str(LAB_IN / "kagg_loop")
OUT = Path(os.environ.get("LAB_OUT", "/tmp"))
HZ = os.sysconf("SC_CLK_TCK")
EXIT_WAIT_S = 120  # bpftrace's exit after SIGINT (its map's printing): seconds under TCG at most
# An agent with `aggregation:` (aggmode.py) defaults to auto, which would put the stream modes in the kernel.
HAS_AGGREGATION = importlib.util.find_spec("kprobe_exporter.aggmode") is not None
BPFTRACE = (
    f"kprobe:{FUNC} {{ @s[tid] = nsecs; }} "
    f"kretprobe:{FUNC} /@s[tid]/ {{ @ = hist(nsecs - @s[tid]); delete(@s[tid]); }}"
)


def write(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def cpu_ns(pid: int) -> int:
    """utime+stime of a process (clock ticks) in ns."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // HZ


def run_loop(n: int) -> tuple[int, float, float]:
    out = subprocess.run([LOOP, str(n)], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


class Mode:
    """A way of tracing the pair: install, measure one loop, report what it counted, remove."""

    tool_pid: int | None = None
    end_cpu_ns: int | None = None  # the tool's CPU at its end, when counted() ended it

    def on(self) -> None: ...

    def counted(self) -> dict[str, int]:
        return {}

    def off(self) -> None: ...


class NoProbe(Mode):
    pass


class Record(Mode):
    """The pair enabled in an instance whose buffer nobody reads: the loop's share of streaming's cost."""

    def on(self) -> None:
        for e in ("ppid", "ppid_ret"):
            write(INST / "events" / G / e / "enable", "1")

    def off(self) -> None:
        for e in ("ppid", "ppid_ret"):
            write(INST / "events" / G / e / "enable", "0")


class Triggers(Mode):
    """Hist triggers and synthetic events written straight from kprobe_exporter.triggers (no agent).

    TODO(kagg): `aggregation: kernel` reached main after this was written: mode `k_agent` below runs the agent
    with it (Agent(..., "kernel")); once it has been run and agrees, point the k_* layouts the agent uses at it.
    """

    def __init__(self, synthetics: tuple[triggers.Synthetic, ...], trigs: tuple[triggers.Trigger, ...],
                 count_from: dict[str, str]) -> None:
        self.plan = triggers.KernelPlan(synthetics, trigs)
        self.count_from = count_from  # what -> the event whose hist's first table counts it
        self.scrape_ns = 0

    def on(self) -> None:
        for s in self.plan.synthetics:
            write(T / triggers.SYNTHETIC_EVENTS, s.line)
        for t in self.plan.triggers:
            write(INST / t.path, t.line)

    def counted(self) -> dict[str, int]:
        t0 = time.process_time_ns()
        tables = {ev: hist.parse((INST / "events" / ev / "hist").read_text()) for ev in set(self.count_from.values())}
        self.scrape_ns = time.process_time_ns() - t0
        got = {what: tables[ev][0].events for what, ev in self.count_from.items()}
        got["dropped"] = sum(t.dropped for ts in tables.values() for t in ts)
        return got

    def off(self) -> None:
        for path, line in self.plan.removal():
            write((T if path == triggers.SYNTHETIC_EVENTS else INST) / path, line)


def pid_latency() -> tuple[tuple[triggers.Synthetic, ...], tuple[triggers.Trigger, ...]]:
    """latency_plan with the synthetic event's second field, `int pid`, as the agent wrote it until 1 Dec 2026
    (it now carries `pid` only for spans)."""
    plan = triggers.latency_plan(G, "ppid", "ppid_ret", "pidlat")
    synth = triggers.Synthetic(plan.synthetics[0].name, "u64 lat; int pid")
    on_exit = plan.triggers[1]
    on_exit = triggers.Trigger(on_exit.event, on_exit.line.replace("$pidlat_lat)", "$pidlat_lat,common_pid)"))
    return (synth,), (plan.triggers[0], on_exit, plan.triggers[2])


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


class Agent(Mode):
    """The agent itself (kprobe-exporter run) streaming the pair with a reader; CPU from /proc/PID/stat."""

    def __init__(self, reader: str, port: int, aggregation: str = "stream") -> None:
        if aggregation != "stream" and not HAS_AGGREGATION:
            raise RuntimeError("this agent has no `aggregation:` (kernel aggregation not merged)")
        self.reader, self.port, self.aggregation = reader, port, aggregation
        self.cfg = Path(f"/tmp/agent-{reader}-{aggregation}.yaml")
        self.cfg.write_text(
            f"instance: kpe_{reader}_{aggregation}\nreader: {reader}\nlisten_address: 127.0.0.1:{port}\n"
            + (f"aggregation: {aggregation}\n" if HAS_AGGREGATION else "")
            + f"probes:\n  - name: ppid\n    kprobe: {FUNC}\n    latency: true\n"
        )

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=60) as r:
            return r.read().decode()

    def on(self) -> None:
        log = open(OUT / f"agent-{self.reader}-{self.aggregation}.log", "ab")  # the agent's: closed when it exits
        self.proc = subprocess.Popen(["kprobe-exporter", "--config", str(self.cfg)], stdout=log, stderr=log)
        self.tool_pid = self.proc.pid
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent ({self.reader}) exited {self.proc.returncode}")
            print(f"waiting for the agent ({self.reader}) since {time.monotonic() - deadline + 600:.0f} s", flush=True)
            try:
                if metric(self.scrape(), "kprobe_exporter_probe_installed", probe="ppid") == 1:
                    return
            except OSError:
                pass
            time.sleep(5)
        raise RuntimeError(f"agent ({self.reader}) not ready in 600 s")

    def counted(self) -> dict[str, int]:
        """Scrape until the counts stop moving (the reader has drained what the kernel kept)."""
        last: tuple[float, ...] = ()
        for _ in range(600):
            text = self.scrape()
            now = (
                metric(text, "kprobe_events_total", probe="ppid"),
                metric(text, "kprobe_latency_seconds_count", probe="ppid"),
                metric(text, "kprobe_exporter_lost_events_total"),
                metric(text, "kprobe_exporter_probe_misses_total"),  # kprobe_profile: e.g. a kretprobe's maxactive
            )
            if now == last:
                break
            last = now
            time.sleep(2)
        return dict(zip(("entries", "latency", "lost", "missed"), map(int, last), strict=True))

    def off(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=300)


class Bpftrace(Mode):
    """bpftrace's `@ = hist(nsecs - @s[tid])` on the same function (its own perf kprobes)."""

    broken = ""  # set once it failed to attach: the later rounds skip it rather than wait again

    def on(self) -> None:
        if Bpftrace.broken:
            raise RuntimeError(f"skipped: {Bpftrace.broken}")
        # Its "Attaching 2 probes..." sits in a pipe buffer: attached is when debugfs lists two more kprobes on
        # the function. The list names the address's symbol: on 6.1 `__do_sys_getppid`, not `__x64_sys_getppid`
        # (counting FUNC there waited 600 s for nothing), and the bench's own tracefs pair is listed too.
        listing = Path("/sys/kernel/debug/kprobes/list")
        before = listing.read_text().count("getppid")
        self.proc = subprocess.Popen(["bpftrace", "-e", BPFTRACE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.tool_pid = self.proc.pid
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.proc.poll() is None:
            if listing.read_text().count("getppid") >= before + 2:
                time.sleep(1)
                if self.proc.poll() is None:
                    return
                break
            time.sleep(0.5)
        self.proc.kill()
        out, _ = self.proc.communicate()
        Bpftrace.broken = f"bpftrace did not attach in 600 s, or exited (rc {self.proc.returncode}): {out[-2000:]}"
        raise RuntimeError(Bpftrace.broken)

    def counted(self) -> dict[str, int]:
        """SIGINT: bpftrace prints its map and exits. Its CPU to the end (the map's printing too) is the exited
        child's rusage, as /proc/PID/stat is gone once it is reaped."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.stdout is not None
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        reader.join(EXIT_WAIT_S)  # to EOF: bpftrace has printed all and is exiting
        if reader.is_alive():  # seen once in a run of 5 on 6.1 under TCG: bpftrace never left after SIGINT
            pid = self.proc.pid
            state = {f: Path(f"/proc/{pid}/{f}").read_text().strip() for f in ("wchan", "stack")}
            tasks = Path(f"/proc/{pid}/task").iterdir()
            state["task wchans"] = " ".join(t.joinpath("wchan").read_text() for t in tasks)
            self.proc.kill()
            reader.join(EXIT_WAIT_S)
            raise RuntimeError(f"bpftrace still running {EXIT_WAIT_S} s after SIGINT, killed: {state}")
        out = got[0]
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.end_cpu_ns = int((usage.ru_utime + usage.ru_stime) * 1e9)
        Path(os.environ.get("LAB_OUT", "/tmp"), "bpftrace.txt").write_text(out)
        rows = re.findall(r"^\[[^)\]\n]*[\])] +(\d+) ", out, re.M)  # `[2K, 4K)   407 |@@@|`, a line each
        return {"latency": sum(map(int, rows))}

    def off(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def modes() -> dict[str, Callable[[], Mode]]:
    entry, exit_ = f"{G}/ppid", f"{G}/ppid_ret"
    lat = triggers.latency_plan(G, "ppid", "ppid_ret", "ppid")
    synth_ev = lat.triggers[2].event
    with_pid = pid_latency()
    return {
        "none": NoProbe,
        "record": Record,
        "text": lambda: Agent("text", 10201),
        "raw": lambda: Agent("raw", 10202),
        "k_count_entry": lambda: Triggers((), (triggers.count_trigger(entry),), {"entries": entry}),
        "k_count_exit": lambda: Triggers((), (triggers.count_trigger(exit_),), {"exits": exit_}),
        "k_count_pid": lambda: Triggers((), (triggers.count_trigger(entry, ("common_pid",)),), {"entries": entry}),
        "k_lat": lambda: Triggers(lat.synthetics, lat.triggers, {"latency": synth_ev}),
        "k_lat_count": lambda: Triggers(lat.synthetics, (triggers.count_trigger(entry), *lat.triggers),
                                        {"entries": entry, "latency": synth_ev}),
        "k_lat_pid": lambda: Triggers(with_pid[0], with_pid[1], {"latency": with_pid[1][2].event}),
        "bpftrace": Bpftrace,
        # The agent with `aggregation: kernel` (kernelagg.py, merged into main after this bench was written):
        # the kernel modes above through the agent. Not in lab_kernel_agg.MODES' default until run once.
        "k_agent": lambda: Agent("text", 10203, "kernel"),
    }


def measure(name: str, make: Callable[[], Mode], n: int) -> dict[str, object]:
    mode = make()
    mode.on()
    try:
        tool0 = cpu_ns(mode.tool_pid) if mode.tool_pid else 0
        calls, ns, loop_cpu = run_loop(n)
        got = mode.counted()
        if mode.tool_pid:  # a process: its CPU from now to its end, or to now if it runs on
            tool = (mode.end_cpu_ns if mode.end_cpu_ns is not None else cpu_ns(mode.tool_pid)) - tool0
        else:  # trigger modes: the one read of their hist files
            tool = getattr(mode, "scrape_ns", 0)
    finally:
        mode.off()
    return {"mode": name, "calls": calls, "ns": ns, "loop_cpu_ns": loop_cpu, "tool_cpu_ns": tool / calls,
            "tool_cpu_total_ns": tool, "counted": got}


def main() -> int:
    n, rounds, wanted = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    os.chmod(LOOP, 0o755)
    if not Path("/sys/kernel/debug/kprobes").exists():
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=True)
    INST.mkdir()
    write(T / "kprobe_events", f"p:{G}/ppid {FUNC}")
    write(T / "kprobe_events", f"r:{G}/ppid_ret {FUNC}")
    table = modes()
    run_loop(n)  # warm-up: the first run pays for paging the loop in
    out: list[dict[str, object]] = []
    for r in range(rounds):
        order = wanted[r % len(wanted):] + wanted[: r % len(wanted)]
        for name in order:
            t0 = time.monotonic()
            try:
                row = measure(name, table[name], n)
            except Exception as e:  # one mode failing must not lose the others' figures
                row = {"mode": name, "failed": f"{e!r} {getattr(e, 'filename', '') or ''}".strip()}
            row["round"] = r
            out.append(row)
            print(f"round {r} {name}: {row} ({time.monotonic() - t0:.0f} s)", flush=True)
            Path(os.environ["LAB_OUT"], "bench.json").write_text(json.dumps(out))
    INST.rmdir()
    write(T / "kprobe_events", f"-:{G}/ppid")
    write(T / "kprobe_events", f"-:{G}/ppid_ret")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
