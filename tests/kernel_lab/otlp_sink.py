"""In-guest OTLP receiver for the kernel-lab span test: tests/otlp_receiver.py's, run as a process.

    python3 otlp_sink.py PROTOCOL WANT NAME [TAIL_S]

PROTOCOL is grpc or http/protobuf. Writes NAME.env (the OTEL_* exports that point an exporter at it)
as soon as it listens, waits until WANT spans arrived (at most 180 s) and TAIL_S more (default 1: anything
beyond WANT, a bug, gets that long to arrive), writes them to NAME.json and exits. Both times are an
unloaded host's, scaled by $LAB_SLOW_PCT (labkit calibrate, the guest's measured slowness): the agent's
start alone takes over a minute in a guest on a loaded host.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.environ.get("LAB_IN", os.path.dirname(os.path.abspath(__file__))))

from otlp_receiver import GrpcReceiver, HttpReceiver


def main(protocol: str, want: int, name: str, tail_s: float = 1.0) -> None:
    receiver = GrpcReceiver() if protocol == "grpc" else HttpReceiver()
    with receiver:
        with open(f"{name}.env.tmp", "w") as f:
            f.write("".join(f"export {k}={v}\n" for k, v in receiver.env().items()))
        os.rename(f"{name}.env.tmp", f"{name}.env")
        slow = max(100, int(os.environ.get("LAB_SLOW_PCT", "100"))) / 100
        receiver.wait_for(want, timeout=180 * slow)
        time.sleep(tail_s * slow)  # anything beyond `want` (a bug) gets time to arrive
        spans = [asdict(s) for s in receiver.spans]
    with open(f"{name}.json", "w") as f:
        json.dump(spans, f, default=repr)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(float, sys.argv[4:5]))
