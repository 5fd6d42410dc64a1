"""What the doctor examines: one server, the TLS settings to reach it and who logs in.

Made from a database of a dbmtls config (everything the proxy would use: dial target,
SNI, names to verify, CA bundle, client certificates, ``dns``, timeouts) or from a URL
given on the command line (``postgres://host:5432``, ``rediss://host``, ``tcp://host:port``,
with ``--cert/--key/--ca/--sni/--user``).  The same :class:`Target` drives both, so an ad
hoc check behaves exactly as the proxy would with the equivalent config.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from dbmtls.config.model import Config, DatabaseConfig, DnsConfig, TLSSettings
from dbmtls.config.schema import ValidationError
from dbmtls.protocols.registry import REGISTRY
from dbmtls.protocols.spec import ProtocolSpec

# URL scheme -> protocol name in the registry
SCHEMES = {
    "postgres": "postgres",
    "postgresql": "postgres",
    "cockroachdb": "cockroachdb",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "redis": "redis",
    "rediss": "redis",
    "mongodb": "mongodb",
    "tcp": "tcp",
}

DEFAULT_TIMEOUT = 5.0
EXPIRY_WARNING = 7 * 86400.0


class TargetError(ValueError):
    """The command line or the config does not describe something the doctor can check."""


@dataclass(frozen=True)
class Login:
    """A database user to log in as, with the client certificate used for it (None: none)."""

    user: str
    cert: tuple[str, str] | None


@dataclass(frozen=True)
class Target:
    name: str
    spec: ProtocolSpec
    host: str  # where to connect
    port: int
    server_name: str  # SNI
    verify_names: tuple[str, ...]  # the server certificate must carry one of these
    tls: TLSSettings
    direct_tls: bool = False
    dns: DnsConfig = field(default_factory=DnsConfig)
    connect_timeout: float = DEFAULT_TIMEOUT
    handshake_timeout: float = DEFAULT_TIMEOUT
    expiry_warning: float = EXPIRY_WARNING
    logins: tuple[Login, ...] = ()
    database: str | None = None  # PostgreSQL: the database named in the StartupMessage
    from_config: bool = True  # how to phrase fixes: config fields, or command-line options

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def identity(self) -> tuple[str, str] | None:
        """The client certificate for the TLS checks: the default one, else the first user's."""
        t = self.tls
        if t.clientCertificate and t.privateKey:
            return (t.clientCertificate, t.privateKey)
        for login in self.logins:
            if login.cert is not None:
                return login.cert
        for uc in t.userCertificates.values():
            return (uc.clientCertificate, uc.privateKey)
        return None

    def option(self, field: str) -> str:
        """How the user sets ``field`` here: a config key or a command-line option."""
        if self.from_config:
            return f"tls.{field}"
        return {
            "sni": "--sni",
            "subjectAltNames": "--sni",
            "caCertificates": "--ca",
            "clientCertificate": "--cert",
            "privateKey": "--key",
            "mode": "--cert/--key",
        }.get(field, field)


def from_database(db: DatabaseConfig, config: Config, user: str | None = None, timeout: float | None = None) -> Target:
    """``timeout``: instead of the database's connectTimeout and handshakeTimeout."""
    host, port = db.dial_target
    t = db.tls
    default = (t.clientCertificate, t.privateKey) if t.clientCertificate and t.privateKey else None
    logins: list[Login] = []
    if user is not None:
        if user in t.userCertificates:
            uc = t.userCertificates[user]
            logins.append(Login(user, (uc.clientCertificate, uc.privateKey)))
        elif default is not None or t.mode != "MUTUAL":
            logins.append(Login(user, default))
        else:
            raise TargetError(
                f"database {db.name!r} has no client certificate for user {user!r}: "
                f"one of {', '.join(sorted(t.userCertificates))}"
            )
    else:
        for name, uc in sorted(t.userCertificates.items()):
            logins.append(Login(name, (uc.clientCertificate, uc.privateKey)))
    return Target(
        name=db.name,
        spec=db.spec,
        host=host,
        port=port,
        server_name=db.server_name,
        verify_names=db.verify_names,
        tls=t,
        direct_tls=db.directTls,
        dns=config.dns,
        connect_timeout=timeout or db.connectTimeout,
        handshake_timeout=timeout or db.handshakeTimeout,
        expiry_warning=config.certificateExpiryWarning,
        logins=tuple(logins),
    )


def from_url(
    url: str,
    *,
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
    sni: str | None = None,
    user: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Target:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise TargetError(f"unknown URL scheme {parts.scheme or '(none)'!r} in {url!r}; one of {', '.join(SCHEMES)}")
    spec = REGISTRY.get(SCHEMES[scheme])
    if "," in parts.netloc:
        raise TargetError(f"{url!r} names several hosts: give one URL per server")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise TargetError(f"invalid port in {url!r}: {exc}") from None
    if not host:
        raise TargetError(f"no host in {url!r} (e.g. {scheme}://db.example:{spec.default_port or 443})")
    if port is None:
        if spec.default_port is None:
            raise TargetError(f"{scheme}:// has no default port: write {scheme}://{host}:PORT")
        port = spec.default_port
    if (cert is None) != (key is None):
        raise TargetError("--cert and --key go together")
    if user is None and parts.username:
        user = urllib.parse.unquote(parts.username)
    if user is not None and not spec.user_before_tls:
        raise TargetError(f"--user logs in to PostgreSQL or MySQL; {spec.title} has no login step here")
    try:
        tls = TLSSettings(
            mode="MUTUAL" if cert else "SIMPLE",
            clientCertificate=cert,
            privateKey=key,
            caCertificates=ca,
            sni=sni,
        )
    except ValidationError as exc:
        raise TargetError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    server_name = sni or host
    database = urllib.parse.unquote(parts.path.lstrip("/")) or None
    return Target(
        name=_redacted(url, parts),
        spec=spec,
        host=host,
        port=port,
        server_name=server_name,
        verify_names=(server_name,),
        tls=tls,
        connect_timeout=timeout,
        handshake_timeout=timeout,
        logins=(Login(user, (cert, key) if cert and key else None),) if user else (),
        database=database,
        from_config=False,
    )


def _redacted(url: str, parts: urllib.parse.SplitResult) -> str:
    """The URL as given, without a password in it (the doctor prints its name)."""
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
