"""How tests feed an aggregate: the one place that knows the aggregate's way in.

feed_text takes trace text (what trace_pipe or a saved `trace` file holds, complete lines), parsed
by the text source the agent's text reader uses; feed_raw takes what the raw reader holds (a
fixture's decoded pages); feed_events what a reader returns. Tests call these, never the
aggregate's entry directly, so a change of that entry touches this file only.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from kprobe_exporter.aggregate import Aggregate
from kprobe_exporter.events import EventBatch
from kprobe_exporter.raw import args as raw_args
from kprobe_exporter.raw import pages as raw_pages
from kprobe_exporter.raw import reader as raw_reader
from kprobe_exporter.tasks import Tasks
from kprobe_exporter.text import TextSource

# One text source per aggregate, as a reader keeps one: what it learns (layouts, tokens) carries over.
_sources: WeakKeyDictionary[Aggregate, TextSource] = WeakKeyDictionary()


def text_source(agg: Aggregate, tasks: Tasks | None = None) -> TextSource:
    src = _sources.get(agg)
    if src is None or (tasks is not None and src.tasks is not tasks):
        src = _sources[agg] = TextSource(agg.probes, tasks)
    src.min_columnar = agg.min_columnar  # the differential tests force both paths through this knob
    return src


def feed_text(agg: Aggregate, chunk: bytes, tasks: Tasks | None = None) -> None:
    """Complete lines of trace text; `tasks` names a `<...>` comm as a live agent does (None: replay)."""
    for batch in text_source(agg, tasks).batches(chunk):
        agg.feed(batch)


def feed_events(agg: Aggregate, batch: EventBatch | None) -> None:
    """What a reader's read() or flush() returned (None: nothing)."""
    if batch is not None:
        agg.feed(batch)


def feed_raw(agg: Aggregate, batch: raw_pages.Batch, events: raw_args.RawEvents, tasks: Tasks | None = None) -> None:
    """A raw batch (decoded pages, records and all) with the events it was decoded for."""
    if len(batch):
        agg.feed(raw_reader.event_batch(batch, events, tasks or Tasks()))
