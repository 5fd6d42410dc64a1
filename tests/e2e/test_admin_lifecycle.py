"""The admin server over real HTTP, readiness, metrics, drain and exit codes (real redis-server)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from support.certs import PKI
from support.net import free_port
from support.proc import Dbmtls, on_plane, tls_block
from support.redis_server import RedisTLS


def _get(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=body)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _config(port: int, redis_port: int, tls: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "databases": [
            {"name": "cache", "protocol": "redis", "listen": f"127.0.0.1:{port}", "address": f"localhost:{redis_port}"}
            | {"tls": tls}
        ],
        **extra,
    }


def _metrics(proxy: Dbmtls) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = _get(proxy.admin_url + "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _wait_metric(
    proxy: Dbmtls, name: str, labels: tuple[tuple[str, str], ...], value: float
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    deadline = time.monotonic() + 10
    while True:
        m = _metrics(proxy)
        if m[(name, labels)] == value or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_endpoints_metrics_match_traffic(pki: PKI, redis_tls: RedisTLS, workdir: Path, data_plane: str) -> None:
    port = free_port()
    settings = _config(port, redis_tls.port, tls_block(pki), dataPlane=data_plane)
    with Dbmtls(workdir, settings, admin=True).start((port,)) as proxy:
        on_plane(proxy, data_plane)
        assert _get(proxy.admin_url + "/healthz") == (200, "ok\n")
        assert _get(proxy.admin_url + "/readyz") == (200, "ready\n")
        db = (("database", "cache"),)
        # the start-up probe (wait_port) is a connection too: count from when it is gone
        base = _wait_metric(proxy, "dbmtls_connections_active", db, 0)
        sent = 0
        received = 0
        for i in range(5):
            with socket.create_connection(("127.0.0.1", port)) as s:
                cmd = f"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${i + 1}\r\n{'x' * (i + 1)}\r\n".encode()
                s.sendall(cmd)
                sent += len(cmd)
                reply = s.recv(100)
                assert reply == b"+OK\r\n"
                received += len(reply)
        # a connection is counted closed once both of its sides are
        m = _wait_metric(proxy, "dbmtls_connections_active", db, 0)

        def delta(name: str, labels: tuple[tuple[str, str], ...] = db) -> float:
            return m[(name, labels)] - base[(name, labels)]

        assert delta("dbmtls_connections_accepted_total") == 5
        assert delta("dbmtls_connections_closed_total") == 5
        assert m[("dbmtls_connections_active", db)] == 0
        assert delta("dbmtls_bytes_total", (("database", "cache"), ("direction", "app_to_upstream"))) == sent
        assert delta("dbmtls_bytes_total", (("database", "cache"), ("direction", "upstream_to_app"))) == received
        assert delta("dbmtls_upstream_tls_handshake_duration_seconds_count") == 5
        assert m[("dbmtls_handshake_failures_total", (("database", "cache"), ("reason", "unknown_ca")))] == 0
        not_after = [v for (name, labels), v in m.items() if name == "dbmtls_certificate_not_after_timestamp_seconds"]
        assert len(not_after) == 2 and all(v > time.time() for v in not_after)  # client + CA

        status, config = _get(proxy.admin_url + "/config")
        assert status == 200 and "BEGIN" not in config and "PRIVATE" not in config
        assert pki.client.key in config  # paths, not contents

        assert _get(proxy.admin_url + "/loglevel", "POST", b"debug") == (200, "debug\n")
        assert _get(proxy.admin_url + "/loglevel") == (200, "debug\n")
        assert _get(proxy.admin_url + "/loglevel", "POST", b"chatty")[0] == 400
        assert _get(proxy.admin_url + "/nope")[0] == 404
        assert _get(proxy.admin_url + "/quitquitquit")[0] == 405
        # a web page cannot POST to the admin API (browsers always send Origin cross-site)
        req = urllib.request.Request(
            proxy.admin_url + "/quitquitquit", method="POST", headers={"Origin": "http://evil.example"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=5)
        assert refused.value.code == 403
        assert _get(proxy.admin_url + "/healthz") == (200, "ok\n")

        assert _get(proxy.admin_url + "/quitquitquit", "POST") == (200, "draining\n")
        assert proxy.proc is not None
        assert proxy.proc.wait(timeout=15) == 0


def _get_with(url: str, method: str = "GET", **headers: str) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, headers={k.replace("_", "-"): v for k, v in headers.items()})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_dns_rebinding_and_cross_site_posts_are_refused(pki: PKI, redis_tls: RedisTLS, workdir: Path) -> None:
    port = free_port()
    with Dbmtls(workdir, _config(port, redis_tls.port, tls_block(pki)), admin=True).start((port,)) as proxy:
        status, body = _get_with(proxy.admin_url + "/config", Host="evil.example:15000")
        assert status == 403 and "loopback" in body and pki.client.key not in body
        assert _get_with(proxy.admin_url + "/config", Host="localhost:15000")[0] == 200
        # a cross-site form POST carries no Origin in some browsers, but always Sec-Fetch-Site
        assert _get_with(proxy.admin_url + "/quitquitquit", "POST", Sec_Fetch_Site="cross-site")[0] == 403
        assert _get(proxy.admin_url + "/readyz") == (200, "ready\n")  # still running
    remote = _config(port, redis_tls.port, tls_block(pki), admin={"allowRemote": True})
    with Dbmtls(workdir, remote, admin=True).start((port,)) as proxy:
        # Prometheus scraping by pod IP sends that IP as Host
        assert _get_with(proxy.admin_url + "/metrics", Host="10.12.0.7:15000")[0] == 200


def test_failure_metric_by_reason(pki: PKI, redis_tls: RedisTLS, workdir: Path) -> None:
    port = free_port()
    tls = tls_block(pki, ca=str(pki.other_ca / "ca.crt"))
    with Dbmtls(workdir, _config(port, redis_tls.port, tls), admin=True).start((port,)) as proxy:
        with pytest.raises(redis.ResponseError, match="not trusted"):
            redis.Redis(port=port).ping()
        # one per failed connection, the start-up probe included: the same count as the log lines
        # (a session may end between reading the log and scraping: poll until they agree)
        deadline = time.monotonic() + 10
        while True:
            logged = proxy.wait_log("reason=unknown_ca").count("reason=unknown_ca")
            m = _metrics(proxy)
            failures = m[("dbmtls_handshake_failures_total", (("database", "cache"), ("reason", "unknown_ca")))]
            if failures == logged or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert failures == logged >= 1
        assert m[("dbmtls_handshake_failures_total", (("database", "cache"), ("reason", "name_mismatch")))] == 0


def test_readiness_follows_missing_cert_then_recovers(pki: PKI, redis_tls: RedisTLS, workdir: Path) -> None:
    """A client cert missing at start: not ready (503 naming the file), apps get an error; once it appears: ready."""
    certs = workdir / "certs"
    certs.mkdir()
    shutil.copy(pki.client.ca, certs / "ca.crt")
    port = free_port()
    tls = tls_block(pki) | {
        "clientCertificate": str(certs / "tls.crt"),
        "privateKey": str(certs / "tls.key"),
        "caCertificates": str(certs / "ca.crt"),
    }
    with Dbmtls(workdir, _config(port, redis_tls.port, tls), admin=True).start((port,)) as proxy:
        status, body = _get(proxy.admin_url + "/readyz")
        assert status == 503
        assert "tls.crt" in body and "not found" in body
        # the log agrees with /readyz: no "ready" line while it answers 503
        line = proxy.wait_line(r"started, not ready")
        assert "tls.crt" in line and "not found" in line
        with pytest.raises(redis.ResponseError, match="TLS material is not loaded"):
            redis.Redis(port=port).ping()
        wait = subprocess.run(
            [sys.executable, "-m", "dbmtls", "wait", "--admin", proxy.admin_url[7:], "--timeout", "1s"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert wait.returncode == 1 and "not found" in wait.stderr

        shutil.copy(pki.client.key, certs / "tls.key")
        shutil.copy(pki.client.cert, certs / "tls.crt")
        wait = subprocess.run(
            [sys.executable, "-m", "dbmtls", "wait", "--admin", proxy.admin_url[7:], "--timeout", "20s"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert wait.returncode == 0, wait.stderr
        assert redis.Redis(port=port).ping()


def test_sigterm_drains_open_connection_then_exits_zero(
    pki: PKI, redis_tls: RedisTLS, workdir: Path, data_plane: str
) -> None:
    port = free_port()
    config = _config(port, redis_tls.port, tls_block(pki), drainTimeout="20s", dataPlane=data_plane)
    with Dbmtls(workdir, config).start((port,)) as proxy:
        on_plane(proxy, data_plane)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"*3\r\n$5\r\nBLPOP\r\n$9\r\nnever-set\r\n$1\r\n2\r\n")  # blocks 2 s server-side
        # the request must reach Redis before the signal: wait until Redis shows it blocked
        with redis.Redis(port=port) as observer:
            deadline = time.monotonic() + 15
            while not any(c.get("cmd") == "blpop" for c in observer.client_list()):
                assert time.monotonic() < deadline, "the BLPOP never reached Redis"
                time.sleep(0.05)
        started = time.monotonic()
        proxy.signal(15)
        proxy.wait_log("draining")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        reply = s.recv(100)
        assert reply == b"*-1\r\n"  # the in-flight request finished during the drain
        assert proxy.proc is not None and proxy.proc.poll() is None  # still waiting for us
        s.close()
        assert proxy.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 20


def test_second_signal_closes_at_once_but_a_second_quitquitquit_does_not(
    pki: PKI, redis_tls: RedisTLS, workdir: Path, data_plane: str
) -> None:
    port = free_port()
    config = _config(port, redis_tls.port, tls_block(pki), drainTimeout="20s", dataPlane=data_plane)
    with Dbmtls(workdir, config, admin=True).start((port,)) as proxy:
        on_plane(proxy, data_plane)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"PING\r\n")
        assert s.recv(10) == b"+PONG\r\n"  # an open, idle connection keeps the drain waiting
        started = time.monotonic()
        assert _get(proxy.admin_url + "/quitquitquit", "POST") == (200, "draining\n")
        proxy.wait_log("draining")
        # the admin server stays up during the drain; asking again is not a "second signal"
        assert _get(proxy.admin_url + "/quitquitquit", "POST") == (200, "draining\n")
        assert "second signal" not in proxy.log()
        assert proxy.proc is not None and proxy.proc.poll() is None
        proxy.signal(15)
        proxy.wait_log("second signal: closing all connections now")
        assert proxy.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 15
        assert s.recv(10) == b""
        s.close()


def test_drain_timeout_closes_idle_connections(pki: PKI, redis_tls: RedisTLS, workdir: Path, data_plane: str) -> None:
    port = free_port()
    config = _config(port, redis_tls.port, tls_block(pki), drainTimeout="1s", dataPlane=data_plane)
    with Dbmtls(workdir, config).start((port,)) as proxy:
        on_plane(proxy, data_plane)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"PING\r\n")
        assert s.recv(10) == b"+PONG\r\n"
        started = time.monotonic()
        proxy.signal(15)
        assert proxy.proc is not None
        assert proxy.proc.wait(timeout=10) == 0
        assert 0.9 < time.monotonic() - started < 8
        assert s.recv(10) == b""  # closed by dbmtls at the end of the drain
        s.close()
        assert "drain timeout" in proxy.log()


def test_json_logs(pki: PKI, redis_tls: RedisTLS, workdir: Path) -> None:
    import json

    port = free_port()
    with Dbmtls(workdir, _config(port, redis_tls.port, tls_block(pki)), args=("--log-format", "json")).start(
        (port,)
    ) as proxy:
        assert redis.Redis(port=port).ping()
        proxy.wait_log('"connection closed"')
        proxy.stop()
    lines = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    closed = [r for r in lines if r["msg"] == "connection closed"]
    assert closed and closed[0]["db"] == "cache" and closed[0]["tls"].startswith("TLSv1.")
    assert all("BEGIN" not in json.dumps(r) for r in lines)


def test_expiry_warning_and_sighup_reload(pki: PKI, redis_tls: RedisTLS, workdir: Path, data_plane: str) -> None:
    """A client certificate inside certificateExpiryWarning is warned about; SIGHUP reloads."""
    import datetime as dt

    from dbmtls.pki import issue

    soon = issue(pki.ca, workdir / "soon", client_cn="jinsu", not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    port = free_port()
    tls = tls_block(pki) | {"clientCertificate": str(soon / "tls.crt"), "privateKey": str(soon / "tls.key")}
    config = _config(port, redis_tls.port, tls, certificateExpiryWarning="7d", dataPlane=data_plane)
    with Dbmtls(workdir, config).start((port,)) as proxy:
        on_plane(proxy, data_plane)
        log = proxy.wait_log("certificate expires soon")
        line = next(ln for ln in log.splitlines() if "certificate expires soon" in ln)
        assert "kind=client" in line
        assert "expires_in=1.9d" in line or "expires_in=2.0d" in line
        proxy.signal(1)  # SIGHUP
        proxy.wait_log("trigger=SIGHUP")
        assert redis.Redis(port=port).ping()
