"""Span export: clock conversion, errno detection, OTLP encoding, the bounded queue and real receivers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from kprobe_exporter.aggregate import CompletedPair
from kprobe_exporter.config import SpanSettings
from kprobe_exporter.spans import (
    GrpcTransport,
    HttpTransport,
    MonoToWall,
    OtlpSpanEncoder,
    SpanShipper,
    negative_errno,
)
from otlp_receiver import GrpcReceiver, HttpReceiver, ReceivedSpan, decode_request

RESOURCE = {"service.name": "test", "host.name": "h"}


def pair(i: int = 0, *, retval: str | None = "3", tgid: int = 4000, name: str = "open") -> CompletedPair:
    return CompletedPair(
        name, "do_sys_openat2", 4001 + i, tgid, "cat", 1_000_000 + i, 1_003_000 + i,
        (("dfd", "0xffffff9c"), ("filename", f"/etc/f{i}")), retval,
    )  # fmt: skip


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class FakeTransport:
    def __init__(self, ok: bool = True, block: threading.Event | None = None) -> None:
        self.ok = ok
        self.block = block
        self.requests: list[bytes] = []
        self.counts: list[int] = []
        self.closed = False

    def send(self, body: bytes, count: int) -> bool:
        if self.block is not None:
            self.block.wait()
        if self.ok:
            self.requests.append(body)
            self.counts.append(count)
        return self.ok

    def shutdown(self) -> None:
        self.closed = True
        if self.block is not None:
            self.block.set()

    def spans(self) -> list[ReceivedSpan]:
        return [s for body in self.requests for s in decode_request(ExportTraceServiceRequest.FromString(body))]


def accounted(shipper: SpanShipper) -> int:
    return shipper.exported + sum(shipper.dropped.values()) + shipper.queued


# ---- clock ------------------------------------------------------------------------------------


# No bound in ms that load can break: a trace-clock read taken between two wall-clock reads converts to
# a time between them, give or take the uncertainty of the converter's own measurement (its width_ns).
def bracketed(conv: MonoToWall, clock: int) -> None:
    for _ in range(100):
        w1 = time.time_ns()
        t = time.clock_gettime_ns(clock)
        w2 = time.time_ns()
        assert w1 - conv.width_ns <= conv.to_wall_ns(t) <= w2 + conv.width_ns, (w1, conv.to_wall_ns(t), w2)


def test_mono_to_wall_matches_clock_gettime() -> None:
    conv = MonoToWall()
    bracketed(conv, time.CLOCK_MONOTONIC)
    assert conv.to_wall_ns(0) == conv.offset_ns


def test_mono_to_wall_boottime() -> None:
    conv = MonoToWall(time.CLOCK_BOOTTIME)
    bracketed(conv, time.CLOCK_BOOTTIME)


def test_mono_to_wall_refresh_follows_a_wall_clock_step(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = MonoToWall(refresh_s=3600)
    before = conv.offset_ns
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + 5_000_000_000)
    conv.maybe_refresh()
    assert conv.offset_ns == before  # not due yet
    width = conv.width_ns
    conv.refresh_ns = 0
    conv.measure()  # sets the next refresh from refresh_ns
    conv.maybe_refresh()
    assert abs(conv.offset_ns - before - 5_000_000_000) <= width + conv.width_ns


# ---- errno, protocol, resource --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retval", "expected"),
    [
        ("-2", 2), ("-1", 1), ("-4095", 4095), ("-4096", None), ("0", None), ("3", None), ("-0", None),
        ("0xfffffffffffffffe", 2), ("0xfffffffffffff001", 4095), ("0xfffffffffffff000", None),
        ("0xffffffffffffffff", 1), ("0x3", None), ("0xfffffffe", None), ("-x", None), ("0xzzzzzzzzzzzzzzzz", None),
        ("", None), (None, None), ("(null)", None),
    ],
)  # fmt: skip
def test_negative_errno(retval: str | None, expected: int | None) -> None:
    assert negative_errno(retval) == expected


# ---- encoding ------------------------------------------------------------------------------------


def decode(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return request


def test_encoding_attributes_and_times() -> None:
    enc = OtlpSpanEncoder(RESOURCE)
    spans = decode_request(decode(enc.encode([pair(1), pair(2, retval="-2", tgid=-1)], offset_ns=10**18)))
    assert len(spans) == 2
    s = spans[0]
    assert s.name == "open" and s.kind == 1 and s.scope == "kprobe_exporter"
    assert s.resource == RESOURCE
    assert (s.start_ns, s.end_ns) == (10**18 + 1_000_001, 10**18 + 1_003_001)
    assert s.attributes == {
        "process.pid": 4000,
        "thread.id": 4002,
        "process.executable.name": "cat",
        "code.function.name": "do_sys_openat2",
        "kprobe.arg.dfd": "0xffffff9c",
        "kprobe.arg.filename": "/etc/f1",
        "kprobe.retval": "3",
    }
    assert s.status_code == 0
    e = spans[1]
    assert "process.pid" not in e.attributes
    assert e.attributes["kprobe.retval"] == "-2" and e.attributes["error.type"] == "ENOENT"
    assert (e.status_code, e.status_message) == (2, "ENOENT")
    assert len(s.trace_id) == 32 and len(s.span_id) == 16
    assert s.trace_id != e.trace_id and s.span_id != e.span_id


def test_where_the_thread_ran_is_encoded_under_its_otel_names() -> None:
    cid = "4c01db0b339c7c1f1a0e6f7c3b5b3e1d9a2f8e7d6c5b4a3928171605f4e3d2c1"
    where = (("container.id", cid), ("k8s.pod.uid", "1f2e3d4c-5b6a-4789-8abc-0123456789ab"))
    a, b = decode_request(decode(OtlpSpanEncoder(RESOURCE).encode([pair(1)._replace(where=where), pair(2)])))
    assert {k: v for k, v in a.attributes.items() if k in ("container.id", "k8s.pod.uid")} == dict(where)
    assert "container.id" not in b.attributes and "k8s.pod.uid" not in b.attributes


def test_encoding_edge_values() -> None:
    long = "x" * 70_000
    odd = CompletedPair("p", "f", 1, 2**31, "a b\udcff", 0, 2**63, (("s", long), ("e", "")), None)
    [s] = decode_request(decode(OtlpSpanEncoder(RESOURCE).encode([odd])))
    assert s.attributes["kprobe.arg.s"] == long and s.attributes["kprobe.arg.e"] == ""
    assert s.attributes["process.executable.name"] == "a b?"
    assert s.attributes["process.pid"] == 2**31 and "kprobe.retval" not in s.attributes
    assert s.end_ns == 2**63


def test_error_status_follows_policy() -> None:
    enc = OtlpSpanEncoder(RESOURCE, {"quiet": SpanSettings(error_on_negative_retval=False)})
    a, b = decode_request(decode(enc.encode([pair(retval="0xfffffffffffffff4"), pair(retval="-12", name="quiet")])))
    assert (a.status_code, a.status_message) == (2, "ENOMEM")
    assert b.status_code == 0 and "error.type" not in b.attributes


def test_many_pair_names_and_comms() -> None:
    enc = OtlpSpanEncoder(RESOURCE)
    pairs = [CompletedPair(f"p{i % 7}", "f", i, i, f"c{i}", i, i + 1, (), None) for i in range(10_000)]
    spans = decode_request(decode(enc.encode(pairs)))
    assert [s.name for s in spans] == [p.pair for p in pairs]
    assert [s.attributes["process.executable.name"] for s in spans] == [p.comm for p in pairs]


# ---- the queue ------------------------------------------------------------------------------------


def test_queue_is_bounded_and_counts_queue_full() -> None:
    shipper = SpanShipper(FakeTransport(), resource=RESOURCE, max_queue=100)  # not started: nothing drains
    p = pair()
    for _ in range(150):
        shipper.sink(p)
    assert shipper.queued == 100
    assert shipper.dropped == {"queue_full": 50, "export_failed": 0, "shutdown": 0}
    shipper.shutdown(1)
    assert shipper.dropped["shutdown"] == 100 and shipper.queued == 0
    shipper.sink(p)
    assert shipper.dropped["shutdown"] == 101


def test_sink_is_cheap() -> None:
    shipper = SpanShipper(FakeTransport(), resource=RESOURCE, max_queue=1000)
    p = pair()
    sink = shipper.sink
    t0 = time.perf_counter()
    for _ in range(200_000):
        sink(p)
    per_call = (time.perf_counter() - t0) / 200_000
    assert per_call < 5e-6, per_call  # about 0.15 µs here; generous for slow CI
    shipper.shutdown(0)


def test_ships_in_batches_chunked_by_size_with_exemplars() -> None:
    transport = FakeTransport()
    shipper = SpanShipper(transport, resource=RESOURCE, batch_size=500, max_request_bytes=20_000, interval_s=0.05)
    shipper.start()
    for i in range(2000):
        shipper.sink(pair(i, name=f"p{i % 3}"))
    shipper.shutdown(5)
    assert shipper.exported == 2000 and sum(transport.counts) == 2000
    assert all(len(body) <= 20_000 + 200 for body in transport.requests)
    assert len(transport.requests) > 2000 // 500
    assert len(transport.spans()) == 2000
    ex = shipper.exemplar("p0")
    assert ex is not None and len(ex.trace_id) == 32
    assert ex.trace_id in {s.trace_id for s in transport.spans() if s.name == "p0"}
    assert ex.duration_s == pytest.approx(3e-6)
    assert abs(ex.timestamp_s - (MonoToWall().offset_ns + 1_003_000) / 1e9) < 0.01  # wall clock
    assert shipper.exemplar("nope") is None


def test_failed_exports_are_counted_and_not_retried() -> None:
    transport = FakeTransport(ok=False)
    shipper = SpanShipper(transport, resource=RESOURCE, batch_size=100, interval_s=0.01)
    shipper.start()
    for i in range(1000):
        shipper.sink(pair(i))
    shipper.shutdown(5)
    assert shipper.exported == 0 and shipper.dropped["export_failed"] == 1000
    assert not shipper.exemplars


def test_exporter_exception_never_kills_the_thread() -> None:
    class Broken(FakeTransport):
        def send(self, body: bytes, count: int) -> bool:
            raise RuntimeError("boom")

    shipper = SpanShipper(Broken(), resource=RESOURCE, interval_s=0.01)
    shipper.start()
    shipper.sink(pair())
    time.sleep(0.2)
    shipper.sink(pair())
    shipper.shutdown(5)
    assert shipper.dropped["export_failed"] == 2


def test_shutdown_is_bounded_when_the_exporter_hangs() -> None:
    transport = FakeTransport(block=threading.Event())
    shipper = SpanShipper(transport, resource=RESOURCE, batch_size=100, interval_s=0.01)
    shipper.start()
    for i in range(1000):
        shipper.sink(pair(i))
    time.sleep(0.1)
    t0 = time.monotonic()
    shipper.shutdown(0.5)
    assert time.monotonic() - t0 < 20  # the transport never answers: an unbounded shutdown never returns
    assert transport.closed
    assert shipper.dropped["shutdown"] >= 800
    assert accounted(shipper) == 1000


# ---- real receivers ---------------------------------------------------------------------------------


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_PROTOCOL",
                "OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_SERVICE_NAME",
                "OTEL_RESOURCE_ATTRIBUTES"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    yield monkeypatch


RECEIVERS = [GrpcReceiver, HttpReceiver]


@pytest.mark.otlp
@pytest.mark.parametrize("receiver_cls", RECEIVERS)
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_export_to_real_receiver(
    otel_env: pytest.MonkeyPatch, receiver_cls: type[GrpcReceiver | HttpReceiver], compression: str
) -> None:
    with receiver_cls() as rx:
        for k, v in rx.env().items():
            otel_env.setenv(k, v)
        otel_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=t1,authorization=Bearer%20abc")
        otel_env.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", compression)
        otel_env.setenv("OTEL_SERVICE_NAME", "svc")
        otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        shipper = SpanShipper(batch_size=1000, interval_s=0.05)
        assert isinstance(shipper._transport, GrpcTransport if rx.protocol == "grpc" else HttpTransport)
        shipper.start()
        n = 5000
        for i in range(n):
            shipper.sink(pair(i, retval="-2" if i % 10 == 0 else str(i)))
        assert rx.wait_for(n, 10)
        shipper.shutdown(5)
        spans = rx.spans
    assert len(spans) == n and shipper.exported == n
    assert sum(shipper.dropped.values()) == 0
    assert len({s.trace_id for s in spans}) == n
    by_tid = {s.attributes["thread.id"]: s for s in spans}
    s = by_tid[4001 + 7]
    assert s.name == "open" and s.kind == 1
    assert s.attributes == {
        "process.pid": 4000,
        "thread.id": 4008,
        "process.executable.name": "cat",
        "code.function.name": "do_sys_openat2",
        "kprobe.arg.dfd": "0xffffff9c",
        "kprobe.arg.filename": "/etc/f7",
        "kprobe.retval": "7",
    }
    assert sum(1 for s in spans if s.status_code == 2) == n // 10
    assert s.resource["service.name"] == "svc" and s.resource["deployment.environment"] == "test"
    assert "host.name" in s.resource
    # trace-clock times came out as wall-clock times (pair() uses tiny trace-clock values)
    assert abs(s.start_ns - (MonoToWall().offset_ns + 1_000_007)) < 10_000_000
    assert all(h["x-tenant"] == "t1" and h["authorization"] == "Bearer abc" for h in rx.store.headers)


@pytest.mark.otlp
@pytest.mark.parametrize("receiver_cls", RECEIVERS)
@pytest.mark.parametrize("mode", ["down", "refuse", "hang"])
def test_unhealthy_receiver_never_blocks_the_sink_and_memory_stays_flat(
    otel_env: pytest.MonkeyPatch, receiver_cls: type[GrpcReceiver | HttpReceiver], mode: str
) -> None:
    n, rounds = 300_000, 30
    # What the same sinks cost here and now with no export thread at all: a sink that waited for a
    # failing export would take over a second per batch, far past any multiple of this.
    idle = SpanShipper(max_queue=10_000, batch_size=1000, interval_s=0.05)
    t0 = time.monotonic()
    for i in range(n):
        idle.sink(pair(i))
    limit_s = 50 * (time.monotonic() - t0) + 30
    with receiver_cls(mode) as rx:
        for k, v in rx.env().items():
            otel_env.setenv(k, v)
        otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
        shipper = SpanShipper(max_queue=10_000, batch_size=1000, interval_s=0.05)
        shipper.start()
        rss: list[int] = []

        def produce() -> None:
            for r in range(rounds):
                for i in range(r * n // rounds, (r + 1) * n // rounds):
                    # distinct objects, as the aggregate makes: an unbounded queue would grow by ~100 MB
                    shipper.sink(pair(i))
                if r == rounds // 6:
                    rss.append(rss_kib())
                time.sleep(0.001)  # let the export thread take batches, as a live reader's pauses do
            rss.append(rss_kib())

        producer = threading.Thread(target=produce)
        producer.start()
        producer.join(limit_s)
        assert not producer.is_alive(), f"{n} sinks took over {limit_s:.0f} s: the sink waits for exports"
        until = time.monotonic() + 60  # a failing export is counted once its 1 s timeout passed
        while shipper.dropped["export_failed"] < 1000 and time.monotonic() < until:
            time.sleep(0.05)
        shipper.shutdown(2)
    dropped = shipper.dropped
    assert shipper.exported == 0 and rx.span_count == 0
    assert dropped["export_failed"] >= 1000, dropped
    assert dropped["queue_full"] > n // 2, dropped
    assert accounted(shipper) == n
    assert rss[1] - rss[0] < 30_000, rss
