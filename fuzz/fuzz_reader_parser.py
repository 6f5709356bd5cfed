"""atheris fuzz target: reader -> parser -> aggregate.feed, columnar against per-line.

Each input goes through a real TracePipeReader (over a pipe), every line through parser.parse_line,
and the chunks the reader hands on through three aggregates: the columnar one, the same with the
per-line path forced, and tests/ref_aggregate.py (the semantics as the simplest loop). Nothing may
raise but ParseError, the reader must hand on exactly the input's complete lines, every line must
be accounted for (an event, a LOST line, or a parse error by reason), and the three must agree.

    python3 fuzz/fuzz_reader_parser.py -runs=1000000 fuzz/corpus   # at length (see bench/README.md)
    python3 fuzz/fuzz_reader_parser.py -runs=20000                  # briefly

tests/unit/test_fuzz.py runs `one_input` over a fixed set of inputs in CI, without atheris.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from feeding import feed_text  # noqa: E402
from kprobe_exporter import config, parser, probes  # noqa: E402
from kprobe_exporter.aggregate import Aggregate, CompletedPair  # noqa: E402
from kprobe_exporter.reader import MIN_FREE, TracePipeReader  # noqa: E402
from kprobe_exporter.text import TextSource  # noqa: E402
from ref_aggregate import RefAggregate  # noqa: E402

try:
    import atheris
except ImportError:  # tests/unit/test_fuzz.py runs one_input without atheris
    atheris = None


def _instrument() -> None:
    """Coverage for the fuzzer from the code that branches per line: the parser, the reader, the
    per-line paths of the aggregate and the reference loop. Not from code that compares numpy
    arrays with Python operators: atheris's comparison hook leaks each such result (13 KB an input
    here, libFuzzer's 2 GB RSS limit after ~150k inputs); those paths are still run and checked."""
    assert atheris is not None
    funcs = [parser.parse_head, parser.parse_lost, parser.parse_line, parser.event_token, parser.dispatch_key,
             parser.arg_picker, parser.probe_arg_reader, parser.tracepoint_arg_reader, parser.retval_of,
             TracePipeReader.read_chunk, TracePipeReader._fill, TextSource._parse_lines, Aggregate._pair_lines,
             Aggregate._span, Aggregate._sweep, Aggregate._evict_capacity, TextSource._resolve, Aggregate.drop_pending]
    funcs += [v for v in vars(RefAggregate).values() if callable(v)]
    for f in funcs:
        atheris.instrument_func(f)


CFG = """
label_limit: 4
pending: {max_pending: 9, max_age: 2s}
probes:
  - name: f
    uprobe: /bin/x:0x10
    args: {s: "+0(%di):string", n: "%si:s32"}
    labels: [s, comm]
    latency: true
  - name: openat
    tracepoint: syscalls/sys_enter_openat
    latency: true
  - name: a_long_event_name_of_more_than_sixteen_bytes
    uprobe: /bin/x:0x30
    latency: true
  - name: tick
    tracepoint: sched/sched_switch
"""
_cfg = config.load_text(CFG)
_ps = probes.build_probe_set(_cfg, resolve=None)


class _Sampling:
    sample_ratio = 1.0
    min_duration_ns = 0


def _make(cls: type, min_columnar: int | None = None) -> tuple[object, list[CompletedPair]]:
    agg = cls(_ps, _cfg.buckets, _cfg.label_limit, _cfg.pending.max_pending, _cfg.pending.max_age)
    if min_columnar is not None:
        agg.min_columnar = min_columnar
    spans: list[CompletedPair] = []
    agg.set_sink("f", _Sampling(), spans.append)
    return agg, spans


def read_all(data: bytes, bufsize: int) -> list[bytes]:
    """The chunks a TracePipeReader hands on for `data` arriving through a pipe."""
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        os.write(w, data)  # inputs stay below the pipe's 64 KB
        os.close(w)
        w = -1
        reader = TracePipeReader(f"/proc/self/fd/{r}", bufsize=bufsize, batch_s=0)
        try:
            out = []
            for _ in range(len(data) + 2):
                chunk = reader.read_chunk(0)
                if not chunk:
                    break
                out.append(chunk)
            return out
        finally:
            reader.close()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def one_input(data: bytes) -> None:
    data = data[:60000]
    bufsize = 32768 if len(data) % 2 else 1 << 20
    chunks = read_all(data, bufsize)
    joined = b"".join(chunks)
    assert data.startswith(joined), "the reader lost or reordered bytes"
    if max(map(len, data.split(b"\n"))) + 1 < bufsize - MIN_FREE:  # longer lines are handed on in pieces
        assert joined == data[: data.rfind(b"\n") + 1], "the reader kept a complete line back"
    lines = 0
    for chunk in chunks:
        for line in chunk.split(b"\n"):
            if line and line[0] != 0x23:
                lines += 1
                try:
                    parser.parse_line(line)
                except parser.ParseError as e:
                    assert e.reason in parser.REASONS
    fast, fast_spans = _make(Aggregate, 0)
    slow, slow_spans = _make(Aggregate, 1 << 30)
    ref, ref_spans = _make(RefAggregate)
    for chunk in chunks:
        feed_text(fast, chunk)  # type: ignore[arg-type]
        feed_text(slow, chunk)  # type: ignore[arg-type]
        ref.feed(chunk)  # type: ignore[attr-defined]
    want = ref.snapshot()  # type: ignore[attr-defined]
    for got, spans in ((fast.snapshot(), fast_spans), (slow.snapshot(), slow_spans)):  # type: ignore[attr-defined]
        assert got.lines_read == want.lines_read == lines
        assert got.parse_errors == want.parse_errors
        assert got.lost == want.lost
        assert got.events == want.events
        assert got.label_overflow == want.label_overflow
        assert {k: vars(v) for k, v in got.pairs.items()} == {k: vars(v) for k, v in want.pairs.items()}
        assert spans == ref_spans
    events = sum(got.events.values()) + sum(p.count + p.unmatched + p.pending + sum(p.evicted.values())
                                            for n, p in got.pairs.items())
    assert got.lines_read >= sum(got.parse_errors.values()) + (events > 0)


def seeds() -> list[bytes]:
    """A starting corpus: real traces of three kernels and lines of every kind the target knows."""
    out = []
    for p in sorted((REPO / "tests" / "fixtures").rglob("*")):
        if p.is_file():
            text = p.read_bytes()
            out += [text[i : i + 4000] for i in range(0, min(len(text), 40000), 4000)]
    h = b"             app-4242    [001]  12345.678901: "
    out.append(b"\n".join(h + b for b in (b'f: (0x55) s="/x" n=1', b'f: (0x55) s="/x" n=2',
                                          b"f_ret: (0x56 <- 0x55) ret=0x0", b"f_ret: (0x56 <- 0x55) ret=0x0",
                                          b"sys_openat(dfd: 0xffffff9c, filename: 0x1, flags: 0, mode: 0)",
                                          b"sys_openat -> 0x3", b"CPU:0 [LOST 3 EVENTS]",
                                          b"a_long_event_name_of_more_than_sixteen_bytes: (0x1)",
                                          b"a_long_event_name_of_more_than_sixteen_bytes_ret: (0x2 <- 0x1)",
                                          b"sched_switch: prev_comm=a")) + b"\n")
    return out


def main() -> None:
    assert atheris is not None, "pip install atheris"
    _instrument()
    corpus = Path(__file__).parent / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        for i, s in enumerate(seeds()):
            (corpus / f"seed{i:03d}").write_bytes(s)

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(str(corpus))  # the seeds (and what the fuzzer finds) live in fuzz/corpus
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
