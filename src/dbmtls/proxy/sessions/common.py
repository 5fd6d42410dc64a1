"""What every session does once the handshake is over: hand both sides to a Relay.

With ``dataPlane: native`` (docs/native.md) the sessions dial through ``dial`` (TLS-first) or
upgrade through ``start_tls`` (after a plaintext preamble) and get a ``NativeUpstream``, which
reads and writes like an ``Endpoint`` until the relay; ``run_relay`` then hands both sockets to
the native plane instead of a ``Relay``, and reads the outcome the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from dbmtls.errors import DbmtlsError, UpstreamReset
from dbmtls.native.plane import NativeRelay, NativeUpstream
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.relay import ClosedBeforeAnswer, Relay, Side
from dbmtls.proxy.runtime import Conn
from dbmtls.proxy.upstream import keep_session
from dbmtls.tls.resume import cache_of

# What the sessions talk to the server through: the same calls on both data planes.
Upstream = Endpoint | NativeUpstream


async def dial(conn: Conn, user: str | None = None) -> Endpoint | NativeUpstream:
    """TCP connect + TLS toward the server, on the database's data plane (TLS-first protocols);
    or a connection the preconnect pool made ahead (dbmtls.proxy.preconnect)."""
    pool = conn.rt.pool
    if pool is not None and user is None and (ready := pool.take(conn)) is not None:
        return ready
    plane = conn.rt.native
    if plane is None:
        return await conn.rt.dialer.dial(conn, user)
    return await plane.dial(conn, user)


async def start_tls(conn: Conn, ep: Endpoint, user: str | None = None) -> Upstream:
    """TLS on a connected server socket (after a plaintext preamble: PostgreSQL's SSLRequest,
    MySQL's SSLRequest packet), on the database's data plane; the session goes on with what this
    returns (``ep`` itself on the Python plane)."""
    plane = conn.rt.native
    if plane is None:
        await conn.rt.dialer.start_tls(conn, ep, user)
        return ep
    return await plane.start_tls(conn, ep, user)


async def run_relay(
    conn: Conn,
    up: Endpoint | NativeUpstream,
    *,
    app_pending: bytes = b"",
    upstream_pending: bytes = b"",
    watch_upstream: Callable[[bytes], bool] | None = None,
    expect_reply: bool = False,
) -> None:
    """Relay until both sides are closed.

    Raises the classified error when the server fails before its first byte (TLS 1.3: a
    rejected client certificate arrives as an alert on the first read), after the relay
    wrote ``conn.notice``'s message to the app.  ``watch_upstream`` sees the server's chunks
    until it returns True (see ``Relay.watch_upstream``).  ``expect_reply``: the protocol is
    client-first, so a server that closes before its first byte within ``handshakeTimeout`` of
    the start has failed (``Relay``).
    """
    dialer = conn.rt.dialer
    late: list[DbmtlsError] = []

    def early(exc: BaseException) -> bytes | None:
        err = dialer.failure(conn, exc).with_database(conn.rt.name)
        late.append(err)
        return conn.notice.now(err) if conn.notice is not None else None

    expect_within = conn.rt.db.handshakeTimeout if expect_reply else None
    plane = conn.rt.native
    if plane is not None and isinstance(up, Endpoint) and not conn.rt.tls.enabled and not up.closed:
        # tls.mode DISABLE after a plaintext exchange (MySQL reads the greeting first): the
        # native plane relays it too, with what the session read from the server first
        upstream_pending += up.take()
        up = await plane.start_tls(conn, up, None)
    if isinstance(up, NativeUpstream):
        if up.lost or conn.app.closed:
            # as _settle: the server went away while the session looked at the app's first
            # bytes (TLS 1.3: it rejected our certificate), or the app did
            to_app = upstream_pending + (up.take_held() if up.lost else b"")
            if watch_upstream is not None:
                watch_upstream(to_app)  # what the server said is seen, even when it said it and left
            up.close()
            if up.lost and not conn.app.closed and not to_app:
                raise dialer.failure(conn, up.error or ClosedBeforeAnswer("the server closed the connection"))
            conn.app.write(to_app)
            conn.app.close()
            return
        native = up.relay(
            conn,
            app_pending=app_pending,
            early_upstream_error=early,
            expect_reply_within=expect_within,
            idle_timeout=conn.rt.db.idleTimeout,
            upstream_pending=upstream_pending + up.take(),
            watch_upstream=watch_upstream,
        )
        conn.relay = native
        await native.done
        _outcome(conn, native, late)
        return
    if up.closed or conn.app.closed:
        _settle(conn, up, upstream_pending, watch_upstream)
        return

    watch_upstream = _keeping_session(conn, watch_upstream)
    app_t, app_buf = conn.app.detach()
    up_t, up_buf = up.detach()
    relay = Relay(
        app_t,
        up_t,
        app_pending=app_pending + app_buf,
        upstream_pending=upstream_pending + up_buf,
        early_upstream_error=early,
        expect_reply_within=expect_within,
        idle_timeout=conn.rt.db.idleTimeout,
    )
    conn.relay = relay
    conn.app.successor = relay.from_app
    up.successor = relay.from_up
    if watch_upstream is not None:
        relay.watch_upstream(upstream_pending + up_buf, watch_upstream)
    if conn.app.eof_seen:
        relay.app_eof_before_start()
    await relay.done
    _outcome(conn, relay, late)


def _keeping_session(conn: Conn, watch: Callable[[bytes], bool] | None) -> Callable[[bytes], bool] | None:
    """Keep the upstream TLS session at the server's first bytes (then step aside, or go on
    with the session's own ``watch``).  A TLS 1.3 server sends its tickets right after the
    handshake, before any reply: once a reply was read, they have been read too.  Waiting for
    the connection's end would leave the next connections, opened meanwhile, without one."""
    if conn.upstream_tls is None or cache_of(conn.upstream_tls[0]) is None:
        return watch
    kept = False

    def watching(data: bytes) -> bool:
        nonlocal kept
        if not kept and data:
            kept = True
            keep_session(conn, replied=True)
        if watch is not None:
            return watch(data)
        return kept

    return watching


def _settle(conn: Conn, up: Endpoint, upstream_pending: bytes, watch_upstream: Callable[[bytes], bool] | None) -> None:
    """A side went away while the handshake finished (e.g. a TLS 1.3 server rejecting our
    certificate while we waited for the app).  Its connection_lost was delivered to the
    Endpoint already, so a relay would wait for it forever: settle it here."""
    to_app = upstream_pending + up.take()
    if watch_upstream is not None:
        watch_upstream(to_app)  # what the server said is seen, even when it said it and left
    up.close()
    if up.closed and not conn.app.closed and not to_app:
        raise conn.rt.dialer.failure(conn, up.error or ClosedBeforeAnswer("the server closed the connection"))
    conn.app.write(to_app)
    conn.app.close()


def _outcome(conn: Conn, relay: Relay | NativeRelay, late: list[DbmtlsError]) -> None:
    """What the finished relay says about the connection: a note, or the failure to raise."""
    if relay.idled:
        conn.note = f"idle timeout ({conn.rt.db.idleTimeout:g}s without a byte either way)"
    if late:
        conn.notice = None  # the relay told the app already, and closed its side
        raise late[0]
    if relay.failed_side is Side.UPSTREAM:
        conn.notice = None  # mid-stream: the app got the reset, there is no way to say more
        raise UpstreamReset(
            f"the server's connection was lost after {relay.bytes_from_upstream} bytes "
            f"({type(relay.error).__name__}: {relay.error}); the app's connection was reset"
        )
    if relay.failed_side is Side.APP:
        conn.note = "the app reset the connection; passed on as a reset"
