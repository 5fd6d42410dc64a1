"""MySQL / MariaDB through dbmtls, end to end, with real clients on their defaults.

The main server is a real MariaDB 10.11 (the OS package) started by this module on a free port:
``require_secure_transport=ON``, server certificate from the test CA, accounts that demand a
client certificate (``REQUIRE X509``), a particular one (``REQUIRE SUBJECT '/CN=alice'``), and an
ed25519 account.  The apps never get a TLS option: the mariadb CLI, PyMySQL,
mysql-connector-python (pure Python mode) and aiomysql all connect to dbmtls in plaintext.

caching_sha2_password full authentication and sha256_password do not exist in MariaDB, so those
tests run against ``support.fake_mysql8``, a scripted MySQL 8 server that implements the
exchanges from the MySQL documentation, terminates real TLS with the test's server certificate
and requires the client certificate; the app side is still PyMySQL / mysql-connector-python.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiomysql
import mysql.connector
import pymysql
import pytest

from support.certs import PKI
from support.fake_mysql8 import CACHING_SHA2, SHA256, Account, FakeMySQL8
from support.mariadb_server import MariaDB
from support.net import free_port
from support.proc import Dbmtls, on_plane, tls_block

pytestmark = pytest.mark.e2e

PASSWORDS = {"x509user": "x509-pw", "x509other": "other-pw", "alice": "alice-pw", "bob": "bob-pw", "eddy": "eddy-pw"}

ACCOUNTS_SQL = """
INSTALL SONAME 'auth_ed25519';
CREATE DATABASE app;
CREATE TABLE app.blobs (id INT PRIMARY KEY, data LONGBLOB);
CREATE USER 'x509user'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('x509-pw') REQUIRE X509;
CREATE USER 'x509other'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('other-pw') REQUIRE X509;
CREATE USER 'alice'@'%' IDENTIFIED BY 'alice-pw' REQUIRE SUBJECT '/CN=alice';
CREATE USER 'bob'@'%' IDENTIFIED BY 'bob-pw' REQUIRE SUBJECT '/CN=bob';
CREATE USER 'eddy'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('eddy-pw') REQUIRE X509;
GRANT ALL ON app.* TO 'x509user'@'%', 'x509other'@'%', 'alice'@'%', 'bob'@'%', 'eddy'@'%';
"""


# --- servers and the proxy (module scope: one MariaDB, one dbmtls for the whole module) -------


class Tap:
    """A loopback TCP forwarder that counts the bytes each way (to see what dbmtls sent)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.to_server = bytearray()
        self.connections = 0
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream:
                    self.to_server.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.listener.close()


@dataclass
class Setup:
    proxy: Dbmtls
    ports: dict[str, int]  # dbmtls database name -> listen port
    mariadb: MariaDB
    no_tls_tap: Tap
    silent: socket.socket  # listens, never accepts, never speaks


@pytest.fixture(scope="module")
def mysql_mariadb(pki: PKI) -> Iterator[MariaDB]:
    server = MariaDB(pki.server, pki.ca_cert).start()
    try:
        server.sql(ACCOUNTS_SQL)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mysql_mariadb_no_tls() -> Iterator[MariaDB]:
    server = MariaDB(None, None).start()
    try:
        server.sql("CREATE USER 'plainuser'@'%' IDENTIFIED BY 'plain-pw';")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def setup(
    pki: PKI,
    mysql_mariadb: MariaDB,
    mysql_mariadb_no_tls: MariaDB,
    tmp_path_factory: pytest.TempPathFactory,
    data_plane: str,
) -> Iterator[Setup]:
    alice = pki.client_for("alice")
    address = f"localhost:{mysql_mariadb.port}"
    tap = Tap(mysql_mariadb_no_tls.port)
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes the TCP handshake
    databases: dict[str, dict[str, Any]] = {
        # default certificate CN=jinsu, plus alice's own for her REQUIRE SUBJECT account
        "maria": {
            "protocol": "mariadb",
            "address": address,
            "tls": tls_block(
                pki, userCertificates={"alice": {"clientCertificate": alice.cert, "privateKey": alice.key}}
            ),
        },
        # only per-user certificates: users without one are refused by dbmtls itself
        "maria-peruser": {
            "protocol": "mysql",
            "address": address,
            "tls": {
                "mode": "MUTUAL",
                "caCertificates": pki.ca_cert,
                "userCertificates": {"alice": {"clientCertificate": alice.cert, "privateKey": alice.key}},
            },
        },
        "maria-badca": {
            "protocol": "mariadb",
            "address": address,
            "tls": tls_block(pki, ca=str(pki.other_ca / "ca.crt")),
        },
        "maria-foreign-cert": {
            "protocol": "mariadb",
            "address": address,
            "tls": tls_block(pki, client=pki.client_for("jinsu", ca=pki.other_ca)),
        },
        "maria-down": {"protocol": "mariadb", "address": f"localhost:{free_port()}", "tls": tls_block(pki)},
        "maria-notls": {"protocol": "mariadb", "address": f"127.0.0.1:{tap.port}", "tls": tls_block(pki)},
        # tls.mode DISABLE: relayed as TCP after dbmtls read the greeting (no TLS to negotiate)
        "maria-disable": {
            "protocol": "mariadb",
            "address": f"127.0.0.1:{mysql_mariadb_no_tls.port}",
            "tls": {"mode": "DISABLE"},
        },
        "maria-silent": {
            "protocol": "mariadb",
            "address": f"localhost:{silent.getsockname()[1]}",
            "tls": tls_block(pki),
            "handshakeTimeout": "500ms",
        },
    }
    ports = {name: free_port() for name in databases}
    config = {
        "databases": [{"name": name, "listen": f"127.0.0.1:{ports[name]}", **db} for name, db in databases.items()],
        "dataPlane": data_plane,
    }
    proxy = Dbmtls(tmp_path_factory.mktemp("dbmtls-mysql"), config).start(wait_ports=tuple(ports.values()))
    on_plane(proxy, data_plane)
    try:
        yield Setup(proxy, ports, mysql_mariadb, tap, silent)
    finally:
        proxy.stop(check=False)
        tap.close()
        silent.close()


@pytest.fixture(scope="module")
def mysql_fake8(pki: PKI) -> Iterator[FakeMySQL8]:
    server = FakeMySQL8(
        pki.server,
        pki.ca_cert,
        {"cs": Account(CACHING_SHA2, "cs-pw"), "sh": Account(SHA256, "sh-pw")},
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mysql_fake8_sha256(pki: PKI) -> Iterator[FakeMySQL8]:
    """A server whose default plugin is sha256_password: the app asks for the key in its HandshakeResponse."""
    server = FakeMySQL8(pki.server, pki.ca_cert, {"sh": Account(SHA256, "sh-pw")}, default_plugin=SHA256).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fake_ports(
    pki: PKI,
    mysql_fake8: FakeMySQL8,
    mysql_fake8_sha256: FakeMySQL8,
    tmp_path_factory: pytest.TempPathFactory,
    data_plane: str,
) -> Iterator[dict[str, int]]:
    targets = {"mysql8": mysql_fake8.port, "mysql8-sha256": mysql_fake8_sha256.port}
    ports = {name: free_port() for name in targets}
    config = {
        "databases": [
            {
                "name": name,
                "protocol": "mysql",
                "listen": f"127.0.0.1:{ports[name]}",
                "address": f"localhost:{port}",
                "tls": tls_block(pki),
            }
            for name, port in targets.items()
        ],
        "dataPlane": data_plane,
    }
    proxy = on_plane(
        Dbmtls(tmp_path_factory.mktemp("dbmtls-mysql8"), config).start(wait_ports=tuple(ports.values())), data_plane
    )
    try:
        yield ports
    finally:
        proxy.stop(check=False)


# --- clients, each on its defaults (no TLS option anywhere) -------------------------------------


def cli(port: int, user: str, sql: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "mariadb",
            "--no-defaults",
            "-h127.0.0.1",
            f"-P{port}",
            f"-u{user}",
            f"-p{PASSWORDS.get(user, '') if password is None else password}",
            "--batch",
            "--skip-column-names",
            "-e",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def pymysql_query(port: int, user: str, sql: str, password: str | None = None) -> list[tuple[Any, ...]]:
    conn = pymysql.connect(
        host="127.0.0.1", port=port, user=user, password=PASSWORDS.get(user, "") if password is None else password
    )
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


def connector_query(port: int, user: str, sql: str, password: str | None = None) -> list[tuple[Any, ...]]:
    conn = mysql.connector.connect(
        host="127.0.0.1",
        port=port,
        user=user,
        password=PASSWORDS.get(user, "") if password is None else password,
        use_pure=True,
    )
    try:
        cur = conn.cursor()
        cur.execute(sql)
        return list(cur.fetchall())
    finally:
        conn.close()


def aiomysql_query(port: int, user: str, sql: str) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        conn = await aiomysql.connect(host="127.0.0.1", port=port, user=user, password=PASSWORDS[user])
        try:
            async with conn.cursor() as cur:
                await cur.execute(sql)
                return list(await cur.fetchall())
        finally:
            conn.close()

    return asyncio.run(run())


SESSION_SQL = (
    "SELECT CURRENT_USER(), VARIABLE_VALUE FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME='SSL_VERSION'"
)


@pytest.mark.parametrize("client", ["mariadb-cli", "pymysql", "mysql-connector-pure", "aiomysql"])
def test_clients_on_defaults_reach_a_tls_only_server(setup: Setup, client: str) -> None:
    port = setup.ports["maria"]
    if client == "mariadb-cli":
        out = cli(port, "x509user", SESSION_SQL)
        assert out.returncode == 0, out.stderr
        rows = [tuple(out.stdout.split())]
    elif client == "pymysql":
        rows = pymysql_query(port, "x509user", SESSION_SQL)
    elif client == "mysql-connector-pure":
        rows = connector_query(port, "x509user", SESSION_SQL)
    else:
        rows = aiomysql_query(port, "x509user", SESSION_SQL)
    # the server saw a REQUIRE X509 login over TLS 1.3 although the app spoke plaintext
    assert rows == [("x509user@%", "TLSv1.3")]


def test_ed25519_account_with_the_mariadb_cli(setup: Setup) -> None:
    # PyMySQL needs PyNaCl for client_ed25519 and mysql-connector has no such plugin: the CLI it is.
    out = cli(setup.ports["maria"], "eddy", "SELECT CURRENT_USER()")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "eddy@%"
    wrong = cli(setup.ports["maria"], "eddy", "SELECT 1", password="nope")
    assert "ERROR 1045 (28000)" in wrong.stderr


def test_require_subject_gets_the_users_own_certificate(setup: Setup) -> None:
    assert pymysql_query(setup.ports["maria"], "alice", "SELECT CURRENT_USER()") == [("alice@%",)]
    assert pymysql_query(setup.ports["maria-peruser"], "alice", "SELECT CURRENT_USER()") == [("alice@%",)]
    # bob has no certificate of his own: "maria" presents the default CN=jinsu, which his
    # REQUIRE SUBJECT refuses; the server's own ERR reaches the app.
    with pytest.raises(pymysql.err.OperationalError) as exc:
        pymysql_query(setup.ports["maria"], "bob", "SELECT 1")
    assert exc.value.args[0] == 1045
    assert "bob" in exc.value.args[1]
    setup.proxy.wait_log("user=alice")


def test_user_without_a_certificate_is_refused_by_dbmtls(setup: Setup) -> None:
    with pytest.raises(mysql.connector.Error) as exc:
        connector_query(setup.ports["maria-peruser"], "bob", "SELECT 1")
    assert (exc.value.errno, exc.value.sqlstate) == (1045, "28000")
    message = str(exc.value.msg)
    assert message.startswith("dbmtls: [maria-peruser] no client certificate configured for database user 'bob'")
    assert "alice" in message  # the hint names who can connect
    setup.proxy.wait_log("reason=no_certificate_for_user")


def test_change_user_runs_inside_the_same_tls_session(setup: Setup) -> None:
    conn = mysql.connector.connect(
        host="127.0.0.1", port=setup.ports["maria"], user="x509user", password=PASSWORDS["x509user"], use_pure=True
    )
    try:
        cur = conn.cursor()
        conn.cmd_change_user(username="x509other", password=PASSWORDS["x509other"], database="app")
        cur = conn.cursor()
        cur.execute(SESSION_SQL)
        assert cur.fetchall() == [("x509other@%", "TLSv1.3")]
        # The certificate belongs to the connection: COM_CHANGE_USER to an account that needs a
        # different one is refused by the server (reconnect as that user instead).
        with pytest.raises(mysql.connector.Error) as exc:
            conn.cmd_change_user(username="alice", password=PASSWORDS["alice"])
        assert exc.value.errno == 1045
    finally:
        conn.close()


def test_32mib_blob_round_trip_is_byte_exact(setup: Setup) -> None:
    blob = os.urandom(32 * 1024 * 1024)
    conn = pymysql.connect(
        host="127.0.0.1",
        port=setup.ports["maria"],
        user="x509user",
        password=PASSWORDS["x509user"],
        database="app",
        # PyMySQL sends bytes hex-encoded (64 MiB of SQL); its own limit is 16 MiB by default
        max_allowed_packet=128 * 1024 * 1024,
    )
    try:
        with conn.cursor() as cur:
            cur.execute("REPLACE INTO blobs VALUES (1, %s)", (blob,))
            conn.commit()
            cur.execute("SELECT data, SHA2(data, 256) FROM blobs WHERE id = 1")
            back, server_digest = cur.fetchone()
    finally:
        conn.close()
    assert server_digest == hashlib.sha256(blob).hexdigest()  # arrived intact
    assert back == blob  # and came back intact


def test_100_concurrent_connections(setup: Setup) -> None:
    n = 100

    async def run() -> set[int]:
        async def one(barrier: asyncio.Barrier) -> int:
            conn = await aiomysql.connect(
                host="127.0.0.1", port=setup.ports["maria"], user="x509user", password=PASSWORDS["x509user"]
            )
            try:
                await barrier.wait()  # all n are open at the same time
                async with conn.cursor() as cur:
                    await cur.execute("SELECT CONNECTION_ID()")
                    (cid,) = await cur.fetchone()
                    return int(cid)
            finally:
                conn.close()

        barrier = asyncio.Barrier(n)
        async with asyncio.timeout(120):
            return set(await asyncio.gather(*(one(barrier) for _ in range(n))))

    assert len(asyncio.run(run())) == n


# --- failures the app can read ------------------------------------------------------------------


def test_unreachable_server_gives_a_pre_greeting_err(setup: Setup) -> None:
    port = setup.ports["maria-down"]
    with pytest.raises(pymysql.err.OperationalError) as exc:
        pymysql_query(port, "x509user", "SELECT 1")
    errno, message = exc.value.args
    assert errno == 1043
    # no SQLSTATE marker before the greeting: the text starts right after the code
    assert message.startswith("dbmtls: [maria-down] connection to localhost:")
    assert "refused" in message
    # The 10.11 CLI tries TLS by default (not enforced), so it prefixes an error that comes before
    # any greeting with "Received error packet before completion of TLS handshake..."; our code and
    # text are shown all the same.
    out = cli(port, "x509user", "SELECT 1")
    assert out.returncode != 0
    assert "1043 - dbmtls: [maria-down] connection to localhost:" in out.stderr
    assert "#08S01" not in out.stderr


def test_server_without_tls_gets_no_handshake_response(setup: Setup) -> None:
    before = setup.no_tls_tap.connections
    with pytest.raises(pymysql.err.OperationalError) as exc:
        pymysql_query(setup.ports["maria-notls"], "x509user", "SELECT 1")
    assert exc.value.args[0] == 1043
    assert exc.value.args[1].startswith("dbmtls: [maria-notls] server does not offer TLS (CLIENT_SSL)")
    assert "hint: enable TLS on the database server" in exc.value.args[1]
    setup.proxy.wait_log("reason=server_refused_tls")
    assert setup.no_tls_tap.connections > before
    # dbmtls read the greeting and stopped: not one byte (no HandshakeResponse, no password
    # hash, no user name) went to the server in plaintext.
    assert bytes(setup.no_tls_tap.to_server) == b""


def test_tls_mode_disable_relays_the_plaintext_conversation(setup: Setup) -> None:
    assert pymysql_query(setup.ports["maria-disable"], "plainuser", "SELECT CONCAT('x', 1)", password="plain-pw") == [
        ("x1",)
    ]
    out = cli(setup.ports["maria-disable"], "plainuser", "SELECT 2", password="plain-pw")
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr
    setup.proxy.wait_line(r"connection closed db=maria-disable .*bytes_out=[1-9]")


def test_server_that_never_greets(setup: Setup) -> None:
    with pytest.raises(pymysql.err.OperationalError) as exc:
        pymysql_query(setup.ports["maria-silent"], "x509user", "SELECT 1")
    assert exc.value.args[0] == 1043
    assert exc.value.args[1].startswith("dbmtls: [maria-silent] the server sent no greeting within 0.5s")
    setup.proxy.wait_log("reason=timeout")


def test_untrusted_server_certificate(setup: Setup) -> None:
    with pytest.raises(mysql.connector.Error) as exc:
        connector_query(setup.ports["maria-badca"], "x509user", "SELECT 1")
    assert (exc.value.errno, exc.value.sqlstate) == (1043, "08S01")
    assert str(exc.value.msg).startswith("dbmtls: [maria-badca] TLS handshake with localhost:")
    assert "server certificate not trusted" in str(exc.value.msg)
    setup.proxy.wait_log("reason=unknown_ca")


def test_client_certificate_rejected_by_the_server(setup: Setup) -> None:
    # TLS 1.3: the server's alert arrives after our side of the handshake, on the first read.
    port = setup.ports["maria-foreign-cert"]
    with pytest.raises(mysql.connector.Error) as exc:
        connector_query(port, "x509user", "SELECT 1")
    assert (exc.value.errno, exc.value.sqlstate) == (1045, "28000")
    assert "rejected the client certificate" in str(exc.value.msg)
    assert "[maria-foreign-cert]" in str(exc.value.msg)
    out = cli(port, "x509user", "SELECT 1")
    assert "ERROR 1045 (28000)" in out.stderr
    assert "rejected the client certificate" in out.stderr
    setup.proxy.wait_log("reason=client_cert_rejected")


# --- caching_sha2_password and sha256_password (scripted MySQL 8 server, see module doc) -------


def test_caching_sha2_full_auth_with_pymysql(fake_ports: dict[str, int], mysql_fake8: FakeMySQL8) -> None:
    mysql_fake8.flush_cache()
    first = pymysql_query(fake_ports["mysql8"], "cs", "SELECT 1", password="cs-pw")
    second = pymysql_query(fake_ports["mysql8"], "cs", "SELECT 1", password="cs-pw")
    # PyMySQL asked dbmtls for the public key (it is on plaintext), dbmtls decrypted the answer and
    # sent the password inside TLS; the second login took the fast path on the warmed cache.
    assert first == [("user=cs;cert=jinsu;auth=full;tls=TLSv1.3",)]
    assert second == [("user=cs;cert=jinsu;auth=fast;tls=TLSv1.3",)]
    assert not any(s.key_request_over_tls for s in mysql_fake8.sessions)


def test_caching_sha2_full_auth_with_mysql_connector(fake_ports: dict[str, int], mysql_fake8: FakeMySQL8) -> None:
    mysql_fake8.flush_cache()
    # mysql-connector-python sends the password in clear on the (loopback) app leg; dbmtls relays it.
    rows = connector_query(fake_ports["mysql8"], "cs", "SELECT 1", password="cs-pw")
    assert rows == [("user=cs;cert=jinsu;auth=full;tls=TLSv1.3",)]


def test_caching_sha2_full_auth_with_the_mariadb_cli(fake_ports: dict[str, int], mysql_fake8: FakeMySQL8) -> None:
    mysql_fake8.flush_cache()
    out = cli(fake_ports["mysql8"], "cs", "SELECT 1", password="cs-pw")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "user=cs;cert=jinsu;auth=full;tls=TLSv1.3"
    assert not any(s.key_request_over_tls for s in mysql_fake8.sessions)


def test_caching_sha2_wrong_password_is_the_servers_err(fake_ports: dict[str, int], mysql_fake8: FakeMySQL8) -> None:
    mysql_fake8.flush_cache()
    with pytest.raises(pymysql.err.OperationalError) as exc:
        pymysql_query(fake_ports["mysql8"], "cs", "SELECT 1", password="wrong")
    assert exc.value.args[0] == 1045
    assert "Access denied for user 'cs'" in exc.value.args[1]


def test_sha256_password_after_auth_switch_with_pymysql(fake_ports: dict[str, int], mysql_fake8: FakeMySQL8) -> None:
    rows = pymysql_query(fake_ports["mysql8"], "sh", "SELECT 1", password="sh-pw")
    assert rows == [("user=sh;cert=jinsu;auth=sha256;tls=TLSv1.3",)]
    assert not any(s.key_request_over_tls for s in mysql_fake8.sessions)


def test_sha256_password_as_the_servers_default_plugin(
    fake_ports: dict[str, int], mysql_fake8_sha256: FakeMySQL8
) -> None:
    # PyMySQL puts the key request ("01") into its HandshakeResponse; dbmtls answers it after TLS
    # is up and sends the HandshakeResponse upstream with the decrypted password in it.
    rows = pymysql_query(fake_ports["mysql8-sha256"], "sh", "SELECT 1", password="sh-pw")
    assert rows == [("user=sh;cert=jinsu;auth=sha256;tls=TLSv1.3",)]
    assert not any(s.key_request_over_tls for s in mysql_fake8_sha256.sessions)
    assert not any(s.plaintext_handshake_response for s in mysql_fake8_sha256.sessions)
