"""MySQL / MariaDB connection-phase packets as real servers and clients send them (test builders)."""

from __future__ import annotations

from collections.abc import Sequence

from dbmtls.protocols.mysql import (
    CLIENT_CONNECT_ATTRS,
    CLIENT_CONNECT_WITH_DB,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
)

SCRAMBLE = bytes(range(0x21, 0x21 + 20))  # 20 printable bytes, like a real server's
SWITCH_NONCE = bytes(range(0x41, 0x41 + 20))

# MySQL 8.0 advertises nearly everything (ff ff / ff df), including SSL, COMPRESS and ZSTD.
MYSQL8_CAPS = 0xDFFF_FFFF
# MariaDB 10.11: CLIENT_MYSQL cleared, extended capabilities in the reserved bytes.
MARIADB_CAPS = 0x81BF_FFFE
MARIADB_EXT = 0x1D

APP_CAPS = (
    0x1  # LONG_PASSWORD
    | 0x4  # LONG_FLAG
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_PROTOCOL_41
    | 0x2000  # TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | (1 << 16)  # MULTI_STATEMENTS
    | (1 << 17)  # MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH
    | CLIENT_CONNECT_ATTRS
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | (1 << 24)  # DEPRECATE_EOF
)

OK = b"\x00\x00\x00\x02\x00\x00\x00"
AUTH_DENIED = b"\xff\x15\x04#28000Access denied for user 'u'@'10.0.0.1' (using password: YES)"


def lenenc(n: int) -> bytes:
    assert n < 0xFB
    return bytes([n])


def greeting(
    *,
    version: bytes = b"8.0.36",
    caps: int = MYSQL8_CAPS,
    plugin: bytes = b"caching_sha2_password",
    scramble: bytes = SCRAMBLE,
    mariadb_ext: int | None = None,
) -> bytes:
    p = b"\x0a" + version + b"\x00" + (1234).to_bytes(4, "little") + scramble[:8] + b"\x00"
    p += (caps & 0xFFFF).to_bytes(2, "little") + b"\xff" + (2).to_bytes(2, "little")
    p += ((caps >> 16) & 0xFFFF).to_bytes(2, "little") + bytes([len(scramble) + 1])
    p += b"\x00" * 10 if mariadb_ext is None else b"\x00" * 6 + mariadb_ext.to_bytes(4, "little")
    return p + scramble[8:] + b"\x00" + plugin + b"\x00"


def mariadb_greeting() -> bytes:
    return greeting(
        version=b"5.5.5-10.11.6-MariaDB-0+deb12u1",
        caps=MARIADB_CAPS,
        plugin=b"mysql_native_password",
        mariadb_ext=MARIADB_EXT,
    )


def response(
    *,
    caps: int = APP_CAPS,
    user: bytes = b"u",
    auth: bytes = bytes(32),
    db: bytes = b"shop",
    plugin: bytes = b"caching_sha2_password",
    attrs: Sequence[tuple[bytes, bytes]] = ((b"_client_name", b"libmysql"), (b"_pid", b"4242")),
    ext: int = 0,
) -> bytes:
    p = caps.to_bytes(4, "little") + (1 << 24).to_bytes(4, "little") + b"\xff" + bytes(19) + ext.to_bytes(4, "little")
    p += user + b"\x00"
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        p += lenenc(len(auth)) + auth
    elif caps & CLIENT_SECURE_CONNECTION:
        p += bytes([len(auth)]) + auth
    else:
        p += auth + b"\x00"
    if caps & CLIENT_CONNECT_WITH_DB:
        p += db + b"\x00"
    if caps & CLIENT_PLUGIN_AUTH:
        p += plugin + b"\x00"
    if caps & CLIENT_CONNECT_ATTRS:
        block = b"".join(lenenc(len(k)) + k + lenenc(len(v)) + v for k, v in attrs)
        p += lenenc(len(block)) + block
    return p
