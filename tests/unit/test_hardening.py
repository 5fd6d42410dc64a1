"""Review findings, pinned: unix socket paths, admin exposure, log injection, silent plaintext."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dbmtls.config.destinationrule import map_destination_rule
from dbmtls.config.model import AdminConfig, TLSSettings
from dbmtls.config.schema import ValidationError
from dbmtls.errors import ConfigError
from dbmtls.logs import _fmt_value
from dbmtls.proxy.server import _remove_stale_socket
from dbmtls.tls.context import _dns_match


def test_a_regular_file_at_the_socket_path_is_never_deleted(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("data")
    with pytest.raises(ConfigError, match="not a socket"):
        _remove_stale_socket(str(precious))
    assert precious.read_text() == "data"


def test_a_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen(1)
        with pytest.raises(ConfigError, match="another process is listening"):
            _remove_stale_socket(path)
        assert Path(path).exists()


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)  # bound, never listening: what a crash leaves behind
    _remove_stale_socket(path)
    assert not Path(path).exists()


def test_admin_off_loopback_needs_opt_in() -> None:
    with pytest.raises(ValidationError, match="allowRemote"):
        AdminConfig(listen="0.0.0.0:15000")
    assert AdminConfig(listen="0.0.0.0:15000", allowRemote=True).listen == "0.0.0.0:15000"
    assert AdminConfig(listen="[::1]:15000").listen == "[::1]:15000"


def test_log_values_cannot_forge_lines() -> None:
    forged = "alice\n2026-11-28T05:33:09.000Z WARNING forged line"
    out = _fmt_value(forged)
    assert "\n" not in out
    assert out.startswith('"')
    assert _fmt_value("a\tb") == '"a\\tb"'
    assert _fmt_value("plain") == "plain"


def test_disable_with_tls_fields_is_an_error() -> None:
    with pytest.raises(ValidationError, match="mode DISABLE sends plaintext"):
        TLSSettings(mode="DISABLE", caCertificates="/ca.crt")


def test_destination_rule_tls_without_mode_is_an_error() -> None:
    doc = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "db", "annotations": {"dbmtls.io/protocol": "redis"}},
        "spec": {"host": "cache", "trafficPolicy": {"tls": {"caCertificates": "/ca.crt"}}},
    }
    with pytest.raises(ConfigError, match="without a mode"):
        map_destination_rule(doc, "dr.yaml")


@pytest.mark.parametrize(
    ("pattern", "name", "ok"),
    [("*.example.com", "db.example.com", True), ("*.com", "example.com", False), ("*.", "x.", False)],
)
def test_wildcards_never_cover_a_whole_suffix(pattern: str, name: str, ok: bool) -> None:
    assert _dns_match(pattern, name) is ok
