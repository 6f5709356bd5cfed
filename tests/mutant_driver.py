"""Runs mutmut's mutants of one function in process against chosen tests (tests/MUTANTS.md).

    mutmut run --max-children 1 "kprobe_exporter.raw.pages.x__walk*"   # once: writes mutants/
    python3 tests/mutant_driver.py kprobe_exporter.raw.pages x__walk__mutmut_ \\
        tests/unit/test_raw_pages.py::test_random_pages_decode_to_what_was_written

Each mutant of the function (ONLY=3,7 for some) is switched on through MUTANT_UNDER_TEST, mutmut's
trampoline, and the tests are called (a parametrized test once per value, a 20 s alarm for mutants that
loop); a mutant that makes one of them raise is killed. Survivors are listed by number at the end.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _tests(specs: list[str]) -> list[Callable[[], Any]]:
    out: list[Callable[[], Any]] = []
    for spec in specs:
        path, _, name = spec.partition("::")
        fn = getattr(importlib.import_module(Path(path).stem), name)
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        if not marks:
            out.append(fn)
            continue
        arg, values = marks[0].args[0], marks[0].args[1]
        out += [lambda fn=fn, arg=arg, v=v: fn(**{arg: v}) for v in values]
    return out


def _alarm(*_: object) -> None:
    raise TimeoutError


def main(module: str, prefix: str, specs: list[str]) -> int:
    sys.path[:0] = [str(ROOT / "mutants"), str(ROOT / "tests"), str(ROOT / "tests" / "unit")]
    os.chdir(ROOT)
    mod = importlib.import_module(module)
    if not str(mod.__file__).startswith(str(ROOT / "mutants")):
        sys.exit(f"{module} is not mutmut's copy: run mutmut once first")
    names = sorted((n for k, v in vars(mod).items() if k.startswith("mutants_") and isinstance(v, dict)
                    for n in v if n.startswith(prefix)), key=lambda n: int(n.rsplit("_", 1)[1]))
    only = os.environ.get("ONLY")
    if only:
        names = [n for n in names if n.rsplit("_", 1)[1] in only.split(",")]
    tests = _tests(specs)
    os.environ["MUTANT_UNDER_TEST"] = ""
    for t in tests:  # they pass unmutated
        t()
    signal.signal(signal.SIGALRM, _alarm)
    survivors = []
    for n in names:
        os.environ["MUTANT_UNDER_TEST"] = f"{module}.{n}"
        killed = False
        for t in tests:
            signal.alarm(20)
            try:
                t()
            except BaseException:
                killed = True
            finally:
                signal.alarm(0)
            if killed:
                break
        if not killed:
            survivors.append(n.rsplit("_", 1)[1])
    print(f"{len(names)} mutants, {len(names) - len(survivors)} killed, {len(survivors)} survived")
    print("survivors:", " ".join(survivors))
    return 0


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
