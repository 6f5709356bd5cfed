"""The raw path: per-CPU ring-buffer pages read in binary and decoded into the event batches the
aggregate takes, as the text path's are.

formats  page layout and event `format` files (shared with tracefs' label checks)
pages    page decoding, cross-CPU merge
args     a record's args as its text prints them, from its format's fields
reader   the reader: per-CPU trace_pipe_raw, the watermark, the batch's records
"""

from kprobe_exporter.raw.formats import RawUnsupported as RawUnsupported
from kprobe_exporter.raw.reader import RawReader as RawReader
