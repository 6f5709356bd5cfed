"""Real Prometheus (and a real agent) for tests.

`prometheus_server(targets)` starts Debian's /usr/bin/prometheus on a free loopback port with a
temporary config that scrapes `targets`, waits until it is ready, yields its base URL and stops
it (by its own pid) on exit. `query()` runs an instant query through the HTTP API.
`exporter_process(port)` runs `python -m kprobe_exporter run` on loopback for the duration of a
`with` block. Nothing here ever talks to an address outside 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ROOT = Path(__file__).resolve().parent.parent

# The metric names the agent's contract promises (histograms as their series names).
CONTRACT_METRICS = frozenset(
    {
        "kprobe_events_total",
        "kprobe_latency_seconds_bucket",
        "kprobe_latency_seconds_sum",
        "kprobe_latency_seconds_count",
        "kprobe_exporter_lines_read_total",
        "kprobe_exporter_parse_errors_total",
        "kprobe_exporter_lost_events_total",
        "kprobe_exporter_pairs_pending",
        "kprobe_exporter_pairs_evicted_total",
        "kprobe_exporter_pairs_unmatched_total",
        "kprobe_exporter_label_overflow_total",
        "kprobe_exporter_probe_info",
        "kprobe_exporter_probe_installed",
        "kprobe_exporter_probe_hits_total",
        "kprobe_exporter_probe_misses_total",
        "kprobe_exporter_build_info",
        "kprobe_exporter_spans_exported_total",
        "kprobe_exporter_spans_dropped_total",
        "kprobe_exporter_last_read_timestamp_seconds",
    }
)


def prometheus_available() -> bool:
    return os.access(PROMETHEUS, os.X_OK)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    assert url.startswith(("http://127.", "http://localhost", "http://[::1]")), url
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def prometheus_server(
    targets: list[str],
    scrape_interval: str = "1s",
    *,
    job: str = "kprobe-exporter",
    rule_files: Sequence[Path] = (),
    evaluation_interval: str = "1s",
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Start a real Prometheus scraping `targets` (host:port); yield its base URL."""
    if not prometheus_available():
        raise RuntimeError(f"prometheus binary not found at {PROMETHEUS}")
    for target in targets:
        host = target.rsplit(":", 1)[0].strip("[]")
        assert host in ("127.0.0.1", "localhost", "::1"), f"loopback targets only: {target}"
    workdir = Path(tempfile.mkdtemp(prefix="prom-test-"))
    port = free_port()
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            "--enable-feature=exemplar-storage",
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {proc.returncode}: "
                    + (workdir / "prometheus.log").read_text(errors="replace")[-3000:]
                )
            return http_get(base_url + "/-/ready", timeout=2)[0] == 200

        wait_until(ready, timeout=60, what="prometheus /-/ready")
        yield base_url
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def api(base_url: str, path: str, params: dict[str, str] | list[tuple[str, str]]) -> Any:
    status, body = http_get(f"{base_url}{path}?{urllib.parse.urlencode(params)}", timeout=30)
    payload = json.loads(body)
    if status != 200 or payload.get("status") != "success":
        raise RuntimeError(f"{path} {params}: HTTP {status}: {payload.get('error', body[:500])}")
    return payload["data"]


def query(base_url: str, promql: str, at: float | None = None) -> list[dict[str, Any]]:
    """Instant query; returns the result list (vector or matrix), raises on a PromQL error."""
    params = {"query": promql}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = api(base_url, "/api/v1/query", params)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return list(data["result"])


def query_range(base_url: str, promql: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
    data = api(
        base_url, "/api/v1/query_range", {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step}
    )
    return list(data["result"])


def label_values(base_url: str, label: str, match: str) -> list[str]:
    return list(api(base_url, f"/api/v1/label/{label}/values", [("match[]", match)]))


def target_health(base_url: str) -> list[dict[str, Any]]:
    return list(api(base_url, "/api/v1/targets", {"state": "active"})["activeTargets"])


def wait_for_scrapes(base_url: str, target: str, samples: int, timeout: float = 60.0) -> None:
    """Wait until `up` of `target` has `samples` successful scrapes stored."""

    def enough() -> bool:
        result = query(base_url, f'count_over_time(up{{instance="{target}"}}[5m])')
        up = query(base_url, f'up{{instance="{target}"}}')
        return bool(result) and float(result[0]["value"][1]) >= samples and bool(up) and up[0]["value"][1] == "1"

    wait_until(enough, timeout=timeout, interval=0.5, what=f"{samples} scrapes of {target}")


def agent_available() -> bool:
    """True once the agent package is importable and its CLI answers --help."""
    if not (ROOT / "kprobe_exporter" / "__main__.py").exists():
        return False
    result = subprocess.run(
        [sys.executable, "-m", "kprobe_exporter", "--help"], cwd=ROOT, capture_output=True, timeout=60
    )
    return result.returncode == 0


@contextlib.contextmanager
def exporter_process(
    port: int | None = None,
    *,
    config: Path | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
    prefix: Sequence[str] = (),
) -> Iterator[str]:
    """Run the agent on 127.0.0.1:port; yield "127.0.0.1:port" once /metrics serves.

    `prefix` wraps the command (e.g. setpriv with a reduced capability set)."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    cmd = [*prefix, sys.executable, "-m", "kprobe_exporter", "run", "--web.listen-address", address]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(extra_args)
    logfile = tempfile.NamedTemporaryFile(prefix="kprobe-exporter-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logfile, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def log_tail() -> str:
        return Path(logfile.name).read_text(errors="replace")[-4000:]

    try:

        def serving() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited with {proc.returncode}:\n{log_tail()}")
            status, body = http_get(f"http://{address}/metrics", timeout=2)
            return status == 200 and b"kprobe_exporter_build_info" in body

        wait_until(serving, timeout=ready_timeout, interval=0.3, what="agent /metrics")
        yield address
    finally:
        _stop(proc, timeout=30)
        logfile.close()
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"agent exited with {proc.returncode}:\n{log_tail()}")
        os.unlink(logfile.name)
