"""OTLP metrics push: the /metrics registry as OTLP, equal sample for sample, and the live agent pushing it
to real OTLP receivers (gRPC and HTTP/protobuf)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.sdk.resources import Resource
from prometheus_client.exposition import generate_latest

from agent_proc import AgentProcess, free_port, running_agent, samples, value
from kprobe_exporter.otlp_metrics import OtlpMetricsPush, to_metrics_data
from kprobe_exporter.spans import otlp_protocol
from live.test_metrics import replayed_registry
from otlp_receiver import GrpcReceiver, HttpReceiver

Key = tuple[str, frozenset[tuple[str, str]]]


def attrs(kvs: list[KeyValue]) -> frozenset[tuple[str, str]]:
    return frozenset((kv.key, kv.value.string_value) for kv in kvs)


def number(p: Any) -> float:
    return float(p.as_int if p.HasField("as_int") else p.as_double)


def flatten(request: ExportMetricsServiceRequest) -> dict[Key, float]:
    """An OTLP request as Prometheus samples, the way a collector's Prometheus exporter maps them."""
    out: dict[Key, float] = {}
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind == "sum":
                    assert m.sum.is_monotonic and m.sum.aggregation_temporality == 2  # CUMULATIVE
                    for p in m.sum.data_points:
                        out[(m.name + "_total", attrs(p.attributes))] = number(p)
                elif kind == "gauge":
                    for p in m.gauge.data_points:
                        out[(m.name, attrs(p.attributes))] = number(p)
                elif kind == "histogram":
                    for h in m.histogram.data_points:
                        a = attrs(h.attributes)
                        running = 0
                        bounds = [*h.explicit_bounds, float("inf")]
                        assert len(h.bucket_counts) == len(bounds)
                        for le, c in zip(bounds, h.bucket_counts, strict=True):
                            running += c
                            le_s = "+Inf" if le == float("inf") else repr(le)
                            out[(m.name + "_bucket", a | {("le", le_s)})] = running
                        out[(m.name + "_count", a)] = h.count
                        out[(m.name + "_sum", a)] = h.sum
                        assert not h.HasField("min") and not h.HasField("max")  # Prometheus keeps neither
    return out


def prometheus_samples(text: str) -> dict[Key, float]:
    return {(n, frozenset(lbls)): v for (n, lbls), v in samples(text).items() if not n.endswith("_created")}


def test_the_push_carries_every_sample_of_the_scrape() -> None:
    registry = replayed_registry()
    scraped = prometheus_samples(generate_latest(registry).decode())
    data = to_metrics_data(registry.collect(), Resource.create({"service.name": "t"}), 1, 2)
    pushed = flatten(ExportMetricsServiceRequest.FromString(encode_metrics(data).SerializeToString()))
    clock = ("kprobe_exporter_last_read_timestamp_seconds", frozenset())  # time.time() at each collect
    assert pushed.pop(clock) == pytest.approx(scraped.pop(clock), abs=5)
    assert pushed == scraped
    assert pushed[("kprobe_latency_seconds_count", frozenset({("probe", "compute")}))] == 25
    assert len(scraped) > 50


def test_protocol_comes_from_the_metrics_variable_first() -> None:
    def metrics_protocol(env: dict[str, str]) -> str:
        return otlp_protocol(env, "METRICS")

    assert metrics_protocol({}) == "http/protobuf"  # the specification's default, as for spans
    assert metrics_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == "http/protobuf"
    assert metrics_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                             "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"}) == "grpc"
    with pytest.raises(ValueError, match="http/json"):
        metrics_protocol({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"})


class FailingExporter:
    def export(self, metrics_data: Any, timeout_millis: float = 10_000) -> Any:
        raise ConnectionError("collector gone")

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        pass


def test_a_failing_push_is_counted_not_raised() -> None:
    # a stand-in exporter that raises: the real ones return FAILURE instead (the live test covers those)
    push = OtlpMetricsPush(replayed_registry(), 60, exporter=FailingExporter(), resource={"service.name": "t"})
    assert push.push(0.1) is False and push.push(0.1) is False
    got = {tuple(s.labels.values()): s.value for f in push.families() for s in f.samples if s.name.endswith("_total")}
    assert got == {("ok",): 0, ("failed",): 2}


# --- the live agent -------------------------------------------------------------------------------------------

def live_config(progs: dict[str, Path], instance: str) -> str:
    return f"""
instance: {instance}
otlp_metrics: {{interval: 1s}}
probes:
  - name: compute
    uprobe: {progs['pie']}:compute
    args: {{a: "%di:s32"}}
    latency: true
"""


def count_of(request: ExportMetricsServiceRequest, name: str, **labels: str) -> float | None:
    return flatten(request).get((name, frozenset(labels.items())))


@pytest.mark.root
@pytest.mark.otlp
@pytest.mark.parametrize("receiver_cls", [GrpcReceiver, HttpReceiver])
def test_live_agent_pushes_what_it_serves(tracefs: Path, progs: dict[str, Path], write_config,
                                          receiver_cls: type) -> None:
    n = 40
    with receiver_cls() as rx:
        cfg = write_config(live_config(progs, "kpe_t_otlpm"))
        env = {**rx.metrics_env(), "OTEL_SERVICE_NAME": "kpe-metrics-test"}
        with running_agent(cfg, env=env) as agent:
            subprocess.run([progs["pie"], "compute", str(n)], check=True)
            assert agent.wait_value("kprobe_latency_seconds_count", n, probe="compute") == n
            assert rx.wait_for_metrics(lambda r: count_of(r, "kprobe_latency_seconds_count", probe="compute") == n)
            # (the receiver stores a request before it answers: the agent counts it a moment later)
            assert agent.wait_value("kprobe_exporter_otlp_metrics_pushes_total", 1, result="ok") >= 1
            text = agent.scrape()
        last = rx.metric_requests[-1]
        # the final push, after SIGTERM, has the same counts the last scrape had
        for name, labels in (("kprobe_latency_seconds_count", {"probe": "compute"}),
                             ("kprobe_latency_seconds_sum", {"probe": "compute"}),
                             ("kprobe_events_total", {"probe": "compute"})):
            assert count_of(last, name, **labels) == value(text, name, **labels), name
        resource = {kv.key: kv.value.string_value for kv in last.resource_metrics[0].resource.attributes}
        assert resource["service.name"] == "kpe-metrics-test" and "host.name" in resource


@pytest.mark.root
@pytest.mark.otlp
def test_the_flag_alone_enables_the_push(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    cfg = write_config(live_config(progs, "kpe_t_otlpm_flag").replace("otlp_metrics: {interval: 1s}\n", ""))
    with GrpcReceiver() as rx:
        agent = AgentProcess(cfg, free_port(), ["--otlp.metrics"], rx.metrics_env())
        try:
            agent.wait_ready()
            subprocess.run([progs["pie"], "compute", "5"], check=True)
            assert agent.wait_value("kprobe_latency_seconds_count", 5, probe="compute") == 5
            assert rx.metric_requests == []  # the default interval is 30 s: nothing yet
            agent.proc.send_signal(signal.SIGTERM)
            assert agent.proc.wait(30) == 0
        finally:
            agent.stop()
        # the push at stop
        assert [count_of(r, "kprobe_latency_seconds_count", probe="compute") for r in rx.metric_requests] == [5]


@pytest.mark.root
@pytest.mark.otlp
def test_a_down_collector_is_counted_and_bounded(tracefs: Path, progs: dict[str, Path], write_config) -> None:
    cfg = write_config(live_config(progs, "kpe_t_otlpm_down"))
    with GrpcReceiver(mode="down") as rx:
        env = {**rx.metrics_env(), "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "1"}
        with running_agent(cfg, env=env) as agent:
            assert agent.wait_value("kprobe_exporter_otlp_metrics_pushes_total", 2, result="failed") >= 2
            subprocess.run([progs["pie"], "compute", "7"], check=True)
            assert agent.wait_value("kprobe_latency_seconds_count", 7, probe="compute") == 7  # still fresh
            assert value(agent.scrape(), "kprobe_exporter_otlp_metrics_pushes_total", result="ok") == 0
            t0 = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            assert agent.proc.wait(30) == 0
            assert time.monotonic() - t0 < 30  # the last push to a dead collector is bounded (TimeoutStopSec)
