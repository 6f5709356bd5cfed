"""Web config: TLS and basic auth from an exporter-toolkit style --web.config.file."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kprobe_exporter import yamlmodel
from kprobe_exporter.errors import UserError
from kprobe_exporter.yamlmodel import FileKind

_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSServerConfig(_Strict):
    cert_file: str
    key_file: str
    min_version: Literal["TLS12", "TLS13"] = "TLS12"
    client_ca_file: str | None = None
    client_auth_type: Literal["NoClientCert", "RequireAndVerifyClientCert"] = "NoClientCert"


class WebConfig(_Strict):
    tls_server_config: TLSServerConfig | None = None
    basic_auth_users: dict[str, str] = Field(default_factory=dict)


SocketWrap = Callable[[socket.socket], socket.socket]
Authorize = Callable[[BaseHTTPRequestHandler], bool]


WEB_CONFIG_FILE = FileKind("web config", top_level="the top level must be a mapping (tls_server_config, "
                           "basic_auth_users)", unique_keys=False)  # PyYAML's last-wins, as before


def load(path: str) -> tuple[SocketWrap | None, Authorize | None]:
    cfg = yamlmodel.load_file(WebConfig, path, WEB_CONFIG_FILE)
    return _tls(path, cfg.tls_server_config), _basic_auth(path, cfg.basic_auth_users)


def _tls(path: str, tls: TLSServerConfig | None) -> SocketWrap | None:
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[tls.min_version]
    files: dict[str, str] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        file = getattr(tls, key)
        if file is None:
            continue
        file = str(Path(path).parent / file)  # relative paths are relative to the web config, as in exporter-toolkit
        try:
            with open(file, "rb"):
                pass
        except OSError as e:
            raise UserError(f"cannot read {file} ({e.strerror})", field=f"tls_server_config.{key}", file=path) from None
        files[key] = file
    if tls.client_auth_type == "RequireAndVerifyClientCert" and "client_ca_file" not in files:
        raise UserError("is required for client certs", field="tls_server_config.client_ca_file", file=path)
    try:
        ctx.load_cert_chain(files["cert_file"], files["key_file"])
        if tls.client_auth_type == "RequireAndVerifyClientCert":
            ctx.load_verify_locations(files["client_ca_file"])
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"cannot load certificate/key: {e}", field="tls_server_config", file=path) from None

    def wrap(sock: socket.socket) -> socket.socket:
        # The handshake happens in the request thread, so a stalled client cannot block accept().
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    return wrap


def _basic_auth(path: str, users: dict[str, str]) -> Authorize | None:
    if not users:
        return None
    import bcrypt

    hashes = {}
    for user, hashed in users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise UserError("must be a bcrypt hash ($2b$...)", field=f"basic_auth_users.{user}", file=path)
        hashes[user] = hashed.encode()
    cache: dict[bytes, bool] = {}  # bcrypt costs ~50-200 ms; remember verdicts per header value

    def authorize(handler: BaseHTTPRequestHandler) -> bool:
        header = handler.headers.get("Authorization", "")
        ok = False
        if header.startswith("Basic "):
            key = header.encode()
            if key in cache:
                ok = cache[key]
            else:
                try:
                    user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
                    h = hashes.get(user)
                    ok = bool(h) and bcrypt.checkpw(password.encode(), h)  # type: ignore[arg-type]
                except (ValueError, UnicodeDecodeError):
                    ok = False
                if len(cache) < 1024:
                    cache[key] = ok
        if not ok:
            handler.send_response(401)
            handler.send_header("WWW-Authenticate", 'Basic realm="kprobe-exporter"')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        return ok

    return authorize
