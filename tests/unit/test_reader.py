"""Reader: complete lines only, many reads per chunk, batching when quiet, errors that mean stop."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from feeding import feed_text
from kprobe_exporter import config, probes
from kprobe_exporter.aggregate import Aggregate
from kprobe_exporter.reader import MIN_FREE, ReaderError, TracePipeReader


@contextmanager
def pipe_reader(**kw: object) -> Iterator[tuple[TracePipeReader, int]]:
    r, w = os.pipe()
    reader = TracePipeReader(f"/proc/self/fd/{r}", **kw)  # type: ignore[arg-type]
    try:
        yield reader, w
    finally:
        reader.close()
        os.close(r)
        try:
            os.close(w)
        except OSError:
            pass


def test_hands_on_complete_lines_and_keeps_the_partial_one() -> None:
    with pipe_reader(batch_s=0) as (reader, w):
        os.write(w, b"one\ntwo\nthr")
        assert reader.read_chunk(0) == b"one\ntwo\n"
        assert reader.read_chunk(0) == b""
        os.write(w, b"ee\nfour")
        assert reader.read_chunk(0) == b"three\n"


def test_a_read_that_ends_mid_line_counts_that_line_once_when_it_is_complete() -> None:
    """trace_pipe may hand over part of a line: the part is not counted (its head could even parse and
    its event be paired), and once the rest arrives the whole line counts, once."""
    cfg = config.load_text("probes:\n  - name: f\n    uprobe: /bin/x:0x10\n    args: {n: \"%di:s32\"}\n"
                           "    labels: [n]\n    latency: true\n")
    agg = Aggregate(probes.build_probe_set(cfg, resolve=None), cfg.buckets)
    head = b"             app-7       [000] .....  1234.%06d: "
    entry = head % 100 + b"f: (0x1) n=123456"
    exit_ = head % 150 + b"f_ret: (0x2 <- 0x1) ret=0"
    with pipe_reader(batch_s=0) as (reader, w):
        os.write(w, entry + b"\n" + exit_[:60])  # the exit's head and name, not its end
        feed_text(agg, reader.read_chunk(0))
        snap = agg.snapshot()
        assert (snap.lines_read, snap.pairs["f"].count, snap.pairs["f"].pending) == (1, 0, 1)
        os.write(w, exit_[60:] + b"\n" + entry[:40])
        feed_text(agg, reader.read_chunk(0))
        snap = agg.snapshot()
        assert (snap.lines_read, snap.pairs["f"].count, snap.pairs["f"].pending) == (2, 1, 0)
        assert snap.pairs["f"].sum_ns == 50_000 and sum(snap.parse_errors.values()) == 0
        assert snap.events == {("f", (("n", "123456"),)): 1}


def test_one_chunk_holds_many_reads() -> None:
    lines = [b"x" * 70 + b"%06d" % i for i in range(2000)]  # ~150 KB: several pipe reads
    data = b"\n".join(lines) + b"\n"
    with pipe_reader(batch_s=0) as (reader, w):
        os.set_blocking(w, False)
        sent = 0
        got = []
        while sent < len(data) or sum(map(len, got)) < len(data):
            if sent < len(data):
                try:
                    sent += os.write(w, data[sent:])
                except BlockingIOError:
                    pass
            chunk = reader.read_chunk(0)
            if chunk:
                got.append(chunk)
        assert b"".join(got) == data
        assert len(got) < 10  # 64 KB a pipe fill, not one line or one read at a time


def test_a_line_longer_than_the_buffer_is_handed_on_in_pieces() -> None:
    with pipe_reader(bufsize=2 * MIN_FREE, batch_s=0) as (reader, w):
        os.set_blocking(w, False)
        data = b"y" * (3 * MIN_FREE) + b"\nz\n"
        sent = os.write(w, data)
        got = b""
        for _ in range(20):
            got += reader.read_chunk(0)
            if sent < len(data):
                sent += os.write(w, data[sent:])
        assert got == data


def test_a_quiet_moment_lets_events_gather() -> None:
    with pipe_reader(batch_s=0.05, batch_bytes=1 << 20) as (reader, w):
        os.write(w, b"a\n")
        assert reader.read_chunk(0) == b"a\n"  # a short drain: the next read waits batch_s
        os.write(w, b"b\n")
        t0 = time.monotonic()
        assert reader.read_chunk(1.0) == b"b\n"
        assert time.monotonic() - t0 >= 0.04


def test_nothing_to_read_waits_for_the_timeout_and_returns_empty() -> None:
    with pipe_reader(batch_s=0) as (reader, _w):
        t0 = time.monotonic()
        assert reader.read_chunk(0.05) == b""
        assert time.monotonic() - t0 >= 0.04


def test_a_read_that_cannot_succeed_raises_reader_error(tmp_path: object) -> None:
    reader = TracePipeReader("/proc/self")  # a directory: read() answers EISDIR
    try:
        with pytest.raises(ReaderError):
            reader.read_chunk(0)
    finally:
        reader.close()
