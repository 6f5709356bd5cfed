"""Spans: completed entry/return pairs become OTLP spans, queued off the hot path and shipped in batches.

The hot path calls `SpanShipper.sink(pair)`: one length check and one deque append. A background
thread drains the queue in batches, converts trace-clock timestamps to wall time (`MonoToWall`),
encodes the batch straight into the OTLP protobuf wire format (no per-span SDK objects: about 4x
cheaper than ReadableSpan + the SDK encoder) and hands the bytes to the OTLP exporter of
opentelemetry-exporter-otlp, gRPC or HTTP, so endpoint, headers, timeout, compression and
certificates come from the standard OTEL_EXPORTER_OTLP_* variables, read by that library.

The protocol and the resource come from the environment as otlp_env says.

Accounting: once the shipper thread has stopped, every pair given to `sink` is counted exactly
once, in `exported` or in `dropped[reason]`, reason being queue_full, export_failed or shutdown.
Failed exports are not retried beyond the library's own retries, which end at its timeout.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from kprobe_exporter.config import SpanSettings
from kprobe_exporter.otlp_env import compression_off, otlp_protocol, resource_attributes

if TYPE_CHECKING:
    from kprobe_exporter.aggregate import CompletedPair

SCOPE_NAME = "kprobe_exporter"
DROP_REASONS = ("queue_full", "export_failed", "shutdown")


class MonoToWall:
    """Converts trace-clock nanoseconds (CLOCK_MONOTONIC by default) to Unix-epoch nanoseconds.

    The offset is measured as wall time minus the midpoint of two trace-clock reads (the tightest
    of a few tries) and re-measured every `refresh_s` seconds by `maybe_refresh`, so NTP slewing
    and steps reach the spans within that interval.
    """

    def __init__(self, clock: int = time.CLOCK_MONOTONIC, refresh_s: float = 10.0) -> None:
        self.clock = clock
        self.refresh_ns = int(refresh_s * 1e9)
        self.offset_ns = self.width_ns = 0
        self._next_refresh_ns = 0
        self.measure()

    def measure(self) -> int:
        best_width = best_offset = 0
        for attempt in range(5):
            before = time.clock_gettime_ns(self.clock)
            wall = time.time_ns()
            after = time.clock_gettime_ns(self.clock)
            if attempt == 0 or after - before < best_width:
                best_width, best_offset = after - before, wall - (before + after) // 2
        self.offset_ns = best_offset
        self.width_ns = best_width  # the true offset is within half of it: what a check may allow
        self._next_refresh_ns = after + self.refresh_ns
        return best_offset

    def maybe_refresh(self) -> None:
        if time.clock_gettime_ns(self.clock) >= self._next_refresh_ns:
            self.measure()

    def to_wall_ns(self, trace_ns: int) -> int:
        return trace_ns + self.offset_ns


_ERRNO_MAX = 4095
_HEX_ERRNO_MIN = (1 << 64) - _ERRNO_MAX


def negative_errno(retval: str | None) -> int | None:
    """The errno a return value encodes, if it is one: "-2" or "0xfffffffffffffffe" give 2."""
    if not retval:
        return None
    if retval[0] == "-":
        try:
            value = int(retval)
        except ValueError:
            return None
        return -value if -_ERRNO_MAX <= value <= -1 else None
    if len(retval) == 18 and retval[:2] in ("0x", "0X"):
        try:
            value = int(retval, 16)
        except ValueError:
            return None
        return (1 << 64) - value if value >= _HEX_ERRNO_MIN else None
    return None


def errno_name(number: int) -> str:
    return errno.errorcode.get(number, f"E{number}")


# ---- OTLP wire format ---------------------------------------------------------------------------
# Field numbers from opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto. A tag
# byte is (field << 3) | wire type; 2 = length-delimited, 0 = varint, 1 = fixed64.

_BYTE = [bytes((i,)) for i in range(128)]
_pack_times = struct.Struct("<BQBQ").pack  # Span.start_time_unix_nano (7), end_time_unix_nano (8)
_KIND_INTERNAL = b"\x30\x01"  # Span.kind (6) = SPAN_KIND_INTERNAL
_STATUS_ERROR = 2


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _key(key: str) -> bytes:
    """KeyValue.key (1), to be followed by the value."""
    return _field(b"\x0a", key.encode())


def _str_attr(key: bytes, value: str) -> bytes:
    """Span.attributes (9) entry: KeyValue{key, AnyValue{string_value (1)}}."""
    raw = value.encode("utf-8", "replace")
    n = len(raw)
    if n < 126:
        body = key + b"\x12" + _BYTE[n + 2] + b"\x0a" + _BYTE[n] + raw
    else:
        body = key + _field(b"\x12", _field(b"\x0a", raw))
    return b"\x4a" + _varint(len(body)) + body


def _int_attr(key: bytes, value: int) -> bytes:
    """Span.attributes (9) entry: KeyValue{key, AnyValue{int_value (3)}}."""
    any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    body = key + b"\x12" + _BYTE[len(any_value)] + any_value
    return b"\x4a" + _varint(len(body)) + body


def _any_value(value: object) -> bytes:
    if isinstance(value, bool):
        return b"\x10" + _BYTE[int(value)]
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    return _field(b"\x0a", str(value).encode("utf-8", "replace"))


_PID = _key("process.pid")
_TID = _key("thread.id")
_COMM = _key("process.executable.name")
_RETVAL = _key("kprobe.retval")
_ERROR_TYPE = _key("error.type")
_COMM_CACHE_MAX = 4096


class SpanRef(NamedTuple):
    trace_id: bytes
    start_ns: int  # wall clock
    end_ns: int


class OtlpSpanEncoder:
    """Encodes CompletedPairs as the bytes of an OTLP ExportTraceServiceRequest."""

    def __init__(
        self,
        resource: Mapping[str, object],
        policies: Mapping[str, SpanSettings] | None = None,
        scope_name: str = SCOPE_NAME,
    ) -> None:
        attrs = b"".join(_field(b"\x0a", _key(k) + _field(b"\x12", _any_value(v))) for k, v in resource.items())
        self._resource = _field(b"\x0a", attrs)  # ResourceSpans.resource (1) = Resource{attributes (1)}
        self._scope = _field(b"\x0a", _field(b"\x0a", scope_name.encode()))  # ScopeSpans.scope (1)
        self._errors_on = {name: p.error_on_negative_retval for name, p in (policies or {}).items()}
        self._heads: dict[tuple[str, str], bytes] = {}  # (pair, function) -> name, kind, code.function.name
        self._arg_keys: dict[str, bytes] = {}
        self._comms: dict[str, bytes] = {}

    def _head(self, pair: str, function: str) -> bytes:
        head = _field(b"\x2a", pair.encode()) + _KIND_INTERNAL + _str_attr(_key("code.function.name"), function)
        self._heads[pair, function] = head
        return head

    def encode_spans(
        self, pairs: Iterable[CompletedPair], offset_ns: int, latest: dict[str, SpanRef] | None = None
    ) -> list[bytes]:
        """One encoded ScopeSpans.spans (2) field per pair; `latest` gets each pair name's last span."""
        out: list[bytes] = []
        append = out.append
        heads, arg_keys, comms, errors_on = self._heads, self._arg_keys, self._comms, self._errors_on
        ids = random.randbytes
        for p in pairs:
            trace_id = ids(16)
            span_id = ids(8)
            start = p.start_ns + offset_ns
            end = p.end_ns + offset_ns
            head = heads.get((p.pair, p.function)) or self._head(p.pair, p.function)
            comm = comms.get(p.comm)
            if comm is None:
                if len(comms) >= _COMM_CACHE_MAX:
                    comms.clear()
                comm = comms[p.comm] = _str_attr(_COMM, p.comm)
            body = b"\x0a\x10" + trace_id + b"\x12\x08" + span_id + head + _pack_times(0x39, start, 0x41, end) + comm
            body += _int_attr(_TID, p.tid)
            if p.tgid >= 0:
                body += _int_attr(_PID, p.tgid)
            for name, value in p.args:
                key = arg_keys.get(name)
                if key is None:
                    key = arg_keys[name] = _key("kprobe.arg." + name)
                body += _str_attr(key, value)
            for name, value in p.where:
                key = arg_keys.get(name)
                if key is None:
                    key = arg_keys[name] = _key(name)  # an OTel name (dotted): never an arg's name
                body += _str_attr(key, value)
            retval = p.retval
            if retval is not None:
                body += _str_attr(_RETVAL, retval)
                if errors_on.get(p.pair, True) and (err := negative_errno(retval)) is not None:
                    name = errno_name(err)
                    body += _str_attr(_ERROR_TYPE, name)
                    # Span.status (15) = Status{message (2), code (3) = STATUS_CODE_ERROR}
                    body += _field(b"\x7a", _field(b"\x12", name.encode()) + b"\x18" + _BYTE[_STATUS_ERROR])
            append(b"\x12" + _varint(len(body)) + body)
            if latest is not None:
                latest[p.pair] = SpanRef(trace_id, start, end)
        return out

    def request(self, spans: Sequence[bytes]) -> bytes:
        """An ExportTraceServiceRequest{resource_spans (1)} holding the encoded spans."""
        scope_spans = _field(b"\x12", self._scope + b"".join(spans))
        return _field(b"\x0a", self._resource + scope_spans)

    def encode(self, pairs: Iterable[CompletedPair], offset_ns: int = 0) -> bytes:
        return self.request(self.encode_spans(pairs, offset_ns))


# ---- transports -----------------------------------------------------------------------------------


class Transport(Protocol):
    def send(self, body: bytes, count: int) -> bool:
        """Send one serialized ExportTraceServiceRequest of `count` spans; True when accepted."""
        ...

    def shutdown(self) -> None: ...


class GrpcTransport:
    """The library's gRPC OTLPSpanExporter (env, channel, credentials, retries within the timeout)
    with its stub swapped for one that sends already serialized requests."""

    def __init__(self) -> None:
        # Imported here, as in HttpTransport: only the configured protocol's stack gets loaded.
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        class _RawStub:
            def __init__(self, channel: grpc.Channel) -> None:
                self.Export = channel.unary_unary(
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                    request_serializer=None,  # the request is already bytes
                    response_deserializer=ExportTraceServiceResponse.FromString,
                )

        class _BytesExporter(OTLPSpanExporter):
            def _initialize_channel_and_stub(self) -> None:
                super()._initialize_channel_and_stub()  # type: ignore[no-untyped-call]
                self._client = _RawStub(self._channel)  # type: ignore[assignment]

            def _translate_data(self, data: Any) -> Any:
                return data[0]

            def _count_data(self, data: Any) -> int:
                return int(data[1])

        from opentelemetry.sdk.trace.export import SpanExportResult

        self._success = SpanExportResult.SUCCESS
        # The gRPC exporter rejects compression "none" (the HTTP one accepts it): say it ourselves.
        none = grpc.Compression.NoCompression if compression_off() else None
        self._exporter = _BytesExporter(compression=none)

    def send(self, body: bytes, count: int) -> bool:
        return bool(self._exporter._export((body, count)) is self._success)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        self._exporter.shutdown()


class HttpTransport:
    """The library's HTTP/protobuf OTLPSpanExporter (env, session, retries within the timeout); the
    serialized request goes to its client, which compresses, posts and retries."""

    def __init__(self) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        self._exporter = OTLPSpanExporter()

    def send(self, body: bytes, count: int) -> bool:
        return bool(self._exporter._client.export(body).success)

    def shutdown(self) -> None:
        self._exporter.shutdown()  # type: ignore[no-untyped-call]


def transport_from_env(env: Mapping[str, str] = os.environ) -> Transport:
    return GrpcTransport() if otlp_protocol(env) == "grpc" else HttpTransport()


# ---- the queue and its shipper ------------------------------------------------------------------


class SpanExemplar(NamedTuple):
    trace_id: str  # 32 hex digits
    duration_s: float
    timestamp_s: float  # wall clock (Unix seconds) at the span's end


class SpanShipper:
    """Bounded queue of completed pairs plus the thread that ships them as OTLP spans.

    `sink` is the hot-path entry, for one producer thread; `exported`, `dropped`, `queued` and
    `exemplar()` are for the metrics collector and may be read from any thread without locking.
    Worst-case memory is max_queue pairs (about 0.5 KB each with two args) plus one batch.
    """

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        policies: Mapping[str, SpanSettings] | None = None,
        resource: Mapping[str, object] | None = None,
        clock: MonoToWall | None = None,
        max_queue: int = 65536,
        batch_size: int = 4096,
        max_request_bytes: int = 3 << 20,
        interval_s: float = 1.0,
        poll_s: float = 0.05,
    ) -> None:
        self._transport = transport if transport is not None else transport_from_env()
        self._encoder = OtlpSpanEncoder(resource if resource is not None else resource_attributes(), policies)
        self._clock = clock if clock is not None else MonoToWall()
        self._queue: deque[CompletedPair] = deque()
        self.max_queue = max_queue
        self._batch_size = batch_size
        self._max_request_bytes = max_request_bytes
        self._interval_s = interval_s
        self._poll_s = poll_s
        self.exported = 0
        self._queue_full = 0
        self._export_failed = 0
        self._shutdown_drops = 0
        self._late_drops = 0  # sunk after shutdown began; written by the sink's thread only
        self.exemplars: dict[str, SpanExemplar] = {}
        self._closed = False
        self._abandon = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kprobe-span-shipper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set_policies(self, policies: Mapping[str, SpanSettings]) -> None:
        """A reload's new per-pair settings (sampling itself happens in the aggregate)."""
        self._encoder._errors_on = {name: p.error_on_negative_retval for name, p in policies.items()}

    def sink(self, pair: CompletedPair) -> None:
        """Hot path: queue one completed pair, or count it dropped. O(1), never blocks or raises."""
        if self._closed:
            self._late_drops += 1
        elif len(self._queue) >= self.max_queue:
            self._queue_full += 1
        else:
            self._queue.append(pair)

    @property
    def dropped(self) -> dict[str, int]:
        return {
            "queue_full": self._queue_full,
            "export_failed": self._export_failed,
            "shutdown": self._shutdown_drops + self._late_drops,
        }

    @property
    def queued(self) -> int:
        return len(self._queue)

    def exemplar(self, pair: str) -> SpanExemplar | None:
        """A recently exported span of this pair, for a histogram exemplar."""
        return self.exemplars.get(pair)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, ship what is queued within `timeout_s`, count the rest as shutdown drops.

        Returns within timeout_s, plus up to 1 s when an export in flight has to be aborted."""
        self._closed = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._abandon = True
        if self._thread.is_alive():
            self._transport.shutdown()  # aborts the library's retry backoff, closes the channel
            self._thread.join(min(1.0, timeout_s))
        else:
            self._transport.shutdown()
        dropped = 0
        while True:
            try:
                self._queue.popleft()
            except IndexError:
                break
            dropped += 1
        self._shutdown_drops += dropped

    def _run(self) -> None:
        queue = self._queue
        next_flush = time.monotonic() + self._interval_s
        while not self._abandon:
            n = len(queue)
            stopping = self._stop.is_set()
            if n >= self._batch_size or (n and (stopping or time.monotonic() >= next_flush)):
                self._ship(min(n, self._batch_size))
                next_flush = time.monotonic() + self._interval_s
            elif stopping:
                return
            else:
                self._stop.wait(self._poll_s)

    def _ship(self, n: int) -> None:
        popleft = self._queue.popleft
        batch: list[CompletedPair] = []
        append = batch.append
        try:
            for _ in range(n):
                append(popleft())
        except IndexError:  # shutdown emptied the queue under us
            pass
        self._clock.maybe_refresh()
        latest: dict[str, SpanRef] = {}
        try:
            spans = self._encoder.encode_spans(batch, self._clock.offset_ns, latest)
        except Exception:
            self._export_failed += len(batch)
            return
        for chunk in _chunks(spans, self._max_request_bytes):
            try:
                ok = self._transport.send(self._encoder.request(chunk), len(chunk))
            except Exception:
                ok = False
            if ok:
                self.exported += len(chunk)
            else:
                self._export_failed += len(chunk)
                latest.clear()  # which chunk held which pair's latest span is not tracked
        for pair, ref in latest.items():
            self.exemplars[pair] = SpanExemplar(ref.trace_id.hex(), (ref.end_ns - ref.start_ns) / 1e9, ref.end_ns / 1e9)


def _chunks(spans: list[bytes], max_bytes: int) -> Iterable[list[bytes]]:
    """Consecutive runs of spans of at most max_bytes each (a larger single span goes alone)."""
    start = size = 0
    for i, span in enumerate(spans):
        if size + len(span) > max_bytes and i > start:
            yield spans[start:i]
            start, size = i, 0
        size += len(span)
    if start < len(spans):
        yield spans[start:]
