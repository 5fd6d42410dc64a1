"""The Reloader on its own: given ClientTLS objects and an expiry window, nothing from the proxy.

The checks are driven by calling ``reload_all`` as the poll does, so nothing here
waits for a timer; the poll loop itself is exercised by tests/e2e/test_rotation.py.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from cryptography import x509

from dbmtls.config.model import Config
from dbmtls.pki import issue
from dbmtls.tls.material import ClientTLS
from dbmtls.tls.reload import Reloader
from support.certs import PKI
from support.k8s_secret import SecretDir

DAY = 86400.0


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def logged() -> Iterator[list[str]]:
    logger = logging.getLogger("dbmtls")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def _tls(secret: SecretDir) -> ClientTLS:
    config = Config.model_validate(
        {
            "databases": [
                {
                    "name": "pg",
                    "protocol": "postgres",
                    "listen": "127.0.0.1:5432",
                    "address": "db.example:5432",
                    "tls": {
                        "mode": "MUTUAL",
                        "clientCertificate": secret.file("tls.crt"),
                        "privateKey": secret.file("tls.key"),
                        "caCertificates": secret.file("ca.crt"),
                    },
                }
            ]
        }
    )
    tls = ClientTLS(config.databases[0])
    tls.load()
    return tls


def _serial(cert_dir: Path) -> int:
    return x509.load_pem_x509_certificate((cert_dir / "tls.crt").read_bytes()).serial_number


def _client_serial(tls: ClientTLS) -> int:
    assert tls.material is not None
    return next(c.serial for c in tls.material.certs if c.kind == "client")


def _started(reloader: Reloader) -> Reloader:
    async def start_and_stop() -> None:
        await reloader.start()  # takes the baseline fingerprints
        await reloader.stop()

    uvloop.run(start_and_stop())
    return reloader


def test_secret_symlink_swaps_are_reloaded_broken_ones_counted_once(pki: PKI, tmp_path: Path) -> None:
    good, newer, other = (Path(issue(pki.ca, tmp_path / n, client_cn="jinsu")) for n in ("good", "newer", "other"))
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(good)
    tls = _tls(secret)
    reloader = _started(Reloader({"pg": tls}, expiry_warning=7 * DAY))
    counts = reloader.counts["pg"]

    assert reloader.reload_one("pg", "file change", force=False) is None  # nothing changed
    secret.update_from(newer)  # the kubelet's atomic ..data swap: paths unchanged, contents new
    assert reloader.reload_one("pg", "file change", force=False) is True
    assert _client_serial(tls) == _serial(newer)

    mismatched = {"tls.crt": good / "tls.crt", "tls.key": other / "tls.key", "ca.crt": good / "ca.crt"}
    secret.update({name: path.read_bytes() for name, path in mismatched.items()})
    assert reloader.reload_one("pg", "file change", force=False) is False
    assert reloader.reload_one("pg", "file change", force=False) is None  # reported once, not on every poll
    assert _client_serial(tls) == _serial(newer)  # the previous material stays in use
    assert (counts.success, counts.failure) == (1, 1)

    assert reloader.reload_one("pg", "SIGHUP", force=True) is False  # forced: tried again even unchanged
    secret.update_from(other)
    reloader.reload_all("file change", force=False)
    assert _client_serial(tls) == _serial(other)
    assert (counts.success, counts.failure) == (2, 2)


def test_the_expiry_window_is_the_one_passed_in(pki: PKI, tmp_path: Path, logged: list[str]) -> None:
    soon = Path(
        issue(pki.ca, tmp_path / "soon", client_cn="jinsu", not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=3))
    )
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(soon)
    tls = _tls(secret)
    _started(Reloader({"pg": tls}, expiry_warning=2 * DAY))
    assert "certificate expires soon" not in logged
    _started(Reloader({"pg": tls}, expiry_warning=4 * DAY))
    assert logged.count("certificate expires soon") == 1
