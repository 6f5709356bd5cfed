"""Span export throughput: the straightforward OTel SDK path against SpanShipper, in the same run.

    python bench/bench_spans.py [--count 200000] [--rate 50000] [--seconds 10] [--rounds 3]
                                [--protocol grpc|http/protobuf]

Both export OTLP (gRPC by default) to the same receiver (tests/otlp_receiver.py, count-only) in a
separate process, so its CPU does not take the GIL from the exporters. Phases:

  capacity  N spans produced as fast as the pipeline takes them (the bench, not the sink, backs off
            while the queue is over half full), timed until the receiver has all N: end-to-end spans/s.
  paced     `rate` spans/s for `seconds` s with no back-off, as a busy host would produce them:
            drops by reason, and whether every span arrived.
  encode    CPU cost of turning one pair into OTLP bytes: ReadableSpan + the SDK encoder vs ours.

Baseline: tracer.start_span()/span.end() per pair, BatchSpanProcessor and the library's
OTLPSpanExporter for the protocol. Ours: SpanShipper.sink() per pair, transport from the same env.
Both get the same queue (65,536), batch (4,096), export interval (1 s) and span count; each round
runs both, in alternating order (an odd number of rounds), and the figures are the rounds' medians
(the capacity ratio: the median of the ratios within rounds).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kprobe_exporter.aggregate import CompletedPair  # noqa: E402
from kprobe_exporter.spans import (  # noqa: E402
    MonoToWall,
    OtlpSpanEncoder,
    SpanShipper,
    errno_name,
    negative_errno,
    otlp_protocol,
    resource_attributes,
)

PAIRS = ("open", "read", "connect")
FUNCS = ("do_sys_openat2", "ksys_read", "__sys_connect")


def make_pair(i: int, now_ns: int) -> CompletedPair:
    k = i % 3
    retval = "0xfffffffffffffffe" if i % 10 == 0 else str(i & 0xFFF)
    args = (("dfd", "0xffffff9c"), ("filename", f"/usr/lib/x86_64-linux-gnu/lib{i & 0xFF}.so"))
    return CompletedPair(PAIRS[k], FUNCS[k], 1000 + (i & 0x3FF), 1000, "worker", now_ns, now_ns + 12_345, args, retval)


# ---- the receiver process ---------------------------------------------------------------------------


def _serve(protocol: str, port_q: Any, count: Synchronized[int], stop: MpEvent) -> None:
    from otlp_receiver import GrpcReceiver, HttpReceiver

    with (GrpcReceiver if protocol == "grpc" else HttpReceiver)(decode=False) as rx:
        port_q.put(rx.endpoint)
        while not stop.wait(0.005):
            count.value = rx.span_count


class Receiver:
    def __init__(self, protocol: str) -> None:
        ctx = mp.get_context("spawn")
        self.count: Synchronized[int] = ctx.Value("q", 0, lock=False)
        self._stop = ctx.Event()
        port_q = ctx.Queue()
        self._proc = ctx.Process(target=_serve, args=(protocol, port_q, self.count, self._stop), daemon=True)
        self._proc.start()
        self.endpoint: str = port_q.get(timeout=30)

    def wait_for(self, target: int, idle_s: float = 5.0) -> float:
        """Wait until `target` spans arrived or none arrived for idle_s; the time of the last arrival."""
        last, last_t = -1, time.perf_counter()
        while self.count.value < target:
            if self.count.value != last:
                last, last_t = self.count.value, time.perf_counter()
            elif time.perf_counter() - last_t > idle_s:
                break
            time.sleep(0.001)
        return time.perf_counter() if self.count.value >= target else last_t

    def close(self) -> None:
        self._stop.set()
        self._proc.join(10)


# ---- the two pipelines ------------------------------------------------------------------------------


class Baseline:
    name = "SDK: start_span/end + BatchSpanProcessor"

    def __init__(self, max_queue: int, batch_size: int, interval_s: float) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import Status, StatusCode

        self._provider = TracerProvider(resource=Resource.create(resource_attributes()))
        self._bsp = BatchSpanProcessor(Grpc() if otlp_protocol() == "grpc" else Http(), max_queue_size=max_queue,
                                       max_export_batch_size=batch_size,
                                       schedule_delay_millis=interval_s * 1000)
        self._provider.add_span_processor(self._bsp)
        self._tracer = self._provider.get_tracer("kprobe_exporter")
        self._queue = self._bsp._batch_processor._queue  # for the bench's back-off only
        self.max_queue: int = self._bsp._batch_processor._max_queue_size
        self._clock = MonoToWall()
        self._status, self._error = Status, StatusCode.ERROR

    def sink(self, p: CompletedPair) -> None:
        attrs: dict[str, Any] = {
            "thread.id": p.tid,
            "process.executable.name": p.comm,
            "code.function.name": p.function,
        }
        if p.tgid >= 0:
            attrs["process.pid"] = p.tgid
        for name, value in p.args:
            attrs["kprobe.arg." + name] = value
        offset = self._clock.offset_ns
        span = self._tracer.start_span(p.pair, start_time=p.start_ns + offset, attributes=attrs)
        if p.retval is not None:
            span.set_attribute("kprobe.retval", p.retval)
            if (err := negative_errno(p.retval)) is not None:
                span.set_attribute("error.type", errno_name(err))
                span.set_status(self._status(self._error, errno_name(err)))
        span.end(end_time=p.end_ns + offset)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def dropped(self, produced: int, received: int) -> dict[str, int]:
        return {"lost": produced - received}  # BatchSpanProcessor does not count its drops

    def shutdown(self) -> None:
        self._provider.shutdown()


class Ours:
    name = "SpanShipper: sink + wire encoder + OTLP"

    def __init__(self, max_queue: int, batch_size: int, interval_s: float) -> None:
        self.shipper = SpanShipper(max_queue=max_queue, batch_size=batch_size, interval_s=interval_s)
        self.shipper.start()
        self.sink = self.shipper.sink
        self.max_queue = self.shipper.max_queue

    @property
    def queued(self) -> int:
        return self.shipper.queued

    def dropped(self, produced: int, received: int) -> dict[str, int]:
        return self.shipper.dropped

    def shutdown(self) -> None:
        self.shipper.shutdown(10)


Pipeline = Baseline | Ours


# ---- phases ---------------------------------------------------------------------------------------


def capacity(pipe: Pipeline, rx: Receiver, n: int) -> dict[str, Any]:
    base = rx.count.value
    sink, half = pipe.sink, pipe.max_queue // 2
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    cpu0, t0 = time.process_time(), time.perf_counter()
    i = 0
    while i < n:
        if pipe.queued > half:
            time.sleep(0.0005)
            continue
        for j in range(i, min(i + 256, n)):
            sink(make_pair(j, now + j * 1000))
        i = min(i + 256, n)
    t1 = rx.wait_for(base + n)
    cpu = time.process_time() - cpu0
    got = rx.count.value - base
    return {"spans_s": got / (t1 - t0), "received": got, "cpu_us": cpu / max(got, 1) * 1e6}


def paced(pipe: Pipeline, rx: Receiver, rate: int, seconds: float) -> dict[str, Any]:
    base = rx.count.value
    sink = pipe.sink
    n = int(rate * seconds)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    t0 = time.perf_counter()
    i = 0
    behind = 0.0
    while i < n:
        due = min(n, int((time.perf_counter() - t0) * rate))
        if due <= i:
            time.sleep(0.0005)
            continue
        behind = max(behind, (due - i) / rate)
        for j in range(i, due):
            sink(make_pair(j, now + j * 1000))
        i = due
    produce_s = time.perf_counter() - t0
    t1 = rx.wait_for(base + n)
    got = rx.count.value - base
    return {
        "produced": n,
        "produce_s": produce_s,
        "received": got,
        "drain_s": t1 - t0 - produce_s,
        "dropped": pipe.dropped(n, got),
    }


def encode_cost(n: int = 20_000) -> dict[str, float]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, TraceFlags

    pairs = [make_pair(i, 10**12 + i) for i in range(n)]
    resource, scope = Resource.create(resource_attributes()), InstrumentationScope("kprobe_exporter")

    def sdk() -> bytes:
        spans = []
        for p in pairs:
            attrs: dict[str, Any] = {"process.pid": p.tgid, "thread.id": p.tid}
            attrs["process.executable.name"], attrs["code.function.name"] = p.comm, p.function
            for k, v in p.args:
                attrs["kprobe.arg." + k] = v
            attrs["kprobe.retval"] = p.retval
            ctx = SpanContext(int.from_bytes(os.urandom(16)), int.from_bytes(os.urandom(8)), False, TraceFlags(1))
            spans.append(
                ReadableSpan(
                    p.pair,
                    ctx,
                    None,
                    resource,
                    attrs,
                    start_time=p.start_ns,
                    end_time=p.end_ns,
                    instrumentation_scope=scope,
                )
            )
        return bytes(encode_spans(spans).SerializeToString())

    encoder = OtlpSpanEncoder(resource_attributes())

    def ours() -> bytes:
        return encoder.encode(pairs, 0)

    def cost(fn: Callable[[], bytes]) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / n * 1e6

    return {"sdk": cost(sdk), "ours": cost(ours)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=200_000, help="spans in each capacity run (both pipelines)")
    ap.add_argument("--rate", type=int, default=50_000, help="spans/s in the paced runs")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the paced runs")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (odd), each running both in alternating order")
    ap.add_argument("--queue", type=int, default=65536, help="queue of both pipelines")
    ap.add_argument("--batch", type=int, default=4096, help="export batch of both pipelines")
    ap.add_argument("--protocol", choices=("grpc", "http/protobuf"), default="grpc")
    args = ap.parse_args()
    if args.rounds < 1 or args.rounds % 2 == 0:
        sys.exit("--rounds must be odd: the median is then one of the rounds")

    rx = Receiver(args.protocol)
    os.environ.update(
        {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": args.protocol, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": rx.endpoint}
    )
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        for r in range(args.rounds):
            results: dict[str, dict[str, Any]] = {}
            for cls in (Baseline, Ours) if r % 2 == 0 else (Ours, Baseline):
                pipe = cls(args.queue, args.batch, 1.0)
                print(f"round {r + 1}: {cls.name}: capacity, {args.count} spans ...", flush=True)
                cap = capacity(pipe, rx, args.count)
                print(f"round {r + 1}: {cls.name}: paced, {args.rate}/s for {args.seconds:g} s ...", flush=True)
                pace = paced(pipe, rx, args.rate, args.seconds)
                pipe.shutdown()
                results[cls.name] = {"capacity": cap, "paced": pace}
            rounds.append(results)
        enc = encode_cost()
    finally:
        rx.close()

    med = statistics.median
    print()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} (a shared host: expect noise)")  # fmt: skip
    print(f"receiver: OTLP {args.protocol} in a separate process, counting spans; both pipelines: queue "
          f"{args.queue}, batch {args.batch}, interval 1 s, {args.count} spans; {args.rounds} rounds, order "
          f"alternated, medians")
    print()
    print(f"{'':44} {'spans/s min/median/max':>24} {'CPU µs/span':>12}   paced {args.rate}/s x {args.seconds:g} s")
    for name in (Baseline.name, Ours.name):
        caps = [x[name]["capacity"] for x in rounds]
        rates = [c["spans_s"] for c in caps]
        got = [x[name]["paced"]["received"] for x in rounds]
        produced = rounds[0][name]["paced"]["produced"]
        drops = [x[name]["paced"]["dropped"] for x in rounds]
        spread = f"{min(rates):.0f}/{med(rates):.0f}/{max(rates):.0f}"
        print(f"{name:44} {spread:>24} {med([c['cpu_us'] for c in caps]):12.1f}   received (median) "
              f"{med(got):.0f}/{produced}, dropped {drops}")
    ratios = [x[Ours.name]["capacity"]["spans_s"] / x[Baseline.name]["capacity"]["spans_s"] for x in rounds]
    print(f"{'ratio ours / baseline (median of rounds)':44} {med(ratios):9.2f}x  rounds: "
          + ", ".join(f"{x:.2f}" for x in ratios))
    print(f"encode only (CPU µs/span, median of 3): ReadableSpan + SDK encoder {enc['sdk']:.1f}, "
          f"wire encoder {enc['ours']:.1f}")
    ok = all(x[Ours.name]["paced"]["received"] == x[Ours.name]["paced"]["produced"]
             and not any(x[Ours.name]["paced"]["dropped"].values()) for x in rounds)
    print(f"zero-drop check at {args.rate}/s, every round: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
