"""Certificate and CA rotation without restarts.

Triggers, any of which leads to the same check:

* inotify on the *directories* holding the files (watchfiles).  Watching the
  directory, not the file, is what catches Kubernetes Secret updates (an atomic
  swap of the ``..data`` symlink: the file path never changes, its target does)
  and editors that write a new file and rename it over the old one;
* SIGHUP and ``POST /reload`` (``force``: retry even unchanged files);
* a slow poll as a safety net where inotify is not available (some network and
  overlay file systems), which also drives the expiry warnings.

The check fingerprints the files (their contents, followed through symlinks);
only a change leads to a reload attempt, so a broken replacement is reported
once, not on every poll.  ``ClientTLS.load`` validates everything before it
swaps anything in: a bad or half-written file keeps the old material, logs what
is wrong, and bumps the failure metric; the next change is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import time
from typing import TYPE_CHECKING

from dbmtls.errors import ConfigError
from dbmtls.logs import LOG
from dbmtls.proxy.runtime import DatabaseRuntime

if TYPE_CHECKING:
    from dbmtls.proxy.server import Proxy

POLL_INTERVAL = 10.0
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


class Reloader:
    def __init__(self, proxy: Proxy, *, poll_interval: float = POLL_INTERVAL) -> None:
        self.proxy = proxy
        self.poll_interval = poll_interval
        self._seen: dict[str, str] = {}
        self._expiry_logged: dict[tuple[str, str], float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        for rt in proxy.runtimes.values():
            self._seen[rt.name] = fingerprint(rt.tls.files())

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        existing = self._watched_dirs()
        if existing:
            self._tasks.append(loop.create_task(self._watch(existing)))
        self._tasks.append(loop.create_task(self._poll()))
        self.check_expiry()

    def _watched_dirs(self) -> list[str]:
        files = [p for rt in self.proxy.runtimes.values() for p in rt.tls.files()]
        dirs = sorted({os.path.dirname(os.path.abspath(p)) for p in files})
        return [d for d in dirs if os.path.isdir(d)]

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _watch(self, dirs: list[str]) -> None:
        from watchfiles import awatch

        try:
            # rust_timeout bounds how long stopping the watcher thread takes at shutdown
            changes = awatch(*dirs, stop_event=self._stop, debounce=200, step=50, watch_filter=None, rust_timeout=500)
            async for _changes in changes:
                self.reload_all("file change", force=False)
        except Exception as exc:  # inotify limits, vanished directories: the poll still runs
            LOG.warning("file watching stopped; polling only", extra={"fields": {"error": str(exc)}})

    async def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._stop.wait()
            self.reload_all("poll", force=False)
            self.check_expiry()

    def reload_all(self, why: str, *, force: bool = True) -> None:
        for rt in self.proxy.runtimes.values():
            self.reload_one(rt, why, force=force)

    def reload_one(self, rt: DatabaseRuntime, why: str, *, force: bool) -> bool | None:
        """Try to reload one database; None when nothing changed."""
        if not rt.tls.enabled:
            return None
        fp = fingerprint(rt.tls.files())
        if not force and fp == self._seen.get(rt.name):
            return None  # unchanged (if broken, it was reported when it changed)
        self._seen[rt.name] = fp
        try:
            material = rt.tls.load()
        except ConfigError as exc:
            rt.stats.reloads_failed += 1
            kept = "keeping the previous certificates" if rt.tls.material is not None else "nothing loaded yet"
            LOG.error(
                f"certificate reload failed, {kept}",
                extra={"fields": {"db": rt.name, "trigger": why, "error": exc.message}},
            )
            return False
        rt.stats.reloads_ok += 1
        for w in material.warnings:
            LOG.warning(w, extra={"fields": {"db": rt.name}})
        serials = ",".join(f"{c.kind}:{c.serial:x}" for c in material.certs)
        LOG.info("certificates reloaded", extra={"fields": {"db": rt.name, "trigger": why, "serials": serials}})
        self.check_expiry()
        return True

    def check_expiry(self) -> None:
        """Warn about certificates close to expiry (at most hourly per certificate)."""
        now = dt.datetime.now(dt.UTC)
        window = dt.timedelta(seconds=self.proxy.config.certificateExpiryWarning)
        for rt in self.proxy.runtimes.values():
            m = rt.tls.material
            if m is None:
                continue
            for c in m.certs:
                left = c.not_after - now
                if left > window:
                    continue
                key = (rt.name, f"{c.path}:{c.serial}")
                last = self._expiry_logged.get(key)
                if last is not None and time.monotonic() - last < EXPIRY_LOG_INTERVAL:
                    continue
                self._expiry_logged[key] = time.monotonic()
                fields = {"db": rt.name, "kind": c.kind, "path": c.path, "not_after": c.not_after.isoformat()}
                if left.total_seconds() <= 0:
                    LOG.error("certificate has expired", extra={"fields": fields})
                else:
                    fields["expires_in"] = f"{left.total_seconds() / 86400:.1f}d"
                    LOG.warning("certificate expires soon", extra={"fields": fields})
