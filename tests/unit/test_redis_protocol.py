"""RESP request counting and ``-ERR`` replies (``dbmtls.protocols.redis``).

The counter decides how many error replies an app gets while dbmtls cannot reach the
server, so it must count exactly what redis-server would answer, fed in any pieces, and
never raise on garbage (it sees whatever a misconfigured client sends).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbmtls.errors import ClientCertRejected, DbmtlsError, UnknownCA, UpstreamUnreachable
from dbmtls.protocols.redis import MAX_LINE, RequestCounter, error_reply


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


STREAM = (
    resp(b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py")
    + resp(b"SET", b"k", b"a\r\nb\r\n*3\r\n$1\r\n")  # CRLF and RESP-looking bytes inside a value
    + b"PING\r\n"  # inline
    + b"GET k\n"  # inline with a bare LF
    + b"*0\r\n"  # empty array: nothing to answer
    + b"\r\n"  # empty inline line: nothing to answer
    + resp(b"SET", b"big", b"x" * 100_000)
    + resp()[:0]
    + resp(b"EXISTS", b"")  # an empty argument
)
STREAM_REQUESTS = 6


def test_whole_stream() -> None:
    c = RequestCounter()
    assert c.feed(STREAM) == STREAM_REQUESTS
    assert not c.broken


def test_byte_at_a_time() -> None:
    c = RequestCounter()
    assert sum(c.feed(STREAM[i : i + 1]) for i in range(len(STREAM))) == STREAM_REQUESTS
    assert not c.broken


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_any_split(cuts: list[int]) -> None:
    points = sorted({0, len(STREAM), *cuts})
    c = RequestCounter()
    assert sum(c.feed(STREAM[a:b]) for a, b in itertools.pairwise(points)) == STREAM_REQUESTS


def test_counts_only_complete_requests() -> None:
    c = RequestCounter()
    assert c.feed(resp(b"GET", b"k")[:-1]) == 0  # the last LF missing
    assert c.feed(b"\n") == 1
    assert c.feed(b"*2\r\n$3\r\nGET\r\n") == 0
    assert c.feed(b"$1\r\nk\r\n") == 1


def test_pipelined_burst() -> None:
    c = RequestCounter()
    assert c.feed(resp(b"PING") * 1000) == 1000


def test_big_bulk_is_skipped_not_kept() -> None:
    c = RequestCounter()
    assert c.feed(b"*2\r\n$3\r\nSET\r\n$16777216\r\n") == 0
    for _ in range(256):
        assert c.feed(b"v" * 65536) == 0
    assert len(c._buf) == 0  # the value is skipped as it comes: nothing of it is kept
    assert c.feed(b"\r\n") == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"*2\r\nGET\r\n",  # array element that is not a bulk string
        b"*1\r\n$abc\r\n",  # non-numeric length
        b"*1\r\n$-1\r\n",  # null bulk in a request
        b"*x\r\n",  # non-numeric count
        b"*1\r\n$" + b"9" * 5000 + b"\r\n",  # a length int() would refuse to parse
        b"*" + b"9" * 5000 + b"\r\n",
        b"\x16\x03\x01\x02\x00" + b"\x01" * (MAX_LINE + 10),  # a TLS ClientHello-ish blob, no newline
    ],
)
def test_broken_input_stops_counting(garbage: bytes) -> None:
    c = RequestCounter()
    c.feed(garbage)
    assert c.broken
    assert c.feed(resp(b"PING")) == 0  # once broken, always broken: the caller closes


def test_unterminated_line_is_bounded() -> None:
    c = RequestCounter()
    for _ in range(MAX_LINE // 1000 + 2):
        c.feed(b"a" * 1000)
    assert c.broken
    assert len(c._buf) <= MAX_LINE + 1000


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_garbage_never_raises(chunks: list[bytes]) -> None:
    c = RequestCounter()
    total = 0
    for chunk in chunks:
        n = c.feed(chunk)
        assert n >= 0
        total += n
    assert total <= sum(chunk.count(b"\n") for chunk in chunks)  # a request ends with a newline


@settings(max_examples=200)
@given(
    st.lists(
        st.sampled_from([b"*", b"$", b"\r\n", b"\n", b"1", b"2", b"-1", b"0", b"x", b"99999999999999999999"]),
        max_size=60,
    )
)
def test_resp_shaped_garbage_never_raises(parts: list[bytes]) -> None:
    c = RequestCounter()
    c.feed(b"".join(parts))


# --- error replies -------------------------------------------------------------------------


def test_error_reply_shape() -> None:
    err = UnknownCA("TLS handshake with db:6379 failed: server certificate not trusted").with_database("cache")
    reply = error_reply(err)
    assert reply.startswith(b"-ERR dbmtls: [cache] TLS handshake with db:6379 failed: server certificate not trusted")
    assert reply.endswith(b"\r\n")
    assert reply.count(b"\r") == 1
    assert reply.count(b"\n") == 1
    assert b"(hint: the server certificate does not chain to tls.caCertificates" in reply


@pytest.mark.parametrize(
    "message",
    [
        "evil\r\n+OK\r\n",
        "line1\nline2",
        "nul\x00byte",
        "caf\u00e9 \u2603 \U0001f600",
        "x" * 5000,
    ],
)
def test_error_reply_cannot_inject_frames(message: str) -> None:
    err = UpstreamUnreachable(message, hint="hint\r\n-ERR injected").with_database("db")
    reply = error_reply(err)
    body = reply[:-2]
    assert reply.endswith(b"\r\n")
    assert b"\r" not in body
    assert b"\n" not in body
    assert b"\x00" not in body
    assert all(32 <= b < 127 for b in body)
    assert len(reply) < 2200


@given(st.text(), st.one_of(st.none(), st.text()))
def test_error_reply_is_always_one_ascii_line(message: str, hint: str | None) -> None:
    reply = error_reply(DbmtlsError(message, hint=hint))
    assert reply.startswith(b"-ERR dbmtls:")
    assert reply.endswith(b"\r\n")
    assert all(32 <= b < 127 for b in reply[:-2])


def test_client_cert_rejected_reply() -> None:
    err = ClientCertRejected("server db:6379 rejected the client certificate (TLS alert: certificate required)")
    assert error_reply(err.with_database("cache")).startswith(
        b"-ERR dbmtls: [cache] server db:6379 rejected the client certificate (TLS alert: certificate required)"
    )
