"""Ask the running kernel about each definition line of a corpus: accepted (and listed back how), or refused (why).

Standard library only: it runs inside the kernel-lab guest.

    python3 tests/probe_corpus.py CORPUS_JSON OUT_JSON

CORPUS_JSON is a list of [FILE, LINE] (FILE: dynamic_events, kprobe_events or uprobe_events under tracefs).
Each line is written alone to a clean error_log; OUT_JSON gets, per line: "accepted", the lines that
appeared in dynamic_events ("listed", the kernel's own form of the definition), or the write's errno and
the error_log text (the kernel's words and caret). An accepted line is removed before the next.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from raw_capture import ROOT, write  # sent into the guest alongside (make_612_fixtures.py)


def ask(probe_file: str, line: str) -> dict[str, object]:
    write(ROOT / "error_log", "", append=False)  # an empty write clears it
    before = set((ROOT / "dynamic_events").read_text().splitlines())
    result: dict[str, object] = {"file": probe_file, "line": line}
    try:
        write(ROOT / probe_file, line + "\n", append=True)
    except OSError as e:
        result.update(accepted=False, errno=e.errno, error=os.strerror(e.errno or 0))
        result["error_log"] = (ROOT / "error_log").read_text()
        return result
    listed = [ln for ln in (ROOT / "dynamic_events").read_text().splitlines() if ln not in before]
    result.update(accepted=True, listed=listed)
    for ln in listed:
        event = ln.split()[0].split(":", 1)[1]
        write(ROOT / "dynamic_events", f"-:{event}\n", append=True)
    return result


if __name__ == "__main__":
    corpus = json.loads(Path(sys.argv[1]).read_text())
    answers = [ask(f, line) for f, line in corpus]
    Path(sys.argv[2]).write_text(json.dumps(answers, indent=1) + "\n")
