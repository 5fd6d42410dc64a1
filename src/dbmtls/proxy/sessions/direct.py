"""Sessions for protocols that speak TLS from the first byte: Redis, MongoDB, any TCP service."""

from __future__ import annotations

import asyncio
import time

from dbmtls.errors import DbmtlsError
from dbmtls.protocols import redis
from dbmtls.proxy import upstream
from dbmtls.proxy.runtime import Conn
from dbmtls.proxy.sessions.common import classify_late, run_relay

# How long dbmtls keeps answering a Redis client with errors before it closes.
REDIS_ERROR_WINDOW = 2.0
REDIS_ERROR_MAX_REPLIES = 64


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

    await run_relay(conn, up, early=early)


async def _answer_redis_errors(conn: Conn, err: DbmtlsError) -> None:
    """Answer every request with -ERR for a short, bounded time; then close."""
    app = conn.app
    counter = redis.RequestCounter()
    reply = redis.error_reply(err)
    deadline = time.monotonic() + REDIS_ERROR_WINDOW
    sent = 0
    try:
        n = counter.feed(app.take())  # what the app sent while we dialled
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
    await run_relay(conn, up, early=lambda exc: (classify_late(conn, exc), None)[1])
