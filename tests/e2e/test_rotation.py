"""Certificate and CA rotation under load, against a real PostgreSQL 15.

The certificates live in a directory laid out like a mounted Kubernetes Secret and
are replaced the way the kubelet does it (an atomic ``..data`` symlink swap). The
server proves which client certificate each new connection presented:
``pg_stat_ssl.client_serial`` of the backend that ran the query.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbmtls.pki import issue
from support.certs import PKI
from support.k8s_secret import SecretDir
from support.net import free_port
from support.pg_server import PostgresTLS
from support.proc import Dbmtls

pytestmark = pytest.mark.e2e
USER = "jinsu"
SERIAL_SQL = "SELECT client_serial::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.fixture(scope="module")
def pg(pki: PKI) -> Iterator[PostgresTLS]:
    server = PostgresTLS(pki.server, pki.ca_cert).start()
    try:
        server.create_user(USER, database="app")
        yield server
    finally:
        server.stop()


def _client_cert(pki: PKI, root: Path, name: str, **kw: Any) -> Path:
    return Path(issue(pki.ca, root / name, client_cn=USER, **kw))


def _serial(cert_dir: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate((cert_dir / "tls.crt").read_bytes()).serial_number


def _config(listen: int, pg: PostgresTLS, secret: SecretDir) -> dict[str, Any]:
    return {
        "databases": [
            {
                "name": "pg",
                "protocol": "postgres",
                "listen": f"127.0.0.1:{listen}",
                "address": f"localhost:{pg.port}",
                "tls": {
                    "mode": "MUTUAL",
                    "clientCertificate": secret.file("tls.crt"),
                    "privateKey": secret.file("tls.key"),
                    "caCertificates": secret.file("ca.crt"),
                },
            }
        ]
    }


def _query_serial(port: int) -> int:
    with psycopg.connect(f"host=127.0.0.1 port={port} user={USER} dbname=app connect_timeout=5") as conn:
        row = conn.execute(SERIAL_SQL).fetchone()
        assert row is not None
        return int(row[0])


def _metric(proxy: Dbmtls, name: str, **labels: str) -> float:
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name} {labels} not in /metrics")


def _wait_lines(proxy: Dbmtls, needle: str, count: int, timeout: float = 15.0) -> list[str]:
    """The log lines containing ``needle``, once there are at least ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in proxy.log().splitlines() if needle in ln]
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, f"fewer than {count} lines with {needle!r}:\n{proxy.log()}"
        time.sleep(0.05)


def _readyz(proxy: Dbmtls) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(proxy.admin_url + "/readyz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_ready(proxy: Dbmtls, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (answer := _readyz(proxy))[0] != 200:
        assert time.monotonic() < deadline, f"/readyz still {answer}\n{proxy.log()}"
        time.sleep(0.1)


class Load:
    """A client loop through dbmtls: a new connection (new upstream handshake) per query."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.serials: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.serials.append(_query_serial(self.port))
            except Exception as exc:  # counted, not raised: the assertion is "zero"
                self.errors.append(repr(exc))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def wait_for(self, serial: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serials and self.serials[-1] == serial:
                return
            time.sleep(0.05)
        raise AssertionError(f"serial {serial:x} never seen; last {self.serials[-3:]}, errors {self.errors[:3]}")


def test_client_certificate_rotated_three_times_under_load(pki: PKI, pg: PostgresTLS, workdir: Path) -> None:
    secret = SecretDir(workdir / "client-certs")
    certs = [_client_cert(pki, workdir, f"gen{i}") for i in range(4)]
    secret.update_from(certs[0])
    port = free_port()
    with Dbmtls(workdir, _config(port, pg, secret), admin=True).start((port,)) as proxy, Load(port) as load:
        load.wait_for(_serial(certs[0]))
        for cert in certs[1:]:
            secret.update_from(cert)
            load.wait_for(_serial(cert))
    # The load ran without a pause across every swap (each wait saw the new serial arrive while
    # queries kept going); how many queries fit in that time is the machine's business, not ours.
    assert load.errors == []
    seen = list(dict.fromkeys(load.serials))  # distinct, in order of first appearance
    assert seen == [_serial(c) for c in certs]
    assert "certificates reloaded" in proxy.log()


def test_broken_replacements_keep_the_old_certificate(pki: PKI, pg: PostgresTLS, workdir: Path) -> None:
    secret = SecretDir(workdir / "client-certs")
    good = _client_cert(pki, workdir, "good")
    other = _client_cert(pki, workdir, "other")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    expired = _client_cert(pki, workdir, "expired", not_after=past)
    secret.update_from(good)
    port = free_port()
    with Dbmtls(workdir, _config(port, pg, secret), admin=True).start((port,)) as proxy:
        assert _query_serial(port) == _serial(good)
        ca = (good / "ca.crt").read_bytes()
        broken = {
            "key of another certificate": {
                "tls.crt": (good / "tls.crt").read_bytes(),
                "tls.key": (other / "tls.key").read_bytes(),
                "ca.crt": ca,
            },
            "truncated PEM": {
                "tls.crt": (other / "tls.crt").read_bytes()[:200],
                "tls.key": (other / "tls.key").read_bytes(),
                "ca.crt": ca,
            },
            "expired certificate": {
                "tls.crt": (expired / "tls.crt").read_bytes(),
                "tls.key": (expired / "tls.key").read_bytes(),
                "ca.crt": ca,
            },
        }
        expected_text = {
            "key of another certificate": "does not match",
            "truncated PEM": "no PEM certificate",
            "expired certificate": "expired",
        }
        for i, (what, files) in enumerate(broken.items(), start=1):
            secret.update(files)
            # one ERROR line per change (retries of the same files fail at DEBUG, not shown at info)
            failures = _wait_lines(proxy, "certificate reload failed", i)
            assert expected_text[what] in failures[-1], failures[-1]
            assert "keeping the previous certificates" in failures[-1]
            assert "unless the files change first" in failures[-1]  # and when it is tried again
            # counted (retries are attempts too, so at least once per change)
            assert _metric(proxy, "dbmtls_certificate_reloads_total", database="pg", result="failure") >= i
            # the old, good certificate keeps working for new connections
            assert _query_serial(port) == _serial(good), what
        assert "PRIVATE KEY" not in proxy.log()
        # and a good replacement after the broken ones is taken
        secret.update_from(other)
        deadline = time.monotonic() + 15
        while _query_serial(port) != _serial(other):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_ca_bundle_rotation_is_picked_up(pki: PKI, pg: PostgresTLS, workdir: Path) -> None:
    """A bundle without the server's CA fails with unknown_ca; the rotated bundle with it works."""
    secret = SecretDir(workdir / "client-certs")
    good = _client_cert(pki, workdir, "good")
    secret.update(
        {
            "tls.crt": (good / "tls.crt").read_bytes(),
            "tls.key": (good / "tls.key").read_bytes(),
            "ca.crt": (pki.other_ca / "ca.crt").read_bytes(),
        }
    )
    port = free_port()
    with Dbmtls(workdir, _config(port, pg, secret), admin=True).start((port,)) as proxy:
        with pytest.raises(psycopg.OperationalError, match="not trusted"):
            _query_serial(port)
        secret.update(
            {
                "tls.crt": (good / "tls.crt").read_bytes(),
                "tls.key": (good / "tls.key").read_bytes(),
                "ca.crt": (pki.other_ca / "ca.crt").read_bytes() + (pki.ca / "ca.crt").read_bytes(),
            }
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                assert _query_serial(port) == _serial(good)
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, proxy.log()
                time.sleep(0.1)
        assert _metric(proxy, "dbmtls_certificate_reloads_total", database="pg", result="success") >= 1


def test_a_certificate_not_valid_yet_at_start_is_loaded_at_its_not_before(
    pki: PKI, pg: PostgresTLS, workdir: Path
) -> None:
    """Issued by a CA whose clock is a few seconds ahead: ready at its notBefore, nobody sends SIGHUP.

    The proxy must be up before the notBefore to see the certificate not yet valid. On a busy
    machine a start can take longer than the first lead time; the test then starts again with a
    longer one (so a slow start costs time, never a false failure).
    """
    for attempt, lead in enumerate((4, 12, 30)):
        not_before = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=lead)
        future = _client_cert(pki, workdir, f"future{attempt}", not_before=not_before)
        secret = SecretDir(workdir / f"client-certs{attempt}")
        secret.update_from(future)
        port = free_port()
        with Dbmtls(workdir / f"run{attempt}", _config(port, pg, secret), admin=True).start((port,)) as proxy:
            status, body = _readyz(proxy)
            if status == 200 and dt.datetime.now(dt.UTC) >= not_before:
                continue  # started after the notBefore: nothing left to see; again, with more lead
            assert status == 503 and "is not valid before" in body, body
            scheduled = proxy.wait_line("certificate load will be retried")
            assert f"{not_before + dt.timedelta(seconds=1):%Y-%m-%dT%H:%M:%S}Z" in scheduled
            _wait_ready(proxy)
            loaded = proxy.wait_line("certificates reloaded")
            assert "trigger=retry" in loaded
            assert _query_serial(port) == _serial(future)
            assert "SIGHUP" not in proxy.log()
            return
    pytest.fail("dbmtls took longer than 30 s to start, three times")


def test_a_broken_certificate_is_retried_then_taken_once_fixed(pki: PKI, pg: PostgresTLS, workdir: Path) -> None:
    secret = SecretDir(workdir / "client-certs")
    good = _client_cert(pki, workdir, "good")
    other = _client_cert(pki, workdir, "other")
    mismatched = {"tls.crt": good / "tls.crt", "tls.key": other / "tls.key", "ca.crt": good / "ca.crt"}
    secret.update({name: path.read_bytes() for name, path in mismatched.items()})
    port = free_port()
    config = _config(port, pg, secret)
    with Dbmtls(workdir, config, admin=True, args=("--log-level", "debug")).start((port,)) as proxy:
        assert _readyz(proxy)[0] == 503
        # retried while the files stay the same, each retry logged at DEBUG only
        retries = _wait_lines(proxy, "trigger=retry", 2)
        assert all("DEBUG" in ln and "does not match" in ln for ln in retries), retries
        # the start-up failure was retried after 1 s, then the backoff doubles
        assert ['retry="in 2s' in retries[0], 'retry="in 4s' in retries[1]] == [True, True], retries
        secret.update_from(good)
        _wait_ready(proxy)
        assert 'trigger="file change"' in proxy.wait_line("certificates reloaded")
        assert _query_serial(port) == _serial(good)
