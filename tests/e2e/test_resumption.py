"""Upstream TLS session resumption and the preconnect pool (docs/tls-resumption.md), end to end:
real redis-server and MariaDB, the real ``dbmtls run`` process on both data planes.

What each connection did is read from its close log line (``tls_resumed=``, ``preconnected=``)
and from the metrics; where the server can tell (MariaDB's ``Ssl_sessions_reused``, its
``REQUIRE SUBJECT`` accounts) the server's view is asserted too.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from dbmtls.pki import issue
from support.certs import PKI
from support.mariadb_server import MariaDB
from support.net import free_port
from support.proc import Dbmtls, on_plane, tls_block
from support.redis_server import RedisTLS

pytestmark = pytest.mark.e2e


# --- helpers -------------------------------------------------------------------------------------


def metric(proc: Dbmtls, name: str, db: str) -> float:
    with urllib.request.urlopen(f"{proc.admin_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("database") == db:
                return float(sample.value)
    raise AssertionError(f"no metric {name} for {db}")


def wait_metric(proc: Dbmtls, name: str, db: str, at_least: float, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while (value := metric(proc, name, db)) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{{database={db}}} stayed at {value}, expected >= {at_least}")
        time.sleep(0.05)
    return value


def closed_lines(proc: Dbmtls, db: str) -> list[str]:
    """The close lines of the app connections (not of the start's port probes, which send nothing)."""
    return [
        line
        for line in proc.log().splitlines()
        if re.search(rf"connection closed db={re.escape(db)} ", line) and " bytes_in=0 " not in line
    ]


def wait_closed(proc: Dbmtls, db: str, count: int) -> list[str]:
    deadline = time.monotonic() + 15
    while len(lines := closed_lines(proc, db)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(lines)} close lines for {db}, expected {count}:\n{proc.log()}")
        time.sleep(0.05)
    return lines


def ping(port: int) -> None:
    """One connection, one command, closed: a connection-per-transaction client."""
    r = redis.Redis(port=port, socket_timeout=10)
    try:
        assert r.ping() is True
    finally:
        r.close()


# --- redis: one proxy per data plane -------------------------------------------------------------


@dataclass
class Redis:
    proc: Dbmtls
    ports: dict[str, int]
    server: RedisTLS


@pytest.fixture(scope="module")
def redis_nocache(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTLS]:
    """A Redis that keeps no sessions: it fails a handshake that offers one."""
    server = RedisTLS(
        tmp_path_factory.mktemp("redis-nocache"), pki.server, pki.ca_cert, extra=("--tls-session-caching", "no")
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rp(
    pki: PKI, redis_tls: RedisTLS, redis_nocache: RedisTLS, tmp_path_factory: pytest.TempPathFactory, data_plane: str
) -> Iterator[Redis]:
    work = tmp_path_factory.mktemp("dbmtls-resume")
    good = f"localhost:{redis_tls.port}"
    variants: dict[str, dict[str, Any]] = {
        "resume": {"address": good, "tls": tls_block(pki)},
        "noresume": {"address": good, "tls": tls_block(pki, sessionResumption=False)},
        "nocache": {"address": f"localhost:{redis_nocache.port}", "tls": tls_block(pki)},
        "pool": {"address": good, "tls": tls_block(pki), "preconnect": {"connections": 2}},
        "pool-short": {"address": good, "tls": tls_block(pki), "preconnect": {"connections": 2, "maxIdle": "300ms"}},
    }
    ports = {name: free_port() for name in variants}
    databases = [
        {"name": name, "protocol": "redis", "listen": f"127.0.0.1:{ports[name]}", **v} for name, v in variants.items()
    ]
    proc = Dbmtls(work, {"databases": databases, "dataPlane": data_plane, "drainTimeout": "2s"}, admin=True)
    on_plane(proc.start(wait_ports=tuple(ports.values())), data_plane)
    yield Redis(proc, ports, redis_tls)
    assert proc.stop() == 0


def test_the_second_connection_resumes(rp: Redis) -> None:
    for _ in range(3):
        ping(rp.ports["resume"])
    lines = wait_closed(rp.proc, "resume", 3)
    # each connection reads its reply after the server's tickets: the next one resumes (the
    # first may too, from the ticket of the start's port probe: the native plane reads the
    # server while it waits for the app).  Lines are in close order, not connection order.
    assert sum("tls_resumed=True" in line for line in lines) >= 2, lines
    assert metric(rp.proc, "dbmtls_upstream_tls_resumed_total", "resume") >= 2


def test_resumption_can_be_turned_off(rp: Redis) -> None:
    for _ in range(3):
        ping(rp.ports["noresume"])
    lines = wait_closed(rp.proc, "noresume", 3)
    assert all("tls_resumed=False" in line for line in lines), lines
    assert metric(rp.proc, "dbmtls_upstream_tls_resumed_total", "noresume") == 0


def test_a_server_without_session_cache_is_retried_without_a_session(rp: Redis) -> None:
    """tls-session-caching no: the handshake offering a ticket fails; the dial is retried at once
    without one (the app sees nothing), and no session is offered to that server afterwards."""
    for _ in range(4):
        ping(rp.ports["nocache"])
    lines = wait_closed(rp.proc, "nocache", 4)
    assert all("tls_resumed=False" in line and "connection closed" in line for line in lines), lines
    assert metric(rp.proc, "dbmtls_upstream_tls_resumption_refused_total", "nocache") == 1
    assert "the server refused a resumed TLS session; retrying without one" in rp.proc.log()
    assert "connection failed db=nocache" not in rp.proc.log()


class _Closer:
    """On a port where Redis was: accepts, reads the ClientHello, closes. A server that fails every
    handshake for now (full, restarting) whether a session is offered or not; nothing in the OS
    packages does that on demand, so this is a small fake."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.recv(4096)

    def close(self) -> None:
        # shutdown wakes the accept() blocked in the thread, which otherwise keeps the port bound
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        self.sock.close()


def test_a_server_failing_every_handshake_does_not_turn_resumption_off(
    pki: PKI, tmp_path: Path, data_plane: str
) -> None:
    """A handshake that offered a session failed, and so did the retry without one: the server
    fails every handshake for now, which says nothing about resumption.  Once it is back, the
    connections resume again (before, resumption stayed off for BACKOFF, 300 s)."""
    port = free_port()
    server = RedisTLS(tmp_path / "redis", pki.server, pki.ca_cert, port=port).start()
    listen = free_port()
    db = {"name": "flaky", "protocol": "redis", "listen": f"127.0.0.1:{listen}", "address": f"localhost:{port}"}
    proc = Dbmtls(tmp_path, {"databases": [{**db, "tls": tls_block(pki)}], "dataPlane": data_plane}, admin=True)
    on_plane(proc.start(wait_ports=(listen,)), data_plane)
    closer: _Closer | None = None
    try:
        ping(listen)  # the server's tickets are kept
        wait_closed(proc, "flaky", 1)
        server.stop()
        closer = _Closer(port)
        with pytest.raises(redis.RedisError):
            ping(listen)
        assert "the server refused a resumed TLS session; retrying without one" in proc.log()
        assert closer.accepted == 2  # with the session, then without
        closer.close()
        closer = None
        server = RedisTLS(tmp_path / "redis", pki.server, pki.ca_cert, port=port).start()
        ping(listen)  # a full handshake: the sessions went with the refusal
        ping(listen)  # resumed from the tickets of the one before
        lines = wait_closed(proc, "flaky", 3)
        assert "tls_resumed=True" in lines[-1], lines
        assert metric(proc, "dbmtls_upstream_tls_resumption_refused_total", "flaky") == 1
    finally:
        if closer is not None:
            closer.close()
        server.stop()
        proc.stop(check=False)


def test_preconnect_is_off_by_default(rp: Redis) -> None:
    ping(rp.ports["resume"])
    assert metric(rp.proc, "dbmtls_preconnect_ready", "resume") == 0
    assert metric(rp.proc, "dbmtls_preconnect_used_total", "resume") == 0
    assert not any("preconnected" in line for line in wait_closed(rp.proc, "resume", 1))


def test_the_pool_hands_out_handshaken_connections(rp: Redis) -> None:
    wait_metric(rp.proc, "dbmtls_preconnect_ready", "pool", 2)
    before = len(closed_lines(rp.proc, "pool"))
    used = metric(rp.proc, "dbmtls_preconnect_used_total", "pool")
    ping(rp.ports["pool"])
    line = wait_closed(rp.proc, "pool", before + 1)[-1]
    assert "preconnected=True" in line and "tls=TLSv1.3" in line
    assert metric(rp.proc, "dbmtls_preconnect_used_total", "pool") == used + 1
    wait_metric(rp.proc, "dbmtls_preconnect_ready", "pool", 2)  # replenished


def test_the_pool_replaces_connections_the_server_closed(rp: Redis, pki: PKI) -> None:
    wait_metric(rp.proc, "dbmtls_preconnect_ready", "pool", 2)
    discarded = metric(rp.proc, "dbmtls_preconnect_discarded_total", "pool")
    direct = redis.Redis(
        host="localhost",
        port=rp.server.port,
        ssl=True,
        ssl_certfile=pki.client.cert,
        ssl_keyfile=pki.client.key,
        ssl_ca_certs=pki.ca_cert,
    )
    try:
        killed = direct.client_kill_filter(_type="normal", skipme=True)
    finally:
        direct.close()
    assert killed >= 2  # the pooled ones were open on the server
    # the next app connection never gets a dead one: it works
    ping(rp.ports["pool"])
    wait_metric(rp.proc, "dbmtls_preconnect_discarded_total", "pool", discarded + 2)
    wait_metric(rp.proc, "dbmtls_preconnect_ready", "pool", 2)
    ping(rp.ports["pool"])


def test_the_pool_replaces_connections_older_than_max_idle(rp: Redis) -> None:
    wait_metric(rp.proc, "dbmtls_preconnect_ready", "pool-short", 2)
    discarded = metric(rp.proc, "dbmtls_preconnect_discarded_total", "pool-short")
    # maxIdle 300ms: both are replaced without anybody asking
    wait_metric(rp.proc, "dbmtls_preconnect_discarded_total", "pool-short", discarded + 2)
    wait_metric(rp.proc, "dbmtls_preconnect_ready", "pool-short", 1)
    ping(rp.ports["pool-short"])


# --- reload --------------------------------------------------------------------------------------


def test_a_reload_drops_sessions_and_pooled_connections(
    pki: PKI, redis_tls: RedisTLS, workdir: Path, data_plane: str
) -> None:
    certs = workdir / "certs"
    certs.mkdir()
    shutil.copy(pki.client.cert, certs / "tls.crt")
    shutil.copy(pki.client.key, certs / "tls.key")
    port = free_port()
    tls = tls_block(pki, clientCertificate=str(certs / "tls.crt"), privateKey=str(certs / "tls.key"))
    db = {
        "name": "rot",
        "protocol": "redis",
        "listen": f"127.0.0.1:{port}",
        "address": f"localhost:{redis_tls.port}",
        "tls": tls,
        "preconnect": {"connections": 1},
    }
    with Dbmtls(workdir, {"databases": [db], "dataPlane": data_plane}, admin=True) as proc:
        on_plane(proc.start(wait_ports=(port,)), data_plane)
        wait_metric(proc, "dbmtls_preconnect_ready", "rot", 1)
        for _ in range(3):
            ping(port)
        lines = wait_closed(proc, "rot", 3)
        assert any("tls_resumed=True" in line for line in lines), lines  # sessions were kept
        wait_metric(proc, "dbmtls_preconnect_ready", "rot", 1)
        discarded = metric(proc, "dbmtls_preconnect_discarded_total", "rot")
        # a new client certificate, same name, then SIGHUP
        new = Path(issue(pki.ca, workdir / "new", client_cn="jinsu"))
        shutil.copy(new / "tls.crt", certs / "tls.crt")
        shutil.copy(new / "tls.key", certs / "tls.key")
        proc.signal(signal.SIGHUP)
        proc.wait_line("certificates reloaded")
        ping(port)
        line = wait_closed(proc, "rot", 4)[-1]
        # neither a session nor a connection of the old certificate: a full handshake
        assert "tls_resumed=False" in line, line
        wait_metric(proc, "dbmtls_preconnect_discarded_total", "rot", discarded + 1)
        # and the new identity's own sessions are kept from then on
        for _ in range(3):
            ping(port)
        assert any("tls_resumed=True" in line for line in wait_closed(proc, "rot", 7)[4:])


# --- identities: MariaDB with per-user certificates ----------------------------------------------

ACCOUNTS_SQL = """
CREATE USER 'jinsu'@'%' IDENTIFIED BY 'jinsu-pw' REQUIRE SUBJECT '/CN=jinsu';
CREATE USER 'alice'@'%' IDENTIFIED BY 'alice-pw' REQUIRE SUBJECT '/CN=alice';
"""
PASSWORDS = {"jinsu": "jinsu-pw", "alice": "alice-pw"}


@pytest.fixture(scope="module")
def maria(pki: PKI) -> Iterator[MariaDB]:
    server = MariaDB(pki.server, pki.ca_cert).start()
    try:
        server.sql(ACCOUNTS_SQL)
        yield server
    finally:
        server.stop()


def _login(port: int, user: str) -> str:
    conn = pymysql.connect(host="127.0.0.1", port=port, user=user, password=PASSWORDS[user])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            row = cur.fetchone()
            assert row is not None
            return str(row[0])
    finally:
        conn.close()


def test_sessions_are_never_resumed_across_identities(pki: PKI, maria: MariaDB, workdir: Path, data_plane: str) -> None:
    """Two identities toward one server: jinsu (the default certificate) and alice (her own).
    The server checks each login's certificate (REQUIRE SUBJECT refuses any other), and a resumed
    session carries the certificate of the handshake that made it: a session of jinsu's resumed
    for alice would log alice in with jinsu's certificate, and the server would refuse her."""
    alice = pki.client_for("alice")
    port = free_port()
    db = {
        "name": "maria",
        "protocol": "mariadb",
        "listen": f"127.0.0.1:{port}",
        "address": f"localhost:{maria.port}",
        "tls": tls_block(pki, userCertificates={"alice": {"clientCertificate": alice.cert, "privateKey": alice.key}}),
    }
    with Dbmtls(workdir, {"databases": [db], "dataPlane": data_plane}) as proc:
        on_plane(proc.start(wait_ports=(port,)), data_plane)
        users = ("jinsu", "jinsu", "alice", "alice", "jinsu")
        assert [_login(port, user) for user in users] == [f"{u}@%" for u in users]
        lines = wait_closed(proc, "maria", 5)
    by_user = {u: [line for line in lines if f" user={u} " in line] for u in ("jinsu", "alice")}
    resumed = {u: sum("tls_resumed=True" in line for line in ls) for u, ls in by_user.items()}
    # alice's first connection found no session of hers (jinsu's were there): a full handshake;
    # every later connection resumed its own identity's session (MariaDB issues TLS 1.3 tickets)
    assert (len(by_user["jinsu"]), len(by_user["alice"])) == (3, 2), lines
    assert resumed == {"jinsu": 2, "alice": 1}, lines


# --- server names: the cache key, and the name check on a resumed connection (python plane) -------


def test_a_session_never_lets_an_unverified_name_through(
    pki: PKI, redis_tls: RedisTLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session of name A, offered (by a cache that would ignore names) to a connection for name
    B that the server certificate does not carry.  OpenSSL resumes it and verifies nothing, so
    the handshake succeeds: the name check that runs on resumed connections must refuse it."""
    import uvloop

    from dbmtls.config.model import DatabaseConfig, TLSSettings
    from dbmtls.errors import NameMismatch
    from dbmtls.proxy import upstream
    from dbmtls.proxy.endpoint import Endpoint
    from dbmtls.proxy.runtime import Conn, DatabaseRuntime
    from dbmtls.tls.resume import cache_of

    def runtime(**tls: Any) -> DatabaseRuntime:
        db = DatabaseConfig(
            name="n",
            protocol="redis",
            listen="127.0.0.1:1",
            address=f"localhost:{redis_tls.port}",
            tls=TLSSettings.model_validate(tls_block(pki, **tls)),
        )
        rt = DatabaseRuntime(db, upstream.Dialer())
        rt.tls.load()
        return rt

    checked: list[tuple[str, ...]] = []
    from dbmtls.tls.context import check_peer_names as real_check

    def spy(sslobj: Any, wanted: tuple[str, ...]) -> None:
        checked.append(tuple(wanted))
        real_check(sslobj, wanted)

    monkeypatch.setattr(upstream, "check_peer_names", spy)

    async def main() -> None:
        a = runtime()
        conn = Conn(a, Endpoint(), "test")
        ep = await a.dialer.dial(conn)
        ep.write(b"PING\r\n")
        assert await ep.receive() == b"+PONG\r\n"  # the tickets came before the reply
        upstream.keep_session(conn, replied=True)
        ep.close()
        ctx = a.tls.context_for(None)
        assert ctx is not None
        cache = cache_of(ctx)
        assert cache is not None
        # kept for its own name only
        assert cache.take("db.example") is None
        session = cache.take("localhost")
        assert session is not None
        # name B, same identity: put A's session where B's would be
        b = runtime(sni="db.example")
        b.tls.material = a.tls.material
        cache.put("db.example", session)
        with pytest.raises(NameMismatch):
            await b.dialer.dial(Conn(b, Endpoint(), "test"))
        # the handshake itself succeeded (a full one would have failed inside OpenSSL, before our
        # check): it was resumed, and our check refused it
        assert checked == [("db.example",)]

    uvloop.run(main())


def test_a_session_never_lets_an_unverified_name_through_native(pki: PKI, redis_tls: RedisTLS) -> None:
    """The same on the native plane: the C cache is keyed by name, so the test copies name A's
    sessions under name B (Context._copy_sessions, for tests) and dials name B."""
    import asyncio

    import uvloop

    from dbmtls.config.model import DatabaseConfig, TLSSettings
    from dbmtls.errors import NameMismatch
    from dbmtls.native import load as load_native
    from dbmtls.native.plane import NativePlane
    from dbmtls.native.tls import NativeClientTLS, twin_of
    from dbmtls.proxy import upstream
    from dbmtls.proxy.endpoint import Endpoint
    from dbmtls.proxy.runtime import Conn, DatabaseRuntime

    module, problem = load_native()
    if module is None:
        pytest.skip(f"native plane not available: {problem}")

    async def main() -> None:
        plane = NativePlane(module)
        plane.start()

        def runtime(**tls: Any) -> DatabaseRuntime:
            db = DatabaseConfig(
                name="n",
                protocol="redis",
                listen="127.0.0.1:1",
                address=f"localhost:{redis_tls.port}",
                tls=TLSSettings.model_validate(tls_block(pki, **tls)),
            )
            rt = DatabaseRuntime(db, upstream.Dialer())
            rt.native = plane
            rt.tls = NativeClientTLS(db, module)
            rt.tls.load()
            return rt

        try:
            a = runtime()
            up = await plane.dial(Conn(a, Endpoint(), "test"))
            twin = twin_of(a.tls.context_for(None))  # type: ignore[arg-type]
            # the worker keeps reading the server while the app is awaited: the tickets arrive
            deadline = time.monotonic() + 10
            while twin.cached_sessions("localhost") == 0:
                assert time.monotonic() < deadline, "no session kept"
                await asyncio.sleep(0.01)
            up.close()
            assert twin.cached_sessions("db.example") == 0  # kept for its own name only
            b = runtime(sni="db.example")
            b.tls.material = a.tls.material
            assert twin._copy_sessions("localhost", "db.example") > 0
            with pytest.raises(NameMismatch):
                await plane.dial(Conn(b, Endpoint(), "test"))
        finally:
            plane.close()

    uvloop.run(main())
