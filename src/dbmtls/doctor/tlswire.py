"""What the server said during the TLS handshake, read from OpenSSL's message callback.

Python's ``ssl`` module shows the outcome of a handshake, not its content: it has no
way to ask which CA names the server's CertificateRequest listed (OpenSSL's
``SSL_get_client_CA_list``), and before Python 3.13 no public way to get the server's
chain when verification failed.  OpenSSL's message callback sees every handshake
message *after* decryption (TLS 1.3 encrypts CertificateRequest and Certificate), and
CPython has carried it since 3.8 as ``SSLContext._msg_callback`` (private, used by its
own test suite; stable since).  :class:`HandshakeLog` records what the callback gets and
the functions below parse the few messages the doctor needs, for TLS 1.2 and 1.3:

- ServerHello: the negotiated version (``supported_versions`` for 1.3) and cipher suite;
- Certificate: the server's chain as sent, also when our verification then rejects it;
- CertificateRequest: that the server asks for a client certificate, and the
  distinguished names of the CAs it accepts (TLS 1.2: ``certificate_authorities``
  field; TLS 1.3: the ``certificate_authorities`` extension, 47);
- alerts, sent and received, with their codes.

Nothing here touches a socket, and nothing is sent: the log is filled by a handshake
the caller makes with the project's own verifying context.  Parsing is bounded by the
message lengths and tolerant: a message that does not parse is reported as such
(``None``), never raised, because a doctor must not crash on a strange server.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

# handshake message types (RFC 8446 4, RFC 5246 7.4)
SERVER_HELLO = 2
CERTIFICATE = 11
CERTIFICATE_REQUEST = 13
FINISHED = 20
# record content types as the callback reports them
_HANDSHAKE = 22
_ALERT = 21
_EXT_SUPPORTED_VERSIONS = 43
_EXT_CERTIFICATE_AUTHORITIES = 47

TLS13 = 0x0304
_VERSION_NAMES = {0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}

# RFC 8446 6.2 / RFC 5246 7.2 alert descriptions
ALERTS = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    113: "bad_certificate_status_response",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
}


def alert_name(code: int) -> str:
    return ALERTS.get(code, f"alert {code}")


def version_name(code: int) -> str:
    return _VERSION_NAMES.get(code, f"0x{code:04x}")


@dataclass(frozen=True)
class Message:
    direction: str  # "read" (from the server) or "write" (ours)
    content_type: int
    data: bytes


@dataclass(frozen=True)
class CertificateRequest:
    """The server asked for a client certificate; ``authorities`` are the DER names it listed."""

    authorities: tuple[bytes, ...]


@dataclass
class HandshakeLog:
    """Collects the handshake messages and alerts of one connection (see the module docstring)."""

    messages: list[Message] = field(default_factory=list)

    def attach(self, ctx: ssl.SSLContext) -> bool:
        """Record this context's handshakes; False if this Python has no message callback."""
        if not hasattr(ctx, "_msg_callback"):
            return False
        ctx._msg_callback = self._callback
        return True

    def _callback(self, conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any, data: Any) -> None:
        # Called by OpenSSL inside the handshake: only record, never raise.
        ct = int(content_type)
        if ct in (_HANDSHAKE, _ALERT) and isinstance(data, bytes | bytearray):
            self.messages.append(Message(str(direction), ct, bytes(data[:65536])))

    # --- what the server sent ----------------------------------------------------------

    def _handshake(self, direction: str, msg_type: int) -> list[bytes]:
        return [
            m.data
            for m in self.messages
            if m.direction == direction and m.content_type == _HANDSHAKE and m.data[:1] == bytes([msg_type])
        ]

    def server_hello(self) -> tuple[int, int] | None:
        """(version, cipher suite) from the last ServerHello (a HelloRetryRequest comes first)."""
        found = self._handshake("read", SERVER_HELLO)
        return parse_server_hello(found[-1]) if found else None

    @property
    def version(self) -> int | None:
        hello = self.server_hello()
        return hello[0] if hello else None

    def server_chain(self) -> list[bytes] | None:
        found = self._handshake("read", CERTIFICATE)
        if not found:
            return None
        return parse_certificate(found[0], tls13=self.version == TLS13)

    def certificate_request(self) -> CertificateRequest | None:
        found = self._handshake("read", CERTIFICATE_REQUEST)
        if not found:
            return None
        names = parse_certificate_request(found[0], tls13=self.version == TLS13)
        return CertificateRequest(tuple(names or ()))

    @property
    def server_finished(self) -> bool:
        """The server's side of the handshake arrived whole (TLS 1.3: before our certificate)."""
        return bool(self._handshake("read", FINISHED))

    def sent_certificate(self) -> bytes | None:
        """Our Certificate message (empty list: we had none to send), if we sent one."""
        found = self._handshake("write", CERTIFICATE)
        return found[0] if found else None

    @property
    def sent_finished(self) -> bool:
        """We completed our side: the server's chain passed our verification."""
        return bool(self._handshake("write", FINISHED))

    def alerts(self, direction: str) -> list[tuple[int, int]]:
        """(level, description) of each alert sent ("write") or received ("read")."""
        return [
            (m.data[0], m.data[1])
            for m in self.messages
            if m.direction == direction and m.content_type == _ALERT and len(m.data) >= 2
        ]

    def received_alert(self) -> int | None:
        """The description of the first alert from the server other than close_notify."""
        for _, code in self.alerts("read"):
            if code != 0:
                return code
        return None


# --- parsers (pure, bounded, tolerant) ---------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def vector(self, width: int) -> bytes:
        return self.take(self.uint(width))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _body(message: bytes) -> _Reader:
    r = _Reader(message)
    r.take(1)  # type
    return _Reader(r.vector(3))


def parse_server_hello(message: bytes) -> tuple[int, int] | None:
    try:
        r = _body(message)
        version = r.uint(2)
        r.take(32)  # random
        r.vector(1)  # legacy session id
        cipher = r.uint(2)
        r.take(1)  # compression
        if r.left:
            exts = _Reader(r.vector(2))
            while exts.left:
                ext_type, ext = exts.uint(2), exts.vector(2)
                if ext_type == _EXT_SUPPORTED_VERSIONS and len(ext) == 2:
                    version = int.from_bytes(ext, "big")
        return version, cipher
    except ValueError:
        return None


def parse_certificate(message: bytes, *, tls13: bool) -> list[bytes] | None:
    """The DER certificates of a Certificate message, leaf first."""
    try:
        r = _body(message)
        if tls13:
            r.vector(1)  # certificate_request_context
        entries = _Reader(r.vector(3))
        out = []
        while entries.left:
            out.append(entries.vector(3))
            if tls13:
                entries.vector(2)  # per-certificate extensions
        return out
    except ValueError:
        return None


def parse_certificate_request(message: bytes, *, tls13: bool) -> list[bytes] | None:
    """The DER distinguished names a CertificateRequest lists (empty: it names none)."""
    try:
        r = _body(message)
        if tls13:
            r.vector(1)  # certificate_request_context
            exts = _Reader(r.vector(2))
            while exts.left:
                ext_type, ext = exts.uint(2), exts.vector(2)
                if ext_type == _EXT_CERTIFICATE_AUTHORITIES:
                    return _names(_Reader(ext).vector(2))
            return []
        r.vector(1)  # certificate_types
        r.vector(2)  # supported_signature_algorithms
        return _names(r.vector(2))
    except ValueError:
        return None


def _names(data: bytes) -> list[bytes]:
    r = _Reader(data)
    out = []
    while r.left:
        out.append(r.vector(2))
    return out


def cipher_name(code: int) -> str:
    """The OpenSSL name of a cipher suite code (the names ``ssl`` shows), else its hex code."""
    for c in ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).get_ciphers():
        if c.get("id", 0) & 0xFFFF == code:
            return str(c["name"])
    return f"0x{code:04x}"
