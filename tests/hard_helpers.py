"""Helpers for the fault, soak and security tests: an agent whose log goes to a file, and tracefs looks."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent_proc import REPO, free_port, group_definitions, value

TRACEFS = Path("/sys/kernel/tracing")


class LoggedAgent:
    """The real agent as a process; its log goes to a file (a pipe nobody reads would fill and block it)."""

    def __init__(self, config: Path, log: Path, port: int | None = None, extra: list[str] | None = None,
                 prefix: list[str] | None = None, env: dict[str, str] | None = None, host: str = "127.0.0.1",
                 scheme: str = "http", ssl_context: ssl.SSLContext | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.host = host
        self.scheme = scheme
        self.ssl_context = ssl_context
        self.headers = headers or {}
        self.log_path = log
        cmd = [*(prefix or []), sys.executable, "-m", "kprobe_exporter", "run", "--config", str(config),
               "--web.listen-address", f"{host}:{self.port}", *(extra or [])]
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._log,
                                     env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        """The agent's own pid: the process started, or its descendant when a wrapper (strace) forks."""
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop(0)
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if os.path.basename(argv[0]).startswith(b"python") and b"kprobe_exporter" in argv:
                    return pid
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                continue
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10, headers: dict[str, str] | None = None,
            context: ssl.SSLContext | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, headers=self.headers if headers is None else headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=context or self.ssl_context) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self) -> str:
        code, body = self.get("/metrics")
        assert code == 200, (code, body)
        return body

    def wait_ready(self, timeout: float = 30) -> LoggedAgent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log()}")
            try:
                if self.get("/healthz", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent did not become ready: {self.log()}")

    def wait_value(self, name: str, want: float, timeout: float = 20, **labels: str) -> float | None:
        """Scrape until the value reaches `want`; then once more after a pause, so extras show too."""
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = value(self.scrape(), name, **labels)
            if got is not None and got >= want:
                time.sleep(0.3)
                return value(self.scrape(), name, **labels)
            time.sleep(0.1)
        return got

    def wait_log(self, pattern: str, timeout: float = 20, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log()[start:])
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the log: {self.log()}")

    def kill(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)
        try:
            return self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait_exit(timeout)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@contextmanager
def logged_agent(config: Path, log: Path, **kw: object) -> Iterator[LoggedAgent]:
    agent = LoggedAgent(config, log, **kw)  # type: ignore[arg-type]
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.stop()


def run(*args: object, timeout: float = 120) -> None:
    subprocess.run([str(a) for a in args], check=True, timeout=timeout)


def event_id(instance: str, event: str, group: str | None = None) -> int | None:
    """The kernel's id of an event in an instance (a definition removed and made again gets a new one)."""
    p = TRACEFS / "instances" / instance / "events" / (group or instance) / event / "id"
    try:
        return int(p.read_text())
    except OSError:
        return None


def uprobe_hits(group: str, event: str) -> int | None:
    """Hits of one uprobe of a group (uprobe_profile): a definition made anew starts again from 0."""
    from kprobe_exporter.kinds import UPROBE_EVENTS
    from kprobe_exporter.tracefs import profile_rows

    rows = dict(profile_rows(TRACEFS, UPROBE_EVENTS, group))
    return int(rows[event][-1]) if event in rows else None


def enabled(instance: str, event: str, group: str | None = None) -> bool:
    p = TRACEFS / "instances" / instance / "events" / (group or instance) / event / "enable"
    try:
        return p.read_text().strip() == "1"
    except OSError:
        return False


def nothing_left(instance: str) -> bool:
    return not group_definitions(instance) and not (TRACEFS / "instances" / instance).exists()


def write_event(line: str) -> None:
    fd = os.open(TRACEFS / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def force_cleanup(instance: str) -> None:
    """After a failed test: remove what an agent of this instance left (as `kprobe-exporter cleanup`)."""
    subprocess.run([sys.executable, "-m", "kprobe_exporter", "cleanup", "--instance", instance], cwd=REPO,
                   capture_output=True, timeout=60)
