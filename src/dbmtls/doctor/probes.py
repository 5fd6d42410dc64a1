"""Per protocol: what is said before TLS, how to get the server's answer after it, and a login.

Each probe speaks only as much of its protocol as the doctor needs, with the project's
sans-IO pieces where they exist (PostgreSQL's ``UpstreamNegotiation``, ``FirstReply`` and
``BackendScanner``; MySQL's greeting and HandshakeResponse parsers and packet framing),
over a :class:`~dbmtls.doctor.wire.Wire`.  What each probe sends:

======================  ==========================  ====================================  ==================
protocol                before TLS (plaintext)      after the handshake (verified TLS)    login
======================  ==========================  ====================================  ==================
PostgreSQL/CockroachDB  SSLRequest (not directTls)  a read, or the login's StartupMessage  StartupMessage
MySQL/MariaDB           read greeting; SSLRequest   a read, or the login                  HandshakeResponse
Redis                   ``PING`` (own connection)   ``PING``                              --
MongoDB                 ``hello`` (own connection)  ``hello``                             --
tcp                     nothing                     a read                                --
======================  ==========================  ====================================  ==================

A plaintext ``PING``/``hello`` tells a plaintext server from a TLS one at once: a TLS
server answers those bytes with an alert or a close, a plaintext one with its protocol;
a ClientHello sent to a plaintext Redis could instead wait forever for a newline.  No
credentials and no application data are ever sent in plaintext or before the server
was verified: the login carries a user name (and the client certificate), never a
password.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from dbmtls.doctor.report import Status, Step
from dbmtls.doctor.target import Login, Target
from dbmtls.doctor.wire import Wire
from dbmtls.errors import DbmtlsError, sanitize
from dbmtls.protocols import mysql, postgres
from dbmtls.protocols.events import NeedData

# How long to wait, after a handshake, for a TLS 1.3 server to send its verdict on our
# certificate when the protocol gives us nothing to ask (the alert follows the handshake
# within one round trip; a server that accepted us just stays silent).
ANSWER_WAIT = 1.0


@dataclass
class Preamble:
    step: Step
    go_on: bool = True  # TLS can follow
    fresh_connection: bool = False  # the probe used this connection up: TLS on a new one


def _looks_like_tls(data: bytes) -> bool:
    return len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 3


def _shown(data: bytes, limit: int = 40) -> str:
    text = data[:limit].decode("ascii", "replace")
    return repr("".join(c if c.isprintable() else "." for c in text))


class Probe:
    """The protocol-independent default: TLS from the first byte, nothing to say (``tcp``)."""

    preamble_title = "plaintext preamble"
    # something to ask over TLS that any server of the protocol answers (None: just read)
    question: bytes | None = None

    def preamble(self, wire: Wire, target: Target) -> Preamble:
        return Preamble(
            Step("preamble", self.preamble_title, Status.SKIP, "TLS from the first byte: nothing to ask in plaintext")
        )

    def judge_answer(self, data: bytes) -> tuple[Status, str]:
        if self.question is None:
            return Status.OK, f"the server sent {len(data)} bytes first (a server-first protocol)"
        return Status.OK, f"the server answered over TLS: {_shown(data)}"

    def login(self, wire: Wire, target: Target, login: Login, subject: str | None) -> Step:
        return Step("login", f"login as {login.user}", Status.SKIP, "no login for this protocol")


# --- PostgreSQL / CockroachDB ---------------------------------------------------------------------


def startup_message(user: str, database: str) -> bytes:
    params = b"".join(
        k + b"\x00" + v.encode() + b"\x00"
        for k, v in ((b"user", user), (b"database", database), (b"application_name", "dbmtls-doctor"))
    )
    body = (3 << 16).to_bytes(4, "big") + params + b"\x00"
    return (len(body) + 4).to_bytes(4, "big") + body


TERMINATE = b"X\x00\x00\x00\x04"


def pg_messages(buf: bytes | bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """The complete backend messages at the start of ``buf`` and how many bytes they take."""
    out, pos = [], 0
    while len(buf) - pos >= 5:
        length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if length < 4:
            raise EOFError(f"the server sent a message with invalid length {length}: not PostgreSQL?")
        if pos + 1 + length > len(buf):
            break
        out.append((buf[pos], bytes(buf[pos + 5 : pos + 1 + length])))
        pos += 1 + length
    return out, pos


def error_fields(body: bytes) -> dict[str, str]:
    """An ErrorResponse's fields by code (S, C, M, D, H, ...), made printable."""
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            fields.setdefault(chr(part[0]), sanitize(part[1:].decode("utf-8", "replace"), limit=300))
    return fields


_AUTH_METHODS = {2: "Kerberos", 3: "a cleartext password", 5: "an MD5 password", 7: "GSSAPI", 9: "SSPI", 10: "SASL"}


class PostgresProbe(Probe):
    preamble_title = "PostgreSQL SSLRequest"

    def __init__(self, product: str = "PostgreSQL") -> None:
        self.product = product

    def preamble(self, wire: Wire, target: Target) -> Preamble:
        title = f"{self.product} SSLRequest"
        if target.direct_tls:
            return Preamble(
                Step("preamble", title, Status.SKIP, "directTls: TLS from the first byte (ALPN postgresql)")
            )
        wire.send(postgres.SSL_REQUEST)
        machine = postgres.UpstreamNegotiation()
        try:
            first = wire.recv_exact(1)
        except EOFError:
            first = b""
        except TimeoutError:
            return Preamble(
                Step(
                    "preamble",
                    title,
                    Status.FAIL,
                    f"no answer to the SSLRequest within {wire.timeout:g}s",
                    fix="a PostgreSQL server answers S or N at once: check that the port is PostgreSQL's",
                ),
                go_on=False,
            )
        machine.receive_data(first)
        try:
            machine.next_event()
            extra = wire.pending_plaintext()
            if extra:
                machine.receive_data(extra)
                machine.next_event()
        except DbmtlsError as err:
            return Preamble(self._refused(first, err), go_on=False)
        return Preamble(Step("preamble", title, Status.OK, "the server answered S: it does TLS"))

    def _refused(self, first: bytes, err: DbmtlsError) -> Step:
        title = f"{self.product} SSLRequest"
        if first == b"N":
            if self.product == "CockroachDB":
                fix = "start cockroach with --certs-dir (not --insecure); dbmtls never falls back to plaintext"
            else:
                fix = (
                    "turn TLS on in the server: ssl = on with ssl_cert_file and ssl_key_file (and ssl_ca_file to "
                    "check client certificates) in postgresql.conf, then SELECT pg_reload_conf(); "
                    "dbmtls never falls back to plaintext"
                )
            return Step(
                "preamble", title, Status.FAIL, "the server answered N: it does not do TLS (ssl = off)", fix=fix
            )
        if _looks_like_tls(first):
            return Step(
                "preamble",
                title,
                Status.FAIL,
                "the port answered the SSLRequest with TLS: it expects TLS from the first byte",
                fix="if this is PostgreSQL 17+ behind a TLS-first proxy, set directTls: true; "
                "otherwise the port is not PostgreSQL's",
            )
        return Step(
            "preamble",
            title,
            Status.FAIL,
            err.message if first else "the server closed the connection without answering the SSLRequest",
            details=[f"first byte: {_shown(first)}"] if first else [],
            fix=err.hint or "check that address points at a PostgreSQL server",
        )

    def login(self, wire: Wire, target: Target, login: Login, subject: str | None) -> Step:
        title = f"login as {login.user}"
        database = target.database or login.user
        wire.send(startup_message(login.user, database))
        first = postgres.FirstReply()  # up to the first Authentication or ErrorResponse, bounded
        while True:
            chunk = wire.recv()
            if not chunk:
                raise EOFError("the server closed the connection without answering the StartupMessage")
            first.receive_data(chunk)
            if not isinstance(first.next_event(), NeedData):
                break
        buf = bytearray(first.received)
        data: dict[str, object] = {"user": login.user, "database": database}
        authenticated = False
        for _ in range(64):
            messages, used = pg_messages(buf)
            del buf[:used]
            for kind, body in messages:
                if kind == ord("R"):
                    code = int.from_bytes(body[:4], "big")
                    if code == 0:
                        authenticated = True
                    elif not authenticated:
                        return self._password(title, login, code, data)
                elif kind == ord("E"):
                    fields = error_fields(body)
                    rejected = postgres.LoginRejected(fields.get("C", "?????"), fields.get("M", ""))
                    return self._rejected(title, login, subject, rejected, data, authenticated=authenticated)
                elif kind == ord("Z"):
                    wire.send(TERMINATE)
                    return Step(
                        "login",
                        title,
                        Status.OK,
                        f"AuthenticationOk: the certificate logs in as {login.user} (database {database})",
                        data=data,
                    )
            chunk = wire.recv()
            if not chunk:
                break
            buf += chunk
        return Step(
            "login",
            title,
            Status.FAIL,
            "the server closed the connection in the middle of the login",
            fix="see the server's log",
            data=data,
        )

    @staticmethod
    def _password(title: str, login: Login, code: int, data: dict[str, object]) -> Step:
        method = _AUTH_METHODS.get(code, f"authentication method {code}")
        return Step(
            "login",
            title,
            Status.WARN,
            f"the server accepted the certificate at the TLS level and asks {login.user} for {method}",
            details=["the certificate alone does not log this user in: the app must send the password"],
            fix="for certificate-only logins, use the cert method for this user in pg_hba.conf "
            "(hostssl DB USER ADDRESS cert)",
            data={**data, "auth_request": code},
        )

    def _rejected(
        self,
        title: str,
        login: Login,
        subject: str | None,
        err: postgres.LoginRejected,
        data: dict[str, object],
        *,
        authenticated: bool,
    ) -> Step:
        data = {**data, "sqlstate": err.sqlstate, "message": err.message}
        said = f"{err.sqlstate} {err.message}"
        if authenticated or err.sqlstate == "3D000":
            return Step(
                "login",
                title,
                Status.OK,
                f"the certificate authenticates {login.user}; the session then failed: {said}",
                details=["that is about the database, not the certificate"],
                data=data,
            )
        cn = f"CN={subject}" if subject else "the certificate's CN"
        if "pg_hba.conf" in err.message:
            fix = (
                f"add a line for user {login.user} from this address to the server's pg_hba.conf, "
                f"e.g. hostssl all {login.user} ADDRESS/32 cert"
            )
        elif "certificate" in err.message and "authentication failed" in err.message:
            fix = (
                f"the cert method requires the certificate's CN to be the user: {cn} is not {login.user}; "
                f"log in as {subject or 'the CN'}, use a certificate issued for {login.user} "
                f"(tls.userCertificates.{login.user}), or map the CN to {login.user} in pg_ident.conf (cert map=...)"
            )
        elif "requires a valid client certificate" in err.message:
            fix = "the server wants a client certificate for this login: set tls.mode MUTUAL (or --cert/--key)"
        elif err.sqlstate.startswith("28"):
            fix = f"the server refuses {login.user} with this certificate: see pg_hba.conf and the server's log"
        else:
            fix = "see the server's log"
        return Step("login", title, Status.FAIL, f"the server refused the login: {said}", fix=fix, data=data)


# --- MySQL / MariaDB ------------------------------------------------------------------------------------

_CLIENT_TRANSACTIONS = 0x2000
_MAX_PACKET = 1 << 24
_UTF8MB4 = 45


def handshake_response(user: str, server_caps: int, database: str | None = None) -> mysql.HandshakeResponse:
    """Our HandshakeResponse41 with an empty auth response (the certificate is the credential)."""
    flags = (
        mysql.CLIENT_MYSQL
        | mysql.CLIENT_PROTOCOL_41
        | mysql.CLIENT_SECURE_CONNECTION
        | mysql.CLIENT_PLUGIN_AUTH
        | _CLIENT_TRANSACTIONS
        | (mysql.CLIENT_CONNECT_WITH_DB if database else 0)
    ) & (server_caps | mysql.CLIENT_PROTOCOL_41)
    payload = flags.to_bytes(4, "little") + _MAX_PACKET.to_bytes(4, "little") + bytes([_UTF8MB4]) + bytes(23)
    payload += user.encode() + b"\x00" + b"\x00"  # user, empty auth response (length 0)
    if database:
        payload += database.encode() + b"\x00"
    payload += b"mysql_native_password\x00"
    return mysql.parse_handshake_response(payload)


class MySQLProbe(Probe):
    def __init__(self, product: str) -> None:
        self.product = product
        self.preamble_title = f"{product} greeting"
        self.greeting: mysql.Greeting | None = None

    def _packet(self, wire: Wire) -> tuple[int, bytes]:
        header = wire.recv_exact(4)
        length = int.from_bytes(header[:3], "little")
        if length > mysql.MAX_HANDSHAKE_RESPONSE:
            raise EOFError(f"a {length}-byte packet is not a MySQL handshake packet")
        return header[3], wire.recv_exact(length)

    def preamble(self, wire: Wire, target: Target) -> Preamble:
        title = self.preamble_title
        try:
            _, payload = self._packet(wire)
        except TimeoutError:
            return Preamble(
                Step(
                    "preamble",
                    title,
                    Status.FAIL,
                    f"no greeting within {wire.timeout:g}s (a MySQL server speaks first)",
                    fix="check that the port is MySQL's; a TLS-first port waits silently for a ClientHello",
                ),
                go_on=False,
            )
        except EOFError as exc:
            return Preamble(
                Step("preamble", title, Status.FAIL, f"no greeting: {exc}", fix="check that the port is MySQL's"),
                go_on=False,
            )
        if payload[:1] == b"\xff":
            errno, state, message = mysql.parse_err(payload)
            return Preamble(
                Step(
                    "preamble",
                    title,
                    Status.FAIL,
                    f"the server refused the connection before TLS: ERROR {errno}: {message}",
                    fix="1040: too many connections; 1129/1130: the server does not let this host in "
                    "(FLUSH HOSTS / GRANT for this host); see the server's log",
                    data={"errno": errno, "sqlstate": state, "message": message},
                ),
                go_on=False,
            )
        try:
            greeting = mysql.parse_greeting(payload)
        except DbmtlsError as err:
            return Preamble(
                Step("preamble", title, Status.FAIL, err.message, fix="check that the port is MySQL's"), go_on=False
            )
        self.greeting = greeting
        data = {
            "server_version": greeting.server_version,
            "connection_id": greeting.connection_id,
            "client_ssl": bool(greeting.capabilities & mysql.CLIENT_SSL),
            "auth_plugin": greeting.auth_plugin,
        }
        said = f"server {greeting.server_version} (connection {greeting.connection_id}, auth {greeting.auth_plugin})"
        if not greeting.capabilities & mysql.CLIENT_SSL:
            return Preamble(
                Step(
                    "preamble",
                    title,
                    Status.FAIL,
                    f"{said} does not offer TLS (no CLIENT_SSL in its greeting)",
                    fix="turn TLS on in the server: ssl_cert, ssl_key (and ssl_ca for client certificates) in "
                    "[mysqld], then restart it; dbmtls never falls back to plaintext",
                    data=data,
                ),
                go_on=False,
            )
        wire.send(mysql.packet(handshake_response("", greeting.capabilities).ssl_request(), 1))
        return Preamble(Step("preamble", title, Status.OK, f"{said} offers TLS; SSLRequest sent", data=data))

    def login(self, wire: Wire, target: Target, login: Login, subject: str | None) -> Step:
        title = f"login as {login.user}"
        assert self.greeting is not None
        response = handshake_response(login.user, self.greeting.capabilities)
        wire.send(mysql.packet(response.with_ssl(), 2))
        data: dict[str, object] = {"user": login.user}
        for _ in range(8):
            seq, payload = self._packet(wire)
            kind = payload[:1]
            if kind == b"\x00":
                wire.send(mysql.packet(b"\x01", 0))  # COM_QUIT
                return Step("login", title, Status.OK, f"OK: the certificate logs in as {login.user}", data=data)
            if kind == b"\xff":
                errno, state, message = mysql.parse_err(payload)
                data.update(errno=errno, sqlstate=state, message=message)
                if subject is None:
                    fix = (
                        "we sent no client certificate: an account with REQUIRE X509/SUBJECT needs one "
                        "(tls.mode MUTUAL, or --cert/--key)"
                    )
                else:
                    fix = (
                        f"check the account's REQUIRE SUBJECT/ISSUER against our certificate (/CN={subject}) with "
                        f"SHOW CREATE USER '{login.user}'; see the server's log"
                    )
                return Step(
                    "login",
                    title,
                    Status.FAIL,
                    f"the server refused the login: ERROR {errno} ({state}): {message}",
                    details=[
                        "the doctor sends no password: this confirms accounts identified by their certificate "
                        "alone; for an account with a password this refusal is expected"
                    ],
                    fix=fix,
                    data=data,
                )
            if kind == b"\xfe":  # AuthSwitchRequest: the same empty answer for the new plugin
                wire.send(mysql.packet(b"", seq + 1))
                continue
            if kind == b"\x01" and payload[1:2] == b"\x03":  # caching_sha2 fast auth: OK follows
                continue
            return Step(
                "login",
                title,
                Status.WARN,
                f"the server wants more than the certificate from {login.user} (a password)",
                details=["the app sends the password through dbmtls; the certificate was accepted at the TLS level"],
                data=data,
            )
        return Step("login", title, Status.FAIL, "the login did not end after 8 packets", data=data)


# --- Redis, MongoDB: TLS from the first byte, asked in plaintext first ---------------------------------


class RedisProbe(Probe):
    preamble_title = "Redis: TLS or plaintext"
    question = b"PING\r\n"

    def preamble(self, wire: Wire, target: Target) -> Preamble:
        wire.send(b"PING\r\n")
        return _plaintext_verdict(wire, self.preamble_title, "PING", _resp, "Redis", _REDIS_TLS)

    def judge_answer(self, data: bytes) -> tuple[Status, str]:
        line = data.split(b"\r\n", 1)[0].decode("utf-8", "replace")
        if line.startswith(("-NOAUTH", "-WRONGPASS")):
            return Status.OK, f"Redis answered PING over TLS: {line} (the app sends AUTH; dbmtls relays it)"
        if _resp(data):
            return Status.OK, f"Redis answered PING over TLS: {line}"
        return Status.WARN, f"the server answered PING with something that is not Redis: {_shown(data)}"


_REDIS_TLS = (
    "point address at the server's TLS port (redis.conf tls-port; port 0 turns plaintext off), "
    "or turn TLS on: tls-port, tls-cert-file, tls-key-file, tls-ca-cert-file"
)


def _resp(data: bytes) -> bool:
    return data[:1] in (b"+", b"-", b":", b"$", b"*", b"_", b"%") and b"\r\n" in data


def mongo_hello(request_id: int = 1) -> bytes:
    """OP_MSG {hello: 1, $db: "admin"}: what every driver sends first."""
    elements = b"\x10hello\x00" + struct.pack("<i", 1) + b"\x02$db\x00" + struct.pack("<i", 6) + b"admin\x00"
    doc = struct.pack("<i", len(elements) + 5) + elements + b"\x00"
    body = struct.pack("<I", 0) + b"\x00" + doc
    return struct.pack("<iiii", 16 + len(body), request_id, 0, 2013) + body


def _mongo_reply(data: bytes) -> bool:
    if len(data) < 16:
        return False
    _, _, _, op = struct.unpack("<iiii", data[:16])
    return op in (1, 2013)


class MongoProbe(Probe):
    preamble_title = "MongoDB: TLS or plaintext"
    question = mongo_hello(2)

    def preamble(self, wire: Wire, target: Target) -> Preamble:
        wire.send(mongo_hello(1))
        return _plaintext_verdict(wire, self.preamble_title, "hello", _mongo_reply, "MongoDB", _MONGO_TLS)

    def judge_answer(self, data: bytes) -> tuple[Status, str]:
        if _mongo_reply(data):
            return Status.OK, "MongoDB answered hello over TLS"
        return Status.WARN, f"the server answered hello with something that is not MongoDB: {_shown(data)}"


_MONGO_TLS = "require TLS on the server: net.tls.mode: requireTLS with net.tls.certificateKeyFile (and net.tls.CAFile)"


def _plaintext_verdict(
    wire: Wire, title: str, what: str, is_protocol: Callable[[bytes], bool], product: str, fix: str
) -> Preamble:
    try:
        data = wire.recv(4096)
    except TimeoutError:
        return Preamble(
            Step("preamble", title, Status.WARN, f"no answer to a plaintext {what} within {wire.timeout:g}s"),
            fresh_connection=True,
        )
    except OSError as exc:  # a reset: what TLS servers such as Redis do with bytes that are not TLS
        reason = (exc.strerror or type(exc).__name__).lower()
        summary = f"a plaintext {what} got a {reason}: the port does not speak plaintext {product} (TLS, as expected)"
        return Preamble(Step("preamble", title, Status.OK, summary), fresh_connection=True)
    if is_protocol(data):
        return Preamble(
            Step(
                "preamble",
                title,
                Status.FAIL,
                f"the server answered a plaintext {what}: this port speaks plaintext {product}, not TLS",
                details=[f"answer: {_shown(data)}"],
                fix=fix,
            ),
            go_on=False,
        )
    if _looks_like_tls(data):
        summary = f"the server answered a plaintext {what} with a TLS alert: it speaks TLS"
    elif not data:
        summary = f"the server closed the connection on a plaintext {what}: not plaintext {product}"
    else:
        return Preamble(
            Step(
                "preamble",
                title,
                Status.FAIL,
                f"the server answered a plaintext {what} with something that is neither {product} nor TLS",
                details=[f"answer: {_shown(data)}"],
                fix=f"check that address points at the {product} server's TLS port",
            ),
            go_on=False,
        )
    return Preamble(Step("preamble", title, Status.OK, summary), fresh_connection=True)


def probe_for(target: Target) -> Probe:
    name = target.spec.name
    if name in ("postgres", "cockroachdb"):
        return PostgresProbe(target.spec.title)
    if name in ("mysql", "mariadb"):
        return MySQLProbe(target.spec.title)
    if name == "redis":
        return RedisProbe()
    if name == "mongodb":
        return MongoProbe()
    return Probe()
