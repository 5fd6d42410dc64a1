"""``tcp``: relay; on failure the proxy logs and closes (an opaque protocol has no way to say why)."""

from __future__ import annotations

from dbmtls.proxy.runtime import Conn, DatabaseRuntime
from dbmtls.proxy.sessions.common import dial, run_relay


class TcpSession:
    native_capable = True  # dials and relays through sessions.common: dataPlane native applies

    def __init__(self, rt: DatabaseRuntime) -> None:
        self.rt = rt

    async def run(self, conn: Conn) -> None:
        conn.admit()
        up = await dial(conn)
        await run_relay(conn, up)
