"""What every session does once the handshake is over: relay, then account."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dbmtls.errors import DbmtlsError
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.relay import Relay
from dbmtls.proxy.runtime import Conn
from dbmtls.tls.context import classify


def classify_late(conn: Conn, exc: BaseException) -> DbmtlsError:
    """An upstream failure after the handshake but before the server's first byte.

    With TLS 1.3 the server checks our certificate after *our* side of the handshake is
    complete, so a rejected client certificate arrives as an alert on the first read.
    """
    host, port = conn.rt.db.dial_target
    err = classify(exc, target=f"{host}:{port}", server_name=conn.rt.db.server_name)
    err.with_database(conn.rt.name)
    conn.error = err
    return err


async def run_relay(
    conn: Conn,
    up: Endpoint,
    *,
    early: Callable[[BaseException], bytes | None] | None = None,
    app_pending: bytes = b"",
    upstream_pending: bytes = b"",
    on_start: Callable[[Relay, asyncio.Transport, bytes], None] | None = None,
) -> None:
    """Hand both sides to a Relay and wait until both are closed.

    ``on_start(relay, upstream_transport, first_upstream_bytes)`` runs once the relay is
    installed, e.g. to put a startup tap in front of it (PostgreSQL cancel routing).
    """
    if up.closed or conn.app.closed:
        # A side went away while the handshake finished (e.g. a TLS 1.3 server rejecting our
        # certificate while we waited for the app).  Its connection_lost was delivered to the
        # Endpoint already, so a relay would wait for it forever: settle it here.
        to_app = upstream_pending + up.take()
        if up.closed and not conn.app.closed:
            exc = up.error or ConnectionResetError("the server closed the connection")
            if not to_app and early is not None:
                to_app = early(exc) or b""
        conn.app.write(to_app)
        conn.app.close()
        up.close()
        return
    app_t, app_buf = conn.app.detach()
    up_t, up_buf = up.detach()
    relay = Relay(
        app_t,
        up_t,
        app_pending=app_pending + app_buf,
        upstream_pending=upstream_pending + up_buf,
        early_upstream_error=early,
    )
    conn.relay = relay
    conn.app.successor = relay.from_app
    up.successor = relay.from_up
    if on_start is not None:
        on_start(relay, up_t, upstream_pending + up_buf)
    if conn.app.eof_seen:
        relay.app_eof_before_start()
    await relay.done
