"""kprobe-exporter: Linux dynamic probes (kprobes, uprobes, tracepoints) as Prometheus metrics and OTLP spans."""

__version__ = "0.1.0"
