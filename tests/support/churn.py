"""Connection churn and idle connections through a proxy, and the proxy's memory from /proc.

Shared by ``bench/churn.py`` (the reproduction script), the ``idle`` benchmark suite and
``tests/e2e/test_memory.py``.  Each client does the smallest real exchange of its protocol
and closes:

* Redis: a raw socket, ``PING``, read ``+PONG``, close (no client library in the way);
* PostgreSQL: psycopg on libpq's defaults (``sslmode=prefer``), ``SELECT 1``, close;
* MariaDB: PyMySQL, ``SELECT 1``, close.

Memory is read from ``/proc/PID/status`` (VmRSS), summed over the process and its
descendants (nginx's worker, a PgBouncer behind ``setpriv``), in KiB.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"


# --- the proxy's process -----------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _tree(pid: int) -> list[int]:
    """pid and its live descendants."""
    parent_of: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            parent_of[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    out, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parent_of.items() if parent == p]
        out += kids
        frontier += kids
    return out


def rss_kib(pid: int, *, tree: bool = False) -> int:
    """Resident set size of pid (and its descendants with ``tree``), KiB."""
    return sum(_status_kib(p, "VmRSS") for p in (_tree(pid) if tree else [pid]))


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError):
        return -1


# --- one connection of each protocol ---------------------------------------------------------------


class Closable(Protocol):
    def close(self) -> None: ...


def _recv_until(sock: socket.socket, want: bytes) -> None:
    buf = b""
    while not buf.endswith(want):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}, expected {want!r}")
        buf += chunk
        if buf.startswith(b"-"):
            raise ConnectionError(f"error reply: {buf!r}")


VALUE_KEY = b"churn:value"


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _recv_exact(sock: socket.socket, n: int) -> None:
    while n > 0:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError(f"closed with {n} bytes to go")
        n -= len(chunk)


def redis_open(port: int, host: str = "127.0.0.1", *, value_size: int = 0) -> socket.socket:
    """A connection that has answered one PING (so the proxy's session is fully set up), and
    then a GET of the ``value_size`` bytes stored by ``redis_set_value`` (when not 0)."""
    sock = socket.create_connection((host, port), timeout=10)
    try:
        sock.sendall(PING)
        _recv_until(sock, PONG)
        if value_size:
            sock.sendall(_resp(b"GET", VALUE_KEY))
            _recv_exact(sock, len(b"$%d\r\n" % value_size) + value_size + 2)
    except BaseException:
        sock.close()
        raise
    return sock


def redis_set_value(port: int, size: int) -> None:
    """Store ``size`` bytes under VALUE_KEY, through whatever listens on ``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_resp(b"SET", VALUE_KEY, b"v" * size))
        _recv_until(sock, b"+OK\r\n")


@dataclass(frozen=True)
class Target:
    """How a client reaches one database through the proxy."""

    protocol: str  # redis, postgres, mysql
    port: int
    user: str = "jinsu"
    password: str = ""
    database: str = ""
    value_size: int = 0  # Redis: then GET a value of this size (see redis_set_value)

    def open(self) -> Closable:
        """A connection that has run one request (PING / SELECT 1)."""
        if self.protocol == "redis":
            return redis_open(self.port, value_size=self.value_size)
        if self.protocol == "postgres":
            import psycopg

            conn: Any = psycopg.connect(
                host="127.0.0.1", port=self.port, user=self.user, dbname=self.database, connect_timeout=10
            )
            try:
                conn.execute("SELECT 1").fetchone()
            except BaseException:
                conn.close()
                raise
            return conn  # type: ignore[no-any-return]
        if self.protocol == "mysql":
            import pymysql

            db = pymysql.connect(
                host="127.0.0.1",
                port=self.port,
                user=self.user,
                password=self.password,
                database=self.database or None,
                connect_timeout=10,
                # PyMySQL's default (PREFERRED) builds an SSLContext with the system CA store on
                # every connect: ~25 ms of the client's CPU for a TLS offer dbmtls never makes.
                ssl_disabled=True,
            )
            try:
                with db.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
            except BaseException:
                db.close()
                raise
            return db  # type: ignore[no-any-return]
        raise ValueError(f"unknown protocol {self.protocol!r}")

    def once(self) -> None:
        """Connect, one request, close."""
        self.open().close()


# --- churn and idle ----------------------------------------------------------------------------------


@dataclass
class Point:
    done: int  # connections completed so far
    rss_kib: int
    fds: int
    seconds: float  # since the start of the churn


def churn(
    target: Target,
    n: int,
    pid: int,
    *,
    concurrency: int = 1,
    every: int = 1000,
    on_point: Callable[[Point], None] | None = None,
    tree: bool = False,
) -> list[Point]:
    """``n`` short connections (``concurrency`` at a time); the proxy's RSS every ``every`` of them.

    A point is taken when a multiple of ``every`` connections has completed; with
    ``concurrency`` > 1 up to ``concurrency - 1`` others may be open at that moment.
    The first failed connection stops the churn and is raised.
    """
    lock = threading.Lock()
    started = time.monotonic()
    points: list[Point] = []
    state = {"next": 0, "done": 0}
    errors: list[BaseException] = []

    def point(done: int) -> None:
        p = Point(done, rss_kib(pid, tree=tree), fd_count(pid), time.monotonic() - started)
        points.append(p)
        if on_point is not None:
            on_point(p)

    def worker() -> None:
        while True:
            with lock:
                if errors or state["next"] >= n:
                    return
                state["next"] += 1
            try:
                target.once()
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return
            with lock:
                state["done"] += 1
                done = state["done"]
                if every and done % every == 0:
                    point(done)

    point(0)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"connection {state['done'] + 1} of {n} failed: {errors[0]!r}") from errors[0]
    if not every or n % every:
        point(state["done"])
    return points


def settle(pid: int, *, seconds: float = 1.0, tree: bool = False) -> int:
    """RSS once the proxy has finished closing what the clients closed (give it ``seconds``)."""
    time.sleep(seconds)
    return rss_kib(pid, tree=tree)


@dataclass
class Idle:
    before_kib: int  # RSS before opening
    open_kib: int  # RSS with all of them open
    after_kib: int  # RSS right after closing them all (and the proxy closed its sides)
    later_kib: int  # RSS ``later`` seconds after that (dbmtls gives freed memory back on a timer)
    count: int

    @property
    def kib_per_connection(self) -> float:
        return (self.open_kib - self.before_kib) / self.count


def idle(
    target: Target, count: int, pid: int, *, tree: bool = False, settle_seconds: float = 1.0, later: float = 0.0
) -> Idle:
    """Open ``count`` connections (each ran one request), hold them, then close them."""
    before = settle(pid, seconds=settle_seconds, tree=tree)
    conns: list[Closable] = []
    try:
        for _ in range(count):
            conns.append(target.open())
        opened = settle(pid, seconds=settle_seconds, tree=tree)
    finally:
        for c in conns:
            c.close()
    after = settle(pid, seconds=settle_seconds * 2, tree=tree)
    return Idle(before, opened, after, settle(pid, seconds=later, tree=tree), count)


# --- servers set up for churn ---------------------------------------------------------------------

# The client certificate's CN (support.certs.make_pki): the user the proxy logs in as by certificate.
USER = "jinsu"
PG_DATABASE = "churn"
PG_HBA = "local all all trust\nhostssl all all 127.0.0.1/32 cert clientcert=verify-full\n"
MYSQL_PASSWORD = "churn-pw"
MYSQL_SETUP = f"""
CREATE USER '{USER}'@'%' IDENTIFIED BY '{MYSQL_PASSWORD}' REQUIRE X509;
CREATE DATABASE churn;
GRANT ALL ON churn.* TO '{USER}'@'%';
"""


def dbmtls_database(protocol: str, listen_port: int, server_port: int, pki: Any) -> dict[str, Any]:
    """One ``databases:`` entry: plaintext on ``listen_port``, verified mTLS to the server as CN=jinsu."""
    return {
        "name": protocol,
        "protocol": protocol,
        "listen": f"127.0.0.1:{listen_port}",
        "address": f"localhost:{server_port}",
        "dial": f"127.0.0.1:{server_port}",
        "tls": {
            "mode": "MUTUAL",
            "clientCertificate": pki.client.cert,
            "privateKey": pki.client.key,
            "caCertificates": pki.ca_cert,
        },
    }


def target_for(protocol: str, port: int) -> Target:
    if protocol == "postgres":
        return Target("postgres", port, USER, database=PG_DATABASE)
    if protocol == "mysql":
        return Target("mysql", port, USER, password=MYSQL_PASSWORD, database="churn")
    return Target(protocol, port)
