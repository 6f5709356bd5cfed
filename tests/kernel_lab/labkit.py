"""In-guest helper of the kernel-lab tests (stdlib only: it starts fast under TCG).

tests/lab/test_kernel_lab.py passes this file into the guest with each boot; scenario scripts call it:

    python3 labkit.py ready PORT PID            wait until the agent answers /healthz (fails if PID exits)
    python3 labkit.py wait PORT WANT METRIC [LABEL=VALUE ...] [-- WANT METRIC [LABEL=VALUE ...] ...]
                                                scrape until the sum of matching samples reaches WANT,
                                                for each condition (then once more after a grace period,
                                                so anything beyond WANT shows too); print that last scrape
    python3 labkit.py scrape PORT               print /metrics
    python3 labkit.py defs GROUP                print GROUP's lines of kprobe_events and uprobe_events
    python3 labkit.py snap GROUP NAME           GROUP's definitions into NAME.defs, the instances into
                                                NAME.instances
    python3 labkit.py hang                      every process: state, wait channel, command line, and the
                                                kernel stack of those asleep (what a stuck scenario waits on)
    python3 labkit.py calibrate                 print how slow this guest runs now, in percent of an
                                                unloaded host's speed (at least 100): limits scale by it
    python3 labkit.py checks NAME...            `kprobe-exporter check --config NAME.yaml` for each NAME in
                                                this one process (Python's start is most of a check's
                                                time under TCG): NAME.out, NAME.err, NAME.rc

Every limit here is a base for an unloaded host times $LAB_SLOW_PCT / 100 (from `calibrate`).
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.error
import urllib.request

TRACEFS = "/sys/kernel/tracing"
# A fixed CPU-bound loop and its best time in this guest on an unloaded 2-core host of this kind.
CALIBRATION_LOOPS = 200_000
CALIBRATION_NOMINAL_S = 0.10
MAX_SLOW_PCT = 1200  # past this a guest counts as stuck, not slow: limits stop growing
SAMPLE_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def slow() -> float:
    """The factor every limit is scaled by (LAB_SLOW_PCT, set by the boot's calibration)."""
    return max(100, int(os.environ.get("LAB_SLOW_PCT", "100"))) / 100


def calibrate() -> int:
    """The guest's slowness now, in percent: the slowest of three timings of a fixed loop (load moves
    between them; a limit too generous costs time only when something hangs)."""
    took = []
    for _ in range(3):
        t0 = time.perf_counter()
        x = 0
        for i in range(CALIBRATION_LOOPS):
            x += i * i
        took.append(time.perf_counter() - t0)
    print(f"labkit calibrate: {', '.join(f'{t:.3f}' for t in took)} s (nominal {CALIBRATION_NOMINAL_S} s)",
          file=sys.stderr)
    return max(100, min(MAX_SLOW_PCT, round(100 * max(took) / CALIBRATION_NOMINAL_S)))


def checks(names: list[str]) -> None:
    """Each `check` as the console script runs it (cli.main), its stdout and stderr into files by fd."""
    from kprobe_exporter.cli import main as cli_main

    for name in names:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(f"{name}.out", "wb") as out, open(f"{name}.err", "wb") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                rc = cli_main(["check", "--config", f"{os.environ['LAB_IN']}/{name}.yaml"])
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
        with open(f"{name}.rc", "w") as f:
            f.write(f"{rc}\n")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10 * slow()) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def total(text: str, metric: str, labels: dict[str, str]) -> float | None:
    found = None
    for line in text.splitlines():
        m = SAMPLE_RE.match(line)
        if not m or m.group(1) != metric:
            continue
        have = {k: unescape(v) for k, v in LABEL_RE.findall(m.group(2) or "")}
        if all(have.get(k) == v for k, v in labels.items()):
            found = (found or 0.0) + float(m.group(3))
    return found


def ready(port: int, pid: int, timeout: float = 60) -> None:
    timeout *= slow()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            zombie = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except (ProcessLookupError, FileNotFoundError):
            zombie = True
        if zombie:
            sys.exit(f"labkit: the agent (pid {pid}) exited before it was ready")
        try:
            if get(port, "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"labkit: the agent on port {port} was not ready within {timeout} s")


Condition = tuple[float, str, dict[str, str]]


def wait(port: int, conditions: list[Condition], timeout: float = 60, grace: float = 0.5) -> None:
    deadline = time.monotonic() + timeout * slow()
    text = ""
    while time.monotonic() < deadline:
        text = get(port, "/metrics")[1]
        if all((total(text, m, labels) or 0) >= want for want, m, labels in conditions):
            time.sleep(grace * slow())  # anything beyond `want` (a bug) gets time to show
            text = get(port, "/metrics")[1]
            break
        time.sleep(0.2)
    for want, metric, labels in conditions:
        print(f"labkit: {metric}{labels} = {total(text, metric, labels)} (waited for {want})", file=sys.stderr)
    sys.stdout.write(text)  # the last scrape: a python start less than a `scrape` after it


def conditions(args: list[str]) -> list[Condition]:
    out: list[Condition] = []
    while args:
        group, args = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args, [])
        out.append((float(group[0]), group[1], dict(a.split("=", 1) for a in group[2:])))
    return out


def defs(group: str) -> str:
    out = []
    for name in ("kprobe_events", "uprobe_events"):
        try:
            with open(f"{TRACEFS}/{name}") as f:
                out += [ln for ln in f.read().splitlines() if re.match(rf"^[pr]\d*:{re.escape(group)}/", ln)]
        except FileNotFoundError:
            pass
    return "".join(ln + "\n" for ln in out)


def hang() -> str:
    def read(path: str) -> str:
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    out = []
    for pid in sorted((int(p) for p in os.listdir("/proc") if p.isdigit()), reverse=True):
        stat = read(f"/proc/{pid}/stat")
        if not stat:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        state, ppid = stat[stat.rfind(")") + 2:].split()[:2]
        cmd = " ".join(read(f"/proc/{pid}/cmdline").replace("\0", " ").split()) or f"[{comm}]"
        if cmd.startswith("[") or int(ppid) == 2:
            continue  # kernel threads
        out.append(f"{pid} ppid {ppid} {state} wchan={read(f'/proc/{pid}/wchan') or '-'} {cmd[:150]}")
        if state in "DS":
            out += [f"    {ln}" for ln in read(f"/proc/{pid}/stack").splitlines()[:12]]
    return "".join(ln + "\n" for ln in out)


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "ready":
        ready(int(args[0]), int(args[1]))
    elif cmd == "wait":
        wait(int(args[0]), conditions(args[1:]))
    elif cmd == "scrape":
        status, body = get(int(args[0]), "/metrics")
        sys.stdout.write(body)
        if status != 200:
            sys.exit(f"labkit: /metrics answered {status}")
    elif cmd == "defs":
        sys.stdout.write(defs(args[0]))
    elif cmd == "snap":
        with open(f"{args[1]}.defs", "w") as f:
            f.write(defs(args[0]))
        with open(f"{args[1]}.instances", "w") as f:
            f.write("".join(name + "\n" for name in sorted(os.listdir(f"{TRACEFS}/instances"))))
    elif cmd == "hang":
        sys.stdout.write(hang())
    elif cmd == "calibrate":
        print(calibrate())
    elif cmd == "checks":
        checks(args)
    else:
        sys.exit(f"labkit: unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
