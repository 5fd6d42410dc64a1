"""MongoDB framing and error replies (``dbmtls.protocols.mongodb``).

The replies are decoded back with a tiny BSON decoder written here (independent of the
module's encoder) and, when pymongo is installed, with its ``bson`` too.  The reader sees
whatever a misconfigured client sends, so it is fed whole streams, byte by byte, split
anywhere, and fuzzed: nothing but ``MongoProtocolError``/``None`` may come out.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbmtls.errors import ClientCertRejected, DbmtlsError, UnknownCA, UpstreamUnreachable
from dbmtls.protocols.mongodb import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    OP_COMPRESSED,
    OP_MSG,
    OP_QUERY,
    OP_REPLY,
    ErrorAnswers,
    Message,
    MessageReader,
    MongoProtocolError,
    MsgHeader,
    error_document,
    error_reply,
    parse_header,
)

# --- a tiny BSON codec for the test (only what the messages here use) -------------------


def bson_encode(doc: dict[str, Any]) -> bytes:
    out = bytearray()
    for key, value in doc.items():
        name = key.encode() + b"\x00"
        if isinstance(value, float):
            out += b"\x01" + name + struct.pack("<d", value)
        elif isinstance(value, str):
            data = value.encode() + b"\x00"
            out += b"\x02" + name + struct.pack("<i", len(data)) + data
        elif isinstance(value, bool):
            out += b"\x08" + name + (b"\x01" if value else b"\x00")
        elif isinstance(value, int):
            out += b"\x10" + name + struct.pack("<i", value)
        elif isinstance(value, dict):
            out += b"\x03" + name + bson_encode(value)
        else:
            raise TypeError(type(value))
    return struct.pack("<i", len(out) + 5) + bytes(out) + b"\x00"


def bson_decode(data: bytes) -> dict[str, Any]:
    (size,) = struct.unpack_from("<i", data)
    assert size == len(data), "document length must cover exactly the document"
    assert data[-1] == 0
    doc: dict[str, Any] = {}
    pos = 4
    while data[pos] != 0:
        kind = data[pos]
        nul = data.index(b"\x00", pos + 1)
        name = data[pos + 1 : nul].decode()
        pos = nul + 1
        if kind == 0x01:
            (doc[name],) = struct.unpack_from("<d", data, pos)
            pos += 8
        elif kind == 0x02:
            (n,) = struct.unpack_from("<i", data, pos)
            raw = data[pos + 4 : pos + 4 + n]
            assert raw.endswith(b"\x00") and b"\x00" not in raw[:-1]
            doc[name] = raw[:-1].decode()
            pos += 4 + n
        elif kind == 0x10:
            (doc[name],) = struct.unpack_from("<i", data, pos)
            pos += 4
        else:
            raise AssertionError(f"unexpected BSON type {kind:#x}")
    assert pos == len(data) - 1
    return doc


# --- messages as drivers send them ----------------------------------------------------------

HELLO = {"hello": 1, "helloOk": True, "client": {"driver": {"name": "test"}}, "$db": "admin"}


def message(op: int, body: bytes, request_id: int = 7) -> bytes:
    return struct.pack("<iiii", HEADER_SIZE + len(body), request_id, 0, op) + body


def op_msg(
    doc: dict[str, Any] = HELLO, *, request_id: int = 7, flags: int = 0, extra: bytes = b"", cut: int = 0
) -> bytes:
    body = struct.pack("<I", flags) + b"\x00" + bson_encode(doc) + extra
    return message(OP_MSG, body[: len(body) - cut], request_id)


def op_query(
    doc: dict[str, Any] | None = None, *, request_id: int = 7, selector: bool = False, cut: int = 0, extra: bytes = b""
) -> bytes:
    doc = doc or {"isMaster": 1, "helloOk": True}
    body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + bson_encode(doc)
    if selector:
        body += bson_encode({})
    return message(OP_QUERY, body[: len(body) - cut] + extra, request_id)


def kind1(identifier: str, *docs: dict[str, Any]) -> bytes:
    payload = identifier.encode() + b"\x00" + b"".join(bson_encode(d) for d in docs)
    return b"\x01" + struct.pack("<i", 4 + len(payload)) + payload


def parse(data: bytes) -> Message:
    (msg,) = MessageReader().feed(data)
    return msg


def unpack_reply(reply: bytes) -> tuple[MsgHeader, dict[str, Any]]:
    """Decode our reply the way a driver does; returns the header and the document."""
    header = parse_header(reply)
    assert header is not None and header.length == len(reply)
    body = reply[HEADER_SIZE:]
    if header.op_code == OP_MSG:
        flags, kind = struct.unpack_from("<IB", body)
        assert (flags, kind) == (0, 0)
        return header, bson_decode(body[5:])  # exactly one section: the document is the rest
    assert header.op_code == OP_REPLY
    flags, cursor, start, returned = struct.unpack_from("<iqii", body)
    assert (flags, cursor, start, returned) == (0, 0, 0, 1)
    return header, bson_decode(body[20:])


ERR = UnknownCA("server certificate not trusted: self-signed", database="orders")


# --- headers and framing --------------------------------------------------------------------


def test_header_fields() -> None:
    data = struct.pack("<iiii", 300, 11, 22, OP_MSG)
    assert parse_header(data) == MsgHeader(300, 11, 22, OP_MSG)
    assert parse_header(data[:15]) is None


@pytest.mark.parametrize("length", [HEADER_SIZE, 100, MAX_MESSAGE_SIZE])
def test_header_length_in_bounds(length: int) -> None:
    header = parse_header(struct.pack("<iiii", length, 1, 0, OP_MSG))
    assert header is not None and header.length == length


@pytest.mark.parametrize("length", [-1, 0, HEADER_SIZE - 1, MAX_MESSAGE_SIZE + 1, 2**31 - 1])
def test_header_length_out_of_bounds(length: int) -> None:
    with pytest.raises(MongoProtocolError, match="messageLength"):
        parse_header(struct.pack("<iiii", length, 1, 0, OP_MSG))


STREAM = op_query(request_id=1) + op_msg(request_id=2) + op_msg({"ping": 1, "$db": "x"}, request_id=3)


def test_reader_whole_stream() -> None:
    msgs = MessageReader().feed(STREAM)
    assert [m.header.request_id for m in msgs] == [1, 2, 3]
    assert b"".join(struct.pack("<iiii", *_fields(m.header)) + m.body for m in msgs) == STREAM


def _fields(h: MsgHeader) -> tuple[int, int, int, int]:
    return h.length, h.request_id, h.response_to, h.op_code


def test_reader_byte_at_a_time() -> None:
    reader = MessageReader()
    msgs = [m for i in range(len(STREAM)) for m in reader.feed(STREAM[i : i + 1])]
    assert msgs == MessageReader().feed(STREAM)
    assert reader.error is None


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_reader_any_split(cuts: list[int]) -> None:
    points = sorted({0, len(STREAM), *cuts})
    reader = MessageReader()
    msgs = [m for a, b in itertools.pairwise(points) for m in reader.feed(STREAM[a:b])]
    assert msgs == MessageReader().feed(STREAM)


def test_reader_keeps_at_most_one_message() -> None:
    reader = MessageReader()
    big = op_msg({"x": "v" * 100_000})
    assert reader.feed(big[:-1]) == []
    assert len(reader._buf) == len(big) - 1
    assert len(reader.feed(big[-1:] + big[:10])) == 1
    assert len(reader._buf) == 10  # only the start of the next message is kept


def test_reader_messages_before_a_bad_length_are_kept() -> None:
    reader = MessageReader()
    msgs = reader.feed(op_msg(request_id=5) + struct.pack("<iiii", 3, 6, 0, OP_MSG) + b"junk")
    assert [m.header.request_id for m in msgs] == [5]
    assert isinstance(reader.error, MongoProtocolError)
    assert reader.feed(op_msg()) == []  # nothing more is read
    assert len(reader._buf) == 0


# --- replies --------------------------------------------------------------------------------


def test_op_msg_reply() -> None:
    reply = error_reply(parse(op_msg(request_id=4242)), ERR, request_id=9)
    assert reply is not None
    header, doc = unpack_reply(reply)
    assert (header.request_id, header.response_to, header.op_code) == (9, 4242, OP_MSG)
    assert doc == {
        "ok": 0.0,
        "errmsg": "dbmtls: [orders] server certificate not trusted: self-signed (hint: "
        + (ERR.wire_hint() or "")
        + ")",
        "code": 6,
        "codeName": "HostUnreachable",
    }
    assert list(doc) == ["ok", "errmsg", "code", "codeName"]


@pytest.mark.parametrize("selector", [False, True])
def test_op_query_gets_op_reply(selector: bool) -> None:
    err = ClientCertRejected("server 10.0.0.1:27017 rejected the client certificate", database="users")
    reply = error_reply(parse(op_query(request_id=77, selector=selector)), err, request_id=3)
    assert reply is not None
    header, doc = unpack_reply(reply)
    assert (header.request_id, header.response_to, header.op_code) == (3, 77, OP_REPLY)
    assert doc["code"] == 18 and doc["codeName"] == "AuthenticationFailed"
    assert doc["errmsg"].startswith("dbmtls: [users] server 10.0.0.1:27017 rejected the client certificate (hint:")


def test_error_without_hint() -> None:
    err = DbmtlsError("TLS material is not loaded: missing file", database="db")
    doc = bson_decode(error_document(err))
    assert doc["errmsg"] == "dbmtls: [db] TLS material is not loaded: missing file"


def test_errmsg_is_single_line_ascii() -> None:
    err = UpstreamUnreachable("bad\r\nname\x00 é", database="d")
    doc = bson_decode(error_document(err))
    assert doc["errmsg"].isascii() and "\n" not in doc["errmsg"] and "\x00" not in doc["errmsg"]


def test_bson_agrees_with_pymongo() -> None:
    bson = pytest.importorskip("bson")
    assert bson.decode(error_document(ERR)) == bson_decode(error_document(ERR))
    assert bson.encode({"ok": 0.0, "code": 6}) == bson_encode({"ok": 0.0, "code": 6})


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(op_msg(flags=1, extra=b"\x12\x34\x56\x78"), id="checksum"),
        pytest.param(op_msg(flags=1 << 16), id="exhaustAllowed"),
        pytest.param(op_msg(extra=kind1("documents", {"a": 1}, {"b": "x"})), id="kind1-after"),
        pytest.param(
            message(OP_MSG, struct.pack("<I", 0) + kind1("docs") + b"\x00" + bson_encode(HELLO)), id="kind1-first-empty"
        ),
    ],
)
def test_well_formed_op_msg_variants_are_answered(data: bytes) -> None:
    assert error_reply(parse(data), ERR, 1) is not None


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(message(OP_MSG, b""), id="no-flags"),
        pytest.param(message(OP_MSG, b"\x00\x00\x00\x00"), id="no-sections"),
        pytest.param(op_msg(flags=1 << 2), id="unknown-required-flag"),
        pytest.param(op_msg(flags=1 << 1), id="moreToCome-wants-no-reply"),
        pytest.param(op_msg(flags=1), id="checksum-flag-eats-the-terminator"),
        pytest.param(op_msg(extra=b"\x00" + bson_encode({})), id="two-body-sections"),
        pytest.param(op_msg(extra=b"\x02"), id="unknown-section-kind"),
        pytest.param(message(OP_MSG, struct.pack("<I", 0) + kind1("d", {"a": 1})), id="no-body-section"),
        pytest.param(op_msg(cut=1), id="document-cut"),
        pytest.param(message(OP_MSG, b"\0\0\0\0\0" + struct.pack("<i", 4) + b"\0"), id="doc-length-too-small"),
        pytest.param(message(OP_MSG, b"\0\0\0\0\0" + struct.pack("<i", 6) + b"\0\x01"), id="doc-not-terminated"),
        pytest.param(op_msg(extra=b"\x01" + struct.pack("<i", 99) + b"x\0"), id="sequence-too-long"),
        pytest.param(op_msg(extra=b"\x01" + struct.pack("<i", 5) + b"x"), id="sequence-id-unterminated"),
        pytest.param(message(OP_QUERY, struct.pack("<i", 0) + b"admin.$cmd"), id="query-name-unterminated"),
        pytest.param(message(OP_QUERY, struct.pack("<i", 0) + b"a\0" + b"\0" * 8), id="query-no-document"),
        pytest.param(op_query(cut=1), id="query-cut"),
        pytest.param(op_query(extra=b"\0"), id="query-trailing-byte"),
        pytest.param(message(OP_COMPRESSED, struct.pack("<iiB", OP_MSG, 10, 1) + b"x" * 10), id="compressed"),
        pytest.param(message(OP_REPLY, b"\0" * 20 + bson_encode({})), id="a-reply"),
        pytest.param(message(2002, b"\0" * 8), id="legacy-op-insert"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 1000, id="http"),
    ],
)
def test_not_answerable(data: bytes) -> None:
    reader = MessageReader()
    msgs = reader.feed(data)
    assert len(msgs) == 1 or reader.error is not None  # a whole message, or not even that
    assert all(error_reply(m, ERR, 1) is None for m in msgs)
    responder = ErrorAnswers(ERR)
    assert responder.feed(data) == []
    assert responder.broken


# --- the responder a session drives ---------------------------------------------------------


def test_responder_answers_each_request_with_own_ids() -> None:
    responder = ErrorAnswers(ERR, first_request_id=100)
    replies = responder.feed(op_query(request_id=1) + op_msg(request_id=2))
    assert [unpack_reply(r)[0].response_to for r in replies] == [1, 2]
    assert [unpack_reply(r)[0].request_id for r in replies] == [100, 101]
    assert [unpack_reply(r)[0].op_code for r in replies] == [OP_REPLY, OP_MSG]
    assert not responder.broken


def test_responder_byte_at_a_time() -> None:
    responder = ErrorAnswers(ERR)
    replies = [r for i in range(len(STREAM)) for r in responder.feed(STREAM[i : i + 1])]
    assert [unpack_reply(r)[0].response_to for r in replies] == [1, 2, 3]


def test_responder_stops_at_the_first_unanswerable_message() -> None:
    responder = ErrorAnswers(ERR)
    compressed = message(OP_COMPRESSED, struct.pack("<iiB", OP_MSG, 10, 1) + b"x" * 10, request_id=2)
    replies = responder.feed(op_msg(request_id=1) + compressed + op_msg(request_id=3))
    assert [unpack_reply(r)[0].response_to for r in replies] == [1]
    assert responder.broken
    assert responder.feed(op_msg(request_id=4)) == []


def test_responder_breaks_on_a_bad_length_without_buffering() -> None:
    responder = ErrorAnswers(ERR)
    assert responder.feed(struct.pack("<iiii", MAX_MESSAGE_SIZE + 1, 1, 0, OP_MSG)) == []
    assert responder.broken


def test_responder_tls_client_hello_is_not_answered() -> None:
    # a ClientHello's first bytes read as a ~33 MB length: within bounds, so the reader waits
    # (the session's time window ends it); it never yields a reply.
    hello = bytes.fromhex("160301020001") + b"\x00" * 300
    responder = ErrorAnswers(ERR)
    assert responder.feed(hello) == []


def test_request_ids_wrap_within_int32() -> None:
    responder = ErrorAnswers(ERR, first_request_id=2**31 - 1)
    replies = responder.feed(op_msg(request_id=1) + op_msg(request_id=2))
    assert [unpack_reply(r)[0].request_id for r in replies] == [2**31 - 1, 0]


# --- fuzz -----------------------------------------------------------------------------------

_header_ish = st.builds(
    lambda length, rid, op, tail: struct.pack("<iii", length, rid, 0) + struct.pack("<i", op) + tail,
    st.integers(min_value=-5, max_value=200),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.sampled_from([OP_MSG, OP_QUERY, OP_COMPRESSED, OP_REPLY, 0, -1]),
    st.binary(max_size=200),
)
_garbage = st.one_of(st.binary(max_size=400), _header_ish, st.builds(lambda a, b: a + b, _header_ish, _header_ish))


@settings(max_examples=300)
@given(_garbage)
def test_parse_header_fuzz(data: bytes) -> None:
    try:
        header = parse_header(data)
    except MongoProtocolError:
        assert len(data) >= HEADER_SIZE
        return
    assert (header is None) == (len(data) < HEADER_SIZE)


@settings(max_examples=300)
@given(_garbage, st.integers(min_value=1, max_value=50))
def test_responder_fuzz(data: bytes, step: int) -> None:
    responder = ErrorAnswers(ERR)
    replies = [r for i in range(0, len(data), step) for r in responder.feed(data[i : i + step])]
    for r in replies:
        _, doc = unpack_reply(r)  # whatever it answers is a well-formed reply
        assert doc["codeName"] == "HostUnreachable"
    for msg in MessageReader().feed(data):
        error_reply(msg, ERR, 5)  # None or bytes, never an exception


@settings(max_examples=200)
@given(st.binary(max_size=300), st.sampled_from([OP_MSG, OP_QUERY]))
def test_error_reply_fuzz_bodies(body: bytes, op: int) -> None:
    msg = Message(MsgHeader(HEADER_SIZE + len(body), 1, 0, op), body)
    reply = error_reply(msg, ERR, 2)
    if reply is not None:
        assert unpack_reply(reply)[0].response_to == 1


@settings(max_examples=300)
@given(
    st.sampled_from([op_msg(extra=kind1("documents", {"a": 1})), op_query(selector=True)]),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=4),
)
def test_mutated_requests_fuzz(data: bytes, edits: list[tuple[int, int]]) -> None:
    """Valid requests with a few bytes changed: answered well or not at all, never a crash."""
    mutated = bytearray(data)
    for pos, value in edits:
        mutated[HEADER_SIZE + pos % (len(data) - HEADER_SIZE)] = value  # keep the framing
    responder = ErrorAnswers(ERR)
    for r in responder.feed(bytes(mutated)):
        assert unpack_reply(r)[0].response_to == 7
