"""One error tree for everything that can go wrong on a connection.

Each class knows how it is spelled in every wire protocol dbmtls speaks toward
the application: a PostgreSQL SQLSTATE, a MySQL errno + SQLSTATE, a MongoDB
code + codeName, and a short ``reason`` used as a metric label.  The protocol
modules turn an instance into an ErrorResponse / ERR packet / ``-ERR`` reply,
so "what went wrong" is decided once, where it is detected, and "how to say it"
is decided once per protocol (see h2's exceptions and asyncpg's SQLSTATE
classes for the same idea).

Messages reach applications and logs: they must never contain key material,
and :meth:`DbmtlsError.wire_text` makes them single-line ASCII so that no
protocol framing (RESP's CRLF, C strings' NUL) can be broken by an error text.
"""

from __future__ import annotations

from typing import ClassVar


class DbmtlsError(Exception):
    """Base class. ``str(err)`` is the human message without the database name."""

    reason: ClassVar[str] = "internal"
    pg_sqlstate: ClassVar[str] = "08006"  # connection_failure
    mysql_errno: ClassVar[int] = 1043  # ER_HANDSHAKE_ERROR
    mysql_sqlstate: ClassVar[str] = "08S01"
    mongo_code: ClassVar[int] = 6
    mongo_codename: ClassVar[str] = "HostUnreachable"
    default_hint: ClassVar[str | None] = None

    def __init__(self, message: str, *, hint: str | None = None, database: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.database = database

    def with_database(self, database: str) -> DbmtlsError:
        if self.database is None:
            self.database = database
        return self

    def wire_text(self, prefix: str = "dbmtls") -> str:
        """The one-line ASCII text shown to the application."""
        where = f"[{self.database}] " if self.database else ""
        return sanitize(f"{prefix}: {where}{self.message}")

    def wire_hint(self) -> str | None:
        return sanitize(self.hint) if self.hint else None


def sanitize(text: str, limit: int = 1000) -> str:
    """Single line, printable ASCII, bounded: safe inside RESP, cstrings and ERR packets."""
    out = "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)
    out = " ".join(out.split())
    return out[:limit]


# --- configuration -----------------------------------------------------------------


class ConfigError(DbmtlsError):
    """A configuration problem; ``path`` is the YAML path, ``source`` the file."""

    reason = "config"

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None) -> None:
        self.source = source
        self.path = path
        where = ": ".join(p for p in (source, path) if p)
        super().__init__(f"{where}: {message}" if where else message)


# --- the application side ----------------------------------------------------------


class AppProtocolError(DbmtlsError):
    """The application sent something that is not the protocol it is configured for."""

    reason = "app_protocol"
    pg_sqlstate = "08P01"  # protocol_violation
    mysql_errno = 1043
    mysql_sqlstate = "08S01"
    mongo_code = 2
    mongo_codename = "BadValue"


class IdentityError(DbmtlsError):
    """No client certificate is configured for the identity the app asked for."""

    reason = "no_certificate_for_user"
    pg_sqlstate = "28000"  # invalid_authorization_specification
    mysql_errno = 1045  # ER_ACCESS_DENIED_ERROR
    mysql_sqlstate = "28000"
    mongo_code = 18
    mongo_codename = "AuthenticationFailed"


# --- the upstream side --------------------------------------------------------------


class UpstreamError(DbmtlsError):
    """Anything that failed while reaching or negotiating with the real server."""

    reason = "upstream"


class UpstreamUnreachable(UpstreamError):
    reason = "connection_refused"
    pg_sqlstate = "08001"  # sqlclient_unable_to_establish_sqlconnection
    default_hint = "check that the database address in the dbmtls config is right and the server is up"


class UpstreamTimeout(UpstreamError):
    reason = "timeout"
    pg_sqlstate = "08001"
    default_hint = "the server or the network is slow or dropping packets; see connectTimeout/handshakeTimeout"


class TLSRefused(UpstreamError):
    """The server does not offer TLS (PostgreSQL 'N', MySQL without CLIENT_SSL)."""

    reason = "server_refused_tls"
    default_hint = "enable TLS on the database server; dbmtls never falls back to plaintext"


class UpstreamProtocolError(UpstreamError):
    """The server broke the protocol during the handshake (including injected plaintext)."""

    reason = "upstream_protocol"


class TLSHandshakeError(UpstreamError):
    reason = "handshake_failed"
    default_hint = "run 'dbmtls check' and compare the server certificate with the tls settings"


class UnknownCA(TLSHandshakeError):
    reason = "unknown_ca"
    default_hint = "the server certificate does not chain to tls.caCertificates; check the CA bundle"


class NameMismatch(TLSHandshakeError):
    reason = "name_mismatch"
    default_hint = "set tls.sni / tls.subjectAltNames to a name the server certificate carries"


class CertificateExpired(TLSHandshakeError):
    reason = "expired"
    default_hint = "the server certificate is expired or not yet valid; renew it (or fix the clock)"


class ClientCertRejected(TLSHandshakeError):
    reason = "client_cert_rejected"
    pg_sqlstate = "28000"
    mysql_errno = 1045
    mysql_sqlstate = "28000"
    mongo_code = 18
    mongo_codename = "AuthenticationFailed"
    default_hint = "the server does not accept the client certificate; check its CA and that it is not expired"
