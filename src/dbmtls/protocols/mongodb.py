"""MongoDB wire protocol pieces dbmtls needs: framing the app's requests and error replies.

MongoDB speaks TLS from the first byte, so, as for Redis, there is no handshake to
drive; what the wire protocol needs is a way to *say* what went wrong.  When the
upstream cannot be reached, dbmtls answers the app's requests with a command failure
``{ok: 0.0, errmsg, code, codeName}``: a driver's connection handshake (``hello`` /
legacy ``isMaster``) then fails with that text, the driver marks the server Unknown,
and the text shows up in its server-selection timeout error.

Theory of operation
-------------------

Every message starts with ``MsgHeader {i32 messageLength, i32 requestID, i32 responseTo,
i32 opCode}``, little-endian, ``messageLength`` counting the header itself.
:class:`MessageReader` cuts a byte stream fed in arbitrary pieces into whole messages.
It keeps at most one message (``messageLength`` is bounded to 16 bytes .. 48 MiB, the
server's ``maxMessageSizeBytes`` rounded up), so a garbage length cannot make it buffer
more than that; a length outside the bounds is a :class:`MongoProtocolError` (raised by
:func:`parse_header`, recorded as ``MessageReader.error``).

:func:`error_reply` answers one message, with ``responseTo`` set to the app's
``requestID`` (drivers drop replies to anything else) and our own ``requestID``:

- ``OP_MSG`` (2013) gets an ``OP_MSG``: flagBits 0 and one kind-0 section;
- legacy ``OP_QUERY`` (2004), which drivers still use for the first ``isMaster`` unless
  a Stable API version or ``loadBalanced`` is set, gets an ``OP_REPLY`` (opCode 1) with
  responseFlags 0, cursorID 0, startingFrom 0, numberReturned 1.

Anything else gets no reply (``None``) and the caller closes the connection:

- a message that is not well-formed (sections that do not add up, a document whose
  length or terminator is wrong, unknown required flag bits) is not MongoDB;
- ``OP_COMPRESSED`` (2012): drivers compress only after the server agreed to it in the
  ``hello`` reply, which never happens through a dbmtls that cannot reach the server,
  so a compressed message is not from a driver's first exchange; decompressing it
  (snappy/zstd) to answer it is not worth a dependency;
- an ``OP_MSG`` with ``moreToCome``: the sender expects no reply, and one would be read
  as the answer to its next request.

:class:`ErrorAnswers` combines the two for a session: feed it the app's bytes, write
the replies it returns, close once ``broken`` (or when the session's time is up).

The reply document is BSON written by hand (double ``0x01``, string ``0x02``, int32
``0x10``): four fields do not justify a dependency.  The texts come from
:meth:`DbmtlsError.wire_text`, single-line ASCII, so they cannot contain a NUL.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from dbmtls.errors import DbmtlsError, Reason
from dbmtls.protocols.spec import ProtocolSpec

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

HEADER_SIZE = 16
# mongod's maxMessageSizeBytes is 48,000,000; 48 MiB leaves room and bounds the buffer.
MAX_MESSAGE_SIZE = 48 * 1024 * 1024
# What dbmtls reads of an app's request while it answers errors: a driver's connection
# handshake (hello / isMaster) is a few hundred bytes; a bigger request is not answered but
# closed, so a failing connection never holds up to MAX_MESSAGE_SIZE.
MAX_ANSWERED_SIZE = 1024 * 1024

# OP_MSG flagBits: bits 0-15 are "required" (an unknown one must make the receiver fail).
MSG_CHECKSUM_PRESENT = 1 << 0
MSG_MORE_TO_COME = 1 << 1
_MSG_KNOWN_REQUIRED = MSG_CHECKSUM_PRESENT | MSG_MORE_TO_COME

_HEADER = struct.Struct("<iiii")
_I32 = struct.Struct("<i")
_MIN_BSON = 5  # i32 length + terminating NUL: the empty document


class MongoProtocolError(ValueError):
    """The bytes are not a MongoDB message stream (says which limit or field was wrong)."""


@dataclass(frozen=True, slots=True)
class MsgHeader:
    length: int
    request_id: int
    response_to: int
    op_code: int


@dataclass(frozen=True, slots=True)
class Message:
    header: MsgHeader
    body: bytes  # everything after the 16-byte header


def parse_header(data: bytes | bytearray, limit: int = MAX_MESSAGE_SIZE) -> MsgHeader | None:
    """The header at the start of ``data``; None if fewer than 16 bytes are there.

    Raises MongoProtocolError if ``messageLength`` is outside 16 .. ``limit``.
    """
    if len(data) < HEADER_SIZE:
        return None
    length, request_id, response_to, op_code = _HEADER.unpack_from(data)
    if length < HEADER_SIZE:
        raise MongoProtocolError(f"messageLength {length} is shorter than the 16-byte header")
    if length > limit:
        raise MongoProtocolError(f"messageLength {length} exceeds the {limit}-byte limit")
    return MsgHeader(length, request_id, response_to, op_code)


class MessageReader:
    """Cuts a byte stream fed in arbitrary pieces into whole messages, keeping at most one.

    Never raises: once the stream is not MongoDB (a length out of bounds), ``error`` says
    why and everything after the last whole message is dropped.
    """

    def __init__(self, limit: int = MAX_MESSAGE_SIZE) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._header: MsgHeader | None = None
        self.error: MongoProtocolError | None = None

    def feed(self, data: bytes) -> list[Message]:
        """Feed bytes; return the messages they completed (before any error)."""
        if self.error is not None:
            return []
        self._buf += data
        out: list[Message] = []
        while True:
            if self._header is None:
                try:
                    self._header = parse_header(self._buf, self._limit)
                except MongoProtocolError as exc:
                    self.error = exc
                    self._buf.clear()
                    return out
                if self._header is None:
                    return out
            n = self._header.length
            if len(self._buf) < n:
                return out
            out.append(Message(self._header, bytes(self._buf[HEADER_SIZE:n])))
            del self._buf[:n]
            self._header = None


# --- well-formedness ----------------------------------------------------------------


def _document_end(body: bytes, pos: int, end: int) -> int:
    """The offset after the BSON document at ``pos`` (framing only: length and terminator)."""
    if end - pos < _MIN_BSON:
        raise MongoProtocolError("truncated BSON document")
    size: int = _I32.unpack_from(body, pos)[0]
    if size < _MIN_BSON or size > end - pos:
        raise MongoProtocolError(f"BSON document length {size} does not fit the message")
    if body[pos + size - 1] != 0:
        raise MongoProtocolError("BSON document is not NUL-terminated")
    return pos + size


def _cstring_end(body: bytes, pos: int, end: int) -> int:
    nul = body.find(b"\x00", pos, end)
    if nul < 0:
        raise MongoProtocolError("unterminated C string")
    return nul + 1


def _check_op_msg(body: bytes) -> int:
    """Validate an OP_MSG body; return its flagBits."""
    if len(body) < 4:
        raise MongoProtocolError("OP_MSG without flagBits")
    flags: int = struct.unpack_from("<I", body)[0]
    unknown = flags & 0xFFFF & ~_MSG_KNOWN_REQUIRED
    if unknown:
        raise MongoProtocolError(f"OP_MSG with unknown required flag bits {unknown:#x}")
    end = len(body) - (4 if flags & MSG_CHECKSUM_PRESENT else 0)  # the crc32c is not checked
    pos = 4
    bodies = 0
    if pos >= end:
        raise MongoProtocolError("OP_MSG without sections")
    while pos < end:
        kind = body[pos]
        pos += 1
        if kind == 0:
            pos = _document_end(body, pos, end)
            bodies += 1
        elif kind == 1:
            if end - pos < 4:
                raise MongoProtocolError("truncated document sequence")
            (size,) = _I32.unpack_from(body, pos)
            if size < 4 or size > end - pos:
                raise MongoProtocolError(f"document sequence length {size} does not fit the message")
            seq_end = pos + size
            p = _cstring_end(body, pos + 4, seq_end)
            while p < seq_end:
                p = _document_end(body, p, seq_end)
            pos = seq_end
        else:
            raise MongoProtocolError(f"OP_MSG section kind {kind} is unknown")
    if bodies != 1:
        raise MongoProtocolError(f"OP_MSG has {bodies} body sections instead of one")
    return flags


def _check_op_query(body: bytes) -> None:
    # i32 flags, cstring fullCollectionName, i32 numberToSkip, i32 numberToReturn,
    # document query, [document returnFieldsSelector]
    end = len(body)
    pos = _cstring_end(body, 4, end) if end >= 4 else end
    if end - pos < 8:
        raise MongoProtocolError("truncated OP_QUERY")
    pos = _document_end(body, pos + 8, end)
    if pos < end:
        pos = _document_end(body, pos, end)
    if pos != end:
        raise MongoProtocolError("trailing bytes after the OP_QUERY documents")


# --- replies (docs/protocols/mongodb.md#errors) ---------------------------------------

# MongoDB server error codes (error_codes.yml) for each failure reason.
HOST_UNREACHABLE: Final = (6, "HostUnreachable")
BAD_VALUE: Final = (2, "BadValue")
AUTHENTICATION_FAILED: Final = (18, "AuthenticationFailed")
_ERROR_CODES: Final[dict[Reason, tuple[int, str]]] = {
    Reason.APP_PROTOCOL: BAD_VALUE,
    Reason.NO_CERTIFICATE_FOR_USER: AUTHENTICATION_FAILED,
    Reason.CLIENT_CERT_REJECTED: AUTHENTICATION_FAILED,
}


def error_code(reason: Reason) -> tuple[int, str]:
    """(code, codeName) for a failure reason."""
    return _ERROR_CODES.get(reason, HOST_UNREACHABLE)


def _bson_cstring(s: str) -> bytes:
    return s.encode("ascii") + b"\x00"


def _bson_string(name: str, value: str) -> bytes:
    data = value.encode("utf-8") + b"\x00"
    return b"\x02" + _bson_cstring(name) + _I32.pack(len(data)) + data


def error_document(err: DbmtlsError) -> bytes:
    """BSON ``{ok: 0.0, errmsg, code, codeName}`` for ``err``."""
    text = err.wire_text()
    hint = err.wire_hint()
    if hint:
        text = f"{text} (hint: {hint})"
    code, code_name = error_code(err.reason)
    elements = (
        b"\x01" + _bson_cstring("ok") + struct.pack("<d", 0.0),
        _bson_string("errmsg", text),
        b"\x10" + _bson_cstring("code") + _I32.pack(code),
        _bson_string("codeName", code_name),
    )
    content = b"".join(elements)
    return _I32.pack(4 + len(content) + 1) + content + b"\x00"


def error_reply(message: Message, err: DbmtlsError, request_id: int) -> bytes | None:
    """The reply to ``message`` carrying ``err``; None if it cannot or must not be answered."""
    op = message.header.op_code
    try:
        if op == OP_MSG:
            if _check_op_msg(message.body) & MSG_MORE_TO_COME:
                return None
            payload = struct.pack("<I", 0) + b"\x00" + error_document(err)
        elif op == OP_QUERY:
            _check_op_query(message.body)
            # responseFlags, cursorID, startingFrom, numberReturned
            payload = struct.pack("<iqii", 0, 0, 0, 1) + error_document(err)
            op = OP_REPLY
        else:
            return None  # OP_COMPRESSED, removed legacy opcodes, replies, garbage
    except MongoProtocolError:
        return None
    header = _HEADER.pack(HEADER_SIZE + len(payload), request_id, message.header.request_id, op)
    return header + payload


class ErrorAnswers:
    """Answers every complete request in a stream with ``err`` (an ``ErrorAnswerer``); never raises.

    ``broken`` turns True at the first thing it cannot answer (see the module docstring);
    requests after it are not answered.
    """

    def __init__(self, err: DbmtlsError, first_request_id: int = 1) -> None:
        self._err = err
        self._reader = MessageReader(MAX_ANSWERED_SIZE)
        self._next_id = first_request_id
        self.broken = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.broken:
            return []
        messages = self._reader.feed(data)
        replies: list[bytes] = []
        for message in messages:
            reply = error_reply(message, self._err, self._next_id)
            if reply is None:
                self.broken = True
                break
            # wrap within i32: a long-lived counter must not make struct.pack raise
            self._next_id = (self._next_id + 1) & 0x7FFFFFFF
            replies.append(reply)
        if self._reader.error is not None:
            self.broken = True
        if self.broken:
            self._reader = MessageReader(MAX_ANSWERED_SIZE)  # drop what it kept: nothing more is read
        return replies

    def unprompted(self) -> bytes | None:
        # a reply must carry the request's requestID in responseTo: nothing to say unasked
        return None


def _wire_code(reason: Reason) -> str:
    code, name = error_code(reason)
    return f"{code} {name}"


SPEC = ProtocolSpec(
    name="mongodb",
    title="MongoDB",
    aliases=("mongo",),
    session="dbmtls.proxy.sessions.answering:MongoSession",
    wire_code=_wire_code,
    upgrade="TLS from the first byte",
    plaintext_hint="connect without TLS (no tls=true in the URI); dbmtls does the TLS to the database",
    errors="`{ok: 0, errmsg, code, codeName}` reply (OP_MSG or OP_REPLY) to each request, then close",
    default_port=27017,
    well_known_ports=(27017,),
)
