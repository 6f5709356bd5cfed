"""The fuzz target (fuzz/fuzz_reader_parser.py), briefly: seeds, seeded mutations, and atheris itself.

At length (a million inputs and more) it runs on demand: python3 fuzz/fuzz_reader_parser.py -runs=1000000
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "fuzz"))

import fuzz_reader_parser as target  # noqa: E402


def mutate(r: random.Random, s: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(s)
    for _ in range(r.randrange(1, 16)):
        if not b:
            break
        j = r.randrange(len(b))
        op = r.randrange(5)
        if op == 0:
            b[j] = r.randrange(256)
        elif op == 1:
            del b[j : j + r.randrange(1, 40)]
        elif op == 2:
            other = r.choice(pool)
            k = r.randrange(len(other) or 1)
            b[j:j] = other[k : k + r.randrange(1, 120)]
        elif op == 3:
            b[j:j] = b"\n"
        else:
            b[j] = r.choice(b" -[]:.()0123456789\n\"")
    return bytes(b)


def test_fuzz_target_on_seeds_and_seeded_mutations() -> None:
    seeds = target.seeds()
    for s in seeds:
        target.one_input(s)
    r = random.Random(7)
    for _ in range(1500):
        target.one_input(mutate(r, r.choice(seeds), seeds))


def test_atheris_runs_the_target_briefly(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, s in enumerate(target.seeds()):
        (corpus / f"seed{i:03d}").write_bytes(s)
    out = subprocess.run([sys.executable, str(REPO / "fuzz" / "fuzz_reader_parser.py"), "-runs=3000",
                          "-max_len=8192", str(corpus)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 3000 runs" in out.stderr
