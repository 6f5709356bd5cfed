"""Web: /metrics (text or OpenMetrics by Accept), a landing page at /, and /healthz."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from kprobe_exporter import __version__

LANDING = """<!doctype html>
<html><head><title>kprobe-exporter</title></head>
<body><h1>kprobe-exporter {version}</h1>
<p>Linux dynamic probes as Prometheus metrics.</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li></ul>
</body></html>
"""

RequestCheck = Callable[[BaseHTTPRequestHandler], bool]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def make_handler(registry: CollectorRegistry, healthy: Callable[[], tuple[bool, str]],
                 authorize: RequestCheck | None = None) -> type[BaseHTTPRequestHandler]:
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
                self._send(200, "text/html; charset=utf-8", LANDING.format(version=__version__).encode())
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
        _Server.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.httpd = _Server((host, port), handler)
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
