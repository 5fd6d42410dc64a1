"""When dbmtls gives freed memory back to the kernel (``dbmtls.memtrim``)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from dbmtls.memtrim import Trimmer, libc_malloc_trim


class Counters:
    def __init__(self) -> None:
        self.open = 0
        self.closed = 0
        self.trims = 0

    def __call__(self) -> tuple[int, int]:
        return self.open, self.closed

    def trim(self, pad: int) -> int:
        assert pad == 0
        self.trims += 1
        return 1

    def churn(self, n: int) -> None:
        self.closed += n


def trimmer(c: Counters) -> Trimmer:
    return Trimmer(c, trim=c.trim, after_closed=500, min_closed=100)


def test_nothing_closed_nothing_trimmed() -> None:
    c = Counters()
    t = trimmer(c)
    c.open = 3000  # many open, none closed: nothing was freed
    assert not t.check()
    assert c.trims == 0


def test_churn_trims_every_after_closed_connections() -> None:
    c = Counters()
    t = trimmer(c)
    c.open = 3000  # many stay open (a few closing among them)
    c.churn(499)
    assert not t.check()
    c.churn(1)
    assert t.check()
    c.churn(499)
    assert not t.check()  # counted from the last trim
    c.churn(1)
    assert t.check()
    assert c.trims == 2


def test_a_mass_close_trims_at_once() -> None:
    c = Counters()
    t = trimmer(c)
    c.open = 2000
    assert not t.check()
    c.open, c.closed = 900, 1100  # more than half gone
    assert t.check()
    assert not t.check()  # nothing closed since


def test_connections_that_closed_before_the_timer_saw_them_count_too() -> None:
    c = Counters()
    t = trimmer(c)
    c.open, c.closed = 0, 200  # opened and closed between two checks
    assert t.check()


def test_a_few_closes_wait_for_more() -> None:
    c = Counters()
    t = trimmer(c)
    c.open, c.closed = 0, 60  # fewer than min_closed: not worth a trim yet
    assert not t.check()
    c.open, c.closed = 300, 250  # more still open than closed since the last trim
    assert not t.check()
    c.open, c.closed = 150, 260
    assert t.check()


def test_without_malloc_trim_the_timer_does_not_start() -> None:
    c = Counters()
    t = Trimmer(c, trim=None)
    c.churn(10_000)
    assert not t.check()

    async def main() -> None:
        await t.start()
        assert t._task is None
        await t.stop()

    asyncio.run(main())


def test_the_timer_checks_the_counters() -> None:
    c = Counters()

    async def main() -> int:
        trimmed = asyncio.Event()

        def trim(pad: int) -> int:
            trimmed.set()
            return 1

        t = Trimmer(c, trim=trim, interval=0.01, after_closed=1)
        await t.start()
        c.churn(5)
        async with asyncio.timeout(5):
            await trimmed.wait()
        await t.stop()
        return t.trims

    assert asyncio.run(main()) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_glibc_malloc_trim_is_found_and_callable() -> None:
    trim = libc_malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)


def test_after_start_trims_once_and_counts_no_trim() -> None:
    c = Counters()
    t = trimmer(c)
    t.after_start()
    assert c.trims == 1  # the heap left by loading the config is given back
    assert t.trims == 0  # the counter is the timer's: closes since the last trim
    c.open, c.closed = 0, 200
    assert t.check()  # closes are still counted from the start
    Trimmer(c, trim=None).after_start()  # without malloc_trim: nothing to call, no error
    assert c.trims == 2
