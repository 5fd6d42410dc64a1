"""Recognising an app that starts TLS on a plaintext listener, the same way for every protocol.

A TLS connection opens with a handshake record: content type 0x16, then the record
version 3.x (0x0301 in every ClientHello in use; 3.0 to 3.4 are accepted here).  Three
bytes are needed to be sure (a MongoDB message whose length ends in 0x16 starts with the
same first byte); a protocol whose own first byte can never be 0x16 (PostgreSQL's startup
length is below 10000) may decide on fewer.
"""

from __future__ import annotations

HANDSHAKE_RECORD = 0x16


def client_hello(data: bytes | bytearray) -> bool | None:
    """True: ``data`` starts like a TLS ClientHello; False: it cannot; None: too few bytes to say."""
    if not data:
        return None
    if data[0] != HANDSHAKE_RECORD:
        return False
    if len(data) >= 2 and data[1] != 3:
        return False
    if len(data) >= 3:
        return data[2] <= 4
    return None
