"""Redis end to end: a real redis-server (TLS only, client certificates required), the real
``dbmtls run`` process, and real clients (redis-py, redis-cli, raw sockets where the test is
about bytes).

One dbmtls process serves every database of the module: the working one and one per failure
(wrong CA, wrong name, expired server certificate, no/unknown client certificate, nothing
listening, a server that never answers the handshake).  Each failure is asserted twice: the
``-ERR`` the app reads and the ``reason=`` of the one log line dbmtls writes for the
connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from dbmtls.pki import issue
from support.certs import PKI, Pair
from support.net import free_port, recv_line
from support.proc import Dbmtls, on_plane, tls_block
from support.redis_server import RedisTLS
from support.seed import SEED_DR

pytestmark = pytest.mark.e2e

# The seed scenario's server certificate names (step 3), 127.0.0.1 and localhost included.
SEED_DNS_NAMES = [
    "*.foo-redis.istio-redis-mtls.svc.cluster.local",
    "foo-redis-master.istio-redis-mtls.svc.cluster.local",
    "*.foo-redis-master.istio-redis-mtls.svc.cluster.local",
    "*.foo-redis-headless.istio-redis-mtls.svc.cluster.local",
    "foo-redis-headless.istio-redis-mtls.svc.cluster.local",
    "127.0.0.1",
    "localhost",
    "foo-redis",
    "foo-redis-master",
    "foo-redis-master.istio-redis-mtls",
    "foo-redis-master.istio-redis-mtls.svc.cluster.local",
]


MiB = 1 << 20


# --- helpers -----------------------------------------------------------------------------------


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(MiB, n - len(buf)))
        if not chunk:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def direct_client(pki: PKI, server: RedisTLS) -> redis.Redis:
    """A client that talks TLS to redis itself (to look at the server's side of things)."""
    return redis.Redis(
        host="localhost",
        port=server.port,
        ssl=True,
        ssl_certfile=pki.client.cert,
        ssl_keyfile=pki.client.key,
        ssl_ca_certs=pki.ca_cert,
    )


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expired_redis(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTLS]:
    server = RedisTLS(
        tmp_path_factory.mktemp("redis-expired"), pki.server_for("localhost", "127.0.0.1", expired=True), pki.ca_cert
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def silent_server() -> Iterator[int]:
    """Accepts TCP (the kernel does, from the backlog) and never says a word: a handshake timeout."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


class Proxy:
    def __init__(self, proc: Dbmtls, ports: dict[str, int], unix_path: str) -> None:
        self.proc = proc
        self.ports = ports
        self.unix_path = unix_path

    def client(self, name: str = "ok", **kw: Any) -> redis.Redis:
        return redis.Redis(port=self.ports[name], **kw)


@pytest.fixture(scope="module")
def proxy(
    pki: PKI,
    redis_tls: RedisTLS,
    expired_redis: RedisTLS,
    silent_server: int,
    tmp_path_factory: pytest.TempPathFactory,
    data_plane: str,
) -> Iterator[Proxy]:
    work = tmp_path_factory.mktemp("dbmtls-redis")
    unix_path = str(work / "redis.sock")
    good = f"localhost:{redis_tls.port}"
    variants: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
        "ok": (good, tls_block(pki), {}),
        "wrongca": (good, tls_block(pki, ca=str(pki.other_ca / "ca.crt")), {}),
        "wrongname": (good, tls_block(pki, sni="db.example"), {}),
        "wrongsan": (good, tls_block(pki, subjectAltNames=["db.example"]), {}),
        "expired": (f"localhost:{expired_redis.port}", tls_block(pki), {}),
        "nocert": (good, {"mode": "SIMPLE", "caCertificates": pki.ca_cert}, {}),
        "unknowncert": (good, tls_block(pki, client=pki.client_for("mallory", ca=pki.other_ca)), {}),
        "refused": (f"127.0.0.1:{free_port()}", tls_block(pki), {}),
        "timeout": (f"localhost:{silent_server}", tls_block(pki), {"handshakeTimeout": "500ms"}),
    }
    # the unix listener first: waiting for the last TCP port means it is bound too
    databases: list[dict[str, Any]] = [
        {"name": "unix", "protocol": "redis", "listen": f"unix:{unix_path}", "address": good, "tls": tls_block(pki)}
    ]
    ports: dict[str, int] = {}
    for name, (address, tls, extra) in variants.items():
        ports[name] = free_port()
        databases.append(
            {
                "name": name,
                "protocol": "redis",
                "listen": f"127.0.0.1:{ports[name]}",
                "address": address,
                "tls": tls,
                **extra,
            }
        )
    config = {"databases": databases, "drainTimeout": "2s", "dataPlane": data_plane}
    proc = on_plane(Dbmtls(work, config).start(wait_ports=tuple(ports.values())), data_plane)
    yield Proxy(proc, ports, unix_path)
    assert proc.stop() == 0


# --- the working path ----------------------------------------------------------------------------


def test_redis_cli_seed_commands(proxy: Proxy) -> None:
    """Step 6 of the seed scenario: redis-cli with no TLS options at all."""
    port = str(proxy.ports["ok"])
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", port, "SET", "foo", "bar"], capture_output=True, text=True, timeout=30
    )
    assert (out.returncode, out.stdout.strip()) == (0, "OK"), out
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", port, "GET", "foo"], capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == "bar"


def test_set_get_redis_py(proxy: Proxy) -> None:
    r = proxy.client()
    assert r.set("k1", "v1")
    assert r.get("k1") == b"v1"
    r.close()
    proxy.proc.wait_line(r"connection closed db=ok .*tls=TLSv1\.3")


def test_16_mib_value_round_trips_byte_exact(proxy: Proxy) -> None:
    value = os.urandom(16 * MiB)
    r = proxy.client()
    assert r.set("big16", value)
    assert r.get("big16") == value
    r.close()


def test_200_concurrent_clients(proxy: Proxy) -> None:
    n = 200
    needle = "connection closed db=ok "
    before = proxy.proc.log().count(needle)

    async def main() -> list[bytes | None]:
        barrier = asyncio.Barrier(n)

        async def one(i: int) -> bytes | None:
            r = redis.asyncio.Redis(port=proxy.ports["ok"], single_connection_client=True)
            try:
                await r.ping()
                await barrier.wait()  # all n connections are open at this point
                await r.set(f"c{i}", f"v{i}")
                got = await r.get(f"c{i}")
                assert got is None or isinstance(got, bytes)
                return got
            finally:
                await r.aclose()

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 60)

    results = asyncio.run(main())
    assert results == [f"v{i}".encode() for i in range(n)]
    # one close line per connection (earlier tests' lines may still be arriving: at least n)
    wait_until(lambda: proxy.proc.log().count(needle) >= before + n, what="200 close lines")
    assert "connection failed db=ok " not in proxy.proc.log()


def test_unix_socket_listener(proxy: Proxy) -> None:
    out = subprocess.run(
        ["redis-cli", "-s", proxy.unix_path, "SET", "viaunix", "yes"], capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == "OK", out
    r = redis.Redis(unix_socket_path=proxy.unix_path)
    assert r.get("viaunix") == b"yes"
    r.close()
    proxy.proc.wait_line(r"connection closed db=unix client=unix")


def test_half_close_still_gets_the_reply(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.ports["ok"]), timeout=15) as s:
        s.sendall(resp(b"SET", b"hc", b"closed") + resp(b"GET", b"hc"))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data == b"+OK\r\n$6\r\nclosed\r\n"


def test_slow_reader_is_backpressured(proxy: Proxy, pki: PKI, redis_tls: RedisTLS) -> None:
    """A client that asks for 16 MiB and does not read: dbmtls stops reading from redis
    (redis keeps the rest in its output buffer) instead of buffering it all."""
    value = os.urandom(16 * MiB)
    r = proxy.client()
    r.set("slow", value)
    r.close()
    pid = proxy.proc.proc.pid if proxy.proc.proc else 0
    direct = direct_client(pki, redis_tls)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # keep the kernel's share small
    s.settimeout(30)
    try:
        s.connect(("127.0.0.1", proxy.ports["ok"]))
        s.sendall(resp(b"CLIENT", b"SETNAME", b"slowreader"))
        assert recv_line(s) == b"+OK\r\n"
        rss_before = rss_bytes(pid)
        s.sendall(resp(b"GET", b"slow"))

        def stuck_in_redis() -> int:
            for c in direct.client_list():
                if c.get("name") == "slowreader":
                    return int(c["omem"])
            return 0

        # Without backpressure dbmtls would swallow the whole value and redis's buffer would empty.
        wait_until(lambda: stuck_in_redis() > 2 * MiB, what="redis to hold the unsent reply")
        peak = rss_before
        for _ in range(10):  # the client keeps not reading: memory must stay flat
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.1)
        assert stuck_in_redis() > 2 * MiB
        assert peak - rss_before < 12 * MiB, f"dbmtls RSS grew by {(peak - rss_before) / MiB:.1f} MiB"
        header = recv_line(s)
        assert header == b"$%d\r\n" % len(value)
        assert recv_exact(s, len(value) + 2) == value + b"\r\n"
    finally:
        s.close()
        direct.close()


def test_app_speaking_tls_to_the_plaintext_listener(proxy: Proxy) -> None:
    """``redis-cli --tls`` against dbmtls: refused at once, and the log says to drop --tls."""
    out = subprocess.run(
        ["redis-cli", "--tls", "--insecure", "-h", "127.0.0.1", "-p", str(proxy.ports["ok"]), "PING"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert "PONG" not in out.stdout
    line = proxy.proc.wait_line(r"connection failed db=ok .*reason=app_protocol")
    assert "connect without TLS" in line
    assert "redis-cli without --tls" in line


# --- failures: the -ERR the app reads and the log line ---------------------------------------------

FAILURES = [
    ("wrongca", "unknown_ca", "server certificate not trusted: "),
    ("wrongname", "name_mismatch", "server certificate does not match 'db.example'"),
    ("wrongsan", "name_mismatch", "server certificate carries none of the names db.example"),
    ("expired", "expired", "server certificate invalid: certificate has expired"),
    ("nocert", "client_cert_rejected", "wants a client certificate and none was sent (TLS alert: certificate"),
    ("unknowncert", "client_cert_rejected", "rejected the client certificate (TLS alert: unknown ca)"),
    ("refused", "connection_refused", "refused"),
    ("timeout", "timeout", "timed out after 0.5s"),
]


@pytest.mark.parametrize(("db", "reason", "text"), FAILURES, ids=[f[0] for f in FAILURES])
def test_failure_err_reply_and_log_line(proxy: Proxy, db: str, reason: str, text: str) -> None:
    with socket.create_connection(("127.0.0.1", proxy.ports[db]), timeout=15) as s:
        s.sendall(resp(b"SET", b"foo", b"bar"))
        reply = recv_line(s)
    assert reply.startswith(f"-ERR dbmtls: [{db}] ".encode()), reply
    assert text.encode() in reply, reply
    assert reply.count(b"\r") == 1
    line = proxy.proc.wait_line(rf"connection failed db={db} .*reason={reason}\b")
    assert text in line


@pytest.mark.parametrize("db", ["wrongca", "nocert", "refused"])
def test_failure_through_redis_py_and_redis_cli(proxy: Proxy, db: str) -> None:
    """Real clients on their defaults show the reason (not "Connection reset by peer")."""
    r = proxy.client(db)
    with pytest.raises(redis.ResponseError, match=rf"^dbmtls: \[{db}\] "):
        r.set("foo", "bar")
    r.close()
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(proxy.ports[db]), "SET", "foo", "bar"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.startswith(f"ERR dbmtls: [{db}] "), out


def test_rejected_certificate_while_the_app_is_idle(proxy: Proxy) -> None:
    """TLS 1.3: the server's rejection arrives while dbmtls still waits for the app's first
    bytes; the app's first command, sent later, must still get the -ERR (not a silent close)."""
    with socket.create_connection(("127.0.0.1", proxy.ports["nocert"]), timeout=15) as s:
        time.sleep(0.5)  # the scenario itself: an app that connects and sends nothing for a while
        s.sendall(resp(b"GET", b"foo"))
        reply = recv_line(s)
    assert reply.startswith(b"-ERR dbmtls: [nocert] server localhost:"), reply
    assert b"wants a client certificate and none was sent" in reply


def test_each_request_gets_an_error_then_close(proxy: Proxy) -> None:
    """Clients that swallow the reply to a connect-time command still see the next one."""
    with socket.create_connection(("127.0.0.1", proxy.ports["refused"]), timeout=15) as s:
        s.sendall(resp(b"CLIENT", b"SETINFO", b"LIB-NAME", b"x"))
        first = recv_line(s)
        s.sendall(resp(b"GET", b"foo") + b"PING\r\n")
        assert recv_line(s) == first
        assert recv_line(s) == first
        s.settimeout(10)
        assert s.recv(100) == b""  # closed when the error window is over


# --- the seed DestinationRule --------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_redis(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTLS]:
    """Redis with the seed's server certificate (every name from step 3)."""
    cert = Pair(issue(pki.ca, tmp_path_factory.mktemp("seed-cert"), server_names=SEED_DNS_NAMES))
    server = RedisTLS(tmp_path_factory.mktemp("redis-seed"), cert, pki.ca_cert).start()
    yield server
    server.stop()


def test_seed_destination_rule_drives_a_working_proxy(
    pki: PKI, seed_redis: RedisTLS, tmp_path: Path, data_plane: str
) -> None:
    dr = (
        SEED_DR.replace("/client-certs/tls.crt", pki.client.cert)
        .replace("/client-certs/tls.key", pki.client.key)
        .replace("/client-certs/ca.crt", pki.ca_cert)
    )
    port = free_port()
    local = tmp_path / "local.yaml"
    local.write_text(
        f"dataPlane: {data_plane}\n"
        f"overrides:\n  db-mtls:\n    listen: 127.0.0.1:{port}\n    dial: 127.0.0.1:{seed_redis.port}\n"
    )
    with Dbmtls(tmp_path, dr, args=("-c", str(local))).start(wait_ports=(port,)) as proc:
        on_plane(proc, data_plane)
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "SET", "foo", "bar"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout.strip() == "OK", (out, proc.log())
        # the name verified is the DestinationRule's host, although we dialled 127.0.0.1
        assert "upstream=foo-redis-master:6379" in proc.log()
        proc.wait_line(r"connection closed db=db-mtls .*tls=TLSv1\.3")
        assert proc.stop() == 0


# --- shutdown ------------------------------------------------------------------------------------


def test_sigterm_drains_and_exits_zero(pki: PKI, redis_tls: RedisTLS, tmp_path: Path, data_plane: str) -> None:
    port = free_port()
    config = {
        "drainTimeout": "1s",
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
    proc = on_plane(Dbmtls(tmp_path, config).start(wait_ports=(port,)), data_plane)
    try:
        idle = redis.Redis(port=port)
        assert idle.ping()  # an open connection the drain has to deal with
        assert proc.proc is not None
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=15) == 0
        log = proc.log()
        assert "shutting down why=SIGTERM" in log
        assert "stopped" in log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        idle.close()
    finally:
        proc.stop(check=False)


# --- native worker threads ------------------------------------------------------------------------


@pytest.mark.parametrize("data_plane", ["native"], indirect=True)  # skipped (or failed) without the extension
def test_native_threads_relay_and_drain(pki: PKI, redis_tls: RedisTLS, tmp_path: Path, data_plane: str) -> None:
    """``nativeThreads: 3``: three named worker threads run, connections spread over them (round
    robin) relay byte-exact side by side, and a drain with connections open on every worker ends
    with exit 0."""
    port = free_port()
    config = {
        "drainTimeout": "1s",
        "dataPlane": data_plane,
        "nativeThreads": 3,
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
    proc = on_plane(Dbmtls(tmp_path, config).start(wait_ports=(port,)), data_plane)
    try:
        assert " threads=3" in proc.wait_line(r"data plane native native=")
        assert proc.proc is not None
        task = Path(f"/proc/{proc.proc.pid}/task")
        workers = sorted(
            n for n in (t.joinpath("comm").read_text().strip() for t in task.iterdir()) if n.startswith("dbmtls-w")
        )
        assert workers == ["dbmtls-w0", "dbmtls-w1", "dbmtls-w2"]
        clients = [redis.Redis(port=port, single_connection_client=True) for _ in range(9)]
        for i, r in enumerate(clients):  # all nine open at once: three on each worker
            assert r.set(f"thr{i}", os.urandom(1000 + i))
        values = [r.get(f"thr{i}") for i, r in enumerate(clients)]
        assert [len(v or b"") for v in values] == [1000 + i for i in range(9)]
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=15) == 0
        for r in clients:
            r.close()
    finally:
        proc.stop(check=False)
