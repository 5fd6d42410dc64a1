"""PostgreSQL / CockroachDB session: plaintext pgwire toward the app, verified mTLS toward the server.

The protocol decisions live in ``dbmtls.protocols.postgres`` (sans-IO); this module
only moves bytes and acts on events, in this order (protocols.md section 1):

1. App side: answer SSLRequest / GSSENCRequest with ``N`` and read the StartupMessage
   (or a CancelRequest).  Garbage gets an ErrorResponse 08P01 and a close.
2. Pick the client certificate for the StartupMessage ``user`` *before* dialing; no
   certificate for that user -> ErrorResponse 28000 naming the user.
3. Upstream: SSLRequest, exactly ``S`` (anything buffered beyond it is injected
   plaintext, CVE-2021-23222), TLS handshake, then the app's StartupMessage verbatim.
   With ``directTls`` (PostgreSQL 17+) TLS starts on the first byte, ALPN ``postgresql``.
   Nothing of the app's startup is ever written before TLS is up: every failure before
   that point fails closed.
4. Wait for the server's first bytes before relaying: with TLS 1.3 the server checks our
   certificate after our side of the handshake is done, so a rejected certificate
   arrives as an alert only now.  Turning it into an ErrorResponse here means the app
   sees "client certificate rejected" instead of "connection reset".
5. Relay.  During startup only, a tap on the server->app direction watches for
   BackendKeyData to remember which user (certificate) a backend belongs to, so that a
   later CancelRequest for it is sent with the same identity; once ReadyForQuery has
   been seen the tap removes itself and the relay runs without any per-chunk Python
   beyond its own one call.

Every error after the StartupMessage is an ErrorResponse (FATAL, SQLSTATE from the
error class, message naming the database and the upstream, a hint) followed by a
close, so psql/libpq print it; the same error goes to the connection log.

Cancels arrive on a new app connection (possibly after their own SSLRequest, which
gets ``N``).  They are sent upstream over a new TLS connection -- never in clear, the
secret key must not cross the network unprotected -- and the app side is closed once
the server closes (the protocol has no reply to a cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from dbmtls.errors import (
    AppProtocolError,
    DbmtlsError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from dbmtls.protocols import postgres as pg
from dbmtls.proxy import upstream
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.relay import Relay, _Half
from dbmtls.proxy.runtime import Conn, DatabaseRuntime
from dbmtls.proxy.sessions.common import run_relay
from dbmtls.tls.context import classify

# How long an app may take to send its startup packet(s); the server's own
# authentication_timeout is 60 s, but a client that says nothing for this long is broken.
APP_STARTUP_TIMEOUT = 30.0
# How long to wait for the server to close a cancel connection after the CancelRequest.
CANCEL_CLOSE_TIMEOUT = 5.0

# (database, backend pid, cancel key) -> database user, for the sessions relayed now.
# Entries live exactly as long as their session, so the map is bounded by open connections.
_BACKENDS: dict[tuple[str, int, bytes], str] = {}


async def postgres_session(conn: Conn) -> None:
    app = conn.app
    machine = pg.AppHandshake()
    try:
        event = await _read_app_startup(conn, machine)
    except AppProtocolError as err:
        conn.error = err.with_database(conn.rt.name)
        if err.hint != pg._DIRECT_TLS_HINT:
            # The app waits for an answer to its startup packet; a TLS ClientHello (direct
            # TLS) would only be confused by plaintext, so it just gets the close.
            app.write(pg.error_response(err))
        app.close()
        return
    except (TimeoutError, OSError):
        app.close()
        return
    if isinstance(event, pg.AppClosed):
        app.close()  # e.g. sslmode=require giving up after our 'N'
        return
    if isinstance(event, pg.CancelRequest):
        await _cancel(conn, event)
        return

    if not isinstance(event, pg.Startup):  # unreachable: _read_app_startup loops over the others
        raise AssertionError(event)
    startup = event
    conn.user = startup.user
    try:
        up = await _open_upstream(conn, startup.user)
        up.write(startup.raw + machine.trailing_data)
        first = await _first_reply(conn, up)
    except DbmtlsError as err:
        _fail(conn, err, startup.database)
        return
    key_slot: list[tuple[str, int, bytes]] = []
    try:
        await _relay(conn, up, first, startup.user, key_slot)
    finally:
        for k in key_slot:
            _BACKENDS.pop(k, None)


async def _read_app_startup(conn: Conn, machine: pg.AppHandshake) -> pg.AppEvent:
    """Answer SSL/GSSENC requests with 'N' until a Startup, CancelRequest or close."""
    app = conn.app
    async with asyncio.timeout(APP_STARTUP_TIMEOUT):
        while True:
            event = machine.next_event()
            if isinstance(event, pg.Reply):
                app.write(event.data)
                continue
            if not isinstance(event, pg.NeedData):
                return event
            machine.receive_data(await app.receive())


def _target(conn: Conn) -> str:
    host, port = conn.rt.db.dial_target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _open_upstream(conn: Conn, user: str | None) -> Endpoint:
    """TCP, SSLRequest/'S' (unless directTls), TLS with the identity for ``user``."""
    db = conn.rt.db
    # Choose the identity before dialing: a user without a certificate never costs a connection.
    conn.rt.tls.context_for(user)
    up = await upstream.connect(conn)
    try:
        # mode DISABLE: plain pgwire to the server (no SSLRequest, nothing to upgrade)
        if not db.directTls and conn.rt.tls.enabled:
            up.write(pg.SSL_REQUEST)
            negotiation = pg.UpstreamNegotiation()
            try:
                async with asyncio.timeout(db.handshakeTimeout):
                    while True:
                        # receive() returns everything that arrived, so 'S' plus injected bytes
                        # in the same segment is seen here; bytes arriving later are caught by
                        # start_tls (anything buffered before the handshake aborts it).
                        negotiation.receive_data(await up.receive())
                        if negotiation.result() == "tls":
                            break
            except TimeoutError:
                raise UpstreamTimeout(
                    f"server {_target(conn)} did not answer the SSLRequest within {db.handshakeTimeout:g}s"
                ) from None
            except OSError as exc:
                raise classify(exc, target=_target(conn), server_name=db.server_name) from None
            except UpstreamError as err:
                err.message = f"{err.message} (server {_target(conn)})"
                raise
        await upstream.start_tls(conn, up, user)
    except BaseException:
        up.abort()
        raise
    return up


# The server's first answer to a StartupMessage is small (NegotiateProtocolVersion, an
# Authentication request or an ErrorResponse); more than this before it is complete is not PostgreSQL.
FIRST_REPLY_LIMIT = 64 * 1024


def _first_auth(buf: bytes) -> tuple[int, int] | None:
    """(start, end) of the first Authentication ('R') or ErrorResponse in ``buf``; None if incomplete.

    Skips a leading NegotiateProtocolVersion ('v') and anything else the server may send first.
    """
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


async def _first_reply(conn: Conn, up: Endpoint) -> bytes:
    """The server's first answer to our StartupMessage, up to its first Authentication message.

    Two reasons to wait for it before relaying: a client certificate the server rejects shows
    up only now with TLS 1.3 (an alert on the first read), and an AuthenticationSASL offering
    SCRAM-SHA-256-PLUS must lose the -PLUS mechanism -- the app is on plaintext, so channel
    binding to *our* TLS session cannot work, and libpq refuses a -PLUS offer on a non-SSL
    connection outright ("server offered SCRAM-SHA-256-PLUS authentication over a non-SSL
    connection").
    """
    db = conn.rt.db
    buf = b""
    try:
        async with asyncio.timeout(db.handshakeTimeout):
            while (found := _first_auth(buf)) is None:
                data = await up.receive()
                if not data:
                    break
                buf += data
                if len(buf) > FIRST_REPLY_LIMIT:
                    raise UpstreamProtocolError(
                        f"server {_target(conn)} sent more than {FIRST_REPLY_LIMIT} bytes without authenticating"
                    )
    except TimeoutError:
        up.abort()
        raise UpstreamTimeout(
            f"server {_target(conn)} did not answer the StartupMessage within {db.handshakeTimeout:g}s"
        ) from None
    except DbmtlsError:
        up.abort()
        raise
    except Exception as exc:
        up.abort()
        if buf:  # the server did talk; let the app see what it said (e.g. an ErrorResponse)
            return buf
        raise classify(exc, target=_target(conn), server_name=db.server_name) from None
    if not buf:
        up.abort()
        raise UpstreamProtocolError(
            f"server {_target(conn)} closed the connection after the TLS handshake without answering",
            hint="the server may have rejected the client certificate; see the database server log",
        )
    if found is None:
        return buf  # closed mid-message: relay what there is, the app sees the close
    start, end = found
    return buf[:start] + pg.strip_scram_plus(buf[start:end]) + buf[end:]


def _fail(conn: Conn, err: DbmtlsError, database: str | None) -> None:
    """Tell the app in its own protocol (it is waiting for 'R'/'E' after its StartupMessage)."""
    conn.error = err.with_database(conn.rt.name)
    detail = f"database {database!r} via {_target(conn)}" if database else None
    conn.app.write(pg.error_response(err, detail=detail))
    conn.app.close()


class _StartupTap(asyncio.Protocol):
    """Stands in front of the relay's server->app half until the first ReadyForQuery.

    Feeds each chunk to a ``BackendScanner`` to learn BackendKeyData, then hands the
    transport back to the relay's own protocol, so the steady state has no extra call.
    """

    def __init__(self, half: _Half, transport: asyncio.Transport, on_key: Callable[[int, bytes], None]) -> None:
        self.half = half
        self.transport = transport
        self.scanner = pg.BackendScanner()
        self.on_key = on_key

    def feed(self, data: bytes) -> bool:
        """Scan ``data``; True when startup is over (or the stream cannot be followed)."""
        try:
            self.scanner.feed(data)
        except UpstreamProtocolError:
            return True  # only cancel routing suffers: the relay passes the bytes on anyway
        if self.scanner.key is not None:
            self.on_key(*self.scanner.key)
            self.scanner.key = None
        return self.scanner.done

    def data_received(self, data: bytes) -> None:
        self.half.data_received(data)
        if self.feed(data):
            self.transport.set_protocol(self.half)

    def eof_received(self) -> bool | None:
        return self.half.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.half.connection_lost(exc)

    def pause_writing(self) -> None:
        self.half.pause_writing()

    def resume_writing(self) -> None:
        self.half.resume_writing()


async def _relay(conn: Conn, up: Endpoint, first: bytes, user: str, key_slot: list[tuple[str, int, bytes]]) -> None:
    """``run_relay`` with the startup tap in front of the server->app half."""
    name = conn.rt.name

    def on_key(pid: int, key: bytes) -> None:
        k = (name, pid, key)
        _BACKENDS[k] = user
        key_slot.append(k)

    def install_tap(relay: Relay, up_t: asyncio.Transport, seen: bytes) -> None:
        tap = _StartupTap(relay.from_up, up_t, on_key)
        if not tap.feed(seen) and not up_t.is_closing():
            up_t.set_protocol(tap)

    await run_relay(conn, up, upstream_pending=first, on_start=install_tap)


# --- cancel ------------------------------------------------------------------------------


def _cancel_identity(rt: DatabaseRuntime, request: pg.CancelRequest) -> str | None:
    """The user whose certificate carries the cancel: the session's own if we relayed it.

    A cancel is authorized by its secret key, not by the certificate (PostgreSQL checks
    no pg_hba rule for it), so for a backend we did not relay any configured identity
    will do: the default one, else the first per-user one.
    """
    known = _BACKENDS.get((rt.name, request.pid, request.key))
    if known is not None:
        return known
    m = rt.tls.material
    if m is not None and m.default is None and m.by_user:
        return sorted(m.by_user)[0]
    return None


async def _cancel(conn: Conn, request: pg.CancelRequest) -> None:
    conn.note = "cancel request"
    user = _cancel_identity(conn.rt, request)
    conn.user = user
    try:
        up = await _open_upstream(conn, user)
    except DbmtlsError as err:
        # No reply exists for a cancel: log it and close.
        conn.error = err.with_database(conn.rt.name)
        conn.app.close()
        return
    up.write(request.raw)
    # The server closes the connection once it has read the request; wait for that so
    # the cancel has surely been delivered before the app sees its connection end.
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(CANCEL_CLOSE_TIMEOUT):
            while await up.receive():
                pass
    up.close()
    conn.app.close()
