"""PostgreSQL / CockroachDB session: plaintext pgwire toward the app, verified mTLS toward the server.

The protocol decisions live in ``dbmtls.protocols.postgres`` (sans-IO); this module
only moves bytes and acts on events, in this order (``docs/protocols/postgres.md``):

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
5. Relay.  During startup only, the relay lets a ``BackendScanner`` watch the
   server->app direction for BackendKeyData, to remember which user (certificate) a
   backend belongs to, so that a later CancelRequest for it is sent with the same
   identity; once ReadyForQuery has been seen the watch ends and the relay runs without
   any per-chunk Python beyond its own one call.

Every error after the StartupMessage is an ErrorResponse (FATAL, the SQLSTATE for its
reason, message naming the database and the upstream, a hint) followed by a close, so
psql/libpq print it; before it (and for an app that speaks TLS to us) only a close is
possible.  The session raises; the proxy records the error and sends the notice.

Cancels arrive on a new app connection (possibly after their own SSLRequest, which
gets ``N``).  They are sent upstream over a new TLS connection -- never in clear, the
secret key must not cross the network unprotected -- and the app side is closed once
the server closes (the protocol has no reply to a cancel).
"""

from __future__ import annotations

import asyncio
import contextlib

from dbmtls.errors import (
    AppClosedEarly,
    AppTimeout,
    AppTLSError,
    AuthenticationFailed,
    DbmtlsError,
    TLSHandshakeError,
    TLSRefused,
    UpstreamTimeout,
)
from dbmtls.protocols import postgres as pg
from dbmtls.protocols.events import NeedData
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.notice import Reply
from dbmtls.proxy.runtime import Conn, DatabaseRuntime
from dbmtls.proxy.sessions.common import Upstream, run_relay, start_tls
from dbmtls.proxy.upstream import target

# How long an app may take to send its startup packet(s), in handshakeTimeouts (30 s by
# default; the server's own authentication_timeout is 60 s): a slow-loris app must not hold
# a connection slot for ever.
APP_STARTUP_TIMEOUT_FACTOR = 3.0
# How long to wait for the server to close a cancel connection after the CancelRequest.
CANCEL_CLOSE_TIMEOUT = 5.0


class PostgresSession:
    native_capable = True  # TLS through sessions.common.start_tls, relayed by run_relay: dataPlane native applies

    def __init__(self, rt: DatabaseRuntime) -> None:
        self.rt = rt
        self.dialer = rt.dialer
        # (backend pid, cancel key) -> database user, for the sessions relayed now.  Entries
        # live exactly as long as their session, so the map is bounded by open connections.
        self.backends: dict[tuple[int, bytes], str] = {}

    async def run(self, conn: Conn) -> None:
        machine = pg.AppHandshake()
        conn.notice = Reply(pg.error_response)
        try:
            event = await self._read_app_startup(conn, machine)
        except AppTLSError:
            # The app speaks TLS (direct TLS): plaintext would only confuse it; it gets the close.
            conn.notice = None
            raise
        except TimeoutError:
            conn.notice = None
            raise AppTimeout(
                "the application sent no complete startup packet within "
                f"{APP_STARTUP_TIMEOUT_FACTOR * conn.rt.db.handshakeTimeout:g}s"
            ) from None
        except OSError:
            conn.app.close()
            return
        if isinstance(event, pg.AppClosed):
            conn.notice = None
            if machine.refused_ssl:
                # sslmode=require (or verify-*) gives up after our 'N': say why in the log.
                raise AppClosedEarly(
                    "the application closed the connection after dbmtls answered its SSLRequest with N",
                    hint="the app requires TLS to dbmtls (sslmode=require or verify-*): connect with "
                    "sslmode=disable or prefer; dbmtls adds verified TLS toward the database",
                )
            conn.app.close()  # a port probe: connected and left without a word
            return
        if isinstance(event, pg.CancelRequest):
            await self._cancel(conn, event)
            return
        if not isinstance(event, pg.Startup):  # unreachable: _read_app_startup loops over the others
            raise AssertionError(event)
        await self._session(conn, event, machine.trailing_data)

    async def _session(self, conn: Conn, startup: pg.Startup, trailing: bytes) -> None:
        conn.user = startup.user
        # The app waits for 'R' or 'E' now: every failure becomes an ErrorResponse naming the database.
        detail = f"database {startup.database!r} via {target(conn)}"
        conn.notice = Reply(lambda err: pg.error_response(err, detail=detail))
        conn.admit()
        up = await self._open_upstream(conn, startup.user)
        up.write(startup.raw + trailing)
        first = await self._first_reply(conn, up)
        keys: list[tuple[int, bytes]] = []
        rejected: list[pg.LoginRejected] = []
        scanner = pg.BackendScanner()

        def watch(data: bytes) -> bool:
            """Learn BackendKeyData (and a rejected login) during startup; True once it is over."""
            try:
                scanner.receive_data(data)
                while not isinstance(event := scanner.next_event(), NeedData):
                    if isinstance(event, pg.BackendKey):
                        self.backends[(event.pid, event.key)] = startup.user
                        keys.append((event.pid, event.key))
                    elif isinstance(event, pg.LoginRejected):
                        rejected.append(event)
            except DbmtlsError as err:
                # only cancel routing suffers: the relay passes the bytes on anyway
                conn.note = f"cancel routing off for this session: {err.message}"
                return True
            return scanner.done

        try:
            await run_relay(conn, up, upstream_pending=first, watch_upstream=watch)
        finally:
            for k in keys:
                self.backends.pop(k, None)
        if rejected:
            conn.notice = None  # the app read the server's own ErrorResponse
            raise AuthenticationFailed(
                f"the server rejected the login of {startup.user!r}: {rejected[0].sqlstate} {rejected[0].message}"
            )

    @staticmethod
    async def _read_app_startup(conn: Conn, machine: pg.AppHandshake) -> pg.AppEvent:
        """Answer SSL/GSSENC requests with 'N' until a Startup, CancelRequest or close."""
        app = conn.app
        async with asyncio.timeout(APP_STARTUP_TIMEOUT_FACTOR * conn.rt.db.handshakeTimeout):
            while True:
                event = machine.next_event()
                if isinstance(event, pg.Reply):
                    app.write(event.data)
                    continue
                if not isinstance(event, NeedData):
                    return event
                machine.receive_data(await app.receive())

    async def _open_upstream(self, conn: Conn, user: str | None) -> Upstream:
        """TCP, SSLRequest/'S' (unless directTls), TLS with the identity for ``user``."""
        db = conn.rt.db
        # Choose the identity before dialing: a user without a certificate never costs a connection.
        conn.rt.tls.context_for(user)
        up = await self.dialer.connect(conn)
        # mode DISABLE: plain pgwire to the server (no SSLRequest, nothing to upgrade)
        if not db.directTls and conn.rt.tls.enabled:
            await self._negotiate(conn, up)
        try:
            return await start_tls(conn, up, user)
        except (TLSHandshakeError, TLSRefused) as err:
            # A server before 17 reads our ClientHello as a startup packet of absurd length and
            # hangs up without a word: say what most likely happened, not only "closed".
            if db.directTls and type(err) in (TLSHandshakeError, TLSRefused):
                raise err.with_hint(
                    "directTls needs PostgreSQL 17 or later, and servers before 17 close the connection at "
                    "the TLS ClientHello; set directTls: false (the SSLRequest upgrade works with every version)"
                ) from None
            raise

    async def _negotiate(self, conn: Conn, up: Endpoint) -> None:
        """SSLRequest, then exactly 'S' (docs/protocols/postgres.md#upstream-upgrade)."""
        timeout = conn.rt.db.handshakeTimeout
        up.write(pg.SSL_REQUEST)
        negotiation = pg.UpstreamNegotiation()
        try:
            async with asyncio.timeout(timeout):
                # receive() returns everything that arrived, so 'S' plus injected bytes in the
                # same segment is seen here; bytes arriving later are caught by start_tls
                # (anything buffered before the handshake aborts it).
                while isinstance(negotiation.next_event(), NeedData):
                    negotiation.receive_data(await up.receive())
        except TimeoutError:
            raise UpstreamTimeout(f"server {target(conn)} did not answer the SSLRequest within {timeout:g}s") from None
        except OSError as exc:
            raise self.dialer.failure(conn, exc) from None
        except DbmtlsError as err:
            raise err.with_message(f"{err.message} (server {target(conn)})") from None

    async def _first_reply(self, conn: Conn, up: Upstream) -> bytes:
        """The server's first answer to our StartupMessage (see ``pg.FirstReply``)."""
        timeout = conn.rt.db.handshakeTimeout
        reply = pg.FirstReply()
        try:
            async with asyncio.timeout(timeout):
                while isinstance(event := reply.next_event(), NeedData):
                    reply.receive_data(await up.receive())
        except TimeoutError:
            raise UpstreamTimeout(
                f"server {target(conn)} did not answer the StartupMessage within {timeout:g}s"
            ) from None
        except DbmtlsError as err:
            raise err.with_message(f"{err.message} (server {target(conn)})") from None
        except Exception as exc:
            if reply.received:  # the server did talk; let the app see what it said (e.g. an ErrorResponse)
                return reply.received
            raise self.dialer.failure(conn, exc) from None
        return event.data

    # --- cancel ------------------------------------------------------------------------------

    def _cancel_identity(self, request: pg.CancelRequest) -> str | None:
        """The user whose certificate carries the cancel: the session's own if we relayed it.

        A cancel is authorized by its secret key, not by the certificate (PostgreSQL checks
        no pg_hba rule for it), so for a backend we did not relay any configured identity
        will do: the default one, else the first per-user one.
        """
        known = self.backends.get((request.pid, request.key))
        if known is not None:
            return known
        m = self.rt.tls.material
        if m is not None and m.default is None and m.by_user:
            return sorted(m.by_user)[0]
        return None

    async def _cancel(self, conn: Conn, request: pg.CancelRequest) -> None:
        conn.note = "cancel request"
        conn.notice = None  # no reply exists for a cancel: a failure is logged and the app closed
        conn.admit()
        user = self._cancel_identity(request)
        conn.user = user
        up = await self._open_upstream(conn, user)
        up.write(request.raw)
        # The server closes the connection once it has read the request; wait for that so
        # the cancel has surely been delivered before the app sees its connection end.
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(CANCEL_CLOSE_TIMEOUT):
                while await up.receive():
                    pass
        up.close()
        conn.app.close()
