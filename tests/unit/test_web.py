"""The HTTP side in-process: debug endpoints off, methods refused, connection cap, stalled clients, TLS, auth."""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from kprobe_exporter import web, webconfig

DEBUG_PATHS = ["/debug/pprof/", "/debug/pprof/heap", "/debug/vars", "/debug", "/metrics/debug", "/admin", "/config",
               "/-/reload", "/-/quit", "/api/v1/status", "/.env", "/../../etc/passwd", "/%2e%2e/etc/passwd"]


class _One(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("kprobe_test", "A test counter.", value=1)


def _registry() -> CollectorRegistry:
    r = CollectorRegistry(auto_describe=False)
    r.register(_One())
    return r


def make_cert(d: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[Path, Path]:
    """A self-signed certificate and its key (EC P-256), made with the cryptography package."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kprobe-exporter test")])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


class Served:
    def __init__(self, server: web.WebServer) -> None:
        self.server = server
        self.port = server.port

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
        conn: http.client.HTTPConnection
        if context is not None:
            conn = http.client.HTTPSConnection("localhost", self.port, context=context, timeout=10)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()


def serve(web_config: Path | None = None, timeout: float | None = None) -> Served:
    wrap, authorize = webconfig.load(str(web_config)) if web_config else (None, None)
    handler = web.make_handler(_registry(), lambda: (True, "ok"), authorize)
    if timeout is not None:
        handler.timeout = timeout  # type: ignore[attr-defined]
    server = web.WebServer("127.0.0.1", 0, handler, wrap)
    server.start()
    return Served(server)


@pytest.fixture(scope="module")
def plain() -> Iterator[Served]:
    s = serve()
    yield s
    s.server.stop()


def test_metrics_landing_and_health(plain: Served) -> None:
    code, _, body = plain.request("GET", "/metrics")
    assert code == 200 and b"kprobe_test_total 1.0" in body
    assert plain.request("GET", "/")[0] == 200
    assert plain.request("GET", "/healthz")[2] == b"ok\n"


@pytest.mark.parametrize("path", DEBUG_PATHS)
def test_no_debug_or_admin_endpoints(plain: Served, path: str) -> None:
    code, _, body = plain.request("GET", path)
    assert code == 404, (path, code)
    assert b"kprobe_test" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "TRACE", "OPTIONS", "CONNECT"])
def test_only_get_is_served(plain: Served, method: str) -> None:
    code, _, body = plain.request(method, "/metrics")
    assert code == 501, (method, code)
    assert b"kprobe_test" not in body


def test_oversized_request_line_and_headers_are_refused(plain: Served) -> None:
    assert plain.request("GET", "/" + "a" * 70000)[0] == 414
    with socket.create_connection(("127.0.0.1", plain.port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 431")


def test_connections_beyond_the_cap_are_closed_at_once(plain: Served) -> None:
    """Each connection holds a thread until its timeout: beyond MAX_CONNECTIONS they are closed at once."""
    before = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", plain.port)) for _ in range(web.MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        extra = [socket.create_connection(("127.0.0.1", plain.port)) for _ in range(50)]
        for s in extra:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the server, no thread for it
            s.close()
        assert threading.active_count() <= before + web.MAX_CONNECTIONS + 2
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the held ones free their slots as they go
        try:
            if plain.request("GET", "/metrics")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        pytest.fail("no slot came back")


def test_a_stalled_client_is_dropped_after_the_handler_timeout() -> None:
    s = serve(timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", s.port)) as c:
            c.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            c.settimeout(120)  # a server without the timeout never closes: this recv would raise
            t0 = time.monotonic()
            assert c.recv(100) == b""  # closed by the server, not answered
            assert time.monotonic() - t0 >= 0.5  # after waiting (a timeout fires late on a busy host, never early)
        assert web.make_handler(_registry(), lambda: (True, "")).timeout == 10  # type: ignore[attr-defined]
    finally:
        s.server.stop()


# --- TLS and basic auth (--web.config.file, exporter-toolkit format) -----------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("certs"))


def _client(cert: Path, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    for k, v in versions.items():
        setattr(ctx, k, v)
    return ctx


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def tls_auth(tmp_path_factory: pytest.TempPathFactory, certs: tuple[Path, Path]) -> Iterator[Served]:
    cert, key = certs
    cfg = tmp_path_factory.mktemp("tls") / "web.yml"
    cfg.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS13\n"
                   f"basic_auth_users:\n  alice: '{bcrypt_hash('s3cret')}'\n")
    s = serve(cfg)
    yield s
    s.server.stop()


def test_tls_with_basic_auth(tls_auth: Served, certs: tuple[Path, Path]) -> None:
    ctx = _client(certs[0])
    code, _, body = tls_auth.request("GET", "/metrics", _basic("alice", "s3cret"), ctx)
    assert code == 200 and b"kprobe_test_total" in body
    for headers in ({}, _basic("alice", "wrong"), _basic("mallory", "s3cret"), {"Authorization": "Basic !!!"},
                    {"Authorization": "Bearer s3cret"}):
        code, hdrs, body = tls_auth.request("GET", "/metrics", headers, ctx)
        assert code == 401, headers
        assert hdrs.get("WWW-Authenticate") == 'Basic realm="kprobe-exporter"'
        assert b"kprobe_test" not in body
    assert tls_auth.request("GET", "/debug/pprof/", _basic("alice", "s3cret"), ctx)[0] == 404


def test_tls_min_version_is_enforced(tls_auth: Served, certs: tuple[Path, Path]) -> None:
    old = _client(certs[0], maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        tls_auth.request("GET", "/metrics", _basic("alice", "s3cret"), old)
    new = _client(certs[0], minimum_version=ssl.TLSVersion.TLSv1_3)
    assert tls_auth.request("GET", "/metrics", _basic("alice", "s3cret"), new)[0] == 200


def test_tls_refuses_plain_http_and_untrusted_clients_see_the_cert(tls_auth: Served) -> None:
    with pytest.raises((http.client.HTTPException, OSError)):
        tls_auth.request("GET", "/metrics", _basic("alice", "s3cret"))
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_auth.request("GET", "/metrics", {}, ssl.create_default_context())


def test_a_stalled_tls_handshake_does_not_block_other_clients(tls_auth: Served, certs: tuple[Path, Path]) -> None:
    with socket.create_connection(("127.0.0.1", tls_auth.port)) as stalled:
        stalled.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert tls_auth.request("GET", "/metrics", _basic("alice", "s3cret"), _client(certs[0]))[0] == 200
        # served while the stalled handshake still holds its connection: a server it blocked would only
        # answer once its timeout had dropped that connection (the order, not a time, tells them apart)
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):
            stalled.recv(1, socket.MSG_PEEK)  # open, nothing sent: neither closed (b"") nor answered


def test_tls12_minimum_accepts_tls12(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    cert, key = certs
    cfg = tmp_path / "web.yml"
    cfg.write_text(f"tls_server_config: {{cert_file: {cert.name}, key_file: {key.name}}}\n")  # relative to the file
    (tmp_path / cert.name).write_bytes(cert.read_bytes())
    (tmp_path / key.name).write_bytes(key.read_bytes())
    s = serve(cfg)
    try:
        ctx = _client(cert, maximum_version=ssl.TLSVersion.TLSv1_2)
        assert s.request("GET", "/metrics", context=ctx)[0] == 200  # no basic_auth_users: no auth
    finally:
        s.server.stop()
