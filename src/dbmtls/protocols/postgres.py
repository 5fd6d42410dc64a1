"""PostgreSQL / CockroachDB (pgwire v3) startup handshake, sans-IO.

Theory of operation
===================

dbmtls sits between an application that speaks *plaintext* pgwire to
localhost and a server that must be reached over *verified mutual TLS*.  It
therefore plays two roles at once, and this module holds one small state
machine per role.  None touches a socket: callers feed bytes in with
``receive_data`` and read typed events back out with ``next_event`` (the
shape of h11 and wsproto, see ``dbmtls.protocols.events``).  Everything here can be tested with bytes
alone and fuzzed; the asyncio glue only moves bytes and acts on events.

Roles and conversations (docs/protocols/postgres.md)::

    app                         dbmtls                          server
     |-- SSLRequest ------------>|                                |
     |<-------------------- 'N' -|  (AppHandshake: Reply(b"N"))   |
     |-- [GSSENCRequest] ------->|                                |
     |<-------------------- 'N' -|                                |
     |-- StartupMessage -------->|  (Startup: user picks the cert)|
     |                           |-- SSLRequest ----------------->|
     |                           |<------------------------ 'S' --|  (UpstreamNegotiation)
     |                           |== TLS handshake, client cert ==|
     |                           |-- StartupMessage (verbatim) -->|
     |<========= relay (BackendScanner watches for 'K' and 'Z') ==|

``AppHandshake`` -- dbmtls as the *server* toward the app (docs/protocols/postgres.md#app-side).
  States: READING (at most one SSLRequest and one GSSENCRequest, each answered
  with ``Reply(b"N")``, in either order) -> STARTED (a StartupMessage was
  parsed; later bytes pile up in ``trailing_data``) or CANCEL (a
  CancelRequest was parsed; nothing else may follow) or ERROR (an
  ``AppProtocolError`` was raised; every later ``next_event`` raises it again)
  or CLOSED (clean EOF between packets -> ``AppClosed``).  ``NeedData`` means
  "feed me more"; the number of events per connection is bounded (two
  replies + one terminal event), so a driver loop always ends.

  Why answer 'N': the app believes it talks to a plaintext server, exactly
  like PgBouncer with client TLS disabled.  Because the app side never
  switches to TLS, bytes pipelined after an SSLRequest are legitimately the
  next packet, so we keep parsing them (docs/protocols/README.md#no-over-read applies to
  the *upstream* switch, and to the app side only if dbmtls ever terminated
  app TLS itself -- CVE-2021-23214).

  Why parse the StartupMessage before going upstream: docs/protocols/README.md#identity-before-handshake -- the client
  certificate is chosen per user, so ``user`` must be known before the
  upstream TLS handshake.  ``Startup.raw`` keeps the exact bytes because the
  server must see precisely what the app sent: libpq 19 "greases" with
  protocol 3.9999 and unknown ``_pq_.`` options and expects the server's
  NegotiateProtocolVersion, which we merely relay (docs/protocols/postgres.md#startup-packets).

``UpstreamNegotiation`` -- dbmtls as the *client* toward the server, after it wrote
  ``SSL_REQUEST`` (docs/protocols/postgres.md#upstream-upgrade).  The verdict is decided
  from the first byte: exactly ``b"S"`` -> ``TLSAccepted``.  Anything buffered beyond that single byte was
  sent in plaintext *before* the TLS handshake and therefore cannot be
  authenticated by it: a man in the middle can inject it (CVE-2021-23222).
  The glue should read exactly one byte, then pass any leftover bytes it may
  find (before or after the TLS handshake) to ``receive_data`` and ask for
  ``next_event()`` again -- it raises if the buffer holds more than the ``S``.

``FirstReply`` -- the server's first answer to the StartupMessage, up to its first
  Authentication or ErrorResponse, with SCRAM-SHA-256-PLUS removed from the offer.

``BackendScanner`` -- watches the server->app stream while it is relayed
  during startup, to learn BackendKeyData (cancel routing,
  docs/protocols/postgres.md#backendkeydata-tracking), a login the server rejected, and
  the first ReadyForQuery (startup is over, relaying can go to its fast path).
  It never keeps a whole message: bodies are skipped by counting, only
  the 5-byte header and at most 264 bytes of a 'K' are buffered.

Error mapping: every app-side violation raises ``AppProtocolError``
(SQLSTATE 08P01); upstream violations raise ``UpstreamProtocolError`` or
``TLSRefused``.  ``error_response`` renders any ``DbmtlsError`` as a pgwire
ErrorResponse.  libpq displays one once it waits for the answer to its startup
packet; the session sends it for every failure except an app that speaks TLS
to us, which can only be closed (docs/protocols/postgres.md#when-an-errorresponse-can-be-shown).
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from dbmtls.errors import (
    AppClosedEarly,
    AppProtocolError,
    AppTLSError,
    DbmtlsError,
    Reason,
    TLSRefused,
    UpstreamProtocolError,
    sanitize,
)
from dbmtls.protocols.events import NeedData
from dbmtls.protocols.spec import ProtocolSpec
from dbmtls.protocols.tls_record import client_hello

__all__ = [
    "CANCEL_REQUEST_CODE",
    "COCKROACHDB",
    "GSSENC_REQUEST",
    "GSSENC_REQUEST_CODE",
    "MAX_CANCEL_KEY",
    "MAX_STARTUP",
    "MIN_CANCEL_KEY",
    "SPEC",
    "SSL_REQUEST",
    "SSL_REQUEST_CODE",
    "AppClosed",
    "AppEvent",
    "AppHandshake",
    "BackendKey",
    "BackendScanner",
    "CancelRequest",
    "FirstReply",
    "FirstReplyDone",
    "LoginRejected",
    "NeedData",
    "Reply",
    "Startup",
    "StartupDone",
    "TLSAccepted",
    "UpstreamNegotiation",
    "error_response",
    "sqlstate",
    "strip_scram_plus",
]

# --- constants (pqcomm.h; docs/protocols/postgres.md#startup-packets) --------------------------------------------

SSL_REQUEST_CODE: Final = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE: Final = 80877104  # 1234 << 16 | 5680
CANCEL_REQUEST_CODE: Final = 80877102  # 1234 << 16 | 5678
_SPECIAL_MAJOR: Final = 1234

SSL_REQUEST: Final = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC_REQUEST: Final = b"\x00\x00\x00\x08\x04\xd2\x16\x30"

# The server's MAX_STARTUP_PACKET_LENGTH: anything longer is not a startup packet.
MAX_STARTUP: Final = 10000
# Protocol 3.2 (PostgreSQL 18) made the cancel key 4..256 bytes; 3.0 always used 4.
MIN_CANCEL_KEY: Final = 4
MAX_CANCEL_KEY: Final = 256


_DIRECT_TLS_HINT: Final = (
    "connect to dbmtls in plaintext: use sslmode=disable or sslmode=prefer and do not set sslnegotiation=direct; "
    "dbmtls itself adds verified TLS toward the database"
)


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Startup:
    """The app's StartupMessage.  ``raw`` is sent upstream verbatim (after TLS is up)."""

    raw: bytes
    version: tuple[int, int]
    params: dict[str, str]

    @property
    def user(self) -> str:
        return self.params["user"]

    @property
    def database(self) -> str:
        # The server defaults an absent *or empty* database to the user name.
        return self.params.get("database") or self.user


@dataclass(frozen=True)
class CancelRequest:
    """A CancelRequest.  ``raw`` (16 bytes for 3.0, 12+N for 3.2) is sent upstream verbatim inside TLS."""

    raw: bytes
    pid: int
    key: bytes


@dataclass(frozen=True)
class Reply:
    """Bytes to write to the app now (``b"N"`` for an SSLRequest or GSSENCRequest)."""

    data: bytes


@dataclass(frozen=True)
class AppClosed:
    """The app closed the connection cleanly between packets (e.g. sslmode=require after 'N')."""


AppEvent = Startup | CancelRequest | Reply | NeedData | AppClosed


# --- the app side: dbmtls as server (docs/protocols/postgres.md) --------------------------


class AppState(enum.Enum):
    READING = enum.auto()  # SSLRequest / GSSENCRequest answered, waiting for the startup packet
    STARTED = enum.auto()  # a StartupMessage was parsed; later bytes are trailing data
    CANCEL = enum.auto()  # a CancelRequest was parsed; nothing else may follow
    CLOSED = enum.auto()  # the app closed cleanly between packets
    ERROR = enum.auto()  # an AppProtocolError was raised; it is raised again on every call


class AppHandshake:
    """Proxy as the SERVER toward the app (docs/protocols/postgres.md#app-side).

    Drive it like h11: ``receive_data(chunk)`` then call ``next_event()`` until it returns
    ``NeedData`` (write every ``Reply.data``), a ``Startup``/``CancelRequest`` (go upstream), or
    ``AppClosed``.  Raises ``AppProtocolError`` on anything that is not a startup-family packet.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._ssl_requests = 0
        self._gss_requests = 0
        self._state = AppState.READING
        self._error: AppProtocolError | AppClosedEarly | None = None

    @property
    def state(self) -> AppState:
        return self._state

    @property
    def refused_ssl(self) -> bool:
        """An SSLRequest was answered 'N' (an app that then hangs up wanted TLS to us)."""
        return self._ssl_requests > 0

    @property
    def trailing_data(self) -> bytes:
        """Bytes the app sent after its StartupMessage (forward them once upstream TLS is up).

        Only meaningful after ``next_event`` returned ``Startup``.  Keeps growing if more data is
        fed afterwards: the glue should stop reading from the app until upstream TLS is up.
        """
        return bytes(self._buf) if self._state is AppState.STARTED else b""

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the app; ``b""`` means the app closed its side (EOF)."""
        if self._eof:
            if data:
                raise RuntimeError("received data after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> AppEvent:
        if self._state is AppState.ERROR:
            assert self._error is not None
            raise self._error
        try:
            return self._next_event()
        except (AppProtocolError, AppClosedEarly) as err:
            self._state = AppState.ERROR
            self._error = err
            raise

    def _next_event(self) -> AppEvent:
        if self._state is not AppState.READING:
            return self._after_handshake()
        if not self._buf:
            if self._eof:
                self._state = AppState.CLOSED
                return AppClosed()
            return NeedData()
        packet = self._next_packet()
        if packet is None:
            return self._need_more()
        code = int.from_bytes(packet[4:8], "big")
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            return self._encryption_request(code, len(packet))
        if code == CANCEL_REQUEST_CODE:
            return self._cancel_request(packet)
        return self._startup(packet, code)

    def _after_handshake(self) -> AppEvent:
        if self._state is AppState.STARTED:
            # Handshake over: everything further is trailing data for the glue to forward.
            return AppClosed() if self._eof else NeedData()
        if self._state is AppState.CANCEL:
            # A cancel connection carries exactly one packet; the server closes after it.
            if self._buf:
                raise AppProtocolError("unexpected data after a CancelRequest")
            return AppClosed() if self._eof else NeedData()
        return AppClosed()

    def _next_packet(self) -> bytes | None:
        """The next whole startup-family packet, or None; decides as early as possible, so
        garbage never makes us wait for (or buffer) more bytes."""
        buf = self._buf
        if buf[0] != 0 and client_hello(buf) is not False:
            # A startup length never starts with 0x16 (> 10000): it is a TLS ClientHello, i.e. the
            # app uses sslnegotiation=direct (or sslmode=require with a TLS-terminating proxy in mind).
            raise AppTLSError(
                "the application started a TLS handshake (direct TLS / sslnegotiation=direct), "
                "but dbmtls expects plaintext PostgreSQL on this port",
                hint=_DIRECT_TLS_HINT,
            )
        if buf[0] != 0:
            # Any length >= 2**24 is far beyond MAX_STARTUP; no need to wait for all four bytes.
            raise self._bad_length(None)
        if len(buf) < 4:
            return None
        length = int.from_bytes(buf[0:4], "big")
        if length < 8 or length > MAX_STARTUP:
            raise self._bad_length(length)
        if len(buf) < length:
            return None
        packet = bytes(buf[:length])
        del buf[:length]
        return packet

    def _encryption_request(self, code: int, length: int) -> Reply:
        is_ssl = code == SSL_REQUEST_CODE
        name = "SSLRequest" if is_ssl else "GSSENCRequest"
        if length != 8:
            raise AppProtocolError(f"invalid {name} length {length} (expected 8)")
        # The protocol allows one of each, in either order (libpq: GSSENC 'N' -> SSLRequest);
        # a repeat is a confused client, and bounding it bounds the number of replies.
        if is_ssl:
            self._ssl_requests += 1
            repeated = self._ssl_requests > 1
        else:
            self._gss_requests += 1
            repeated = self._gss_requests > 1
        if repeated:
            raise AppProtocolError(f"duplicate {name} on one connection")
        # 'N': continue in plaintext on the same socket (what PgBouncer does without client TLS).
        return Reply(b"N")

    def _cancel_request(self, packet: bytes) -> CancelRequest:
        length = len(packet)
        key = packet[12:]
        if length < 12 or not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
            raise AppProtocolError(
                f"invalid CancelRequest length {length} (expected 16, or 12 + a {MIN_CANCEL_KEY}..{MAX_CANCEL_KEY}"
                " byte key for protocol 3.2)"
            )
        if self._buf:
            raise AppProtocolError("unexpected data after a CancelRequest")
        self._state = AppState.CANCEL
        return CancelRequest(raw=packet, pid=int.from_bytes(packet[8:12], "big"), key=key)

    def _startup(self, packet: bytes, code: int) -> Startup:
        major, minor = code >> 16, code & 0xFFFF
        if major == _SPECIAL_MAJOR:
            raise AppProtocolError(f"unknown startup request code {code}")
        if major != 3:
            raise AppProtocolError(
                f"unsupported frontend protocol {major}.{minor}: dbmtls relays protocol 3.x only",
                hint="use a client library that speaks PostgreSQL protocol version 3",
            )
        params = _parse_startup_params(packet[8:])
        self._state = AppState.STARTED
        return Startup(raw=packet, version=(major, minor), params=params)

    def _need_more(self) -> NeedData:
        if self._eof:
            raise AppClosedEarly("the application closed the connection in the middle of a startup packet")
        return NeedData()

    @staticmethod
    def _bad_length(length: int | None) -> AppProtocolError:
        shown = "" if length is None else f" {length}"
        return AppProtocolError(
            f"invalid startup packet length{shown} (must be 8..{MAX_STARTUP}): not a PostgreSQL client?",
            hint="point only PostgreSQL clients at this dbmtls port",
        )


def _parse_startup_params(body: bytes) -> dict[str, str]:
    """``(cstr name, cstr value)* 00`` -> dict, in order.  As strict as the server's "invalid
    startup packet layout" checks, plus: names must be unique and UTF-8 (see below)."""
    if not body or body[-1] != 0:
        raise AppProtocolError("invalid startup packet layout: expected terminator as last byte")
    last = len(body) - 1  # index of the final NUL; find() below can therefore never fail
    params: dict[str, str] = {}
    pos = 0
    while True:
        name_end = body.index(b"\x00", pos)
        if name_end == pos:
            # An empty name is the list terminator; it must be the packet's last byte.
            if name_end != last:
                raise AppProtocolError("invalid startup packet layout: data after the terminator")
            break
        if name_end == last:
            raise AppProtocolError("invalid startup packet layout: parameter name without a value")
        value_end = body.index(b"\x00", name_end + 1)
        if value_end == last:
            # The final NUL ended a value, so the list terminator is missing (or a value is).
            raise AppProtocolError("invalid startup packet layout: missing terminator after the last parameter")
        try:
            name = body[pos:name_end].decode("utf-8")
            value = body[name_end + 1 : value_end].decode("utf-8")
        except UnicodeDecodeError:
            raise AppProtocolError("startup packet parameters are not valid UTF-8") from None
        if name in params:
            # The server lets the last duplicate win; refusing duplicates guarantees that the user
            # dbmtls picks the client certificate for is the user the server authenticates.
            raise AppProtocolError(f"duplicate startup parameter {name!r}")
        params[name] = value
        pos = value_end + 1
    if not params.get("user"):
        raise AppProtocolError("no PostgreSQL user name specified in startup packet")
    return params


# --- the upstream side: dbmtls as client (docs/protocols/postgres.md#upstream-upgrade) -------------------------


@dataclass(frozen=True)
class TLSAccepted:
    """The server answered exactly ``S``: start the TLS handshake on the same connection."""


class UpstreamNegotiation:
    """Proxy as the CLIENT toward the server, after it wrote ``SSL_REQUEST``.

    ``next_event()`` is ``NeedData`` until a byte arrived, ``TLSAccepted`` for exactly ``b"S"``,
    and raises otherwise.  It re-checks the whole buffer on every call, so the glue can feed
    bytes found buffered after the handshake (libpq's second check) and ask again.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if data:
            # Bounded: one byte decides; keep at most a little more to report it.
            if len(self._buf) < 16:
                self._buf += data[:16]
        else:
            self._eof = True

    def next_event(self) -> TLSAccepted | NeedData:
        buf = self._buf
        if not buf:
            if self._eof:
                raise UpstreamProtocolError("server closed the connection during SSL negotiation")
            return NeedData()
        first = buf[0]
        if first == ord("S"):
            if len(buf) > 1:
                # Plaintext that arrived with (or after) 'S' is outside the TLS session, so a man in
                # the middle could have injected it: libpq and PgBouncer abort here (CVE-2021-23222).
                raise UpstreamProtocolError(
                    "server sent unencrypted data after its SSL response (possible man-in-the-middle)",
                    hint="something between dbmtls and the database is tampering with the connection",
                )
            return TLSAccepted()
        if first == ord("N"):
            raise TLSRefused(
                "server refused TLS (answered N to SSLRequest); dbmtls never falls back to plaintext",
            )
        if first == ord("E"):
            # The server is not authenticated yet, so its text must not be shown (CVE-2024-10977);
            # libpq says only "server sent an error response during SSL exchange".
            raise UpstreamProtocolError(
                "server sent an error response during SSL exchange",
                hint="the server could not start a session or is too old for SSLRequest; "
                "its message is not shown because it is unauthenticated, see the database server log",
            )
        raise UpstreamProtocolError(
            f"server sent an invalid response to SSLRequest (byte 0x{first:02x}): not a PostgreSQL server?",
            hint="check that the database address and port in the dbmtls config point at PostgreSQL",
        )


# --- the server's first answer to the StartupMessage ------------------------------------

# The server's first answer to a StartupMessage is small (NegotiateProtocolVersion, an
# Authentication request or an ErrorResponse); more than this before it is complete is not PostgreSQL.
FIRST_REPLY_LIMIT: Final = 64 * 1024


@dataclass(frozen=True)
class FirstReplyDone:
    """What to relay to the app first: up to and including the first Authentication or
    ErrorResponse (with SCRAM-SHA-256-PLUS removed from an AuthenticationSASL offer)."""

    data: bytes


class FirstReply:
    """Reads the server's first answer to our StartupMessage, up to its first 'R' or 'E'.

    The glue waits for it before relaying, for two reasons: a client certificate the server
    rejects shows up only now with TLS 1.3 (an alert on the first read), and an
    AuthenticationSASL offering SCRAM-SHA-256-PLUS must lose the -PLUS mechanism: the app is on
    plaintext, so channel binding to *our* TLS session cannot work, and libpq refuses a -PLUS
    offer on a non-SSL connection outright.  Leading messages (NegotiateProtocolVersion) pass.

    ``receive_data(b"")`` is EOF: what arrived so far is relayed as is (the app then sees the
    close), and EOF before any byte raises: the server hung up without a word.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def received(self) -> bytes:
        return bytes(self._buf)

    def next_event(self) -> FirstReplyDone | NeedData:
        buf = self._buf
        found = _first_auth(buf)
        if found is not None:
            start, end = found
            return FirstReplyDone(bytes(buf[:start]) + strip_scram_plus(bytes(buf[start:end])) + bytes(buf[end:]))
        if len(buf) > FIRST_REPLY_LIMIT:
            raise UpstreamProtocolError(f"server sent more than {FIRST_REPLY_LIMIT} bytes without authenticating")
        if not self._eof:
            return NeedData()
        if not buf:
            raise UpstreamProtocolError(
                "server closed the connection after the TLS handshake without answering",
                hint="the server may have rejected the client certificate; see the database server log",
            )
        return FirstReplyDone(bytes(buf))  # closed mid-message: relay what there is


def _first_auth(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(start, end) of the first Authentication ('R') or ErrorResponse in ``buf``; None if incomplete."""
    pos = 0
    while len(buf) - pos >= 5:
        length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if length < 4:
            raise UpstreamProtocolError(f"server sent a message with invalid length {length} during startup")
        end = pos + 1 + length
        if end > len(buf):
            return None
        if buf[pos] in b"RE":
            return pos, end
        pos = end
    return None


# --- protocol-native errors toward the app (docs/protocols/postgres.md#errors) -----------

# SQLSTATEs (PostgreSQL's errcodes appendix) for each failure reason.
CONNECTION_FAILURE: Final = "08006"
PROTOCOL_VIOLATION: Final = "08P01"
UNABLE_TO_CONNECT: Final = "08001"  # sqlclient_unable_to_establish_sqlconnection
INVALID_AUTHORIZATION: Final = "28000"  # invalid_authorization_specification
TOO_MANY_CONNECTIONS: Final = "53300"  # what the server says past max_connections
_SQLSTATES: Final[Mapping[Reason, str]] = {
    Reason.APP_PROTOCOL: PROTOCOL_VIOLATION,
    Reason.NO_CERTIFICATE_FOR_USER: INVALID_AUTHORIZATION,
    Reason.CLIENT_CERT_REJECTED: INVALID_AUTHORIZATION,
    Reason.CONNECTION_REFUSED: UNABLE_TO_CONNECT,
    Reason.TIMEOUT: UNABLE_TO_CONNECT,
    Reason.TOO_MANY_CONNECTIONS: TOO_MANY_CONNECTIONS,
}


def sqlstate(reason: Reason) -> str:
    return _SQLSTATES.get(reason, CONNECTION_FAILURE)


def _cstr_field(code: bytes, value: str) -> bytes:
    # wire_text()/wire_hint() are already printable ASCII; re-check so a NUL can never split framing.
    data = value.encode("ascii", "replace").replace(b"\x00", b" ")
    return code + data + b"\x00"


def error_response(err: DbmtlsError, *, severity: str = "FATAL", detail: str | None = None) -> bytes:
    """Render ``err`` as an ErrorResponse: ``'E' Int32 len {S,V,C,M,[D],[H]} 00``."""
    fields = [
        _cstr_field(b"S", severity),
        _cstr_field(b"V", severity),  # non-localized severity (9.6+); ours is never localized
        _cstr_field(b"C", sqlstate(err.reason)),
        _cstr_field(b"M", err.wire_text()),
    ]
    if detail:
        fields.append(_cstr_field(b"D", sanitize(detail)))
    hint = err.wire_hint()
    if hint:
        fields.append(_cstr_field(b"H", hint))
    body = b"".join(fields) + b"\x00"
    return b"E" + (len(body) + 4).to_bytes(4, "big") + body


# --- server -> app during startup ------------------------------------------------------------


_K_MAX_LENGTH: Final = 4 + 4 + MAX_CANCEL_KEY
# Of a login-time ErrorResponse, only this much is kept: enough for its code and message.
_E_KEEP: Final = 1024


def _error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse body (``code value 00 ... 00``), tolerant of truncation."""
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if len(part) >= 1:
            fields.setdefault(chr(part[0]), sanitize(part[1:].decode("utf-8", "replace"), limit=300))
    return fields


@dataclass(frozen=True)
class BackendKey:
    """BackendKeyData: the (pid, secret key) a later CancelRequest for this session carries."""

    pid: int
    key: bytes


@dataclass(frozen=True)
class LoginRejected:
    """An ErrorResponse before AuthenticationOk: the server refused the login (the app sees it)."""

    sqlstate: str
    message: str


@dataclass(frozen=True)
class StartupDone:
    """The first ReadyForQuery: startup is over, nothing more to watch."""


class BackendScanner:
    """Watches the server->app byte stream during startup (after TLS, while it is relayed).

    Emits ``BackendKey`` (for cancel routing) and then ``StartupDone`` at the first
    ReadyForQuery.  Message bodies are skipped by counting, never buffered, except the first 4
    bytes of 'R' (to see AuthenticationOk) and a 'K' (at most 264 bytes).  Once done, fed bytes
    are ignored.  Raises ``UpstreamProtocolError`` if the framing is broken (length < 4) or a 'K'
    has an invalid length, since cancel routing would be unreliable.
    """

    def __init__(self) -> None:
        self._done = False
        self._auth_ok = False
        self._events: deque[BackendKey | LoginRejected | StartupDone] = deque()
        self._header = bytearray()
        self._type = 0
        self._remaining: int | None = None  # body bytes still to come; None = reading a header
        self._keep = 0  # how many body bytes to keep
        self._body = bytearray()

    @property
    def done(self) -> bool:
        """The first ReadyForQuery was seen: nothing more to watch."""
        return self._done

    def next_event(self) -> BackendKey | LoginRejected | StartupDone | NeedData:
        return self._events.popleft() if self._events else NeedData()

    def receive_data(self, data: bytes) -> None:
        if self._done:
            return
        i, n = 0, len(data)
        while i < n:
            if self._remaining is None:
                take = min(5 - len(self._header), n - i)
                self._header += data[i : i + take]
                i += take
                if len(self._header) < 5:
                    return
                self._start_message()
                if self._done:
                    return
            else:
                take = min(self._remaining, n - i)
                want = self._keep - len(self._body)
                if want > 0:
                    self._body += data[i : i + min(want, take)]
                i += take
                self._remaining -= take
            if self._remaining == 0:
                self._finish_message()

    def _start_message(self) -> None:
        mtype = self._header[0]
        length = int.from_bytes(self._header[1:5], "big", signed=True)
        self._header.clear()
        if length < 4:
            raise UpstreamProtocolError(f"server sent a message with invalid length {length} during startup")
        if mtype == ord("Z"):
            # The first ReadyForQuery ends startup; its status byte does not matter to us.
            self._done = True
            self._events.append(StartupDone())
            return
        if mtype == ord("E") and not self._auth_ok:
            self._keep = min(length - 4, _E_KEEP)
        elif mtype == ord("K"):
            if not 8 + MIN_CANCEL_KEY <= length <= _K_MAX_LENGTH:
                raise UpstreamProtocolError(f"server sent BackendKeyData with invalid length {length}")
            self._keep = length - 4
        elif mtype == ord("R"):
            self._keep = 4
        else:
            self._keep = 0
        self._type = mtype
        self._body.clear()
        self._remaining = length - 4

    def _finish_message(self) -> None:
        self._remaining = None
        if self._type == ord("K"):
            self._events.append(BackendKey(int.from_bytes(self._body[0:4], "big"), bytes(self._body[4:])))
        elif self._type == ord("R") and self._body == b"\x00\x00\x00\x00":
            self._auth_ok = True  # AuthenticationOk
        elif self._type == ord("E") and not self._auth_ok:
            fields = _error_fields(bytes(self._body))
            self._events.append(LoginRejected(fields.get("C", "?????"), fields.get("M", "")))
        self._body.clear()


_AUTH_SASL: Final = 10
_SCRAM_PLUS: Final = b"SCRAM-SHA-256-PLUS"


def strip_scram_plus(message: bytes) -> bytes:
    """Remove SCRAM-SHA-256-PLUS from an AuthenticationSASL message, recomputing the length.

    Channel binding cannot work through dbmtls: the app and the server see different TLS
    sessions (docs/protocols/postgres.md#scram-channel-binding).  Returns ``message`` unchanged if
    it is not a well-formed AuthenticationSASL, does not list -PLUS, or lists nothing else.
    """
    if len(message) < 10 or message[0] != ord("R"):
        return message
    if int.from_bytes(message[1:5], "big") != len(message) - 1:
        return message
    if int.from_bytes(message[5:9], "big") != _AUTH_SASL:
        return message
    body = message[9:]
    # "mech1 00 mech2 00 ... 00": must end with an empty name.
    if not body.endswith(b"\x00"):
        return message
    mechs = body[:-1].split(b"\x00")
    if mechs[-1] != b"" or b"" in mechs[:-1]:
        return message
    mechs.pop()
    kept = [m for m in mechs if m != _SCRAM_PLUS]
    if len(kept) == len(mechs) or not kept:
        return message
    new_body = message[5:9] + b"".join(m + b"\x00" for m in kept) + b"\x00"
    return b"R" + (len(new_body) + 4).to_bytes(4, "big") + new_body


SPEC = ProtocolSpec(
    name="postgres",
    title="PostgreSQL",
    aliases=("postgresql",),
    session="dbmtls.proxy.sessions.postgres:PostgresSession",
    wire_code=sqlstate,
    upgrade="`SSLRequest` → `S` → TLS (`directTls`: TLS first, PostgreSQL 17+)",
    plaintext_hint=_DIRECT_TLS_HINT,
    errors="`ErrorResponse` (FATAL, SQLSTATE); a close only for a cancel or an app that speaks TLS",
    default_port=5432,
    well_known_ports=(5432,),
    alpn=("postgresql",),
    user_before_tls=True,
    direct_tls_option=True,
)
# CockroachDB speaks pgwire with the same SSLRequest upgrade, on its own port.
COCKROACHDB = dataclasses.replace(
    SPEC,
    name="cockroachdb",
    title="CockroachDB",
    aliases=(),
    default_port=26257,
    well_known_ports=(26257,),
    upgrade="`SSLRequest` → `S` → TLS",
    direct_tls_option=False,  # direct TLS is PostgreSQL 17's; CockroachDB negotiates
)
