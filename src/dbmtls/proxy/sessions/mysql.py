"""The MySQL / MariaDB session: drive ``protocols.mysql.MySQLHandshake`` with two endpoints.

The machine decides everything (what to send, when to start TLS, which error to show); this
module only moves bytes and awaits.  MySQL's server speaks first, so the upstream connection is
opened before anything is said to the app; when that fails the app gets an ERR packet in the
pre-greeting format instead of a bare reset.

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

from dbmtls.errors import DbmtlsError, UpstreamTimeout
from dbmtls.protocols import mysql
from dbmtls.proxy import upstream
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.runtime import Conn
from dbmtls.proxy.sessions.common import classify_late, run_relay

# The whole connection phase (greeting to final OK) may take this many handshakeTimeouts.
PHASE_TIMEOUT_FACTOR = 3.0

# dbmtls's RSA key for the caching_sha2_password / sha256_password exchange with the app
# (protocols.md 2.6).  Generating it takes ~100 ms of CPU, so the first MySQL sessions wait for it
# in a thread (while their upstream connect is under way) instead of blocking the event loop in
# the middle of someone's login.  The lock makes sure exactly one key is ever made.
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

    def __init__(self, ep: Endpoint) -> None:
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


async def mysql_session(conn: Conn) -> None:
    rt = conn.rt
    machine = mysql.MySQLHandshake(database=rt.name)
    key = asyncio.ensure_future(_ensure_rsa_key())  # made while we connect
    try:
        up = await upstream.connect(conn)
    except BaseException as exc:
        key.cancel()  # the thread finishes on its own; only our wait is dropped
        if not isinstance(exc, DbmtlsError):
            raise
        _fail(conn, None, exc.with_database(rt.name), machine.fail(exc))
        return
    if not rt.tls.enabled:
        key.cancel()
        # tls.mode DISABLE: nothing to negotiate on the app's behalf; relay as TCP.
        await run_relay(conn, up)
        return
    try:
        await key
        await _handshake(conn, machine, up)
    except BaseException:
        up.abort()
        raise


async def _handshake(conn: Conn, machine: mysql.MySQLHandshake, up: Endpoint) -> None:
    db = conn.rt.db
    app_reader, up_reader = _Reader(conn.app), _Reader(up)
    loop = asyncio.get_running_loop()
    started = loop.time()
    phase_deadline = started + PHASE_TIMEOUT_FACTOR * db.handshakeTimeout
    # Bytes that arrived in the same wake-up as the server's final OK, after the machine is done.
    late_app, late_up = bytearray(), bytearray()
    try:
        while True:
            # --- carry out what the machine asked for ---
            while (action := machine.next_action()) is not None:
                if isinstance(action, mysql.SendToApp):
                    conn.app.write(action.data)
                elif isinstance(action, mysql.SendToServer):
                    up.write(action.data)
                elif isinstance(action, mysql.NeedUser):
                    conn.user = action.user
                    try:
                        conn.rt.tls.context_for(action.user)
                    except DbmtlsError as err:
                        _fail(conn, up, err.with_database(conn.rt.name), machine.fail(err))
                        return
                    machine.proceed()
                elif isinstance(action, mysql.StartTLS):
                    # No reader may hold the upstream endpoint across the switch; plaintext it
                    # already took goes to the machine, which reports it as injection.
                    if early := up_reader.stop():
                        machine.server_data(early)
                        continue
                    try:
                        await upstream.start_tls(conn, up, conn.user)
                    except DbmtlsError as err:
                        _fail(conn, up, err.with_database(conn.rt.name), machine.fail(err))
                        return
                    machine.tls_established()
                elif isinstance(action, mysql.Relay):
                    late_app += app_reader.stop()
                    late_up += up_reader.stop()
                    # The final OK is in to_app, so the relay never sees an upstream failure
                    # "before the server's first byte": no early-error hook is needed.
                    await run_relay(
                        conn,
                        up,
                        app_pending=action.to_server + bytes(late_app),
                        upstream_pending=action.to_app + bytes(late_up),
                    )
                    return
                elif isinstance(action, mysql.Fail):
                    _fail(conn, up, action.error.with_database(conn.rt.name), action.to_app)
                    return

            # --- wait for either side ---
            now = loop.time()
            deadline = phase_deadline
            if machine.state == "GREETING":
                deadline = min(deadline, started + db.handshakeTimeout)
            if now >= deadline:
                timeout = UpstreamTimeout(
                    f"the MySQL connection phase did not finish within {deadline - started:g}s "
                    f"(waiting in state {machine.state})"
                    if machine.state != "GREETING"
                    else f"the server sent no greeting within {db.handshakeTimeout:g}s (is it a MySQL server?)"
                )
                _fail(conn, up, timeout.with_database(conn.rt.name), machine.fail(timeout))
                return
            app_task, up_task = app_reader.pending(), up_reader.pending()
            done, _ = await asyncio.wait((app_task, up_task), timeout=deadline - now, return_when="FIRST_COMPLETED")
            # Server bytes first: the final OK must reach the machine before app bytes that
            # followed it, which then belong to the relay.
            if up_task in done:
                up_reader.task = None
                try:
                    data = up_task.result()
                except Exception as exc:
                    # e.g. TLS 1.3: a rejected client certificate arrives as an alert on the
                    # first read after our side of the handshake finished.
                    late = classify_late(conn, exc)
                    _fail(conn, up, late, machine.fail(late))
                    return
                if machine.state == "DONE":
                    late_up += data
                else:
                    machine.server_data(data)
            if app_task in done:
                app_reader.task = None
                try:
                    data = app_task.result()
                except Exception:
                    data = b""  # a reset app is an app that hung up
                if machine.state == "DONE":
                    late_app += data
                else:
                    machine.app_data(data)
    finally:
        app_reader.stop()
        up_reader.stop()


def _fail(conn: Conn, up: Endpoint | None, err: DbmtlsError, to_app: bytes) -> None:
    conn.error = err
    if to_app:
        conn.app.write(to_app)
    conn.app.close()  # flushes the ERR packet first
    if up is not None:
        up.abort()
