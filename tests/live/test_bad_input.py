"""The bad-input catalogue: every case exits 2 with one line naming file, probe and field, installs nothing.

Table-driven: CASES below is the catalogue (and, normalised, the README's "Error messages" table).
Each case runs the real command line in a subprocess, all of them in parallel, each with its own
instance name; the checks are the same for all: exit code 2, exactly one line on stderr, no
traceback, the file / probe / field / suggestion the case names, and nothing left in tracefs (no
instance, no definition of its group; the victim probe that the injection cases aim at still there,
and no line of any injected command in uprobe_events).

KPE_ERROR_TABLE=FILE writes the messages as a markdown table (for the README) after the run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_proc import REPO, free_port, group_definitions, running_agent
from hard_helpers import write_event

TRACEFS = Path("/sys/kernel/tracing")
VICTIM = "kpe_t_victim/keep"  # a probe of someone else's group that injected commands aim to remove
HELD = "kpe_t_bad_held"  # an instance held by a live agent during the run
HAS_KPROBES = (TRACEFS / "kprobe_events").exists()
HAS_HIST = (TRACEFS / "events" / "sched" / "sched_switch" / "hist").exists()  # CONFIG_HIST_TRIGGERS (not here)
KERNEL_LAB_NOTE = ("this kernel has no kprobes: the kernel-lab tier (Debian 6.1 under qemu) gets the real "
                   "'unknown symbol ... did you mean' line")


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    config: str | dict[str, Any] | None  # YAML text or a mapping; placeholders {pie} {stripped} {inst} {bin}
    needle: str  # what the one line must say
    probe: str | None = None  # the line names "probe 'X'" (or "pair 'X'")
    field: str | None = None  # ... and "field 'Y'"
    suggestion: str | None = None  # ... and this hint
    how: str = ""  # how the command runs: see _command
    args: tuple[str, ...] = ()
    web: str | None = None  # a --web.config.file text
    names: str = "config"  # which file the line starts with: config, web, or none
    note: str = ""

    @property
    def inst(self) -> str:
        return HELD if self.how == "held" else f"kpe_t_bad_{re.sub(r'[^a-z0-9]', '_', self.id)}"[:63]


def P(**probe: Any) -> dict[str, Any]:
    return {"probes": [probe]}


PIE = "{pie}"
KPROBE_NEEDLE = ("the kernel rejected" if HAS_KPROBES
                 else "this kernel has no kprobe_events (it lacks CONFIG_KPROBE_EVENTS)")

CASES: list[Case] = [
    # --- config files and YAML ------------------------------------------------------------------
    Case("yaml-syntax", "Config files and YAML", "instance: {inst}\nprobes:\n  - {{name: a, uprobe: [\n",
         "YAML error at line 4, column 1"),
    Case("yaml-tab", "Config files and YAML", "instance: {inst}\nprobes:\n\t- {{name: a}}\n",
         "YAML error at line 3, column 1: found character '\\t' that cannot start any token"),
    Case("yaml-duplicate-key", "Config files and YAML",
         "instance: {inst}\nprobes:\n  - name: a\n    uprobe: '{pie}:compute'\n    uprobe: '{pie}:recurse'\n",
         "YAML error at line 5, column 5: duplicate key 'uprobe' (the second would silently win)"),
    Case("yaml-nul-byte", "Config files and YAML", "instance: {inst}\nprobes: []\nx: \"\0\"\n",
         "YAML error at line 3, column 5: character '\\x00' is not allowed"),
    Case("yaml-python-tag", "Config files and YAML", "instance: {inst}\nprobes: !!python/object/apply:os.system [id]\n",
         "could not determine a constructor for the tag"),
    Case("unknown-key-top", "Config files and YAML", {"instanse": "x", "probes": []},
         "unknown key 'instanse'", field="instanse", suggestion="did you mean 'instance'?"),
    Case("unknown-key-probe", "Config files and YAML", P(name="a", uprobe=PIE + ":compute", lables=["x"]),
         "unknown key 'lables'", probe="a", field="lables", suggestion="did you mean 'labels'?"),
    Case("unknown-key-nested", "Config files and YAML", {"pending": {"max_ag": "2s"}, "probes": []},
         "unknown key 'max_ag'", field="pending.max_ag", suggestion="did you mean 'max_age'?"),
    Case("wrong-type-bool", "Config files and YAML", P(name="a", uprobe=PIE + ":compute", latency="maybe"),
         "valid boolean", probe="a", field="latency"),
    Case("wrong-type-list", "Config files and YAML", {"probes": "compute"}, "valid list", field="probes"),
    Case("wrong-type-int", "Config files and YAML", {"label_limit": "lots", "probes": []}, "valid integer",
         field="label_limit"),
    Case("wrong-type-probe", "Config files and YAML", {"probes": [42]}, "must be a mapping of keys", probe="#1"),
    Case("bad-duration", "Config files and YAML", {"pending": {"max_age": "10 parsecs"}, "probes": []},
         "is not a duration like '10s'", field="pending.max_age"),
    Case("out-of-range", "Config files and YAML", {"buffer_size_kb": 0, "probes": []}, "greater than or equal to 4",
         field="buffer_size_kb"),
    Case("otlp-metrics-interval", "Config files and YAML", {"otlp_metrics": {"interval": "100ms"}, "probes": []},
         "greater than or equal to 1", field="otlp_metrics.interval"),
    Case("cgroup-rewrite-regex", "Config files and YAML",
         {"cgroup_rewrite": [{"match": "kubepods-pod(.*", "replace": "\\1"}], "probes": []},
         "'kubepods-pod(.*' is not a regular expression: missing ), unterminated subpattern at position 12",
         field="cgroup_rewrite[0].match"),
    Case("empty-file", "Config files and YAML", "", "the file is empty; it needs at least 'probes:'"),
    Case("comments-only", "Config files and YAML", "# probes: later\n", "the file is empty"),
    Case("top-level-list", "Config files and YAML", "- probes\n", "the top level must be a mapping"),
    Case("missing-file", "Config files and YAML", None, "no such config file", how="missing"),
    Case("directory", "Config files and YAML", None, "is a directory, not a config file", how="directory"),
    Case("unreadable", "Config files and YAML", {"probes": []}, "cannot read the config file (permission denied)",
         how="unreadable", note="mode 000, read as uid 1000 (root reads anything)"),
    Case("not-utf8", "Config files and YAML", None, "the config file is not UTF-8 text", how="latin1"),
    Case("endless-file", "Config files and YAML", None, "the config file is over 4 MiB", how="devzero"),
    # --- probe names and kinds --------------------------------------------------------------------
    Case("duplicate-name", "Probe names and kinds",
         {"probes": [{"name": "a", "uprobe": PIE + ":compute"}, {"name": "a", "uprobe": PIE + ":recurse"}]},
         "duplicate name", probe="a", field="name"),
    Case("duplicate-generated-name", "Probe names and kinds",
         {"probes": [{"name": "a", "uprobe": PIE + ":compute", "latency": True},
                     {"name": "a_ret", "uprobe": PIE + ":recurse"}]},
         "duplicate name", probe="a_ret", field="name"),
    Case("illegal-name", "Probe names and kinds", P(name="a-b", uprobe=PIE + ":compute"),
         "must match [A-Za-z_][A-Za-z0-9_]*", probe="a-b", field="name"),
    Case("long-name", "Probe names and kinds", P(name="a" * 70, uprobe=PIE + ":compute"),
         "is 70 characters; at most 63", field="name"),
    Case("illegal-instance", "Probe names and kinds", {"instance": "kpe/../x", "probes": []},
         "must match [A-Za-z_][A-Za-z0-9_]*", field="instance"),
    Case("no-kind", "Probe names and kinds", P(name="a", args={"x": "%di"}),
         "needs exactly one kind: one of kprobe, kretprobe, uprobe, uretprobe, tracepoint, fprobe, fretprobe, tprobe, "
         "eprobe, raw", probe="a"),
    Case("two-kinds", "Probe names and kinds", P(name="a", uprobe=PIE + ":compute", tracepoint="sched/sched_switch"),
         "has two kinds (uprobe and tracepoint); a probe has exactly one", probe="a"),
    Case("raw-with-name", "Probe names and kinds", P(name="a", raw="p:b " + PIE + ":0x1139"),
         "a raw line takes its name from the line; drop 'name'", probe="a", field="name"),
    # --- targets ------------------------------------------------------------------------------------
    Case("unknown-kernel-symbol", "Targets", P(name="a", kprobe="do_sys_opnat2"), KPROBE_NEEDLE, probe="a",
         field="kprobe" if HAS_KPROBES else "kind", note="" if HAS_KPROBES else KERNEL_LAB_NOTE),
    Case("missing-binary", "Targets", P(name="a", uprobe="/no/such/bin:compute"), "no such file /no/such/bin",
         probe="a", field="uprobe"),
    Case("stripped-binary", "Targets", P(name="a", uprobe="{stripped}:compute"), "is stripped", probe="a",
         field="uprobe"),
    Case("absent-symbol", "Targets", P(name="a", uprobe=PIE + ":compuet"), "no function 'compuet' in", probe="a",
         field="uprobe", suggestion="did you mean compute?"),
    Case("not-elf", "Targets", P(name="a", uretprobe="/etc/hostname:main"), "/etc/hostname is not an ELF file",
         probe="a", field="uretprobe"),
    Case("relative-path", "Targets", P(name="a", uprobe="bin/app:main"), "'bin/app' must be an absolute path",
         probe="a", field="uprobe"),
    Case("unknown-tracepoint", "Targets", P(name="a", tracepoint="syscalls/sys_enter_opnat"),
         "no tracepoint syscalls/sys_enter_opnat in this kernel", probe="a", field="tracepoint",
         suggestion="did you mean syscalls/sys_enter_openat?"),
    Case("tracepoint-syntax", "Targets", P(name="a", tracepoint="sys_enter_openat"), "is not GROUP/EVENT",
         probe="a", field="tracepoint"),
    Case("container-not-running", "Targets", P(name="a", uprobe="/bin/app:compute", container="kpe-no-such-ctr"),
         "no running container 'kpe-no-such-ctr' (podman: ", probe="a", field="container"),
    Case("cgroup-no-process", "Targets", P(name="a", uprobe="/bin/app:compute", cgroup="kpe-no-such-cgroup"),
         "no process in a cgroup matching 'kpe-no-such-cgroup'", probe="a", field="cgroup"),
    Case("container-not-uprobe", "Targets", P(name="a", tracepoint="sched/sched_switch", container="web"),
         "is for uprobes; a tracepoint sees the host's kernel", probe="a", field="container"),
    # --- fetchargs and filters ----------------------------------------------------------------------
    Case("bad-register", "Fetchargs and filters", P(name="a", uprobe=PIE + ":compute", args={"x": "%rdi:s32"}),
         "trace_uprobe: error: Invalid register name (at '%rdi:s32')", probe="a", field="args.x",
         suggestion="did you mean %di?"),
    Case("symbol-on-uprobe", "Fetchargs and filters", P(name="a", uprobe=PIE + ":compute", args={"x": "%di:symbol"}),
         "trace_uprobe: error: Unknown type is specified (at 'symbol')", probe="a", field="args.x"),
    Case("too-many-args", "Fetchargs and filters",
         P(name="a", uprobe=PIE + ":compute", args={f"x{i}": "%di" for i in range(129)}),
         "has 129 args; the kernel takes at most 128", probe="a", field="args"),
    Case("unknown-type", "Fetchargs and filters", P(name="a", uprobe=PIE + ":compute", args={"x": "%di:u7"}),
         "trace_uprobe: error: Unknown type is specified (at 'u7')", probe="a", field="args.x"),
    Case("retval-on-entry", "Fetchargs and filters", P(name="a", uprobe=PIE + ":compute", args={"x": "$retval"}),
         "trace_uprobe: error: $retval is not available on probe (at '$retval')", probe="a", field="args.x"),
    Case("kernel-rejects-arg", "Fetchargs and filters",
         P(name="a", uprobe=PIE + ":compute", args={"x": "%di:b4@70/64"}),
         "the kernel rejected 'p:{inst}/a", probe="a", field="args.x"),
    Case("kernel-rejects-filter", "Fetchargs and filters", P(name="a", uprobe=PIE + ":compute", filter="nosuch == 1"),
         "the kernel rejected the filter 'nosuch == 1'", probe="a", field="filter"),
    Case("label-unknown-arg", "Fetchargs and filters",
         P(name="a", uprobe=PIE + ":compute", args={"depth": "%di:s32"}, labels=["dpth"]),
         "label 'dpth' is not an arg of this probe", probe="a", field="labels", suggestion="did you mean 'depth'?"),
    Case("label-not-a-field", "Fetchargs and filters",
         P(name="a", tracepoint="syscalls/sys_enter_openat", labels=["nosuch"]),
         "label 'nosuch' is not a field of syscalls/sys_enter_openat", probe="a", field="labels"),
    Case("label-pid", "Fetchargs and filters", P(name="a", tracepoint="sched/sched_switch", labels=["prev_pid"]),
         "pid and tid are never labels", probe="a", field="labels"),
    Case("latency-on-return", "Fetchargs and filters", P(name="a", uretprobe=PIE + ":compute", latency=True),
         "a uretprobe is already the return; put latency on the entry probe", probe="a", field="latency"),
    Case("latency-no-return", "Fetchargs and filters", P(name="a", tracepoint="sched/sched_switch", latency=True),
         "tracepoint sched/sched_switch has no matching return event", probe="a", field="latency"),
    Case("pair-unknown-event", "Fetchargs and filters",
         {"probes": [{"name": "a", "uprobe": PIE + ":compute"}, {"name": "b", "uretprobe": PIE + ":compute"}],
          "pairs": [{"name": "ab", "entry": "a", "exit": "bb"}]},
         "names unknown event 'bb'", probe="ab", field="exit", suggestion="did you mean 'b'?"),
    Case("pair-same-event", "Fetchargs and filters",
         {"probes": [{"name": "a", "uprobe": PIE + ":compute"}], "pairs": [{"name": "aa", "entry": "a", "exit": "a"}]},
         "entry and exit must be two different events", probe="aa", field="exit"),
    Case("args-on-tracepoint", "Fetchargs and filters",
         P(name="a", tracepoint="syscalls/sys_enter_openat", args={"x": "%di"}),
         "a tracepoint has fixed fields", probe="a", field="args"),
    # --- injection: nothing may end one tracefs command and start another ----------------------------
    Case("inject-newline-filter", "Injection",
         P(name="a", uprobe=PIE + ":compute", filter="common_pid == 1\n-:" + VICTIM),
         "must not contain a newline, ';', NUL or '-:'", probe="a", field="filter"),
    Case("inject-semicolon-arg", "Injection",
         P(name="a", uprobe=PIE + ":compute", args={"x": "%di;p:evil/x " + PIE + ":0x1139"}),
         "must not contain a newline, ';', NUL or '-:'", probe="a", field="args"),
    Case("inject-removal-target", "Injection", P(name="a", uprobe=PIE + ":0x1139-:" + VICTIM),
         "must not contain a newline, ';', NUL or '-:'", probe="a", field="uprobe"),
    Case("inject-newline-raw", "Injection", P(raw="p:a " + PIE + ":0x1139\n-:" + VICTIM),
         "must not contain a newline, ';', NUL or '-:'", probe="a", field="raw"),
    Case("inject-semicolon-name", "Injection", P(name="a;-:" + VICTIM, uprobe=PIE + ":compute"),
         "must match [A-Za-z_][A-Za-z0-9_]*", field="name"),
    Case("inject-removal-instance", "Injection", {"instance": "x-:kpe_t_victim", "probes": []},
         "must match [A-Za-z_][A-Za-z0-9_]*", field="instance"),
    Case("inject-newline-tracepoint", "Injection", P(name="a", tracepoint="sched/sched_switch\n-:" + VICTIM),
         "must not contain a newline, ';', NUL or '-:'", probe="a", field="tracepoint"),
    Case("inject-semicolon-kprobe", "Injection", P(name="a", kprobe="do_sys_open;-:" + VICTIM),
         "must not contain a newline, ';', NUL or '-:'", probe="a", field="kprobe"),
    Case("inject-newline-arg-name", "Injection", P(name="a", uprobe=PIE + ":compute", args={"x\n-:" + VICTIM: "%di"}),
         "must match [A-Za-z_][A-Za-z0-9_]*", probe="a", field="args"),
    Case("inject-cr-filter", "Injection", P(name="a", uprobe=PIE + ":compute", filter="common_pid == 1\r-:" + VICTIM),
         "must not contain a newline, ';', NUL or '-:'", probe="a", field="filter"),
    Case("inject-nul-uretprobe", "Injection", P(name="a", uretprobe=PIE + ":compute\0r:evil/x " + PIE + ":0x1139"),
         "must not contain a newline, ';', NUL or '-:'", probe="a", field="uretprobe"),
    Case("inject-comment-arg", "Injection", P(name="a", uprobe=PIE + ":compute", args={"x": "%di#"}),
         "must not contain '#' (the kernel reads the rest of the line as a comment)", probe="a", field="args.x"),
    # --- kernel aggregation (aggregation: auto | kernel | stream) ---------------------------------------
    Case("aggregation-bad-value", "Kernel aggregation", P(name="a", uprobe=PIE + ":compute", aggregation="kernal"),
         "Input should be 'auto', 'kernel' or 'stream'", probe="a", field="aggregation"),
    Case("aggregation-bad-value-top", "Kernel aggregation", {"aggregation": "fast", "probes": []},
         "Input should be 'auto', 'kernel' or 'stream'", field="aggregation"),
    Case("aggregation-kernel-no-hist", "Kernel aggregation",
         P(name="a", uprobe=PIE + ":compute", aggregation="kernel"),
         "'kernel' cannot be honoured: this kernel has no hist triggers (CONFIG_HIST_TRIGGERS)",
         probe="a", field="aggregation", note="" if not HAS_HIST else "this kernel has hist triggers: the config runs"),
    Case("aggregation-kernel-recursive", "Kernel aggregation",
         P(name="a", uprobe=PIE + ":recurse", latency=True, recursive=True, aggregation="kernel"),
         "'kernel' cannot be honoured: recursive: one pending timestamp per thread cannot pair nested calls",
         probe="a", field="aggregation"),
    Case("aggregation-kernel-too-many-keys", "Kernel aggregation",
         {"aggregation": "kernel", "probes": [{"name": "a", "uprobe": PIE + ":compute", "labels": ["w", "x", "y", "z"],
                                               "args": {"w": "%di:u8", "x": "%si:u8", "y": "%dx:u8", "z": "%cx:u8"}}]},
         "'kernel' cannot be honoured: 4 labels: a hist key takes at most 3 fields (TRACING_MAP_KEYS_MAX)",
         probe="a", field="aggregation"),
    Case("aggregation-kernel-user-space-label", "Kernel aggregation",
         P(name="a", uprobe=PIE + ":compute", labels=["container_id"], aggregation="kernel"),
         "'kernel' cannot be honoured: label 'container_id' is known only in user space",
         probe="a", field="aggregation"),
    Case("aggregation-kernel-spans-with-args", "Kernel aggregation",
         P(name="a", uprobe=PIE + ":compute", args={"n": "%di:s32"}, latency=True, spans={"min_duration": "1ms"},
           aggregation="kernel"),
         "'kernel' cannot be honoured: spans carry the entry's args, which kernel mode keeps in the kernel",
         probe="a", field="aggregation"),
    # --- environment ------------------------------------------------------------------------------
    Case("not-root", "Environment", P(name="a", uprobe=PIE + ":compute"),
         "must run as root (writing kprobe_events/uprobe_events needs it)", how="user",
         note="uid 1000 in a user namespace"),
    Case("tracefs-not-mountable", "Environment", P(name="a", uprobe=PIE + ":compute"),
         "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: Operation not permitted",
         how="nomount", note="a mount namespace with tracefs unmounted, root without CAP_SYS_ADMIN"),
    Case("no-tracing-in-kernel", "Environment", P(name="a", uprobe=PIE + ":compute"),
         "/sys/kernel/tracing does not exist: is this kernel built with CONFIG_TRACING?", how="notracing",
         note="a mount namespace with an empty /sys/kernel"),
    Case("kernel-lacks-probe-kind", "Environment", P(name="a", kretprobe="do_sys_openat2"),
         "this kernel has no kprobe_events (it lacks CONFIG_KPROBE_EVENTS); probes that need it: a", probe="a",
         field="kind", note="this kernel: no kprobes" if not HAS_KPROBES else "skipped: this kernel has kprobes"),
    Case("port-in-use", "Environment", P(name="a", uprobe=PIE + ":compute"),
         "cannot listen on 127.0.0.1:{port}: Address already in use", field="web.listen-address", how="port"),
    Case("address-not-here", "Environment", P(name="a", uprobe=PIE + ":compute"),
         "cannot listen on 192.0.2.1:{port}: Cannot assign requested address", field="web.listen-address",
         how="addr"),
    Case("instance-held", "Environment", P(name="a", uprobe=PIE + ":compute"),
         f"instance '{HELD}' is held by another live kprobe-exporter; give this one another 'instance' name",
         how="held", note="a live agent holds it"),
    Case("bad-listen-flag", "Environment", P(name="a", uprobe=PIE + ":compute"), "'nope' is not HOST:PORT",
         args=("--web.listen-address", "nope"), names="none"),
    Case("unknown-flag", "Environment", P(name="a", uprobe=PIE + ":compute"),
         "unrecognized arguments: --web.listen-adress", args=("--web.listen-adress", "x"), names="none"),
    # --- web config (--web.config.file) ---------------------------------------------------------------
    Case("web-missing", "Web config", P(name="a", uprobe=PIE + ":compute"), "no such web config file",
         how="webmissing", names="web"),
    Case("web-unknown-key", "Web config", P(name="a", uprobe=PIE + ":compute"), "unknown key 'basic_auth_user'",
         field="basic_auth_user", suggestion="did you mean 'basic_auth_users'?", web="basic_auth_user: {{}}\n",
         names="web"),
    Case("web-plain-password", "Web config", P(name="a", uprobe=PIE + ":compute"),
         "must be a bcrypt hash ($2b$...)", field="basic_auth_users.alice",
         web="basic_auth_users: {{alice: hunter2}}\n", names="web"),
    Case("web-missing-cert", "Web config", P(name="a", uprobe=PIE + ":compute"), "cannot read /no/cert.pem",
         field="tls_server_config.cert_file", web="tls_server_config: {{cert_file: /no/cert.pem, key_file: /no/k}}\n",
         names="web"),
    Case("web-bad-min-version", "Web config", P(name="a", uprobe=PIE + ":compute"),
         "Input should be 'TLS12' or 'TLS13'",
         field="tls_server_config.min_version",
         web="tls_server_config: {{cert_file: a, key_file: b, min_version: TLS11}}\n", names="web"),
    Case("web-not-a-cert", "Web config", P(name="a", uprobe=PIE + ":compute"), "cannot load certificate/key",
         field="tls_server_config", web="tls_server_config: {{cert_file: /etc/hostname, key_file: /etc/hostname}}\n",
         names="web"),
]


def _fmt(obj: Any, **kw: str) -> Any:
    if isinstance(obj, str):
        return obj.replace("{{", "\x01").replace("}}", "\x02").format(**kw).replace("\x01", "{").replace("\x02", "}") \
            if "{" in obj else obj
    if isinstance(obj, dict):
        return {_fmt(k, **kw): _fmt(v, **kw) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fmt(v, **kw) for v in obj]
    return obj


def _config_text(case: Case, kw: dict[str, str]) -> str:
    if isinstance(case.config, dict):
        data = {"instance": case.inst, **_fmt(case.config, **kw)}
        return yaml.safe_dump(data, allow_unicode=True)
    assert isinstance(case.config, str)
    return _fmt(case.config, **kw)


@dataclass
class Outcome:
    case: Case
    rc: int
    stderr: str
    config: str
    web: str
    kw: dict[str, str]


def _command(case: Case, cfg: str, port: int, web: str | None) -> list[str]:
    argv = [sys.executable, "-m", "kprobe_exporter", "run", "--config", cfg]
    if not any(a.startswith("--web.listen") for a in case.args):
        host = "192.0.2.1" if case.how == "addr" else "127.0.0.1"
        argv += ["--web.listen-address", f"{host}:{port}"]
    if web is not None:
        argv += ["--web.config.file", web]
    argv += list(case.args)
    if case.how in ("user", "unreadable"):
        return ["unshare", "--user", "--map-user=1000", "--map-group=1000", *argv]
    if case.how == "nomount":
        return ["unshare", "-m", "sh", "-c", 'umount -l /sys/kernel/tracing && exec setpriv --bounding-set=-sys_admin '
                '--inh-caps=-sys_admin "$@"', "sh", *argv]
    if case.how == "notracing":
        return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /sys/kernel && exec "$@"', "sh", *argv]
    return argv


def _run_case(case: Case, tmp: Path, progs: dict[str, Path]) -> Outcome:
    d = tmp / case.id
    d.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1] if case.how == "port" else free_port()
        kw = {"pie": str(progs["pie"]), "stripped": str(progs["stripped"]), "inst": case.inst, "port": str(port)}
        cfg = d / "cfg.yaml"
        if case.how == "missing":
            cfg = d / "missing.yaml"
        elif case.how == "directory":
            cfg = d
        elif case.how == "latin1":
            cfg.write_bytes(b"probes: []\ninstance: caf\xe9\n")
        elif case.how == "devzero":
            cfg = Path("/dev/zero")
        else:
            cfg.write_text(_config_text(case, kw))
        if case.how == "unreadable":
            cfg.chmod(0)
        web = None
        if case.web is not None:
            web = d / "web.yml"
            web.write_text(_fmt(case.web, **kw))
        elif case.how == "webmissing":
            web = d / "missing-web.yml"
        argv = _command(case, str(cfg), port, str(web) if web else None)
        r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    return Outcome(case, r.returncode, r.stderr, str(cfg), str(web or ""), kw)


def _ours(lines: list[str]) -> list[str]:
    return sorted(ln for ln in lines if "kpe_t_bad" in ln or "kpe_t_victim" in ln or "evil" in ln)


def _uprobe_lines() -> list[str]:
    return (TRACEFS / "uprobe_events").read_text().splitlines()


@pytest.fixture(scope="module")
def outcomes(tracefs: Path, progs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        dict[str, Outcome]]:
    tmp = tmp_path_factory.mktemp("bad")
    write_event(f"p:{VICTIM} {progs['pie']}:0x1000")
    held_cfg = tmp / "held.yaml"
    held_cfg.write_text(f"instance: {HELD}\nprobes:\n  - {{name: a, uprobe: '{progs['pie']}:compute'}}\n")
    try:
        with running_agent(held_cfg):
            held_defs = group_definitions(HELD)
            before = _ours(_uprobe_lines())
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda c: _run_case(c, tmp, progs), CASES))
            after = _ours(_uprobe_lines())
            assert after == before, "uprobe_events changed in our groups or gained an injected line"
            assert group_definitions(HELD) == held_defs, "the live agent's probes were touched"
        if os.environ.get("KPE_ERROR_TABLE"):
            Path(os.environ["KPE_ERROR_TABLE"]).write_text(markdown(results))
        yield {o.case.id: o for o in results}
    finally:
        try:
            write_event(f"-:{VICTIM}")
        except OSError:
            pass


@pytest.mark.root
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes: dict[str, Outcome], tracefs: Path) -> None:
    if case.id == "kernel-lacks-probe-kind" and HAS_KPROBES:
        pytest.skip("this kernel has kprobes")
    o = outcomes[case.id]
    lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in o.stderr, o.stderr
    assert o.rc == 2, (o.rc, o.stderr)
    assert len(lines) == 1, o.stderr
    line = lines[0]
    if case.names == "config":
        assert line.startswith(o.config + ": "), line
    elif case.names == "web":
        assert line.startswith(o.web + ": "), line
    else:
        assert line.startswith("kprobe-exporter: "), line
    needle = _fmt(case.needle, **o.kw)
    assert needle in line, line
    if case.probe:
        assert re.search(rf"\b(probe|pair) '{re.escape(case.probe)}'|probe {re.escape(case.probe)}\b", line), line
    if case.field:
        assert f"field '{case.field}'" in line, line
    if case.suggestion:
        assert line.endswith(case.suggestion) or case.suggestion + ";" in line, line
    # nothing installed: no instance, no definition of the case's group (the held one: only the agent's)
    if case.how != "held":
        assert not (tracefs / "instances" / case.inst).exists(), line
        assert not group_definitions(case.inst), line
    assert not list((tracefs / "instances").glob("kpe_check_*"))


def test_catalogue_size_and_readme() -> None:
    """At least 30 cases, and the README's 'Error messages' section lists each one's message."""
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Error messages", 1)[1].split("\n## ", 1)[0]
    for case in CASES:
        assert f"`{case.id}`" in section, case.id
        needle = _fmt(case.needle, pie="/usr/local/bin/app", stripped="/usr/local/bin/app-stripped", inst="kpe",
                      port="10111").replace(HELD, "kpe")
        assert _md(needle) in section, (case.id, needle)


# --- the README table -------------------------------------------------------------------------------
def _md(text: str) -> str:
    return text.replace("|", "\\|")


def normalise(o: Outcome) -> str:
    line = next((ln for ln in o.stderr.splitlines() if ln.strip()), "")
    line = line.replace(o.config, "cfg.yaml")
    if o.web:
        line = line.replace(o.web, "web.yml")
    line = line.replace(o.kw["stripped"], "/usr/local/bin/app-stripped").replace(o.kw["pie"], "/usr/local/bin/app")
    line = line.replace(o.case.inst, "kpe").replace(o.kw["port"], "10111")
    return line


def markdown(results: list[Outcome]) -> str:
    out = ["| area | case | the one line on stderr (exit code 2) |", "| --- | --- | --- |"]
    for o in results:
        note = f" *({o.case.note})*" if o.case.note else ""
        out.append(f"| {o.case.area} | `{o.case.id}`{note} | `{_md(normalise(o))}` |")
    return "\n".join(out) + "\n"
