"""The asyncio side of the native data plane: hand sockets over, await what the workers report.

One ``NativePlane`` per process owns one ``dbmtls._native.Engine`` (its worker threads).  The
engine's eventfd is watched by the event loop: a batch of events (a handshake done, a server that
failed before its first byte, a connection over) costs one callback, and resolves the futures the
sessions await.  Nothing here runs per chunk.

For a session the plane replaces two steps, and only those:

* ``dial``: the TCP connect stays the Dialer's (name resolution, ``connectTimeout``, the connect
  histogram, its errors); the connected socket is then taken from the event loop
  (``_take_socket``) and the worker performs the TLS handshake.  A failure comes back as the
  exception Python's ``ssl`` module would have raised (``_exception``), so ``Dialer.failure``
  classifies it as it does today: same error class, same message, same protocol-native answer.
* ``NativeUpstream.relay``: the app's socket is taken too, and the worker relays until both sides
  are closed, with the Python relay's semantics (``dbmtls.proxy.relay``): backpressure, half-close
  and the linger, resets passed on as resets, the idle timeout, and a server that fails before its
  first byte reported back (``early``) so the session can tell the app in its protocol.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from dbmtls.errors import UpstreamError, UpstreamProtocolError
from dbmtls.logs import LOG
from dbmtls.native.tls import twin_of
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.relay import ClosedBeforeAnswer, Side
from dbmtls.proxy.runtime import Conn
from dbmtls.tls.context import check_peer_names, needs_name_check
from dbmtls.tls.resume import BACKOFF, ResumptionRefused, refused_resumption

# error kinds of the extension (_native.c, errinfo_t)
_E_OS, _E_SSL, _E_VERIFY, _E_EOF, _E_SILENT = 1, 2, 3, 4, 5
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH: CPython words these itself
_HOSTNAME_MISMATCH, _IP_MISMATCH = 62, 64


def _target(conn: Conn) -> str:
    host, port = conn.rt.db.dial_target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _exception(err: tuple[int, int, str, str, str], server_name: str) -> BaseException:
    """The exception Python's ssl module (or a socket) raises for what the worker saw."""
    kind, code, lib, reason, text = err
    if kind == _E_OS:
        return OSError(code, os.strerror(code))  # ConnectionResetError, BrokenPipeError, ...
    if kind == _E_VERIFY:
        if code == _HOSTNAME_MISMATCH:
            text = f"Hostname mismatch, certificate is not valid for '{server_name}'."
        elif code == _IP_MISMATCH:
            text = f"IP address mismatch, certificate is not valid for '{server_name}'."
        exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {text}")
        exc.verify_code = code
        exc.verify_message = text
        exc.reason = "CERTIFICATE_VERIFY_FAILED"
        exc.library = "SSL"
        return exc
    if kind == _E_SSL:
        ssl_exc = ssl.SSLError(1, f"[{lib}: {reason}] {text}")
        ssl_exc.reason = reason
        ssl_exc.library = lib
        return ssl_exc
    if kind == _E_SILENT:
        return ClosedBeforeAnswer("the server closed the connection before answering")
    # a closed connection where TLS needed more (uvloop says the same during a handshake)
    return ConnectionResetError("the connection was closed during the TLS exchange")


def _take_socket(ep: Endpoint) -> int:
    """Take ``ep``'s socket from the event loop: a descriptor of our own, then the transport is
    aborted.  libuv removes the socket from its epoll set before it closes its descriptor, so the
    event loop never hears of it again; ours keeps the connection (the kernel closes a socket with
    its last descriptor).  Whatever the transport had read is in ``ep``'s buffer (detach())."""
    transport = ep.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    transport.abort()
    ep.transport = None  # close()/abort() on the endpoint are no-ops from now on
    return fd


class _PeerCert:
    """What ``check_peer_names`` reads from an SSL object, for the DER the worker sent."""

    def __init__(self, der: bytes | None) -> None:
        self._der = der

    def getpeercert(self, binary_form: bool = True) -> bytes | None:
        return self._der


@dataclass(slots=True)
class _Handshake:
    ok: bool
    version: str
    cipher: str
    der: bytes | None
    err: tuple[int, int, str, str, str]
    resumed: bool = False  # a session was resumed (docs/tls-resumption.md)
    offered: bool = False  # a cached session was offered


class NativePlane:
    """The process's native engine, bound to the running event loop (``start`` / ``close``)."""

    def __init__(self, module: ModuleType, threads: int = 1) -> None:
        self.module = module
        self.threads = threads
        self.engine: Any = None
        self._links: dict[int, NativeUpstream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine = self.module.Engine(threads=self.threads)
        self._loop.add_reader(self.engine.fileno(), self._dispatch)

    def close(self) -> None:
        """Stop the workers (after the drain: whatever is still open is closed)."""
        if self.engine is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.engine.fileno())
        self.engine.close()
        self._dispatch()  # settle whatever the workers said last
        self.engine = None

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def _dispatch(self) -> None:
        for event in self.engine.events():
            link = self._links.get(event[0])
            if link is None:
                continue
            kind = event[1]
            if kind == "handshake":
                link._handshake_done(_Handshake(*event[2:]))
            elif kind == "early":
                link._early(event[2])
            elif kind == "lost":
                link._lost(event[2])
            elif kind == "data":
                link._wake()
            elif kind == "copy":
                link._copy(event[2])
            else:
                del self._links[event[0]]
                _, _, failed_side, err, idled, _from_app, _from_up = event
                link._closed(failed_side, err, idled)

    # --- what sessions call ------------------------------------------------------------------

    async def dial(self, conn: Conn, user: str | None = None) -> NativeUpstream:
        """TCP connect (the Dialer's), then the TLS handshake in a native worker.

        As ``Dialer.dial``: a handshake that offered a session and failed is tried once more,
        on a new connection, without one (nothing of the app's was sent yet).
        """
        try:
            return await self._dial_once(conn, user)
        except ResumptionRefused:
            LOG.info(
                "the server refused a resumed TLS session; retrying without one "
                f"(no session is offered to it for {BACKOFF:g}s)",
                extra={"fields": {"db": conn.rt.name, "upstream": _target(conn)}},
            )
            try:
                return await self._dial_once(conn, user)
            except UpstreamError:
                # failed without a session too: not a refusal of resumption (tls.resume forgive);
                # a backoff of 0 lifts it (the sessions were dropped with the refusal)
                ctx = conn.rt.tls.context_for(user)
                if ctx is not None:
                    twin_of(ctx).refuse_sessions(conn.rt.db.server_name, 0)
                raise

    async def _dial_once(self, conn: Conn, user: str | None) -> NativeUpstream:
        ep = await conn.rt.dialer.connect(conn)
        try:
            return await self._start_tls(conn, ep, user)
        except BaseException:
            ep.abort()
            raise

    async def start_tls(self, conn: Conn, ep: Endpoint, user: str | None = None) -> NativeUpstream:
        """``Dialer.start_tls`` on the native plane: the same checks, timeout and errors."""
        try:
            return await self._start_tls(conn, ep, user)
        except ResumptionRefused as exc:
            raise exc.error from None

    async def _start_tls(self, conn: Conn, ep: Endpoint, user: str | None) -> NativeUpstream:
        db = conn.rt.db
        dialer = conn.rt.dialer
        ctx = conn.rt.tls.context_for(user)  # fails closed, as in Dialer.start_tls
        if ep.buffered():
            # see Dialer.start_tls and docs/protocols/README.md#no-over-read
            raise UpstreamProtocolError(
                f"server {_target(conn)} sent unencrypted data before the TLS handshake (possible man-in-the-middle)"
            )
        fd = _take_socket(ep)
        up = NativeUpstream(self, fd, ctx, db.server_name)
        conn.upstream = up
        if ctx is None:  # tls.mode DISABLE: a plain TCP relay
            await up._handshake
            return up
        started = time.monotonic()
        try:
            async with asyncio.timeout(db.handshakeTimeout):
                result = await up._handshake
        except TimeoutError:
            up.abort()
            err = dialer.failure(conn, TimeoutError())
            raise err.with_message(
                f"TLS handshake with {_target(conn)} timed out after {db.handshakeTimeout:g}s"
            ) from None
        except BaseException:
            up.abort()
            raise
        if not result.ok:
            err = dialer.failure(conn, _exception(result.err, db.server_name))
            if result.offered and refused_resumption(err):
                # the cache backs off from this server (tls.resume.SessionCache.refused)
                twin_of(ctx).refuse_sessions(db.server_name, round(BACKOFF * 1000))
                conn.rt.stats.tls_resume_refused += 1
                raise ResumptionRefused(err) from None
            raise err from None
        if needs_name_check(ctx):
            try:
                check_peer_names(_PeerCert(result.der), db.verify_names)  # type: ignore[arg-type]
            except BaseException:
                up.abort()
                raise
        # the future keeps its result for the connection's life; the certificate is not needed again
        result.der = None
        conn.rt.stats.handshake_seconds.observe(time.monotonic() - started)
        # interned: a few distinct values, otherwise two new strings per open connection
        conn.tls_version = sys.intern(result.version)
        conn.cipher = sys.intern(result.cipher) if result.cipher else None
        conn.tls_resumed = result.resumed
        if result.resumed:
            conn.rt.stats.tls_resumed += 1
        return up


class NativeUpstream:
    """A server connection held by a native worker: handshaken, waiting for ``relay``.

    Stands where an ``Endpoint`` stands for the sessions (``close``, ``abort``, ``closed``, and
    ``write``, ``receive``, ``take``, ``buffered`` for the steps over TLS before the relay:
    PostgreSQL's StartupMessage and first reply, the MySQL login).  Until the relay starts the
    worker reads the server as the Endpoint would: what it says is held (for ``receive``, or for
    the app), and if it goes away ``lost`` is set at once (with ``error``, None for a clean close),
    so ``run_relay`` settles the connection while the app is still Python's.
    """

    # one per connection for its whole life: no instance dict (docs/memory.md)
    __slots__ = ("_handshake", "_relay", "_server_name", "_waiter", "closed", "error", "handle", "lost", "plane")

    def __init__(self, plane: NativePlane, fd: int, ctx: ssl.SSLContext | None, server_name: str) -> None:
        loop = asyncio.get_running_loop()
        self.plane = plane
        self._handshake: asyncio.Future[_Handshake] = loop.create_future()
        self._relay: NativeRelay | None = None
        self.closed = False
        self.lost = False
        self.error: BaseException | None = None
        self._server_name = server_name
        self._waiter: asyncio.Future[None] | None = None
        twin = twin_of(ctx) if ctx is not None else None
        self.handle = plane.engine.connect(
            fd,
            twin,
            server_name,
            check_hostname=ctx is not None and ctx.check_hostname,
            want_peer_cert=ctx is not None and needs_name_check(ctx),
        )
        plane._links[self.handle.id] = self

    # the Endpoint-like part

    def close(self) -> None:
        """Close gracefully (close_notify toward the server)."""
        if not self.closed:
            self.closed = True
            self.handle.close()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.handle.abort()

    def abort_if_open(self) -> None:
        self.abort()

    def take_held(self) -> bytes:
        """What the server sent before it went away (after ``lost``)."""
        held: bytes = self.handle.take_held()
        return held

    def write(self, data: bytes) -> None:
        """Toward the server, before the relay (the worker writes it; a failure is reported as a
        loss, and ``receive`` raises it, as a transport's ``connection_lost`` does)."""
        if data and not self.closed and not self.lost:
            self.handle.write(data)

    def take(self) -> bytes:
        """The server bytes held now, without waiting (possibly b"")."""
        data: bytes = self.handle.take()
        return data

    def buffered(self) -> int:
        n: int = self.handle.held
        return n

    async def receive(self) -> bytes:
        """Bytes the server sent (at least one), or b"" once it is gone; raises what it failed
        with, as ``Endpoint.receive``.  Cancel-safe: bytes are taken only by a task that returns
        them, so a cancelled receive leaves them held for the next one."""
        while True:
            data = self.take()
            if data:
                return data
            if self.lost or self.closed:
                if self.error is not None:
                    raise self.error
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def eof_seen(self) -> bool:
        return self.lost or self.closed

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # the relay

    def relay(
        self,
        conn: Conn,
        *,
        app_pending: bytes,
        early_upstream_error: Callable[[BaseException], bytes | None] | None,
        expect_reply_within: float | None,
        idle_timeout: float | None,
        upstream_pending: bytes = b"",
        watch_upstream: Callable[[bytes], bool] | None = None,
    ) -> NativeRelay:
        """Hand the app's socket over too and relay (``dbmtls.proxy.relay.Relay``'s semantics).

        ``upstream_pending`` (server bytes read before) goes to the app first; ``watch_upstream``
        sees them, then each server chunk the worker relays, until it returns True (as
        ``Relay.watch_upstream``; the worker posts a copy of each chunk only while watched).
        """
        app_t, app_buf = conn.app.detach()
        if app_t.get_write_buffer_size():
            # The TLS-first sessions write nothing to the app before the relay; one that does
            # must wait for its transport to drain before it hands the socket over.
            raise RuntimeError("the app's transport still has bytes to send")
        relay = NativeRelay(self, conn.rt.db.server_name, early_upstream_error)
        self._relay = relay
        if watch_upstream is not None and not watch_upstream(upstream_pending):
            relay._watch = watch_upstream
        fd = _take_socket(conn.app)
        self.closed = True  # from now on the relay owns it (NativeRelay.abort)
        self.handle.relay(
            fd,
            app_pending + app_buf,
            round(expect_reply_within * 1000) if expect_reply_within is not None else 0,
            round(idle_timeout * 1000) if idle_timeout is not None else 0,
            upstream_pending,
            relay._watch is not None,
        )
        return relay

    # events

    def _handshake_done(self, result: _Handshake) -> None:
        if not self._handshake.done():
            self._handshake.set_result(result)
        if not result.ok:
            self.closed = True

    def _early(self, err: tuple[int, int, str, str, str]) -> None:
        if self._relay is not None:
            self._relay._early(err)

    def _copy(self, data: bytes) -> None:
        if self._relay is not None:
            self._relay._copy(data)

    def _lost(self, err: tuple[int, int, str, str, str]) -> None:
        if self._relay is not None:
            return  # the relay started meanwhile: the worker reports it through the relay
        self.lost = True
        self.error = None if err[0] in (_E_EOF, _E_SILENT) else _exception(err, self._server_name)
        self._wake()

    def _closed(self, failed_side: int, err: tuple[int, int, str, str, str], idled: bool) -> None:
        self.closed = True
        if not self._handshake.done():
            self._handshake.set_result(_Handshake(False, "", "", None, (_E_EOF, 0, "", "", "")))
        self._wake()
        if self._relay is not None:
            self._relay._closed(failed_side, err, idled)


class NativeRelay:
    """What ``Relay`` is to a session (``run_relay``, the metrics, the drain), for a native relay."""

    __slots__ = ("_early_hook", "_server_name", "_up", "_watch", "done", "error", "failed_side", "idled")

    def __init__(
        self,
        up: NativeUpstream,
        server_name: str,
        early_upstream_error: Callable[[BaseException], bytes | None] | None,
    ) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None
        self.failed_side: Side | None = None
        self.idled = False
        self._up = up
        self._server_name = server_name
        self._early_hook = early_upstream_error
        self._watch: Callable[[bytes], bool] | None = None

    @property
    def bytes_from_app(self) -> int:
        n: int = self._up.handle.bytes_from_app
        return n

    @property
    def bytes_from_upstream(self) -> int:
        n: int = self._up.handle.bytes_from_upstream
        return n

    def abort(self) -> None:
        self._up.handle.abort()

    def _early(self, err: tuple[int, int, str, str, str]) -> None:
        exc = _exception(err, self._server_name)
        self.error = exc
        self.failed_side = Side.UPSTREAM
        message = self._early_hook(exc) if self._early_hook is not None else None
        self._up.handle.fail_app(message or b"")

    def _copy(self, data: bytes) -> None:
        """A copy of a server chunk the worker relayed, while watched."""
        if self._watch is not None and self._watch(data):
            self._watch = None
            self._up.handle.unwatch()  # copies already posted are ignored

    def _closed(self, failed_side: int, err: tuple[int, int, str, str, str], idled: bool) -> None:
        self._watch = None
        if self.error is None and failed_side:
            self.error = _exception(err, self._server_name)
            self.failed_side = Side.APP if failed_side == 1 else Side.UPSTREAM
        self.idled = idled
        self._early_hook = None  # the session's closure over its Conn: no cycle left behind
        if not self.done.done():
            self.done.set_result(None)
