"""Regenerate tests/fixtures/linux-6.12-debian/: real output of Debian's 6.12 for every probe kind it adds.

    python3 tests/make_612_fixtures.py    # root; boots the 6.12 kernel-lab guest once (build_guest --kernel 6.12)

In one boot:
  raw/SCENARIO/     tests/raw_capture.py's files (pages, formats, the `trace` text) plus the same events'
                    trace_pipe text from two instances with the agent's options: irq-info off, record-tgid
                    off (kpe_text.trace_pipe) and on (kpe_tgid.trace_pipe)
  definitions.json  tests/probe_corpus.py over CORPUS: each line accepted and listed back, or refused with
                    its errno and error_log text
  definitions.txt   the same, readable: `FILE: LINE` then `  -> LISTED` or `  refused: ERRNO TEXT`
  error_log.txt     the refused lines' error_log entries, one after the other, as the kernel wrote them
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures" / "linux-6.12-debian"
sys.path.insert(0, str(HERE))

G = "kpe612"
TEXT_INSTANCES = {"kpe_text": False, "kpe_tgid": True}
OPENER = ["python3", "-c", "import sys\nfor i in range(int(sys.argv[1])): open(sys.argv[2]).close()", "12",
          "/etc/hostname"]  # fmt: skip
FAILER = ["python3", "-c", "import os\nfor i in range(3):\n  try: open('/nonexistent/x')\n  except OSError: pass"]
READER = ["/opt/kprobe-lab/bin/busybox", "dd", "if=/etc/hostname", "of=/dev/null", "bs=4", "count=3"]
FORKER = ["python3", "-c", "import subprocess\nfor i in range(3): subprocess.run(['/bin/true'])"]


def dyn(line: str) -> list[str]:
    return ["dynamic_events", line]


SCENARIOS: dict[str, dict[str, object]] = {
    # fprobe entry with BTF args ($arg*, a name, member access, a string) and exit with $retval
    "fprobe": {
        "definitions": [
            dyn(f"f:{G}/open do_sys_openat2 $arg*"),
            dyn(f"f:{G}/open_path do_sys_openat2 path=+0($arg2):ustring flags=how->flags:x64"),
            dyn(f"f:{G}/open_ret do_sys_openat2%return ret=$retval"),
            dyn(f"f:{G}/read vfs_read count"),
            dyn(f"f:{G}/read_ret vfs_read%return ret=$retval"),
        ],
        "events": [f"{G}/open", f"{G}/open_path", f"{G}/open_ret", f"{G}/read", f"{G}/read_ret"],
        "buffer_size_kb": 1024,
        "workload": [OPENER, FAILER, READER],
    },
    # kprobe `SYM%return` (listed back as r...), a kretprobe's $retval, BTF names on kprobes
    "kprobe-return-btf": {
        "definitions": [
            ["kprobe_events", f"p:{G}/open do_sys_openat2 dfd filename fl=how->flags:x64"],
            ["kprobe_events", f"p:{G}/open_ret do_sys_openat2%return ret=$retval"],
            ["kprobe_events", f"r:{G}/open_r do_sys_openat2 ret=$retval"],
            ["kprobe_events", f"p:{G}/read vfs_read count"],
            ["kprobe_events", f"p:{G}/read_ret vfs_read%return ret=$retval"],
        ],
        "events": [f"{G}/open", f"{G}/open_ret", f"{G}/open_r", f"{G}/read", f"{G}/read_ret"],
        "buffer_size_kb": 1024,
        "workload": [OPENER, FAILER, READER],
    },
    # tprobes: a tracepoint's raw arguments by BTF, with member access
    "tprobe": {
        "definitions": [
            dyn(f"t:{G}/fork sched_process_fork parent->pid child=child->pid"),
            dyn(f"t:{G}/exit sched_process_exit $arg*"),
        ],
        "events": [f"{G}/fork", f"{G}/exit"],
        "buffer_size_kb": 1024,
        "workload": [FORKER],
    },
    # eprobes on a syscall tracepoint's fields. An eprobe records into one instance only (the others enabled
    # alongside stay empty: see eprobe-instances.txt), so its text comes from `trace`, with and without tgid.
    "eprobe": {
        "definitions": [
            dyn(f"e:{G}/eopen syscalls.sys_enter_openat fn=+0($filename):ustring flags=$flags:x32 dfd=$dfd"),
            dyn(f"e:{G}/eopen_ret syscalls.sys_exit_openat ret=$ret"),
        ],
        "events": [f"{G}/eopen", f"{G}/eopen_ret"],
        "buffer_size_kb": 1024,
        "workload": [OPENER, FAILER],
        "text_instances": {},
    },
    # strings that fault: a user pointer read as a kernel string, on an fprobe and a kprobe
    "fault": {
        "definitions": [
            dyn(f"f:{G}/read_buf vfs_read s=+0($arg2):string n=count"),
            ["kprobe_events", f"p:{G}/open_bad do_sys_openat2 bad=+0($arg2):string ok=+0($arg2):ustring"],
        ],
        "events": [f"{G}/read_buf", f"{G}/open_bad"],
        "buffer_size_kb": 1024,
        "workload": [FAILER, READER],
    },
}

# the same eprobes with record-tgid on in the capture's own instance (the `(tgid)` column of its text)
SCENARIOS["eprobe-record-tgid"] = {**SCENARIOS["eprobe"], "options": {"record-tgid": 1}}

C = f"{G}c"  # the corpus' own group
CORPUS: list[list[str]] = [
    # accepted or not, the kernel says; the agent's verdict must match it
    *(dyn(line) for line in (
        f"f:{C}/e vfs_read", f"f:{C}/e vfs_read%return", f"f:{C}/e vfs_read%return ret=$retval",
        f"f:{C}/e vfs_read%return $retval", f"f:{C}/e vfs_read%return count", f"f:{C}/e vfs_read%return $arg*",
        f"f:{C}/e vfs_read $arg*", f"f:{C}/e vfs_read $arg1 $arg3:u64", f"f:{C}/e vfs_read file->f_flags:x32",
        f"f:{C}/e vfs_read file->f_path.dentry->d_name.name:string",
        f"f:{C}/e do_sys_openat2 dfd filename how->flags:x64", f"f:{C}/e do_sys_openat2 p=+0(filename):ustring",
        f"f:{C}/e ksys_read", f"f:{C}/e ksys_read%return ret=$retval:s64", f"f:{C}/e vfs_read%return ret=$retval:x64",
        f"f:{C}/e vfs_read $comm", f"f:{C}/e vfs_read $stack0",
        f"f:{C}/e __x64_sys_getppid", f"f:{C}/e nosuch_function_kpe", f"f:{C}/e vfs_read nosuch",
        f"f:{C}/e vfs_read file->nosuch", f"f:{C}/e vfs_read count->x", f"f:{C}/e vfs_read $retval",
        f"f:{C}/e vfs_read+4", f"f:{C}/e vfs_read a=$arg1:nosuchtype", f"f:{C}/e vfs_read $arg9",
        f"f:{C}/e vfs_read%return+4", f"f:{C}/e vfs_read%retrun",
        f"t:{C}/e sched_switch prev->pid next->pid", f"t:{C}/e sched_switch $arg*", f"t:{C}/e sched_switch",
        f"t:{C}/e sched_process_fork parent->pid child->comm:string", f"t:{C}/e nosuch_tp_kpe",
        f"t:{C}/e sched_switch nosuch", f"t:{C}/e sched_switch%return", f"t:{C}/e sys_enter id",
        f"e:{C}/e syscalls.sys_enter_openat fn=+0($filename):ustring", f"e:{C}/e syscalls.sys_enter_openat $dfd",
        f"e:{C}/e syscalls.sys_enter_openat $flags:x32 $mode", f"e:{C}/e sched.sched_switch prev_pid=$prev_pid",
        f"e:{C}/e syscalls.sys_exit_openat ret=$ret", f"e:{C}/e syscalls.nosuch_kpe",
        f"e:{C}/e nosuch_kpe.sys_enter_openat", f"e:{C}/e syscalls.sys_enter_openat $nosuch",
        f"e:{C}/e syscalls.sys_enter_openat $retval", f"e:{C}/e syscalls/sys_enter_openat",
        f"e:{C}/e syscalls.sys_enter_openat fn=+0($filename):string",
    )),
    *(["kprobe_events", line] for line in (
        f"p:{C}/e vfs_read", f"p:{C}/e vfs_read%return", f"p:{C}/e vfs_read%return ret=$retval",
        f"r:{C}/e vfs_read ret=$retval", f"r:{C}/e vfs_read%return", f"p:{C}/e vfs_read count",
        f"p:{C}/e vfs_read $arg*", f"p:{C}/e vfs_read file->f_flags:x32", f"r:{C}/e vfs_read count",
        f"p:{C}/e vfs_read%return count", f"p:{C}/e vfs_read $retval", f"p:{C}/e vfs_read nosuch",
        f"p:{C}/e __x64_sys_getppid", f"p:{C}/e __x64_sys_getppid%return ret=$retval",
        f"p:{C}/e vfs_read+4%return", f"p:{C}/e vfs_read+4 count", f"r10:{C}/e vfs_read",
        f"p:{C}/e nosuch_function_kpe", f"p:{C}/e vfs_read a=%di:u32 $arg2:x64",
        f"p:{C}/e do_sys_openat2 p=+0($arg2):ustring s=+0($arg2):symstr",
    )),
    *(["uprobe_events", line] for line in (
        f"p:{C}/e /opt/kprobe-lab/bin/busybox:0x1000%return", f"r:{C}/e /opt/kprobe-lab/bin/busybox:0x1000",
        f"p:{C}/e /opt/kprobe-lab/bin/busybox:0x1000%return ret=$retval",
        f"p:{C}/e /opt/kprobe-lab/bin/busybox:0x1000 $arg1", f"p:{C}/e /opt/kprobe-lab/bin/busybox:0x1000 count",
    )),
]

LAB_SCRIPT = r"""
set -e
for sc in $LAB_IN/scenarios/*.json; do
    n=$(basename $sc .json)
    python3 $LAB_IN/raw_capture.py $LAB_OUT/raw/$n $sc
done
python3 $LAB_IN/probe_corpus.py $LAB_IN/corpus.json $LAB_OUT/definitions.json
# One eprobe enabled in two instances: count what each records, then with the first disabled.
T=/sys/kernel/tracing
echo 'e:kpe612x/eo syscalls.sys_enter_openat' >> $T/dynamic_events
mkdir $T/instances/ea $T/instances/eb
echo 1 > $T/instances/ea/events/kpe612x/eo/enable
echo 1 > $T/instances/eb/events/kpe612x/eo/enable
open5() { python3 -S -c "for i in range(5): open('/etc/hostname').close()"; }
open5
{ echo "both enabled: ea $(grep -c 'eo:' $T/instances/ea/trace) eb $(grep -c 'eo:' $T/instances/eb/trace)"
  echo 0 > $T/instances/ea/events/kpe612x/eo/enable; echo > $T/instances/ea/trace; echo > $T/instances/eb/trace
  open5
  echo "ea disabled: ea $(grep -c 'eo:' $T/instances/ea/trace) eb $(grep -c 'eo:' $T/instances/eb/trace)"
} > $LAB_OUT/eprobe-instances.txt 2>&1 || true
ls -R $LAB_OUT | head -80
"""


def readable(answers: list[dict[str, object]]) -> tuple[str, str]:
    defs, errors = [], []
    for a in answers:
        defs.append(f"{a['file']}: {a['line']}")
        if a["accepted"]:
            defs.extend(f"  -> {ln}" for ln in a["listed"])  # type: ignore[attr-defined]
        else:
            defs.append(f"  refused: {a['error']}")
            errors.append(str(a["error_log"]))
    return "\n".join(defs) + "\n", "".join(errors)


def write_readable() -> None:
    defs, errors = readable(json.loads((OUT / "definitions.json").read_text()))
    (OUT / "definitions.txt").write_text(defs)
    (OUT / "error_log.txt").write_text(errors)


def main() -> None:
    from kernel_lab.guest import run_in_guest

    files = {n: (HERE / n).read_bytes() for n in ("raw_capture.py", "probe_corpus.py")}
    for name, sc in SCENARIOS.items():
        files[f"scenarios/{name}.json"] = json.dumps({"instance": G, "text_instances": TEXT_INSTANCES, **sc}).encode()
    files["corpus.json"] = json.dumps(CORPUS).encode()
    r = run_in_guest(LAB_SCRIPT, files=files, timeout=900, kernel="6.12")
    print(r.stdout[-3000:])
    if r.returncode != 0:
        raise SystemExit(f"guest script failed ({r.returncode})")
    shutil.rmtree(OUT / "raw", ignore_errors=True)
    for rel, data in r.files.items():
        p = OUT / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    write_readable()
    print(f"wrote {OUT} (boot {r.boot_seconds:.0f} s, all {r.seconds:.0f} s)")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("root only")
    main()
