"""The MySQL/MariaDB connection-phase machine, driven with bytes alone (and once by PyMySQL)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pymysql
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbmtls.errors import (
    AppProtocolError,
    AppTLSError,
    AuthenticationFailed,
    DbmtlsError,
    IdentityError,
    TLSHandshakeError,
    TLSRefused,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnreachable,
)
from dbmtls.protocols.mysql import (
    CLIENT_COMPRESS,
    CLIENT_CONNECT_WITH_DB,
    CLIENT_MYSQL,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
    CLIENT_PROTOCOL_41,
    CLIENT_SSL,
    CLIENT_ZSTD_COMPRESSION_ALGORITHM,
    MAX_HANDSHAKE_PACKET,
    MAX_IDLE_BUFFER,
    Event,
    Fail,
    MySQLHandshake,
    MySQLState,
    NeedData,
    NeedUser,
    Relay,
    SendToApp,
    SendToServer,
    StartTLS,
    err_packet,
    packet,
    parse_greeting,
    parse_handshake_response,
)
from support.mysql_wire import (
    APP_CAPS,
    AUTH_DENIED,
    MARIADB_EXT,
    MYSQL8_CAPS,
    OK,
    SCRAMBLE,
    SWITCH_NONCE,
    greeting,
    mariadb_greeting,
    response,
)

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def split(data: bytes) -> tuple[int, bytes]:
    """One framed packet -> (seq, payload); asserts it is exactly one packet."""
    n = int.from_bytes(data[:3], "little")
    assert len(data) == 4 + n, data
    return data[3], data[4:]


def set_ssl(payload: bytes) -> bytes:
    return (int.from_bytes(payload[:4], "little") | CLIENT_SSL).to_bytes(4, "little") + payload[4:]


def rsa_encrypt(public: rsa.RSAPublicKey, password: bytes, scramble: bytes) -> bytes:
    """What a client does for caching_sha2/sha256 over plaintext: RSA-OAEP(pw\\0 XOR scramble)."""
    plain = password + b"\x00"
    xored = bytes(b ^ scramble[i % len(scramble)] for i, b in enumerate(plain))
    return public.encrypt(xored, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))  # noqa: S303


def public_key_from(data: bytes) -> rsa.RSAPublicKey:
    """The key in a local ``01 || PEM`` answer."""
    _, payload = split(data)
    assert payload[:1] == b"\x01"
    assert payload[1:].startswith(b"-----BEGIN PUBLIC KEY-----")
    key = serialization.load_pem_public_key(payload[1:])
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def drain(hs: MySQLHandshake) -> list[Event]:
    out: list[Event] = []
    while not isinstance(action := hs.next_event(), NeedData):
        out.append(action)
    return out


def feed(hs: MySQLHandshake, side: Literal["server", "app"], data: bytes, *, bytewise: bool = False) -> list[Event]:
    fn = hs.receive_server_data if side == "server" else hs.receive_app_data
    if bytewise:
        out: list[Event] = []
        for i in range(len(data)):
            fn(data[i : i + 1])
            out += drain(hs)
        return out
    fn(data)
    return drain(hs)


def up_to_auth(
    hs: MySQLHandshake, greet: bytes, resp: bytes, *, bytewise: bool = False
) -> tuple[bytes, SendToServer, SendToServer]:
    """Greeting -> app response -> NeedUser -> SSLRequest/StartTLS -> HandshakeResponse upstream."""
    actions = feed(hs, "server", packet(greet, 0), bytewise=bytewise)
    assert len(actions) == 1
    assert isinstance(actions[0], SendToApp)
    assert feed(hs, "app", packet(resp, 1), bytewise=bytewise) == [NeedUser("u")]
    hs.proceed()
    ssl_request, start = drain(hs)
    assert isinstance(ssl_request, SendToServer)
    assert start == StartTLS()
    hs.tls_established()
    (hresp,) = drain(hs)
    assert isinstance(hresp, SendToServer)
    return actions[0].data, ssl_request, hresp


# --- greeting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_mysql8_greeting_is_rewritten_with_only_the_three_bits_cleared(bytewise: bool) -> None:
    hs = MySQLHandshake(rsa_key=KEY)
    g = greeting()
    (to_app,) = feed(hs, "server", packet(g, 0), bytewise=bytewise)
    assert isinstance(to_app, SendToApp)
    seq, rewritten = split(to_app.data)
    assert seq == 0
    assert len(rewritten) == len(g)
    diff = [i for i in range(len(g)) if g[i] != rewritten[i]]
    info = parse_greeting(g)
    off = info.caps_offset
    assert set(diff) <= {off, off + 1, off + 5, off + 6}
    new = parse_greeting(rewritten)
    cleared = CLIENT_SSL | CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION_ALGORITHM
    assert info.capabilities & cleared == cleared
    assert new.capabilities == info.capabilities & ~cleared
    assert new.scramble == info.scramble == SCRAMBLE
    assert new.auth_plugin == "caching_sha2_password"
    assert info.server_version == "8.0.36"
    assert info.capabilities & CLIENT_MYSQL  # MySQL sets it; MariaDB clears it
    assert hs.state is MySQLState.APP_RESPONSE


def test_mariadb_greeting_keeps_extended_caps_and_scramble() -> None:
    hs = MySQLHandshake(rsa_key=KEY)
    g = mariadb_greeting()
    (to_app,) = feed(hs, "server", packet(g, 0))
    assert isinstance(to_app, SendToApp)
    _, rewritten = split(to_app.data)
    info, new = parse_greeting(g), parse_greeting(rewritten)
    assert not info.capabilities & CLIENT_MYSQL
    assert not new.capabilities & CLIENT_MYSQL
    assert info.capabilities >> 32 == MARIADB_EXT
    assert new.capabilities >> 32 == MARIADB_EXT
    assert rewritten[-40:] == g[-40:]  # reserved tail, scramble part 2 and plugin name untouched
    assert new.capabilities == info.capabilities & ~(CLIENT_SSL | CLIENT_COMPRESS)  # MariaDB has no ZSTD flag
    assert new.scramble == SCRAMBLE
    assert new.auth_plugin == "mysql_native_password"


def test_server_error_instead_of_greeting_is_relayed_verbatim() -> None:
    hs = MySQLHandshake()
    err = packet(b"\xff\x69\x04Host '10.0.0.9' is blocked because of many connection errors", 0)
    (fail,) = feed(hs, "server", err)
    assert isinstance(fail, Fail)
    assert type(fail.error) is UpstreamError
    assert "1129" in str(fail.error)
    assert "blocked" in str(fail.error)
    assert fail.to_app == err
    assert hs.state is MySQLState.FAILED


def test_no_client_ssl_fails_with_a_pre_greeting_err_1043() -> None:
    hs = MySQLHandshake()
    (fail,) = feed(hs, "server", packet(greeting(caps=MYSQL8_CAPS & ~CLIENT_SSL), 0))
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, TLSRefused)
    assert str(fail.error) == "server does not offer TLS (CLIENT_SSL)"
    seq, payload = split(fail.to_app)
    assert seq == 0
    assert payload[:3] == b"\xff\x13\x04"  # 1043
    assert payload[3:].startswith(b"dbmtls: server does not offer TLS (CLIENT_SSL)")  # no '#08S01'


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"", "empty"),
        (b"\x09" + greeting()[1:], "protocol version 9"),
        (b"\x0a8.0.36", "truncated"),
        (greeting()[:40], "truncated"),
    ],
)
def test_malformed_greetings(payload: bytes, needle: str) -> None:
    hs = MySQLHandshake()
    (fail,) = feed(hs, "server", packet(payload, 0))
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, UpstreamProtocolError)
    assert needle in str(fail.error)
    assert b"#" not in fail.to_app
    assert fail.to_app[3] == 0


def test_greeting_with_wrong_sequence_id() -> None:
    hs = MySQLHandshake()
    (fail,) = feed(hs, "server", packet(greeting(), 1))
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, UpstreamProtocolError)


def test_bytes_after_the_greeting_are_rejected() -> None:
    hs = MySQLHandshake()
    (fail,) = feed(hs, "server", packet(greeting(), 0) + b"\x05\x00\x00\x01hello")
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, UpstreamProtocolError)
    assert "after its greeting" in str(fail.error)


def test_server_eof_before_greeting() -> None:
    hs = MySQLHandshake()
    (fail,) = feed(hs, "server", b"")
    assert isinstance(fail, Fail)
    assert "before sending its greeting" in str(fail.error)
    assert fail.to_app[3] == 0
    assert b"#" not in fail.to_app


# --- HandshakeResponse, SSLRequest, TLS ------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_mariadb_native_password_happy_path(bytewise: bool) -> None:
    hs = MySQLHandshake(rsa_key=KEY)
    resp = response(plugin=b"mysql_native_password", auth=bytes(range(20)), ext=0x1D)
    _, ssl_request, hresp = up_to_auth(hs, mariadb_greeting(), resp, bytewise=bytewise)

    assert ssl_request.data == b"\x20\x00\x00\x01" + set_ssl(resp)[:32]
    assert ssl_request.data[4:8] == (APP_CAPS | 0x800).to_bytes(4, "little")
    assert ssl_request.data[-4:] == (0x1D).to_bytes(4, "little")  # MariaDB ext caps carried along
    assert hresp.data == packet(set_ssl(resp), 2)

    parsed = hs.response
    assert parsed is not None
    assert parsed.user == "u"
    assert parsed.database == "shop"
    assert parsed.auth_plugin == "mysql_native_password"
    assert parsed.auth_response == bytes(range(20))
    assert parsed.attributes == {"_client_name": "libmysql", "_pid": "4242"}
    assert parsed.mariadb_capabilities == 0x1D

    (relay,) = feed(hs, "server", packet(OK, 3), bytewise=bytewise)
    assert relay == Relay(to_app=packet(OK, 2), to_server=b"")
    assert hs.state is MySQLState.DONE
    with pytest.raises(RuntimeError):
        hs.receive_server_data(b"x")


def test_relay_carries_leftover_bytes_both_ways() -> None:
    hs = MySQLHandshake()
    up_to_auth(hs, greeting(), response())
    # The app pipelines a command before the OK arrived (unusual, but must not be lost).
    query = packet(b"\x03SELECT 1", 0)
    assert feed(hs, "app", query[:5]) == []
    (relay,) = feed(hs, "server", packet(b"\x01\x03", 3) + packet(OK, 4) + b"\x01\x00\x00\x01\x01")[1:]
    assert relay == Relay(to_app=packet(OK, 3) + b"\x01\x00\x00\x01\x01", to_server=query[:5])


@pytest.mark.parametrize(
    ("caps", "auth"),
    [
        (APP_CAPS, bytes(32)),  # lenenc auth data
        (APP_CAPS & ~CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, bytes(range(1, 21))),  # u8 length
        (CLIENT_PROTOCOL_41 | CLIENT_CONNECT_WITH_DB, b"0123456789abcdef"),  # cstr, no plugin auth
    ],
)
def test_auth_response_encodings(caps: int, auth: bytes) -> None:
    parsed = parse_handshake_response(response(caps=caps, auth=auth))
    assert parsed.auth_response == auth
    assert parsed.database == "shop"
    assert parsed.auth_plugin == ("caching_sha2_password" if caps & CLIENT_PLUGIN_AUTH else None)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (response(caps=APP_CAPS & ~CLIENT_PROTOCOL_41), "pre-4.1"),
        (response(caps=APP_CAPS | CLIENT_SSL)[:32], "asked for TLS"),
        (response(user=b"\xff\xfe"), "UTF-8"),
        (response()[:34], "truncated"),
        (response()[:20], "truncated"),
    ],
)
def test_bad_handshake_responses(payload: bytes, needle: str) -> None:
    hs = MySQLHandshake()
    feed(hs, "server", packet(greeting(), 0))
    (fail,) = feed(hs, "app", packet(payload, 1))
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, AppProtocolError)
    assert needle in str(fail.error)
    seq, err = split(fail.to_app)
    assert seq == 2
    assert err[3:9] == b"#08S01"


def test_oversized_handshake_response_is_refused_from_its_header() -> None:
    hs = MySQLHandshake()
    feed(hs, "server", packet(greeting(), 0))
    (fail,) = feed(hs, "app", (64 * 1024 + 1).to_bytes(3, "little") + b"\x01")
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, AppProtocolError)
    assert "65537-byte packet" in str(fail.error)


def test_app_starting_tls_is_closed_and_the_log_says_use_plaintext() -> None:
    hs = MySQLHandshake()
    feed(hs, "server", packet(greeting(), 0))
    (fail,) = feed(hs, "app", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, AppTLSError)
    assert "TLS handshake" in str(fail.error)
    assert "ssl-mode=DISABLED" in (fail.error.hint or "")
    assert fail.to_app == b""  # a TLS client cannot parse an ERR packet


def test_app_closing_after_greeting_gets_a_hint() -> None:
    hs = MySQLHandshake()
    feed(hs, "server", packet(greeting(), 0))
    (fail,) = feed(hs, "app", b"")
    assert isinstance(fail, Fail)
    assert fail.to_app == b""
    assert fail.error.hint is not None
    assert "PREFERRED" in fail.error.hint


def test_plaintext_from_server_before_tls_is_injection() -> None:
    hs = MySQLHandshake()
    feed(hs, "server", packet(greeting(), 0))
    feed(hs, "app", packet(response(), 1))
    hs.proceed()
    drain(hs)
    (fail,) = feed(hs, "server", packet(OK, 2))
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, UpstreamProtocolError)
    assert "injection" in str(fail.error)
    assert split(fail.to_app)[0] == 2


def test_app_may_not_pile_up_bytes_while_tls_is_set_up() -> None:
    hs = MySQLHandshake()
    feed(hs, "server", packet(greeting(), 0))
    feed(hs, "app", packet(response(), 1))
    assert feed(hs, "app", b"x" * MAX_IDLE_BUFFER) == []
    (fail,) = feed(hs, "app", b"x")
    assert isinstance(fail, Fail)
    assert hs.buffered == 0


def test_glue_failures_use_the_format_of_the_phase() -> None:
    before = MySQLHandshake()
    seq, payload = split(before.fail(UpstreamUnreachable("connection refused by 10.0.0.1:3306")))
    assert seq == 0
    assert payload.startswith(b"\xff\x13\x04dbmtls: connection refused")
    assert before.fail(UpstreamUnreachable("again")) == b""  # already failed

    waiting = MySQLHandshake()
    feed(waiting, "server", packet(greeting(), 0))
    seq, payload = split(waiting.fail(UpstreamError("handshake timeout")))
    assert (seq, payload[3:9]) == (2, b"#08S01")

    after = MySQLHandshake()
    feed(after, "server", packet(greeting(), 0))
    feed(after, "app", packet(response(), 1))
    seq, payload = split(after.fail(IdentityError("no client certificate for user 'u'")))
    assert seq == 2
    assert payload[:9] == b"\xff\x15\x04#28000"  # 1045
    after2 = MySQLHandshake()
    feed(after2, "server", packet(greeting(), 0))
    feed(after2, "app", packet(response(), 1))
    after2.proceed()
    drain(after2)
    seq, payload = split(after2.fail(TLSHandshakeError("certificate verify failed")))
    assert (seq, payload[:9]) == (2, b"\xff\x13\x04#08S01")
    assert b"(hint: run 'dbmtls doctor -c CONFIG'" in payload
    assert drain(after2) == []
    after2.receive_server_data(b"ignored")  # no exception, no action once failed
    assert drain(after2) == []


def test_err_packet_helper() -> None:
    assert err_packet(1043, "08S01", "upstream TLS handshake failed: x", 2, True) == packet(
        b"\xff\x13\x04#08S01upstream TLS handshake failed: x", 2
    )
    assert err_packet(1045, "28000", "bad\r\nline\x00", 0, False) == packet(b"\xff\x15\x04bad line", 0)
    with pytest.raises(ValueError, match="SQLSTATE"):
        err_packet(1, "08S0", "x", 0, True)


# --- the authentication phase ---------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_auth_switch_is_renumbered_both_ways(bytewise: bool) -> None:
    hs = MySQLHandshake()
    up_to_auth(hs, greeting(), response(), bytewise=bytewise)
    switch = b"\xfemysql_native_password\x00" + SWITCH_NONCE + b"\x00"
    assert feed(hs, "server", packet(switch, 3), bytewise=bytewise) == [SendToApp(packet(switch, 2))]
    assert hs.plugin == "mysql_native_password"
    answer = bytes(range(100, 120))
    assert feed(hs, "app", packet(answer, 3), bytewise=bytewise) == [SendToServer(packet(answer, 4))]
    assert feed(hs, "server", packet(OK, 5), bytewise=bytewise) == [Relay(packet(OK, 4), b"")]


@pytest.mark.parametrize("bytewise", [False, True])
def test_caching_sha2_full_auth_with_local_key_exchange(bytewise: bool) -> None:
    # docs/protocols/mysql.md#worked-example:
    #   upstream: S greet(0) P SSLReq(1) [TLS] P HResp(2) S 01 04(3)            P pwd\0(4) S OK(5)
    #   app:      P greet(0) A HResp(1)        P 01 04(2) A 02(3) P 01 PEM(4) A RSA(5)        P OK(6)
    hs = MySQLHandshake(rsa_key=KEY)
    up_to_auth(hs, greeting(), response(), bytewise=bytewise)
    assert feed(hs, "server", packet(b"\x01\x04", 3), bytewise=bytewise) == [SendToApp(packet(b"\x01\x04", 2))]
    (key_answer,) = feed(hs, "app", packet(b"\x02", 3), bytewise=bytewise)  # never forwarded
    assert isinstance(key_answer, SendToApp)
    assert split(key_answer.data)[0] == 4
    public = public_key_from(key_answer.data)
    blob = rsa_encrypt(public, b"s3cret pw", SCRAMBLE)
    assert len(blob) == 256
    assert feed(hs, "app", packet(blob, 5), bytewise=bytewise) == [SendToServer(packet(b"s3cret pw\x00", 4))]
    assert feed(hs, "server", packet(OK, 5), bytewise=bytewise) == [Relay(packet(OK, 6), b"")]


def test_caching_sha2_after_auth_switch_uses_the_new_nonce() -> None:
    hs = MySQLHandshake()  # the process-wide key
    up_to_auth(hs, mariadb_greeting(), response(plugin=b"mysql_native_password"))
    switch = b"\xfecaching_sha2_password\x00" + SWITCH_NONCE + b"\x00"
    feed(hs, "server", packet(switch, 3))
    assert feed(hs, "app", packet(bytes(32), 3)) == [SendToServer(packet(bytes(32), 4))]
    assert feed(hs, "server", packet(b"\x01\x04", 5)) == [SendToApp(packet(b"\x01\x04", 4))]
    (key_answer,) = feed(hs, "app", packet(b"\x02", 5))
    assert isinstance(key_answer, SendToApp)
    blob = rsa_encrypt(public_key_from(key_answer.data), b"p", SWITCH_NONCE)
    assert feed(hs, "app", packet(blob, 7)) == [SendToServer(packet(b"p\x00", 6))]
    assert feed(hs, "server", packet(OK, 7)) == [Relay(packet(OK, 8), b"")]


def test_caching_sha2_cleartext_after_full_auth_is_relayed() -> None:
    hs = MySQLHandshake()
    up_to_auth(hs, greeting(), response())
    feed(hs, "server", packet(b"\x01\x04", 3))
    assert feed(hs, "app", packet(b"pw\x00", 3)) == [SendToServer(packet(b"pw\x00", 4))]
    # and a later 02 is just data again (no second key exchange)
    assert feed(hs, "server", packet(b"\x01\x03", 5)) == [SendToApp(packet(b"\x01\x03", 4))]


def test_caching_sha2_fast_auth_success() -> None:
    hs = MySQLHandshake()
    up_to_auth(hs, greeting(), response())
    out = feed(hs, "server", packet(b"\x01\x03", 3) + packet(OK, 4))
    assert out == [SendToApp(packet(b"\x01\x03", 2)), Relay(packet(OK, 3), b"")]


def test_pinned_server_key_cannot_be_decrypted() -> None:
    hs = MySQLHandshake(rsa_key=KEY)
    up_to_auth(hs, greeting(), response())
    feed(hs, "server", packet(b"\x01\x04", 3))
    feed(hs, "app", packet(b"\x02", 3))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (fail,) = feed(hs, "app", packet(rsa_encrypt(other, b"p", SCRAMBLE), 5))
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, AppProtocolError)
    assert "public key" in str(fail.error)
    assert split(fail.to_app)[0] == 6


def test_sha256_password_after_auth_switch() -> None:
    hs = MySQLHandshake(rsa_key=KEY)
    up_to_auth(hs, greeting(), response())
    switch = b"\xfesha256_password\x00" + SWITCH_NONCE + b"\x00"
    assert feed(hs, "server", packet(switch, 3)) == [SendToApp(packet(switch, 2))]
    (key_answer,) = feed(hs, "app", packet(b"\x01", 3))
    assert isinstance(key_answer, SendToApp)
    assert split(key_answer.data)[0] == 4
    blob = rsa_encrypt(public_key_from(key_answer.data), b"hunter2", SWITCH_NONCE)
    assert feed(hs, "app", packet(blob, 5)) == [SendToServer(packet(b"hunter2\x00", 4))]
    assert feed(hs, "server", packet(OK, 5)) == [Relay(packet(OK, 6), b"")]


@pytest.mark.parametrize("caps", [APP_CAPS, APP_CAPS & ~CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA])
def test_sha256_password_key_request_in_the_handshake_response(caps: int) -> None:
    hs = MySQLHandshake(rsa_key=KEY)
    resp = response(caps=caps, plugin=b"sha256_password", auth=b"\x01")
    feed(hs, "server", packet(greeting(plugin=b"sha256_password"), 0))
    assert feed(hs, "app", packet(resp, 1)) == [NeedUser("u")]
    hs.proceed()
    assert drain(hs) == [SendToServer(b"\x20\x00\x00\x01" + set_ssl(resp)[:32]), StartTLS()]
    hs.tls_established()
    (key_answer,) = drain(hs)  # the key goes to the app as seq 2; nothing upstream yet
    assert isinstance(key_answer, SendToApp)
    assert split(key_answer.data)[0] == 2
    blob = rsa_encrypt(public_key_from(key_answer.data), b"pw", SCRAMBLE)
    (hresp,) = feed(hs, "app", packet(blob, 3))
    assert isinstance(hresp, SendToServer)
    seq, payload = split(hresp.data)
    assert seq == 2
    parsed = parse_handshake_response(payload)
    assert parsed.capabilities == caps | CLIENT_SSL
    assert parsed.auth_response == b"pw\x00"
    assert parsed.user == "u"
    assert parsed.database == "shop"
    assert parsed.auth_plugin == "sha256_password"
    assert parsed.attributes == {"_client_name": "libmysql", "_pid": "4242"}
    assert feed(hs, "server", packet(OK, 3)) == [Relay(packet(OK, 4), b"")]


def test_server_err_during_auth_is_relayed_renumbered_then_fails() -> None:
    hs = MySQLHandshake()
    up_to_auth(hs, greeting(), response())
    (fail,) = feed(hs, "server", packet(AUTH_DENIED, 3))
    assert isinstance(fail, Fail)
    assert type(fail.error) is AuthenticationFailed
    assert "1045" in str(fail.error)
    assert "28000" in str(fail.error)
    assert fail.to_app == packet(AUTH_DENIED, 2)


@pytest.mark.parametrize(
    ("side", "data", "error"),
    [
        ("server", packet(b"\x01\x04", 4), UpstreamProtocolError),
        ("server", (MAX_HANDSHAKE_PACKET + 1).to_bytes(3, "little") + b"\x03", UpstreamProtocolError),
        ("app", packet(b"x", 5), AppProtocolError),
        ("app", (MAX_HANDSHAKE_PACKET + 1).to_bytes(3, "little") + b"\x03", AppProtocolError),
        ("server", b"", UpstreamProtocolError),
    ],
)
def test_auth_phase_violations(side: Literal["server", "app"], data: bytes, error: type[DbmtlsError]) -> None:
    hs = MySQLHandshake()
    up_to_auth(hs, greeting(), response())
    (fail,) = feed(hs, side, data)
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, error)
    assert split(fail.to_app)[0] == 2


def test_sequence_ids_wrap_around() -> None:
    hs = MySQLHandshake()
    up_to_auth(hs, greeting(), response(plugin=b"dialog"))
    up, app = 3, 2
    for _ in range(300):  # a chatty PAM dialog
        assert feed(hs, "server", packet(b"\x04Password: ", up)) == [SendToApp(packet(b"\x04Password: ", app))]
        assert feed(hs, "app", packet(b"x\x00", app + 1)) == [SendToServer(packet(b"x\x00", up + 1))]
        up, app = (up + 2) & 0xFF, (app + 2) & 0xFF
    assert feed(hs, "server", packet(OK, up)) == [Relay(packet(OK, app), b"")]


# --- transcripts: whole, byte by byte, random splits, fuzz ----------------------------------------

Step = tuple[Literal["server", "app"], bytes]


@dataclass
class Run:
    actions: list[Event] = field(default_factory=list)
    max_buffered: int = 0


def run(
    steps: Sequence[Step], cuts: Callable[[bytes], Iterator[bytes]] | None = None, key: rsa.RSAPrivateKey = KEY
) -> Run:
    """Feed a transcript; answer NeedUser/StartTLS like the glue; stop at Relay/Fail."""
    hs = MySQLHandshake(rsa_key=key)
    result = Run()
    for side, data in steps:
        chunks = cuts(data) if cuts else iter([data])
        for chunk in chunks:
            (hs.receive_server_data if side == "server" else hs.receive_app_data)(chunk)
            result.max_buffered = max(result.max_buffered, hs.buffered)
            while not isinstance(action := hs.next_event(), NeedData):
                result.actions.append(action)
                if isinstance(action, NeedUser):
                    hs.proceed()
                elif isinstance(action, StartTLS):
                    hs.tls_established()
                elif isinstance(action, Relay | Fail):
                    return result
    return result


def caching_sha2_transcript() -> list[Step]:
    blob = rsa_encrypt(KEY.public_key(), b"pw", SCRAMBLE)
    return [
        ("server", packet(greeting(), 0)),
        ("app", packet(response(), 1)),
        ("server", packet(b"\x01\x04", 3)),
        ("app", packet(b"\x02", 3)),
        ("app", packet(blob, 5)),
        ("server", packet(OK, 5)),
    ]


def bytewise(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def test_transcript_whole_equals_bytewise() -> None:
    whole = run(caching_sha2_transcript())
    assert isinstance(whole.actions[-1], Relay)
    assert whole.actions == run(caching_sha2_transcript(), bytewise).actions


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_transcript_random_splits(data: st.DataObject) -> None:
    expected = run(caching_sha2_transcript()).actions

    def cuts(chunk: bytes) -> Iterator[bytes]:
        points = sorted(data.draw(st.lists(st.integers(0, len(chunk)), max_size=4)))
        last = 0
        for p in [*points, len(chunk)]:
            if p > last:
                yield chunk[last:p]
                last = p

    assert run(caching_sha2_transcript(), cuts).actions == expected


def check_fuzz_run(result: Run) -> None:
    # Only terminal actions end a run, and only DbmtlsErrors come out of it (no exception escaped).
    for action in result.actions:
        if isinstance(action, Fail):
            assert isinstance(action.error, DbmtlsError)
            assert action is result.actions[-1]
    assert result.max_buffered <= 4 + MAX_HANDSHAKE_PACKET + MAX_IDLE_BUFFER


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["server", "app"]), st.binary(max_size=64)), max_size=8))
def test_fuzz_random_bytes_from_scratch(steps: list[Step]) -> None:
    check_fuzz_run(run(steps))


def _mutate(payload: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(payload)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([greeting(), mariadb_greeting()]),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(0, 120)),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(0, 120)),
    st.lists(st.tuples(st.sampled_from(["server", "app"]), st.binary(max_size=40)), max_size=6),
)
def test_fuzz_mutated_handshake(
    greet: bytes,
    g_edits: list[tuple[int, int]],
    g_cut: int | None,
    r_edits: list[tuple[int, int]],
    r_cut: int | None,
    tail: list[Step],
) -> None:
    steps: list[Step] = [
        ("server", packet(_mutate(greet, g_edits, g_cut), 0)),
        ("app", packet(_mutate(response(), r_edits, r_cut), 1)),
        *tail,
    ]
    check_fuzz_run(run(steps))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"caching_sha2_password", b"sha256_password", b"mysql_native_password"]),
    st.lists(
        st.tuples(
            st.sampled_from(["server", "app"]),
            st.one_of(
                st.binary(max_size=40),
                st.builds(
                    packet,
                    st.sampled_from(
                        [b"\x01\x04", b"\x02", b"\x01", b"\x01\x03", b"\xfesha256_password\x00abc", OK, AUTH_DENIED]
                    )
                    | st.binary(max_size=300),
                    st.integers(0, 8),
                ),
            ),
        ),
        max_size=10,
    ),
)
def test_fuzz_auth_phase(plugin: bytes, tail: list[Step]) -> None:
    auth = b"\x01" if plugin == b"sha256_password" else bytes(20)
    steps: list[Step] = [
        ("server", packet(greeting(plugin=plugin), 0)),
        ("app", packet(response(plugin=plugin, auth=auth), 1)),
        *tail,
    ]
    check_fuzz_run(run(steps))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_parsers_raise_only_their_errors(data: bytes) -> None:
    with contextlib.suppress(UpstreamProtocolError):
        parse_greeting(data)
    with contextlib.suppress(AppProtocolError):
        parse_handshake_response(data)


# --- a real client: PyMySQL ------------------------------------------------------------------------


class FakeUpstream:
    """Plays the server behind the machine: caching_sha2 full authentication, then OK."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def answer(self, data: bytes) -> bytes | None:
        self.received.append(data)
        seq = split(data)[0]
        if seq == 2:  # HandshakeResponse
            return packet(b"\x01\x04", 3)
        if seq == 4:  # the password, inside "TLS"
            return packet(OK[:3] + b"\x00\x00" + OK[5:], 5)  # status 0: PyMySQL sends no SET autocommit
        return None


async def serve_one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    greet: bytes,
    on_need_user: Callable[[MySQLHandshake, str], bytes | None],
    upstream: FakeUpstream,
    log: list[Event],
) -> None:
    hs = MySQLHandshake(rsa_key=KEY)
    hs.receive_server_data(packet(greet, 0))
    relayed = False
    try:
        while True:
            pending: list[bytes] = []
            while not isinstance(action := hs.next_event(), NeedData):
                log.append(action)
                if isinstance(action, SendToApp):
                    writer.write(action.data)
                elif isinstance(action, NeedUser):
                    err = on_need_user(hs, action.user)
                    if err is not None:
                        writer.write(err)
                        await writer.drain()
                        return
                elif isinstance(action, SendToServer):
                    if (answer := upstream.answer(action.data)) is not None:
                        pending.append(answer)
                elif isinstance(action, StartTLS):
                    hs.tls_established()
                elif isinstance(action, Relay):
                    writer.write(action.to_app)
                    relayed = True
                elif isinstance(action, Fail):
                    writer.write(action.to_app)
                    await writer.drain()
                    return
            await writer.drain()
            if relayed:
                break
            if pending:
                for data in pending:
                    hs.receive_server_data(data)
                continue
            hs.receive_app_data(await reader.read(65536))
        # Command phase: answer every command with OK until COM_QUIT or EOF.
        while True:
            header = await reader.readexactly(4)
            body = await reader.readexactly(int.from_bytes(header[:3], "little"))
            if body[:1] == b"\x01":
                return
            writer.write(packet(b"\x00\x00\x00\x00\x00\x00\x00", 1))
            await writer.drain()
    except asyncio.IncompleteReadError:
        return
    finally:
        writer.close()


def with_pymysql_server(
    greet: bytes,
    on_need_user: Callable[[MySQLHandshake, str], bytes | None],
    client: Callable[[int], object],
) -> tuple[list[Event], FakeUpstream, object]:
    log: list[Event] = []
    upstream = FakeUpstream()
    outcome: dict[str, object] = {}

    async def main() -> None:
        server = await asyncio.start_server(
            lambda r, w: serve_one(r, w, greet, on_need_user, upstream, log), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]

        def call() -> None:
            try:
                outcome["result"] = client(port)
            except Exception as exc:  # the assertions look at it
                outcome["result"] = exc

        async with server:
            await asyncio.wait_for(asyncio.to_thread(call), 20)

    asyncio.run(main())
    return log, upstream, outcome["result"]


def pymysql_connect(port: int) -> str:
    conn = pymysql.connect(host="127.0.0.1", port=port, user="u", password="p", connect_timeout=3)
    try:
        return str(conn.get_server_info())
    finally:
        conn.close()


def test_pymysql_caching_sha2_full_auth_through_the_machine() -> None:
    def allow(hs: MySQLHandshake, user: str) -> None:
        hs.proceed()

    log, upstream, result = with_pymysql_server(greeting(), allow, pymysql_connect)
    assert result == "8.0.36"
    assert NeedUser("u") in log
    ssl_request, hresp, password = upstream.received
    assert split(ssl_request)[0] == 1
    assert len(split(ssl_request)[1]) == 32
    assert int.from_bytes(split(ssl_request)[1][:4], "little") & CLIENT_SSL
    assert parse_handshake_response(split(hresp)[1]).user == "u"
    assert password == packet(b"p\x00", 4)


def test_pymysql_sees_the_glue_failure_as_a_server_error() -> None:
    def refuse(hs: MySQLHandshake, user: str) -> bytes:
        return hs.fail(IdentityError(f"no client certificate configured for user {user!r}"))

    log, _, result = with_pymysql_server(greeting(), refuse, pymysql_connect)
    assert NeedUser("u") in log
    assert isinstance(result, pymysql.err.OperationalError)
    assert result.args[0] == 1045
    assert result.args[1] == "dbmtls: no client certificate configured for user 'u'"


def test_pymysql_sees_tls_refused_before_the_greeting() -> None:
    def never(hs: MySQLHandshake, user: str) -> None:
        raise AssertionError("no NeedUser expected")

    _, _, result = with_pymysql_server(greeting(caps=MYSQL8_CAPS & ~CLIENT_SSL), never, pymysql_connect)
    assert isinstance(result, pymysql.err.OperationalError)
    assert result.args[0] == 1043
    assert result.args[1].startswith("dbmtls: server does not offer TLS (CLIENT_SSL)")


def test_second_handshake_response_is_named_as_such() -> None:
    hs = MySQLHandshake()
    feed(hs, "server", packet(greeting(), 0))
    once = packet(response(plugin=b"mysql_native_password"), 1)
    assert feed(hs, "app", once + once) == [NeedUser("u")]
    hs.proceed()
    drain(hs)
    hs.tls_established()
    *_, fail = drain(hs)
    assert isinstance(fail, Fail)
    assert str(fail.error) == "the application sent a second HandshakeResponse on one connection"
