"""Upstream TLS session resumption on the Python data plane (docs/tls-resumption.md).

The cache lives on the ``ssl.SSLContext`` it belongs to, which is one identity (the default
client certificate, or one of ``tls.userCertificates``) of one database, and inside it is keyed
by server name.  So a session is only ever offered by the identity that made it, to the name it
was made for: OpenSSL would resume one under another SNI name and checks no host name on a
resumed connection, so the key is what keeps a session of user A (or of server name A) from
being offered on behalf of user B (or to name B).  A reload builds new contexts: the old
contexts' sessions are dropped with them, never offered with a new certificate.

How the session reaches OpenSSL: uvloop's ``loop.start_tls`` has no ``session=`` argument.
It creates the ``SSLObject`` itself, through the documented ``SSLContext.wrap_bio(incoming,
outgoing, server_side, server_hostname, session)``, from a callback that runs in the context
of the transport (uvloop: the context copied when the connection was made; asyncio: the one
of the ``start_tls`` caller, the same task).  So the dialer puts a fresh, per-connection
``Offer`` in the ``OFFER`` context variable just before it makes the TCP connection
(``Dialer.open``), fills in the session before ``start_tls``, and ``ResumingContext.wrap_bio``
reads it there.  The context copy shares the ``Offer`` object, not a value: that is what lets
a session chosen after the connection was made reach the callback, and a new connection's
``Offer`` never be another's.  ``tests/e2e/test_resumption.py`` checks that connections do
resume, on the event loop dbmtls runs.

Sessions are harvested once the server's first reply was read (``harvest``): a TLS 1.3 server
sends its tickets after the handshake, so they only exist on the client once the first records
from the server have been read; Python has no new-session callback.  At most ``PER_NAME`` are
kept per identity and name (each holds the server's certificate chain: a few KiB).

Single use, or reuse: a TLS 1.3 ticket should be used once (RFC 8446 C.4: reuse lets an observer
link connections), so a session is taken out of the cache when it is offered, and each connection
brings the next one.  But reading ``SSLObject.session`` leaks a copy of the session (about 6 KiB)
on every call in CPython before 3.12.8 / 3.13.1 (python/cpython#116810: the getter duplicates the
session, then overwrites the duplicate), and single use means one read per connection: 20,000
connections would leak over 100 MiB.  On those versions (``GETTER_LEAKS``) a session is therefore
*reused* until it expires or the server stops accepting it, and the getter is read only when the
cache has no session for that name: a few reads per ticket lifetime, not one per connection.  The
connection between dbmtls and its database is what an observer could link, which it can anyway
(same addresses, same client certificate in TLS 1.2).
"""

from __future__ import annotations

import contextvars
import ssl
import sys
import time
from collections import deque
from typing import Any

from dbmtls.errors import (
    CertificateExpired,
    NameMismatch,
    TLSHandshakeError,
    TLSVersionMismatch,
    UnknownCA,
    UpstreamError,
)

# Sessions kept per identity and server name.  Connections resumed from them bring fresh
# tickets, so a handful is enough for a steady stream of short connections.
PER_NAME = 4
# After a handshake that offered a session failed, sessions are not offered to that name
# (from that identity) for this long: a server that cannot resume (Redis with
# tls-session-caching no fails such a handshake) must not cost every connection a retry.
BACKOFF = 300.0


class ResumptionRefused(Exception):
    """A handshake that offered a session failed (``error``: what it would have raised).

    Raised inside the dialer only: a TLS-first dial retries without a session, an in-band
    upgrade raises ``error`` (``dbmtls.proxy.upstream``)."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


def refused_resumption(err: UpstreamError) -> bool:
    """Whether a failed handshake that offered a session may have failed *because* it did.

    Not when the server's certificate failed verification, the versions did not match, the
    server did not speak TLS or did not answer in time: a handshake without a session fails
    the same way, a retry would only double the cost.
    """
    return isinstance(err, TLSHandshakeError) and not isinstance(
        err, UnknownCA | NameMismatch | CertificateExpired | TLSVersionMismatch
    )


class Offer:
    """The session one upstream connection offers (None: none); see the module's docstring."""

    __slots__ = ("session",)

    def __init__(self) -> None:
        self.session: ssl.SSLSession | None = None


# python/cpython#116810, fixed in 3.12.8 and 3.13.1 (see the module's docstring)
GETTER_LEAKS = sys.version_info < (3, 12, 8) or (3, 13) <= sys.version_info < (3, 13, 1)

OFFER: contextvars.ContextVar[Offer | None] = contextvars.ContextVar("dbmtls_tls_offer", default=None)


class SessionCache:
    """The sessions of one identity, per server name, bounded; with a per-name backoff."""

    def __init__(self, *, reuse: bool = GETTER_LEAKS) -> None:
        self._sessions: dict[str, deque[ssl.SSLSession]] = {}
        self._backoff_until: dict[str, float] = {}
        # names whose server gave no session when last asked (PostgreSQL issues no tickets):
        # not asked again before then (the getter costs a leaked copy on some versions)
        self._quiet_until: dict[str, float] = {}
        self.reuse = reuse  # see the module's docstring

    def take(self, server_name: str) -> ssl.SSLSession | None:
        """A session to offer to ``server_name``: taken out (a TLS 1.3 ticket is single use), or
        with ``reuse``, left in for the next connections until it expires or is not accepted."""
        if self._backoff_until.get(server_name, 0.0) > time.monotonic():
            return None
        q = self._sessions.get(server_name)
        while q:
            session = q[-1]  # the newest: the longest left to live
            if _still_valid(session):
                if not self.reuse:
                    q.pop()
                return session
            q.pop()
        return None

    def wants(self, server_name: str) -> bool:
        """Whether a session for ``server_name`` is worth reading from a connection (with
        ``reuse``: only when there is none left)."""
        now = time.monotonic()
        if self._backoff_until.get(server_name, 0.0) > now or self._quiet_until.get(server_name, 0.0) > now:
            return False
        return not self.reuse or not any(_still_valid(s) for s in self._sessions.get(server_name, ()))

    def none_given(self, server_name: str) -> None:
        """A connection to ``server_name`` had no session to keep: do not ask the next ones for
        a while (a server that issues no tickets issues none on the next connection either)."""
        self._quiet_until[server_name] = time.monotonic() + BACKOFF

    def not_resumed(self, server_name: str, session: ssl.SSLSession) -> None:
        """The server did a full handshake although ``session`` was offered (it expired there, or
        the server restarted): do not offer it again."""
        q = self._sessions.get(server_name)
        if q is not None and session in q:
            q.remove(session)

    def put(self, server_name: str, session: ssl.SSLSession) -> None:
        if self._backoff_until.get(server_name, 0.0) > time.monotonic():
            return
        q = self._sessions.setdefault(server_name, deque(maxlen=PER_NAME))
        if session not in q:
            q.append(session)

    def refused(self, server_name: str) -> None:
        """A handshake offering a session failed: stop offering to that name for a while."""
        self._backoff_until[server_name] = time.monotonic() + BACKOFF
        self._sessions.pop(server_name, None)

    def forgive(self, server_name: str) -> None:
        """The retry without a session failed too: the server fails every handshake for now (it
        is full, restarting, or not a TLS server any more), which says nothing about resumption.
        The backoff is lifted, so resumption resumes once the server is back."""
        self._backoff_until.pop(server_name, None)

    def backing_off(self, server_name: str) -> bool:
        return self._backoff_until.get(server_name, 0.0) > time.monotonic()

    def __len__(self) -> int:
        return sum(len(q) for q in self._sessions.values())


def _still_valid(session: ssl.SSLSession) -> bool:
    return session.time + session.timeout > time.time()


class ResumingContext(ssl.SSLContext):
    """An ``SSLContext`` that offers the session in ``OFFER`` (see the module's docstring) and
    owns the session cache of its identity.  Everything else is ``ssl.SSLContext``'s."""

    # set in build_context: ssl.SSLContext creates its instances in __new__ and has no
    # __init__ of its own worth overriding
    sessions: SessionCache | None = None

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        offer = OFFER.get()
        if offer is not None and offer.session is not None and kwargs.get("session") is None:
            kwargs["session"] = offer.session
            offer.session = None  # one handshake only
        return super().wrap_bio(*args, **kwargs)


def cache_of(ctx: ssl.SSLContext) -> SessionCache | None:
    """The context's session cache; None when resumption is off for it."""
    return getattr(ctx, "sessions", None)


def harvest(ctx: ssl.SSLContext | None, server_name: str, sslobj: ssl.SSLObject | None, *, replied: bool) -> None:
    """Keep the connection's latest session for the next connection of the same identity and name.

    ``replied``: called once the server's first reply was read (its tickets came before it), or
    else when the connection ends without one (an app that connected and left: its tickets may
    not have been read yet, so "no session" says nothing about the server).  OpenSSL marks a
    session of a connection that failed (a fatal alert, a reset) as not resumable.
    """
    cache = cache_of(ctx) if ctx is not None else None
    if cache is None or sslobj is None or not cache.wants(server_name):
        return  # (before the getter: it leaks on some versions, see the module's docstring)
    if not replied and cache.reuse:
        return  # not worth a leaked copy: a connection that got a reply will give one
    try:
        session = sslobj.session
    except (ValueError, ssl.SSLError):
        session = None
    if session is None or (sslobj.version() == "TLSv1.3" and not session.has_ticket):
        # no ticket: after a reply, the server issues none (e.g. PostgreSQL): nothing to offer
        if replied:
            cache.none_given(server_name)
        return
    cache.put(server_name, session)
