"""Sessions for protocols that speak TLS from the first byte: Redis, MongoDB, any TCP service.

A common mistake is pointing a TLS client (``redis-cli --tls``, ``tls=true`` in a
MongoDB URI) at the plaintext listener.  Forwarded as is, its ClientHello reaches
the server inside our TLS session and both sides wait forever.  Redis and MongoDB
clients speak first, so once the upstream is ready the session looks at the first
app bytes (waiting briefly if none arrived yet) and refuses a TLS record with a
log line saying what to change.  ``tcp`` is opaque and never inspected: TLS inside
the tunnel may be intended there.

When the upstream fails, Redis and MongoDB apps are told why in their own protocol
(``-ERR ...``, an ``{ok: 0, errmsg, code, codeName}`` reply): ``_answer_errors`` reads
the app's requests for a short, bounded time and answers each complete one, because
clients may swallow the reply to a connect-time command and show only the next one.
What is protocol-specific (finding request boundaries, encoding the reply) is
an ``ErrorAnswers`` wrapping the sans-IO module in ``dbmtls.protocols``.  ``tcp`` has no way to say
anything: its failures are logged and the connection closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from dbmtls.errors import AppProtocolError, DbmtlsError
from dbmtls.protocols import mongodb, redis
from dbmtls.proxy import upstream
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.runtime import Conn
from dbmtls.proxy.sessions.common import classify_late, run_relay

# How long dbmtls keeps answering a Redis/MongoDB client with errors before it closes.
ERROR_WINDOW = 2.0
ERROR_MAX_REPLIES = 64
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


class ErrorAnswers(Protocol):
    """Answers an app's requests with one error: fed the app's bytes, returns the replies."""

    @property
    def broken(self) -> bool:
        """The app sent something that cannot be answered: stop reading and close."""
        ...

    def feed(self, data: bytes) -> list[bytes]:
        """One reply per request completed by ``data``."""
        ...

    def unprompted(self) -> bytes | None:
        """What to leave in the app's socket when it asked nothing (None: nothing)."""
        ...


class _RedisAnswers:
    def __init__(self, err: DbmtlsError) -> None:
        self._counter = redis.RequestCounter()
        self._reply = redis.error_reply(err)

    @property
    def broken(self) -> bool:
        return self._counter.broken

    def feed(self, data: bytes) -> list[bytes]:
        return [self._reply] * self._counter.feed(data)

    def unprompted(self) -> bytes | None:
        return self._reply


class _MongoAnswers(mongodb.ErrorResponder):
    def unprompted(self) -> bytes | None:
        # a reply must carry the request's requestID in responseTo: nothing to say unasked
        return None


async def redis_session(conn: Conn) -> None:
    await _answering_session(conn, _RedisAnswers)


async def mongodb_session(conn: Conn) -> None:
    await _answering_session(conn, _MongoAnswers)


async def plain_session(conn: Conn) -> None:
    """``tcp``: relay; on failure log and close (an opaque protocol has no way to say why)."""
    try:
        up = await upstream.dial(conn)
    except DbmtlsError as err:
        conn.error = err.with_database(conn.rt.name)
        conn.app.close()
        return
    await run_relay(conn, up, early=lambda exc: (classify_late(conn, exc), None)[1])


async def _answering_session(conn: Conn, answers_for: Callable[[DbmtlsError], ErrorAnswers]) -> None:
    """A client-first protocol that can say what went wrong (Redis, MongoDB)."""
    try:
        up = await upstream.dial(conn)
    except DbmtlsError as err:
        conn.error = err.with_database(conn.rt.name)
        await _answer_errors(conn, answers_for(err))
        return

    first = await _first_app_bytes(conn)

    def early(exc: BaseException) -> bytes | None:
        # The relay saw the server fail before its first byte; the app's requests it knows
        # of are the first bytes (the rest went upstream, unseen).
        answers = answers_for(classify_late(conn, exc))
        return b"".join(answers.feed(first)) or answers.unprompted()

    if _refuse_tls_app(conn, first):
        up.close()
        return
    if (lost := _lost_while_waiting(up)) is not None:
        await _answer_errors(conn, answers_for(classify_late(conn, lost)), pending=first)
        return
    await run_relay(conn, up, early=early, app_pending=first)


async def _answer_errors(conn: Conn, answers: ErrorAnswers, pending: bytes = b"") -> None:
    """Answer every request with the error for a short, bounded time; then close."""
    app = conn.app
    deadline = time.monotonic() + ERROR_WINDOW
    sent = 0
    try:
        replies = answers.feed(pending + app.take())  # what the app sent while we dialled
        while True:
            if replies:
                app.write(b"".join(replies))
                sent += len(replies)
            if answers.broken or sent >= ERROR_MAX_REPLIES:
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
            replies = answers.feed(data)
    except OSError:
        pass
    finally:
        if sent == 0 and (reply := answers.unprompted()) is not None:
            # the app sent nothing yet; leave one reply in its socket so its first read shows it
            app.write(reply)
        app.close()
