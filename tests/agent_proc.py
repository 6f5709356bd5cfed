"""Test helpers: run the real agent as a process, scrape it, and read its exposition."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

TRACEFS = Path("/sys/kernel/tracing")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text_or_samples: str | dict, name: str, **labels: str) -> float | None:
    s = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    want = frozenset(labels.items())
    hits = [v for (n, ls), v in s.items() if n == name and want <= ls]
    return sum(hits) if hits else None


class AgentProcess:
    def __init__(
        self, config: Path | None, port: int, extra: list[str] | None = None, env: dict[str, str] | None = None,
        pid_placeholder: bool = False,
    ) -> None:
        self.port = port
        cmd = [sys.executable, "-m", "kprobe_exporter", "run", "--web.listen-address", f"127.0.0.1:{port}"]
        if config is not None:
            cmd += ["--config", str(config)]
        cmd += extra or []
        if pid_placeholder and config is not None:
            # The config learns the agent's pid: sh writes its own pid, then execs the agent in its place.
            cmd = ["sh", "-c", f'sed -i "s/__AGENT_PID__/$$/g" {config} && exec "$@"', "sh", *cmd]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise AssertionError(f"agent exited {self.proc.returncode}: {err.decode()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("agent did not become ready")

    def scrape(self, accept: str | None = None) -> str:
        req = urllib.request.Request(self.url + "/metrics", headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def wait_value(self, name: str, want: float, timeout: float = 15, **labels: str) -> float | None:
        """Scrape until the value reaches `want` (the reader drains asynchronously)."""
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = value(self.scrape(), name, **labels)
            if got is not None and got >= want:
                time.sleep(0.3)  # let anything beyond `want` arrive too, so extras show
                return value(self.scrape(), name, **labels)
            time.sleep(0.1)
        return got

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err.decode()


@contextmanager
def running_agent(
    config: Path | None, extra: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[AgentProcess]:
    agent = AgentProcess(config, free_port(), extra, env)
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.stop()


def group_definitions(group: str) -> list[str]:
    lines = []
    for f in ("kprobe_events", "uprobe_events"):
        p = TRACEFS / f
        if p.exists():
            lines += [ln for ln in p.read_text().splitlines() if f":{group}/" in ln]
    return lines
