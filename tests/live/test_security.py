"""Security of the live agent: cardinality, transport, where it listens, what it writes, what it serves."""

from __future__ import annotations

import base64
import http.client
import os
import re
import shutil
import ssl
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_proc import value
from hard_helpers import logged_agent, nothing_left, run
from unit.test_web import DEBUG_PATHS, bcrypt_hash, make_cert

pytestmark = pytest.mark.root


def _label_names(text: str) -> set[str]:
    return {k for fam in text_string_to_metric_families(text) for s in fam.samples for k in s.labels}


def test_cardinality_caps_string_args_and_no_pid_labels(tracefs: Path, progs: dict[str, Path], tmp_path: Path) -> None:
    inst = "kpe_t_s_card"
    pie = progs["pie"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""instance: {inst}
label_limit: 5
probes:
  - {{name: opened, uprobe: '{pie}:open_path', args: {{path: '+0(%di):string'}}, labels: [path]}}
  - {{name: opened_quiet, uprobe: '{pie}:open_path', args: {{path: '+0(%di):string', flags: '%si:s32'}}}}
  - {{name: compute, uprobe: '{pie}:compute', args: {{a: '%di:s32'}}, labels: [comm], latency: true}}
  - {{name: openat, tracepoint: syscalls/sys_enter_openat, filter: 'comm == "fxgen"', latency: true}}
""")
    paths = [f"/tmp/kpe-sec-{i:02d}" for i in range(12)]
    with logged_agent(cfg, tmp_path / "agent.log") as agent:
        for p in paths:
            run(pie, "open", 1, p)
        run(pie, "compute", 3)
        assert agent.wait_value("kprobe_events_total", 12, probe="opened_quiet") == 12
        assert agent.wait_value("kprobe_events_total", 12, probe="opened") == 12
        text = agent.scrape()
        # The cap: label_limit values, then __overflow__, counted.
        kept = [p for p in paths if value(text, "kprobe_events_total", probe="opened", path=p)]
        assert kept == paths[:5]
        assert value(text, "kprobe_events_total", probe="opened", path="__overflow__") == 7
        assert value(text, "kprobe_exporter_label_overflow_total", probe="opened", label="path") == 7
        # A string arg that is not listed under labels never becomes one: no value of it anywhere.
        assert value(text, "kprobe_events_total", probe="opened_quiet") == 12
        for p in paths[5:]:
            assert p not in text
        quiet = [s for fam in text_string_to_metric_families(text) for s in fam.samples
                 if s.labels.get("probe") == "opened_quiet"]
        assert quiet and all(set(s.labels) == {"probe"} for s in quiet if s.name == "kprobe_events_total"), quiet
        # pid and tid are never labels, whatever the probe.
        names = _label_names(text)
        assert not names & {"pid", "tid", "tgid", "common_pid", "thread_id", "process_pid"}, names
        assert value(text, "kprobe_events_total", probe="compute", comm="fxgen") == 3
    assert nothing_left(inst)


def _agent_sockets(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    return inodes


def _decode(addr: str) -> tuple[str, int]:
    host, port = addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ".".join(str(b) for b in raw[::-1])
    else:  # four little-endian 32-bit words
        words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
        ip = str(__import__("ipaddress").IPv6Address(b"".join(words)))
    return ip, int(port, 16)


def _inet_sockets(pid: int) -> list[tuple[str, str, int, str]]:
    """(proto, ip, port, state) of every TCP/UDP socket the process holds."""
    mine = _agent_sockets(pid)
    out = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in mine:
                ip, port = _decode(cols[1])
                out.append((proto, ip, port, cols[3]))
    return out


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_listens_only_where_told(tracefs: Path, progs: dict[str, Path], tmp_path: Path, host: str) -> None:
    inst = "kpe_t_s_listen"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute'}}\n")
    url_host = f"[{host}]" if ":" in host else host
    with logged_agent(cfg, tmp_path / "agent.log", host=url_host) as agent:
        socks = _inet_sockets(agent.pid)
        listening = [x for x in socks if x[0].startswith("udp") or x[3] == "0A"]  # 0A: LISTEN
        assert listening == [("tcp6" if ":" in host else "tcp", host, agent.port, "0A")], socks
        assert all(x[2] == agent.port for x in socks), socks  # only its own port, no outgoing connections
        unix = [ln.split()[-1] for ln in Path(f"/proc/{agent.pid}/net/unix").read_text().splitlines()[1:]
                if ln.split()[6] in _agent_sockets(agent.pid)]
        assert unix == [f"@kprobe-exporter/{inst}"], unix  # the instance lock: abstract, never a file
    assert nothing_left(inst)


def test_tls_and_basic_auth_on_the_live_agent(tracefs: Path, progs: dict[str, Path], tmp_path: Path) -> None:
    inst = "kpe_t_s_tls"
    cert, key = make_cert(tmp_path)
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS13\n"
                   f"basic_auth_users:\n  prometheus: '{bcrypt_hash('scrape-me')}'\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute'}}\n")
    ctx = ssl.create_default_context(cafile=str(cert))
    good = _basic("prometheus", "scrape-me")
    with logged_agent(cfg, tmp_path / "agent.log", extra=["--web.config.file", str(web)], scheme="https",
                      ssl_context=ctx, headers=good) as agent:
        run(progs["pie"], "compute", 4)
        assert agent.wait_value("kprobe_events_total", 4, probe="compute") == 4
        for path in ("/metrics", "/healthz", "/"):
            assert agent.get(path)[0] == 200
            for headers in ({}, _basic("prometheus", "scrape-you"), _basic("root", "scrape-me")):
                code, body = agent.get(path, headers=headers)
                assert code == 401 and "kprobe" not in body, (path, headers, code)
        for path in DEBUG_PATHS:
            assert agent.get(path)[0] == 404, path
        tls12 = ssl.create_default_context(cafile=str(cert))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(urllib.error.URLError) as e:
            agent.get("/metrics", context=tls12)
        assert isinstance(e.value.reason, ssl.SSLError), e.value
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/metrics", timeout=10)
        assert agent.get("/metrics")[0] == 200  # none of that hurt it
    assert agent.proc.returncode == 0, agent.log()
    assert nothing_left(inst)


def test_no_debug_endpoints_on_the_live_agent(tracefs: Path, progs: dict[str, Path], tmp_path: Path) -> None:
    inst = "kpe_t_s_debug"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute'}}\n")
    with logged_agent(cfg, tmp_path / "agent.log") as agent:
        for path in DEBUG_PATHS:
            code, body = agent.get(path)
            assert code == 404 and "kprobe" not in body, path
        for method in ("POST", "PUT", "DELETE"):
            req = urllib.request.Request(agent.url + "/metrics", method=method, data=b"x")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 501
    assert nothing_left(inst)


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_writes_nothing_outside_tracefs(tracefs: Path, progs: dict[str, Path], tmp_path: Path) -> None:
    """Under strace, in a mount namespace where every filesystem but tracefs is read-only: the agent
    installs, counts, serves, reloads and removes, and never opens a file for writing, creates,
    renames or deletes one, anywhere but tracefs."""
    if shutil.which("strace") is None:
        pytest.fail("strace is needed (apt-get install strace)")
    inst = "kpe_t_s_files"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"instance: {inst}\nprobes:\n  - {{name: compute, uprobe: '{progs['pie']}:compute', "
                   "latency: true}\n  - {name: openat, tracepoint: syscalls/sys_enter_openat, "
                   "filter: 'comm == \"fxgen\"'}\n")
    readonly = ('set -e; findmnt -rn -o TARGET | while read -r m; do case "$m" in '
                '/sys/kernel/tracing|/proc|/proc/*|/mnt/sandboxing*) ;; '
                '*) mount -o remount,bind,ro "$m" 2>/dev/null || true;; esac; done; '
                'findmnt -n -o OPTIONS / | grep -q "^ro" || exit 99; exec "$@"')
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", readonly, "sh",
              "strace", "-f", "-qq", "-e",  # strace writes to stderr: the log, opened before the remount
              "trace=open,openat,openat2,creat,mkdir,mkdirat,rmdir,unlink,unlinkat,rename,renameat,renameat2,"
              "link,linkat,symlink,symlinkat,truncate,chmod,fchmodat,chown,fchownat,mknod,mknodat"]
    with logged_agent(cfg, tmp_path / "agent.log", prefix=prefix, env={"PYTHONDONTWRITEBYTECODE": "1"}) as agent:
        run(progs["pie"], "compute", 9)
        assert agent.wait_value("kprobe_events_total", 9, probe="compute") == 9
        agent.kill(1)  # SIGHUP: a reload (unchanged) reads the config again
        agent.wait_log("reload: the config is unchanged")
    assert agent.proc.returncode == 0, agent.log()
    assert nothing_left(inst)
    writes = []
    trace = agent.log()
    for line in trace.splitlines():
        m = re.search(r'\b(open|openat|openat2|creat|mkdir|mkdirat|rmdir|unlink|unlinkat|rename\w*|link\w*|symlink\w*|'
                      r'truncate|chmod|fchmodat|chown|fchownat|mknod\w*)\((?:AT_FDCWD, |\d+, )?"([^"]*)"(.*)$', line)
        if not m:
            continue
        call, path, rest = m.groups()
        if call.startswith("open") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", rest):
            continue  # a read (an attempt to write counts, even one the read-only root refused)
        if path.startswith(("/sys/kernel/tracing/", "/proc/self/fd/")) or path in ("/dev/null",):
            continue  # tracefs (through the agent's pinned descriptor, or by path)
        writes.append(line)
    assert not writes, writes
    assert "/proc/self/fd/" in trace  # the check saw the agent's tracefs writes
