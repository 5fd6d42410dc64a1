"""A scripted MySQL 8 server for what no OS package gives: caching_sha2_password and sha256_password.

Debian ships MariaDB, which has neither plugin on the server side, so the two exchanges that need
dbmtls's local RSA key are tested against this script.  It follows the MySQL documentation
(page_protocol_connection_phase, page_caching_sha2_authentication_exchanges, sha256_password) and
is strict where the real server is:

* the greeting offers CLIENT_SSL; a HandshakeResponse in plaintext gets ERR 3159 ("insecure
  transport prohibited") and is recorded, so a test can prove none was ever sent;
* after the SSLRequest it terminates real TLS (``ssl.SSLContext``, server side) with the test's
  server certificate and *requires* a client certificate from the test CA;
* caching_sha2_password: fast path (``01 03``) only when the user's cache entry is warm, else
  ``01 04`` and the password in clear inside TLS; a ``02`` (public key request) arriving over TLS
  is taken as a wrong cleartext password, exactly the failure a proxy that forwards it causes;
* sha256_password: over TLS the password comes in clear; a ``01`` key request is likewise wrong.

A minimal command phase follows (COM_QUERY: any SELECT returns one row describing the session,
other statements get OK; COM_PING, COM_INIT_DB, COM_QUIT), enough for PyMySQL and
mysql-connector-python to connect, query and close.  One thread per connection, blocking sockets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

from support.certs import Pair

CLIENT_LONG_PASSWORD = 0x1
CLIENT_FOUND_ROWS = 0x2
CLIENT_LONG_FLAG = 0x4
CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SSL = 0x800
CLIENT_TRANSACTIONS = 0x2000
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21

SERVER_CAPS = (
    CLIENT_LONG_PASSWORD
    | CLIENT_FOUND_ROWS
    | CLIENT_LONG_FLAG
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_PROTOCOL_41
    | CLIENT_SSL
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH
    | CLIENT_CONNECT_ATTRS
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
)  # no DEPRECATE_EOF: result sets end with EOF packets, the simplest shape
VERSION = "8.0.36-dbmtls-fake"
CACHING_SHA2 = "caching_sha2_password"
SHA256 = "sha256_password"
OK = b"\x00\x00\x00\x02\x00\x00\x00"


@dataclass(frozen=True)
class Account:
    plugin: str  # CACHING_SHA2 or SHA256
    password: str


@dataclass
class Session:
    """What one connection did, for the tests' assertions."""

    user: str | None = None
    client_cert_cn: str | None = None
    tls_version: str | None = None
    auth: str | None = None  # "fast", "full", "sha256", or None (failed)
    plaintext_handshake_response: bool = False
    key_request_over_tls: bool = False  # the bug: a public-key request forwarded upstream
    error: str | None = None
    queries: list[str] = field(default_factory=list)


class _Closed(Exception):
    pass


def _recv_exact(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise _Closed
        buf += chunk
    return bytes(buf)


def _read_packet(sock: socket.socket | ssl.SSLSocket) -> tuple[int, bytes]:
    header = _recv_exact(sock, 4)
    return header[3], _recv_exact(sock, int.from_bytes(header[:3], "little"))


def _packet(payload: bytes, seq: int) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq & 0xFF]) + payload


def _err(errno: int, state: str, message: str) -> bytes:
    return b"\xff" + errno.to_bytes(2, "little") + b"#" + state.encode() + message.encode()


def _lenenc(data: bytes) -> bytes:
    assert len(data) < 0xFB
    return bytes([len(data)]) + data


def _cstr(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.index(b"\x00", pos)
    return buf[pos:end], end + 1


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def caching_sha2_scramble(password: str, nonce: bytes) -> bytes:
    p1 = hashlib.sha256(password.encode()).digest()
    p2 = hashlib.sha256(hashlib.sha256(p1).digest() + nonce).digest()
    return _xor(p1, p2)


@dataclass
class _HandshakeResponse:
    flags: int
    user: str
    auth: bytes
    plugin: str


def _parse_response(payload: bytes) -> _HandshakeResponse:
    flags = int.from_bytes(payload[:4], "little")
    user, pos = _cstr(payload, 32)
    if flags & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        n = payload[pos]  # short passwords only: a one-byte length
        assert n < 0xFB
        auth, pos = payload[pos + 1 : pos + 1 + n], pos + 1 + n
    else:
        n = payload[pos]
        auth, pos = payload[pos + 1 : pos + 1 + n], pos + 1 + n
    if flags & CLIENT_CONNECT_WITH_DB and pos < len(payload):
        _, pos = _cstr(payload, pos)
    plugin = b""
    if flags & CLIENT_PLUGIN_AUTH and pos < len(payload):
        plugin, pos = _cstr(payload, pos)
    return _HandshakeResponse(flags, user.decode(), auth, plugin.decode())


class FakeMySQL8:
    def __init__(
        self, server: Pair, ca_cert: str, accounts: dict[str, Account], *, default_plugin: str = CACHING_SHA2
    ) -> None:
        self.accounts = accounts
        self.default_plugin = default_plugin
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(server.cert, server.key)
        self.ctx.load_verify_locations(cafile=ca_cert)
        self.ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as REQUIRE X509 would demand
        self.cache: set[str] = set()  # users whose caching_sha2 entry is warm
        self.sessions: list[Session] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._stopping = False
        self._next_id = 1

    def start(self) -> FakeMySQL8:
        t = threading.Thread(target=self._accept_loop, name="fake-mysql8", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def flush_cache(self) -> None:
        """Like FLUSH PRIVILEGES: the next caching_sha2 login needs full authentication."""
        with self._lock:
            self.cache.clear()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            still_open = list(self._open)
        for sock in still_open:  # wakes threads blocked in recv()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(sock)
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, raw: socket.socket) -> None:
        session = Session()
        with self._lock:
            self.sessions.append(session)
            conn_id = self._next_id
            self._next_id += 1
        raw.settimeout(15)
        sock: socket.socket | ssl.SSLSocket = raw
        try:
            sock = self._connection_phase(raw, session, conn_id)
            if session.auth is not None:
                self._command_phase(sock, session)
        except (_Closed, OSError, ssl.SSLError) as exc:
            session.error = session.error or f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._open.discard(raw)
            with contextlib.suppress(OSError):
                sock.close()

    # --- connection phase ---

    def _connection_phase(self, raw: socket.socket, session: Session, conn_id: int) -> socket.socket | ssl.SSLSocket:
        nonce = bytes(1 + b % 126 for b in os.urandom(20))  # printable-ish, never NUL, like mysqld
        greeting = (
            b"\x0a"
            + VERSION.encode()
            + b"\x00"
            + conn_id.to_bytes(4, "little")
            + nonce[:8]
            + b"\x00"
            + (SERVER_CAPS & 0xFFFF).to_bytes(2, "little")
            + bytes([255])  # utf8mb4_0900_ai_ci
            + (2).to_bytes(2, "little")  # SERVER_STATUS_AUTOCOMMIT
            + (SERVER_CAPS >> 16).to_bytes(2, "little")
            + bytes([21])
            + bytes(10)
            + nonce[8:]
            + b"\x00"
            + self.default_plugin.encode()
            + b"\x00"
        )
        raw.sendall(_packet(greeting, 0))
        seq, payload = _read_packet(raw)
        flags = int.from_bytes(payload[:4], "little")
        if len(payload) != 32 or not flags & CLIENT_SSL:
            session.plaintext_handshake_response = True
            session.error = "HandshakeResponse in plaintext"
            raw.sendall(_packet(_err(3159, "08004", "Connections using insecure transport are prohibited"), seq + 1))
            return raw
        sock = self.ctx.wrap_socket(raw, server_side=True)
        session.tls_version = sock.version()
        der = sock.getpeercert(binary_form=True)
        if der:
            cns = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            session.client_cert_cn = str(cns[0].value) if cns else None
        seq, payload = _read_packet(sock)
        if seq != 2:
            raise _Closed(f"HandshakeResponse with sequence id {seq}")
        response = _parse_response(payload)
        session.user = response.user
        account = self.accounts.get(response.user)
        next_seq = 3

        def send(data: bytes) -> None:
            nonlocal next_seq
            sock.sendall(_packet(data, next_seq))
            next_seq += 1

        def receive() -> bytes:
            nonlocal next_seq
            seq, data = _read_packet(sock)
            if seq != next_seq:
                raise _Closed(f"auth packet with sequence id {seq}, expected {next_seq}")
            next_seq += 1
            return data

        def deny(why: str) -> None:
            session.error = why
            send(_err(1045, "28000", f"Access denied for user '{response.user}'@'localhost' ({why})"))

        if account is None:
            deny("no such user")
            return sock
        auth = response.auth
        if response.plugin != account.plugin:
            send(b"\xfe" + account.plugin.encode() + b"\x00" + nonce + b"\x00")
            auth = receive()
        if account.plugin == CACHING_SHA2:
            with self._lock:
                warm = response.user in self.cache
            if warm and auth == caching_sha2_scramble(account.password, nonce):
                send(b"\x01\x03")
                session.auth = "fast"
                send(OK)
                return sock
            send(b"\x01\x04")  # perform full authentication
            cleartext = receive()
            mode = "full"
        else:
            cleartext = auth
            mode = "sha256"
        if cleartext in (b"\x01", b"\x02"):
            session.key_request_over_tls = True
        if cleartext != account.password.encode() + b"\x00":
            deny("wrong password")
            return sock
        if account.plugin == CACHING_SHA2:
            with self._lock:
                self.cache.add(response.user)
        session.auth = mode
        send(OK)
        return sock

    # --- command phase ---

    def _command_phase(self, sock: socket.socket | ssl.SSLSocket, session: Session) -> None:
        while True:
            _, payload = _read_packet(sock)
            command = payload[:1]
            if command == b"\x01":  # COM_QUIT
                return
            if command == b"\x03":  # COM_QUERY
                query = payload[1:].decode("utf-8", "replace")
                session.queries.append(query)
                if query.lstrip().lower().startswith("select"):
                    info = (
                        f"user={session.user};cert={session.client_cert_cn};"
                        f"auth={session.auth};tls={session.tls_version}"
                    )
                    self._result(sock, info.encode())
                else:
                    sock.sendall(_packet(OK, 1))
            elif command in (b"\x0e", b"\x02"):  # COM_PING, COM_INIT_DB
                sock.sendall(_packet(OK, 1))
            else:
                sock.sendall(_packet(_err(1047, "08S01", "Unknown command"), 1))

    @staticmethod
    def _result(sock: socket.socket | ssl.SSLSocket, value: bytes) -> None:
        column = (
            _lenenc(b"def")
            + _lenenc(b"")
            + _lenenc(b"")
            + _lenenc(b"")
            + _lenenc(b"info")
            + _lenenc(b"info")
            + b"\x0c"
            + (33).to_bytes(2, "little")  # utf8_general_ci
            + (1024).to_bytes(4, "little")
            + b"\xfd"  # VAR_STRING
            + bytes(2)  # flags
            + b"\x00"  # decimals
            + bytes(2)
        )
        eof = b"\xfe\x00\x00\x02\x00"
        sock.sendall(
            _packet(b"\x01", 1) + _packet(column, 2) + _packet(eof, 3) + _packet(_lenenc(value), 4) + _packet(eof, 5)
        )
