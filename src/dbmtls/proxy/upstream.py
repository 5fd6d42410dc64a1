"""Dialing the real server: TCP connect, then TLS on the same transport.

Connect and handshake are separate steps (and timed separately) because the
in-band protocols speak plaintext between them; the TLS-first protocols call
both through ``dial``.  Every foreign exception (OSError, ssl.SSLError, timeouts)
becomes an error of the tree here, through :meth:`Dialer.failure`, the one
boundary between the socket world and ``dbmtls.errors``; sessions only ever see
``DbmtlsError``.

With ``dns.mode: direct`` the name is resolved here first, through DNS only
(``dbmtls.proxy.resolver``), and the addresses are tried in order; the TLS names stay the
configured ones.

The dialer is an object on the database runtime so that the session tests can
put a scripted server in its place (``tests/support/transcript.py``).
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time

from dbmtls.errors import DbmtlsError, PlaintextRefused, UpstreamError, UpstreamProtocolError
from dbmtls.logs import LOG
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.relay import ClosedBeforeAnswer
from dbmtls.proxy.resolver import DirectResolver, is_ip_literal
from dbmtls.proxy.runtime import Conn
from dbmtls.tls.context import check_peer_names, classify, needs_name_check
from dbmtls.tls.resume import BACKOFF, OFFER, Offer, ResumptionRefused, cache_of, harvest, refused_resumption


def target(conn: Conn) -> str:
    """The dialled address as people write it (``host:port``, ``[v6]:port``)."""
    host, port = conn.rt.db.dial_target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _first_or_all(errors: list[OSError], hosts: tuple[str, ...]) -> OSError:
    """One error for several failed addresses, as ``create_connection`` does for a list."""
    if len(errors) == 1 or all(type(e) is type(errors[0]) for e in errors):
        return errors[0]
    return OSError(", ".join(f"{h}: {e.strerror or e}" for h, e in zip(hosts, errors, strict=False)))


def keep_session(conn: Conn, *, replied: bool) -> None:
    """Keep the connection's upstream TLS session for the next one (``tls.resume``), once: when
    the server's first reply was relayed (``replied``), or else when the connection ends."""
    if conn.upstream_tls is not None:
        ctx, sslobj = conn.upstream_tls
        conn.upstream_tls = None
        harvest(ctx, conn.rt.db.server_name, sslobj, replied=replied)


class Dialer:
    """TCP + TLS toward a database's server, with its timeouts and histograms."""

    # dns.mode direct: names are resolved here, through DNS only (see dbmtls.proxy.resolver);
    # None (mode system): the name goes to create_connection, i.e. getaddrinfo.
    resolver: DirectResolver | None = None

    def __init__(self, resolver: DirectResolver | None = None) -> None:
        self.resolver = resolver

    def failure(self, conn: Conn, exc: BaseException) -> UpstreamError:
        """A foreign exception met while talking to the server, as an error of the tree.

        Also used after the handshake, before the server's first byte: with TLS 1.3 the
        server checks our certificate after *our* side of the handshake is complete, so a
        rejected client certificate arrives as an alert on the first read.
        """
        tls = conn.rt.db.tls
        client_cert = bool(tls.clientCertificate or tls.userCertificates)
        if isinstance(exc, ClosedBeforeAnswer) and conn.rt.tls.enabled:
            return UpstreamProtocolError(
                f"server {target(conn)} closed the connection right after the TLS handshake without answering",
                hint="the server may have rejected the client certificate; see the database server log"
                if client_cert
                else f"the server may require a client certificate, and tls.mode is {tls.mode} (none is sent): "
                "use MUTUAL with clientCertificate and privateKey",
            )
        if not conn.rt.tls.enabled and isinstance(exc, ConnectionError | EOFError):
            # no TLS was attempted, so "closed during the TLS handshake" would be a lie
            return PlaintextRefused(f"{target(conn)} closed the connection without answering (tls.mode is DISABLE)")
        return classify(exc, target=target(conn), server_name=conn.rt.db.server_name, client_cert=client_cert)

    async def addresses(self, conn: Conn) -> tuple[str, ...]:
        """Where to connect: the dial target's host itself (an IP literal, or a name for
        getaddrinfo in dns.mode system), or its addresses from DNS in mode direct.

        Only the connect target changes: SNI and the names verified stay the configured ones.
        """
        host, _ = conn.rt.db.dial_target
        if self.resolver is None or is_ip_literal(host):
            return (host,)
        return await self.resolver.resolve(host)

    async def open(self, conn: Conn, ep: Endpoint, host: str) -> None:
        """One TCP connection to ``host``: ``ep`` gets ``connection_made``.  Raises what the OS says."""
        _, port = conn.rt.db.dial_target
        OFFER.set(Offer())  # this connection's, shared with its transport's context (tls.resume)
        await asyncio.get_running_loop().create_connection(lambda: ep, host, port)

    async def open_any(self, conn: Conn, ep: Endpoint, hosts: tuple[str, ...]) -> None:
        """Try ``hosts`` in order until one connects (``ep`` is only touched by the one that does)."""
        errors: list[OSError] = []
        for host in hosts:
            try:
                await self.open(conn, ep, host)
            except OSError as exc:
                errors.append(exc)
            else:
                return
        raise _first_or_all(errors, hosts)

    async def handshake(
        self, conn: Conn, ep: Endpoint, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
    ) -> ssl.SSLObject | None:
        """The TLS handshake itself, on ``ep``'s transport; raises what OpenSSL says.

        ``session``: offered to the server (``dbmtls.tls.resume`` says how it reaches OpenSSL).
        """
        db = conn.rt.db
        assert ep.transport is not None
        offer = OFFER.get()
        if offer is not None:
            offer.session = session
        try:
            transport = await asyncio.get_running_loop().start_tls(
                ep.transport,
                ep,
                ctx,
                server_side=False,
                server_hostname=db.server_name,
                # a backstop, later than our own timeout (see start_tls)
                ssl_handshake_timeout=db.handshakeTimeout + 5.0,
            )
        finally:
            if offer is not None:
                offer.session = None
        if transport is None:
            raise ConnectionResetError("connection closed during the TLS handshake")
        ep.transport = transport
        ep.tls = True
        sslobj: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        resumed = sslobj is not None and sslobj.session_reused
        # A resumed handshake verifies nothing: OpenSSL checks no host name on resumption
        # (check_hostname is not re-done either).  The session came from this identity's cache
        # for this very name, and the names are checked here again all the same, on the
        # certificate the session carries: a session must never be what lets a name through.
        if needs_name_check(ctx) or (resumed and ctx.verify_mode == ssl.CERT_REQUIRED):
            check_peer_names(sslobj, db.verify_names)
        conn.tls_resumed = resumed
        conn.upstream_tls = (ctx, sslobj)
        return sslobj

    async def connect(self, conn: Conn) -> Endpoint:
        db = conn.rt.db
        ep = Endpoint()
        # Resolution (dns.mode direct) is bounded by dns.timeout and fails with its own error;
        # connectTimeout then bounds the connection attempts, all addresses together, and the
        # connect histogram times those only (in mode system getaddrinfo is inside, as before).
        try:
            hosts = await self.addresses(conn)
        except DbmtlsError:
            raise
        except Exception as exc:
            raise self.failure(conn, exc) from None
        started = time.monotonic()
        host = db.dial_target[0]
        resolved = f" ({host} resolved to {', '.join(hosts)})" if hosts != (host,) else ""
        try:
            async with asyncio.timeout(db.connectTimeout):
                await self.open_any(conn, ep, hosts)
        except TimeoutError:
            err = self.failure(conn, TimeoutError())
            raise err.with_message(
                f"connecting to {target(conn)}{resolved} timed out after {db.connectTimeout:g}s"
            ) from None
        except Exception as exc:
            err = self.failure(conn, exc)
            raise (err.with_message(err.message + resolved) if resolved else err) from None
        conn.rt.stats.connect_seconds.observe(time.monotonic() - started)
        conn.upstream = ep
        return ep

    async def start_tls(self, conn: Conn, ep: Endpoint, user: str | None = None) -> None:
        """Upgrade ``ep`` to TLS with the identity for ``user``.  No-op when TLS is disabled."""
        try:
            await self._start_tls(conn, ep, user)
        except ResumptionRefused as exc:
            # in-band protocols (MySQL): the app already answered this server, no retry; the
            # backoff spares the next connections
            raise exc.error from None

    async def _start_tls(self, conn: Conn, ep: Endpoint, user: str | None) -> None:
        db = conn.rt.db
        ctx = conn.rt.tls.context_for(user)
        if ctx is None:
            return
        if ep.buffered():
            # Plaintext that arrived before our handshake would be treated as if it came over
            # TLS by a careless implementation (CVE-2021-23222): refuse it.
            # See docs/protocols/README.md#no-over-read.
            raise UpstreamProtocolError(
                f"server {target(conn)} sent unencrypted data before the TLS handshake (possible man-in-the-middle)"
            )
        cache = cache_of(ctx)
        # only a connection made by Dialer.open carries an Offer (tls.resume)
        session = cache.take(db.server_name) if cache is not None and OFFER.get() is not None else None
        started = time.monotonic()
        try:
            # Our own timeout: the event loop's ssl_handshake_timeout surfaces as a
            # ConnectionAbortedError, indistinguishable from a peer that hung up.
            async with asyncio.timeout(db.handshakeTimeout):
                sslobj = await self.handshake(conn, ep, ctx, session)
        except DbmtlsError:
            ep.abort()
            raise
        except TimeoutError:
            ep.abort()
            err = self.failure(conn, TimeoutError())
            raise err.with_message(
                f"TLS handshake with {target(conn)} timed out after {db.handshakeTimeout:g}s"
            ) from None
        except Exception as exc:
            ep.abort()
            err = self.failure(conn, exc)
            if session is not None and cache is not None and refused_resumption(err):
                cache.refused(db.server_name)
                conn.rt.stats.tls_resume_refused += 1
                raise ResumptionRefused(err) from exc
            raise err from None
        conn.rt.stats.handshake_seconds.observe(time.monotonic() - started)
        if conn.tls_resumed:
            conn.rt.stats.tls_resumed += 1
        elif session is not None and cache is not None:
            cache.not_resumed(db.server_name, session)
        if sslobj is not None:
            # interned: a few distinct values, otherwise two new strings per open connection
            version = sslobj.version()
            conn.tls_version = sys.intern(version) if version else None
            cipher = sslobj.cipher()
            conn.cipher = sys.intern(cipher[0]) if cipher else None

    async def dial(self, conn: Conn, user: str | None = None) -> Endpoint:
        """TCP connect + TLS (the TLS-first protocols).

        A handshake that offered a session and failed is tried once more on a new connection,
        without one (the cache now backs off from that server): nothing of the app's was sent,
        so the retry is invisible to it.  The in-band protocols call ``start_tls`` themselves
        and get the error (``ResumptionRefused`` is an ``UpstreamError`` like the others).
        """
        try:
            return await self._dial_once(conn, user)
        except ResumptionRefused:
            LOG.info(
                "the server refused a resumed TLS session; retrying without one "
                f"(no session is offered to it for {BACKOFF:g}s)",
                extra={"fields": {"db": conn.rt.name, "upstream": target(conn)}},
            )
            try:
                return await self._dial_once(conn, user)
            except UpstreamError:
                # failed without a session too: not a refusal of resumption (tls.resume forgive)
                ctx = conn.rt.tls.context_for(user)
                cache = cache_of(ctx) if ctx is not None else None
                if cache is not None:
                    cache.forgive(conn.rt.db.server_name)
                raise

    async def _dial_once(self, conn: Conn, user: str | None) -> Endpoint:
        ep = await self.connect(conn)
        try:
            await self._start_tls(conn, ep, user)
        except BaseException:
            ep.abort()
            raise
        return ep
