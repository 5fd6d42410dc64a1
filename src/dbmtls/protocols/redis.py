"""Redis (RESP) pieces dbmtls needs: error replies and counting requests.

Redis speaks TLS from the first byte, so there is no handshake to drive; what
RESP needs is a way to *say* what went wrong.  When the upstream cannot be
reached, dbmtls answers each request the app sends with a simple error
``-ERR dbmtls: ...`` for a short while, then closes: a client that swallows the
reply to a connect-time command (``CLIENT SETINFO``, ``HELLO``) still shows the
error for its next command.  ``RequestCounter`` finds request boundaries in a
byte stream (multibulk ``*N`` arrays of ``$len`` bulk strings, or inline
commands ended by a newline), bounded in what it keeps.
"""

from __future__ import annotations

from dbmtls.errors import DbmtlsError, Reason
from dbmtls.protocols.spec import ProtocolSpec

MAX_LINE = 64 * 1024


def error_reply(err: DbmtlsError) -> bytes:
    """``-ERR <text>\\r\\n``; the text is single-line ASCII, so no CRLF injection is possible."""
    text = err.wire_text()
    hint = err.wire_hint()
    if hint:
        text = f"{text} (hint: {hint})"
    return f"-ERR {text}\r\n".encode("ascii")


class RequestCounter:
    """Counts complete RESP requests in a stream fed in arbitrary pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pending_args = 0  # bulk strings still expected in the current array
        self._bulk_left = -1  # bytes (+2 for CRLF) still to skip in the current bulk; -1: none
        self.broken = False  # not RESP: stop counting, the caller just closes

    def feed(self, data: bytes) -> int:
        """Feed bytes; return how many requests were completed by them."""
        if self.broken:
            return 0
        self._buf += data
        done = 0
        while True:
            if self._bulk_left >= 0:
                take = min(self._bulk_left, len(self._buf))
                del self._buf[:take]
                self._bulk_left -= take
                if self._bulk_left > 0:
                    return done
                self._bulk_left = -1
                self._pending_args -= 1
                if self._pending_args == 0:
                    done += 1
                continue
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    self.broken = True
                return done
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            if self._pending_args > 0:
                # bounded digit count: int() of a 5000-digit "length" would raise (and be absurd)
                if not line.startswith(b"$") or not line[1:].isdigit() or len(line) > 20:
                    self.broken = True
                    return done
                self._bulk_left = int(line[1:]) + 2
                continue
            if line.startswith(b"*"):
                if len(line) > 20:
                    self.broken = True
                    return done
                try:
                    n = int(line[1:])
                except ValueError:
                    self.broken = True
                    return done
                if n <= 0:
                    continue  # "*0" or "*-1": nothing to answer
                self._pending_args = n
            elif line.strip():
                done += 1  # inline command (redis-cli in some modes, telnet)


class ErrorAnswers:
    """Answers every complete request in a stream with one ``-ERR`` reply (an ``ErrorAnswerer``).

    The reply is also what is left in the socket of an app that asked nothing yet: RESP has
    no request ids, so an unprompted error is read as the answer to the next command.
    """

    def __init__(self, err: DbmtlsError) -> None:
        self._counter = RequestCounter()
        self._reply = error_reply(err)

    @property
    def broken(self) -> bool:
        return self._counter.broken

    def feed(self, data: bytes) -> list[bytes]:
        return [self._reply] * self._counter.feed(data)

    def unprompted(self) -> bytes | None:
        return self._reply


def _wire_code(reason: Reason) -> str:
    return "-ERR"


SPEC = ProtocolSpec(
    name="redis",
    title="Redis",
    session="dbmtls.proxy.sessions.answering:RedisSession",
    wire_code=_wire_code,
    upgrade="TLS from the first byte",
    plaintext_hint="connect without TLS (redis-cli without --tls, rediss:// -> redis://); "
    "dbmtls does the TLS to the database",
    errors="`-ERR` reply to each request for a short, bounded time, then close",
    default_port=6379,
    well_known_ports=(6379,),
)
