"""The one way tests hand trace text to an Aggregate, so its internals can change behind it."""

from __future__ import annotations

from kprobe_exporter.aggregate import Aggregate


def feed_text(agg: Aggregate, chunk: bytes) -> None:
    agg.feed(chunk)
