"""Certificate and CA rotation without restarts.

Triggers, all leading to the same check:

* a poll every second (``POLL_INTERVAL``) that fingerprints the files by their
  *contents*, followed through symlinks.  Content, not paths or mtimes, is what
  catches Kubernetes Secret updates (an atomic swap of the ``..data`` symlink:
  the file path never changes, its target does), editors that write a new file
  and rename it over the old one, and files that appear later.  A poll reads a
  few small PEM files; it also drives the expiry warnings.  The kubelet itself
  takes up to a minute or more to project an updated Secret into the pod, so a
  second more is not noticeable; and polling needs no inotify (no watcher
  thread, no watch limits, the same on every file system);
* SIGHUP and ``POST /reload`` (``force``: retry even unchanged files).

Only a changed fingerprint leads to a reload attempt, so a broken replacement is
reported once, not on every poll.  ``ClientTLS.load`` validates everything before
it swaps anything in: a bad or half-written file keeps the old material, logs
what is wrong, and bumps the failure counter; the next change is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

from dbmtls.errors import ConfigError
from dbmtls.logs import LOG
from dbmtls.tls.material import ClientTLS

POLL_INTERVAL = 1.0
EXPIRY_LOG_INTERVAL = 3600.0


def fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode() + b"\0")
        try:
            with open(p, "rb") as f:
                h.update(f.read())
        except OSError as exc:
            h.update(f"<{exc.errno}>".encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class ReloadCounts:
    """Reload attempts of one database by result (``dbmtls_certificate_reloads_total``)."""

    success: int = 0
    failure: int = 0


class Reloader:
    """Polls the files of every database's ``ClientTLS`` and reloads them when their contents change.

    It is given exactly what it needs: the TLS holders by database name and the
    expiry-warning window.  It owns its reload counters (``counts``), which the
    metrics collector reads.
    """

    def __init__(
        self, tls: Mapping[str, ClientTLS], *, expiry_warning: float, poll_interval: float = POLL_INTERVAL
    ) -> None:
        self.tls = dict(tls)
        self.expiry_warning = dt.timedelta(seconds=expiry_warning)
        self.poll_interval = poll_interval
        self.counts = {name: ReloadCounts() for name in self.tls}
        self._seen: dict[str, str] = {}
        self._expiry_logged: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Take the files as they are now as the baseline (the material was just loaded) and start polling."""
        for name, tls in self.tls.items():
            self._seen[name] = fingerprint(tls.files())
        self._task = asyncio.get_running_loop().create_task(self._poll())
        self.check_expiry()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                self.reload_all("file change", force=False)
                self.check_expiry()
            except Exception:  # a bug must not end rotation for the rest of the process's life
                LOG.exception("certificate check failed")

    def reload_all(self, why: str, *, force: bool = True) -> None:
        for name in self.tls:
            self.reload_one(name, why, force=force)

    def reload_one(self, name: str, why: str, *, force: bool) -> bool | None:
        """Try to reload one database; None when nothing changed."""
        tls = self.tls[name]
        if not tls.enabled:
            return None
        fp = fingerprint(tls.files())
        if not force and fp == self._seen.get(name):
            return None  # unchanged (if broken, it was reported when it changed)
        self._seen[name] = fp
        try:
            material = tls.load()
        except ConfigError as exc:
            self.counts[name].failure += 1
            kept = "keeping the previous certificates" if tls.material is not None else "nothing loaded yet"
            LOG.error(
                f"certificate reload failed, {kept}",
                extra={"fields": {"db": name, "trigger": why, "error": exc.message}},
            )
            return False
        self.counts[name].success += 1
        for w in material.warnings:
            LOG.warning(w, extra={"fields": {"db": name}})
        serials = ",".join(f"{c.kind}:{c.serial:x}" for c in material.certs)
        LOG.info("certificates reloaded", extra={"fields": {"db": name, "trigger": why, "serials": serials}})
        self.check_expiry()
        return True

    def check_expiry(self) -> None:
        """Warn about certificates close to expiry (at most hourly per certificate)."""
        now = dt.datetime.now(dt.UTC)
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
                if last is not None and time.monotonic() - last < EXPIRY_LOG_INTERVAL:
                    continue
                self._expiry_logged[key] = time.monotonic()
                fields = {"db": name, "kind": c.kind, "path": c.path, "not_after": c.not_after.isoformat()}
                if left.total_seconds() <= 0:
                    LOG.error("certificate has expired", extra={"fields": fields})
                else:
                    fields["expires_in"] = f"{left.total_seconds() / 86400:.1f}d"
                    LOG.warning("certificate expires soon", extra={"fields": fields})
