"""``dbmtls run``: the event loop, signals, the admin server, reloads, and the exit code.

SIGTERM / SIGINT (or POST /quitquitquit) start a graceful drain and the process
exits 0 when it is over; SIGHUP reloads the certificate files.
"""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING

import uvloop

from dbmtls.config.model import Config
from dbmtls.logs import LOG
from dbmtls.memtrim import Trimmer, libc_malloc_trim
from dbmtls.proxy.runtime import DatabaseRuntime
from dbmtls.proxy.server import Proxy
from dbmtls.tls.reload import ReloadCounts, Reloader

if TYPE_CHECKING:
    from dbmtls.admin.server import AdminServer


class App:
    """The process; implements ``dbmtls.admin.control.Control`` for the admin server and metrics."""

    def __init__(self, config: Config, *, admin_listen: str | None = None) -> None:
        self.config = config
        self.admin_listen = admin_listen if admin_listen is not None else config.admin.listen
        self.proxy = Proxy(config)
        self.admin: AdminServer | None = None
        self.public_admin: AdminServer | None = None
        self.reloader = Reloader(
            {name: rt.tls for name, rt in self.proxy.runtimes.items()},
            expiry_warning=config.certificateExpiryWarning,
        )
        self.trimmer = Trimmer(self._connection_counts, trim=libc_malloc_trim())
        self._shutdown: asyncio.Task[None] | None = None

    # --- dbmtls.admin.control.Control ------------------------------------------------

    @property
    def runtimes(self) -> Mapping[str, DatabaseRuntime]:
        return self.proxy.runtimes

    @property
    def reload_counts(self) -> Mapping[str, ReloadCounts]:
        return self.reloader.counts

    def readiness(self) -> list[str]:
        """Why the process is not ready (empty: ready)."""
        problems = []
        if self.proxy.draining:
            problems.append("draining: shutting down")
        for rt in self.proxy.runtimes.values():
            if not rt.listening:
                problems.append(f"{rt.name}: listener {rt.db.listen} not bound")
            if rt.tls.enabled and rt.tls.material is None:
                problems.append(f"{rt.name}: TLS material not loaded: {rt.tls.last_error or 'not loaded yet'}")
        return problems

    def request_shutdown(self, why: str, *, from_signal: bool = False) -> None:
        """Start the graceful drain; a second *signal* during the drain closes everything now."""
        if self._shutdown is None:
            LOG.info("shutting down", extra={"fields": {"why": why}})
            self._shutdown = asyncio.get_running_loop().create_task(self._drain())
        elif from_signal:
            # a second signal during the drain: the operator wants out now
            LOG.warning("second signal: closing all connections now", extra={"fields": {"why": why}})
            self.proxy.close_all()

    async def reload(self, why: str) -> list[str]:
        # shield: a caller that stops waiting (the admin server's answer timeout) does not
        # cancel the reload itself, which the reloader keeps as a task of its own.
        return await asyncio.shield(self.reloader.request(why))

    def _connection_counts(self) -> tuple[int, int]:
        """(open now, closed so far) over every database, for the memory trimmer."""
        runtimes = self.proxy.runtimes.values()
        return sum(len(rt.active) for rt in runtimes), sum(rt.stats.closed for rt in runtimes)

    # --- running ---------------------------------------------------------------------

    async def _drain(self) -> None:
        await self.proxy.drain(self.config.drainTimeout)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self.proxy.start()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, functools.partial(self.request_shutdown, name, from_signal=True))
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request, "SIGHUP")
        await self._start_extras()
        problems = self.readiness()
        if problems:
            # listening, but /readyz says 503: say so here too (the reloader logs the material
            # when it arrives, and /readyz turns 200 then)
            LOG.warning("started, not ready", extra={"fields": {"problems": "; ".join(problems)}})
        else:
            LOG.info("ready", extra={"fields": {"databases": len(self.proxy.runtimes)}})
        await self.proxy.stopped.wait()
        await self._stop_extras()
        LOG.info("stopped")
        return 0

    async def _start_extras(self) -> None:
        """Certificate reloader, memory trimmer and admin server, started once the listeners are bound."""
        await self.reloader.start()
        await self.trimmer.start()
        if self.admin_listen != "off" or self.config.admin.publicListen != "off":
            # imported only when an admin listener is on (h11 and the server's code are not needed otherwise)
            from dbmtls.admin.server import AdminServer
        if self.admin_listen != "off":
            self.admin = AdminServer(self, self.admin_listen, allow_remote=self.config.admin.allowRemote)
            await self.admin.start()
        if self.config.admin.publicListen != "off":
            self.public_admin = AdminServer(self, self.config.admin.publicListen, public=True)
            await self.public_admin.start()
        self.trimmer.after_start()

    async def _stop_extras(self) -> None:
        await self.reloader.stop()
        await self.trimmer.stop()
        for server in (self.admin, self.public_admin):
            if server is not None:
                await server.stop()


def run(config: Config, *, admin_listen: str | None = None) -> int:
    return uvloop.run(App(config, admin_listen=admin_listen).run())
