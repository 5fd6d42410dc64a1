"""Per-database runtime state: config, TLS material, counters, live connections.

Counters are plain integers incremented once per connection (never per chunk);
``dbmtls.admin.metrics`` turns them into Prometheus metrics when scraped, adding
the byte counts of connections that are still open.
"""

from __future__ import annotations

import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from dbmtls.config.model import DatabaseConfig
from dbmtls.errors import DbmtlsError, Reason, UpstreamError
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.notice import Notice
from dbmtls.proxy.relay import Relay
from dbmtls.tls.material import ClientTLS

if TYPE_CHECKING:  # dbmtls.native.plane imports this module
    from dbmtls.native.plane import NativePlane, NativeRelay, NativeUpstream
    from dbmtls.proxy.preconnect import Pool

# Histogram buckets (seconds) for upstream connect and TLS handshake durations.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.n += 1
        self.total += seconds
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break


@dataclass
class Stats:
    accepted: int = 0
    closed: int = 0
    bytes_from_app: int = 0  # of closed connections; live ones are added at scrape time
    bytes_from_upstream: int = 0
    handshake_failures: Counter[Reason] = field(default_factory=Counter)
    app_protocol_errors: int = 0
    connect_seconds: Histogram = field(default_factory=Histogram)
    handshake_seconds: Histogram = field(default_factory=Histogram)
    # upstream TLS handshakes that resumed a session, and those that offered one the server
    # refused (docs/tls-resumption.md)
    tls_resumed: int = 0
    tls_resume_refused: int = 0
    # app connections given a pre-handshaken upstream, and pooled connections thrown away
    # unused (closed by the server, older than preconnect.maxIdle, made before a reload)
    preconnect_used: int = 0
    preconnect_discarded: int = 0

    def record_failure(self, err: DbmtlsError) -> None:
        if err.reason is Reason.APP_PROTOCOL:
            self.app_protocol_errors += 1
        else:
            self.handshake_failures[err.reason] += 1


class Session(Protocol):
    """A protocol's session driver (``ProtocolSpec.session``), one instance per database.

    ``run`` carries one app connection from accept to close.  On failure it raises a
    ``DbmtlsError`` after setting ``conn.notice`` to say how the app can be told; the
    proxy then records, logs and tells it, in one place.
    """

    def __init__(self, rt: DatabaseRuntime) -> None: ...

    async def run(self, conn: Conn) -> None: ...


class Dialer(Protocol):
    """Opens server connections for sessions (``dbmtls.proxy.upstream.Dialer`` in production,
    a scripted one in the transcript tests)."""

    def failure(self, conn: Conn, exc: BaseException) -> UpstreamError: ...

    async def connect(self, conn: Conn) -> Endpoint: ...

    async def start_tls(self, conn: Conn, ep: Endpoint, user: str | None = None) -> None: ...

    async def dial(self, conn: Conn, user: str | None = None) -> Endpoint: ...


class DatabaseRuntime:
    def __init__(self, db: DatabaseConfig, dialer: Dialer) -> None:
        self.db = db
        self.spec = db.spec
        self.tls = ClientTLS(db)
        self.dialer = dialer
        self.stats = Stats()
        self.active: set[Conn] = set()
        self.relayed = 0  # of ``active``, those admitted (not being refused)
        self.listening = False
        # dataPlane native, for a protocol whose session supports it (Proxy sets it): the TLS
        # handshake and the relay run in the native plane's threads (docs/native.md)
        self.native: NativePlane | None = None
        # preconnect.connections > 0: upstream connections kept handshaken (Proxy starts it)
        self.pool: Pool | None = None

    @property
    def name(self) -> str:
        return self.db.name


@dataclass(eq=False, slots=True)  # slots: one per connection, for its whole life (docs/memory.md)
class Conn:
    """Bookkeeping of one app connection, for the close log line and metrics."""

    rt: DatabaseRuntime
    app: Endpoint
    peer: str
    started: float = field(default_factory=time.monotonic)
    user: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    error: DbmtlsError | None = None  # set once, by the proxy, from what the session raised
    notice: Notice | None = None  # how to tell the app about a failure (None: just close)
    relay: Relay | NativeRelay | None = None
    upstream: Endpoint | NativeUpstream | None = None  # the latest server connection, aborted if the session dies
    note: str | None = None  # e.g. "cancel request"
    tls_resumed: bool = False  # the upstream TLS handshake resumed a session
    preconnected: bool = False  # the upstream came handshaken from the preconnect pool
    # the upstream's context and SSL object, to keep its session when it ends (tls.resume)
    upstream_tls: tuple[ssl.SSLContext, ssl.SSLObject | None] | None = None
    refused: DbmtlsError | None = None  # set at accept when a connection limit is reached

    def admit(self) -> None:
        """Raise the refusal decided at accept, if any.  Every session calls this at the first
        point where its protocol can say "too many connections", and before it dials."""
        if self.refused is not None:
            raise self.refused

    @property
    def bytes_from_app(self) -> int:
        return self.relay.bytes_from_app if self.relay else 0

    @property
    def bytes_from_upstream(self) -> int:
        return self.relay.bytes_from_upstream if self.relay else 0
