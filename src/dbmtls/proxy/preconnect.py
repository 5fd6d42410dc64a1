"""Upstream connections made ahead of the app connections that will use them (``preconnect``).

For the TLS-first protocols (redis, mongodb, tcp) an upstream connection is the same whatever
app connection gets it, until the app's first byte: TCP connected, TLS handshaken with the
database's default identity, nothing sent.  The pool keeps ``preconnect.connections`` of them
ready; an app connection takes one instead of dialing, and the pool dials a replacement in the
background.  See docs/tls-resumption.md for what it gains and when.

What is never handed out:

* a connection the server closed (or sent anything on) while it waited: the Python plane's
  ``Endpoint`` and the native plane's ``NativeUpstream`` both see it at once;
* one older than ``preconnect.maxIdle``: replaced before servers' idle timeouts (Redis
  ``timeout``, a load balancer's) could close it under the app;
* one made with a context that is no longer current: after a reload (a rotated client
  certificate) connections of the old identity are closed, never used.

Only the default identity is pooled: an app connection with another identity (there is none for
these protocols today) dials as before.  When the server fails, the pool backs off (1s doubling
to 30s) and app connections dial themselves meanwhile, with the errors they always had.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass

from dbmtls.errors import DbmtlsError
from dbmtls.logs import LOG
from dbmtls.native.plane import NativeUpstream
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.runtime import Conn, DatabaseRuntime

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
CHECK = 1.0


@dataclass
class _Ready:
    up: Endpoint | NativeUpstream
    ctx: ssl.SSLContext | None
    made: float
    tls_version: str | None
    cipher: str | None
    tls_resumed: bool
    upstream_tls: tuple[ssl.SSLContext, ssl.SSLObject | None] | None

    def usable(self) -> bool:
        up = self.up
        if isinstance(up, NativeUpstream):
            return not (up.closed or up.lost)
        return not (up.closed or up.eof_seen or up.buffered())


class Pool:
    """``rt.db.preconnect.connections`` handshaken upstream connections of one database."""

    def __init__(self, rt: DatabaseRuntime) -> None:
        self.rt = rt
        self.size = rt.db.preconnect.connections
        self.max_idle = rt.db.preconnect.maxIdle
        self.ready: list[_Ready] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._fill())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for entry in self.ready:
            entry.up.abort()
        self.ready.clear()

    def _current(self) -> ssl.SSLContext | None:
        try:
            return self.rt.tls.context_for(None)
        except DbmtlsError:
            return None  # not loaded: nothing pooled is current either

    def _discard_stale(self) -> None:
        now = time.monotonic()
        current = self._current()
        keep: list[_Ready] = []
        for entry in self.ready:
            if entry.usable() and entry.ctx is current and now - entry.made < self.max_idle:
                keep.append(entry)
            else:
                entry.up.abort()
                self.rt.stats.preconnect_discarded += 1
        self.ready = keep

    def take(self, conn: Conn) -> Endpoint | NativeUpstream | None:
        """A handshaken upstream for ``conn`` (its bookkeeping filled in), or None: dial."""
        self._discard_stale()
        self._wake.set()  # replace what was taken or discarded
        if not self.ready:
            return None
        entry = self.ready.pop()  # the newest: the furthest from maxIdle
        conn.upstream = entry.up
        conn.tls_version = entry.tls_version
        conn.cipher = entry.cipher
        conn.tls_resumed = entry.tls_resumed
        conn.upstream_tls = entry.upstream_tls
        conn.preconnected = True
        self.rt.stats.preconnect_used += 1
        return entry.up

    async def _dial_one(self) -> _Ready:
        # a connection of the pool's own: its bookkeeping is copied to the app's at take()
        conn = Conn(self.rt, Endpoint(), "preconnect")
        ctx = self._current()
        plane = self.rt.native
        up: Endpoint | NativeUpstream
        if plane is None:
            up = await self.rt.dialer.dial(conn)
        else:
            up = await plane.dial(conn)
        return _Ready(up, ctx, time.monotonic(), conn.tls_version, conn.cipher, conn.tls_resumed, conn.upstream_tls)

    async def _fill(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            self._discard_stale()
            if len(self.ready) < self.size:
                try:
                    entry = await self._dial_one()
                except Exception as exc:
                    if not isinstance(exc, DbmtlsError):
                        # a bug of ours: say so, and keep the pool alive (app connections dial)
                        LOG.exception("preconnect: internal error", extra={"fields": {"db": self.rt.name}})
                    elif not self._failing:
                        LOG.warning(
                            "preconnect: cannot make a connection ahead; app connections dial themselves",
                            extra={"fields": {"db": self.rt.name, "error": exc.message, "retry": f"{backoff:g}s"}},
                        )
                    self._failing = True
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                if self._failing:
                    LOG.info("preconnect: connections ahead again", extra={"fields": {"db": self.rt.name}})
                self._failing = False
                backoff = BACKOFF_FIRST
                if entry.ctx is self._current():
                    self.ready.append(entry)
                else:
                    entry.up.abort()  # a reload happened while it was being made
                continue
            # full: wake when one is taken, when the oldest reaches maxIdle, and at least every
            # CHECK seconds: a reload or a server that closed one is seen (and replaced) soon
            oldest = min(e.made for e in self.ready)
            wait = min(max(oldest + self.max_idle - time.monotonic(), 0.0), CHECK)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
