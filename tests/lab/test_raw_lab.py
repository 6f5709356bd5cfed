"""The raw reader on real kprobes and kretprobes (Debian's 6.1 and 6.12 in the kernel lab), against the text
reader.

One guest runs two agents on the same probes, each in its own instance: one reads trace_pipe text, the
other (`--reader raw`) the per-CPU ring buffers. Both must count, label and pair kpe_opener's opens
exactly (a kernel filter on its comm keeps everyone else out).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent_proc import value
from kernel_lab.guest import KERNELS, require_guest, run_in_guest
from kernel_lab.labkit import MAX_SLOW_PCT

pytestmark = pytest.mark.kernel_lab

HERE = Path(__file__).resolve().parents[1]
BASE_S, BOOT_MARGIN_S = 60, 120.0  # the script's time on an unloaded host, times 4; the boot's allowance

CONFIG = """
instance: {instance}
aggregation: stream
probes:
  - name: open
    kprobe: do_sys_openat2
    args: {{dfd: "$arg1:s32", path: "+0($arg2):ustring"}}
    labels: [path]
    filter: 'comm == "kpe_opener"'
    latency: true
  - name: openat
    tracepoint: syscalls/sys_enter_openat
    filter: 'comm == "kpe_opener"'
    latency: true
"""

SCRIPT = r"""
set -u
export LAB_SLOW_PCT=$(python3 "$LAB_IN/labkit.py" calibrate)  # labkit's limits scale by the guest's speed
echo "$LAB_SLOW_PCT" > "$LAB_OUT/slow_pct"
chmod +x "$LAB_IN/kpe_opener"
port_text=9101
port_raw=9102
for kind in text raw; do
  port_var=port_$kind
  kprobe-exporter run --config "$LAB_IN/$kind.yaml" --reader $kind --web.listen-address "127.0.0.1:${!port_var}" \
      > "$LAB_OUT/$kind.log" 2>&1 &
  echo $! > "$LAB_OUT/$kind.pid"
done
python3 "$LAB_IN/labkit.py" ready 9101 "$(cat $LAB_OUT/text.pid)"
python3 "$LAB_IN/labkit.py" ready 9102 "$(cat $LAB_OUT/raw.pid)"
"$LAB_IN/kpe_opener" /etc/hostname 300
"$LAB_IN/kpe_opener" /nonexistent/x 40
for port in 9101 9102; do
  python3 "$LAB_IN/labkit.py" wait $port 340 kprobe_latency_seconds_count probe=open -- \
    340 kprobe_latency_seconds_count probe=openat
done
python3 "$LAB_IN/labkit.py" scrape 9101 > "$LAB_OUT/text.metrics"
python3 "$LAB_IN/labkit.py" scrape 9102 > "$LAB_OUT/raw.metrics"
for kind in text raw; do kill -TERM "$(cat $LAB_OUT/$kind.pid)"; done
wait
"""


@pytest.fixture(scope="module", params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> str:
    """Each lab kernel: their probes' formats differ (6.12 types an untyped $retval from BTF: `s64`)."""
    require_guest(request.param)  # pytest.fail with the exact reason when it cannot be had: never a skip
    return str(request.param)


def test_raw_and_text_readers_agree_on_real_kprobes(kernel: str, tmp_path: Path) -> None:
    opener = tmp_path / "kpe_opener"
    subprocess.run(["gcc", "-O1", "-static", "-o", str(opener), str(HERE / "progs" / "kpe_opener.c")], check=True)
    files = {
        "kpe_opener": opener.read_bytes(),
        "labkit.py": (HERE / "kernel_lab" / "labkit.py").read_bytes(),
        "text.yaml": CONFIG.format(instance="lab_raw_t").encode(),
        "raw.yaml": CONFIG.format(instance="lab_raw_r").encode(),
    }
    r = run_in_guest(SCRIPT, files=files, timeout=BOOT_MARGIN_S + BASE_S * MAX_SLOW_PCT / 100, kernel=kernel)
    print(f"\nkernel lab {kernel} (raw): boot {r.boot_seconds:.1f} s, whole {r.seconds:.1f} s, "
          f"slowness {r.files.get('slow_pct', b'?').decode().strip()} %", file=sys.stderr)
    assert r.returncode == 0, r.stdout[-4000:]
    raw_log = r.files["raw.log"].decode()
    assert "reader: raw (per-CPU trace_pipe_raw" in raw_log, raw_log
    t, w = r.files["text.metrics"].decode(), r.files["raw.metrics"].decode()
    for path, n in (("/etc/hostname", 300), ("/nonexistent/x", 40)):
        assert value(w, "kprobe_events_total", probe="open", path=path) == n == \
            value(t, "kprobe_events_total", probe="open", path=path)
    # (the generated return events carry no filter: other processes' returns come unmatched, as many as
    # each agent's lifetime saw, so those counts are not compared)
    for probe in ("open", "openat"):
        assert value(w, "kprobe_latency_seconds_count", probe=probe) == 340 == \
            value(t, "kprobe_latency_seconds_count", probe=probe)
        assert value(w, "kprobe_exporter_pairs_pending", probe=probe) == 0 == \
            value(t, "kprobe_exporter_pairs_pending", probe=probe)
    assert value(w, "kprobe_exporter_parse_errors_total") == 0
