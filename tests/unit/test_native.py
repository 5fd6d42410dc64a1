"""The native data plane's extension, ``dbmtls._native``, driven directly (docs/native.md).

No dbmtls process here: an Engine in this process, real sockets, and TLS servers made of Python's
``ssl`` in threads (``Server``), each scripted for what the test needs.  What is checked:

* a native context has exactly the settings of the ``ssl.SSLContext`` it mirrors;
* every handshake failure is classified (``tls.context.classify``) into the same error, with the
  same message, as Python's own handshake against the same server;
* the relay: byte-exact, bounded memory under backpressure, resets passed on as resets, the
  half-close linger, the idle timeout, server bytes held before the relay starts;
* nothing leaks: file descriptors and threads are back where they were after hundreds of
  connections, and after ``Engine.close`` with connections still open.

The end-to-end tests (``tests/e2e``, the ``data_plane`` fixture) run the real process on both planes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvloop

from dbmtls.config.model import DatabaseConfig
from dbmtls.errors import ConfigError, UpstreamError
from dbmtls.native import load
from dbmtls.native.plane import _exception
from dbmtls.native.tls import NativeClientTLS, _same_leaf, twin_of
from dbmtls.pki import issue
from dbmtls.tls.context import classify
from support.certs import PKI

_loaded, why = load()
if _loaded is None:
    if os.environ.get("DBMTLS_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"DBMTLS_REQUIRE_NATIVE=1: {why}")
    pytest.skip(str(why), allow_module_level=True)
native: ModuleType = _loaded

Handler = Callable[[ssl.SSLSocket], None]


class Server:
    """A TLS server in threads: each connection is handshaken, then given to ``handler``."""

    def __init__(self, ctx: ssl.SSLContext | None, handler: Callable[[Any], None]) -> None:
        self.ctx = ctx
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port: int = self.sock.getsockname()[1]
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True) if self.ctx is not None else raw
            self.handler(conn)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                raw.close()

    def close(self) -> None:
        self.sock.close()


def echo(conn: Any) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()


def server_ctx(pki: PKI, *, cert: Any = None, client_ca: str | None = None, max13: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pair = cert or pki.server
    ctx.load_cert_chain(pair.cert, pair.key)
    ctx.load_verify_locations(cafile=client_ca or pki.ca_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not max13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def database(pki: PKI, **tls: Any) -> DatabaseConfig:
    block: dict[str, Any] = {
        "mode": "MUTUAL",
        "clientCertificate": pki.client.cert,
        "privateKey": pki.client.key,
        "caCertificates": pki.ca_cert,
    }
    block.update(tls)
    return DatabaseConfig.model_validate(
        {"name": "db", "protocol": "tcp", "listen": "127.0.0.1:1", "address": "localhost:1", "tls": block}
    )


def contexts(db: DatabaseConfig) -> tuple[ssl.SSLContext, Any]:
    material = NativeClientTLS(db, native).build()
    assert material.default is not None
    return material.default, twin_of(material.default)


class Rig:
    """An Engine and its events, waited for synchronously."""

    def __init__(self) -> None:
        self.engine = native.Engine()
        self.events: dict[int, list[tuple[Any, ...]]] = {}

    def connect(self, port: int, ctx: ssl.SSLContext, twin: Any, name: str = "localhost") -> Any:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        return self.engine.connect(sock.detach(), twin, name, check_hostname=ctx.check_hostname, want_peer_cert=True)

    def wait(self, conn: Any, kind: str, timeout: float = 15.0) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events.get(conn.id, []):
                if event[1] == kind:
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind!r} event for connection {conn.id}: {self.events.get(conn.id)}")
            select.select([self.engine.fileno()], [], [], min(left, 0.5))
            for event in self.engine.events():
                self.events.setdefault(event[0], []).append(event)

    def relay(self, conn: Any, *, pending: bytes = b"", idle_ms: int = 60_000) -> socket.socket:
        """Start the relay with one end of a loopback TCP connection; the test holds the other (the
        app).  TCP, not a socket pair: resets and half-closes are the point."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            app = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
        ours.setblocking(False)
        conn.relay(ours.detach(), pending, 0, idle_ms)
        app.settimeout(15)
        return app

    def close(self) -> None:
        self.engine.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


# --- contexts --------------------------------------------------------------------------------------

TLS_VARIANTS: dict[str, dict[str, Any]] = {
    "mutual": {},
    "tls13-only": {"minProtocolVersion": "TLSV1_3"},
    "tls12-only": {"maxProtocolVersion": "TLSV1_2"},
    "skip-verify": {"insecureSkipVerify": True, "caCertificates": None},
    "system-store": {"mode": "SIMPLE", "clientCertificate": None, "privateKey": None, "caCertificates": None},
}


@pytest.mark.parametrize("variant", list(TLS_VARIANTS))
def test_twin_has_the_settings_of_the_python_context(pki: PKI, variant: str) -> None:
    ctx, twin = contexts(database(pki, **TLS_VARIANTS[variant]))
    got = twin.settings()
    assert got["options"] == int(ctx.options)
    assert got["min_version"] == max(int(ctx.minimum_version.value), 0)
    assert got["max_version"] == max(int(ctx.maximum_version.value), 0)
    assert got["security_level"] == ctx.security_level
    assert bool(got["verify_mode"]) == (ctx.verify_mode == ssl.CERT_REQUIRED)
    assert twin.ciphers() == [c["name"] for c in ctx.get_ciphers()]
    if variant == "mutual":
        assert got["ca_count"] == len(ctx.get_ca_certs()) == 1
    if variant == "system-store":
        assert got["ca_count"] == len(ctx.get_ca_certs())  # both empty until used: the hashed dir


def test_per_user_contexts_each_get_their_twin(pki: PKI) -> None:
    alice = pki.client_for("alice")
    db = DatabaseConfig.model_validate(
        {
            "name": "pg",
            "protocol": "postgres",
            "listen": "127.0.0.1:1",
            "address": "localhost:1",
            "tls": {
                "mode": "MUTUAL",
                "caCertificates": pki.ca_cert,
                "userCertificates": {"alice": {"clientCertificate": alice.cert, "privateKey": alice.key}},
            },
        }
    )
    material = NativeClientTLS(db, native).build()
    twin = twin_of(material.by_user["alice"])
    assert twin.leaf_der() is not None
    again = NativeClientTLS(db, native).build()
    assert twin_of(again.by_user["alice"]) is not twin  # a reload makes new ones; old ones live on


def test_a_key_with_a_passphrase_is_an_error_never_a_prompt(pki: PKI, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pki.client.key).read_bytes(), None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(native.Error, match="private key"):
        native.Context(certfile=pki.client.cert, keyfile=str(encrypted))
    with pytest.raises(native.Error, match=r"does not match|private key"):
        native.Context(certfile=pki.client.cert, keyfile=pki.server.key)


def test_a_leaf_that_changed_between_the_two_reads_fails_the_load(pki: PKI) -> None:
    material = NativeClientTLS(database(pki), native).build()
    other = native.Context(certfile=pki.server.cert, keyfile=pki.server.key)
    _same_leaf(twin_of(material.default), pki.client.cert, material, "tls")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="changed while it was being loaded"):
        _same_leaf(other, pki.client.cert, material, "tls")


# --- handshake failures: the same error as Python's ssl ------------------------------------------


def python_failure(ctx: ssl.SSLContext, port: int, name: str) -> BaseException:
    """What the Python plane sees: uvloop's TLS transport, as Dialer.handshake uses it."""

    async def attempt() -> BaseException:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[BaseException | None] = loop.create_future()

        class Watch(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(exc)

        try:
            transport, _ = await loop.create_connection(Watch, "127.0.0.1", port, ssl=ctx, server_hostname=name)
        except (OSError, ssl.SSLError) as exc:
            return exc
        transport.write(b"ping")  # TLS 1.3: a rejected client certificate shows up on the first read
        failure = await asyncio.wait_for(lost, 10)
        if failure is None:
            raise AssertionError("the server closed cleanly")
        return failure

    return uvloop.run(attempt())


def native_failure(rig: Rig, ctx: ssl.SSLContext, twin: Any, port: int, name: str) -> BaseException:
    conn = rig.connect(port, ctx, twin, name)
    hs = rig.wait(conn, "handshake")
    if not hs[2]:
        return _exception(hs[6], name)
    app = rig.relay(conn, pending=b"ping")
    early = rig.wait(conn, "early")
    conn.fail_app(b"")
    app.close()
    return _exception(early[2], name)


def classified(exc: BaseException, client_cert: bool = True) -> tuple[type[UpstreamError], str]:
    err = classify(exc, target="localhost:1", server_name="localhost", client_cert=client_cert)
    return type(err), err.message


FAILURES: dict[str, Callable[[PKI, Path], tuple[ssl.SSLContext | None, dict[str, Any], str]]] = {
    # name: (server context, the database's tls settings, the name dialled)
    "unknown_ca": lambda pki, tmp: (server_ctx(pki), {"caCertificates": str(pki.other_ca / "ca.crt")}, "localhost"),
    "name_mismatch": lambda pki, tmp: (server_ctx(pki), {}, "db.example"),
    "expired": lambda pki, tmp: (
        server_ctx(pki, cert=pki.server_for("localhost", "127.0.0.1", expired=True, tag="native")),
        {},
        "localhost",
    ),
    "client_cert_rejected_tls13": lambda pki, tmp: (
        server_ctx(pki, client_ca=str(pki.other_ca / "ca.crt")),
        {},
        "localhost",
    ),
    "client_cert_rejected_tls12": lambda pki, tmp: (
        server_ctx(pki, client_ca=str(pki.other_ca / "ca.crt"), max13=False),
        {},
        "localhost",
    ),
    "tls_version": lambda pki, tmp: (server_ctx(pki, max13=False), {"minProtocolVersion": "TLSV1_3"}, "localhost"),
    "not_tls": lambda pki, tmp: (None, {}, "localhost"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_handshake_failures_are_classified_as_python_s(case: str, pki: PKI, rig: Rig, tmp_path: Path) -> None:
    sctx, tls, name = FAILURES[case](pki, tmp_path)

    def handler(conn: Any) -> None:
        if sctx is None:  # not a TLS server: answers a ClientHello with HTTP
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)
            time.sleep(0.5)
            return
        echo(conn)

    server = Server(sctx, handler)
    try:
        ctx, twin = contexts(database(pki, **tls))
        want = classified(python_failure(ctx, server.port, name))
        got = classified(native_failure(rig, ctx, twin, server.port, name))
    finally:
        server.close()
    assert got == want
    assert got[0].__name__ != "UpstreamError"  # a real classification, not the fallback


def test_a_server_that_hangs_up_in_the_handshake(pki: PKI, rig: Rig) -> None:
    server = Server(None, lambda conn: conn.recv(1024))  # reads the ClientHello, closes
    try:
        ctx, twin = contexts(database(pki))
        want = classified(python_failure(ctx, server.port, "localhost"))
        got = classified(native_failure(rig, ctx, twin, server.port, "localhost"))
    finally:
        server.close()
    assert got == want


# --- the relay -------------------------------------------------------------------------------------


@pytest.fixture
def echo_server(pki: PKI) -> Iterator[Server]:
    server = Server(server_ctx(pki), echo)
    yield server
    server.close()


def test_relay_is_byte_exact_both_ways(pki: PKI, rig: Rig, echo_server: Server) -> None:
    ctx, twin = contexts(database(pki))
    conn = rig.connect(echo_server.port, ctx, twin)
    hs = rig.wait(conn, "handshake")
    assert hs[2] and hs[3] == "TLSv1.3"
    app = rig.relay(conn, pending=b"first ")
    payload = os.urandom(8 << 20)
    sender = threading.Thread(target=app.sendall, args=(payload,))
    sender.start()
    got = recv_exact(app, len(payload) + 6)
    sender.join()
    assert got == b"first " + payload
    app.shutdown(socket.SHUT_WR)
    assert app.recv(10) == b""  # the EOF went on as close_notify; the echo server closed, then the app's side
    closed = rig.wait(conn, "closed")
    assert closed[2] == 0 and closed[4] is False  # no failure, not idle
    assert closed[5] == closed[6] == len(payload) + 6 == conn.bytes_from_app == conn.bytes_from_upstream
    app.close()


def test_the_apps_eof_reaches_the_server_as_close_notify(pki: PKI, rig: Rig) -> None:
    """The app's EOF goes on as close_notify at once (TLS 1.3's half-close), and what the server
    says after it still reaches the app.  The server here answers only once it has read the EOF:
    without close_notify it would wait until the linger closed the connection, and the app would
    get an empty close instead of the answer."""

    def answer_after_eof(conn: Any) -> None:
        request = b""
        while chunk := conn.recv(100):  # b"" on close_notify
            request += chunk
        conn.sendall(b"after your eof: " + request)
        conn.unwrap()  # our close_notify; the relay answered the server's EOF with its own
        conn.close()

    server = Server(server_ctx(pki), answer_after_eof)
    try:
        ctx, twin = contexts(database(pki))
        conn = rig.connect(server.port, ctx, twin)
        rig.wait(conn, "handshake")
        app = rig.relay(conn, pending=b"ques")
        app.sendall(b"tion")
        app.shutdown(socket.SHUT_WR)
        assert recv_exact(app, 100) == b"after your eof: question"  # and then the app's EOF
        closed = rig.wait(conn, "closed")
        assert closed[2] == 0 and closed[4] is False  # no failure, not idle
        assert server.errors == []
        app.close()
    finally:
        server.close()


def test_a_server_that_ignores_close_notify_is_closed_by_the_linger(pki: PKI, rig: Rig) -> None:
    """A server that reads the app's EOF (close_notify) and neither answers nor closes: once it
    has been quiet for the linger, both sides are closed cleanly and the server sees the end."""
    done = threading.Event()

    def deaf(conn: Any) -> None:
        assert conn.recv(100) == b"hello"
        assert conn.recv(100) == b""  # close_notify
        # then the TCP end, which this server does not start (TLS says nothing more after close_notify)
        with socket.socket(fileno=os.dup(conn.fileno())) as raw:
            raw.settimeout(15)
            assert raw.recv(1) == b""
        done.set()

    server = Server(server_ctx(pki), deaf)
    try:
        ctx, twin = contexts(database(pki))
        conn = rig.connect(server.port, ctx, twin)
        rig.wait(conn, "handshake")
        app = rig.relay(conn, pending=b"hello")
        app.shutdown(socket.SHUT_WR)
        assert app.recv(10) == b""
        closed = rig.wait(conn, "closed")
        assert closed[2] == 0 and closed[4] is False  # no failure, not idle
        assert done.wait(15), server.errors
        app.close()
    finally:
        server.close()


def test_hundreds_of_connections_leave_no_descriptor_or_thread_behind(pki: PKI, rig: Rig, echo_server: Server) -> None:
    ctx, twin = contexts(database(pki))
    fds, threads = open_fds(), threading.active_count()
    for _round in range(3):
        conns = [rig.connect(echo_server.port, ctx, twin) for _ in range(100)]
        apps = []
        for conn in conns:
            assert rig.wait(conn, "handshake")[2]
            apps.append(rig.relay(conn))
        for i, app in enumerate(apps):
            app.sendall(b"%d" % i)
        for i, app in enumerate(apps):
            assert app.recv(100) == b"%d" % i
            app.close()  # the app's EOF; the server answers it with its own close
        for conn in conns:
            rig.wait(conn, "closed")
        del conns, apps, conn
    deadline = time.monotonic() + 10
    while (open_fds() > fds or threading.active_count() > threads) and time.monotonic() < deadline:
        time.sleep(0.05)  # the echo server's threads see their EOF and close their ends
    assert open_fds() <= fds
    assert threading.active_count() <= threads


def test_a_reader_that_does_not_read_holds_back_the_server(pki: PKI, rig: Rig) -> None:
    total = 32 << 20
    block = os.urandom(1 << 20)

    def flood(conn: Any) -> None:
        conn.recv(10)
        for _ in range(total // len(block)):
            conn.sendall(block)
        conn.close()

    server = Server(server_ctx(pki), flood)
    try:
        ctx, twin = contexts(database(pki))
        conn = rig.connect(server.port, ctx, twin)
        rig.wait(conn, "handshake")
        app = rig.relay(conn, pending=b"go")
        time.sleep(0.5)
        before = conn.bytes_from_upstream
        time.sleep(0.5)
        # nothing is read from the server beyond what the app's socket and one batch hold
        assert conn.bytes_from_upstream == before
        assert before < 8 << 20
        got = recv_exact(app, total)
        assert got == block * (total // len(block))
    finally:
        server.close()


def test_a_server_reset_mid_reply_reaches_the_app_as_a_reset(pki: PKI, rig: Rig) -> None:
    def half_then_reset(conn: Any) -> None:
        conn.recv(10)
        conn.sendall(b"x" * 100)
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    server = Server(server_ctx(pki), half_then_reset)
    try:
        ctx, twin = contexts(database(pki))
        conn = rig.connect(server.port, ctx, twin)
        rig.wait(conn, "handshake")
        app = rig.relay(conn, pending=b"a")
        assert recv_exact(app, 100) == b"x" * 100
        app.sendall(b"b")
        with pytest.raises(ConnectionResetError):
            recv_exact(app, 1)  # a reset, never a clean end after half a reply
        closed = rig.wait(conn, "closed")
        assert closed[2] == 2  # the server's side failed
        assert isinstance(_exception(closed[3], "localhost"), ConnectionResetError)
    finally:
        server.close()


def test_an_app_reset_reaches_the_server_as_a_reset(pki: PKI, rig: Rig) -> None:
    seen: list[BaseException | bytes] = []

    def wait_for_reset(conn: Any) -> None:
        conn.recv(10)
        conn.sendall(b"ok")
        try:
            # below TLS (Python's ssl reads a reset as a clean EOF): a reset, or the close_notify
            # and FIN of a graceful close
            seen.append(socket.socket.recv(conn, 100))
        except OSError as exc:
            seen.append(exc)

    server = Server(server_ctx(pki), wait_for_reset)
    try:
        ctx, twin = contexts(database(pki))
        conn = rig.connect(server.port, ctx, twin)
        rig.wait(conn, "handshake")
        app = rig.relay(conn, pending=b"a")
        assert app.recv(10) == b"ok"
        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app.close()  # RST
        closed = rig.wait(conn, "closed")
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.close()
    assert closed[2] == 1  # the app's side failed ...
    assert isinstance(_exception(closed[3], "localhost"), ConnectionResetError)
    assert seen and isinstance(seen[0], ConnectionResetError)  # ... and the server read a reset


def test_idle_connections_are_closed_after_the_idle_timeout(pki: PKI, rig: Rig, echo_server: Server) -> None:
    ctx, twin = contexts(database(pki))
    conn = rig.connect(echo_server.port, ctx, twin)
    rig.wait(conn, "handshake")
    app = rig.relay(conn, pending=b"hi", idle_ms=300)
    assert app.recv(10) == b"hi"
    assert app.recv(10) == b""  # then silence: closed on both sides
    closed = rig.wait(conn, "closed")
    assert closed[4] is True and closed[2] == 0


def test_what_a_server_says_before_the_relay_is_held_for_the_app(pki: PKI, rig: Rig) -> None:
    def banner_then_close(conn: Any) -> None:
        conn.sendall(b"220 hello\r\n")
        conn.close()

    server = Server(server_ctx(pki), banner_then_close)
    try:
        ctx, twin = contexts(database(pki))
        conn = rig.connect(server.port, ctx, twin)
        rig.wait(conn, "handshake")
        lost = rig.wait(conn, "lost")
        assert lost[3] == len(b"220 hello\r\n")
        assert conn.take_held() == b"220 hello\r\n"
        conn.close()
        rig.wait(conn, "closed")
    finally:
        server.close()


def test_closing_the_engine_closes_what_is_still_open(pki: PKI, echo_server: Server) -> None:
    fds = open_fds()
    rig = Rig()
    ctx, twin = contexts(database(pki))
    conns = [rig.connect(echo_server.port, ctx, twin) for _ in range(20)]
    apps = [rig.relay(conn) for conn in conns if rig.wait(conn, "handshake")[2]]
    assert len(apps) == len(conns)
    rig.close()
    for app in apps:
        assert app.recv(10) == b""  # closed by the engine
        app.close()
    del conns, apps, rig
    deadline = time.monotonic() + 10
    while open_fds() > fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= fds


def test_tls_server_certificate_issued_for_an_ip_is_verified_by_ip(pki: PKI, rig: Rig, tmp_path: Path) -> None:
    cert = issue(pki.ca, tmp_path / "ip", server_names=["127.0.0.1"])

    class P:
        def __init__(self, d: Path) -> None:
            self.cert, self.key = str(d / "tls.crt"), str(d / "tls.key")

    server = Server(server_ctx(pki, cert=P(cert)), echo)
    try:
        ctx, twin = contexts(database(pki))
        ok = rig.connect(server.port, ctx, twin, "127.0.0.1")
        assert rig.wait(ok, "handshake")[2]
        ok.abort()
        bad = rig.connect(server.port, ctx, twin, "127.0.0.2")
        hs = rig.wait(bad, "handshake")
        assert not hs[2]
        assert classified(_exception(hs[6], "127.0.0.2"))[0].__name__ == "NameMismatch"
    finally:
        server.close()


def test_plain_tcp_toward_the_server_passes_half_closes_on(rig: Rig) -> None:
    """tls.mode DISABLE: no TLS, and TCP can half-close, so the app's EOF reaches the server and
    the server's answer after it still reaches the app (relay.py: write_eof)."""

    def answer_after_eof(conn: Any) -> None:
        got = b""
        while chunk := conn.recv(100):
            got += chunk
        conn.sendall(b"you said " + got)
        conn.close()

    server = Server(None, answer_after_eof)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setblocking(False)
        conn = rig.engine.connect(sock.detach(), None, "localhost", check_hostname=False, want_peer_cert=False)
        hs = rig.wait(conn, "handshake")
        assert hs[2] and hs[3] == ""  # no TLS version: plaintext
        app = rig.relay(conn, pending=b"hello")
        app.shutdown(socket.SHUT_WR)
        assert recv_exact(app, 100) == b"you said hello"
        closed = rig.wait(conn, "closed")
        assert closed[2] == 0
    finally:
        server.close()


def test_check_says_which_database_runs_on_which_plane(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from click.testing import CliRunner

    from dbmtls.cli import main

    tls = {"mode": "MUTUAL", "clientCertificate": pki.client.cert, "privateKey": pki.client.key}
    config = {
        "dataPlane": "native",
        "databases": [
            {"name": "cache", "protocol": "redis", "listen": "127.0.0.1:1", "address": "localhost:2", "tls": tls},
            {"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:3", "address": "localhost:4", "tls": tls},
            {"name": "maria", "protocol": "mariadb", "listen": "127.0.0.1:5", "address": "localhost:6", "tls": tls},
        ],
    }
    path = tmp_path / "dbmtls.yaml"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["check", "--no-bind-check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    # every protocol's session runs on the native plane (PostgreSQL and MySQL since their
    # steps over TLS before the relay went native too)
    assert f"# data plane: native ({native.OPENSSL_VERSION}) for cache, pg, maria\n" in result.stdout
    assert "python for" not in result.stdout

    # without the extension: a warning per database (run falls back), not an error
    import dbmtls.native

    monkeypatch.setattr(dbmtls.native, "_loaded", (None, "the extension dbmtls._native is not available (test)"))
    result = CliRunner().invoke(main, ["check", "--no-bind-check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "# data plane: python (native asked for, not available:" in result.stdout
    assert "warning: cache: dataPlane native is not available, dbmtls run uses python:" in result.stderr

    # the default (auto) on such a build: python, said once, nothing to warn about
    del config["dataPlane"]
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["check", "--no-bind-check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "# data plane: python (native not available: the extension dbmtls._native" in result.stdout
    assert "dataPlane native is not available" not in result.stderr

    # and with the extension, auto is native
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["check", "--no-bind-check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert f"# data plane: native ({native.OPENSSL_VERSION}) for cache, pg, maria\n" in result.stdout


# --- in-band: reading and writing over TLS before the relay (PostgreSQL, MySQL) -------------------


def in_band(pki: PKI, port: int, script: Callable[[Any], Any], **tls: Any) -> Any:
    """Run ``script(up)`` on the event loop with a handshaken ``NativeUpstream`` to ``port``."""
    from dbmtls.native.plane import NativePlane, NativeUpstream

    ctx, _ = contexts(database(pki, **tls))

    async def main() -> Any:
        plane = NativePlane(native)
        plane.start()
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            up = NativeUpstream(plane, sock.detach(), ctx, "localhost")
            result = await asyncio.wait_for(up._handshake, 15)
            assert result.ok, result.err
            try:
                return await asyncio.wait_for(script(up), 15)
            finally:
                up.abort()
        finally:
            plane.close()

    return uvloop.run(main())


def test_in_band_write_receive_and_a_clean_end(pki: PKI) -> None:
    def server_side(conn: Any) -> None:
        assert recv_exact(conn, 5) == b"hello"
        conn.sendall(b"greeting")
        assert recv_exact(conn, 4) == b"more"
        conn.sendall(b"bye")
        conn.close()

    async def script(up: Any) -> list[bytes]:
        up.write(b"hel")
        up.write(b"lo")  # in order, as one stream
        got = [await up.receive()]
        up.write(b"more")
        data = b""
        while data != b"bye":  # TLS records may come apart: whatever arrived, as Endpoint.receive
            data += await up.receive()
        got.append(data)
        got += [await up.receive(), await up.receive()]  # b"" at EOF, and again
        up.write(b"after the end")  # a no-op, as on a closing transport
        return got

    server = Server(server_ctx(pki), server_side)
    try:
        assert in_band(pki, server.port, script) == [b"greeting", b"bye", b"", b""]
    finally:
        server.close()
    assert not server.errors


def test_a_cancelled_receive_loses_nothing(pki: PKI) -> None:
    go = threading.Event()

    def server_side(conn: Any) -> None:
        go.wait(15)
        conn.sendall(b"one")
        conn.sendall(b"two")
        recv_exact(conn, 1)

    async def script(up: Any) -> bytes:
        pending = asyncio.ensure_future(up.receive())
        await asyncio.sleep(0)  # it waits now
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        go.set()
        data = b""
        while len(data) < 6:
            data += await up.receive()
        assert up.buffered() == 0 and up.take() == b""
        up.write(b"x")
        return data

    server = Server(server_ctx(pki), server_side)
    try:
        assert in_band(pki, server.port, script) == b"onetwo"
    finally:
        server.close()


def test_a_full_hold_is_taken_and_reading_goes_on(pki: PKI) -> None:
    blob = os.urandom(5 * native.BATCH + 123)  # more than the worker holds at once

    def server_side(conn: Any) -> None:
        conn.sendall(blob)
        recv_exact(conn, 1)

    async def script(up: Any) -> bytes:
        data = b""
        while len(data) < len(blob):
            data += await up.receive()
        up.write(b"x")
        return data

    server = Server(server_ctx(pki), server_side)
    try:
        assert in_band(pki, server.port, script) == blob
    finally:
        server.close()


def test_a_rejected_certificate_on_the_first_read_is_python_s_error(pki: PKI) -> None:
    # TLS 1.3: the server checks our certificate after our side of the handshake; the alert comes
    # with the first read (PostgreSQL's first reply, MySQL's login)
    sctx = server_ctx(pki, client_ca=str(pki.other_ca / "ca.crt"))
    server = Server(sctx, echo)

    async def script(up: Any) -> BaseException:
        up.write(b"startup")
        try:
            while await up.receive():
                pass
        except (OSError, ssl.SSLError) as exc:
            up.write(b"again")  # after the failure: ignored, as on a lost transport
            return exc
        raise AssertionError("the server closed cleanly")

    try:
        ctx, _ = contexts(database(pki))
        want = classified(python_failure(ctx, server.port, "localhost"))
        got = classified(in_band(pki, server.port, script))
    finally:
        server.close()
    assert got == want
    assert "rejected" in got[1].lower() or "certificate" in got[1].lower(), got


def test_relay_after_in_band_sends_pending_and_held_bytes_first_and_watch_sees_them(pki: PKI, rig: Rig) -> None:
    said = threading.Event()
    more = threading.Event()
    go = threading.Event()
    from_app: list[bytes] = []

    def server_side(conn: Any) -> None:
        assert recv_exact(conn, 7) == b"startup"
        conn.sendall(b"first")
        said.wait(15)
        conn.sendall(b"second")  # held by the worker, never taken by Python
        more.wait(15)
        conn.sendall(b"third")
        from_app.append(recv_exact(conn, len(b"app-first")))
        go.wait(15)  # nothing more from the server until the watch is over
        echo(conn)

    server = Server(server_ctx(pki), server_side)
    try:
        ctx, twin = contexts(database(pki))
        conn = rig.connect(server.port, ctx, twin)
        rig.wait(conn, "handshake")
        conn.write(b"startup")
        rig.wait(conn, "data")
        first = b""
        while len(first) < 5:
            first += conn.take()
        assert first == b"first"
        said.set()
        rig.wait(conn, "data")  # "second" is held (or part of it: the rest is read on)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            app = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
        ours.setblocking(False)
        conn.relay(ours.detach(), b"app-first", 0, 60_000, first, True)
        app.settimeout(15)
        assert recv_exact(app, len(b"firstsecond")) == b"firstsecond"
        more.set()
        assert recv_exact(app, 5) == b"third"
        for event in native_events(rig):
            rig.events.setdefault(event[0], []).append(event)
        copies = b"".join(e[2] for e in rig.events[conn.id] if e[1] == "copy")
        assert copies == b"secondthird"  # what Python did not see itself, in order
        conn.unwatch()
        go.set()
        app.sendall(b"ping")
        assert recv_exact(app, 4) == b"ping"
        assert from_app == [b"app-first"]  # the app's pending bytes went to the server first
        for event in native_events(rig):
            rig.events.setdefault(event[0], []).append(event)
        assert b"".join(e[2] for e in rig.events[conn.id] if e[1] == "copy") == copies  # no copy after unwatch
        assert conn.bytes_from_upstream == len(b"firstsecondthirdping")  # counted as relay.py does
        app.close()
        rig.wait(conn, "closed")
    finally:
        server.close()


def native_events(rig: Rig) -> list[tuple[Any, ...]]:
    """Whatever is queued now (the worker posts a chunk's copy before it writes the chunk)."""
    events: list[tuple[Any, ...]] = rig.engine.events()
    return events


def test_the_default_data_plane_is_native_when_the_extension_loads(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    import dbmtls.native
    from dbmtls.config.model import Config
    from dbmtls.proxy.server import Proxy

    tls = {"mode": "MUTUAL", "clientCertificate": pki.client.cert, "privateKey": pki.client.key}
    dbs = [
        {"name": n, "protocol": p, "listen": f"127.0.0.1:{i + 1}", "address": "localhost:9", "tls": tls}
        for i, (n, p) in enumerate([("cache", "redis"), ("pg", "postgres"), ("maria", "mariadb"), ("raw", "tcp")])
    ]
    config = Config.model_validate({"databases": dbs})
    assert config.dataPlane == "auto"
    proxy = Proxy(config)
    assert proxy.plane is not None
    assert all(rt.native is proxy.plane for rt in proxy.runtimes.values())
    assert Proxy(Config.model_validate({"databases": dbs, "dataPlane": "python"})).plane is None

    monkeypatch.setattr(dbmtls.native, "_loaded", (None, "the extension dbmtls._native is not available (test)"))
    fallback = Proxy(config)
    assert fallback.plane is None and "not available (test)" in str(fallback.plane_problem)
