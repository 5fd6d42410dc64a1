"""Fault injection: what an SRE does to a sidecar before putting it next to every pod.

Each test breaks one thing for real (a killed and restarted redis-server, a server that
accepts and says nothing, one that answers garbage, one that resets in the middle of a
reply, a process with almost no file descriptors, a slow-loris app, an idle app) and
asserts what the app reads and what dbmtls logs.  The hostile servers are small threads
here because no package gives "a server that resets after half a reply"; everything they
do is in their few lines.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.certs import PKI
from support.net import free_port, recv_line
from support.proc import Dbmtls, on_plane, tls_block
from support.redis_server import RedisTLS

pytestmark = pytest.mark.e2e

PING = b"*1\r\n$4\r\nPING\r\n"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll a condition of the system under test (a log line, a count) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read_until_closed(sock: socket.socket) -> tuple[bytes, OSError | None]:
    """Everything the socket delivers, and how it ended (None: a clean EOF)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except OSError as exc:
        return got, exc
    return got, None


def redis_db(name: str, port: int, address: str, pki: PKI, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "protocol": "redis",
        "listen": f"127.0.0.1:{port}",
        "address": address,
        "tls": tls_block(pki),
        **extra,
    }


def ask(port: int, request: bytes = PING) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(request)
        return recv_line(s)


class Hostile:
    """A TCP server thread that handles each connection with ``handler(conn)``."""

    def __init__(self, handler: object) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.handler = handler
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self.handler(conn)  # type: ignore[operator]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hostile() -> Iterator[list[Hostile]]:
    made: list[Hostile] = []
    yield made
    for h in made:
        h.close()


def test_upstream_killed_and_restarted(pki: PKI, workdir: Path, data_plane: str) -> None:
    redis = RedisTLS(workdir / "redis", pki.server, pki.ca_cert).start()
    port = free_port()
    config = {"databases": [redis_db("cache", port, f"localhost:{redis.port}", pki)], "dataPlane": data_plane}
    try:
        with Dbmtls(workdir, config) as proxy:
            on_plane(proxy.start((port,)), data_plane)
            assert ask(port) == b"+PONG\r\n"
            assert redis.proc is not None
            redis.proc.kill()  # kill -9: no goodbye to anyone
            redis.proc.wait(timeout=10)
            reply = ask(port)
            assert reply.startswith(b"-ERR dbmtls: [cache] connection to localhost:"), reply
            proxy.wait_line(r"connection failed db=cache .*reason=connection_refused")
            redis.start()  # same port, same certificates
            assert ask(port) == b"+PONG\r\n"
    finally:
        redis.stop()


def test_garbage_instead_of_tls(pki: PKI, workdir: Path, hostile: list[Hostile], data_plane: str) -> None:
    def garbage(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)

    server = Hostile(garbage)
    hostile.append(server)
    port = free_port()
    config = {"databases": [redis_db("g", port, f"localhost:{server.port}", pki)], "dataPlane": data_plane}
    with Dbmtls(workdir, config).start((port,)) as p:
        on_plane(p, data_plane)
        reply = ask(port)
        assert reply.startswith(b"-ERR dbmtls: [g] server localhost:"), reply
        assert b"did not answer with TLS" in reply
        p.wait_line(r"connection failed db=g .*reason=server_refused_tls")


def test_postgres_server_that_accepts_and_says_nothing(
    pki: PKI, workdir: Path, hostile: list[Hostile], data_plane: str
) -> None:
    import psycopg

    gate = threading.Event()
    server = Hostile(lambda conn: gate.wait(30))
    hostile.append(server)
    port = free_port()
    db = {
        "name": "quiet",
        "protocol": "postgres",
        "listen": f"127.0.0.1:{port}",
        "address": f"localhost:{server.port}",
        "tls": tls_block(pki),
        "handshakeTimeout": "500ms",
    }
    try:
        with Dbmtls(workdir, {"databases": [db], "dataPlane": data_plane}).start((port,)) as p:
            on_plane(p, data_plane)
            with pytest.raises(psycopg.OperationalError, match=r"did not answer the SSLRequest within 0\.5s"):
                psycopg.connect(f"host=127.0.0.1 port={port} user=app dbname=app connect_timeout=15")
            p.wait_line(r"connection failed db=quiet .*reason=timeout")
    finally:
        gate.set()


def test_reset_in_the_middle_of_a_reply_reaches_the_app_as_a_reset(
    pki: PKI, workdir: Path, hostile: list[Hostile], data_plane: str
) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)

    def half_then_reset(raw: socket.socket) -> None:
        conn = ctx.wrap_socket(raw, server_side=True)
        conn.recv(1024)
        conn.sendall(b"$1000\r\n" + b"x" * 100)  # a 1000-byte bulk string, cut short
        conn.recv(1024)  # the app has the first part (it says so by sending more): now reset
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST (wrap_socket took the descriptor over from raw)

    server = Hostile(half_then_reset)
    hostile.append(server)
    port = free_port()
    config = {"databases": [redis_db("cut", port, f"localhost:{server.port}", pki)], "dataPlane": data_plane}
    with Dbmtls(workdir, config).start((port,)) as p, socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        on_plane(p, data_plane)
        s.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        first = b""
        while len(first) < 107:
            first += s.recv(65536)
        s.sendall(PING)
        got, error = read_until_closed(s)
        assert isinstance(error, ConnectionResetError), (first + got, error)  # not a clean EOF after half a reply
        line = p.wait_line(r"connection failed db=cut .*reason=upstream_reset")
        assert "WARNING" in line


def test_fd_exhaustion_answers_too_many_and_keeps_the_admin_alive(
    pki: PKI, redis_tls: RedisTLS, workdir: Path, data_plane: str
) -> None:
    port = free_port()
    config = {"databases": [redis_db("few", port, f"localhost:{redis_tls.port}", pki)], "dataPlane": data_plane}
    # 128 descriptors: 64 kept in reserve, the rest for relayed connections (two each) and for
    # telling the ones past the limit
    with Dbmtls(workdir, config, admin=True, nofile=128).start((port,)) as p:
        limit = int(p.wait_line(r"connection limits .*max_connections=(\d+)").rsplit("=", 1)[1])
        assert 16 <= limit < 32
        # the start-up probe (a connect and close to the port) holds a slot until its session ends
        wait_for(lambda: "connection closed db=few" in p.log(), "the start-up probe to end")
        held: list[socket.socket] = []
        try:
            for _ in range(limit):
                s = socket.create_connection(("127.0.0.1", port), timeout=15)
                held.append(s)
                s.sendall(PING)
                assert recv_line(s) == b"+PONG\r\n"
            for _ in range(5):  # past the limit: told, in Redis's words, never a silent reset
                reply = ask(port)
                expected = f"-ERR dbmtls: [few] too many connections: {limit} open in dbmtls (limit {limit})"
                assert reply.startswith(expected.encode()), reply
            with urllib.request.urlopen(p.admin_url + "/healthz", timeout=10) as r:
                assert r.status == 200
            p.wait_line(r"connection failed db=few .*reason=too_many_connections")
        finally:
            for s in held:
                s.close()
        wait_for(lambda: p.log().count("connection closed db=few") >= limit + 1, "the held connections to close")
        assert ask(port) == b"+PONG\r\n"  # and back to normal once they are gone


def test_slow_loris_app_is_closed(pki: PKI, workdir: Path, data_plane: str) -> None:
    port = free_port()
    db = {
        "name": "slow",
        "protocol": "postgres",
        "listen": f"127.0.0.1:{port}",
        "address": "localhost:1",
        "tls": tls_block(pki),
        "handshakeTimeout": "300ms",
    }
    config = {"databases": [db], "dataPlane": data_plane}
    with Dbmtls(workdir, config).start((port,)) as p, socket.create_connection(("127.0.0.1", port)) as s:
        on_plane(p, data_plane)
        s.settimeout(15)
        s.sendall(b"\x00\x00\x00")  # three bytes of a startup packet, then nothing
        assert s.recv(1024) == b""  # dbmtls gives the slot back after 3 x handshakeTimeout
        p.wait_line(r"connection failed db=slow .*reason=app_timeout")


def test_idle_connection_is_closed_and_logged(pki: PKI, redis_tls: RedisTLS, workdir: Path, data_plane: str) -> None:
    port = free_port()
    config = {
        "databases": [redis_db("idle", port, f"localhost:{redis_tls.port}", pki, idleTimeout="500ms")],
        "dataPlane": data_plane,
    }
    with Dbmtls(workdir, config).start((port,)) as p, socket.create_connection(("127.0.0.1", port)) as s:
        on_plane(p, data_plane)
        s.settimeout(15)
        s.sendall(PING)
        assert recv_line(s) == b"+PONG\r\n"
        assert s.recv(1024) == b""  # then silence: dbmtls closes both sides
        line = p.wait_line(r"connection closed db=idle .*idle timeout")
        assert "INFO" in line
