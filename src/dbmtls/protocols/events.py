"""What every handshake machine shares: the shape of h11 and wsproto.

A machine never touches a socket.  The glue feeds it the bytes that arrived
(``receive_data`` or, for a machine between two peers, one method per peer; ``b""``
means EOF) and then calls ``next_event()`` until it returns :class:`NeedData`.
Each event is a frozen dataclass saying what happened or what to write; a machine's
``state`` is an enum, so the glue never compares strings.  Violations are raised as
errors from ``dbmtls.errors`` (or, for the two-sided MySQL machine, returned as a
``Fail`` event carrying the error and the bytes to tell the app).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NeedData:
    """Nothing complete yet: feed more bytes (or ``b""`` at EOF) and ask again."""
