"""Transcript tests for the session glue: the proxy in-process, both peers scripted.

Like mitmproxy's layer tests: no sockets, no servers, no TLS.  The app and the server
are ``Peer`` objects on fake transports; the test sends bytes from either side and
expects what dbmtls writes to the other, in order.  The real ``Proxy._run`` drives the
real session driver of the configured protocol, so what is tested is exactly what runs
in production, minus the kernel and OpenSSL:

* ``ScriptedDialer`` replaces ``Dialer``: ``connect`` hands out a scripted server (or
  raises the error it was told to), and ``start_tls`` does everything the real one does
  before and after the handshake (identity choice, the no-over-read check, the name of
  the identity used) but no handshake itself: after it, the script's bytes stand for the
  decrypted stream.
* Waiting is on events (every write sets one), bounded by a timeout that only fails a
  broken test; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from dbmtls.config.model import Config
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.runtime import Conn, DatabaseRuntime
from dbmtls.proxy.server import Proxy, _Accepted
from dbmtls.proxy.upstream import Dialer

STEP_TIMEOUT = 5.0  # only a broken test waits this long


class FakeTransport(asyncio.Transport):
    """One side of a connection: what dbmtls writes is collected, what the peer sends is fed."""

    def __init__(self, protocol: asyncio.BaseProtocol, *, tls: bool = False) -> None:
        super().__init__()
        self._protocol = protocol
        self.written = bytearray()
        self.written_after_close = 0
        self.closing = False
        self.aborted = False
        self.reading = True
        self.eof_written = False
        self.tls = tls
        self.changed = asyncio.Event()
        self._lost = False

    # --- asyncio.Transport -----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            # a real transport refuses or drops this; the harness makes it visible
            self.written_after_close += len(data)
            return
        self.written += data
        self.changed.set()

    def close(self) -> None:
        self._shut()

    def abort(self) -> None:
        self.aborted = True
        self._shut()

    def _shut(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.changed.set()
        asyncio.get_running_loop().call_soon(self._connection_lost, None)

    def _connection_lost(self, exc: BaseException | None) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(cast(Exception | None, exc))

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return not self.tls  # TLS transports cannot half-close, like asyncio's

    def write_eof(self) -> None:
        self.eof_written = True
        self.changed.set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("127.0.0.1", 50000)
        if name == "ssl_object":
            return self if self.tls else None  # the relay only asks whether there is one
        return default


class Peer:
    """A scripted app or server: send bytes into dbmtls, expect what dbmtls wrote to it."""

    def __init__(self, name: str, transport: FakeTransport) -> None:
        self.name = name
        self.transport = transport
        self._read = 0

    @property
    def protocol(self) -> asyncio.Protocol:
        return cast(asyncio.Protocol, self.transport.get_protocol())

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def send_eof(self) -> None:
        """The peer half-closes.  As asyncio does, the transport closes unless the protocol
        returns True, and a TLS transport closes whatever it returns."""
        keep_open = self.protocol.eof_received()
        if not keep_open or self.transport.tls:
            self.transport.close()

    def reset(self, exc: BaseException | None = None) -> None:
        """The peer's connection is lost with an error (a reset by default, or ``exc``)."""
        self.transport.closing = True
        self.transport._connection_lost(exc or ConnectionResetError("connection reset by peer"))

    def hang_up(self) -> None:
        """The peer's connection ends cleanly (a close after which nothing more arrives)."""
        self.transport.closing = True
        self.transport._connection_lost(None)

    def pending(self) -> bytes:
        """What dbmtls wrote that the test has not taken yet."""
        return bytes(self.transport.written[self._read :])

    async def _until(self, ready: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(STEP_TIMEOUT):
            while not ready():
                self.transport.changed.clear()
                await self.transport.changed.wait()
        if not ready():  # pragma: no cover - the timeout raises first
            raise AssertionError(what)

    async def receive(self, n: int) -> bytes:
        """The next ``n`` bytes dbmtls wrote to this peer."""
        try:
            await self._until(lambda: len(self.transport.written) - self._read >= n, f"{n} bytes")
        except TimeoutError:
            raise AssertionError(f"{self.name}: expected {n} bytes, got {self.pending()!r}") from None
        data = bytes(self.transport.written[self._read : self._read + n])
        self._read += n
        return data

    async def expect(self, data: bytes) -> None:
        got = await self.receive(len(data))
        assert got == data, f"{self.name} got {got!r}, expected {data!r}"

    async def closed(self) -> bytes:
        """Wait until dbmtls closed this side; return what it wrote before that (not yet taken)."""
        try:
            await self._until(lambda: self.transport.closing, "close")
        except TimeoutError:
            raise AssertionError(f"{self.name}: not closed; pending {self.pending()!r}") from None
        rest = self.pending()
        self._read = len(self.transport.written)
        return rest


class ScriptedDialer(Dialer):
    """A Dialer whose servers are ``Peer`` objects the test scripts.

    Only the two steps that need a network are replaced (``open``: TCP, ``handshake``: TLS);
    everything around them (timeouts, identity choice, the no-over-read check, error
    classification, histograms) is the production code.
    """

    def __init__(self) -> None:
        self.servers: asyncio.Queue[Peer] = asyncio.Queue()
        self.refuse: BaseException | None = None  # what the OS says instead of connecting
        self.handshake_error: BaseException | None = None  # what OpenSSL says instead of a handshake
        self.contexts: list[ssl.SSLContext] = []  # the context (identity) of every handshake, in order
        self.transports: list[FakeTransport] = []
        self.hosts: list[str] = []  # where each connection was opened (an address in dns.mode direct)

    async def open(self, conn: Conn, ep: Endpoint, host: str) -> None:
        self.hosts.append(host)
        if self.refuse is not None:
            raise self.refuse
        transport = FakeTransport(ep)
        self.transports.append(transport)
        ep.connection_made(transport)
        self.servers.put_nowait(Peer("server", transport))

    async def handshake(
        self, conn: Conn, ep: Endpoint, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
    ) -> ssl.SSLObject | None:
        if self.handshake_error is not None:
            raise self.handshake_error
        assert isinstance(ep.transport, FakeTransport)
        ep.transport.tls = True
        ep.tls = True
        self.contexts.append(ctx)
        return None

    async def server(self) -> Peer:
        """The next server connection dbmtls opens."""
        async with asyncio.timeout(STEP_TIMEOUT):
            return await self.servers.get()


class Harness:
    def __init__(self, config: Config) -> None:
        self.dialer = ScriptedDialer()
        # The scripted dialer and the fake transports are the Python plane's seams; the native
        # plane takes real sockets (its sessions run against real processes: the data_plane fixture).
        self.proxy = Proxy(config.model_copy(update={"dataPlane": "python"}), dialer=self.dialer)
        for rt in self.proxy.runtimes.values():
            rt.tls.load()
        self.conns: list[Conn] = []

    def runtime(self, name: str | None = None) -> DatabaseRuntime:
        return self.proxy.runtimes[name] if name else next(iter(self.proxy.runtimes.values()))

    def connect(self, name: str | None = None) -> Peer:
        """A new app connection to the database's listener."""
        rt = self.runtime(name)
        accepted = _Accepted(self.proxy, rt)
        transport = FakeTransport(accepted)
        self.dialer.transports.append(transport)
        accepted.connection_made(transport)
        self.conns.extend(c for c in rt.active if c not in self.conns)
        return Peer("app", transport)

    async def finished(self) -> list[Conn]:
        """Wait for every session task to end; return the connections (with .error set)."""
        tasks = list(self.proxy._tasks)
        if tasks:
            async with asyncio.timeout(STEP_TIMEOUT):
                await asyncio.gather(*tasks)
        return self.conns


@asynccontextmanager
async def harness(config: Config) -> AsyncIterator[Harness]:
    h = Harness(config)
    try:
        yield h
    finally:
        h.proxy.close_all()
        if h.proxy._tasks:
            await asyncio.wait(list(h.proxy._tasks), timeout=STEP_TIMEOUT)
    late = [t.written_after_close for t in h.dialer.transports if t.written_after_close]
    assert not late, f"dbmtls wrote {late} bytes to transports it had already closed"


def tls_alert(reason: str) -> ssl.SSLError:
    """An ssl.SSLError as OpenSSL raises it for a TLS alert from the server."""
    err = ssl.SSLError(1, f"[SSL: {reason}] tlsv13 alert (_ssl.c:2580)")
    err.reason = reason
    return err
