"""Real OTLP receivers for tests: gRPC (TraceService, MetricsService) and HTTP/protobuf (POST /v1/traces,
/v1/metrics). Metrics requests are kept whole (`metric_requests`); spans are decoded.

Both listen on 127.0.0.1 with an ephemeral port and are context managers. Modes:
  "ok"      accept and record every span;
  "down"    nothing listens on the port (connections are refused);
  "hang"    hold every request until the receiver is closed (or `hang_s` passes), then refuse it;
  "refuse"  answer every request with a retryable error (gRPC UNAVAILABLE, HTTP 503).
With decode=False only spans are counted (cheap enough for the benchmark).
"""

from __future__ import annotations

import gzip
import socket
import threading
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

MODES = ("ok", "down", "hang", "refuse")


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str  # hex
    span_id: str  # hex
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    resource: dict[str, Any]
    scope: str


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


def decode_request(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    ReceivedSpan(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        kind=s.kind,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        status_code=s.status.code,
                        status_message=s.status.message,
                        resource=resource,
                        scope=ss.scope.name,
                    )
                )
    return spans


def count_spans(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


@dataclass
class _Store:
    decode: bool
    spans: list[ReceivedSpan] = field(default_factory=list)
    span_count: int = 0
    requests: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)  # per request, lower-case keys
    lock: threading.Condition = field(default_factory=threading.Condition)
    metric_requests: list[ExportMetricsServiceRequest] = field(default_factory=list)

    def add_metrics(self, request: ExportMetricsServiceRequest) -> None:
        with self.lock:
            self.metric_requests.append(request)
            self.lock.notify_all()

    def add(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        decoded = decode_request(request) if self.decode else []
        n = count_spans(request)
        with self.lock:
            self.spans.extend(decoded)
            self.span_count += n
            self.requests += 1
            if self.decode:
                self.headers.append(headers)
            self.lock.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` spans have arrived."""
        with self.lock:
            return self.lock.wait_for(lambda: self.span_count >= count, timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Receiver:
    protocol = ""

    def __init__(self, mode: str = "ok", *, decode: bool = True, hang_s: float = 60.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        self.mode = mode
        self.hang_s = hang_s
        self.store = _Store(decode)
        self.port = 0
        self._release = threading.Event()

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self.store.lock:
            return list(self.store.spans)

    @property
    def span_count(self) -> int:
        return self.store.span_count

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        return self.store.wait_for(count, timeout)

    @property
    def metric_requests(self) -> list[ExportMetricsServiceRequest]:
        with self.store.lock:
            return list(self.store.metric_requests)

    def wait_for_metrics(self, done: Callable[[ExportMetricsServiceRequest], bool], timeout: float = 20.0) -> bool:
        """Wait until a metrics request arrives for which `done` holds."""
        with self.store.lock:
            return self.store.lock.wait_for(lambda: any(done(r) for r in self.store.metric_requests), timeout)

    @property
    def metrics_endpoint(self) -> str:
        return self.endpoint

    def metrics_env(self) -> dict[str, str]:
        """The OTEL_* variables that point a metrics exporter at this receiver."""
        return {
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": self.protocol,
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": self.metrics_endpoint,
        }

    def env(self) -> dict[str, str]:
        """The OTEL_* variables that point an exporter at this receiver."""
        return {
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": self.protocol,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.endpoint,
        }

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        if self.mode == "down":
            self.port = _free_port()
        else:
            self._start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._release.set()
        if self.mode != "down":
            self._stop()


class GrpcReceiver(_Receiver):
    protocol = "grpc"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _admit(self, context: grpc.ServicerContext) -> None:
        """The mode's answer to a request of either service: hold it, refuse it, or let it through."""
        if self.mode == "hang":
            self._release.wait(self.hang_s)
        if self.mode != "ok":
            context.abort(grpc.StatusCode.UNAVAILABLE, "refused by test receiver")

    def _start(self) -> None:
        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
            ) -> ExportTraceServiceResponse:
                receiver._admit(context)
                headers = {k.lower(): str(v) for k, v in context.invocation_metadata()}
                receiver.store.add(request, headers)
                return ExportTraceServiceResponse()

        class MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(
                self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
            ) -> ExportMetricsServiceResponse:
                receiver._admit(context)
                receiver.store.add_metrics(request)
                return ExportMetricsServiceResponse()

        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsServicer(), self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _stop(self) -> None:
        self._server.stop(grace=None).wait(5)


class HttpReceiver(_Receiver):
    protocol = "http/protobuf"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    @property
    def metrics_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/metrics"

    def _start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.mode == "hang":
                    receiver._release.wait(receiver.hang_s)
                if self.path not in ("/v1/traces", "/v1/metrics"):
                    return self._answer(404, b"")
                if receiver.mode != "ok":
                    return self._answer(503, b"refused by test receiver")
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path == "/v1/metrics":
                    receiver.store.add_metrics(ExportMetricsServiceRequest.FromString(body))
                    return self._answer(200, ExportMetricsServiceResponse().SerializeToString())
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.store.add(ExportTraceServiceRequest.FromString(body), headers)
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-http-receiver", daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
