"""Certificate and CA rotation without restarts.

Triggers, all leading to the same load:

* a poll every second (``POLL_INTERVAL``) that fingerprints the files by their
  *contents*, followed through symlinks.  Content, not paths or mtimes, is what
  catches Kubernetes Secret updates (an atomic swap of the ``..data`` symlink:
  the file path never changes, its target does), editors that write a new file
  and rename it over the old one, and files that appear later.  A poll reads a
  few small PEM files; it also drives the expiry warnings.  The kubelet itself
  takes up to a minute or more to project an updated Secret into the pod, so a
  second more is not noticeable; and polling needs no inotify (no watcher
  thread, no watch limits, the same on every file system);
* a retry of a failed load while the files stay the same (see below);
* SIGHUP and ``POST /reload`` (``force``: retry even unchanged files).

Off the event loop.  Reading the files and building SSLContexts (parsing a CA
bundle, checking a key against its certificate) takes milliseconds, more on a
slow volume, and every connection would wait for it.  So the fingerprints and
the load run in a worker thread (``asyncio.to_thread``) and only the swap, one
attribute assignment, runs on the loop (``ClientTLS.apply``).  One lock per
database keeps its loads in order, so an older load never overwrites a newer one.

Retries.  A load that failed is tried again without anyone sending SIGHUP:

* a client certificate that is not valid yet (``CertificateNotYetValid``: issued
  by a CA whose clock runs ahead of ours, typically at pod start) at its
  notBefore plus ``NOT_BEFORE_MARGIN``, judged by the wall clock at every poll
  so that a clock corrected by NTP meanwhile is followed at once;
* any other failure with capped exponential backoff (``RETRY_INITIAL`` doubling
  up to ``RETRY_MAX``) while the files stay the same: most such failures need a
  change of the files, which is tried at once, but some do not (an I/O error, a
  trust store outside the fingerprint), and a retry is cheap.

Logging, chosen so that a Secret that stays broken for a week costs one line: a
failure is logged at ERROR once per change of the files, per SIGHUP or
``POST /reload``, and when a retry fails differently from the attempt before it;
a retry that fails the same way again is logged at DEBUG only.  The line says
when the next try is.  A success is logged at INFO.  The counters
(``dbmtls_certificate_reloads_total``) count every attempt, retries included.

``ClientTLS.attempt`` validates everything before anything is swapped in: a bad
or half-written file keeps the old material.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dbmtls.errors import ConfigError
from dbmtls.logs import LOG
from dbmtls.tls.material import CertificateNotYetValid, ClientTLS, Material, fingerprint

__all__ = ["ReloadCounts", "Reloader", "Retry", "fingerprint"]

POLL_INTERVAL = 1.0
EXPIRY_LOG_INTERVAL = 3600.0
RETRY_INITIAL = 1.0
RETRY_MAX = 60.0
# Our clock decides when a not-yet-valid certificate is loaded, the server's clock when it is
# accepted: a second of slack keeps a server whose clock lags ours slightly from refusing it.
NOT_BEFORE_MARGIN = dt.timedelta(seconds=1)
STOP_TIMEOUT = 5.0
# Never poll faster than this, whatever a retry's schedule says: a check that keeps failing
# (a bug) with a retry due must not turn the poll into a busy loop.
MIN_POLL_WAIT = 0.05


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class ReloadCounts:
    """Reload attempts of one database by result (``dbmtls_certificate_reloads_total``)."""

    success: int = 0
    failure: int = 0


@dataclass(frozen=True)
class Retry:
    """A failed load that will be tried again while the files stay the same."""

    fingerprint: str  # the files as they were when the load failed
    error: str
    delay: float  # the backoff that set ``due``; doubles with each failure of the same files
    due: float  # monotonic time of the next try
    valid_from: dt.datetime | None  # not yet valid: also wait until the wall clock passes this

    def wait(self, monotonic_now: float, wall_now: dt.datetime) -> float:
        """Seconds until this retry is due (0: now)."""
        left = self.due - monotonic_now
        if self.valid_from is not None:
            left = max(left, (self.valid_from - wall_now).total_seconds())
        return max(left, 0.0)

    def describe(self) -> str:
        if self.valid_from is not None:
            return f"at {self.valid_from:%Y-%m-%dT%H:%M:%S}Z, when the certificate becomes valid"
        return f"in {self.delay:g}s unless the files change first"


class Reloader:
    """Polls the files of every database's ``ClientTLS`` and reloads them when their contents change.

    It is given exactly what it needs: the TLS holders by database name and the
    expiry-warning window (and, for tests, its clocks).  It owns its reload
    counters (``counts``), which the metrics collector reads, and the pending
    retries (``retries``).
    """

    def __init__(
        self,
        tls: Mapping[str, ClientTLS],
        *,
        expiry_warning: float,
        poll_interval: float = POLL_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.tls = dict(tls)
        self.expiry_warning = dt.timedelta(seconds=expiry_warning)
        self.poll_interval = poll_interval
        self.counts = {name: ReloadCounts() for name in self.tls}
        self.retries: dict[str, Retry] = {}
        self._monotonic = monotonic
        self._wall = wall
        self._seen: dict[str, str] = {}
        self._locks = {name: asyncio.Lock() for name in self.tls}
        self._expiry_logged: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[list[str]]] = set()
        self._stop = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Take the files as last tried as the baseline, schedule retries of start-up failures, start polling."""
        for name, tls in self.enabled().items():
            fp = tls.tried_fingerprint
            if fp is None:  # never tried: take the files as they are now
                fp = await asyncio.to_thread(fingerprint, tls.files())
            self._seen[name] = fp
            if tls.material is None and tls.last_failure is not None:
                # The start-up load failed (and said so): without a retry here, a certificate that
                # is merely not valid *yet* would keep the database unready until a SIGHUP.
                retry = self._schedule(name, fp, tls.last_failure)
                LOG.info("certificate load will be retried", extra={"fields": {"db": name, "retry": retry.describe()}})
        self._task = asyncio.get_running_loop().create_task(self._poll())
        self.check_expiry()

    async def stop(self) -> None:
        self._stop.set()
        tasks = {t for t in (self._task, *self._requests) if t is not None}
        if tasks:
            # A read stuck on a hung volume must not hold up the shutdown: stop waiting for it
            # (its worker thread cannot be interrupted; what it loads is dropped).
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def enabled(self) -> dict[str, ClientTLS]:
        return {name: tls for name, tls in self.tls.items() if tls.enabled}

    # --- triggers ----------------------------------------------------------------------

    async def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_wait()):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await self.check()
            except Exception:  # a bug must not end rotation for the rest of the process's life
                LOG.exception("certificate check failed")

    def _next_wait(self) -> float:
        """The poll interval, or less when a retry is due sooner (a notBefore is met to the second)."""
        mono, wall = self._monotonic(), self._wall()
        return max(MIN_POLL_WAIT, min([self.poll_interval, *(r.wait(mono, wall) for r in self.retries.values())]))

    async def check(self) -> None:
        """One poll: load what changed, retry what is due, then warn about expiry."""
        enabled = self.enabled()
        fps = await asyncio.to_thread(lambda: {name: fingerprint(tls.files()) for name, tls in enabled.items()})
        mono, wall = self._monotonic(), self._wall()
        for name, fp in fps.items():
            retry = self.retries.get(name)
            if fp != self._seen.get(name):
                await self.reload_one(name, "file change")
            elif retry is not None and retry.wait(mono, wall) == 0:
                await self.reload_one(name, "retry")
        self.check_expiry()

    async def reload_all(self, why: str) -> list[str]:
        """Load every database's files now, changed or not; return the failures, one line each."""
        problems = []
        for name in self.enabled():
            error = await self.reload_one(name, why)
            if error is not None:
                problems.append(f"{name}: {error}")
        return problems

    def request(self, why: str) -> asyncio.Task[list[str]]:
        """``reload_all`` as a task the reloader keeps (for signal handlers, which cannot await)."""
        task = asyncio.get_running_loop().create_task(self.reload_all(why))
        self._requests.add(task)
        task.add_done_callback(self._request_done)
        return task

    def _request_done(self, task: asyncio.Task[list[str]]) -> None:
        self._requests.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            LOG.error("certificate reload failed unexpectedly", exc_info=exc)

    # --- one load ----------------------------------------------------------------------

    async def reload_one(self, name: str, why: str) -> str | None:
        """Load one database's files (in a worker thread) and swap them in; the error, or None."""
        tls = self.tls[name]
        async with self._locks[name]:
            attempt = await asyncio.to_thread(tls.attempt)
            tls.apply(attempt)
            self._seen[name] = attempt.fingerprint
            if attempt.material is not None:
                self._succeeded(name, why, attempt.material)
                return None
            error = attempt.error or ConfigError("TLS material not loaded")
            self._failed(name, why, attempt.fingerprint, error)
            return error.message

    def _succeeded(self, name: str, why: str, material: Material) -> None:
        self.retries.pop(name, None)
        self.counts[name].success += 1
        for w in material.warnings:
            LOG.warning(w, extra={"fields": {"db": name}})
        serials = ",".join(f"{c.kind}:{c.serial:x}" for c in material.certs)
        LOG.info("certificates reloaded", extra={"fields": {"db": name, "trigger": why, "serials": serials}})
        self.check_expiry()

    def _failed(self, name: str, why: str, fp: str, error: ConfigError) -> None:
        before = self.retries.get(name)
        retry = self._schedule(name, fp, error)
        self.counts[name].failure += 1
        # Once per change (or per SIGHUP / POST /reload) at ERROR; the same failure again on a
        # retry adds nothing an operator needs to read, so it goes to DEBUG.
        again = why == "retry" and before is not None and before.error == retry.error
        kept = "keeping the previous certificates" if self.tls[name].material is not None else "nothing loaded yet"
        LOG.log(
            logging.DEBUG if again else logging.ERROR,
            f"certificate reload failed, {kept}",
            extra={"fields": {"db": name, "trigger": why, "error": retry.error, "retry": retry.describe()}},
        )

    def _schedule(self, name: str, fp: str, error: ConfigError) -> Retry:
        """Record when to try ``name`` again after ``error`` with files ``fp``."""
        before = self.retries.get(name)
        delay = min(before.delay * 2, RETRY_MAX) if before is not None and before.fingerprint == fp else RETRY_INITIAL
        valid_from = error.not_before + NOT_BEFORE_MARGIN if isinstance(error, CertificateNotYetValid) else None
        retry = Retry(fp, error.message, delay, self._monotonic() + delay, valid_from)
        self.retries[name] = retry
        return retry

    # --- expiry ------------------------------------------------------------------------

    def check_expiry(self) -> None:
        """Warn about certificates close to expiry (at most hourly per certificate)."""
        now = self._wall()
        for name, tls in self.tls.items():
            m = tls.material
            if m is None:
                continue
            for c in m.certs:
                left = c.not_after - now
                if left > self.expiry_warning:
                    continue
                key = (name, f"{c.path}:{c.serial}")
                last = self._expiry_logged.get(key)
                if last is not None and self._monotonic() - last < EXPIRY_LOG_INTERVAL:
                    continue
                self._expiry_logged[key] = self._monotonic()
                fields = {"db": name, "kind": c.kind, "path": c.path, "not_after": c.not_after.isoformat()}
                if left.total_seconds() <= 0:
                    LOG.error("certificate has expired", extra={"fields": fields})
                else:
                    fields["expires_in"] = f"{left.total_seconds() / 86400:.1f}d"
                    LOG.warning("certificate expires soon", extra={"fields": fields})
