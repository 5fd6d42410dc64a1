"""``tcp``: relay; on failure the proxy logs and closes (an opaque protocol has no way to say why)."""

from __future__ import annotations

from dbmtls.proxy.runtime import Conn, DatabaseRuntime
from dbmtls.proxy.sessions.common import run_relay


class TcpSession:
    def __init__(self, rt: DatabaseRuntime) -> None:
        self.rt = rt

    async def run(self, conn: Conn) -> None:
        conn.admit()
        up = await self.rt.dialer.dial(conn)
        await run_relay(conn, up)
