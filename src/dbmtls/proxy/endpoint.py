"""A transport during the handshake phase: bounded buffer, awaitable reads, explicit leftovers.

Handshakes are driven by sans-IO machines (``dbmtls.protocols``); this class is
the few lines of asyncio that feed them.  Reads return *whatever arrived*
(never more than what the peer sent), so an upgrade can check that nothing
is buffered beyond the server's one-byte answer before it starts TLS
(docs/protocols/README.md#no-over-read).  When the handshake is over, ``detach()`` hands the
transport and any unread bytes to the relay, which installs its own protocol.
"""

from __future__ import annotations

import asyncio
from typing import cast

# More than this buffered during a handshake means the peer is not speaking the
# protocol (a MySQL handshake packet is < 64 KiB, a startup packet < 10000 bytes);
# reading is paused until the machine consumes it.
HANDSHAKE_BUFFER_LIMIT = 256 * 1024


class Endpoint(asyncio.Protocol):
    # one or two per connection, alive as long as it is: no instance dict (docs/memory.md)
    __slots__ = ("_buffer", "_eof", "_exc", "_paused", "_waiter", "closed", "successor", "tls", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.closed = False
        self.tls = False  # set once TLS runs on this transport: eof_received must then return False
        self.successor: asyncio.Protocol | None = None  # who took the transport over (see detach)

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.successor is not None:
            self.successor.data_received(data)
            return
        self._buffer += data
        if len(self._buffer) > HANDSHAKE_BUFFER_LIMIT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        if self.successor is not None:
            return self.successor.eof_received()
        self._eof = True
        self._wake()
        # Keep the write side open (the machine may still answer); TLS transports cannot
        # half-close and warn if asked to.
        return not self.tls

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.successor is not None:
            # uvloop binds a callback to the protocol when it *schedules* it: a close that
            # was already queued when the relay took over still arrives here.  Pass it on,
            # or the relay would wait for it forever.
            self.successor.connection_lost(cast(Exception | None, exc))
            return
        self._eof = True
        self.closed = True
        self._exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --- for the session coroutines ---------------------------------------------

    async def receive(self) -> bytes:
        """Bytes that arrived (at least one), or b"" at EOF.  Raises the transport's error, if any."""
        while not self._buffer and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self._buffer and self._exc is not None:
            raise self._exc
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def take(self) -> bytes:
        """Whatever is buffered now, without waiting (possibly b"")."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def buffered(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def abort_if_open(self) -> None:
        """Abort, unless it is closing already (a close that flushes is left to finish)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Give up the transport (the relay installs its own protocol) and the unread bytes.

        The new owner sets ``successor``, so callbacks already queued for this object reach it.
        """
        assert self.transport is not None
        data = bytes(self._buffer)
        self._buffer.clear()
        return self.transport, data

    @property
    def error(self) -> BaseException | None:
        """What the transport was lost with (None while open or after a clean close)."""
        return self._exc

    @property
    def eof_seen(self) -> bool:
        return self._eof
