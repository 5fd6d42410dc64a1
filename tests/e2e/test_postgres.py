"""PostgreSQL through dbmtls, end to end: real PostgreSQL 15, real clients on their defaults.

The server (``support.pg_server``) accepts TCP only over TLS: ``cert`` authentication
(client certificate CN = user, verified chain) for everyone and SCRAM plus a client
certificate for ``scram_user``; there is no plaintext access.  The clients -- psql,
pgbench, psycopg 3, asyncpg -- are pointed at dbmtls with no TLS settings of their
own, so they send SSLRequest (``sslmode=prefer``), get ``N`` and talk plaintext.

Everything a real server cannot show is faked (``support.fake_pg``): a man in the
middle that appends plaintext after ``S`` (CVE-2021-23222), ``N``/``E`` answers with
a recording server, and PostgreSQL 17 direct TLS (not packaged here).  One dbmtls
process serves every database of the module, as it would in production.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from dbmtls.config.load import load_config
from support.certs import PKI
from support.fake_pg import SSL_REQUEST, FakePG
from support.net import free_port
from support.pg_server import PostgresTLS
from support.proc import Dbmtls, on_plane, tls_block

pytestmark = pytest.mark.e2e

USER = "jinsu"  # CN of the default client certificate
DB = "app"
SCRAM_USER = "scram_user"
SCRAM_PASSWORD = "s3cret-pw"
# libpq reads PG* variables and ~/.pgpass; the clients run with none of those.
CLIENT_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LANG": "C"}


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg(pki: PKI) -> Iterator[PostgresTLS]:
    server = PostgresTLS(pki.server, pki.ca_cert).start()
    try:
        server.create_user(USER, database=DB)
        for user in ("alice", "bob", "carol"):
            server.create_user(user)
        server.create_user(SCRAM_USER, password=SCRAM_PASSWORD)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pg_plain() -> Iterator[PostgresTLS]:
    """ssl = off and *trust* for everyone on TCP: a plaintext StartupMessage would get in and be logged."""
    server = PostgresTLS(None, None, ssl=False, hba="local all postgres trust\nhost all all 127.0.0.1/32 trust\n")
    server.start()
    try:
        server.create_user(USER)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fakes(pki: PKI) -> Iterator[dict[str, FakePG]]:
    out = {
        mode: FakePG(mode, pki.server).start()
        for mode in ("s_plus_extra", "s_then_extra", "n", "e", "garbage", "direct_tls")
    }
    yield out
    for f in out.values():
        f.stop()


class Setup:
    """The running dbmtls and the local port of each configured database."""

    def __init__(self, proxy: Dbmtls, ports: dict[str, int]) -> None:
        self.proxy = proxy
        self.ports = ports

    def conninfo(self, name: str, user: str = USER, dbname: str = DB, **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.ports[name]), "user": user, "dbname": dbname, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())


@pytest.fixture(scope="module")
def dbmtls(
    pki: PKI,
    pg: PostgresTLS,
    pg_plain: PostgresTLS,
    fakes: dict[str, FakePG],
    tmp_path_factory: pytest.TempPathFactory,
    data_plane: str,
) -> Iterator[Setup]:
    users = {u: pki.client_for(u) for u in ("alice", "bob")}
    rogue = pki.client_for(USER, ca=pki.other_ca)  # right CN, CA the server does not trust
    closed_port = free_port()
    specs: dict[str, dict[str, Any]] = {
        "pg": {"address": f"localhost:{pg.port}", "tls": tls_block(pki)},
        "peruser": {
            "address": f"localhost:{pg.port}",
            "tls": {
                "mode": "MUTUAL",
                "caCertificates": pki.ca_cert,
                "userCertificates": {u: {"clientCertificate": p.cert, "privateKey": p.key} for u, p in users.items()},
            },
        },
        "plainserver": {"address": f"localhost:{pg_plain.port}", "tls": tls_block(pki)},
        "pg-disable": {"address": f"localhost:{pg_plain.port}", "tls": {"mode": "DISABLE"}},
        "wrongca": {"address": f"localhost:{pg.port}", "tls": tls_block(pki, ca=str(pki.other_ca / "ca.crt"))},
        "wrongname": {"address": f"localhost:{pg.port}", "tls": tls_block(pki, sni="db.example.com")},
        "rejected": {"address": f"localhost:{pg.port}", "tls": tls_block(pki, client=rogue)},
        "unreachable": {"address": f"localhost:{closed_port}", "tls": tls_block(pki)},
        **{f"fake-{m}": {"address": f"localhost:{f.port}", "tls": tls_block(pki)} for m, f in fakes.items()},
    }
    specs["fake-direct_tls"]["directTls"] = True
    specs["direct-on-15"] = {"address": f"localhost:{pg.port}", "tls": tls_block(pki), "directTls": True}
    ports = {name: free_port() for name in specs}
    config = {
        "databases": [
            {"name": name, "protocol": "postgres", "listen": f"127.0.0.1:{ports[name]}", **spec}
            for name, spec in specs.items()
        ],
        "dataPlane": data_plane,
    }
    proxy = Dbmtls(tmp_path_factory.mktemp("dbmtls-pg"), config).start(wait_ports=tuple(ports.values()))
    on_plane(proxy, data_plane)
    try:
        yield Setup(proxy, ports)
    finally:
        proxy.stop(check=False)
    # whatever the apps and fake servers threw at it, nothing escaped the error tree
    assert "internal error" not in proxy.log() and "Traceback" not in proxy.log(), proxy.log()


def psql(
    conninfo: str, sql: str, *, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-c", sql],
        capture_output=True, text=True, env={**CLIENT_ENV, **(env or {})}, timeout=timeout, check=False,
    )  # fmt: skip


SSL_INFO = "select current_user, ssl, client_dn from pg_stat_ssl where pid = pg_backend_pid()"


def wait_for_query(pg: PostgresTLS, text: str, timeout: float = 10.0) -> None:
    """Until the server runs ``text`` (so a cancel has something to cancel)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = pg.sql(f"select count(*) from pg_stat_activity where state = 'active' and query = '{text}'")  # noqa: S608
        if n != "0":
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never showed up in pg_stat_activity")


# --- the happy paths, each client on its defaults ---------------------------------------------


def test_psql_defaults_get_verified_mtls(dbmtls: Setup) -> None:
    out = psql(dbmtls.conninfo("pg"), SSL_INFO)
    assert out.returncode == 0, out.stderr
    # the server saw TLS and our client certificate; the app saw neither
    assert out.stdout.strip() == f"{USER}|t|/CN={USER}"
    dbmtls.proxy.wait_log(f"user={USER} bytes_in=")


def test_psycopg3(dbmtls: Setup) -> None:
    with psycopg.connect(dbmtls.conninfo("pg")) as conn:
        row = conn.execute(SSL_INFO).fetchone()
        assert row == (USER, True, f"/CN={USER}")
        # the app itself is on plaintext: libpq agreed to it after our 'N'
        assert conn.pgconn.ssl_in_use is False


def test_asyncpg(dbmtls: Setup) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=dbmtls.ports["pg"], user=USER, database=DB)
        try:
            row = await conn.fetchrow(SSL_INFO)
            assert tuple(row) == (USER, True, f"/CN={USER}")
        finally:
            await conn.close()

    asyncio.run(main())


def test_pgbench_select_only_and_connect_per_transaction(dbmtls: Setup) -> None:
    base = ["pgbench", "-h", "127.0.0.1", "-p", str(dbmtls.ports["pg"]), "-U", USER]
    init = subprocess.run(
        [*base, "-i", "-s", "1", "-q", DB], capture_output=True, text=True, env=CLIENT_ENV, check=False
    )
    assert init.returncode == 0, init.stderr
    for extra in (["-S", "-c", "4", "-j", "2", "-t", "200"], ["-S", "-C", "-c", "2", "-j", "2", "-t", "25"]):
        run = subprocess.run([*base, *extra, DB], capture_output=True, text=True, env=CLIENT_ENV, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "number of failed transactions: 0" in run.stdout, run.stdout


def test_copy_64_mib_in_and_out_byte_exact(dbmtls: Setup) -> None:
    line_len, lines = 1023, 64 * 1024  # 64 lines of 1 KiB per 64 KiB: 64 MiB in all
    chunk_lines = 1024
    digest_in = hashlib.sha256()
    with psycopg.connect(dbmtls.conninfo("pg")) as conn:
        conn.execute("create temp table blob (id bigserial primary key, line text)")
        with conn.cursor() as cur, cur.copy("copy blob (line) from stdin") as copy:
            for _ in range(lines // chunk_lines):
                block = b"".join(
                    os.urandom(line_len // 2 + 1).hex()[:line_len].encode() + b"\n" for _ in range(chunk_lines)
                )
                digest_in.update(block)
                copy.write(block)
        digest_out = hashlib.sha256()
        size = 0
        with conn.cursor() as cur, cur.copy("copy (select line from blob order by id) to stdout") as copy:
            for data in copy:
                digest_out.update(data)
                size += len(data)
    assert size == lines * (line_len + 1) == 64 * 1024 * 1024
    assert digest_out.hexdigest() == digest_in.hexdigest()


def test_100_concurrent_sessions(dbmtls: Setup) -> None:
    async def main() -> None:
        conns = await asyncio.gather(
            *(asyncpg.connect(host="127.0.0.1", port=dbmtls.ports["pg"], user=USER, database=DB) for _ in range(100))
        )
        try:
            pids = await asyncio.gather(*(c.fetchval("select pg_backend_pid()") for c in conns))
            assert len(set(pids)) == 100  # all open at once, each its own backend
        finally:
            await asyncio.gather(*(c.close() for c in conns))

    asyncio.run(main())


def test_startup_protocol_minor_version_and_pq_options_are_relayed(dbmtls: Setup) -> None:
    """Protocol 3.2 with a ``_pq_.`` option: PostgreSQL 15 answers NegotiateProtocolVersion ('v'),
    which only happens if dbmtls passed the StartupMessage on untouched."""
    body = (
        struct.pack("!HH", 3, 2) + b"user\x00" + USER.encode() + b"\x00database\x00app\x00_pq_.test_option\x00x\x00\x00"
    )
    with socket.create_connection(("127.0.0.1", dbmtls.ports["pg"]), timeout=10) as s:
        s.sendall(SSL_REQUEST)
        assert s.recv(1) == b"N"
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        reply = b""
        while len(reply) < 5 or len(reply) < 1 + struct.unpack("!I", reply[1:5])[0]:
            chunk = s.recv(4096)
            assert chunk, reply
            reply += chunk
    assert reply[:1] == b"v", reply
    newest = struct.unpack("!I", reply[5:9])[0]
    assert newest == 3 << 16  # PostgreSQL 15 speaks 3.0
    assert b"_pq_.test_option" in reply  # the option it did not recognise, named back to us


def test_gssenc_and_ssl_requests_both_answered_n(dbmtls: Setup) -> None:
    """libpq with a Kerberos ticket cache sends GSSENCRequest, then SSLRequest on the same socket."""
    body = struct.pack("!HH", 3, 0) + b"user\x00" + USER.encode() + b"\x00database\x00app\x00\x00"
    gssenc = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    with socket.create_connection(("127.0.0.1", dbmtls.ports["pg"]), timeout=10) as s:
        s.sendall(gssenc)
        assert s.recv(1) == b"N"
        s.sendall(SSL_REQUEST)
        assert s.recv(1) == b"N"
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        reply = s.recv(9)
    assert reply == b"R\x00\x00\x00\x08\x00\x00\x00\x00"  # AuthenticationOk: cert auth passed upstream


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_from_psql(dbmtls: Setup, pg: PostgresTLS) -> None:
    query = "select pg_sleep(30) /* psql */"
    proc = subprocess.Popen(
        ["psql", "-X", "-d", dbmtls.conninfo("pg"), "-c", query],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLIENT_ENV,
    )  # fmt: skip
    try:
        wait_for_query(pg, query)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)  # psql sends a CancelRequest on ^C
        _, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
    assert "canceling statement due to user request" in err, err
    assert elapsed < 2.0
    dbmtls.proxy.wait_log('note="cancel request"')


def test_cancel_from_psycopg(dbmtls: Setup, pg: PostgresTLS) -> None:
    query = "select pg_sleep(30) /* psycopg */"
    result: list[BaseException | None] = []
    with psycopg.connect(dbmtls.conninfo("pg")) as conn:

        def run() -> None:
            try:
                conn.execute(query)
                result.append(None)
            except BaseException as exc:
                result.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        wait_for_query(pg, query)
        started = time.monotonic()
        conn.cancel_safe()
        worker.join(timeout=10)
        elapsed = time.monotonic() - started
    assert isinstance(result[0], psycopg.errors.QueryCanceled), result
    assert elapsed < 2.0


def test_cancel_from_asyncpg(dbmtls: Setup) -> None:
    async def main() -> float:
        conn = await asyncpg.connect(host="127.0.0.1", port=dbmtls.ports["pg"], user=USER, database=DB)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                # on timeout asyncpg cancels the query with a CancelRequest on a new connection
                await conn.execute("select pg_sleep(30)", timeout=0.3)
            assert await conn.fetchval("select 1") == 1  # only once the server stopped sleeping
            return time.monotonic() - started
        finally:
            await conn.close()

    assert asyncio.run(main()) < 2.0


# --- identities -------------------------------------------------------------------------------


def test_per_user_certificates(dbmtls: Setup, pg: PostgresTLS) -> None:
    for user in ("alice", "bob"):
        out = psql(dbmtls.conninfo("peruser", user=user, dbname="postgres"), SSL_INFO)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"{user}|t|/CN={user}"
    # a user dbmtls has no certificate for: a clear 28000 naming the user, and no upstream connection
    offset = pg.log_offset()
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dbmtls.conninfo("peruser", user="carol", dbname="postgres"))
    text = str(info.value)
    assert "no client certificate configured for database user 'carol'" in text
    assert "[peruser]" in text
    dbmtls.proxy.wait_log("reason=no_certificate_for_user")
    assert "carol" not in pg.log_since(offset)


def test_cancel_uses_the_sessions_own_certificate(dbmtls: Setup, pg: PostgresTLS) -> None:
    """With only per-user certificates, the cancel goes out with the certificate of the user
    whose backend it cancels (learned from BackendKeyData while relaying that session's startup)."""

    async def main() -> float:
        conn = await asyncpg.connect(host="127.0.0.1", port=dbmtls.ports["peruser"], user="bob", database="postgres")
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.execute("select pg_sleep(30)", timeout=0.3)
            assert await conn.fetchval("select 1") == 1
            return time.monotonic() - started
        finally:
            await conn.close()

    assert asyncio.run(main()) < 2.0
    log = dbmtls.proxy.wait_log("db=peruser client=")
    cancels = [line for line in log.splitlines() if "db=peruser" in line and 'note="cancel request"' in line]
    assert cancels, log
    assert "user=bob" in cancels[-1]


def test_scram_without_channel_binding(dbmtls: Setup) -> None:
    out = psql(dbmtls.conninfo("pg", user=SCRAM_USER, dbname="postgres"), SSL_INFO, env={"PGPASSWORD": SCRAM_PASSWORD})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{SCRAM_USER}|t|/CN={USER}"  # password + the proxy's certificate

    async def main() -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=dbmtls.ports["pg"], user=SCRAM_USER, password=SCRAM_PASSWORD, database="postgres"
        )
        try:
            return str(await conn.fetchval("select current_user"))
        finally:
            await conn.close()

    assert asyncio.run(main()) == SCRAM_USER
    # the server still checks the password
    bad = psql(dbmtls.conninfo("pg", user=SCRAM_USER, dbname="postgres"), "select 1", env={"PGPASSWORD": "wrong"})
    assert "password authentication failed" in bad.stderr
    # the documented limit: channel binding needs the app's own TLS session with the server
    cb = psql(
        dbmtls.conninfo("pg", user=SCRAM_USER, dbname="postgres", channel_binding="require"),
        "select 1",
        env={"PGPASSWORD": SCRAM_PASSWORD},
    )
    assert cb.returncode != 0
    assert "channel binding" in cb.stderr


# --- failures, in the app's own protocol ----------------------------------------------------------


def sqlstate_of(dbmtls: Setup, name: str) -> tuple[str | None, str]:
    """(SQLSTATE, message) of the ErrorResponse a connection attempt gets (asyncpg keeps the SQLSTATE)."""

    async def main() -> tuple[str | None, str]:
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=dbmtls.ports[name], user=USER, database=DB, timeout=15)
        except asyncpg.PostgresError as err:
            return err.sqlstate, f"{err} {getattr(err, 'hint', '')}"
        await conn.close()
        raise AssertionError(f"connecting through {name} succeeded")

    return asyncio.run(main())


def test_server_without_tls_fails_closed(dbmtls: Setup, pg_plain: PostgresTLS) -> None:
    offset = pg_plain.log_offset()
    out = psql(dbmtls.conninfo("plainserver"), "select 1")
    assert out.returncode != 0
    assert "FATAL:  dbmtls: [plainserver] server refused TLS" in out.stderr, out.stderr
    assert "HINT:  enable TLS on the database server" in out.stderr
    state, _ = sqlstate_of(dbmtls, "plainserver")
    assert state == "08006"
    dbmtls.proxy.wait_log("reason=server_refused_tls")
    # the server (trust for everyone!) saw our connections but never a StartupMessage
    pg_plain.wait_log("connection received: host=127.0.0.1", since=offset)
    log = pg_plain.log_since(offset)
    assert "connection authorized" not in log
    assert USER not in log


def test_tls_mode_disable_talks_plain_pgwire_to_the_server(dbmtls: Setup) -> None:
    out = psql(
        dbmtls.conninfo("pg-disable", dbname="postgres"),
        "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{USER}|f"  # no SSLRequest, no TLS: what the configuration asked for
    dbmtls.proxy.wait_line(rf"connection closed db=pg-disable .*user={USER} bytes_in=")


def test_wrong_ca(dbmtls: Setup) -> None:
    out = psql(dbmtls.conninfo("wrongca"), "select 1")
    assert "FATAL:  dbmtls: [wrongca] TLS handshake with" in out.stderr, out.stderr
    assert "server certificate not trusted" in out.stderr
    assert "HINT:" in out.stderr
    assert sqlstate_of(dbmtls, "wrongca")[0] == "08006"


def test_wrong_name(dbmtls: Setup) -> None:
    state, text = sqlstate_of(dbmtls, "wrongname")
    assert state == "08006"
    assert "does not match 'db.example.com'" in text


def test_client_certificate_rejected_by_server(dbmtls: Setup) -> None:
    state, text = sqlstate_of(dbmtls, "rejected")
    assert state == "28000", text
    assert "rejected the client certificate" in text
    dbmtls.proxy.wait_log("reason=client_cert_rejected")


def test_unreachable_server(dbmtls: Setup) -> None:
    out = psql(dbmtls.conninfo("unreachable"), "select 1")
    assert "FATAL:  dbmtls: [unreachable] connection to" in out.stderr and "refused" in out.stderr, out.stderr
    assert sqlstate_of(dbmtls, "unreachable")[0] == "08001"


@pytest.mark.parametrize("mode", ["s_plus_extra", "s_then_extra"])
def test_plaintext_injected_after_s_aborts(dbmtls: Setup, fakes: dict[str, FakePG], mode: str) -> None:
    """CVE-2021-23222: the fake answers 'S' and then an AuthenticationOk in clear."""
    fake = fakes[mode]
    before = len(fake.connections)
    state, text = sqlstate_of(dbmtls, f"fake-{mode}")
    assert state == "08006", text
    if mode == "s_plus_extra":
        assert "unencrypted data after its SSL response" in text
    seen = fake.connections[before]
    assert seen.done.wait(10)
    assert bytes(seen.raw[:8]) == SSL_REQUEST
    # never the app's StartupMessage in clear: at most the start of a TLS handshake
    assert USER.encode() not in seen.raw
    assert b"user\x00" not in seen.raw


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("n", "refused TLS"), ("e", "error response during SSL exchange"), ("garbage", "invalid response to SSLRequest")],
)
def test_upstream_refusing_tls_fails_closed(dbmtls: Setup, fakes: dict[str, FakePG], mode: str, expected: str) -> None:
    fake = fakes[mode]
    before = len(fake.connections)
    state, text = sqlstate_of(dbmtls, f"fake-{mode}")
    assert state == "08006"
    assert expected in text
    assert "not to be shown" not in text  # an unauthenticated server's text is never relayed
    seen = fake.connections[before]
    assert seen.done.wait(10)
    assert bytes(seen.raw) == SSL_REQUEST  # and nothing else, ever


def test_direct_tls(dbmtls: Setup, fakes: dict[str, FakePG]) -> None:
    """``directTls: true``: TLS from the first byte with ALPN postgresql, StartupMessage inside."""
    fake = fakes["direct_tls"]
    before = len(fake.connections)
    out = psql(dbmtls.conninfo("fake-direct_tls"), "select 1")
    assert "hello from the direct TLS fake" in out.stderr, out.stderr
    seen = fake.connections[before]
    assert seen.done.wait(10)
    assert seen.raw[:1] == b"\x16"  # a TLS record, no SSLRequest
    assert seen.alpn == "postgresql"
    assert b"user\x00" + USER.encode() in seen.inside_tls


# --- the app side: garbage never crashes anything -------------------------------------------------


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!II", 10001, 196608) + b"x" * 100,  # oversized startup length
        struct.pack("!II", 4, 0),  # below the minimum length
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not PostgreSQL at all
        struct.pack("!II", 12, 196608) + b"user",  # parameters without terminators
        SSL_REQUEST + struct.pack("!II", 8, 2 << 16),  # protocol 2
    ],
    ids=["oversized", "too-short", "http", "bad-layout", "protocol-2"],
)
def test_malformed_startup_gets_08p01(dbmtls: Setup, packet: bytes) -> None:
    reply = raw_exchange(dbmtls.ports["pg"], packet)
    if packet.startswith(SSL_REQUEST):
        assert reply[:1] == b"N"
        reply = reply[1:]
    assert reply[:1] == b"E", reply
    assert b"C08P01\x00" in reply
    # and the proxy is fine afterwards
    assert psql(dbmtls.conninfo("pg"), "select 1").stdout.strip() == "1"


# --- CockroachDB: configuration only (not packaged here) ----------------------------------------------


def test_cockroachdb_config_and_destination_rule(tmp_path: Path, pki: PKI) -> None:
    plain = tmp_path / "dbmtls.yaml"
    plain.write_text(
        "databases:\n"
        "  - name: crdb\n"
        "    protocol: cockroachdb\n"
        "    listen: 127.0.0.1:26257\n"
        "    address: cockroachdb-public.db.svc\n"
        "    tls:\n"
        "      mode: MUTUAL\n"
        "      caCertificates: /certs/ca.crt\n"
        "      userCertificates:\n"
        "        root: {clientCertificate: /certs/client.root.crt, privateKey: /certs/client.root.key}\n"
        "        app: {clientCertificate: /certs/client.app.crt, privateKey: /certs/client.app.key}\n"
    )
    rule = tmp_path / "dr.yaml"
    rule.write_text(
        "apiVersion: networking.istio.io/v1beta1\n"
        "kind: DestinationRule\n"
        "metadata:\n"
        "  name: crdb-mtls\n"
        "  annotations: {dbmtls.io/protocol: cockroachdb}\n"
        "spec:\n"
        "  host: cockroachdb-public\n"
        "  trafficPolicy:\n"
        "    tls: {mode: MUTUAL, clientCertificate: /certs/client.app.crt, privateKey: /certs/client.app.key,"
        " caCertificates: /certs/ca.crt}\n"
    )
    by_port = tmp_path / "dr-port.yaml"
    by_port.write_text(
        rule.read_text()
        .replace("crdb-mtls", "crdb-port")
        .replace("  annotations: {dbmtls.io/protocol: cockroachdb}\n", "")
        .replace("  trafficPolicy:\n", "  trafficPolicy:\n    portLevelSettings:\n      - port: {number: 26257}\n")
        .replace("    tls: {", "        tls: {")
    )
    config = load_config([plain])
    (db,) = config.databases
    assert (db.protocol, db.upstream) == ("cockroachdb", ("cockroachdb-public.db.svc", 26257))
    assert set(db.tls.userCertificates) == {"root", "app"}
    (mapped,) = load_config([rule]).databases
    assert (mapped.protocol, mapped.upstream, mapped.listen) == (
        "cockroachdb",
        ("cockroachdb-public", 26257),
        "127.0.0.1:26257",
    )
    (ported,) = load_config([by_port]).databases
    assert (ported.protocol, ported.upstream) == ("cockroachdb", ("cockroachdb-public", 26257))


def test_direct_tls_against_a_server_before_17_says_so(dbmtls: Setup) -> None:
    """PostgreSQL 15 hangs up on a ClientHello without a word; the app is told why and what to set."""
    out = psql(dbmtls.conninfo("direct-on-15"), "select 1")
    assert out.returncode != 0
    assert "directTls needs PostgreSQL 17 or later" in out.stderr, out.stderr
    assert "directTls: false" in out.stderr
