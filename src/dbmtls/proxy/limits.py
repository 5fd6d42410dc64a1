"""How many connections the process takes, and what happens past that.

A sidecar that runs out of file descriptors fails in the worst way: accept() fails
inside the event loop, apps see resets with nothing in the log, and the admin
server (liveness probes) cannot accept either, so the pod is restarted and drops
its healthy connections too.  So:

* at start the soft ``RLIMIT_NOFILE`` is raised to the hard limit (and logged);
* a relayed connection needs two descriptors (app and server); ``FD_RESERVE`` are
  kept for the admin server, listeners, certificate reads and cancel connections;
* up to ``maxConnections`` (per database, and for the process: the configured value
  or what the descriptors allow, less an eighth kept for refusals) connections are
  relayed; past that a connection is
  accepted only to be told "too many connections" in its protocol (53300, ERR 1040,
  ``-ERR``), which costs one descriptor for a moment;
* only when even that would eat into the reserve is a connection dropped at once,
  with a log line (rate-limited) instead of silence.
"""

from __future__ import annotations

import enum
import resource
import time

FD_RESERVE = 64
# Of the descriptors left, this share is kept for telling connections past the limit that they
# are (one descriptor each, for a moment); the rest relay, two each.
REFUSAL_SHARE = 8
DROP_LOG_INTERVAL = 10.0


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


class Verdict(enum.Enum):
    RELAY = enum.auto()
    REFUSE = enum.auto()  # accepted to be told "too many connections" in its protocol
    DROP = enum.auto()  # closed at once: not even a descriptor to answer it with


class Admission:
    """Counts open connections against the limits; decides relay, refuse or drop."""

    def __init__(self, configured: int | None, fd_limit: int) -> None:
        usable = max(fd_limit - FD_RESERVE, 4)
        by_fds = max((usable - usable // REFUSAL_SHARE) // 2, 1)
        self.fd_budget = usable
        self.max_connections = min(configured, by_fds) if configured else by_fds
        self.relayed = 0  # admitted connections (two descriptors each)
        self.refusing = 0  # connections being told "too many" (one descriptor each)
        self._last_drop_log = 0.0
        self.dropped = 0

    def decide(self, per_database: int | None, database_active: int) -> Verdict:
        """Relay it, refuse it (tell the app) or drop it (no descriptor to spare)."""
        if 2 * self.relayed + self.refusing + 1 > self.fd_budget:
            return Verdict.DROP
        if self.relayed >= self.max_connections:
            return Verdict.REFUSE
        if per_database is not None and database_active >= per_database:
            return Verdict.REFUSE
        return Verdict.RELAY

    def should_log_drop(self) -> bool:
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            self._last_drop_log = now
            return True
        return False
