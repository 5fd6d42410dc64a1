"""Telling the application what went wrong, in its own protocol.

A session raises; before it does, it sets ``conn.notice`` to say how the app can be
told at that point of the conversation (a PostgreSQL ErrorResponse only once the
StartupMessage was read, a MySQL ERR packet whose format depends on the phase, a
Redis/MongoDB reply to each request, or nothing at all).  The proxy then calls
:meth:`Notice.tell` once, in one place, after recording the error.

``now`` is for the relay, which learns synchronously (in ``connection_lost``) that
the server failed before its first byte and must write the message before it
closes the app's side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from dbmtls.errors import DbmtlsError
from dbmtls.protocols.spec import ErrorAnswerer
from dbmtls.proxy.endpoint import Endpoint

# How long dbmtls keeps answering a Redis/MongoDB client with errors before it closes.
ERROR_WINDOW = 2.0
ERROR_MAX_REPLIES = 64


class Notice(Protocol):
    def now(self, err: DbmtlsError) -> bytes | None:
        """What to write to the app right away (None: nothing can be said)."""
        ...

    async def tell(self, app: Endpoint, err: DbmtlsError) -> None:
        """Tell the app and close its connection."""
        ...


class Reply:
    """One message, then close: PostgreSQL's ErrorResponse, MySQL's ERR packet."""

    def __init__(self, render: Callable[[DbmtlsError], bytes | None]) -> None:
        self._render = render

    def now(self, err: DbmtlsError) -> bytes | None:
        return self._render(err)

    async def tell(self, app: Endpoint, err: DbmtlsError) -> None:
        data = self._render(err)
        if data:
            app.write(data)
        app.close()  # flushes the message first


class Said:
    """The bytes to send are already known (e.g. the server's own ERR packet, renumbered)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def now(self, err: DbmtlsError) -> bytes | None:
        return self._data or None

    async def tell(self, app: Endpoint, err: DbmtlsError) -> None:
        if self._data:
            app.write(self._data)
        app.close()


class AnswerRequests:
    """Answer each of the app's requests with the error for a short, bounded time; then close.

    For Redis and MongoDB, whose clients may swallow the reply to a connect-time command
    and show only the next one.  ``seen`` are app bytes the session already read (they
    hold requests too).
    """

    def __init__(self, answerer: Callable[[DbmtlsError], ErrorAnswerer], seen: bytes = b"") -> None:
        self._answerer = answerer
        self._seen = seen

    def now(self, err: DbmtlsError) -> bytes | None:
        answers = self._answerer(err)
        return b"".join(answers.feed(self._seen)) or answers.unprompted()

    async def tell(self, app: Endpoint, err: DbmtlsError) -> None:
        answers = self._answerer(err)
        deadline = time.monotonic() + ERROR_WINDOW
        sent = 0
        try:
            replies = answers.feed(self._seen + app.take())  # what the app sent while we dialled
            while True:
                replies = replies[: ERROR_MAX_REPLIES - sent]  # a pipeline of thousands gets 64
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


async def tell_app(app: Endpoint, notice: Notice | None, err: DbmtlsError) -> None:
    if notice is None:
        app.close()
        return
    await notice.tell(app, err)
