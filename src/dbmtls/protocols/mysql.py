"""MySQL / MariaDB connection phase through dbmtls, sans-IO.

Theory of operation
===================

The application speaks *plaintext* classic MySQL protocol to dbmtls on localhost; dbmtls reaches the
real server with the in-band upgrade (``CLIENT_SSL`` + SSLRequest) and verified mutual TLS.  One
object, :class:`MySQLHandshake`, holds the whole connection phase.  It never touches a socket: the
glue feeds it bytes and carries out the actions it returns (the shape of mitmproxy's layers: events
in, commands out).  Once the server says OK it hands over to a plain byte relay and is done.

Conversation (docs/protocols/mysql.md#connection-phase-order, #sequence-ids)::

    app                           dbmtls                               server
     |                              |<------------------- greeting(0) --|  server_data
     |<-- greeting(0), SSL cleared -|  SendToApp                        |
     |-- HandshakeResponse41(1) --->|  app_data -> NeedUser(user)       |
     |                              |  proceed() -> SendToServer(SSLRequest(1)), StartTLS
     |                              |==== TLS handshake (glue), client cert for user ====|
     |                              |  tls_established() -> SendToServer(HandshakeResponse(2))
     |<====== auth packets, both sequence counters renumbered (see below) =============>|
     |<-- OK(app_next) ------------ |<------------------------ OK(up_next) --|  Relay(...)

API
---

``MySQLHandshake(rsa_key=None, database=None)``
    ``database`` (the dbmtls database name) is set on every error the machine reports.
    ``rsa_key`` is dbmtls's own RSA key for the caching_sha2_password / sha256_password key
    exchange; by default the process-wide :func:`proxy_rsa_key` (2048 bit, generated lazily on first
    use; the glue may call it once at start-up, in a thread, to keep the ~100 ms generation off the
    loop).

The shape is the one every dbmtls machine has (``dbmtls.protocols.events``), with one input per
peer.  Inputs never raise for anything the peers send; problems come out as a ``Fail`` event:

``receive_server_data(data)``
    Bytes from the server: plaintext before TLS, *decrypted* bytes after ``tls_established()``.
    ``b""`` means EOF.
``receive_app_data(data)``
    Bytes from the application; ``b""`` means EOF.
``proceed()``
    Answer to ``NeedUser``: the glue has a client certificate for the user and will do TLS.
``tls_established()``
    The upstream TLS handshake succeeded (call it before feeding any decrypted byte).
``fail(err) -> bytes``
    The glue detected a failure itself (connect error, TLS failure, no certificate for the user,
    timeout).  The machine becomes FAILED and returns the ERR packet to write to the app before
    closing (``b""`` if nothing can usefully be said).  Format by phase
    (docs/protocols/mysql.md#err-format-by-phase): before the greeting reached the app -> seq 0
    without ``#SQLSTATE`` ("3.21 format", libmysql does not know the server is 4.1 yet); once the
    greeting was sent but before the HandshakeResponse was read -> seq 2 with ``#SQLSTATE`` (the
    app will read it right after writing its response, seq 1);
    after the HandshakeResponse -> seq ``app_next`` with ``#SQLSTATE``.

``next_event() -> Event``
    Pop the next event; call it until ``NeedData`` after every input.  Events:

    ``SendToApp(data)`` / ``SendToServer(data)``
        Write these bytes (complete packets) now.
    ``NeedUser(user)``
        The HandshakeResponse was parsed (the identity is known before the TLS handshake:
        docs/protocols/README.md#identity-before-handshake).
        Pick the client certificate for ``user`` and call ``proceed()``, or ``fail(...)``.
        ``handshake.response`` holds the parsed packet (database, plugin, attributes).
    ``StartTLS()``
        Follows ``SendToServer(SSLRequest)``.  Start the TLS handshake on the upstream socket right
        away: the server sends nothing in between, so any plaintext byte read from the server before
        TLS must be passed to ``receive_server_data`` and is reported as injection
        (docs/protocols/README.md#no-over-read).
    ``Relay(to_app, to_server)``
        Authentication succeeded.  ``to_app`` is the final OK packet (renumbered) plus whatever the
        server sent after it; ``to_server`` is whatever the app sent that was not consumed.  Write
        both, then relay bytes verbatim; this object must not be fed any more.
    ``Fail(error, to_app)``
        Give up: write ``to_app`` (an ERR packet, the server's own ERR renumbered, or ``b""``) to
        the app, log ``error``, close both sides.  Later inputs are ignored.

States
------

``GREETING`` (waiting for the server's first packet) -> ``APP_RESPONSE`` (rewritten greeting sent,
waiting for HandshakeResponse41) -> ``NEED_USER`` (waiting for ``proceed``) -> ``TLS`` (waiting for
``tls_established``) -> [``INITIAL_RSA``] -> ``AUTH`` (renumbered relay) -> ``DONE``; any state ->
``FAILED``.  Only ``GREETING`` and ``AUTH`` accept server bytes; in every other state the server is
supposed to be silent, so bytes from it are a protocol error (before TLS: possible injection).  App
bytes that arrive while the machine waits for the glue are kept (bounded) and parsed later.

Greeting rewrite
    ``CLIENT_SSL`` is cleared so that clients in ssl-mode PREFERRED stay in plaintext (REQUIRED
    clients then fail on their side, which is what they should do: TLS to dbmtls is not offered).
    ``CLIENT_COMPRESS`` and ``CLIENT_ZSTD_COMPRESSION_ALGORITHM`` are cleared like MySQL Router does;
    everything else, including the scramble and MariaDB's extended capabilities, stays byte-exact.

Sequence ids (docs/protocols/mysql.md#sequence-ids)
    Two independent counters, ``up_next`` and ``app_next``.  Every relayed auth packet is checked
    against the counter of the side it came from and re-emitted with the counter of the other side.
    A packet answered locally advances only the counter of the side it was exchanged with.

Local RSA key exchange (docs/protocols/mysql.md#local-rsa-key-exchange)
    The app believes it is on plaintext, so for caching_sha2_password full authentication (server
    ``01 04``) and for sha256_password it asks for the server's public key.  That request is never
    forwarded (over TLS the server would take it for a cleartext password).  dbmtls answers with
    ``01 || PEM`` of its own key, decrypts the app's RSA-OAEP(SHA-1) blob, XORs it with the 20-byte
    scramble (from the greeting, or from the latest AuthSwitchRequest) and sends ``pw || 00`` to the
    server inside TLS.  sha256_password asks with ``01``: either as the first reply to an
    AuthSwitchRequest, or as the whole auth response of the HandshakeResponse when the app starts
    with sha256_password.  In that last case the key exchange with the app happens after TLS is up
    and before the HandshakeResponse goes upstream, with the password put in its auth-response
    field (the app reads the key as seq 2, exactly as if the server had sent it).  Apps that use a
    pinned *server* key cannot work through dbmtls: they never ask for a key, so their blob
    (encrypted for the real server's key, against a scramble the server checks over TLS) is relayed
    and the server rejects the login with its own ERR; an app that asks for the key and then
    encrypts with another one fails decryption here, and the machine says so.

Server ERR during authentication
    Relayed (renumbered) to the app as the ``to_app`` of a ``Fail``, not as a ``Relay``: the server
    always closes after an ERR in the connection phase, so nothing is lost, and the glue gets one
    typed outcome ("login rejected") for logs and metrics instead of a relay that never carried data.

Bounds
    Server packets during the handshake must be smaller than 16 MiB (``0xFFFFFF`` would need a
    continuation packet), the HandshakeResponse at most 64 KiB, and at most 64 KiB may pile up from
    a side that should be silent.  Limits are checked on the 4-byte header, before the body is
    buffered.

The command phase is never parsed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from dbmtls.errors import (
    AppClosedEarly,
    AppProtocolError,
    AppTLSError,
    AuthenticationFailed,
    DbmtlsError,
    Reason,
    TLSRefused,
    UpstreamError,
    UpstreamProtocolError,
    sanitize,
)
from dbmtls.protocols.events import NeedData
from dbmtls.protocols.spec import ProtocolSpec
from dbmtls.protocols.tls_record import client_hello

__all__ = [
    "CLIENT_COMPRESS",
    "CLIENT_CONNECT_ATTRS",
    "CLIENT_CONNECT_WITH_DB",
    "CLIENT_MYSQL",
    "CLIENT_PLUGIN_AUTH",
    "CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA",
    "CLIENT_PROTOCOL_41",
    "CLIENT_SECURE_CONNECTION",
    "CLIENT_SSL",
    "CLIENT_ZSTD_COMPRESSION_ALGORITHM",
    "MARIADB",
    "MAX_HANDSHAKE_PACKET",
    "MAX_HANDSHAKE_RESPONSE",
    "MAX_IDLE_BUFFER",
    "SPEC",
    "Event",
    "Fail",
    "Greeting",
    "HandshakeResponse",
    "MySQLHandshake",
    "MySQLState",
    "NeedData",
    "NeedUser",
    "Relay",
    "SendToApp",
    "SendToServer",
    "StartTLS",
    "err_packet",
    "error_code",
    "error_packet",
    "packet",
    "parse_err",
    "parse_greeting",
    "parse_handshake_response",
    "proxy_rsa_key",
]

# --- constants (include/mysql_com.h; docs/protocols/mysql.md#capability-flags) -------------------------------------

CLIENT_MYSQL: Final = 1  # CLIENT_LONG_PASSWORD; a MariaDB server clears it
CLIENT_CONNECT_WITH_DB: Final = 0x8
CLIENT_COMPRESS: Final = 0x20
CLIENT_PROTOCOL_41: Final = 0x200
CLIENT_SSL: Final = 0x800
CLIENT_SECURE_CONNECTION: Final = 0x8000
CLIENT_PLUGIN_AUTH: Final = 1 << 19
CLIENT_CONNECT_ATTRS: Final = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: Final = 1 << 21
CLIENT_ZSTD_COMPRESSION_ALGORITHM: Final = 1 << 26

# Bits cleared in the greeting the app sees.
_CLEARED_FOR_APP: Final = CLIENT_SSL | CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION_ALGORITHM

# A payload of 0xFFFFFF bytes announces a continuation packet: never legitimate in the handshake.
MAX_HANDSHAKE_PACKET: Final = 0xFFFFFE
MAX_HANDSHAKE_RESPONSE: Final = 64 * 1024
# Bytes tolerated from a side that is supposed to be silent (e.g. the app while TLS is set up).
MAX_IDLE_BUFFER: Final = 64 * 1024

_SCRAMBLE_LENGTH: Final = 20
_SSL_REQUEST_LENGTH: Final = 32

_CACHING_SHA2: Final = "caching_sha2_password"
_SHA256: Final = "sha256_password"
_NATIVE: Final = "mysql_native_password"

_PLAINTEXT_HINT: Final = (
    "connect to dbmtls without TLS (ssl-mode=DISABLED or PREFERRED); dbmtls adds verified TLS toward the database"
)


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendToApp:
    """Write ``data`` (one or more complete packets) to the application."""

    data: bytes


@dataclass(frozen=True)
class SendToServer:
    """Write ``data`` to the server (plaintext before ``StartTLS``, through TLS after it)."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake on the upstream socket now, then call ``tls_established()``."""


@dataclass(frozen=True)
class NeedUser:
    """Choose the client certificate for ``user``, then call ``proceed()`` (or ``fail()``)."""

    user: str


@dataclass(frozen=True)
class Relay:
    """Authentication is over: write both leftovers, then relay bytes verbatim."""

    to_app: bytes
    to_server: bytes


@dataclass(frozen=True)
class Fail:
    """Write ``to_app`` (may be empty) to the app, then close both connections."""

    error: DbmtlsError
    to_app: bytes


Event = SendToApp | SendToServer | StartTLS | NeedUser | Relay | Fail | NeedData


# --- packets -----------------------------------------------------------------------------------


def packet(payload: bytes, seq: int) -> bytes:
    """Frame one payload (< 16 MiB): ``u24le length | u8 seq | payload``."""
    return len(payload).to_bytes(3, "little") + bytes([seq & 0xFF]) + payload


def err_packet(errno: int, sqlstate: str, message: str, seq: int, with_state: bool) -> bytes:
    """An ERR packet: ``FF u16le errno ['#' sqlstate] message`` (docs/protocols/mysql.md#err-format-by-phase).

    ``with_state`` must be False before the app has seen the greeting (libmysql would show the
    marker as text).  The message is made single-line printable ASCII here as well.
    """
    if len(sqlstate) != 5 or not sqlstate.isascii() or not sqlstate.isalnum():
        raise ValueError(f"SQLSTATE must be 5 ASCII letters/digits, not {sqlstate!r}")
    if not 0 <= errno <= 0xFFFF:
        raise ValueError(f"MySQL error number out of range: {errno}")
    body = b"\xff" + errno.to_bytes(2, "little")
    if with_state:
        body += b"#" + sqlstate.encode("ascii")
    body += sanitize(message).encode("ascii")
    return packet(body, seq)


def error_packet(err: DbmtlsError, seq: int, with_state: bool) -> bytes:
    """``err`` as an ERR packet: its errno/SQLSTATE, ``wire_text()`` and the hint if it has one."""
    text = err.wire_text()
    hint = err.wire_hint()
    if hint:
        text = f"{text} (hint: {hint})"
    errno, state = error_code(err.reason)
    return err_packet(errno, state, text, seq, with_state)


def parse_err(payload: bytes) -> tuple[int, str | None, str]:
    """An ERR payload -> ``(errno, sqlstate or None, message)``; tolerant, for messages only."""
    errno = int.from_bytes(payload[1:3], "little") if len(payload) >= 3 else 0
    rest = payload[3:]
    state: str | None = None
    if rest[:1] == b"#" and len(rest) >= 6:
        state = sanitize(rest[1:6].decode("ascii", "replace"))
        rest = rest[6:]
    return errno, state, sanitize(rest.decode("utf-8", "replace"), limit=500)


def _lenenc_int(n: int) -> bytes:
    if n < 0xFB:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfc" + n.to_bytes(2, "little")
    if n < 1 << 24:
        return b"\xfd" + n.to_bytes(3, "little")
    return b"\xfe" + n.to_bytes(8, "little")


def _read_lenenc_int(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    """-> ``(value, new_pos)``; raises AppProtocolError (only app packets carry lenenc here)."""
    if pos >= len(buf):
        raise AppProtocolError(f"HandshakeResponse truncated in {what}")
    first = buf[pos]
    if first < 0xFB:
        return first, pos + 1
    width = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if width is None or pos + 1 + width > len(buf):
        raise AppProtocolError(f"HandshakeResponse has a malformed length in {what}")
    return int.from_bytes(buf[pos + 1 : pos + 1 + width], "little"), pos + 1 + width


def _read_lenenc_bytes(buf: bytes, pos: int, what: str) -> tuple[bytes, int]:
    n, pos = _read_lenenc_int(buf, pos, what)
    if pos + n > len(buf):
        raise AppProtocolError(f"HandshakeResponse truncated in {what}")
    return buf[pos : pos + n], pos + n


# --- the greeting (server -> client, seq 0) -----------------------------------------------------


@dataclass(frozen=True)
class Greeting:
    """A parsed Initial Handshake Packet v10.  ``payload`` is exactly what the server sent."""

    payload: bytes
    server_version: str
    connection_id: int
    capabilities: int  # 64 bits: MariaDB's extended capabilities are bits 32..63
    character_set: int
    status_flags: int
    scramble: bytes  # part 1 + part 2 without its NUL terminator (normally 20 bytes)
    auth_plugin: str
    caps_offset: int  # where capability_flags_1 starts; capability_flags_2 is at +5

    def for_app(self) -> bytes:
        """The payload with CLIENT_SSL, CLIENT_COMPRESS and CLIENT_ZSTD cleared; same length."""
        out = bytearray(self.payload)
        low = int.from_bytes(out[self.caps_offset : self.caps_offset + 2], "little") & ~_CLEARED_FOR_APP
        high = int.from_bytes(out[self.caps_offset + 5 : self.caps_offset + 7], "little") & ~(_CLEARED_FOR_APP >> 16)
        out[self.caps_offset : self.caps_offset + 2] = (low & 0xFFFF).to_bytes(2, "little")
        out[self.caps_offset + 5 : self.caps_offset + 7] = (high & 0xFFFF).to_bytes(2, "little")
        return bytes(out)


def parse_greeting(payload: bytes) -> Greeting:
    """Parse a v10 greeting; raises UpstreamProtocolError (not TLSRefused: that is the caller's call)."""
    if not payload:
        raise UpstreamProtocolError("the server sent an empty greeting")
    if payload[0] != 0x0A:
        raise UpstreamProtocolError(
            f"the server greeting has protocol version {payload[0]}, expected 10 (is this a MySQL server?)"
        )
    nul = payload.find(b"\x00", 1)
    if nul < 0:
        raise UpstreamProtocolError("the server greeting is truncated (server version)")
    version = sanitize(payload[1:nul].decode("utf-8", "replace"), limit=200)
    pos = nul + 1
    # u32 connection id, 8 bytes scramble, filler, u16 caps, u8 charset, u16 status, u16 caps,
    # u8 auth data length, 10 reserved bytes.  The tail is optional for pre-4.1 servers only, and a
    # server that offers TLS is never one of them, so it is required here.
    if len(payload) < pos + 31:
        raise UpstreamProtocolError("the server greeting is truncated (capabilities)")
    connection_id = int.from_bytes(payload[pos : pos + 4], "little")
    part1 = payload[pos + 4 : pos + 12]
    caps_offset = pos + 13
    caps = int.from_bytes(payload[caps_offset : caps_offset + 2], "little")
    charset = payload[caps_offset + 2]
    status = int.from_bytes(payload[caps_offset + 3 : caps_offset + 5], "little")
    caps |= int.from_bytes(payload[caps_offset + 5 : caps_offset + 7], "little") << 16
    auth_len = payload[caps_offset + 7]
    reserved = payload[caps_offset + 8 : caps_offset + 18]
    pos = caps_offset + 18
    if not caps & CLIENT_MYSQL:
        caps |= int.from_bytes(reserved[6:10], "little") << 32
    scramble = part1
    if caps & CLIENT_SECURE_CONNECTION:
        n = max(13, auth_len - 8)
        if len(payload) < pos + n:
            raise UpstreamProtocolError("the server greeting is truncated (scramble)")
        part2 = payload[pos : pos + n]
        pos += n
        scramble = part1 + (part2[:-1] if part2.endswith(b"\x00") else part2)
    plugin = ""
    if caps & CLIENT_PLUGIN_AUTH:
        rest = payload[pos:]
        end = rest.find(b"\x00")
        # MySQL 5.5.7..5.5.9 forgot the terminator: take the rest then.
        plugin = sanitize(rest[: end if end >= 0 else len(rest)].decode("utf-8", "replace"), limit=100)
    return Greeting(
        payload=payload,
        server_version=version,
        connection_id=connection_id,
        capabilities=caps,
        character_set=charset,
        status_flags=status,
        scramble=scramble,
        auth_plugin=plugin,
        caps_offset=caps_offset,
    )


# --- the HandshakeResponse41 (client -> server, seq 1) -------------------------------------------


@dataclass(frozen=True)
class HandshakeResponse:
    """A parsed HandshakeResponse41.  ``payload`` is exactly what the app sent."""

    payload: bytes
    capabilities: int  # client_flag (32 bits)
    mariadb_capabilities: int  # u32 at offset 28 (MariaDB extended client caps; 0 for MySQL)
    max_packet_size: int
    character_set: int
    user: str
    auth_response: bytes
    database: str | None
    auth_plugin: str | None  # None when the client did not set CLIENT_PLUGIN_AUTH
    attributes: dict[str, str]
    auth_span: tuple[int, int]  # the encoded auth-response field (length prefix/terminator included)

    def with_ssl(self) -> bytes:
        """The payload with CLIENT_SSL set in client_flag (what goes upstream as seq 2)."""
        flags = (self.capabilities | CLIENT_SSL).to_bytes(4, "little")
        return flags + self.payload[4:]

    def ssl_request(self) -> bytes:
        """The SSLRequest payload: the first 32 bytes with CLIENT_SSL set."""
        return self.with_ssl()[:_SSL_REQUEST_LENGTH]

    def with_auth_response(self, data: bytes) -> HandshakeResponse:
        """A copy whose auth response is ``data``, encoded the way the app's flags say."""
        flags = self.capabilities
        if flags & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            encoded = _lenenc_int(len(data)) + data
        elif flags & CLIENT_SECURE_CONNECTION:
            if len(data) > 0xFF:
                raise AppProtocolError("the password is too long for this client's auth-response encoding")
            encoded = bytes([len(data)]) + data
        else:
            if b"\x00" in data[:-1]:
                raise AppProtocolError("the password contains a NUL byte")
            encoded = data if data.endswith(b"\x00") else data + b"\x00"
        start, end = self.auth_span
        stored = data if flags & (CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | CLIENT_SECURE_CONNECTION) else encoded[:-1]
        return dataclasses.replace(
            self,
            payload=self.payload[:start] + encoded + self.payload[end:],
            auth_response=stored,
            auth_span=(start, start + len(encoded)),
        )


def _cstr(payload: bytes, pos: int, what: str, *, to_end_ok: bool = False) -> tuple[bytes, int]:
    end = payload.find(b"\x00", pos)
    if end < 0:
        if to_end_ok:
            return payload[pos:], len(payload)
        raise AppProtocolError(f"HandshakeResponse truncated in {what}")
    return payload[pos:end], end + 1


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AppProtocolError(f"the {what} in the HandshakeResponse is not valid UTF-8") from None


def parse_handshake_response(payload: bytes) -> HandshakeResponse:
    """Parse a HandshakeResponse41; raises AppProtocolError."""
    if len(payload) < 4:
        raise AppProtocolError("the HandshakeResponse is truncated")
    flags = int.from_bytes(payload[0:4], "little")
    if not flags & CLIENT_PROTOCOL_41:
        raise AppProtocolError("the application uses the pre-4.1 client protocol (no CLIENT_PROTOCOL_41)")
    if len(payload) < _SSL_REQUEST_LENGTH + 1:
        raise AppProtocolError("the HandshakeResponse is truncated (no user name)")
    max_packet = int.from_bytes(payload[4:8], "little")
    charset = payload[8]
    mariadb_caps = int.from_bytes(payload[28:32], "little")
    user_raw, pos = _cstr(payload, _SSL_REQUEST_LENGTH, "the user name")
    user = _text(user_raw, "user name")

    auth_start = pos
    auth, pos = _auth_response(payload, pos, flags)
    auth_span = (auth_start, pos)

    # The optional tail is parsed leniently where the server is lenient too: a field announced by a
    # flag may be missing at the very end of the packet.
    database: str | None = None
    if flags & CLIENT_CONNECT_WITH_DB and pos < len(payload):
        raw, pos = _cstr(payload, pos, "the database name", to_end_ok=True)
        database = _text(raw, "database name")
    plugin: str | None = None
    if flags & CLIENT_PLUGIN_AUTH:
        plugin = _NATIVE
        if pos < len(payload):
            raw, pos = _cstr(payload, pos, "the auth plugin name", to_end_ok=True)
            plugin = sanitize(raw.decode("utf-8", "replace"), limit=100) or _NATIVE
    attributes: dict[str, str] = {}
    if flags & CLIENT_CONNECT_ATTRS and pos < len(payload):
        attributes = _connect_attributes(payload, pos)
    return HandshakeResponse(
        payload=payload,
        capabilities=flags,
        mariadb_capabilities=mariadb_caps,
        max_packet_size=max_packet,
        character_set=charset,
        user=user,
        auth_response=auth,
        database=database,
        auth_plugin=plugin,
        attributes=attributes,
        auth_span=auth_span,
    )


def _auth_response(payload: bytes, pos: int, flags: int) -> tuple[bytes, int]:
    """The auth response at ``pos``, in whichever of its three encodings ``flags`` announce."""
    if flags & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        return _read_lenenc_bytes(payload, pos, "the auth response")
    if flags & CLIENT_SECURE_CONNECTION:
        if pos >= len(payload) or pos + 1 + payload[pos] > len(payload):
            raise AppProtocolError("HandshakeResponse truncated in the auth response")
        n = payload[pos]
        return payload[pos + 1 : pos + 1 + n], pos + 1 + n
    return _cstr(payload, pos, "the auth response", to_end_ok=True)


def _connect_attributes(payload: bytes, pos: int) -> dict[str, str]:
    """The length-prefixed block of key/value connection attributes at ``pos``."""
    total, pos = _read_lenenc_int(payload, pos, "the connection attributes")
    end = pos + total
    if end > len(payload):
        raise AppProtocolError("HandshakeResponse truncated in the connection attributes")
    block = payload[:end]
    attributes: dict[str, str] = {}
    while pos < end:
        key, pos = _read_lenenc_bytes(block, pos, "a connection attribute")
        value, pos = _read_lenenc_bytes(block, pos, "a connection attribute")
        attributes[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return attributes


# --- dbmtls's RSA key ------------------------------------------------------------------------
# cryptography's RSA is imported by the functions that use it: only a MySQL app that asks for the
# public key needs it, and the registry imports this module in every process (docs/memory.md).

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa


@functools.cache
def proxy_rsa_key() -> rsa.RSAPrivateKey:
    """The process-wide key for the local public-key exchange (2048 bit, made on first use)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def _public_pem(key: rsa.RSAPrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _xor(data: bytes, scramble: bytes) -> bytes:
    if not scramble:
        return data
    n = len(scramble)
    return bytes(b ^ scramble[i % n] for i, b in enumerate(data))


# --- the machine -------------------------------------------------------------------------------


class MySQLState(enum.Enum):
    GREETING = enum.auto()
    APP_RESPONSE = enum.auto()
    NEED_USER = enum.auto()
    TLS = enum.auto()
    INITIAL_RSA = enum.auto()
    AUTH = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


class MySQLHandshake:
    """The MySQL/MariaDB connection phase between a plaintext app and a TLS server (see module doc)."""

    def __init__(self, *, rsa_key: rsa.RSAPrivateKey | None = None, database: str | None = None) -> None:
        self._rsa_key = rsa_key
        # The dbmtls database name, put into the errors the machine makes (``[name]`` in the text).
        self._database = database
        self._state = MySQLState.GREETING
        self._events: deque[Event] = deque()
        self._server_buf = bytearray()
        self._app_buf = bytearray()
        self._up_next = 0
        self._app_next = 0
        self._greeting_sent = False
        self.greeting: Greeting | None = None
        self.response: HandshakeResponse | None = None
        # The auth plugin in use and its nonce; both change with every AuthSwitchRequest.
        self.plugin = ""
        self._scramble = b""
        # The exact app packet that means "send me the public key" right now (b"\x02" after a
        # caching_sha2 "01 04", b"\x01" after a switch to sha256_password), else None.
        self._key_request: bytes | None = None
        # We sent our key; the next app packet is the RSA-encrypted password.
        self._await_rsa = False

    # --- observation ---

    @property
    def state(self) -> MySQLState:
        return self._state

    @property
    def buffered(self) -> int:
        """Bytes held in the machine's buffers (both sides); bounded, see the module doc."""
        return len(self._server_buf) + len(self._app_buf)

    def next_event(self) -> Event:
        return self._events.popleft() if self._events else NeedData()

    # --- inputs ---

    def receive_server_data(self, data: bytes) -> None:
        if self._state is MySQLState.DONE:
            raise RuntimeError("the handshake is over: relay server bytes directly")
        if self._state is MySQLState.FAILED:
            return
        try:
            self._on_server_data(data)
        except DbmtlsError as err:
            self._fail(err)

    def receive_app_data(self, data: bytes) -> None:
        if self._state is MySQLState.DONE:
            raise RuntimeError("the handshake is over: relay app bytes directly")
        if self._state is MySQLState.FAILED:
            return
        try:
            self._on_app_data(data)
        except DbmtlsError as err:
            self._fail(err)

    def proceed(self) -> None:
        if self._state is MySQLState.FAILED:
            return
        if self._state is not MySQLState.NEED_USER or self.response is None:
            raise RuntimeError(f"proceed() is only valid after NeedUser (state {self._state.name})")
        self._up_next = 1
        self._to_server(self.response.ssl_request())
        self._events.append(StartTLS())
        self._state = MySQLState.TLS

    def tls_established(self) -> None:
        if self._state is MySQLState.FAILED:
            return
        if self._state is not MySQLState.TLS or self.response is None:
            raise RuntimeError(f"tls_established() is only valid after StartTLS (state {self._state.name})")
        try:
            if self.plugin == _SHA256 and self.response.auth_response == b"\x01":
                # The app started with sha256_password and asked for the key in its
                # HandshakeResponse: answer as the server would (seq 2), and send the
                # HandshakeResponse upstream once the encrypted password is in.
                self._send_public_key()
                self._state = MySQLState.INITIAL_RSA
            else:
                self._send_response_upstream(self.response)
            self._pump_app()
            self._check_idle_buffers()
        except DbmtlsError as err:
            self._fail(err)

    def fail(self, err: DbmtlsError) -> bytes:
        if self._state in (MySQLState.DONE, MySQLState.FAILED):
            return b""
        self._state = MySQLState.FAILED
        return self._err_for_app(self._named(err))

    # --- internals ---

    def _named(self, err: DbmtlsError) -> DbmtlsError:
        return err.with_database(self._database) if self._database is not None else err

    def _fail(self, err: DbmtlsError, to_app: bytes | None = None) -> None:
        err = self._named(err)
        self._state = MySQLState.FAILED
        self._server_buf.clear()
        self._app_buf.clear()
        if to_app is None:
            # a TLS client cannot parse an ERR packet: it gets the close, the log says why
            to_app = b"" if isinstance(err, AppTLSError) else self._err_for_app(err)
        self._events.append(Fail(err, to_app))

    def _err_for_app(self, err: DbmtlsError) -> bytes:
        if not self._greeting_sent:
            return error_packet(err, 0, with_state=False)
        if self.response is None:
            return error_packet(err, 2, with_state=True)
        return error_packet(err, self._app_next, with_state=True)

    def _to_server(self, payload: bytes) -> None:
        self._events.append(SendToServer(packet(payload, self._up_next)))
        self._up_next = (self._up_next + 1) & 0xFF

    def _to_app(self, payload: bytes) -> None:
        self._events.append(SendToApp(packet(payload, self._app_next)))
        self._app_next = (self._app_next + 1) & 0xFF

    @staticmethod
    def _next_packet(
        buf: bytearray, limit: int, error: type[AppProtocolError] | type[UpstreamProtocolError], who: str
    ) -> tuple[int, bytes] | None:
        if len(buf) < 4:
            return None
        n = int.from_bytes(buf[0:3], "little")
        if n > limit:
            raise error(f"{who} sent a {n}-byte packet during the handshake (limit {limit} bytes)")
        if len(buf) < 4 + n:
            return None
        seq = buf[3]
        payload = bytes(buf[4 : 4 + n])
        del buf[: 4 + n]
        return seq, payload

    def _check_idle_buffers(self) -> None:
        # A side that should be silent may not pile up more than MAX_IDLE_BUFFER bytes; a side being
        # parsed holds at most one incomplete packet whose header was checked already.
        if (
            self._state in (MySQLState.GREETING, MySQLState.NEED_USER, MySQLState.TLS)
            and len(self._app_buf) > MAX_IDLE_BUFFER
        ):
            raise AppProtocolError(
                f"the application sent more than {MAX_IDLE_BUFFER} bytes without waiting for the server"
            )

    def _on_server_data(self, data: bytes) -> None:
        state = self._state
        if not data:
            where = {
                MySQLState.GREETING: "before sending its greeting",
                MySQLState.INITIAL_RSA: "during the TLS setup",
                MySQLState.TLS: "during the TLS setup",
            }.get(state, "during authentication")
            raise UpstreamProtocolError(f"the server closed the connection {where}")
        if state is MySQLState.GREETING:
            self._server_buf += data
            self._on_greeting()
        elif state is MySQLState.AUTH:
            self._server_buf += data
            self._pump_server()
        elif state in (MySQLState.APP_RESPONSE, MySQLState.NEED_USER, MySQLState.TLS):
            raise UpstreamProtocolError(
                f"the server sent {len(data)} unexpected plaintext bytes before the TLS handshake "
                "(possible injection by a man in the middle); closing"
            )
        else:
            raise UpstreamProtocolError(f"the server sent {len(data)} unexpected bytes before the HandshakeResponse")

    def _on_greeting(self) -> None:
        pkt = self._next_packet(self._server_buf, MAX_HANDSHAKE_PACKET, UpstreamProtocolError, "the server")
        if pkt is None:
            return
        seq, payload = pkt
        if payload[:1] == b"\xff":
            # e.g. "Host is blocked" / "Too many connections": the server's words, verbatim.
            errno, _, message = parse_err(payload)
            self._fail(
                UpstreamError(f"the server refused the connection: ERR {errno}: {message}"), packet(payload, seq)
            )
            return
        if seq != 0:
            raise UpstreamProtocolError(f"the server greeting has sequence id {seq}, expected 0")
        greeting = parse_greeting(payload)
        if not greeting.capabilities & CLIENT_SSL:
            raise TLSRefused("server does not offer TLS (CLIENT_SSL)")
        if not greeting.capabilities & CLIENT_PROTOCOL_41:
            raise UpstreamProtocolError("the server does not speak the 4.1 protocol (CLIENT_PROTOCOL_41)")
        if self._server_buf:
            # The server speaks once and waits; anything more is unauthenticated plaintext
            # (docs/protocols/README.md#no-over-read).
            raise UpstreamProtocolError(
                f"the server sent {len(self._server_buf)} unexpected bytes after its greeting; closing"
            )
        self.greeting = greeting
        self.plugin = greeting.auth_plugin or _NATIVE
        self._scramble = greeting.scramble[:_SCRAMBLE_LENGTH]
        self._app_next = 0
        self._to_app(greeting.for_app())
        self._greeting_sent = True
        self._state = MySQLState.APP_RESPONSE
        self._on_app_response()

    def _on_app_data(self, data: bytes) -> None:
        if not data:
            # Nobody is left to read an ERR packet.
            if self._state is MySQLState.APP_RESPONSE and not self._app_buf:
                err = AppClosedEarly(
                    "the application closed the connection after the greeting "
                    "(does it require TLS, e.g. ssl-mode=REQUIRED?)",
                    hint=_PLAINTEXT_HINT,
                )
            else:
                err = AppClosedEarly("the application closed the connection during the login")
            self._fail(err, b"")
            return
        self._app_buf += data
        if self._state is MySQLState.APP_RESPONSE:
            self._on_app_response()
        elif self._state in (MySQLState.AUTH, MySQLState.INITIAL_RSA):
            self._pump_app()
        self._check_idle_buffers()

    def _on_app_response(self) -> None:
        buf = self._app_buf
        if client_hello(buf):
            raise AppTLSError(
                "the application started a TLS handshake, but dbmtls speaks plaintext MySQL on this port",
                hint=_PLAINTEXT_HINT,
            )
        pkt = self._next_packet(buf, MAX_HANDSHAKE_RESPONSE, AppProtocolError, "the application")
        if pkt is None:
            return
        seq, payload = pkt
        if seq != 1:
            raise AppProtocolError(f"the HandshakeResponse has sequence id {seq}, expected 1")
        if len(payload) >= 4 and int.from_bytes(payload[0:4], "little") & CLIENT_SSL:
            # We cleared CLIENT_SSL in the greeting; a client that asks anyway wants TLS to *us*.
            raise AppProtocolError(
                "the application asked for TLS (SSLRequest), but dbmtls speaks plaintext to the application",
                hint=_PLAINTEXT_HINT,
            )
        response = parse_handshake_response(payload)
        self.response = response
        self._app_next = 2
        # Without CLIENT_PLUGIN_AUTH the client speaks mysql_native_password.
        self.plugin = response.auth_plugin or _NATIVE
        self._state = MySQLState.NEED_USER
        self._events.append(NeedUser(response.user))

    def _send_response_upstream(self, response: HandshakeResponse) -> None:
        self._up_next = 2
        self._to_server(response.with_ssl())
        self._state = MySQLState.AUTH

    def _send_public_key(self) -> None:
        self._to_app(b"\x01" + _public_pem(self._rsa_key or proxy_rsa_key()))
        self._await_rsa = True

    def _decrypt_password(self, blob: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        key = self._rsa_key or proxy_rsa_key()
        try:
            plain = key.decrypt(
                blob,
                # SHA-1 is fixed by the protocol (libmysql uses OpenSSL's RSA_PKCS1_OAEP_PADDING).
                padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None),  # noqa: S303
            )
        except ValueError:
            raise AppProtocolError(
                f"could not decrypt the password the application sent with {self.plugin}: it must encrypt with the "
                "public key dbmtls sends (allow public key retrieval, e.g. get-server-public-key / "
                "allowPublicKeyRetrieval=true) and must not use a pinned server key"
            ) from None
        password = _xor(plain, self._scramble)
        end = password.find(b"\x00")
        return (password[:end] if end >= 0 else password) + b"\x00"

    def _pump_app(self) -> None:
        while self._state in (MySQLState.AUTH, MySQLState.INITIAL_RSA):
            pkt = self._next_packet(self._app_buf, MAX_HANDSHAKE_PACKET, AppProtocolError, "the application")
            if pkt is None:
                return
            seq, payload = pkt
            if seq == 1 and self.response is not None and payload[:4] == self.response.payload[:4]:
                # a client library retrying its login on the same connection
                raise AppProtocolError("the application sent a second HandshakeResponse on one connection")
            if seq != self._app_next:
                raise AppProtocolError(
                    f"the application sent an authentication packet out of order "
                    f"(sequence id {seq}, expected {self._app_next})"
                )
            self._app_next = (self._app_next + 1) & 0xFF
            if self._await_rsa:
                self._await_rsa = False
                password = self._decrypt_password(payload)
                if self._state is MySQLState.INITIAL_RSA:
                    assert self.response is not None
                    self._send_response_upstream(self.response.with_auth_response(password))
                else:
                    self._to_server(password)
                continue
            key_request, self._key_request = self._key_request, None
            if key_request is not None and payload == key_request:
                # Never forward: over TLS the server would take it for a (wrong) cleartext password.
                self._send_public_key()
                continue
            self._to_server(payload)

    def _pump_server(self) -> None:
        while self._state is MySQLState.AUTH:
            pkt = self._next_packet(self._server_buf, MAX_HANDSHAKE_PACKET, UpstreamProtocolError, "the server")
            if pkt is None:
                return
            seq, payload = pkt
            if seq != self._up_next:
                raise UpstreamProtocolError(
                    f"the server sent an authentication packet out of order "
                    f"(sequence id {seq}, expected {self._up_next})"
                )
            self._up_next = (self._up_next + 1) & 0xFF
            kind = payload[0] if payload else None
            if kind == 0x00:
                to_app = packet(payload, self._app_next) + bytes(self._server_buf)
                self._app_next = (self._app_next + 1) & 0xFF
                to_server = bytes(self._app_buf)
                self._server_buf.clear()
                self._app_buf.clear()
                self._state = MySQLState.DONE
                self._events.append(Relay(to_app=to_app, to_server=to_server))
                return
            if kind == 0xFF:
                errno, sqlstate, message = parse_err(payload)
                err = AuthenticationFailed(f"the server rejected the login: ERR {errno} ({sqlstate or '-'}): {message}")
                self._fail(err, packet(payload, self._app_next))
                return
            if kind == 0xFE:
                self._on_auth_switch(payload)
            elif payload == b"\x01\x04" and self.plugin == _CACHING_SHA2:
                # "perform full authentication": the app answers with 02 (key request) or pw\0.
                self._key_request = b"\x02"
            self._to_app(payload)

    def _on_auth_switch(self, payload: bytes) -> None:
        self._await_rsa = False
        if len(payload) == 1:
            # The pre-4.1 "use the old password" request: mysql_old_password with the first 8 bytes.
            self.plugin = "mysql_old_password"
            self._key_request = None
            return
        end = payload.find(b"\x00", 1)
        name = payload[1:end] if end >= 0 else payload[1:]
        data = payload[end + 1 :] if end >= 0 else b""
        self.plugin = sanitize(name.decode("utf-8", "replace"), limit=100)
        if data.endswith(b"\x00"):
            data = data[:-1]
        if data:
            self._scramble = data[:_SCRAMBLE_LENGTH]
        self._key_request = b"\x01" if self.plugin == _SHA256 else None


# --- errors toward the app (docs/protocols/mysql.md#errors) ------------------------------------

ER_HANDSHAKE_ERROR: Final = (1043, "08S01")
ER_ACCESS_DENIED_ERROR: Final = (1045, "28000")
ER_CON_COUNT_ERROR: Final = (1040, "08004")  # "Too many connections"
_ERROR_CODES: Final[dict[Reason, tuple[int, str]]] = {
    Reason.NO_CERTIFICATE_FOR_USER: ER_ACCESS_DENIED_ERROR,
    Reason.CLIENT_CERT_REJECTED: ER_ACCESS_DENIED_ERROR,
    Reason.TOO_MANY_CONNECTIONS: ER_CON_COUNT_ERROR,
}


def error_code(reason: Reason) -> tuple[int, str]:
    """(errno, SQLSTATE) for a failure reason."""
    return _ERROR_CODES.get(reason, ER_HANDSHAKE_ERROR)


def _wire_code(reason: Reason) -> str:
    errno, state = error_code(reason)
    return f"{errno} ({state})"


SPEC = ProtocolSpec(
    name="mysql",
    title="MySQL",
    session="dbmtls.proxy.sessions.mysql:MySQLSession",
    wire_code=_wire_code,
    upgrade="`CLIENT_SSL` capability + SSLRequest packet, mid-handshake",
    plaintext_hint=_PLAINTEXT_HINT,
    errors="`ERR` packet in the format the app expects at that point of the connection phase",
    default_port=3306,
    well_known_ports=(3306,),
    user_before_tls=True,
)
# MariaDB's connection phase is MySQL's (plus extended capabilities, kept byte-exact).
MARIADB = dataclasses.replace(SPEC, name="mariadb", title="MariaDB", well_known_ports=())
