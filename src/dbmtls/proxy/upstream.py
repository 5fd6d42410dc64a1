"""Dialing the real server: TCP connect, then TLS on the same transport.

Connect and handshake are separate steps (and timed separately) because the
in-band protocols speak plaintext between them; the direct-TLS protocols just
call both.  Every foreign exception is translated into the error tree here,
at one boundary (``tls.context.classify``).
"""

from __future__ import annotations

import asyncio
import time

from dbmtls.errors import DbmtlsError, UpstreamProtocolError
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.runtime import Conn
from dbmtls.tls.context import check_peer_names, classify, needs_name_check


def _target(conn: Conn) -> str:
    host, port = conn.rt.db.dial_target
    return f"{host}:{port}"


async def connect(conn: Conn) -> Endpoint:
    db = conn.rt.db
    host, port = db.dial_target
    loop = asyncio.get_running_loop()
    ep = Endpoint()
    started = time.monotonic()
    try:
        async with asyncio.timeout(db.connectTimeout):
            await loop.create_connection(lambda: ep, host, port)
    except Exception as exc:
        err = classify(exc, target=_target(conn), server_name=db.server_name)
        if isinstance(exc, TimeoutError):
            err.message = f"connecting to {_target(conn)} timed out after {db.connectTimeout:g}s"
        raise err from None
    conn.rt.stats.connect_seconds.observe(time.monotonic() - started)
    conn.upstream = ep
    return ep


async def start_tls(conn: Conn, ep: Endpoint, user: str | None = None) -> None:
    """Upgrade ``ep`` to TLS with the identity for ``user``.  No-op when TLS is disabled."""
    db = conn.rt.db
    ctx = conn.rt.tls.context_for(user)
    if ctx is None:
        return
    if ep.buffered():
        # Plaintext that arrived before our handshake would be treated as if it came over
        # TLS by a careless implementation (CVE-2021-23222): refuse it.
        raise UpstreamProtocolError(
            f"server {_target(conn)} sent unencrypted data before the TLS handshake (possible man-in-the-middle)"
        )
    assert ep.transport is not None
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        # Our own timeout: the event loop's ssl_handshake_timeout surfaces as a
        # ConnectionAbortedError, indistinguishable from a peer that hung up.  Theirs stays
        # as a backstop, later than ours.
        async with asyncio.timeout(db.handshakeTimeout):
            transport = await loop.start_tls(
                ep.transport,
                ep,
                ctx,
                server_side=False,
                server_hostname=db.server_name,
                ssl_handshake_timeout=db.handshakeTimeout + 5.0,
            )
        if transport is None:
            raise ConnectionResetError("connection closed during the TLS handshake")
        ep.transport = transport
        ep.tls = True
        sslobj = transport.get_extra_info("ssl_object")
        if needs_name_check(ctx):
            check_peer_names(sslobj, db.verify_names)
    except DbmtlsError:
        ep.abort()
        raise
    except Exception as exc:
        ep.abort()
        err = classify(exc, target=_target(conn), server_name=db.server_name)
        if isinstance(exc, TimeoutError):
            err.message = f"TLS handshake with {_target(conn)} timed out after {db.handshakeTimeout:g}s"
        raise err from None
    conn.rt.stats.handshake_seconds.observe(time.monotonic() - started)
    if sslobj is not None:
        conn.tls_version = sslobj.version()
        cipher = sslobj.cipher()
        conn.cipher = cipher[0] if cipher else None


async def dial(conn: Conn, user: str | None = None) -> Endpoint:
    """TCP connect + TLS (direct-TLS protocols)."""
    ep = await connect(conn)
    try:
        await start_tls(conn, ep, user)
    except BaseException:
        ep.abort()
        raise
    return ep
