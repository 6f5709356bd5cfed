"""Web: /metrics (text or OpenMetrics by Accept), a landing page at /, and /healthz."""

from __future__ import annotations

import html
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from kprobe_exporter import __version__

LANDING = """<!doctype html>
<html><head><title>kprobe-exporter</title></head>
<body><h1>kprobe-exporter {version}</h1>
<p>Linux dynamic probes as Prometheus metrics.</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li></ul>
{probes}</body></html>
"""
# (probe, aggregation mode, why) for the landing page
ProbeModes = Callable[[], list[tuple[str, str, str]]]


def probes_table(rows: list[tuple[str, str, str]]) -> str:
    if not rows:
        return ""
    body = "".join(f"<tr><td>{html.escape(p)}</td><td>{html.escape(m)}</td><td>{html.escape(w)}</td></tr>\n"
                   for p, m, w in rows)
    return f"<table><tr><th>probe</th><th>aggregation</th><th>why</th></tr>\n{body}</table>\n"

RequestCheck = Callable[[BaseHTTPRequestHandler], bool]


MAX_CONNECTIONS = 128  # connections served at once; more are closed at once (each holds a thread)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stopping never waits for a stalled client's thread
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], family: int) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Clients that connect and stall hold a thread each until the handler's timeout: cap them,
        # so that many at once cost a bounded number of threads (the reader never waits on them).
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up, times out or fails the TLS handshake: not worth a traceback


def make_handler(registry: CollectorRegistry, healthy: Callable[[], tuple[bool, str]],
                 authorize: RequestCheck | None = None,
                 probe_modes: ProbeModes | None = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"kprobe-exporter/{__version__}"
        timeout = 10  # a client that connects and stalls loses its thread after this, not the reader

        def do_GET(self) -> None:
            if authorize is not None and not authorize(self):
                return
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                body = encoder(registry)
                self._send(200, content_type, body)
            elif path == "/healthz":
                ok, why = healthy()
                self._send(200 if ok else 503, "text/plain; charset=utf-8", (why + "\n").encode())
            elif path == "/":
                self._send(200, "text/html; charset=utf-8", LANDING.format(
                    version=__version__, probes=probes_table(probe_modes() if probe_modes else [])).encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # no per-request log lines

    return Handler


class WebServer:
    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler],
                 wrap: Callable[[socket.socket], socket.socket] | None = None) -> None:
        self.httpd = _Server((host, port), handler, socket.AF_INET6 if ":" in host else socket.AF_INET)
        if wrap is not None:
            self.httpd.socket = wrap(self.httpd.socket)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="web", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
