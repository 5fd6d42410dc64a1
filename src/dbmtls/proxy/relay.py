"""The data path after the handshake: two protocol objects, one Python call per chunk.

Each ``_Half`` is the protocol of one transport and writes what it reads into
the other transport.  Everything else happens off the per-chunk path:

* backpressure: when a transport's write buffer passes its high-water mark,
  asyncio calls ``pause_writing`` on *its* protocol, which pauses reading on
  the transport feeding it (and resumes at the low-water mark), so a slow
  reader bounds memory at about the write-buffer limit per direction;
* half-close: a TCP EOF is passed on with ``write_eof`` where the other side
  can (plain TCP).  TLS cannot half-close in asyncio, so after the app's EOF
  the server side stays open while it keeps sending and is closed once it has
  been quiet for ``HALF_CLOSE_LINGER`` seconds (checked by a timer that compares
  byte counters, not per chunk);
* close: when one side is gone cleanly, the other is closed after its buffer drains;
  when one side is lost with an error (a reset, a TLS failure) the other is *aborted*,
  so a truncated reply is never passed on as a clean end of stream (``failure`` says which);
* idle timeout: a timer compares the byte counters every quarter of ``idle_timeout``
  and closes both sides once nothing moved for that long (``idled`` says so).

Byte counters are plain ints on the halves; metrics read them when scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections.abc import Callable

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
HALF_CLOSE_LINGER = 1.0


class Side(enum.Enum):
    APP = enum.auto()
    UPSTREAM = enum.auto()


def reset(transport: asyncio.Transport) -> None:
    """Abort with a TCP RST (SO_LINGER 0): a plain abort() would still end with a FIN, which the
    peer reads as a clean end of stream."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class ClosedBeforeAnswer(ConnectionResetError):
    """The server closed cleanly, without a byte, right after the relay started (see Relay)."""


class _Half(asyncio.Protocol):
    __slots__ = ("eof", "nbytes", "peer", "relay", "transport", "write")

    def __init__(self, relay: Relay, transport: asyncio.Transport, peer: asyncio.Transport) -> None:
        self.relay: Relay | None = relay  # None once the relay is over (see Relay._release)
        self.transport = transport
        self.peer = peer
        self.write = peer.write  # bound once: the hot path is this call and one addition
        self.nbytes = 0
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.write(data)
        self.nbytes += len(data)

    def pause_writing(self) -> None:
        # our transport's buffer is full: stop reading from the side that fills it
        if not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return self.relay is not None and self.relay._half_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            self.relay._half_lost(self, exc)


class _Tap(asyncio.Protocol):
    """Stands in front of a half until ``watch`` says it has seen enough, then steps aside.

    Lets a session watch the first chunks of a direction (PostgreSQL: BackendKeyData during
    startup) and then hand the transport back to the half, so the steady state has no extra
    call per chunk.
    """

    def __init__(self, half: _Half, watch: Callable[[bytes], bool]) -> None:
        self.half = half
        self.watch = watch

    def data_received(self, data: bytes) -> None:
        self.half.data_received(data)
        if self.watch(data):
            self.half.transport.set_protocol(self.half)

    def eof_received(self) -> bool | None:
        return self.half.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.half.connection_lost(exc)

    def pause_writing(self) -> None:
        self.half.pause_writing()

    def resume_writing(self) -> None:
        self.half.resume_writing()


class Relay:
    """Relays between an app transport and an upstream transport until both are closed."""

    def __init__(
        self,
        app: asyncio.Transport,
        upstream: asyncio.Transport,
        *,
        app_pending: bytes = b"",
        upstream_pending: bytes = b"",
        early_upstream_error: Callable[[BaseException], bytes | None] | None = None,
        expect_reply_within: float | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self.error: BaseException | None = None
        self._early = early_upstream_error
        # Client-first protocols (Redis, MongoDB): a server that closes before its first byte
        # while the app is still there, soon after the handshake, has failed even when it closed
        # cleanly (TLS 1.3: it rejected our certificate).  Later, a clean close is the server's
        # own business (an idle timeout) and is passed on as an EOF.
        self._reply_deadline = loop.time() + expect_reply_within if expect_reply_within is not None else None
        # Which side was lost with an error first ("app" / "upstream"), once one was.
        self.failed_side: Side | None = None
        self.idled = False
        self._idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_seen = -1
        self._idle_since = loop.time()
        self._linger: asyncio.TimerHandle | None = None
        self._lost = 0
        self.app_t = app
        self.up_t = upstream
        self.from_app = _Half(self, app, upstream)
        self.from_up = _Half(self, upstream, app)
        for t in (app, upstream):
            t.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        # Leftovers read by the handshake machines go first, in order (not into a transport that
        # is already closing: what it would say is lost either way, and it may refuse the write).
        if app_pending and not upstream.is_closing():
            upstream.write(app_pending)
            self.from_app.nbytes += len(app_pending)
        if upstream_pending and not app.is_closing():
            app.write(upstream_pending)
            self.from_up.nbytes += len(upstream_pending)
        app.set_protocol(self.from_app)
        upstream.set_protocol(self.from_up)
        if idle_timeout is not None:
            self._idle_seen = self.from_app.nbytes + self.from_up.nbytes
            self._idle_timer = loop.call_later(idle_timeout / 4, self._idle_check)
        if app.is_closing():
            # the app went away while the handshake finished: nothing to relay, both go
            self._close_both()
        else:
            # An upstream that is already closing (a TLS 1.3 server rejecting our certificate
            # right after the handshake) has its connection_lost queued: it reaches from_up,
            # and the early hook tells the app why.  Closing the app here would lose that.
            for t in (app, upstream):
                t.resume_reading()

    @property
    def bytes_from_app(self) -> int:
        return self.from_app.nbytes

    @property
    def bytes_from_upstream(self) -> int:
        return self.from_up.nbytes

    def watch_upstream(self, seen: bytes, watch: Callable[[bytes], bool]) -> None:
        """Call ``watch`` on each server chunk (after relaying it) until it returns True.

        ``seen`` are the server bytes relayed before the relay started (they are watched first).
        """
        if watch(seen) or self.up_t.is_closing():
            return
        self.up_t.set_protocol(_Tap(self.from_up, watch))

    def app_eof_before_start(self) -> None:
        """The app half-closed during the handshake: pass it on now."""
        self.from_app.eof = True
        if not self._half_eof(self.from_app):
            self.app_t.close()

    def _server_went_silent(self, half: _Half) -> bool:
        return (
            self._reply_deadline is not None
            and asyncio.get_running_loop().time() <= self._reply_deadline
            and half is self.from_up
            and half.nbytes == 0
            and self._lost == 0
            and not self.from_app.eof
        )

    def _half_eof(self, half: _Half) -> bool:
        if self._server_went_silent(half):
            # Passing the EOF on would leave the app nothing to read: close our side instead, and
            # connection_lost (which follows) tells the app what happened.
            return False
        peer = half.peer
        if peer.can_write_eof():
            if not peer.is_closing():
                peer.write_eof()
            if self.from_app.eof and self.from_up.eof:
                self._close_both()
            # A TLS transport cannot stay half-open (it closes itself after EOF whatever we
            # return) and logs a warning for every True: say False there.
            return half.transport.get_extra_info("ssl_object") is None
        if half is self.from_app:
            # app done sending, server side is TLS: let the server finish its answers
            self._arm_linger(self.from_up.nbytes)
            return True
        return False  # TLS side closed: our transport closes and connection_lost follows

    def _arm_linger(self, seen: int) -> None:
        loop = asyncio.get_running_loop()
        self._linger = loop.call_later(HALF_CLOSE_LINGER, self._linger_check, seen)

    def _linger_check(self, seen: int) -> None:
        if self.from_up.nbytes != seen and not self.up_t.is_closing():
            self._arm_linger(self.from_up.nbytes)
        else:
            self._close_both()

    def _half_lost(self, half: _Half, exc: Exception | None) -> None:
        if exc is None and self._server_went_silent(half):
            exc = ClosedBeforeAnswer("the server closed the connection before answering")
        self._lost += 1
        peer = half.peer
        if exc is not None and self.error is None and self._lost == 1:
            self.error = exc
            self.failed_side = Side.APP if half is self.from_app else Side.UPSTREAM
            if half is self.from_up and self.from_up.nbytes == 0 and self._early is not None:
                # The server failed before its first byte: with TLS 1.3 a rejected client
                # certificate shows up only now, as an alert.  Say so in the app's protocol.
                message = self._early(exc)
                if message and not self.app_t.is_closing():
                    self.app_t.write(message)
                peer.close()
            else:
                # Lost with an error mid-stream: pass it on as a reset, never as a clean end.
                reset(peer)
        elif not peer.is_closing():
            peer.close()  # flushes what is buffered first
        if self._lost >= 2:
            for timer in (self._linger, self._idle_timer):
                if timer is not None:
                    timer.cancel()
            self._release()
            if not self.done.done():
                self.done.set_result(None)

    def _release(self) -> None:
        """Both sides are gone: drop the references that make a finished relay a reference cycle.

        The halves point back at the relay, and ``early_upstream_error`` is the session's closure
        over its Conn, which points at the relay.  Left in place, every finished connection (its
        transports, SSL object and uvloop's 256 KiB TLS read buffer included) waits for the cyclic
        garbage collector, and under churn hundreds of them pile up and fragment the heap.
        """
        self._early = None
        self._linger = self._idle_timer = None
        self.from_app.relay = self.from_up.relay = None

    def _idle_check(self) -> None:
        loop = asyncio.get_running_loop()
        moved = self.from_app.nbytes + self.from_up.nbytes
        if moved != self._idle_seen:
            self._idle_seen = moved
            self._idle_since = loop.time()
        assert self._idle_timeout is not None
        if loop.time() - self._idle_since >= self._idle_timeout:
            self.idled = True
            self._close_both()
            return
        self._idle_timer = loop.call_later(self._idle_timeout / 4, self._idle_check)

    def _close_both(self) -> None:
        for t in (self.app_t, self.up_t):
            if not t.is_closing():
                t.close()

    def abort(self) -> None:
        for t in (self.app_t, self.up_t):
            t.abort()
