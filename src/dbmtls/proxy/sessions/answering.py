"""Sessions for client-first protocols that speak TLS from the first byte and can say what
went wrong: Redis and MongoDB (``docs/protocols/redis.md``, ``docs/protocols/mongodb.md``).

A common mistake is pointing a TLS client (``redis-cli --tls``, ``tls=true`` in a
MongoDB URI) at the plaintext listener.  Forwarded as is, its ClientHello reaches
the server inside our TLS session and both sides wait forever.  Redis and MongoDB
clients speak first, so once the upstream is ready the session looks at the first
app bytes (waiting briefly if none arrived yet) and refuses a TLS record with a
log line saying what to change.

When the upstream fails, the app is told why in its own protocol (``-ERR ...``, an
``{ok: 0, errmsg, code, codeName}`` reply): the notice reads the app's requests for a
short, bounded time and answers each one (``dbmtls.proxy.notice.AnswerRequests``).
What is protocol-specific (finding request boundaries, encoding the reply) is the
protocol module's ``ErrorAnswers``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dbmtls.errors import AppTLSError, DbmtlsError
from dbmtls.protocols import mongodb, redis
from dbmtls.protocols.spec import ErrorAnswerer
from dbmtls.protocols.tls_record import client_hello
from dbmtls.proxy.notice import AnswerRequests
from dbmtls.proxy.runtime import Conn, DatabaseRuntime
from dbmtls.proxy.sessions.common import dial, run_relay

# How long to wait for a client-first app's first bytes before relaying without looking.
FIRST_BYTES_WAIT = 0.25


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


class AnsweringSession:
    answerer: Callable[[DbmtlsError], ErrorAnswerer]
    native_capable = True  # dials and relays through sessions.common: dataPlane native applies

    def __init__(self, rt: DatabaseRuntime) -> None:
        self.rt = rt

    async def run(self, conn: Conn) -> None:
        conn.notice = AnswerRequests(self.answerer)
        conn.admit()
        up = await dial(conn)
        first = await _first_app_bytes(conn)
        conn.notice = AnswerRequests(self.answerer, seen=first)
        if client_hello(first):
            up.close()
            conn.notice = None  # a TLS client cannot read a plaintext reply
            raise AppTLSError(
                "the app started a TLS handshake on the plaintext listener", hint=self.rt.spec.plaintext_hint
            )
        # run_relay settles a server that hung up while we waited for the app (TLS 1.3: it
        # rejected our certificate) and raises what it said.
        await run_relay(conn, up, app_pending=first, expect_reply=True)


class RedisSession(AnsweringSession):
    answerer = redis.ErrorAnswers


class MongoSession(AnsweringSession):
    answerer = mongodb.ErrorAnswers
