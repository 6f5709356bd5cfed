"""Command line: run (the default), replay, check, cleanup. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import NoReturn

from prometheus_client.exposition import generate_latest

from kprobe_exporter import __version__, agent, config, probes, tracefs
from kprobe_exporter.config import Config
from kprobe_exporter.errors import TracefsError, UserError
from kprobe_exporter.kinds import KIND
from kprobe_exporter.metrics import Sources, make_registry
from kprobe_exporter.text import TextSource

EXIT_USAGE = 2
DEFAULT_PORT = 10111


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (argparse prints the whole usage by default)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kprobe-exporter", description=(
        "Linux dynamic probes (kprobes, uprobes, tracepoints) as Prometheus metrics and OTLP spans. "
        "Without a command it runs on the embedded default config."))
    p.add_argument("--version", action="version", version=f"kprobe-exporter {__version__}")
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="install the probes and serve /metrics until SIGTERM")
    _run_args(run)
    _run_args(p)

    rp = sub.add_parser("replay", help="run saved trace text through parse/pair/aggregate; print the exposition")
    rp.add_argument("--config", required=True, help="the probes that produced the trace")
    rp.add_argument("traces", nargs="+", help="files of `trace` or `trace_pipe` text ('-' for stdin)")

    ck = sub.add_parser("check", help="validate against the running kernel in a scratch group; print it")
    ck.add_argument("--config", help="config file (default: the embedded default)")

    cl = sub.add_parser("cleanup", help="remove what a dead agent left in the kernel")
    cl.add_argument("--instance", default=None, help="instance/group name (default: kprobe_exporter)")
    cl.add_argument("--config", help="take the instance name from this config")

    sub.add_parser("default-config", help="print the embedded default config for this kernel")
    return p


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: the embedded default)")
    p.add_argument("--web.listen-address", dest="listen", default=None,
                   help=f"HOST:PORT to serve on (default 0.0.0.0:{DEFAULT_PORT} or the config's)")
    p.add_argument("--web.config.file", dest="web_config", default=None,
                   help="TLS and basic-auth settings in the exporter-toolkit format")
    p.add_argument("--reader", choices=["text", "raw"], default=None,
                   help="trace_pipe text, or the per-CPU binary ring buffers (default: the config's, else text)")
    p.add_argument("--otlp.metrics", dest="otlp_metrics", action="store_true",
                   help="also push the metrics over OTLP (OTEL_EXPORTER_OTLP_* say where; interval: the config's, "
                        "else 30 s)")
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=["debug", "info", "warning", "error"])


def default_config_name() -> str:
    kprobe_file = KIND["kprobe"].probe_file or ""
    for root in tracefs.CANDIDATES:
        if os.path.exists(os.path.join(root, kprobe_file)):
            return "default-kprobes.yaml"
    if os.path.exists("/sys/kernel/tracing/instances") or os.path.exists("/sys/kernel/debug/tracing/instances"):
        return "default-tracepoints.yaml"
    # tracefs not mounted yet: the kernel config tells whether kprobes exist
    return "default-kprobes.yaml" if Path("/sys/bus/event_source/devices/kprobe").exists() else \
        "default-tracepoints.yaml"


def load_config(path: str | None) -> tuple[Config, str]:
    if path is None:
        name = default_config_name()
        text = resources.files("kprobe_exporter").joinpath(name).read_text()
        return config.load_text(text, f"<embedded {name}>"), f"<embedded {name}>"
    return config.load(path), path


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    message = " ".join(message.splitlines())  # one line, whatever a message carries
    print(f"kprobe-exporter: {message}" if not message.startswith(("/", "<", ".")) else message,
          file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from kprobe_exporter import webconfig

    def load() -> tuple[Config, probes.ProbeSet]:
        cfg, path = load_config(args.config)
        if args.listen:  # the flag wins over the file, on reload too
            cfg = cfg.model_copy(update={"listen_address": args.listen})
        if getattr(args, "reader", None):  # and so does --reader
            cfg = cfg.model_copy(update={"reader": args.reader})
        if getattr(args, "otlp_metrics", False) and cfg.otlp_metrics is None:
            cfg = cfg.model_copy(update={"otlp_metrics": config.OtlpMetricsConfig()})
        return cfg, probes.build_probe_set(cfg, path)

    if args.listen:
        try:
            config.split_host_port(args.listen)
        except ValueError as e:
            raise UserError(str(e), file="--web.listen-address") from None
    cfg, probe_set = load()
    wrap, authorize = webconfig.load(args.web_config) if args.web_config else (None, None)
    if os.geteuid() != 0:
        raise UserError("must run as root (writing kprobe_events/uprobe_events needs it)")
    a = agent.Agent(cfg, probe_set, cfg.listen_address, wrap_socket=wrap, authorize=authorize, reload_source=load)
    agent.install_signal_handlers(a)
    return a.run()


def cmd_replay(args: argparse.Namespace) -> int:
    cfg, path = load_config(args.config)
    probe_set = probes.build_probe_set(cfg, path, resolve=None)
    agg = agent.make_aggregate(cfg, probe_set)
    source = TextSource(probe_set)
    for name in args.traces:
        for chunk in _chunks(name):
            for batch in source.batches(chunk):
                agg.feed(batch)
    registry = make_registry(Sources(snapshot=agg.snapshot, probes=probe_set,
                                     installed=lambda: set(), heartbeat=lambda: 0.0))
    sys.stdout.write(generate_latest(registry).decode())
    return 0


def _chunks(name: str, size: int = 1 << 22) -> Iterable[bytes]:
    """Whole-line chunks of a file; lines are never cut between chunks."""
    try:
        f = sys.stdin.buffer if name == "-" else open(name, "rb")
    except OSError as e:
        raise UserError(f"cannot read the trace ({e.strerror})", file=name) from None
    with f:
        carry = b""
        while True:
            block = f.read(size)
            if not block:
                break
            block = carry + block
            cut = block.rfind(b"\n") + 1
            carry = block[cut:]
            if cut:
                yield block[:cut]
        if carry:
            yield carry + b"\n"


def cmd_check(args: argparse.Namespace) -> int:
    cfg, path = load_config(args.config)
    probes.build_probe_set(cfg, path)
    if os.geteuid() != 0:
        raise UserError("check installs into a scratch group and needs root")
    try:
        lines = agent.check(cfg, lambda c: probes.build_probe_set(c, path))
    except TracefsError as e:
        raise e.in_file(path) from None
    print(f"{path}: OK, {len(lines)} events")
    for line in lines:
        print("  " + line)
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    instance = args.instance
    if instance is None and args.config:
        instance = config.load(args.config).instance
    instance = instance or "kprobe_exporter"
    problems = agent.cleanup(instance)
    for p in problems:
        print(f"kprobe-exporter cleanup: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_default_config(args: argparse.Namespace) -> int:
    sys.stdout.write(resources.files("kprobe_exporter").joinpath(default_config_name()).read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    commands = {"run": cmd_run, None: cmd_run, "replay": cmd_replay, "check": cmd_check,
                "cleanup": cmd_cleanup, "default-config": cmd_default_config}
    try:
        return commands[args.command](args)
    except UserError as e:  # one without a file of its own is about the config that was run
        return _fail(e.in_file(getattr(args, "config", None) or "<embedded default>").line())
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug, not a user mistake: still one line, the traceback on request
        logging.getLogger("kprobe_exporter").debug("internal error", exc_info=True)
        return _fail(f"internal error: {type(e).__name__}: {e} (--log.level=debug shows the traceback)", 1)
