"""``dbmtls run`` loads only what its configuration uses (docs/memory.md).

dnspython (``dns.mode: direct``), prometheus_client (the first ``GET /metrics``), the admin
server (an admin listener) and cryptography (a certificate OpenSSL's decoding leaves to it) are
imported where they are used.  Each of these is megabytes of RSS
that a sidecar would otherwise carry for its whole life; a module-level import added anywhere on
the run path would bring one back without any test failing, so this test runs the real process
with Python's import log (``PYTHONPROFILEIMPORTTIME``) and reads what it imported.  That the lazy paths still work when
they are needed is what the end-to-end tests of each feature show (test_dns_direct.py,
test_mysql.py, test_admin_lifecycle.py); the metrics path is checked here too.
"""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import pytest

from dbmtls.native import load
from support.certs import PKI
from support.net import free_port
from support.proc import Dbmtls, on_plane, tls_block
from support.redis_server import RedisTLS

pytestmark = pytest.mark.e2e

# Packages the run path of a Redis database with dns.mode system must not import.  cryptography
# too, where the native extension is built: OpenSSL decodes the certificates (tls/certfields.py),
# on either data plane.
NOT_ON_THE_RUN_PATH = ("dns", "prometheus_client", "dbmtls.admin.metrics") + (
    ("cryptography",) if load()[0] is not None else ()
)
# ... and with the admin listener off, not the admin server either.
NOT_WITHOUT_ADMIN = ("h11", "dbmtls.admin.server")

_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", re.MULTILINE)


def imported(log: str) -> set[str]:
    """The modules the process imported, from the ``-X importtime`` lines in its log."""
    return set(_IMPORTED.findall(log))


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def ping(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(64) == b"+PONG\r\n"


def accepted(metrics: bytes) -> float:
    m = re.search(rb'^dbmtls_connections_accepted_total\{database="cache"\} (\S+)$', metrics, re.MULTILINE)
    assert m is not None, metrics
    return float(m.group(1))


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        return body


def start(tmp_path: Path, pki: PKI, redis_tls: RedisTLS, data_plane: str, *, admin: bool) -> tuple[Dbmtls, int]:
    port = free_port()
    config = {
        "dataPlane": data_plane,
        "databases": [
            {
                "name": "cache",
                "protocol": "redis",
                "listen": f"127.0.0.1:{port}",
                "address": f"localhost:{redis_tls.port}",
                "tls": tls_block(pki),
            }
        ],
    }
    proc = Dbmtls(tmp_path, config, admin=admin)
    return on_plane(proc.start(wait_ports=(port,)), data_plane), port


@pytest.fixture(autouse=True)
def import_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")


def test_run_with_admin_imports_metrics_only_when_scraped(
    pki: PKI, redis_tls: RedisTLS, tmp_path: Path, data_plane: str
) -> None:
    proc, port = start(tmp_path, pki, redis_tls, data_plane, admin=True)
    with proc:
        ping(port)
        assert get(f"{proc.admin_url}/readyz") == b"ready\n"
        proc.wait_log("ready databases=1")
        before = imported(proc.log())
        assert "dbmtls.proxy.server" in before  # the import log is there at all
        assert "h11" in before
        assert loaded(before, NOT_ON_THE_RUN_PATH) == []

        first = accepted(get(f"{proc.admin_url}/metrics"))
        assert first >= 1
        after = imported(proc.log())
        assert {"prometheus_client", "dbmtls.admin.metrics"} <= after
        assert loaded(after, ("dns",)) == []
        # a second scrape reuses the registry and still counts
        ping(port)
        assert accepted(get(f"{proc.admin_url}/metrics")) == first + 1


def test_run_without_admin_imports_no_admin_server(
    pki: PKI, redis_tls: RedisTLS, tmp_path: Path, data_plane: str
) -> None:
    proc, port = start(tmp_path, pki, redis_tls, data_plane, admin=False)
    with proc:
        ping(port)
        proc.wait_log("ready databases=1")
        modules = imported(proc.log())
        assert "dbmtls.proxy.server" in modules
        assert loaded(modules, NOT_ON_THE_RUN_PATH + NOT_WITHOUT_ADMIN) == []
