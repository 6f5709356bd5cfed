"""The definition corpus, and its walk inside a lab guest: the kernel's verdict on each line and the agent's.

    python3 grammar_corpus.py OUT_JSON      # in the guest (root), with kprobe_exporter importable

For each [FILE, LINE] of CORPUS, in one process: the kernel's verdict, the line written alone to FILE
(probe_corpus.ask: accepted and listed back how, or refused with errno and error_log); then the agent's,
the line as a `raw:` probe of a config run through `kprobe-exporter check`'s own code (config, probes,
agent.check in its scratch group): accepted with what `check` printed and the arg names the agent reads,
or refused with the one line the user would see. tests/lab/test_grammar_corpus.py compares the two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

B = "/opt/kprobe-lab/bin/busybox"  # a binary both lab guests have, for uprobes at a fixed offset
C = "kpegc"  # the group of the direct writes


def _dyn(*lines: str) -> list[list[str]]:
    return [["dynamic_events", ln] for ln in lines]


def _kp(*lines: str) -> list[list[str]]:
    return [["kprobe_events", ln] for ln in lines]


def _up(*lines: str) -> list[list[str]]:
    return [["uprobe_events", ln] for ln in lines]


CORPUS: list[list[str]] = [
    # fprobes: entry, %return, $retval on both forms, BTF names, $arg*, $argN, member access, typed, bad ones
    *_dyn(f"f:{C}/e vfs_read", f"f:{C}/e vfs_read%return", f"f:{C}/e vfs_read%return ret=$retval",
          f"f:{C}/e vfs_read%return $retval", f"f:{C}/e vfs_read%return count", f"f:{C}/e vfs_read%return $arg*",
          f"f:{C}/e vfs_read $arg*", f"f:{C}/e vfs_read $arg1 $arg3:u64", f"f:{C}/e vfs_read file->f_flags:x32",
          f"f:{C}/e vfs_read file->f_path.dentry->d_name.name:string",
          f"f:{C}/e do_sys_openat2 dfd filename how->flags:x64", f"f:{C}/e do_sys_openat2 p=+0(filename):ustring",
          f"f:{C}/e ksys_read", f"f:{C}/e ksys_read%return ret=$retval:s64", f"f:{C}/e vfs_read%return ret=$retval:x64",
          f"f:{C}/e vfs_read $comm", f"f:{C}/e vfs_read $stack0", f"f:{C}/e vfs_read%return $arg2 ret=$retval",
          f"f:{C}/e vfs_read n=count fl=file->f_flags:x32 c=$comm", f"f:{C}/e vfs_read $retval",
          f"f:{C}/e __x64_sys_getppid", f"f:{C}/e nosuch_function_kpe", f"f:{C}/e vfs_read nosuch",
          f"f:{C}/e vfs_read file->nosuch", f"f:{C}/e vfs_read count->x", f"f:{C}/e vfs_read+4",
          f"f:{C}/e vfs_read a=$arg1:nosuchtype", f"f:{C}/e vfs_read $arg9", f"f:{C}/e vfs_read%return+4",
          f"f:{C}/e vfs_read%retrun", f"f:{C}/e vfs_read a=$arg*", f"f:{C}/e vfs_read count count"),
    # tprobes
    *_dyn(f"t:{C}/e sched_switch prev->pid next->pid", f"t:{C}/e sched_switch $arg*", f"t:{C}/e sched_switch",
          f"t:{C}/e sched_process_fork parent->pid child->comm:string", f"t:{C}/e nosuch_tp_kpe",
          f"t:{C}/e sched_switch nosuch", f"t:{C}/e sched_switch%return", f"t:{C}/e sys_enter id",
          f"t:{C}/e sched_process_exec p=p->pid"),
    # eprobes: fields by $name, both SYSTEM.EVENT and SYSTEM/EVENT, bad ones
    *_dyn(f"e:{C}/e syscalls.sys_enter_openat fn=+0($filename):ustring", f"e:{C}/e syscalls.sys_enter_openat $dfd",
          f"e:{C}/e syscalls.sys_enter_openat $flags:x32 $mode", f"e:{C}/e sched.sched_switch prev_pid=$prev_pid",
          f"e:{C}/e syscalls.sys_exit_openat ret=$ret", f"e:{C}/e syscalls.nosuch_kpe",
          f"e:{C}/e nosuch_kpe.sys_enter_openat", f"e:{C}/e syscalls.sys_enter_openat $nosuch",
          f"e:{C}/e syscalls.sys_enter_openat $retval", f"e:{C}/e syscalls/sys_enter_openat",
          f"e:{C}/e syscalls.sys_enter_openat fn=+0($filename):string", f"e:{C}/e sched/sched_process_fork $child_pid"),
    # kprobes and kretprobes: every return form with $retval, BTF names, registers, types, bad ones
    *_kp(f"p:{C}/e vfs_read", f"p:{C}/e vfs_read%return", f"p:{C}/e vfs_read%return ret=$retval",
         f"p:{C}/e vfs_read%return $retval", f"r:{C}/e vfs_read ret=$retval", f"r:{C}/e vfs_read%return",
         f"r16:{C}/e vfs_read ret=$retval:s64", f"r:{C}/e vfs_read%return ret=$retval", f"p:{C}/e vfs_read count",
         f"p:{C}/e vfs_read $arg*", f"p:{C}/e vfs_read file->f_flags:x32", f"r:{C}/e vfs_read count",
         f"p:{C}/e vfs_read%return count", f"p:{C}/e vfs_read $arg1 $arg2:x64", f"p:{C}/e vfs_read $retval",
         f"p:{C}/e vfs_read nosuch", f"p:{C}/e __x64_sys_getppid", f"p:{C}/e __x64_sys_getppid%return ret=$retval",
         f"p:{C}/e vfs_read+4%return", f"p:{C}/e vfs_read+4 count", f"r10:{C}/e vfs_read",
         f"p:{C}/e nosuch_function_kpe", f"p:{C}/e vfs_read a=%di:u32 $arg2:x64",
         f"p:{C}/e vfs_read a=%di:u32 b=%si:x64 c=+0(%si):u8[4] d=%di:b4@2/32 e=\\1234 f=$comm g=$stack1",
         f"p:{C}/e do_sys_openat2 p=+0($arg2):ustring s=+0($arg2):symstr", f"p:{C}/e vfs_read x=%rdi",
         f"p:{C}/e vfs_read x=%di:u33", f"p:{C}/e vfs_read x=$bogus", f"p:{C}/e vfs_read x=+0(%di",
         f"p:{C}/e vfs_read x=$arg*", f"p:{C}/e vfs_read x=%di x=%si", f"r:{C}/e vfs_read+4 ret=$retval",
         f"p:{C}/e vfs_read x=+0(+8(%di)):string", f"p:{C}/e"),
    # uprobes and uretprobes: every return form with $retval, what BTF cannot do there
    *_up(f"p:{C}/e {B}:0x1000%return", f"r:{C}/e {B}:0x1000", f"p:{C}/e {B}:0x1000%return ret=$retval",
         f"r:{C}/e {B}:0x1000 ret=$retval", f"r:{C}/e {B}:0x1000%return $retval", f"p:{C}/e {B}:0x1000 $arg1",
         f"p:{C}/e {B}:0x1000 count", f"p:{C}/e {B}:0x1000 x=%di:symbol", f"p:{C}/e {B}:0x1000 x=$retval",
         f"p:{C}/e {B}:0x1000 a=%di:s32 b=+0(%si):ustring"),
    # a letter no kernel has
    *_dyn(f"x:{C}/e vfs_read"),
]


def agent_verdict(line: str) -> dict[str, object]:
    """The line as a raw probe through `check`'s own code, in the guest's kernel."""
    from kprobe_exporter import agent, config, probes
    from kprobe_exporter.errors import UserError

    path = "corpus.yaml"
    try:
        cfg = config.load_text(json.dumps({"instance": "kpe_gc_agent", "probes": [{"raw": line}]}), path)
        built = probes.build_probe_set(cfg, path)
    except UserError as e:
        return {"accepted": False, "stage": "agent", "message": e.line()}
    try:
        out = agent.check(cfg, lambda c: probes.build_probe_set(c, path))
    except UserError as e:
        return {"accepted": False, "stage": "kernel", "message": e.line()}
    return {"accepted": True, "check": out, "args": [[a.name for a in ev.args] for ev in built.events],
            "kinds": [ev.kind for ev in built.events]}


def main(out: Path) -> None:
    import probe_corpus

    answers = []
    for probe_file, line in CORPUS:
        answers.append({"kernel": probe_corpus.ask(probe_file, line), "agent": agent_verdict(line)})
    out.write_text(json.dumps(answers, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
