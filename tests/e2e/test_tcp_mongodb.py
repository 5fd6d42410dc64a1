"""``tcp`` and ``mongodb`` relays against a TLS echo server that requires client certificates.

The server is ``support.tls_echo`` (no OS package provides a TLS echo service, and mongod is
not installed); it runs OpenSSL's server side with ``CERT_REQUIRED``, so what is tested is
dbmtls's real TLS client: the chain and name it verifies, the certificate it presents, and
what it logs and does to the app when the handshake fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import Iterator

import pytest

from support.certs import PKI
from support.net import free_port
from support.proc import Dbmtls, on_plane, tls_block
from support.tls_echo import TLSEchoServer

pytestmark = pytest.mark.e2e


class Proxy:
    def __init__(self, proc: Dbmtls, ports: dict[str, int]) -> None:
        self.proc = proc
        self.ports = ports


@pytest.fixture(scope="module")
def proxy(pki: PKI, echo: TLSEchoServer, tmp_path_factory: pytest.TempPathFactory, data_plane: str) -> Iterator[Proxy]:
    other_client = pki.client_for("mallory", ca=pki.other_ca)
    variants = {
        "ok": tls_block(pki),
        "wrongca": tls_block(pki, ca=str(pki.other_ca / "ca.crt")),
        "badclient": tls_block(pki, client=other_client),
    }
    ports: dict[str, int] = {}
    databases = []
    for protocol in ("tcp", "mongodb"):
        for variant, tls in variants.items():
            name = f"{protocol}-{variant}"
            ports[name] = free_port()
            databases.append(
                {
                    "name": name,
                    "protocol": protocol,
                    "listen": f"127.0.0.1:{ports[name]}",
                    "address": f"localhost:{echo.port}",
                    "tls": tls,
                }
            )
    config = {"databases": databases, "drainTimeout": "2s", "dataPlane": data_plane}
    proc = Dbmtls(tmp_path_factory.mktemp("dbmtls-tcp"), config)
    on_plane(proc.start(wait_ports=tuple(ports.values())), data_plane)
    yield Proxy(proc, ports)
    assert proc.stop() == 0


def _mongo_like(payload: bytes) -> bytes:
    # an OP_MSG-shaped message: the mongodb session looks at the first bytes
    return struct.pack("<iiii", 16 + len(payload), 1, 0, 2013) + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _failure_line(proc: Dbmtls, db: str, reason: str) -> str:
    return proc.wait_line(rf"connection failed db={re.escape(db)} .*reason={reason}\b")


def _wait_count(proc: Dbmtls, needle: str, n: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (count := proc.log().count(needle)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


@pytest.mark.parametrize("protocol", ["tcp", "mongodb"])
def test_echo_round_trip_with_client_cert(protocol: str, proxy: Proxy, echo: TLSEchoServer) -> None:
    payload = os.urandom(1 << 20)
    message = _mongo_like(payload) if protocol == "mongodb" else payload
    before = len(echo.peer_cns)
    with socket.create_connection(("127.0.0.1", proxy.ports[f"{protocol}-ok"]), timeout=15) as s:
        s.sendall(message)
        assert _recv_exact(s, len(message)) == message
    echo.wait_for(lambda e: len(e.peer_cns) > before)
    assert echo.peer_cns[-1] == "jinsu"
    line = proxy.proc.wait_line(rf"connection closed db={protocol}-ok .*bytes_in={len(message)}\b")
    assert f"bytes_in={len(message)}" in line
    assert f"bytes_out={len(message)}" in line
    assert "tls=TLSv1.3" in line


@pytest.mark.parametrize("protocol", ["tcp", "mongodb"])
def test_half_close_still_gets_the_echo(protocol: str, proxy: Proxy) -> None:
    message = _mongo_like(b"ping" * 100) if protocol == "mongodb" else b"ping" * 100
    with socket.create_connection(("127.0.0.1", proxy.ports[f"{protocol}-ok"]), timeout=15) as s:
        s.sendall(message)
        s.shutdown(socket.SHUT_WR)
        assert _recv_exact(s, len(message) + 1) == message  # and then EOF


@pytest.mark.parametrize("protocol", ["tcp", "mongodb"])
def test_wrong_ca_logs_and_closes(protocol: str, proxy: Proxy) -> None:
    name = f"{protocol}-wrongca"
    with socket.create_connection(("127.0.0.1", proxy.ports[name]), timeout=15) as s:
        s.sendall(_mongo_like(b"x") if protocol == "mongodb" else b"hello")
        assert s.recv(100) == b""  # closed, nothing relayed
    line = _failure_line(proxy.proc, name, "unknown_ca")
    assert "server certificate not trusted" in line


@pytest.mark.parametrize("protocol", ["tcp", "mongodb"])
def test_rejected_client_cert_logs_and_closes(protocol: str, proxy: Proxy, echo: TLSEchoServer) -> None:
    name = f"{protocol}-badclient"
    errors_before = len(echo.handshake_errors)
    with socket.create_connection(("127.0.0.1", proxy.ports[name]), timeout=15) as s:
        s.sendall(_mongo_like(b"x") if protocol == "mongodb" else b"hello")
        with contextlib.suppress(ConnectionResetError):  # a close with unread data is a reset
            assert s.recv(100) == b""
    line = _failure_line(proxy.proc, name, "client_cert_rejected")
    assert "rejected the client certificate" in line
    echo.wait_for(lambda e: len(e.handshake_errors) > errors_before)


def test_rejected_client_cert_while_the_app_is_idle(proxy: Proxy) -> None:
    """The server's TLS 1.3 rejection arrives before the app's first bytes: logged with its reason."""
    name = "mongodb-badclient"
    with socket.create_connection(("127.0.0.1", proxy.ports[name]), timeout=15) as s:
        time.sleep(0.5)  # the scenario itself: the app is idle for a while after connecting
        with contextlib.suppress(OSError):
            s.sendall(_mongo_like(b"x"))
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
    proxy.proc.wait_line(rf"connection failed db={name} .*duration=0\.[0-9]+s .*reason=client_cert_rejected")


def test_tls_client_on_mongodb_listener_is_refused_with_a_reason(proxy: Proxy) -> None:
    """A driver with tls=true against the plaintext listener: closed at once, and the log says why."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", proxy.ports["mongodb-ok"]), timeout=10) as raw,
        pytest.raises((ssl.SSLError, OSError)),
    ):
        ctx.wrap_socket(raw)
    line = _failure_line(proxy.proc, "mongodb-ok", "app_protocol")
    assert "connect without TLS" in line


def test_one_log_line_per_connection(proxy: Proxy) -> None:
    needle = "connection closed db=tcp-ok "
    before = proxy.proc.log().count(needle)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", proxy.ports["tcp-ok"]), timeout=10) as s:
            s.sendall(b"abc")
            assert _recv_exact(s, 3) == b"abc"
    assert _wait_count(proxy.proc, needle, before + 3) == before + 3
