"""Giving freed memory back to the kernel after connections close (glibc's ``malloc_trim``).

Each TLS connection allocates about 300 KiB through malloc: uvloop's 256 KiB TLS read
buffer and some 40 KiB of OpenSSL state (more once it carried large values: the pages of
the read buffer it touched and OpenSSL's BIO buffers keep their high-water mark).  When
connections close, glibc keeps that memory in its heap for reuse and gives back to the
kernel only what is free at the top of the heap.  So after many connections closed at
once, and slowly under steady churn as the heap fragments, RSS stays at its high-water
mark although the memory is free: ``bench/memtrace.py`` shows 10 MB in use and 80 to
130 MB free in the heap after Redis churn.  ``malloc_trim(0)`` returns the free pages
inside the heap as well; it takes milliseconds (about 3 ms for a 100 MB heap during
churn, 60 ms right after 4,000 connections closed at once).

A timer reads the connection counters every ``CHECK_INTERVAL`` seconds and trims when
enough memory was freed since the last trim: ``AFTER_CLOSED`` connections closed (churn), or
``MIN_CLOSED`` closed and no more than that are still open (most of what was open is gone).
While no connection closes, nothing happens.  Without glibc (musl, macOS) there is no
``malloc_trim`` and the timer does not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import sys
import time
from collections.abc import Callable

from dbmtls.logs import LOG

CHECK_INTERVAL = 5.0
AFTER_CLOSED = 500
MIN_CLOSED = 100

# (connections open now, connections closed so far): the proxy's own counters
Counts = Callable[[], tuple[int, int]]


def libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


def _rss_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Trimmer:
    def __init__(
        self,
        counts: Counts,
        *,
        trim: Callable[[int], int] | None = None,
        interval: float = CHECK_INTERVAL,
        after_closed: int = AFTER_CLOSED,
        min_closed: int = MIN_CLOSED,
    ) -> None:
        self._counts = counts
        self._trim = trim
        self.interval = interval
        self.after_closed = after_closed
        self.min_closed = min_closed
        self.trims = 0
        self._closed_at_trim = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def check(self) -> bool:
        """Look at the counters once; trim if enough was freed since the last trim.  True if it trimmed."""
        open_now, closed = self._counts()
        freed = closed - self._closed_at_trim
        mostly_closed = freed >= self.min_closed and open_now <= freed
        if self._trim is None or freed <= 0 or (freed < self.after_closed and not mostly_closed):
            return False
        before, started = _rss_kib(), time.perf_counter()
        self._trim(0)
        took, after = time.perf_counter() - started, _rss_kib()
        self.trims += 1
        self._closed_at_trim = closed
        if before is not None and after is not None:
            LOG.debug(
                "memory trimmed",
                extra={
                    "fields": {
                        "rss_before": f"{before / 1024:.1f}MiB",
                        "rss_after": f"{after / 1024:.1f}MiB",
                        "took": f"{took * 1000:.1f}ms",
                        "open_connections": open_now,
                    }
                },
            )
        return True

    def after_start(self) -> None:
        """Once, when the process is up: collect the garbage that loading the configuration left
        (YAML documents, the config's validation, certificate parsing, import-time cycles) and give
        the heap's free pages back; nothing of it is used again."""
        if self._trim is None:
            return
        before = _rss_kib()
        gc.collect()
        self._trim(0)
        after = _rss_kib()
        if before is not None and after is not None:
            LOG.debug(
                "memory trimmed after start",
                extra={"fields": {"rss_before": f"{before / 1024:.1f}MiB", "rss_after": f"{after / 1024:.1f}MiB"}},
            )

    async def start(self) -> None:
        if self._trim is None:
            return
        _open, self._closed_at_trim = self._counts()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception:  # a bug here must not take the timer down for the process's life
                LOG.exception("memory trim failed")
