"""How tests feed an aggregate: the one place that knows the aggregate's way in.

feed_text takes trace text (what trace_pipe or a saved `trace` file holds, complete lines);
feed_raw takes what the raw reader yields. Tests call these, never the aggregate's entry directly,
so a change of that entry touches this file only.
"""

from __future__ import annotations

from kprobe_exporter import ringbuf
from kprobe_exporter.aggregate import Aggregate


def feed_text(agg: Aggregate, chunk: bytes) -> None:
    """Complete lines of trace text (a trailing partial line is dropped, as a reader would keep it)."""
    agg.feed(chunk)


def feed_raw(agg: Aggregate, batch: ringbuf.Batch) -> None:
    """A batch the raw reader (or a fixture's decoded pages) yields."""
    agg.feed_events(batch)
