"""One error tree for everything that can go wrong on a connection.

What went wrong is decided once, where it is detected: the session raises one of
these classes.  How to say it is decided once per protocol: each protocol module
in ``dbmtls.protocols`` maps a :class:`Reason` to its own wire codes (a PostgreSQL
SQLSTATE, a MySQL errno + SQLSTATE, a MongoDB code + codeName) and renders the
error in its framing.  Recording it (the close log line, the failure metric) is
done once, by the proxy, for every protocol alike.  See ``docs/errors.md``.

Errors are immutable: context is added with :meth:`DbmtlsError.with_database` and
:meth:`DbmtlsError.with_message`, which return copies, so ``str(err)`` and
``err.message`` can never disagree and an error that was logged is the error
that was sent.

Messages reach applications and logs: they must never contain key material, and
:meth:`DbmtlsError.wire_text` makes them single-line ASCII so that no protocol
framing (RESP's CRLF, C strings' NUL) can be broken by an error text.
"""

from __future__ import annotations

import copy
import enum
from typing import Any, ClassVar, Self


class Reason(enum.StrEnum):
    """Why a connection failed: the ``reason`` label of the failure metric and log line."""

    INTERNAL = "internal"
    CONFIG = "config"
    # the application side
    APP_PROTOCOL = "app_protocol"
    APP_CLOSED = "app_closed"
    APP_TIMEOUT = "app_timeout"
    NO_CERTIFICATE_FOR_USER = "no_certificate_for_user"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    # the upstream side
    UPSTREAM = "upstream"
    CONNECTION_REFUSED = "connection_refused"
    TIMEOUT = "timeout"
    SERVER_REFUSED_TLS = "server_refused_tls"
    SERVER_REFUSED_PLAINTEXT = "server_refused_plaintext"
    UPSTREAM_PROTOCOL = "upstream_protocol"
    UPSTREAM_RESET = "upstream_reset"
    AUTH_FAILED = "auth_failed"
    HANDSHAKE_FAILED = "handshake_failed"
    TLS_VERSION = "tls_version"
    UNKNOWN_CA = "unknown_ca"
    NAME_MISMATCH = "name_mismatch"
    EXPIRED = "expired"
    CLIENT_CERT_REJECTED = "client_cert_rejected"


# What each reason means, for people (the README's and docs/errors.md's tables are made from it).
DESCRIPTIONS: dict[Reason, str] = {
    Reason.INTERNAL: "a bug in dbmtls (logged with a traceback)",
    Reason.CONFIG: "the configuration is invalid",
    Reason.APP_PROTOCOL: "the app sent something that is not the configured protocol (or started TLS)",
    Reason.APP_CLOSED: "the app gave up during the login (e.g. it requires TLS to dbmtls)",
    Reason.APP_TIMEOUT: "the app did not finish its login in time (a stuck or slow-loris client)",
    Reason.TOO_MANY_CONNECTIONS: "maxConnections (or the file descriptor budget) is reached",
    Reason.NO_CERTIFICATE_FOR_USER: "no client certificate is configured for this database user",
    Reason.UPSTREAM: "any other failure toward the server",
    Reason.CONNECTION_REFUSED: "the server is unreachable (refused, no route, DNS)",
    Reason.TIMEOUT: "connect, TLS handshake or the server's first answer timed out",
    Reason.SERVER_REFUSED_TLS: "the server does not do TLS on that port",
    Reason.SERVER_REFUSED_PLAINTEXT: "tls.mode is DISABLE and the server hung up: it wants TLS",
    Reason.UPSTREAM_PROTOCOL: "the server broke the protocol (including plaintext injected before TLS)",
    Reason.UPSTREAM_RESET: "the server reset the connection after it had answered (passed on as a reset)",
    Reason.AUTH_FAILED: "the server rejected the login (its own error reached the app)",
    Reason.HANDSHAKE_FAILED: "the TLS handshake failed (no common cipher, or the server hung up)",
    Reason.TLS_VERSION: "no TLS version both sides accept (minProtocolVersion / maxProtocolVersion)",
    Reason.UNKNOWN_CA: "the server certificate does not chain to the configured CA",
    Reason.NAME_MISMATCH: "the server certificate does not carry the expected name",
    Reason.EXPIRED: "the server certificate is expired or not yet valid",
    Reason.CLIENT_CERT_REJECTED: "the server refused our client certificate",
}

# Reasons a connection can fail with once the process runs (CONFIG and INTERNAL are not
# per-connection outcomes): the metric exports a zero for each, so dashboards see no gaps.
CONNECTION_FAILURES: tuple[Reason, ...] = tuple(r for r in Reason if r not in (Reason.INTERNAL, Reason.CONFIG))


class DbmtlsError(Exception):
    """Base class. ``str(err)`` is the human message without the database name."""

    reason: ClassVar[Reason] = Reason.INTERNAL
    default_hint: ClassVar[str | None] = None

    def __init__(self, message: str, *, hint: str | None = None, database: str | None = None) -> None:
        super().__init__(message)
        self._message = message
        self._hint = hint if hint is not None else self.default_hint
        self._database = database

    @property
    def message(self) -> str:
        return self._message

    @property
    def hint(self) -> str | None:
        return self._hint

    @property
    def database(self) -> str | None:
        """The dbmtls database (config name) the error happened on, once known."""
        return self._database

    def _replace(self, **changes: Any) -> Self:
        new = copy.copy(self)
        for name, value in changes.items():
            setattr(new, f"_{name}", value)
        new.args = (new._message,)
        return new

    def with_database(self, database: str) -> Self:
        """A copy that names ``database`` (unless it already names one)."""
        return self if self._database is not None else self._replace(database=database)

    def with_message(self, message: str) -> Self:
        """A copy with a more precise message (e.g. naming the server that failed)."""
        return self._replace(message=message)

    def with_hint(self, hint: str) -> Self:
        """A copy with a hint that knows more of the context than the class's default."""
        return self._replace(hint=hint)

    def wire_text(self, prefix: str = "dbmtls") -> str:
        """The one-line ASCII text shown to the application."""
        where = f"[{self._database}] " if self._database else ""
        return sanitize(f"{prefix}: {where}{self._message}")

    def wire_hint(self) -> str | None:
        return sanitize(self._hint) if self._hint else None


def sanitize(text: str, limit: int = 1000) -> str:
    """Single line, printable ASCII, bounded: safe inside RESP, cstrings and ERR packets."""
    out = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)
    out = " ".join(out.split())
    return out[:limit]


# --- configuration -----------------------------------------------------------------


class ConfigError(DbmtlsError):
    """A configuration problem; ``path`` is the YAML path, ``source`` the file."""

    reason = Reason.CONFIG

    @property
    def source(self) -> str | None:
        return self._source

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def detail(self) -> str:
        """What is wrong, without the file and YAML path that ``message`` starts with."""
        return self._detail

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None) -> None:
        self._source = source
        self._path = path
        self._detail = message
        where = ": ".join(p for p in (source, path) if p)
        super().__init__(f"{where}: {message}" if where else message)


# --- the application side ----------------------------------------------------------


class AppProtocolError(DbmtlsError):
    """The application sent something that is not the protocol it is configured for."""

    reason = Reason.APP_PROTOCOL


class AppTLSError(AppProtocolError):
    """The application started a TLS handshake on the plaintext listener.

    Its own class because the answer differs: a TLS client cannot read a plaintext error
    message, so it just gets the close (and the log line says what to change).
    """


class AppClosedEarly(DbmtlsError):
    """The app closed its connection before the login was over (nobody is left to tell)."""

    reason = Reason.APP_CLOSED


class AppTimeout(DbmtlsError):
    """The app did not send its login in time; the connection slot is given back."""

    reason = Reason.APP_TIMEOUT


class TooManyConnections(DbmtlsError):
    """Refused at accept: the database's or the process's connection limit is reached."""

    reason = Reason.TOO_MANY_CONNECTIONS
    default_hint = "raise maxConnections (and the file descriptor limit) or use fewer connections"


class IdentityError(DbmtlsError):
    """No client certificate is configured for the identity the app asked for."""

    reason = Reason.NO_CERTIFICATE_FOR_USER


# --- the upstream side --------------------------------------------------------------


class UpstreamError(DbmtlsError):
    """Anything that failed while reaching or negotiating with the real server."""

    reason = Reason.UPSTREAM


class UpstreamUnreachable(UpstreamError):
    reason = Reason.CONNECTION_REFUSED
    default_hint = "check that the database address in the dbmtls config is right and the server is up"


class NameNotResolved(UpstreamUnreachable):
    """DNS could not turn the server's name into addresses (``dns.mode: direct``).

    The same reason as a refused connection (the server cannot be reached, and every
    protocol already says so in its own words); the message names the name, the search
    list, the nameservers asked and what they answered.
    """

    default_hint = (
        "check the database address (the Service name and namespace) and that the nameservers "
        "in dns.nameservers / dns.resolvConf answer for it (dbmtls check resolves every database)"
    )


class UpstreamTimeout(UpstreamError):
    reason = Reason.TIMEOUT
    default_hint = "the server or the network is slow or dropping packets; see connectTimeout/handshakeTimeout"


class TLSRefused(UpstreamError):
    """The server does not offer TLS (PostgreSQL 'N', MySQL without CLIENT_SSL)."""

    reason = Reason.SERVER_REFUSED_TLS
    default_hint = "enable TLS on the database server; dbmtls never falls back to plaintext"


class PlaintextRefused(UpstreamError):
    """tls.mode is DISABLE and the server closed the connection without a word."""

    reason = Reason.SERVER_REFUSED_PLAINTEXT
    default_hint = "the server probably requires TLS: set tls.mode to SIMPLE or MUTUAL"


class UpstreamReset(UpstreamError):
    """The server reset or aborted the connection in the middle of the conversation."""

    reason = Reason.UPSTREAM_RESET
    default_hint = "see the database server's log; the app got a reset, not a clean end of its reply"


class AuthenticationFailed(UpstreamError):
    """The server rejected the login; its own error message was relayed to the app."""

    reason = Reason.AUTH_FAILED


class UpstreamProtocolError(UpstreamError):
    """The server broke the protocol during the handshake (including injected plaintext)."""

    reason = Reason.UPSTREAM_PROTOCOL


class TLSHandshakeError(UpstreamError):
    reason = Reason.HANDSHAKE_FAILED
    default_hint = "run 'dbmtls doctor -c CONFIG': it shows the server's certificate chain and what the server asks for"


class TLSVersionMismatch(TLSHandshakeError):
    reason = Reason.TLS_VERSION
    default_hint = "the server and tls.minProtocolVersion/maxProtocolVersion share no TLS version"


class UnknownCA(TLSHandshakeError):
    reason = Reason.UNKNOWN_CA
    default_hint = (
        "the server certificate does not chain to tls.caCertificates; check the CA bundle "
        "(dbmtls doctor shows the chain the server sends)"
    )


class NameMismatch(TLSHandshakeError):
    reason = Reason.NAME_MISMATCH
    default_hint = "set tls.sni / tls.subjectAltNames to a name the server certificate carries"


class CertificateExpired(TLSHandshakeError):
    reason = Reason.EXPIRED
    default_hint = "the server certificate is expired or not yet valid; renew it (or fix the clock)"


class ClientCertRejected(TLSHandshakeError):
    reason = Reason.CLIENT_CERT_REJECTED
    default_hint = (
        "the server does not accept the client certificate; check its CA and that it is not expired "
        "(dbmtls doctor shows the CAs the server accepts)"
    )
