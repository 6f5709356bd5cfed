"""Web config: TLS and basic auth from an exporter-toolkit style --web.config.file."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kprobe_exporter.config import ConfigError

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


def load(path: str) -> tuple[SocketWrap | None, Authorize | None]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        cfg = WebConfig.model_validate(data)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the web config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {e}".replace("\n", " ")) from None
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"{path}: field {field!r}: {err['msg']}") from None
    return _tls(path, cfg.tls_server_config), _basic_auth(path, cfg.basic_auth_users)


def _tls(path: str, tls: TLSServerConfig | None) -> SocketWrap | None:
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[tls.min_version]
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_auth_type == "RequireAndVerifyClientCert":
            if not tls.client_ca_file:
                raise ConfigError(f"{path}: field 'tls_server_config.client_ca_file': is required for client certs")
            ctx.load_verify_locations(tls.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{path}: field 'tls_server_config': cannot load certificate/key: {e}") from None

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
            raise ConfigError(f"{path}: field 'basic_auth_users.{user}': must be a bcrypt hash ($2b$...)")
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
