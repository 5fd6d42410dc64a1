"""``tcp``: any service that speaks TLS from its first byte, relayed opaquely.

There is nothing to parse and no way to tell the application anything in-band:
failures are logged and counted, and the app's connection is closed.  See
``docs/protocols/tcp.md``.
"""

from __future__ import annotations

from dbmtls.errors import Reason
from dbmtls.protocols.spec import ProtocolSpec


def wire_code(reason: Reason) -> str:
    return "close"


SPEC = ProtocolSpec(
    name="tcp",
    title="TCP (opaque, TLS from the first byte)",
    session="dbmtls.proxy.sessions.tcp:TcpSession",
    wire_code=wire_code,
    upgrade="TLS from the first byte",
    plaintext_hint="an opaque tcp listener relays whatever it gets, TLS included",
    errors="none in-band: the connection is closed; the log line and metric say why",
    named_in_hosts=False,
)
