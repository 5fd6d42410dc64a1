"""PostgreSQL startup packets as clients send them (test builders)."""

from __future__ import annotations

from collections.abc import Mapping


def encode_startup(version: tuple[int, int], params: Mapping[str, str]) -> bytes:
    """Build a StartupMessage (length recomputed).  ``_pq_.`` and unknown options are kept."""
    body = bytearray((version[0] << 16 | version[1]).to_bytes(4, "big"))
    for name, value in params.items():
        n, v = name.encode("utf-8"), value.encode("utf-8")
        if not n or b"\x00" in n or b"\x00" in v:
            raise ValueError(f"startup parameter {name!r} cannot be encoded")
        body += n + b"\x00" + v + b"\x00"
    body += b"\x00"
    return (len(body) + 4).to_bytes(4, "big") + bytes(body)
