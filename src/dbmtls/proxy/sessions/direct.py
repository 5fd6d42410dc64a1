"""Sessions for protocols that speak TLS from the first byte: Redis, MongoDB, any TCP service.

A common mistake is pointing a TLS client (``redis-cli --tls``, ``tls=true`` in a
MongoDB URI) at the plaintext listener.  Forwarded as is, its ClientHello reaches
the server inside our TLS session and both sides wait forever.  Redis and MongoDB
clients speak first, so once the upstream is ready the session looks at the first
app bytes (waiting briefly if none arrived yet) and refuses a TLS record with a
log line saying what to change.  ``tcp`` is opaque and never inspected: TLS inside
the tunnel may be intended there.
"""

from __future__ import annotations

import asyncio
import time

from dbmtls.errors import AppProtocolError, DbmtlsError
from dbmtls.protocols import redis
from dbmtls.proxy import upstream
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.runtime import Conn
from dbmtls.proxy.sessions.common import classify_late, run_relay

# How long dbmtls keeps answering a Redis client with errors before it closes.
REDIS_ERROR_WINDOW = 2.0
REDIS_ERROR_MAX_REPLIES = 64
# How long to wait for a client-first app's first bytes before relaying without looking.
FIRST_BYTES_WAIT = 0.25


def _is_tls_client_hello(data: bytes) -> bool:
    # A TLS handshake record: type 0x16, version 3.x (x <= 4).  Three bytes, because a
    # MongoDB message whose length ends in 0x16 starts with the same first byte.
    return len(data) >= 3 and data[0] == 0x16 and data[1] == 3 and data[2] <= 4


async def _first_app_bytes(conn: Conn) -> bytes:
    """What the app sent so far, waiting up to FIRST_BYTES_WAIT for something."""
    app = conn.app
    data = app.take()
    if data or app.eof_seen:
        return data
    try:
        async with asyncio.timeout(FIRST_BYTES_WAIT):
            return await app.receive()
    except (TimeoutError, OSError):
        return b""  # nothing yet (or the app is gone): the relay takes it from here


def _lost_while_waiting(up: Endpoint) -> BaseException | None:
    """The server hung up while we waited for the app (TLS 1.3: it rejected our certificate).

    Must be checked before the relay starts: the relay would never see this transport's
    ``connection_lost`` (already delivered to ``up``) and would wait for it forever.
    """
    if not up.closed:
        return None
    return up.error or ConnectionResetError("the server closed the connection")


def _refuse_tls_app(conn: Conn, first: bytes) -> bool:
    if not _is_tls_client_hello(first):
        return False
    conn.error = AppProtocolError(
        "the app started a TLS handshake on the plaintext listener: connect without TLS "
        "(e.g. redis-cli without --tls, mongodb URI without tls=true); dbmtls does the TLS to the database",
        database=conn.rt.name,
    )
    conn.app.close()
    return True


async def redis_session(conn: Conn) -> None:
    try:
        up = await upstream.dial(conn)
    except DbmtlsError as err:
        conn.error = err.with_database(conn.rt.name)
        await _answer_redis_errors(conn, err)
        return

    def early(exc: BaseException) -> bytes:
        err = classify_late(conn, exc)
        return redis.error_reply(err)

    first = await _first_app_bytes(conn)
    if _refuse_tls_app(conn, first):
        up.close()
        return
    if (lost := _lost_while_waiting(up)) is not None:
        await _answer_redis_errors(conn, classify_late(conn, lost), pending=first)
        return
    await run_relay(conn, up, early=early, app_pending=first)


async def _answer_redis_errors(conn: Conn, err: DbmtlsError, pending: bytes = b"") -> None:
    """Answer every request with -ERR for a short, bounded time; then close."""
    app = conn.app
    counter = redis.RequestCounter()
    reply = redis.error_reply(err)
    deadline = time.monotonic() + REDIS_ERROR_WINDOW
    sent = 0
    try:
        n = counter.feed(pending + app.take())  # what the app sent while we dialled
        while True:
            for _ in range(n):
                app.write(reply)
                sent += 1
            if counter.broken or sent >= REDIS_ERROR_MAX_REPLIES:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    data = await app.receive()
            except TimeoutError:
                break
            if not data:
                break
            n = counter.feed(data)
    except OSError:
        pass
    finally:
        if sent == 0:
            # the app sent nothing yet; leave one reply in its socket so its first read shows it
            app.write(reply)
        app.close()


async def plain_session(conn: Conn) -> None:
    """``tcp`` and ``mongodb``: relay; on failure log and close."""
    try:
        up = await upstream.dial(conn)
    except DbmtlsError as err:
        conn.error = err.with_database(conn.rt.name)
        conn.app.close()
        return
    first = b""
    if conn.rt.db.protocol == "mongodb":
        first = await _first_app_bytes(conn)
        if _refuse_tls_app(conn, first):
            up.close()
            return
        if (lost := _lost_while_waiting(up)) is not None:
            classify_late(conn, lost)
            conn.app.close()
            return
    await run_relay(conn, up, early=lambda exc: (classify_late(conn, exc), None)[1], app_pending=first)
