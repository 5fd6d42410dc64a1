"""Typed, frozen configuration models.

Validation of values lives here; loading (YAML, merging files, Istio
DestinationRules) lives in ``load.py``, with the checks across files whose
errors must name the file a database came from.  Field names are the YAML names
(camelCase, like Istio's ClientTLSSettings), so a validation error's location
is already the YAML path a user can find in the file (config/schema.py: the models are
pydantic-shaped, without pydantic).  Unknown fields are
errors: a typo such as ``clientCertficate`` must not silently mean "no cert".
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from dbmtls.config.credentials import DEFAULT_CREDENTIALS_DIR
from dbmtls.config.schema import (
    AfterValidator,
    BeforeValidator,
    Field,
    Model,
    PositiveInt,
    field_validator,
    model_validator,
)
from dbmtls.protocols.registry import REGISTRY
from dbmtls.protocols.spec import ProtocolSpec

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """'250ms', '5s', '1m', '7d' or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s or 250ms")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 5s, 250ms or 7d, got {value!r}")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class FieldError(ValueError):
    """A rule across fields, blamed on one of them: the loader appends ``field`` to the YAML path.

    A model validator's error is reported at the model's own location; a user
    looking for what to fix wants ``databases[1].tls.privateKey``, not ``databases[1].tls``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Model(Model):
    """Unknown fields are errors and instances are frozen (config/schema.py)."""


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'h:p', '[v6]:p', or 'h' (with a default port) -> (host, port)."""
    text = text.strip()
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unbalanced '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected ':port' after ']' in {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f"write IPv6 addresses as [addr]:port, got {text!r}")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing ':port' in {text!r}")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1-65535, got {port_text!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class UserCertificate(_Model):
    """A client certificate chosen by database user (PostgreSQL cert auth, MySQL REQUIRE SUBJECT)."""

    clientCertificate: str  # noqa: N815 -- YAML name
    privateKey: str  # noqa: N815


class TLSSettings(_Model):
    """Istio ClientTLSSettings: same field names, same meaning, plus per-user certificates."""

    mode: Literal["DISABLE", "SIMPLE", "MUTUAL"] = "SIMPLE"
    clientCertificate: str | None = None  # noqa: N815
    privateKey: str | None = None  # noqa: N815
    caCertificates: str | None = None  # noqa: N815 -- None: the system trust store
    sni: str | None = None
    subjectAltNames: tuple[str, ...] = ()  # noqa: N815
    insecureSkipVerify: bool = False  # noqa: N815
    minProtocolVersion: Literal["TLSV1_2", "TLSV1_3"] = "TLSV1_2"  # noqa: N815
    maxProtocolVersion: Literal["TLSV1_2", "TLSV1_3"] | None = None  # noqa: N815
    userCertificates: dict[str, UserCertificate] = Field(default_factory=dict)  # noqa: N815
    # Offer the server the session of an earlier connection (TLS 1.3 tickets, TLS 1.2 session
    # ids), kept per identity and server name only (docs/tls-resumption.md).  What every TLS
    # client library does by default; false: a full handshake every time.
    sessionResumption: bool = True  # noqa: N815

    @model_validator(mode="after")
    def _check(self) -> TLSSettings:
        if self.clientCertificate is not None and self.privateKey is None:
            raise FieldError("privateKey", "missing: clientCertificate and privateKey must be given together")
        if self.privateKey is not None and self.clientCertificate is None:
            raise FieldError("clientCertificate", "missing: clientCertificate and privateKey must be given together")
        if self.mode == "MUTUAL" and self.clientCertificate is None and not self.userCertificates:
            raise FieldError(
                "clientCertificate", "mode MUTUAL needs clientCertificate and privateKey (or userCertificates)"
            )
        if self.mode != "MUTUAL" and (self.clientCertificate or self.userCertificates):
            raise FieldError("mode", f"client certificates are only presented in mode MUTUAL, not {self.mode}")
        if self.mode == "DISABLE":
            for name in ("caCertificates", "sni", "insecureSkipVerify", "subjectAltNames"):
                if getattr(self, name):
                    raise FieldError(name, f"mode DISABLE sends plaintext and ignores {name}: use SIMPLE or MUTUAL")
        if self.maxProtocolVersion == "TLSV1_2" and self.minProtocolVersion == "TLSV1_3":
            raise FieldError("maxProtocolVersion", "maxProtocolVersion is below minProtocolVersion")
        return self


class PreconnectSettings(_Model):
    """Upstream connections kept handshaken ahead of the app connections that will use them
    (docs/tls-resumption.md): TLS is up, nothing of the app's has been sent."""

    # How many to keep ready; 0 (the default): none, every app connection dials its own.
    connections: int = Field(default=0, ge=0, le=64)
    # How long one may wait before it is replaced by a fresh one: keep it below the server's
    # idle timeouts (Redis timeout, PostgreSQL authentication_timeout 60s), or the app gets
    # a connection the server is about to close.
    maxIdle: Duration = 30.0  # noqa: N815


# Protocols whose upstream can be made ready before the app connects: TLS from the first byte,
# no user chosen before TLS.  MySQL cannot (the server greets first with a per-connection nonce
# the app must answer); PostgreSQL's StartupMessage picks the user, see docs/tls-resumption.md.
PRECONNECT_PROTOCOLS = ("redis", "mongodb", "tcp")


class DatabaseConfig(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    protocol: str  # a name (or alias) in dbmtls.protocols.registry; stored as the canonical name
    listen: str
    address: str
    tls: TLSSettings = TLSSettings()
    # Plaintext toward the app is only safe on loopback or a unix socket; anything else
    # must be asked for by name.
    allowRemoteClients: bool = False  # noqa: N815
    # PostgreSQL 17+: TLS from the first byte with ALPN "postgresql" (saves a round trip).
    directTls: bool = False  # noqa: N815
    connectTimeout: Duration = 5.0  # noqa: N815
    handshakeTimeout: Duration = 10.0  # noqa: N815
    # Close a relayed connection after this long without a byte either way (Envoy's TCP
    # proxy default): a silent app must not hold a server session forever.
    idleTimeout: Duration = 3600.0  # noqa: N815
    # At most this many app connections at once for this database; more get the protocol's
    # "too many connections" error.  None: only the process-wide limit applies.
    maxConnections: PositiveInt | None = None  # noqa: N815
    # Where a DestinationRule or an override asked to dial somewhere other than the
    # verified name: the TLS names stay those of ``address``.
    dial: str | None = None
    preconnect: PreconnectSettings = PreconnectSettings()

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        spec = REGISTRY.find(v)
        if spec is None:
            raise ValueError(f"unknown protocol {v!r}; one of {', '.join(REGISTRY.names)}")
        return spec.name

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix:"):
            if len(v) <= len("unix:"):
                raise ValueError("unix: needs a socket path")
            return v
        split_host_port(v)
        return v

    @field_validator("address", "dial")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            split_host_port(v, default_port=1)  # syntax only; the port default is per protocol
        return v

    @model_validator(mode="after")
    def _check(self) -> DatabaseConfig:
        if not self.listen.startswith("unix:") and not self.allowRemoteClients:
            host, _ = split_host_port(self.listen)
            if not is_loopback(host):
                raise FieldError(
                    "listen",
                    f"listen {self.listen} is not loopback: the app side is plaintext; "
                    "set allowRemoteClients: true to open it up on purpose",
                )
        if self.directTls and not self.spec.direct_tls_option:
            which = ", ".join(s.name for s in REGISTRY if s.direct_tls_option)
            raise FieldError("directTls", f"directTls applies to {which} only (TLS from the first byte)")
        if self.tls.userCertificates and not self.spec.user_before_tls:
            raise FieldError("tls.userCertificates", "needs a protocol that names the user before TLS")
        if self.preconnect.connections and self.protocol not in PRECONNECT_PROTOCOLS:
            raise FieldError(
                "preconnect.connections",
                f"preconnect applies to {', '.join(PRECONNECT_PROTOCOLS)} only (TLS from the first byte): "
                f"{self.protocol} chooses the identity or answers the server before TLS "
                "(docs/tls-resumption.md)",
            )
        if self.preconnect.connections and self.tls.mode == "DISABLE":
            raise FieldError("preconnect.connections", "preconnect keeps TLS connections ready; tls.mode is DISABLE")
        return self

    @property
    def spec(self) -> ProtocolSpec:
        return REGISTRY.get(self.protocol)

    @property
    def upstream(self) -> tuple[str, int]:
        """(host, port) whose name the server certificate must carry."""
        return split_host_port(self.address, self.spec.default_port)

    @property
    def dial_target(self) -> tuple[str, int]:
        return split_host_port(self.dial, self.upstream[1]) if self.dial else self.upstream

    @property
    def server_name(self) -> str:
        return self.tls.sni or self.upstream[0]

    @property
    def verify_names(self) -> tuple[str, ...]:
        return self.tls.subjectAltNames or (self.server_name,)


class AdminConfig(_Model):
    listen: str = "127.0.0.1:15000"  # "off" disables the admin server
    # The admin API can stop the process and change its log level, and has no authentication:
    # a non-loopback address (e.g. for Prometheus on the pod IP) must be asked for by name.
    # Without it the admin server also answers only requests whose Host is a loopback name,
    # which is what keeps a DNS-rebinding web page from reading /config and /metrics.
    allowRemote: bool = False  # noqa: N815
    # A second, read-only server (GET /healthz, /readyz, /metrics only), which may listen on a
    # non-loopback address: what kubelet probes and Prometheus need on a pod IP, without
    # exposing /quitquitquit and /loglevel there.  "off": none.
    publicListen: str = "off"  # noqa: N815

    @field_validator("listen", "publicListen", mode="before")
    @classmethod
    def _off(cls, v: object) -> object:
        # YAML 1.1 reads an unquoted `off` (and `no`, `false`) as a boolean: mean what was written
        return "off" if v is False else v

    @field_validator("listen", "publicListen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v != "off":
            split_host_port(v)
        return v

    @model_validator(mode="after")
    def _loopback(self) -> AdminConfig:
        if self.listen != "off" and not self.allowRemote and not is_loopback(split_host_port(self.listen)[0]):
            raise FieldError(
                "listen",
                f"admin listen {self.listen} is not loopback: the admin API has no authentication; "
                "set admin.allowRemote: true to open it up on purpose",
            )
        return self


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


def parse_nameserver(text: str) -> tuple[str, int]:
    """A ``dns.nameservers`` entry: 'ip', 'ip:port', '[v6]:port' or a bare IPv6 address -> (ip, port)."""
    text = text.strip()
    try:
        return str(ipaddress.ip_address(text)), 53  # a bare address, IPv6 included: port 53
    except ValueError:
        pass
    host, port = split_host_port(text, default_port=53)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"a nameserver must be an IP address (it cannot itself be looked up), got {text!r}") from None
    if ip.version == 6 and not text.startswith("["):
        raise ValueError(f"write IPv6 addresses as [addr]:port, got {text!r}")
    return str(ip), port


def _nameserver(text: str) -> str:
    parse_nameserver(text)
    return text


# validated per entry, so that an error names its index (dns.nameservers[1])
Nameserver = Annotated[str, AfterValidator(_nameserver)]


class DnsConfig(_Model):
    """How the servers' names are resolved.

    ``system`` is getaddrinfo: /etc/hosts first, then the system's DNS.  ``direct`` asks DNS
    only and never reads /etc/hosts: in a Kubernetes pod the injector points the database
    names at 127.0.0.1 in the pod's /etc/hosts (hostAliases), which every container shares,
    so the sidecar must not read it or it would connect to itself.
    """

    mode: Literal["system", "direct"] = "system"
    # direct: nameservers, search list and ndots (and options timeout/rotate) come from here
    resolvConf: str = Field(default="/etc/resolv.conf", min_length=1)  # noqa: N815
    # direct: these nameservers instead of resolvConf's ("ip", "ip:port", "[v6]:port")
    nameservers: tuple[Nameserver, ...] = ()
    # direct: a whole resolution (search list, A and AAAA) gives up after this long
    timeout: Duration = 5.0

    @model_validator(mode="after")
    def _check(self) -> DnsConfig:
        if self.mode == "system":
            # Judged by value, not by presence: the effective config that ``dbmtls check`` prints
            # (every field, defaults included) must load again.
            for name in ("resolvConf", "nameservers", "timeout"):
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise FieldError(
                        name,
                        f"mode system resolves with getaddrinfo (/etc/hosts, then the system's DNS) "
                        f"and ignores {name}: set mode: direct, or remove {name}",
                    )
        return self

    @property
    def nameserver_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_nameserver(n) for n in self.nameservers)


class Config(_Model):
    databases: tuple[DatabaseConfig, ...] = ()
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    dns: DnsConfig = DnsConfig()
    drainTimeout: Duration = 30.0  # noqa: N815
    # Who moves the bytes of an established connection (docs/native.md).  native: the C extension
    # dbmtls._native runs the server-side TLS handshake, the login's TLS reads and writes, and the
    # relay in native threads, for every protocol.  auto (the default): native when the extension
    # was built, else python, with a log line.  python: the asyncio relay (uvloop's transports and
    # ssl.SSLObject).  Asked for explicitly, native that cannot be had also falls back to python,
    # with a warning.
    dataPlane: Literal["auto", "native", "python"] = "auto"  # noqa: N815
    # Native worker threads (each its own epoll set; connections are spread round robin and never
    # move).  One is a sidecar's usual share of a core, like nginx's worker_processes 1; more only
    # pay when the pod has the cores and a single worker is saturated.
    nativeThreads: int = Field(default=1, ge=1, le=64)  # noqa: N815
    # At most this many app connections at once in the whole process.  None: as many as the
    # file descriptor limit allows (two descriptors each, some kept for the admin server).
    maxConnections: PositiveInt | None = None  # noqa: N815
    certificateExpiryWarning: Duration = 7 * 86400.0  # noqa: N815
    # Where ``credentialName: S`` is read: the Secret S mounted at <credentialsDir>/S/
    # (config/credentials.py).  The default is where the Kubernetes injector mounts it; on a
    # laptop, point it at a directory holding the Secrets' files.
    credentialsDir: str = Field(default=DEFAULT_CREDENTIALS_DIR, min_length=1)  # noqa: N815

    @model_validator(mode="after")
    def _unique(self) -> Config:
        seen: dict[str, int] = {}
        for i, db in enumerate(self.databases):
            if db.name in seen:
                raise ValueError(f"databases[{i}].name {db.name!r} is already used by databases[{seen[db.name]}]")
            seen[db.name] = i
        listens: dict[str, str] = {}
        for db in self.databases:
            if db.listen in listens:
                raise ValueError(f"databases {listens[db.listen]!r} and {db.name!r} both listen on {db.listen}")
            listens[db.listen] = db.name
        return self
