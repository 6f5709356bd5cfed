"""OTLP environment: protocol and resource from the OTEL_* variables, for spans and metrics alike."""

from __future__ import annotations

import pytest

from kprobe_exporter.otlp_env import compression_off, otlp_protocol, resource_attributes


def test_protocol_from_env() -> None:
    assert otlp_protocol({}) == "http/protobuf"  # the specification's default
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    assert otlp_protocol(env) == "http/protobuf"
    with pytest.raises(ValueError, match="http/json"):
        otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_resource_from_env() -> None:
    attrs = resource_attributes({})
    assert attrs["service.name"] == "kprobe-exporter" and attrs["host.name"]
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=a, deployment.environment=prod,k8s.node.name=n%2C1,bad"}
    attrs = resource_attributes(env)
    assert attrs["service.name"] == "a" and attrs["deployment.environment"] == "prod"
    assert attrs["k8s.node.name"] == "n,1" and "bad" not in attrs
    assert resource_attributes({**env, "OTEL_SERVICE_NAME": "b"})["service.name"] == "b"


def test_metrics_protocol_has_its_own_variable_and_compression_none_is_seen() -> None:
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"}
    assert otlp_protocol(env, "METRICS") == "grpc" and otlp_protocol(env) == "http/protobuf"
    assert compression_off({"OTEL_EXPORTER_OTLP_COMPRESSION": " None "})
    traces_own = {"OTEL_EXPORTER_OTLP_COMPRESSION": "none", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"}
    assert not compression_off(traces_own)
    assert not compression_off({})
