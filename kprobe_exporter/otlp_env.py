"""OTLP environment: the protocol, resource and exporters the OTEL_* variables ask for, for spans and metrics.

Protocol: OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL, else
"http/protobuf", the default the OpenTelemetry specification gives (exporter.md: "SHOULD default
to http/protobuf"); "grpc" is the other accepted value. Endpoint, headers, timeout and certificates
are read by opentelemetry-exporter-otlp itself (which reads OTEL_EXPORTER_OTLP_TIMEOUT in seconds;
the specification says milliseconds).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kprobe_exporter.otlp_metrics import MetricExporter

DEFAULT_PROTOCOL = "http/protobuf"
PROTOCOLS = ("grpc", "http/protobuf")


def otlp_protocol(env: Mapping[str, str] = os.environ, signal: str = "TRACES") -> str:
    """The OTLP protocol for a signal (TRACES, METRICS) from the environment, the signal's own variable
    first; ValueError for one we cannot speak."""
    protocol = (
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or DEFAULT_PROTOCOL
    ).strip()
    if protocol not in PROTOCOLS:
        raise ValueError(f"unsupported OTLP protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    return protocol


def compression_off(env: Mapping[str, str] = os.environ, signal: str = "TRACES") -> bool:
    """Whether the environment asks for compression "none" (the gRPC exporter refuses that word)."""
    compression = env.get(f"OTEL_EXPORTER_OTLP_{signal}_COMPRESSION") or env.get("OTEL_EXPORTER_OTLP_COMPRESSION", "")
    return compression.strip().lower() == "none"


def resource_attributes(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """service.name and host.name, overridden by OTEL_RESOURCE_ATTRIBUTES, then OTEL_SERVICE_NAME."""
    from urllib.parse import unquote

    attributes = {"service.name": "kprobe-exporter", "host.name": socket.gethostname()}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    if service_name := env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    return attributes


def metric_exporter(env: Mapping[str, str] = os.environ) -> MetricExporter:
    """The library's OTLP metric exporter for the protocol the environment asks for."""
    if otlp_protocol(env, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as Grpc

        return Grpc()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as Http

    return Http()
