"""Byte-level tests of the sans-IO PostgreSQL handshake (docs/protocols/postgres.md).

Each parser is fed the whole input, then one byte at a time, then with trailing garbage, then fuzzed;
finally real clients (psql/libpq, asyncpg) are pointed at an AppHandshake driven by a few lines of asyncio.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import struct
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbmtls.errors import (
    AppClosedEarly,
    AppProtocolError,
    DbmtlsError,
    IdentityError,
    TLSRefused,
    UpstreamProtocolError,
    UpstreamUnreachable,
)
from dbmtls.protocols.postgres import (
    FIRST_REPLY_LIMIT,
    GSSENC_REQUEST,
    MAX_STARTUP,
    SSL_REQUEST,
    AppClosed,
    AppEvent,
    AppHandshake,
    BackendKey,
    BackendScanner,
    CancelRequest,
    FirstReply,
    FirstReplyDone,
    LoginRejected,
    NeedData,
    Reply,
    Startup,
    StartupDone,
    TLSAccepted,
    UpstreamNegotiation,
    error_response,
    sqlstate,
    strip_scram_plus,
)
from support.pg_wire import encode_startup

# --- helpers ---------------------------------------------------------------------------------


def startup_packet(params: Sequence[tuple[bytes, bytes]], version: tuple[int, int] = (3, 0)) -> bytes:
    """Hand-built StartupMessage (independent of encode_startup)."""
    body = struct.pack("!HH", *version)
    for name, value in params:
        body += name + b"\0" + value + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def raw_packet(code: int, rest: bytes = b"") -> bytes:
    return struct.pack("!II", 8 + len(rest), code) + rest


def startup_body(body: bytes, version: tuple[int, int] = (3, 0)) -> bytes:
    """A StartupMessage with an arbitrary (possibly malformed) parameter area."""
    return struct.pack("!IHH", 8 + len(body), *version) + body


def cancel_packet(pid: int, key: bytes) -> bytes:
    return raw_packet(80877102, struct.pack("!I", pid) + key)


ALICE = startup_packet([(b"user", b"alice"), (b"database", b"db")])


def drain(hs: AppHandshake, limit: int = 10) -> list[AppEvent]:
    """next_event until it needs data or is finished; bounded so a bug can never hang a test."""
    events: list[AppEvent] = []
    for _ in range(limit):
        ev = hs.next_event()
        events.append(ev)
        if isinstance(ev, NeedData | AppClosed):
            return events
        if isinstance(ev, Startup | CancelRequest):
            # terminal events: one more call must report NeedData/AppClosed (or raise)
            continue
    raise AssertionError(f"next_event did not settle within {limit} calls: {events}")


def feed(data: bytes, chunks: Iterable[int] | None = None, *, eof: bool = False) -> tuple[AppHandshake, list[AppEvent]]:
    """Feed ``data`` whole (chunks=None) or split at the given sizes; collect all events (NeedData dropped)."""
    hs = AppHandshake()
    events: list[AppEvent] = []
    pieces: list[bytes]
    if chunks is None:
        pieces = [data]
    else:
        pieces, pos = [], 0
        for size in chunks:
            pieces.append(data[pos : pos + size])
            pos += size
        pieces.append(data[pos:])
    for piece in pieces:
        if piece:
            hs.receive_data(piece)
            events += [e for e in drain(hs) if not isinstance(e, NeedData)]
    if eof:
        hs.receive_data(b"")
        events += [e for e in drain(hs) if not isinstance(e, NeedData)]
    return hs, events


def bytewise(data: bytes, *, eof: bool = False) -> tuple[AppHandshake, list[AppEvent]]:
    return feed(data, [1] * len(data), eof=eof)


def both_ways(data: bytes, *, eof: bool = False) -> list[tuple[AppHandshake, list[AppEvent]]]:
    return [feed(data, eof=eof), bytewise(data, eof=eof)]


def parse_error_response(data: bytes) -> dict[str, str]:
    """Tiny ErrorResponse parser: 'E' Int32 len {Byte1 code, cstr value}* 00."""
    assert data[:1] == b"E"
    (length,) = struct.unpack("!I", data[1:5])
    assert length == len(data) - 1
    assert data.endswith(b"\0\0")
    fields: dict[str, str] = {}
    pos = 5
    while data[pos] != 0:
        end = data.index(b"\0", pos)
        code, value = chr(data[pos]), data[pos + 1 : end]
        assert code not in fields
        fields[code] = value.decode("ascii")
        pos = end + 1
    assert pos == len(data) - 1
    return fields


# --- AppHandshake: the happy paths -------------------------------------------------------------


def test_constants() -> None:
    assert bytes.fromhex("0000000804D2162F") == SSL_REQUEST
    assert bytes.fromhex("0000000804D21630") == GSSENC_REQUEST
    assert MAX_STARTUP == 10000


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_plain_startup(mode: str) -> None:
    hs, events = feed(ALICE) if mode == "whole" else bytewise(ALICE)
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, Startup)
    assert ev.raw == ALICE
    assert ev.version == (3, 0)
    assert ev.params == {"user": "alice", "database": "db"}
    assert ev.user == "alice"
    assert ev.database == "db"
    assert hs.trailing_data == b""


def test_database_defaults_to_user() -> None:
    for pkt in (
        startup_packet([(b"user", b"bob")]),
        startup_packet([(b"user", b"bob"), (b"database", b"")]),
    ):
        (ev,) = feed(pkt)[1]
        assert isinstance(ev, Startup)
        assert ev.database == "bob"


def test_ssl_then_startup_replies_n() -> None:
    for _hs, events in both_ways(SSL_REQUEST + ALICE):
        assert events[0] == Reply(b"N")
        assert isinstance(events[1], Startup)
        assert len(events) == 2


def test_ssl_gss_startup_pipelined_in_one_chunk() -> None:
    hs = AppHandshake()
    hs.receive_data(SSL_REQUEST + GSSENC_REQUEST + ALICE + b"Qselect 1")
    assert hs.next_event() == Reply(b"N")
    assert hs.next_event() == Reply(b"N")
    ev = hs.next_event()
    assert isinstance(ev, Startup)
    assert ev.raw == ALICE
    assert hs.next_event() == NeedData()
    assert hs.trailing_data == b"Qselect 1"


def test_gss_then_ssl() -> None:
    # libpq with a credential cache: GSSENCRequest, 'N', then SSLRequest on the same socket.
    for _hs, events in both_ways(GSSENC_REQUEST + SSL_REQUEST + ALICE):
        assert events == [Reply(b"N"), Reply(b"N"), events[2]]
        assert isinstance(events[2], Startup)


def test_trailing_data_grows_and_eof_after_startup() -> None:
    hs = AppHandshake()
    hs.receive_data(ALICE + b"ab")
    assert isinstance(hs.next_event(), Startup)
    hs.receive_data(b"cd")
    assert hs.next_event() == NeedData()
    assert hs.trailing_data == b"abcd"
    hs.receive_data(b"")
    assert hs.next_event() == AppClosed()
    assert hs.trailing_data == b"abcd"


def test_trailing_data_bytewise() -> None:
    hs, events = bytewise(ALICE + b"XYZ")
    assert isinstance(events[0], Startup)
    assert hs.trailing_data == b"XYZ"


@pytest.mark.parametrize("version", [(3, 2), (3, 9999)])
def test_newer_minor_versions_and_pq_options_are_kept_byte_exact(version: tuple[int, int]) -> None:
    # libpq 19 "greases" with 3.9999 and unknown _pq_ options; the server answers 'v', we relay.
    params = [
        (b"user", b"alice"),
        (b"_pq_.test_protocol_negotiation", b""),
        (b"database", b"db"),
        (b"options", b"-c search_path=a,b -c statement_timeout=5s"),
        (b"_pq_.unknown", b"x\xc3\xa9"),
        (b"application_name", b"psql"),
    ]
    pkt = startup_packet(params, version)
    for _hs, events in both_ways(SSL_REQUEST + pkt):
        ev = events[1]
        assert isinstance(ev, Startup)
        assert ev.raw == pkt
        assert ev.version == version
        assert list(ev.params) == [n.decode() for n, _ in params]
        assert ev.params["_pq_.unknown"] == "xé"
        assert ev.params["_pq_.test_protocol_negotiation"] == ""


def test_startup_params_keep_their_order_and_options() -> None:
    params = {"user": "alice", "database": "db", "_pq_.x": "1"}
    pkt = encode_startup((3, 2), params)
    assert pkt == startup_packet([(b"user", b"alice"), (b"database", b"db"), (b"_pq_.x", b"1")], (3, 2))
    (ev,) = feed(pkt)[1]
    assert isinstance(ev, Startup)
    assert ev.params == params
    with pytest.raises(ValueError, match="cannot be encoded"):
        encode_startup((3, 0), {"user": "a\0b"})


@pytest.mark.parametrize("prefix", [b"", SSL_REQUEST, GSSENC_REQUEST + SSL_REQUEST])
def test_cancel_30(prefix: bytes) -> None:
    pkt = cancel_packet(4242, b"\x01\x02\x03\x04")
    assert len(pkt) == 16
    for _hs, events in both_ways(prefix + pkt, eof=True):
        assert events[: prefix.count(b"\x04\xd2")] == [Reply(b"N")] * prefix.count(b"\x04\xd2")
        ev = events[-2]
        assert ev == CancelRequest(raw=pkt, pid=4242, key=b"\x01\x02\x03\x04")
        assert events[-1] == AppClosed()


@pytest.mark.parametrize("keylen", [4, 5, 32, 256])
@pytest.mark.parametrize("prefix", [b"", SSL_REQUEST])
def test_cancel_32_variable_key(keylen: int, prefix: bytes) -> None:
    key = bytes(range(256))[:keylen]
    pkt = cancel_packet(7, key)
    assert len(pkt) == 12 + keylen
    for _hs, events in both_ways(prefix + pkt):
        ev = events[-1]
        assert isinstance(ev, CancelRequest)
        assert (ev.raw, ev.pid, ev.key) == (pkt, 7, key)


def test_cancel_then_need_data() -> None:
    hs = AppHandshake()
    hs.receive_data(cancel_packet(1, b"abcd"))
    assert isinstance(hs.next_event(), CancelRequest)
    assert hs.next_event() == NeedData()
    hs.receive_data(b"")
    assert hs.next_event() == AppClosed()
    assert hs.trailing_data == b""


def test_eof_between_packets_is_a_clean_close() -> None:
    # e.g. sslmode=require: libpq sends SSLRequest, reads 'N' and hangs up.
    for _hs, events in both_ways(SSL_REQUEST, eof=True):
        assert events == [Reply(b"N"), AppClosed()]
    assert feed(b"", eof=True)[1] == [AppClosed()]


def test_length_limit_10000_ok() -> None:
    base = startup_packet([(b"user", b"alice"), (b"options", b"")])
    pad = MAX_STARTUP - len(base)
    pkt = startup_packet([(b"user", b"alice"), (b"options", b"x" * pad)])
    assert len(pkt) == MAX_STARTUP
    for _hs, events in both_ways(pkt):
        assert isinstance(events[0], Startup)
        assert events[0].raw == pkt


def test_length_limit_10001_rejected_from_the_header_alone() -> None:
    base = startup_packet([(b"user", b"alice"), (b"options", b"")])
    pkt = startup_packet([(b"user", b"alice"), (b"options", b"x" * (MAX_STARTUP + 1 - len(base)))])
    assert len(pkt) == MAX_STARTUP + 1
    hs = AppHandshake()
    hs.receive_data(pkt[:4])  # no need to wait for (or buffer) the body
    with pytest.raises(AppProtocolError, match="length 10001"):
        hs.next_event()


# --- AppHandshake: every protocol error ------------------------------------------------------------

BAD_INPUTS: dict[str, tuple[bytes, str]] = {
    "length<8": (struct.pack("!II", 7, 196608), "invalid startup packet length 7"),
    "length 0": (b"\0\0\0\0", "invalid startup packet length 0"),
    "length>10000": (struct.pack("!I", 10001) + b"\0" * 20, "invalid startup packet length 10001"),
    "huge length": (b"\x7f\xff\xff\xff", "invalid startup packet length"),
    "HTTP": (b"GET / HTTP/1.1\r\n\r\n", "invalid startup packet length"),
    "unknown request code": (raw_packet(80877105), "unknown startup request code 80877105"),
    "protocol 2": (startup_packet([(b"user", b"a")], (2, 0)), "unsupported frontend protocol 2.0"),
    "protocol 4": (startup_packet([(b"user", b"a")], (4, 0)), "unsupported frontend protocol 4.0"),
    "ssl length 12": (raw_packet(80877103, b"\0" * 4), "invalid SSLRequest length 12"),
    "gss length 9": (raw_packet(80877104, b"\0"), "invalid GSSENCRequest length 9"),
    "cancel too short": (cancel_packet(1, b"abc"), "invalid CancelRequest length 15"),
    "cancel no pid": (raw_packet(80877102, b"\0\0"), "invalid CancelRequest length 10"),
    "cancel key 257": (cancel_packet(1, b"k" * 257), "invalid CancelRequest length 269"),
    "bytes after cancel": (cancel_packet(1, b"abcd") + b"x", "unexpected data after a CancelRequest"),
    "second SSLRequest": (SSL_REQUEST + SSL_REQUEST, "duplicate SSLRequest"),
    "second GSSENCRequest": (GSSENC_REQUEST + SSL_REQUEST + GSSENC_REQUEST, "duplicate GSSENCRequest"),
    "no terminator": (startup_body(b"user\0alice"), "expected terminator as last byte"),
    "value missing its NUL": (startup_body(b"user\0alice\0"), "missing terminator after the last parameter"),
    "odd cstrings": (startup_body(b"user\0alice\0x\0"), "name without a value"),
    "odd cstrings, terminated": (startup_body(b"user\0alice\0x\0\0"), "missing terminator after the last"),
    "data after terminator": (startup_body(b"user\0a\0\0x\0y\0\0"), "data after the terminator"),
    "nul pairs after terminator": (startup_body(b"user\0a\0\0\0\0\0"), "data after the terminator"),
    "empty body": (struct.pack("!IHH", 8, 3, 0), "expected terminator as last byte"),
    "no params": (struct.pack("!IHH", 9, 3, 0) + b"\0", "no PostgreSQL user name"),
    "missing user": (startup_packet([(b"database", b"db")]), "no PostgreSQL user name"),
    "empty user": (startup_packet([(b"user", b"")]), "no PostgreSQL user name"),
    "duplicate user": (startup_packet([(b"user", b"a"), (b"user", b"b")]), "duplicate startup parameter 'user'"),
    "non-utf8 value": (startup_packet([(b"user", b"\xff\xfe")]), "not valid UTF-8"),
    "non-utf8 name": (startup_packet([(b"user", b"a"), (b"\xc3", b"x")]), "not valid UTF-8"),
    "direct TLS": (bytes.fromhex("160301020001") + b"\0" * 40, "sslnegotiation=direct"),
    "direct TLS after N": (SSL_REQUEST + bytes.fromhex("1603030100"), "TLS handshake"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_app_protocol_errors(name: str, mode: str) -> None:
    data, message = BAD_INPUTS[name]
    run = feed if mode == "whole" else bytewise
    with pytest.raises(AppProtocolError, match=message) as info:
        run(data + ALICE, eof=True)
    err = info.value
    assert sqlstate(err.reason) == "08P01"
    assert err.wire_text().isascii()


def test_direct_tls_message_tells_the_user_what_to_do() -> None:
    hs = AppHandshake()
    hs.receive_data(b"\x16")  # one byte is enough to know
    with pytest.raises(AppProtocolError) as info:
        hs.next_event()
    text = info.value.wire_text() + " " + (info.value.wire_hint() or "")
    assert "sslnegotiation=direct" in text
    assert "TLS" in text
    assert "sslmode=disable" in text
    assert "sslmode=prefer" in text


@pytest.mark.parametrize("cut", [1, 3, 4, 7, 8, len(ALICE) - 1])
def test_eof_in_the_middle_of_a_packet(cut: int) -> None:
    with pytest.raises(AppClosedEarly, match="in the middle of a startup packet"):
        feed(SSL_REQUEST + ALICE[:cut], eof=True)


def test_error_is_sticky_and_data_after_eof_is_a_bug() -> None:
    hs = AppHandshake()
    hs.receive_data(b"\x16\x03")
    with pytest.raises(AppProtocolError) as first:
        hs.next_event()
    with pytest.raises(AppProtocolError) as second:
        hs.next_event()
    assert first.value is second.value
    hs2 = AppHandshake()
    hs2.receive_data(b"")
    hs2.receive_data(b"")  # repeated EOF is harmless
    with pytest.raises(RuntimeError):
        hs2.receive_data(b"x")


# --- Hypothesis: nothing but AppProtocolError, never a hang -----------------------------------------

_PIECES = st.sampled_from(
    [SSL_REQUEST, GSSENC_REQUEST, ALICE, cancel_packet(1, b"abcd"), cancel_packet(2, b"k" * 32), b"\0", b"\x16"]
)


def _run_fuzz(data: bytes, cuts: list[int], eof: bool) -> None:
    hs = AppHandshake()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    terminal = 0
    error: AppProtocolError | AppClosedEarly | None = None
    try:
        for chunk in chunks:
            if chunk:
                hs.receive_data(chunk)
            for ev in drain(hs):
                if isinstance(ev, Startup | CancelRequest):
                    terminal += 1
                    assert ev.raw in data
                    assert len(ev.raw) <= MAX_STARTUP
        if eof:
            hs.receive_data(b"")
            drain(hs)
    except (AppProtocolError, AppClosedEarly) as err:
        error = err
    if isinstance(error, AppClosedEarly):
        assert eof  # only an EOF can end a login early
    elif error is not None:
        assert sqlstate(error.reason) == "08P01"
        assert error.wire_text().isascii()
    assert terminal <= 1


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0, max_value=500)), eof=st.booleans())
def test_fuzz_random_bytes(data: bytes, cuts: list[int], eof: bool) -> None:
    _run_fuzz(data, cuts, eof)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    pieces=st.lists(st.one_of(_PIECES, st.binary(max_size=12)), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=500)),
    eof=st.booleans(),
    flip=st.integers(min_value=0, max_value=10_000),
)
def test_fuzz_structured(pieces: list[bytes], cuts: list[int], eof: bool, flip: int) -> None:
    data = bytearray(b"".join(pieces))
    if data:
        data[flip % len(data)] ^= 0xFF & (flip // 37 + 1)
    _run_fuzz(bytes(data), cuts, eof)


# --- UpstreamNegotiation -----------------------------------------------------------------------------


def test_upstream_s_is_tls() -> None:
    neg = UpstreamNegotiation()
    assert neg.next_event() == NeedData()
    neg.receive_data(b"S")
    assert neg.next_event() == TLSAccepted()
    assert neg.next_event() == TLSAccepted()


def test_upstream_s_plus_extra_is_mitm() -> None:
    # CVE-2021-23222: plaintext that rode along with 'S' was not protected by the TLS handshake.
    neg = UpstreamNegotiation()
    neg.receive_data(b"SE\0\0\0\x05x")
    expected = r"unencrypted data after its SSL response \(possible man-in-the-middle\)"
    with pytest.raises(UpstreamProtocolError, match=expected):
        neg.next_event()


def test_upstream_extra_bytes_found_later_still_abort() -> None:
    neg = UpstreamNegotiation()
    for b in b"S":
        neg.receive_data(bytes([b]))
    assert neg.next_event() == TLSAccepted()
    neg.receive_data(b"x")  # e.g. found buffered after the handshake
    with pytest.raises(UpstreamProtocolError, match="man-in-the-middle"):
        neg.next_event()


def test_upstream_byte_at_a_time_decides_on_first_byte() -> None:
    neg = UpstreamNegotiation()
    neg.receive_data(b"N")
    with pytest.raises(TLSRefused, match=r"server refused TLS \(answered N to SSLRequest\)"):
        neg.next_event()


def test_upstream_error_text_is_never_shown() -> None:
    secret = b"FATAL: attacker-controlled text"
    neg = UpstreamNegotiation()
    neg.receive_data(b"E" + struct.pack("!I", 4 + len(secret) + 2) + b"M" + secret + b"\0\0")
    with pytest.raises((UpstreamProtocolError, TLSRefused)) as info:
        neg.next_event()
    text = info.value.wire_text() + (info.value.wire_hint() or "")
    assert "error" in text
    assert "SSL exchange" in text
    assert "attacker" not in text


@pytest.mark.parametrize("first", [b"G", b"\0", b"R", b"\x16"])
def test_upstream_garbage(first: bytes) -> None:
    neg = UpstreamNegotiation()
    neg.receive_data(first)
    with pytest.raises(UpstreamProtocolError, match="invalid response to SSLRequest"):
        neg.next_event()


def test_upstream_eof() -> None:
    neg = UpstreamNegotiation()
    neg.receive_data(b"")
    with pytest.raises(UpstreamProtocolError, match="server closed the connection during SSL negotiation"):
        neg.next_event()


def test_upstream_buffer_is_bounded() -> None:
    neg = UpstreamNegotiation()
    for _ in range(1000):
        neg.receive_data(b"S" * 1000)
    assert len(neg._buf) < 64
    with pytest.raises(UpstreamProtocolError):
        neg.next_event()


# --- error_response -------------------------------------------------------------------------------------


def test_error_response_fields() -> None:
    err = UpstreamUnreachable("connection refused by 10.0.0.5:5432").with_database("orders")
    data = error_response(err)
    fields = parse_error_response(data)
    assert fields == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "08001",
        "M": "dbmtls: [orders] connection refused by 10.0.0.5:5432",
        "H": UpstreamUnreachable.default_hint,
    }
    assert list(fields) == ["S", "V", "C", "M", "H"]
    assert 8 <= len(data) <= 30000  # libpq's accepted range for an 'E' while awaiting a response


def test_error_response_without_hint_with_detail_and_hostile_text() -> None:
    err = AppProtocolError("bad\0thing\r\nSET evil\x07 ünïcode")
    data = error_response(err, severity="ERROR", detail="line1\nline2\0")
    fields = parse_error_response(data)
    assert fields["S"] == fields["V"] == "ERROR"
    assert fields["C"] == "08P01"
    assert fields["M"] == "dbmtls: bad thing SET evil n code"
    assert fields["D"] == "line1 line2"
    assert "H" not in fields
    assert list(fields) == ["S", "V", "C", "M", "D"]


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (IdentityError, "28000"),
        (TLSRefused, "08006"),
        (UpstreamProtocolError, "08006"),
        (AppProtocolError, "08P01"),
        (UpstreamUnreachable, "08001"),
    ],
)
def test_error_response_sqlstates(cls: type[DbmtlsError], code: str) -> None:
    assert parse_error_response(error_response(cls("x")))["C"] == code


# --- BackendKeyData / BackendScanner ----------------------------------------------------------------------


def msg(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


AUTH_OK = msg(b"R", struct.pack("!I", 0))
SASL = msg(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")


def startup_stream(key: bytes = b"\x00\x01\x02\x03") -> bytes:
    return (
        SASL
        + msg(b"R", struct.pack("!I", 11) + b"r=nonce,s=salt,i=4096")
        + msg(b"R", struct.pack("!I", 12) + b"v=sig")
        + AUTH_OK
        + msg(b"S", b"server_version\x0017.0\0")
        + msg(b"S", b"client_encoding\0UTF8\0")
        + msg(b"K", struct.pack("!I", 31337) + key)
        + msg(b"Z", b"I")
    )


def events(scanner: BackendScanner) -> list[object]:
    out: list[object] = []
    while not isinstance(event := scanner.next_event(), NeedData):
        out.append(event)
    return out


@pytest.mark.parametrize("key", [b"\x00\x01\x02\x03", bytes(range(32)), b"\xff" * 256])
@pytest.mark.parametrize("step", [None, 1, 2, 3, 7])
def test_backend_scanner(key: bytes, step: int | None) -> None:
    stream = startup_stream(key) + msg(b"T", b"x" * 10_000)
    scanner = BackendScanner()
    size = step or len(stream)
    for i in range(0, len(stream), size):
        scanner.receive_data(stream[i : i + size])
    assert scanner.done
    assert events(scanner) == [BackendKey(31337, key), StartupDone()]
    # bounded: nothing more than a 'K' is ever retained
    assert len(scanner._body) <= 264
    assert len(scanner._header) <= 5


def test_backend_scanner_done_is_sticky_and_cheap() -> None:
    scanner = BackendScanner()
    scanner.receive_data(AUTH_OK + msg(b"Z", b"I"))
    assert scanner.done
    assert events(scanner) == [StartupDone()]
    scanner.receive_data(b"\0" * 1_000_000)  # garbage after Z is the relay's business, not ours
    assert scanner.done
    assert events(scanner) == []


@pytest.mark.parametrize("step", [None, 1, 3])
def test_backend_scanner_login_rejected(step: int | None) -> None:
    stream = SASL + msg(b"E", b"SFATAL\0C28P01\0Mpassword authentication failed\0\0")
    scanner = BackendScanner()
    size = step or len(stream)
    for i in range(0, len(stream), size):
        scanner.receive_data(stream[i : i + size])
    assert events(scanner) == [LoginRejected("28P01", "password authentication failed")]
    assert not scanner.done
    late = BackendScanner()  # an error after AuthenticationOk is not a rejected login
    late.receive_data(AUTH_OK + msg(b"E", b"SFATAL\0C53300\0Mtoo many clients\0\0"))
    assert events(late) == []


def test_backend_scanner_keeps_little_of_a_huge_login_error() -> None:
    scanner = BackendScanner()
    scanner.receive_data(msg(b"E", b"C28000\0M" + b"x" * 100_000 + b"\0\0"))
    (rejected,) = events(scanner)
    assert isinstance(rejected, LoginRejected)
    assert rejected.sqlstate == "28000"
    assert len(scanner._body) <= 1024


def test_backend_scanner_negotiate_version_and_notice() -> None:
    scanner = BackendScanner()
    scanner.receive_data(msg(b"v", struct.pack("!II", 2, 1) + b"_pq_.x\0") + msg(b"N", b"SWARNING\0\0") + AUTH_OK)
    assert events(scanner) == []
    assert not scanner.done


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (b"R\0\0\0\x03", "invalid length 3"),
        (b"R\xff\xff\xff\xff", "invalid length -1"),
        (msg(b"K", struct.pack("!I", 1) + b"abc"), "BackendKeyData with invalid length"),
        (msg(b"K", struct.pack("!I", 1) + b"k" * 257), "BackendKeyData with invalid length"),
    ],
)
def test_backend_scanner_broken_framing(stream: bytes, match: str) -> None:
    with pytest.raises(UpstreamProtocolError, match=match):
        BackendScanner().receive_data(stream)


# --- strip_scram_plus -------------------------------------------------------------------------------------


def test_strip_scram_plus() -> None:
    stripped = strip_scram_plus(SASL)
    assert stripped == msg(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0")
    assert strip_scram_plus(stripped) == stripped


@pytest.mark.parametrize(
    "message",
    [
        AUTH_OK,
        msg(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256-PLUS\0\0"),  # nothing else left: leave it to the app
        msg(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0"),
        msg(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0"),  # no list terminator
        SASL[:-1],  # length mismatch
        msg(b"K", struct.pack("!I", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
        b"R",
    ],
)
def test_strip_scram_plus_leaves_other_messages(message: bytes) -> None:
    assert strip_scram_plus(message) == message


# --- real clients against the sans-IO AppHandshake ----------------------------------------------------------


async def _serve_once(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[AppEvent], err: DbmtlsError
) -> None:
    """The asyncio glue in miniature: drive AppHandshake, answer 'N', reply with an ErrorResponse."""
    hs = AppHandshake()
    try:
        while True:
            data = await reader.read(65536)
            hs.receive_data(data)
            ev = hs.next_event()
            while isinstance(ev, Reply):
                writer.write(ev.data)
                ev = hs.next_event()
            await writer.drain()
            if isinstance(ev, Startup | CancelRequest):
                seen.append(ev)
                writer.write(error_response(err))
                await writer.drain()
                return
            if isinstance(ev, AppClosed):
                return
    finally:
        writer.close()


async def _with_server(err: DbmtlsError, seen: list[AppEvent]) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(lambda r, w: _serve_once(r, w, seen, err), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql (libpq) not installed")
def test_real_libpq_psql() -> None:
    err = IdentityError("no client certificate configured for user alice", hint="add alice to tls.clientCertificates")

    async def main() -> tuple[list[AppEvent], int, str]:
        seen: list[AppEvent] = []
        server, port = await _with_server(err, seen)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGPASSFILE"] = "/nonexistent"
        async with server:
            proc = await asyncio.create_subprocess_exec(
                "psql",
                f"host=127.0.0.1 port={port} user=alice dbname=db sslmode=prefer connect_timeout=3",
                "-X",
                "-w",
                "-c",
                "select 1",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            _out, stderr = await asyncio.wait_for(proc.communicate(), 15)
        return seen, proc.returncode or 0, stderr.decode()

    seen, rc, stderr = asyncio.run(main())
    assert len(seen) == 1
    ev = seen[0]
    assert isinstance(ev, Startup)
    assert ev.user == "alice"
    assert ev.database == "db"
    assert ev.params.get("application_name") == "psql"
    assert ev.version[0] == 3
    # libpq displayed our ErrorResponse: message and hint made it through intact
    assert rc != 0
    assert "dbmtls: no client certificate configured for user alice" in stderr
    assert "add alice to tls.clientCertificates" in stderr


def test_real_asyncpg() -> None:
    asyncpg = pytest.importorskip("asyncpg")
    err = IdentityError("no client certificate configured for user bob")

    async def main() -> tuple[list[AppEvent], BaseException]:
        seen: list[AppEvent] = []
        server, port = await _with_server(err, seen)
        async with server:
            with pytest.raises(Exception) as info:  # noqa: PT011 - asyncpg maps 28000 to its own class
                await asyncio.wait_for(
                    asyncpg.connect(host="127.0.0.1", port=port, user="bob", database="shop", ssl="prefer"), 15
                )
        return seen, info.value

    seen, exc = asyncio.run(main())
    assert seen
    ev = seen[-1]
    assert isinstance(ev, Startup)
    assert (ev.user, ev.database) == ("bob", "shop")
    assert "no client certificate configured for user bob" in str(exc)
    assert getattr(exc, "sqlstate", None) == "28000"


# --- FirstReply -------------------------------------------------------------------------------------------

_SASL_OFFER = msg(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")


@pytest.mark.parametrize("step", [None, 1, 3])
def test_first_reply_skips_negotiate_version_and_strips_plus(step: int | None) -> None:
    nego = msg(b"v", struct.pack("!II", 0, 1) + b"_pq_.x\0")
    stream = nego + _SASL_OFFER + b"more"
    reply = FirstReply()
    size = step or len(stream)
    event: object = NeedData()
    fed = 0
    for i in range(0, len(stream), size):
        if not isinstance(event, NeedData):
            break
        chunk = stream[i : i + size]
        fed += len(chunk)
        reply.receive_data(chunk)
        event = reply.next_event()
    extra = stream[len(nego + _SASL_OFFER) : fed]  # what came with the last chunk is relayed too
    assert event == FirstReplyDone(nego + strip_scram_plus(_SASL_OFFER) + extra)


def test_first_reply_eof() -> None:
    silent = FirstReply()
    silent.receive_data(b"")
    with pytest.raises(UpstreamProtocolError, match="without answering"):
        silent.next_event()
    partial = FirstReply()
    partial.receive_data(_SASL_OFFER[:7])
    assert partial.next_event() == NeedData()
    partial.receive_data(b"")
    assert partial.next_event() == FirstReplyDone(_SASL_OFFER[:7])


def test_first_reply_is_bounded() -> None:
    reply = FirstReply()
    reply.receive_data(msg(b"N", b"x" * FIRST_REPLY_LIMIT))
    with pytest.raises(UpstreamProtocolError, match="without authenticating"):
        reply.next_event()
    broken = FirstReply()
    broken.receive_data(b"R\0\0\0\x02")
    with pytest.raises(UpstreamProtocolError, match="invalid length 2"):
        broken.next_event()
