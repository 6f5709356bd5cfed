"""Regenerate tests/fixtures/raw/: real ring-buffer pages and the kernel's text of the same events.

    python3 tests/make_raw_fixtures.py local   # this kernel (6.18): uprobes and syscall tracepoints
    python3 tests/make_raw_fixtures.py lab     # Debian's 6.1 in the kernel lab: kprobes and kretprobes

Root only. Each scenario is one directory written by tests/raw_capture.py (see there for the files).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURES = HERE / "fixtures" / "raw"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

G = "kpe_rawcap"


def local() -> None:
    from kprobe_exporter import symbols
    from raw_capture import capture

    work = Path(tempfile.mkdtemp(prefix="kpe-rawcap-"))
    exe = work / "fxgen"
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(HERE / "progs" / "fxgen.c")], check=True)
    off = {f: symbols.resolve(str(exe), f) for f in ("open_path", "compute", "sleep_us")}

    def up(letter: str, name: str, fn: str, args: str = "") -> list[str]:
        return ["uprobe_events", f"{letter}:{G}/{name} {exe}:{off[fn]:#x} {args}".strip()]

    long_path = "/tmp/" + "long-path-" * 20 + "x"
    base = FIXTURES / "linux-6.18"
    scenarios: dict[str, dict[str, object]] = {
        # uprobe pairs with string, int, hex, array and char args; the syscall tracepoint pair; 3 threads
        "uprobes-syscalls": {
            "definitions": [
                up("p", "open_path", "open_path", "path=+0(%di):string flags=%si:x32 arr=+0(%di):u8[4] c=+0(%di):char"),
                up("r", "open_path_ret", "open_path", "ret=$retval:s32"),
                up("p", "compute", "compute", "a=%di:s32 b=%si:u32 big=%si:u64 sb=%di:s8 hx=%si:x16"),
                up("r", "compute_ret", "compute", "ret=$retval"),
            ],
            "events": [f"{G}/open_path", f"{G}/open_path_ret", f"{G}/compute", f"{G}/compute_ret",
                       "syscalls/sys_enter_openat", "syscalls/sys_exit_openat"],
            "buffer_size_kb": 1024,
            "workload": [[str(exe), "open", "10"], [str(exe), "compute", "10"], [str(exe), "threads", "5", "3"],
                         [str(exe), "open", "2", "/nonexistent/file"]],
        },
        # 200 ms between a sleep_us entry and its return on one CPU: a delta beyond 27 bits (134 ms)
        "time-extend": {
            "definitions": [up("p", "sleep_us", "sleep_us", "us=%di:s64"), up("r", "sleep_us_ret", "sleep_us")],
            "events": [f"{G}/sleep_us", f"{G}/sleep_us_ret", "syscalls/sys_enter_clock_nanosleep",
                       "syscalls/sys_exit_clock_nanosleep"],
            "cpu": 0,
            "workload": [[str(exe), "sleep", "3", "200000"]],
        },
        # a small overwriting buffer flooded from one CPU: the first page read says events were lost
        "missed-events": {
            "definitions": [up("p", "compute", "compute", "a=%di:s32 b=%si:u32"),
                            up("r", "compute_ret", "compute", "ret=$retval:s64")],
            "events": [f"{G}/compute", f"{G}/compute_ret"],
            "buffer_size_kb": 8,
            "cpu": 1,
            "workload": [[str(exe), "compute", "3000"]],
        },
        # 8 KiB sub-buffers, and records too long for type_len (strings over 112 bytes: type_len 0)
        "subbuf8k-long-records": {
            "definitions": [up("p", "open_path", "open_path", "path=+0(%di):string flags=%si:x32"),
                            up("r", "open_path_ret", "open_path", "ret=$retval:s32")],
            "events": [f"{G}/open_path", f"{G}/open_path_ret"],
            "subbuf_kb": 8,
            "cpu": 0,
            "workload": [[str(exe), "open", "60", long_path]],
        },
    }
    for name, sc in scenarios.items():
        sc["instance"] = G
        out = base / name
        shutil.rmtree(out, ignore_errors=True)
        capture(out, sc)
        print(f"{out}: {sum(p.stat().st_size for p in out.glob('cpu*.raw'))} bytes of pages")
    shutil.rmtree(work, ignore_errors=True)


LAB_SCRIPT = r"""
set -e
for sc in $LAB_IN/scenarios/*.json; do
    n=$(basename $sc .json)
    python3 $LAB_IN/raw_capture.py $LAB_OUT/$n $sc
done
ls -R $LAB_OUT | head -50
"""


def lab() -> None:
    from kernel_lab.build_guest import ensure_guest
    from kernel_lab.guest import run_in_guest

    ensure_guest()
    opener = ["python3", "-c", "import sys\nfor i in range(int(sys.argv[1])): open(sys.argv[2]).close()", "12",
              "/etc/hostname"]
    failer = ["python3", "-c", "import os\nfor i in range(3):\n  try: open('/nonexistent/x')\n  except OSError: pass"]
    scenarios: dict[str, dict[str, object]] = {
        "kprobes-syscalls": {
            "definitions": [
                ["kprobe_events", f"p:{G}/open do_sys_openat2 dfd=$arg1:s32 path=+0($arg2):ustring how=$arg3:x64"],
                ["kprobe_events", f"r:{G}/open_ret do_sys_openat2 ret=$retval:s32"],
                ["kprobe_events", f"r:{G}/getname_ret getname +0(+0($retval)):string"],
                ["kprobe_events", f"p:{G}/getname getname"],
            ],
            "events": [f"{G}/open", f"{G}/open_ret", f"{G}/getname_ret", f"{G}/getname",
                       "syscalls/sys_enter_openat", "syscalls/sys_exit_openat"],
            "buffer_size_kb": 1024,
            "workload": [opener, failer],
        },
        "time-extend": {
            "definitions": [["kprobe_events", f"p:{G}/nanosleep hrtimer_nanosleep"],
                            ["kprobe_events", f"r:{G}/nanosleep_ret hrtimer_nanosleep ret=$retval:s64"]],
            "events": [f"{G}/nanosleep", f"{G}/nanosleep_ret"],
            "cpu": 0,
            "workload": [["python3", "-c", "import time\nfor i in range(3): time.sleep(0.2)"]],
        },
        "missed-events": {
            "definitions": [["kprobe_events", f"p:{G}/open do_sys_openat2 dfd=$arg1:s32"],
                            ["kprobe_events", f"r:{G}/open_ret do_sys_openat2 ret=$retval:s32"]],
            "events": [f"{G}/open", f"{G}/open_ret"],
            "buffer_size_kb": 8,
            "cpu": 1,
            "workload": [["python3", "-c", "for i in range(4000): open('/etc/hostname').close()"]],
        },
    }
    files = {"raw_capture.py": (HERE / "raw_capture.py").read_bytes()}
    for name, sc in scenarios.items():
        sc["instance"] = G
        files[f"scenarios/{name}.json"] = json.dumps(sc).encode()
    r = run_in_guest(LAB_SCRIPT, files=files, timeout=240)
    print(r.stdout[-3000:])
    if r.returncode != 0:
        raise SystemExit(f"guest script failed ({r.returncode})")
    base = FIXTURES / "linux-6.1-debian"
    for name in scenarios:
        shutil.rmtree(base / name, ignore_errors=True)
    for rel, data in r.files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    print(f"wrote {base}")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("root only")
    {"local": local, "lab": lab}[sys.argv[1]]()
