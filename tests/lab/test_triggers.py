"""In-kernel aggregation on a real kernel (Debian's 6.1 under qemu): the trigger lines of
kprobe_exporter.triggers installed in an instance count every call exactly, at the workload's full rate
on every guest CPU, and their removal leaves nothing behind.

The workload is tests/progs/kpe_opener.c (static): one process per guest CPU, each opening a path N
times as fast as it can; N is counted by the workload itself (its own report of opens done).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kernel_lab.guest import GuestResult, require_guest, run_in_guest
from kprobe_exporter.hist import log2_upper_bound

HERE = Path(__file__).resolve().parents[1]
OPENER_SRC = HERE / "progs" / "kpe_opener.c"
N = 20_000  # opens per process; two processes (the guest has two CPUs)

# Runs in the guest with the project's package on PYTHONPATH: installs the plan, runs the workload,
# reads the hist files with kprobe_exporter.hist, removes everything, and reports as JSON.
GUEST_PY = r'''
import json, os, subprocess, sys
from pathlib import Path
from kprobe_exporter import hist, triggers

T = Path("/sys/kernel/tracing"); G = "kpe_kagg"; I = T / "instances" / G
def write(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)

N = int(sys.argv[1]); out = {}
os.chmod(os.environ["LAB_IN"] + "/kpe_opener", 0o755)
I.mkdir()
write(T / "kprobe_events", f"p:{G}/open do_sys_openat2\n")
write(T / "kprobe_events", f"r:{G}/open_ret do_sys_openat2 ret=$retval:s64\n")
where = 'comm == "kpe_opener"'
plan = triggers.latency_plan(G, "open", "open_ret", "open", where=where)
counts = (triggers.count_trigger(f"{G}/open", where=where), triggers.count_trigger(f"{G}/open_ret", ("ret",), where))
for s in plan.synthetics:
    write(T / triggers.SYNTHETIC_EVENTS, s.line + "\n")
for t in (*plan.triggers, *counts):
    try:
        write(I / t.path, t.line + "\n")
    except OSError as e:
        out.setdefault("errors", []).append([t.line, str(e), (I / "error_log").read_text()])
procs = [subprocess.Popen(["taskset", "-c", str(c), os.environ["LAB_IN"] + "/kpe_opener", "/proc/version", str(N)],
                          stdout=subprocess.PIPE, text=True) for c in range(os.cpu_count() or 1)]
out["workload"] = [p.communicate()[0] for p in procs]
out["hist"] = {}
for t in (*plan.triggers, *counts):
    ev = t.event
    text = (I / "events" / ev / "hist").read_text()
    out["hist"][ev] = [{"trigger": x.trigger, "hits": x.hits, "dropped": x.dropped,
                        "rows": [[list(r.keys), r.values] for r in x.rows]} for x in hist.parse(text)]
out["listed"] = {t.event: (I / t.path).read_text() for t in (*plan.triggers, *counts)}
for t in reversed(counts):
    write(I / t.path, t.removal + "\n")
undo = plan.removal()
for path, line in undo[: len(plan.triggers)]:  # the triggers, newest first
    write(I / path, line + "\n")
out["after_triggers"] = {t.event: (I / t.path).read_text() for t in (*plan.triggers, *counts)}
for path, line in undo[len(plan.triggers) :]:  # then the synthetic events
    write(T / path, line + "\n")
I.rmdir()
write(T / "kprobe_events", f"-:{G}/open\n-:{G}/open_ret\n")
out["left"] = {"kprobe_events": (T / "kprobe_events").read_text(),
               "synthetic_events": (T / "synthetic_events").read_text(), "instance": I.exists()}
out["cpus"] = os.cpu_count()
Path(os.environ["LAB_OUT"], "result.json").write_text(json.dumps(out))
'''


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[GuestResult, dict]:  # type: ignore[type-arg]
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the kernel-lab workload (tests/setup.sh installs it)", pytrace=False)
    opener = tmp_path_factory.mktemp("lab") / "kpe_opener"
    subprocess.run(["gcc", "-O1", "-static", "-o", str(opener), str(OPENER_SRC)], check=True)
    require_guest()
    files = {"kpe_opener": opener.read_bytes(), "kagg.py": GUEST_PY.encode()}
    r = run_in_guest(f'python3 "$LAB_IN/kagg.py" {N}', files, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:]
    return r, json.loads(r.files["result.json"])


def hist_of(res: dict, event: str, index: int = 0) -> dict:  # type: ignore[type-arg]
    return res["hist"][event][index]


def test_every_trigger_line_is_accepted(result: tuple[GuestResult, dict]) -> None:  # type: ignore[type-arg]
    _, res = result
    assert "errors" not in res, res.get("errors")


def test_counts_and_latency_samples_are_exact_at_full_rate(result: tuple[GuestResult, dict]) -> None:  # type: ignore[type-arg]
    _, res = result
    done = [int(w.split()[1]) for w in res["workload"]]
    assert all("0 failed" in w for w in res["workload"]), res["workload"]
    total = sum(done)
    assert total == N * res["cpus"]
    entry = hist_of(res, "kpe_kagg/open")  # [0]: the plan's timestamp trigger; [1]: the count
    assert entry["hits"] == total and hist_of(res, "kpe_kagg/open", 1)["hits"] == total
    ret_counts = hist_of(res, "kpe_kagg/open_ret", 1)
    assert ret_counts["hits"] == total and ret_counts["dropped"] == 0
    assert {tuple(k): v["hitcount"] for k, v in ret_counts["rows"]} == {("3",): total}  # every open gave fd 3
    lat = hist_of(res, "synthetic/kpe_kagg_open_lat")
    assert lat["dropped"] == 0
    assert sum(v["hitcount"] for _, v in lat["rows"]) == total  # one latency sample per call, none lost
    for key, v in lat["rows"]:  # each ~ 2^N row holds samples in (2^(N-1), 2^N]: so must their mean
        upper = log2_upper_bound(key[0])
        assert upper // 2 < v["lat"] / v["hitcount"] <= upper, (key, v)  # also: no 0 ns under CPU clock skew


def test_removal_leaves_nothing(result: tuple[GuestResult, dict]) -> None:  # type: ignore[type-arg]
    _, res = result
    for event, listed in res["after_triggers"].items():
        assert not [ln for ln in listed.splitlines() if ln and not ln.startswith("#")], (event, listed)
    assert res["left"] == {"kprobe_events": "", "synthetic_events": "", "instance": False}
