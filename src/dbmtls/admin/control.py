"""What the admin server and the metrics collector need from the running process.

The admin package depends on this small interface only, never on ``dbmtls.app``:
``App`` implements it (structurally, no inheritance), and the admin unit tests
use a fake.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from dbmtls.config.model import Config
from dbmtls.proxy.runtime import DatabaseRuntime
from dbmtls.tls.reload import ReloadCounts


class Control(Protocol):
    @property
    def config(self) -> Config:
        """The effective configuration (``GET /config``)."""
        ...

    @property
    def runtimes(self) -> Mapping[str, DatabaseRuntime]:
        """Per-database state, counters and open connections, by name (``GET /metrics``)."""
        ...

    @property
    def reload_counts(self) -> Mapping[str, ReloadCounts]:
        """Certificate reload attempts by database name (``GET /metrics``)."""
        ...

    def readiness(self) -> list[str]:
        """Why the process is not ready, one reason each; empty when it is (``GET /readyz``)."""
        ...

    def request_shutdown(self, why: str) -> None:
        """Start the graceful drain (``POST /quitquitquit``); asking again changes nothing."""
        ...

    async def reload(self, why: str) -> list[str]:
        """Re-read every certificate file now, even unchanged ones (``POST /reload``).

        Returns what failed, one line per database (empty: everything loaded).  Cancelling
        the wait does not cancel the reload: it finishes, and logs its result, on its own.
        """
        ...
