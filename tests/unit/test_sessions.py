"""The session glue, in-process: each protocol's decisions with both peers scripted.

The e2e tests prove the same paths against real servers and clients; these prove each
decision of the glue (what is written, to whom, in which order, what is recorded) in
milliseconds, including failures no real server produces on demand.  See
``tests/support/transcript.py``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dbmtls.config.model import Config
from dbmtls.errors import Reason
from dbmtls.protocols import mysql
from dbmtls.protocols import postgres as pg
from dbmtls.protocols.mysql import CLIENT_SSL, packet
from dbmtls.protocols.registry import REGISTRY
from support.certs import PKI
from support.mysql_wire import OK, greeting, response
from support.pg_wire import encode_startup
from support.transcript import Harness, harness, tls_alert

PING = b"*1\r\n$4\r\nPING\r\n"


def config(pki: PKI, protocol: str, db_fields: dict[str, Any] | None = None, **tls: Any) -> Config:
    if tls.get("mode") == "DISABLE":
        db = {"name": "db", "protocol": protocol, "listen": "127.0.0.1:1", "address": "srv:1", "tls": tls}
        return Config.model_validate({"databases": [{**db, **(db_fields or {})}]})
    settings: dict[str, Any] = {
        "mode": "MUTUAL",
        "clientCertificate": pki.client.cert,
        "privateKey": pki.client.key,
        "caCertificates": pki.ca_cert,
        **tls,
    }
    if "userCertificates" in tls:
        del settings["clientCertificate"], settings["privateKey"]
    db = {"name": "db", "protocol": protocol, "listen": "127.0.0.1:1", "address": "srv:1", "tls": settings}
    return Config.model_validate({"databases": [{**db, **(db_fields or {})}]})


def run(
    pki: PKI,
    protocol: str,
    script: Callable[[Harness], Awaitable[None]],
    *,
    db_fields: dict[str, Any] | None = None,
    settle: bool = True,
    **tls: Any,
) -> Harness:
    """Run ``script`` against a proxy for one database; with ``settle``, wait for every session."""

    async def main() -> Harness:
        async with harness(config(pki, protocol, db_fields, **tls)) as h:
            await script(h)
            if settle:
                await h.finished()
            return h

    return asyncio.run(main())


def failure_of(h: Harness) -> Reason | None:
    (conn,) = h.conns
    return conn.error.reason if conn.error else None


# --- Redis / MongoDB / TCP ---------------------------------------------------------------------


def test_redis_relays_both_ways(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(PING)
        await server.expect(PING)
        server.send(b"+PONG\r\n")
        await app.expect(b"+PONG\r\n")
        server.hang_up()  # the server closes: the app side follows
        assert await app.closed() == b""

    h = run(pki, "redis", script)
    assert failure_of(h) is None
    assert h.runtime().stats.closed == 1


def test_redis_unreachable_server_answers_each_request(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        h.dialer.refuse = ConnectionRefusedError()
        app = h.connect()
        app.send(PING + PING)
        app.send_eof()
        replies = (await app.closed()).split(b"\r\n")
        assert replies[2:] == [b""]
        assert replies[0] == replies[1]
        assert replies[0].startswith(b"-ERR dbmtls: [db] connection to srv:1 refused (hint: check that")

    h = run(pki, "redis", script)
    assert failure_of(h) is Reason.CONNECTION_REFUSED
    assert h.runtime().stats.handshake_failures[Reason.CONNECTION_REFUSED] == 1


def test_redis_tls_client_on_plaintext_listener_is_closed_without_a_word(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert await app.closed() == b""  # a TLS client cannot read a plaintext error
        assert await server.closed() == b""  # nothing of the ClientHello went upstream

    h = run(pki, "redis", script)
    assert failure_of(h) is Reason.APP_PROTOCOL
    assert h.runtime().stats.app_protocol_errors == 1
    err = h.conns[0].error
    assert err is not None and "redis-cli without --tls" in (err.hint or "")


def test_redis_tls13_certificate_rejection_after_handshake_reaches_the_app(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(PING)
        await server.expect(PING)
        server.reset(tls_alert("TLSV13_ALERT_CERTIFICATE_REQUIRED"))
        said = await app.closed()
        assert said.startswith(b"-ERR dbmtls: [db] server srv:1 rejected the client certificate")

    h = run(pki, "redis", script)
    assert failure_of(h) is Reason.CLIENT_CERT_REJECTED


def test_mongodb_unreachable_answers_hello_with_an_error_document(pki: PKI) -> None:
    doc = b"\x13\x00\x00\x00\x10hello\x00\x01\x00\x00\x00\x02$db\x00\x06\x00\x00\x00admin\x00\x00"
    doc = struct.pack("<i", len(doc)) + doc[4:]
    body = struct.pack("<I", 0) + b"\x00" + doc
    hello = struct.pack("<iiii", 16 + len(body), 7, 0, 2013) + body

    async def script(h: Harness) -> None:
        h.dialer.refuse = ConnectionRefusedError()
        app = h.connect()
        app.send(hello)
        header = await app.receive(16)
        length, _request_id, response_to, op = struct.unpack("<iiii", header)
        assert (response_to, op) == (7, 2013)
        reply = await app.receive(length - 16)
        assert b"HostUnreachable" in reply
        assert b"connection to srv:1 refused" in reply
        app.send_eof()
        await app.closed()

    h = run(pki, "mongodb", script)
    assert failure_of(h) is Reason.CONNECTION_REFUSED


def test_tcp_failure_is_a_close_and_a_record(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        h.dialer.handshake_error = ConnectionResetError()
        app = h.connect()
        assert await app.closed() == b""

    h = run(pki, "tcp", script)
    assert failure_of(h) is Reason.HANDSHAKE_FAILED
    (server,) = [h.dialer.servers.get_nowait()]
    assert server.transport.aborted


# --- PostgreSQL ----------------------------------------------------------------------------------


def startup(user: str = "alice", database: str = "shop") -> bytes:
    return encode_startup((3, 0), {"user": user, "database": database})


def pg_msg(mtype: bytes, body: bytes) -> bytes:
    return mtype + (len(body) + 4).to_bytes(4, "big") + body


SASL_PLUS = pg_msg(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
SASL = pg_msg(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0")


def test_postgres_upgrade_in_order_and_scram_plus_removed(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(pg.SSL_REQUEST)
        await app.expect(b"N")
        app.send(startup())
        server = await h.dialer.server()
        await server.expect(pg.SSL_REQUEST)  # nothing of the app's before TLS
        assert server.pending() == b""
        server.send(b"S")
        await server.expect(startup())  # verbatim, after TLS is up
        assert h.dialer.contexts, "TLS was started before the StartupMessage was sent"
        server.send(SASL_PLUS)
        await app.expect(SASL)
        app.send_eof()
        await server.closed()

    h = run(pki, "postgres", script)
    assert failure_of(h) is None
    assert h.conns[0].user == "alice"


@pytest.mark.parametrize(
    ("answer", "reason", "text"),
    [
        (b"N", Reason.SERVER_REFUSED_TLS, "server refused TLS"),
        (b"S" + b"injected", Reason.UPSTREAM_PROTOCOL, "unencrypted data after its SSL response"),
        (b"E", Reason.UPSTREAM_PROTOCOL, "error response during SSL exchange"),
    ],
)
def test_postgres_upstream_negotiation_failures_become_error_responses(
    pki: PKI, answer: bytes, reason: Reason, text: str
) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(startup())
        server = await h.dialer.server()
        await server.expect(pg.SSL_REQUEST)
        server.send(answer)
        said = await app.closed()
        assert said[:1] == b"E"
        assert text.encode() in said
        assert b"database 'shop' via srv:1" in said  # the detail names what the app asked for
        assert server.transport.aborted
        assert server.pending() == b""  # the StartupMessage never left

    h = run(pki, "postgres", script)
    assert failure_of(h) is reason
    assert h.dialer.contexts == []


def test_postgres_direct_tls_client_gets_a_close_only(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert await app.closed() == b""

    h = run(pki, "postgres", script)
    assert failure_of(h) is Reason.APP_PROTOCOL
    assert h.conns[0].error is not None
    assert "sslnegotiation=direct" in (h.conns[0].error.hint or "")


def test_postgres_garbage_gets_protocol_violation(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(b"GET / HTTP/1.1\r\n\r\n")
        said = await app.closed()
        assert said[:1] == b"E"
        assert b"C08P01\x00" in said

    h = run(pki, "postgres", script)
    assert failure_of(h) is Reason.APP_PROTOCOL


def test_postgres_user_without_certificate_never_dials(pki: PKI) -> None:
    bob = pki.client_for("bob")
    users = {"bob": {"clientCertificate": bob.cert, "privateKey": bob.key}}

    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(startup(user="mallory"))
        said = await app.closed()
        assert b"C28000\x00" in said
        assert b"mallory" in said
        assert h.dialer.servers.empty()

    h = run(pki, "postgres", script, userCertificates=users)
    assert failure_of(h) is Reason.NO_CERTIFICATE_FOR_USER


def test_postgres_cancel_goes_over_tls_with_the_sessions_identity(pki: PKI) -> None:
    bob, carol = pki.client_for("bob"), pki.client_for("carol")
    users = {u.dir.name: {"clientCertificate": u.cert, "privateKey": u.key} for u in (bob, carol)}
    users = {"bob": users[bob.dir.name], "carol": users[carol.dir.name]}
    key_data = pg_msg(b"K", struct.pack("!I", 4242) + b"\x01\x02\x03\x04")
    ready = pg_msg(b"Z", b"I")
    auth_ok = pg_msg(b"R", struct.pack("!I", 0))

    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(startup(user="carol"))
        server = await h.dialer.server()
        await server.expect(pg.SSL_REQUEST)
        server.send(b"S")
        await server.expect(startup(user="carol"))
        server.send(auth_ok + key_data + ready)
        await app.expect(auth_ok + key_data + ready)
        # a cancel for that backend, on a new connection
        canceller = h.connect()
        cancel = struct.pack("!III", 16, pg.CANCEL_REQUEST_CODE, 4242) + b"\x01\x02\x03\x04"
        canceller.send(cancel)
        cancel_server = await h.dialer.server()
        await cancel_server.expect(pg.SSL_REQUEST)
        cancel_server.send(b"S")
        await cancel_server.expect(cancel)
        cancel_server.hang_up()
        assert await canceller.closed() == b""
        server.hang_up()
        await app.closed()

    h = run(pki, "postgres", script, userCertificates=users)
    rt = h.runtime()
    session_ctx, cancel_ctx = h.dialer.contexts
    assert session_ctx is cancel_ctx is rt.tls.context_for("carol")
    assert [c.error for c in h.conns] == [None, None]


# --- MySQL / MariaDB -------------------------------------------------------------------------------


def test_mysql_upgrade_and_relay(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        server.send(packet(greeting(), 0))
        seen = await app.receive(len(packet(greeting(), 0)))
        caps = int.from_bytes(seen[4:][len(b"\x0a8.0.36\x00") + 13 :][:2], "little")
        assert not caps & CLIENT_SSL  # the app is told: no TLS here, stay in plaintext
        app.send(packet(response(plugin=b"mysql_native_password"), 1))
        ssl_request = await server.receive(4 + 32)
        assert ssl_request[3] == 1
        assert int.from_bytes(ssl_request[4:8], "little") & CLIENT_SSL
        hresp = await server.receive(len(packet(response(plugin=b"mysql_native_password"), 2)))
        assert hresp[3] == 2 and h.dialer.contexts  # after TLS, with the next sequence id
        server.send(packet(OK, 3))
        await app.expect(packet(OK, 2))  # renumbered for the app
        app.send(b"\x01\x00\x00\x00\x01")  # COM_QUIT, relayed verbatim
        await server.expect(b"\x01\x00\x00\x00\x01")
        server.hang_up()
        await app.closed()

    h = run(pki, "mysql", script)
    assert failure_of(h) is None
    assert h.conns[0].user == "u"


def test_mysql_unreachable_server_gets_a_pre_greeting_err(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        h.dialer.refuse = ConnectionRefusedError()
        app = h.connect()
        said = await app.closed()
        seq, payload = said[3], said[4:]
        assert seq == 0
        assert payload[:1] == b"\xff"
        errno = int.from_bytes(payload[1:3], "little")
        assert errno == mysql.ER_HANDSHAKE_ERROR[0]
        assert payload[3:4] != b"#"  # the app has not seen a 4.1 greeting: no SQLSTATE marker

    h = run(pki, "mysql", script)
    assert failure_of(h) is Reason.CONNECTION_REFUSED


def test_mysql_client_certificate_rejected_during_auth_is_access_denied(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        server.send(packet(greeting(), 0))
        await app.receive(len(packet(greeting(), 0)))
        app.send(packet(response(plugin=b"mysql_native_password"), 1))
        await server.receive(4 + 32)
        await server.receive(len(packet(response(plugin=b"mysql_native_password"), 2)))
        server.reset(tls_alert("TLSV13_ALERT_CERTIFICATE_REQUIRED"))
        said = await app.closed()
        assert said[3] == 2
        assert said[4:7] == b"\xff" + (1045).to_bytes(2, "little")
        assert said[7:13] == b"#28000"

    h = run(pki, "mysql", script)
    assert failure_of(h) is Reason.CLIENT_CERT_REJECTED


@pytest.mark.parametrize("app_sent", [PING, b""])
def test_redis_server_closing_before_answering_is_told_not_passed_on_as_eof(pki: PKI, app_sent: bytes) -> None:
    """A server that hangs up cleanly before its first byte (no alert, just close) has failed:
    the app gets the -ERR, never a bare EOF (which redis-cli shows as "Server closed the connection")."""

    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        if app_sent:
            app.send(app_sent)
            await server.expect(app_sent)
        server.send_eof()
        said = await app.closed()
        assert said.startswith(
            b"-ERR dbmtls: [db] server srv:1 closed the connection right after the TLS handshake without answering"
        ), said
        assert b"rejected the client certificate" in said
        assert not app.transport.eof_written

    h = run(pki, "redis", script)
    assert failure_of(h) is Reason.UPSTREAM_PROTOCOL


def test_redis_server_closing_an_idle_connection_later_is_an_eof(pki: PKI) -> None:
    """Past handshakeTimeout a clean close is the server's own business (its idle timeout)."""

    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(PING)
        await server.expect(PING)
        loop = asyncio.get_running_loop()
        real_time = loop.time
        loop.time = lambda: real_time() + 3600  # type: ignore[method-assign]  # an hour later
        try:
            server.send_eof()
            assert await app.closed() == b""
        finally:
            loop.time = real_time  # type: ignore[method-assign]
        assert app.transport.eof_written

    h = run(pki, "redis", script)
    assert failure_of(h) is None


def test_tcp_server_closing_without_a_byte_is_passed_on(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(b"hello")
        await server.expect(b"hello")
        server.send_eof()
        await app.closed()
        assert app.transport.eof_written  # opaque: the EOF is the server's answer, passed on

    h = run(pki, "tcp", script)
    assert failure_of(h) is None


# --- limits, timeouts and faults (what a sidecar that lives for months must say truthfully) -------

AppPeer = Any  # support.transcript.Peer, for the exchange helpers below


async def _refused_redis(app: AppPeer) -> bytes:
    app.send(PING)
    app.send_eof()
    said: bytes = await app.closed()
    return said


async def _refused_postgres(app: AppPeer) -> bytes:
    app.send(pg.SSL_REQUEST + startup())
    await app.expect(b"N")
    said: bytes = await app.closed()
    return said


async def _refused_silently(app: AppPeer) -> bytes:
    said: bytes = await app.closed()
    return said


_TOO_MANY = b"dbmtls: [db] too many connections: 1 open to this database (maxConnections 1)"
REFUSALS: dict[str, tuple[Callable[[AppPeer], Awaitable[bytes]], bytes]] = {
    "redis": (_refused_redis, b"-ERR " + _TOO_MANY),
    "mongodb": (_refused_silently, b""),
    "tcp": (_refused_silently, b""),
    "postgres": (_refused_postgres, b"C53300\x00M" + _TOO_MANY),
    "cockroachdb": (_refused_postgres, b"C53300\x00M" + _TOO_MANY),
    "mysql": (_refused_silently, b"\xff" + (1040).to_bytes(2, "little") + _TOO_MANY),
    "mariadb": (_refused_silently, b"\xff" + (1040).to_bytes(2, "little") + _TOO_MANY),
}


@pytest.mark.parametrize("protocol", REFUSALS)
def test_connection_limit_refuses_in_the_apps_protocol_and_never_dials(pki: PKI, protocol: str) -> None:
    exchange, expected = REFUSALS[protocol]

    async def script(h: Harness) -> None:
        h.connect()  # holds the one slot, whatever it is doing
        before = h.dialer.servers.qsize()
        said = await exchange(h.connect())
        assert h.dialer.servers.qsize() <= max(before, 1)  # the refused connection never dialled
        assert expected in said, said

    h = run(pki, protocol, script, db_fields={"maxConnections": 1}, settle=False)
    assert h.runtime().stats.handshake_failures[Reason.TOO_MANY_CONNECTIONS] == 1


def test_every_registered_protocol_is_covered_by_the_limit_test() -> None:
    assert set(REFUSALS) == set(REGISTRY.names)  # a new driver must show it calls conn.admit()


def test_idle_relayed_connection_is_closed_and_says_why(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(PING)
        await server.expect(PING)
        server.send(b"+PONG\r\n")
        await app.expect(b"+PONG\r\n")
        assert await app.closed() == b""  # nothing moves for idleTimeout: both sides closed
        assert server.transport.closing and not server.transport.aborted

    h = run(pki, "redis", script, db_fields={"idleTimeout": "200ms"})
    (conn,) = h.conns
    assert conn.error is None
    assert conn.note is not None and conn.note.startswith("idle timeout (0.2s")


def test_server_reset_mid_reply_is_passed_on_as_a_reset(pki: PKI) -> None:
    get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"

    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(get)
        await server.expect(get)
        server.send(b"$10\r\nhalf")
        await app.expect(b"$10\r\nhalf")
        server.reset()
        await app.closed()
        assert app.transport.aborted  # the app sees a reset, not a clean end after half a reply

    h = run(pki, "redis", script)
    assert failure_of(h) is Reason.UPSTREAM_RESET
    assert "after 9 bytes" in str(h.conns[0].error)


def test_app_reset_is_passed_on_as_a_reset(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(PING)
        await server.expect(PING)
        app.reset()
        await server.closed()
        assert server.transport.aborted

    h = run(pki, "redis", script)
    assert failure_of(h) is None
    assert h.conns[0].note == "the app reset the connection; passed on as a reset"


def test_disable_mode_server_hanging_up_is_reported_as_wanting_tls(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(PING)
        await server.expect(PING)  # plaintext, as configured
        server.hang_up()
        said = await app.closed()
        assert said.startswith(b"-ERR dbmtls: [db] srv:1 closed the connection without answering (tls.mode is DISABLE)")

    h = run(pki, "redis", script, mode="DISABLE")
    assert failure_of(h) is Reason.SERVER_REFUSED_PLAINTEXT
    assert h.dialer.contexts == []


def test_postgres_rejected_login_is_counted_as_auth_failed(pki: PKI) -> None:
    rejection = pg_msg(b"E", b'SFATAL\0VFATAL\0C28000\0Mcertificate authentication failed for user "alice"\0\0')

    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(startup())
        server = await h.dialer.server()
        await server.expect(pg.SSL_REQUEST)
        server.send(b"S")
        await server.expect(startup())
        server.send(rejection)
        server.hang_up()
        assert await app.closed() == rejection  # the server's own words reach the app

    h = run(pki, "postgres", script)
    assert failure_of(h) is Reason.AUTH_FAILED
    assert "28000 certificate authentication failed" in str(h.conns[0].error)


def test_postgres_app_giving_up_after_n_is_explained_in_the_log(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(pg.SSL_REQUEST)
        await app.expect(b"N")
        app.send_eof()
        assert await app.closed() == b""

    h = run(pki, "postgres", script)
    assert failure_of(h) is Reason.APP_CLOSED
    err = h.conns[0].error
    assert err is not None and "sslmode=disable or prefer" in (err.hint or "")


def test_postgres_port_probe_is_not_a_failure(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        app.send_eof()
        assert await app.closed() == b""

    h = run(pki, "postgres", script)
    assert failure_of(h) is None


def test_postgres_slow_loris_app_is_timed_out(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(startup()[:5])  # and never the rest
        assert await app.closed() == b""

    h = run(pki, "postgres", script, db_fields={"handshakeTimeout": "100ms"})
    assert failure_of(h) is Reason.APP_TIMEOUT
    assert h.dialer.servers.empty()


def test_server_failing_just_before_the_relay_starts_is_still_told(pki: PKI) -> None:
    """The race behind redis-cli's "Server closed the connection": the server's transport is
    already closing (its connection_lost queued, not yet delivered) when the relay starts."""

    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(PING)
        # closing now, connection_lost (with the TLS alert) delivered only on the next loop turn
        server.transport.closing = True
        asyncio.get_running_loop().call_soon(
            server.transport._connection_lost, tls_alert("TLSV13_ALERT_CERTIFICATE_REQUIRED")
        )
        said = await app.closed()
        assert said.startswith(b"-ERR dbmtls: [db] server srv:1 rejected the client certificate"), said

    h = run(pki, "redis", script)
    assert failure_of(h) is Reason.CLIENT_CERT_REJECTED


# --- more of each session's decisions -----------------------------------------------------------


def test_redis_error_window_answers_at_most_64_requests(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        h.dialer.refuse = ConnectionRefusedError()
        app = h.connect()
        app.send(PING * 100)
        said = await app.closed()  # closes after the cap, without waiting for the window to end
        assert said.count(b"-ERR dbmtls: [db] connection to srv:1 refused") == 64

    h = run(pki, "redis", script)
    assert failure_of(h) is Reason.CONNECTION_REFUSED


def test_mysql_server_without_a_greeting_times_out_with_a_pre_greeting_err(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        await h.dialer.server()  # accepts, never greets
        said = await app.closed()
        assert said[3] == 0 and said[4:5] == b"\xff"
        assert b"sent no greeting within 0.1s (is it a MySQL server?)" in said

    h = run(pki, "mysql", script, db_fields={"handshakeTimeout": "100ms"})
    assert failure_of(h) is Reason.TIMEOUT


def test_postgres_server_silent_after_startup_times_out_with_an_error_response(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(startup())
        server = await h.dialer.server()
        await server.expect(pg.SSL_REQUEST)
        server.send(b"S")
        await server.expect(startup())  # and then nothing
        said = await app.closed()
        assert b"C08001\x00" in said
        assert b"did not answer the StartupMessage within 0.1s" in said

    h = run(pki, "postgres", script, db_fields={"handshakeTimeout": "100ms"})
    assert failure_of(h) is Reason.TIMEOUT


def test_postgres_failed_cancel_is_recorded_and_closed(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        h.dialer.refuse = ConnectionRefusedError()
        app = h.connect()
        app.send(struct.pack("!III", 16, pg.CANCEL_REQUEST_CODE, 7) + b"\x01\x02\x03\x04")
        assert await app.closed() == b""  # a cancel has no reply, not even an error

    h = run(pki, "postgres", script)
    assert failure_of(h) is Reason.CONNECTION_REFUSED
    assert h.conns[0].note == "cancel request"


def test_mysql_app_speaking_tls_is_closed_without_an_err(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        server.send(packet(greeting(), 0))
        await app.receive(len(packet(greeting(), 0)))
        app.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert await app.closed() == b""
        assert server.transport.aborted

    h = run(pki, "mysql", script)
    assert failure_of(h) is Reason.APP_PROTOCOL


def test_session_cancelled_while_telling_the_app_aborts_it(pki: PKI) -> None:
    async def script(h: Harness) -> None:
        h.dialer.refuse = ConnectionRefusedError()
        app = h.connect()
        app.send(PING)
        await app.receive(5)  # the answering window is open
        h.proxy.close_all()  # a second signal during the drain
        await app.closed()
        assert app.transport.aborted

    run(pki, "redis", script, settle=False)
