"""The MySQL / MariaDB session: drive ``protocols.mysql.MySQLHandshake`` with two endpoints.

See ``docs/protocols/mysql.md`` for the conversation.

The machine decides everything (what to send, when to start TLS, which error to show); this
module only moves bytes and awaits.  MySQL's server speaks first, so the upstream connection is
opened before anything is said to the app; when that fails the app gets an ERR packet in the
pre-greeting format instead of a bare reset.  The machine knows which ERR format the app expects
at each point, so the session's notice is always the machine's own ``fail``.

Both endpoints are read at once during the whole connection phase: whose turn it is depends on
the auth plugin (auth switch, more-data rounds, the local RSA exchange), and an app that hangs up
while the server is slow must still be noticed.  Each endpoint has at most one pending
``receive()`` task; cancelling it never loses bytes (they stay in the endpoint's buffer until a
task actually takes them), so the relay picks up whatever arrived last.

The phase is bounded in time: the greeting must arrive within ``handshakeTimeout`` (a server
that never greets is not a MySQL server, or is overloaded) and the whole connection phase must
end within ``PHASE_TIMEOUT_FACTOR`` times that.  Buffers are bounded by the endpoint (paused
reading) and by the machine (its handshake limits).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from dbmtls.errors import UpstreamTimeout
from dbmtls.protocols import mysql
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.notice import Reply, Said
from dbmtls.proxy.runtime import Conn, DatabaseRuntime
from dbmtls.proxy.sessions.common import Upstream, run_relay, start_tls

# The whole connection phase (greeting to final OK) may take this many handshakeTimeouts.
PHASE_TIMEOUT_FACTOR = 3.0

# dbmtls's RSA key for the caching_sha2_password / sha256_password exchange with the app
# (docs/protocols/mysql.md).  Generating it takes ~100 ms of CPU, so the first MySQL sessions
# wait for it in a thread (while their upstream connect is under way) instead of blocking the
# event loop in the middle of someone's login.  The lock makes sure exactly one key is ever made.
_key_lock = threading.Lock()
_key_made = False


def _make_rsa_key() -> None:
    global _key_made
    with _key_lock:
        mysql.proxy_rsa_key()
        _key_made = True


async def _ensure_rsa_key() -> None:
    if not _key_made:
        await asyncio.to_thread(_make_rsa_key)


class _Reader:
    """At most one pending ``receive()`` per endpoint."""

    def __init__(self, ep: Upstream) -> None:
        self.ep = ep
        self.task: asyncio.Task[bytes] | None = None

    def pending(self) -> asyncio.Task[bytes]:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.ep.receive())
        return self.task

    def stop(self) -> bytes:
        """Drop the pending read; return what it had already taken (cancelling loses nothing)."""
        task, self.task = self.task, None
        if task is None:
            return b""
        if not task.done():
            task.cancel()
            return b""
        if task.cancelled() or task.exception() is not None:
            return b""
        return task.result()


@dataclass
class _Phase:
    """The connection phase in progress: when it started and the reader of each side."""

    started: float
    app: _Reader
    up: _Reader


class MySQLSession:
    native_capable = True  # TLS through sessions.common.start_tls, relayed by run_relay: dataPlane native applies

    def __init__(self, rt: DatabaseRuntime) -> None:
        self.rt = rt
        self.dialer = rt.dialer

    async def run(self, conn: Conn) -> None:
        machine = mysql.MySQLHandshake(database=self.rt.name)
        conn.notice = Reply(machine.fail)
        conn.admit()  # MySQL says "too many connections" in place of the greeting, as the server does
        key = asyncio.ensure_future(_ensure_rsa_key())  # made while we connect
        try:
            up = await self.dialer.connect(conn)
        except BaseException:
            key.cancel()  # the thread finishes on its own; only our wait is dropped
            raise
        if not self.rt.tls.enabled:
            key.cancel()
            # tls.mode DISABLE: nothing to negotiate on the app's behalf; relay as TCP.  The
            # server's greeting and errors reach the app as they are: there is nothing to add.
            conn.notice = None
            await run_relay(conn, up)
            return
        await key
        started = asyncio.get_running_loop().time()
        phase = _Phase(started, _Reader(conn.app), _Reader(up))
        try:
            await self._handshake(conn, machine, up, phase)
        finally:
            phase.app.stop()
            phase.up.stop()

    async def _handshake(self, conn: Conn, machine: mysql.MySQLHandshake, up: Upstream, phase: _Phase) -> None:
        """Carry out the machine's events and feed it both sides until it relays or fails."""
        while True:
            event = machine.next_event()
            if isinstance(event, mysql.SendToApp):
                conn.app.write(event.data)
            elif isinstance(event, mysql.SendToServer):
                up.write(event.data)
            elif isinstance(event, mysql.NeedUser):
                conn.user = event.user
                conn.rt.tls.context_for(event.user)  # IdentityError: the notice renders it
                machine.proceed()
            elif isinstance(event, mysql.StartTLS):
                # No reader may hold the upstream endpoint across the switch; plaintext it
                # already took goes to the machine, which reports it as injection.
                if early := phase.up.stop():
                    machine.receive_server_data(early)
                    continue
                assert isinstance(up, Endpoint)  # the one switch: plaintext until here
                up = await start_tls(conn, up, conn.user)
                phase.up = _Reader(up)  # on the native plane, a new object reads the server now
                machine.tls_established()
            elif isinstance(event, mysql.Relay):
                # The final OK is in to_app, so the relay never sees an upstream failure
                # "before the server's first byte": nothing is told early.
                await run_relay(
                    conn,
                    up,
                    app_pending=event.to_server + phase.app.stop(),
                    upstream_pending=event.to_app + phase.up.stop(),
                )
                return
            elif isinstance(event, mysql.Fail):
                conn.notice = Said(event.to_app)
                raise event.error
            else:
                await self._wait(conn, machine, phase)

    async def _wait(self, conn: Conn, machine: mysql.MySQLHandshake, phase: _Phase) -> None:
        """Wait for either side (both are read at once: whose turn it is depends on the plugin)."""
        db = conn.rt.db
        app_reader, up_reader = phase.app, phase.up
        now = asyncio.get_running_loop().time()
        started = phase.started
        deadline = started + PHASE_TIMEOUT_FACTOR * db.handshakeTimeout
        greeting = machine.state is mysql.MySQLState.GREETING
        if greeting:
            deadline = min(deadline, started + db.handshakeTimeout)
        if now >= deadline:
            raise UpstreamTimeout(
                f"the server sent no greeting within {db.handshakeTimeout:g}s (is it a MySQL server?)"
                if greeting
                else f"the MySQL connection phase did not finish within {deadline - started:g}s "
                f"(waiting in state {machine.state.name})"
            )
        app_task, up_task = app_reader.pending(), up_reader.pending()
        done, _ = await asyncio.wait((app_task, up_task), timeout=deadline - now, return_when="FIRST_COMPLETED")
        # Server bytes first: the final OK must reach the machine before app bytes that
        # followed it, which then belong to the relay (they stay in the reader's task).
        if up_task in done:
            up_reader.task = None
            try:
                data = up_task.result()
            except Exception as exc:
                # e.g. TLS 1.3: a rejected client certificate arrives as an alert on the
                # first read after our side of the handshake finished.
                raise self.dialer.failure(conn, exc) from None
            machine.receive_server_data(data)
        if app_task in done and machine.state is not mysql.MySQLState.DONE:
            app_reader.task = None
            try:
                data = app_task.result()
            except Exception:
                data = b""  # a reset app is an app that hung up
            machine.receive_app_data(data)
