"""What dbmtls knows about a protocol, in one object: the registry's entries.

Everything that used to be spread over the config model, the proxy and the error
tree (names, ports, ALPN, whether the user is known before TLS, which session
drives it, how its errors look on the wire) is a field here, so adding a database
is a new ``protocols/x.py`` with a ``SPEC``, a new ``proxy/sessions/x.py`` with a
driver, and one line in ``protocols/registry.py``.  The config, the proxy, ``check``'s
output and the README tables are derived from the registry.

This module is pure data: the protocols package is sans-IO and must not import the
asyncio layer.  The session driver is therefore named by its import path (like a
Django database ENGINE) and resolved by the proxy when it starts; a path that does
not resolve stops the start with an error, never a silent fallback to a relay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dbmtls.errors import Reason


@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    """The ``protocol:`` value in a dbmtls config."""
    title: str
    """How people write it (README, ``check``)."""
    session: str
    """``module:Class`` of the session driver in ``dbmtls.proxy.sessions``."""
    wire_code: Callable[[Reason], str]
    """How an error with this reason is spelled toward the app (docs and ``check``)."""
    upgrade: str
    """One line: how TLS toward the server starts."""
    errors: str
    """One line: how the app is told that something failed."""
    plaintext_hint: str = ""
    """What to tell someone whose app speaks TLS to dbmtls's plaintext listener."""
    aliases: tuple[str, ...] = ()
    """Other names accepted in ``protocol:`` and ``dbmtls.io/protocol`` (never guessed from hosts)."""
    default_port: int | None = None
    """The port used when an address has none."""
    well_known_ports: tuple[int, ...] = ()
    """A DestinationRule port that names this protocol when nothing else does."""
    alpn: tuple[str, ...] = ()
    """ALPN offered upstream, only where the protocol defines one (docs/protocols/README.md)."""
    user_before_tls: bool = False
    """The database user is known before the upstream TLS handshake: per-user certificates work."""
    direct_tls_option: bool = False
    """``directTls`` can choose TLS-first instead of the in-band upgrade (PostgreSQL 17+)."""
    named_in_hosts: bool = True
    """A dash-separated word of a host name equal to ``name`` names it (``orders-redis-master``)."""

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


class ErrorAnswerer(Protocol):
    """Answers an app's requests with one error: fed the app's bytes, returns the replies.

    For the client-first protocols that have request framing but no handshake (Redis,
    MongoDB): after a failure dbmtls reads the app's requests for a short, bounded time
    and answers each one, because clients may swallow the reply to a connect-time command
    and only show the next one.
    """

    @property
    def broken(self) -> bool:
        """The app sent something that cannot be answered: stop reading and close."""
        ...

    def feed(self, data: bytes) -> list[bytes]:
        """One reply per request completed by ``data``."""
        ...

    def unprompted(self) -> bytes | None:
        """What to leave in the app's socket when it asked nothing (None: nothing)."""
        ...
