"""The straightforward consumer a user would write: a regex per line, a counter per event, a stack per thread.

    python3 bench/reference.py TRACE

Counts events per name, pairs NAME/NAME_ret and sys_X(/sys_X per thread (LIFO), and puts the
durations into the same 24 exponential buckets the agent uses. Prints a summary the bench checks
against the agent's exposition, so both sides provably did the same work.
"""

from __future__ import annotations

import json
import re
import sys
from bisect import bisect_left
from collections import defaultdict

LINE = re.compile(rb"^.{16}-(\d+)\s.*?\[(\d+)\]\s.*?(\d+)\.(\d{6}): (\S+)")
BOUNDS_NS = [1000 * 2**i for i in range(24)]


def main(path: str) -> None:
    counts: dict[bytes, int] = defaultdict(int)
    stacks: dict[tuple[bytes, bytes], list[int]] = defaultdict(list)
    hist: dict[bytes, list[int]] = defaultdict(lambda: [0] * (len(BOUNDS_NS) + 1))
    unmatched: dict[bytes, int] = defaultdict(int)
    errors = 0
    with open(path, "rb") as f:
        for line in f:
            m = LINE.match(line)
            if m is None:
                errors += 1
                continue
            tid, _cpu, sec, usec, token = m.groups()
            ts = (int(sec) * 1_000_000 + int(usec)) * 1000
            p = token.find(b"(")
            if p >= 0:  # syscall enter: sys_openat(dfd:
                name, entry = token[:p], True
            elif token.endswith(b":"):
                name = token[:-1]
                entry = not name.endswith(b"_ret")
                if not entry:
                    name = name[:-4]
            else:  # syscall exit: sys_openat -> 0x3
                name, entry = token, False
            counts[name + (b"" if entry else b"_ret")] += 1
            stack = stacks[(name, tid)]
            if entry:
                stack.append(ts)
            elif stack:
                hist[name][bisect_left(BOUNDS_NS, ts - stack.pop())] += 1
            else:
                unmatched[name] += 1
    pending = defaultdict(int)
    for (name, _), s in stacks.items():
        pending[name] += len(s)
    print(json.dumps({"events": {k.decode(): v for k, v in sorted(counts.items())},
                      "pairs": {k.decode(): sum(v) for k, v in sorted(hist.items())},
                      "unmatched": {k.decode(): v for k, v in sorted(unmatched.items())},
                      "pending": {k.decode(): v for k, v in sorted(pending.items()) if v},
                      "errors": errors}))


if __name__ == "__main__":
    main(sys.argv[1])
