"""Web config: --web.config.file (exporter-toolkit format) as a socket wrapper and an authorizer; one-line errors."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest

from kprobe_exporter import webconfig
from kprobe_exporter.errors import UserError
from unit.test_web import bcrypt_hash, make_cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("certs"))


def test_an_empty_web_config_turns_nothing_on(tmp_path: Path) -> None:
    cfg = tmp_path / "web.yml"
    cfg.write_text("# nothing yet\n")
    assert webconfig.load(str(cfg)) == (None, None)


def test_cert_paths_are_relative_to_the_web_config(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    d = tmp_path / "etc"
    d.mkdir()
    for f in certs:
        shutil.copy(f, d / f.name)
    cfg = d / "web.yml"
    cfg.write_text(f"tls_server_config: {{cert_file: {certs[0].name}, key_file: {certs[1].name}}}\n"
                   f"basic_auth_users: {{alice: '{bcrypt_hash('pw')}'}}\n")
    wrap, authorize = webconfig.load(str(cfg))
    assert wrap is not None and authorize is not None
    with pytest.raises(UserError, match=rf"field .tls_server_config.cert_file.: cannot read {tmp_path}/cert.pem "):
        (tmp_path / "elsewhere.yml").write_text(cfg.read_text())
        webconfig.load(str(tmp_path / "elsewhere.yml"))


def test_a_key_given_twice_keeps_the_last_as_pyyaml_does(tmp_path: Path) -> None:
    cfg = tmp_path / "web.yml"
    cfg.write_text("basic_auth_users: {alice: plain}\nbasic_auth_users: {}\n")
    assert webconfig.load(str(cfg)) == (None, None)  # the first (a plain password, refused) is gone


def test_tls_version_names() -> None:
    assert webconfig._TLS_VERSIONS == {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


def test_web_config_errors_are_one_line(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    cfg = tmp_path / "web.yml"
    for text, needle in [
        ("basic_auth_users: {alice: hunter2}\n", "field 'basic_auth_users.alice': must be a bcrypt hash"),
        ("tls_server_config: {cert_file: a, key_file: b, min_version: TLS11}\n",
         "field 'tls_server_config.min_version': Input should be 'TLS12' or 'TLS13'"),
        ("basic_auth_user: {}\n", "field 'basic_auth_user': unknown key 'basic_auth_user'; did you mean"),
        ("tls_server_config: {cert_file: x}\n", "field 'tls_server_config.key_file': is required"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_versoin: TLS13\n", "did you mean 'min_version'?"),
        ("- a\n", "the top level must be a mapping"),
        ("basic_auth_users: {bob: '$2b$04$short'}\nx: [\n", "YAML error at line 3, column 1"),
        (f"tls_server_config: {{cert_file: {certs[0]}, key_file: {certs[0]}}}\n", "cannot load certificate/key"),
        (f"tls_server_config: {{cert_file: {certs[0]}, key_file: {certs[1]}, "
         "client_auth_type: RequireAndVerifyClientCert}\n", "client_ca_file': is required for client certs"),
    ]:
        cfg.write_text(text)
        with pytest.raises(UserError) as e:
            webconfig.load(str(cfg))
        assert e.value.line().startswith(f"{cfg}: ") and needle in e.value.line(), e.value.line()
        assert "\n" not in e.value.line()


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        webconfig.load(str(tmp_path / "missing.yml"))
    assert e.value.line() == f"{tmp_path}/missing.yml: no such web config file"
    bad = tmp_path / "latin1.yml"
    bad.write_bytes(b"basic_auth_users: {caf\xe9: x}\n")
    with pytest.raises(UserError, match="the web config file is not UTF-8 text"):
        webconfig.load(str(bad))
