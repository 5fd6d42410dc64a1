"""The Reloader on its own: given ClientTLS objects and an expiry window, nothing from the proxy.

The checks are driven by calling ``check`` as the poll does, with clocks the test
moves by hand (the reloader's and the certificate validity check's), so nothing
here waits for a timer; the poll loop itself is exercised by tests/e2e/test_rotation.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import uvloop
from cryptography import x509

from dbmtls.config.model import Config
from dbmtls.errors import ConfigError
from dbmtls.pki import issue
from dbmtls.tls import material as material_module
from dbmtls.tls import reload as reload_module
from dbmtls.tls.material import ClientTLS, Material
from dbmtls.tls.reload import NOT_BEFORE_MARGIN, RETRY_INITIAL, RETRY_MAX, Reloader
from support.certs import PKI
from support.k8s_secret import SecretDir

DAY = 86400.0
T = TypeVar("T")


@dataclass
class Logged:
    records: list[logging.LogRecord] = field(default_factory=list)

    def at(self, level: int, message: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno == level and r.getMessage() == message]

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


def _field(record: logging.LogRecord, name: str) -> str:
    return str(getattr(record, "fields", {})[name])


class _Handler(logging.Handler):
    def __init__(self, logged: Logged) -> None:
        super().__init__(logging.DEBUG)
        self.logged = logged

    def emit(self, record: logging.LogRecord) -> None:
        self.logged.records.append(record)


@pytest.fixture
def logged() -> Iterator[Logged]:
    logger = logging.getLogger("dbmtls")
    out = Logged()
    handler, level = _Handler(out), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


class Clock:
    """Both clocks the reloader reads, and the one certificate validity is judged by, moved by hand."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.now = dt.datetime.now(dt.UTC).replace(microsecond=0)  # whole seconds, like a certificate's times

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(material_module, "_now", c.wall)
    return c


def _tls(secret: SecretDir, *, load: bool = True) -> ClientTLS:
    config = Config.model_validate(
        {
            "databases": [
                {
                    "name": "pg",
                    "protocol": "postgres",
                    "listen": "127.0.0.1:5432",
                    "address": "db.example:5432",
                    "tls": {
                        "mode": "MUTUAL",
                        "clientCertificate": secret.file("tls.crt"),
                        "privateKey": secret.file("tls.key"),
                        "caCertificates": secret.file("ca.crt"),
                    },
                }
            ]
        }
    )
    tls = ClientTLS(config.databases[0])
    if load:
        tls.load()  # the start-up load, as Proxy.start does it
    return tls


def _reloader(tls: ClientTLS, clock: Clock, expiry_warning: float = 7 * DAY) -> Reloader:
    return Reloader({"pg": tls}, expiry_warning=expiry_warning, monotonic=clock.monotonic, wall=clock.wall)


def _run(reloader: Reloader, scenario: Callable[[], Awaitable[T]]) -> T:
    """Start the reloader (baseline, start-up retries), run ``scenario``, stop it."""

    async def main() -> T:
        await reloader.start()
        try:
            return await scenario()
        finally:
            await reloader.stop()

    return uvloop.run(main())


def _serial(cert_dir: Path) -> int:
    return x509.load_pem_x509_certificate((cert_dir / "tls.crt").read_bytes()).serial_number


def _client_serial(tls: ClientTLS) -> int:
    assert tls.material is not None
    return next(c.serial for c in tls.material.certs if c.kind == "client")


def _mismatched(good: Path, other: Path) -> dict[str, bytes]:
    """A certificate with the key of another one: a broken replacement."""
    return {
        "tls.crt": (good / "tls.crt").read_bytes(),
        "tls.key": (other / "tls.key").read_bytes(),
        "ca.crt": (good / "ca.crt").read_bytes(),
    }


def test_secret_symlink_swaps_are_reloaded_broken_ones_logged_once(
    pki: PKI, tmp_path: Path, clock: Clock, logged: Logged
) -> None:
    good, newer, other = (Path(issue(pki.ca, tmp_path / n, client_cn="jinsu")) for n in ("good", "newer", "other"))
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(good)
    tls = _tls(secret)
    reloader = _reloader(tls, clock)
    counts = reloader.counts["pg"]

    async def scenario() -> None:
        await reloader.check()
        assert (counts.success, counts.failure) == (0, 0)  # nothing changed
        secret.update_from(newer)  # the kubelet's atomic ..data swap: paths unchanged, contents new
        await reloader.check()
        assert _client_serial(tls) == _serial(newer)

        secret.update(_mismatched(good, other))
        await reloader.check()
        await reloader.check()  # the clock has not moved: no retry is due yet
        assert _client_serial(tls) == _serial(newer)  # the previous material stays in use
        assert (counts.success, counts.failure) == (1, 1)
        failed = logged.at(logging.ERROR, "certificate reload failed, keeping the previous certificates")
        assert len(failed) == 1
        assert "does not match" in _field(failed[0], "error")

        assert await reloader.reload_all("SIGHUP") == [f"pg: {tls.last_error}"]  # forced: tried though unchanged
        secret.update_from(other)
        await reloader.check()
        assert _client_serial(tls) == _serial(other)
        assert (counts.success, counts.failure) == (2, 2)
        assert reloader.retries == {}

    _run(reloader, scenario)


def test_a_broken_file_is_retried_with_capped_backoff_and_taken_at_once_when_fixed(
    pki: PKI, tmp_path: Path, clock: Clock, logged: Logged
) -> None:
    good, newer, other = (Path(issue(pki.ca, tmp_path / n, client_cn="jinsu")) for n in ("good", "newer", "other"))
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(good)
    tls = _tls(secret)
    reloader = _reloader(tls, clock)
    counts = reloader.counts["pg"]
    delays = []

    async def scenario() -> None:
        secret.update(_mismatched(good, other))
        await reloader.check()  # the change: first failure
        for _ in range(9):
            delay = reloader.retries["pg"].delay
            delays.append(delay)
            failures = counts.failure
            clock.advance(delay - 0.25)  # binary fractions: the sums are exact
            await reloader.check()
            assert counts.failure == failures, "retried before the backoff was over"
            clock.advance(0.25)
            await reloader.check()
            assert counts.failure == failures + 1, "not retried when the backoff was over"
        # fixed: loaded at the next poll, although the next retry is a minute away
        assert reloader.retries["pg"].delay == RETRY_MAX
        secret.update_from(newer)
        await reloader.check()
        assert _client_serial(tls) == _serial(newer)
        assert reloader.retries == {}

    _run(reloader, scenario)
    assert delays == [RETRY_INITIAL, 2, 4, 8, 16, 32, RETRY_MAX, RETRY_MAX, RETRY_MAX]
    assert (counts.success, counts.failure) == (1, 10)  # every attempt counts
    # ten failed attempts of the same files, one ERROR line; the retries are at DEBUG
    failure_lines = [r for r in logged.records if r.getMessage().startswith("certificate reload failed")]
    assert [r.levelno for r in failure_lines] == [logging.ERROR] + [logging.DEBUG] * 9
    assert "in 1s unless the files change first" in _field(failure_lines[0], "retry")
    assert _field(logged.at(logging.INFO, "certificates reloaded")[-1], "trigger") == "file change"


def test_a_failure_that_heals_without_a_file_change_is_picked_up_by_a_retry(
    pki: PKI, tmp_path: Path, clock: Clock, logged: Logged, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E.g. an I/O error: the files' contents never changed, so only a retry can load them."""
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(Path(pki.client.dir))
    tls = _tls(secret, load=False)
    real_build = tls.build
    fail = [True]

    def flaky_build() -> Material:
        if fail[0]:
            raise ConfigError("cannot read tls.key: Input/output error")
        return real_build()

    monkeypatch.setattr(tls, "build", flaky_build)
    with pytest.raises(ConfigError):
        tls.load()
    reloader = _reloader(tls, clock)

    async def scenario() -> None:
        assert reloader.retries["pg"].error == "cannot read tls.key: Input/output error"
        fail[0] = False
        await reloader.check()
        assert tls.material is None  # not due yet, and the files did not change
        clock.advance(RETRY_INITIAL)
        await reloader.check()
        assert tls.material is not None

    _run(reloader, scenario)
    assert _field(logged.at(logging.INFO, "certificates reloaded")[0], "trigger") == "retry"


def test_a_not_yet_valid_certificate_at_start_is_loaded_at_its_not_before(
    pki: PKI, tmp_path: Path, clock: Clock, logged: Logged
) -> None:
    """The issue's case: issued at pod start by a CA whose clock is ahead; no SIGHUP ever comes."""
    not_before = clock.now + dt.timedelta(minutes=10)
    future = Path(issue(pki.ca, tmp_path / "future", client_cn="jinsu", not_before=not_before))
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(future)
    tls = _tls(secret, load=False)
    with pytest.raises(ConfigError, match="is not valid before"):
        tls.load()  # the start-up load
    reloader = _reloader(tls, clock)
    counts = reloader.counts["pg"]

    async def scenario() -> None:
        retry = reloader.retries["pg"]
        assert retry.valid_from == not_before + NOT_BEFORE_MARGIN
        # the backoff alone would have retried long ago: the notBefore decides
        clock.advance(599)
        await reloader.check()
        assert (tls.material, counts.failure) == (None, 0)
        clock.advance(1 + NOT_BEFORE_MARGIN.total_seconds() - 0.25)
        await reloader.check()
        assert (tls.material, counts.failure) == (None, 0)
        clock.advance(0.25)
        await reloader.check()
        assert tls.material is not None and _client_serial(tls) == _serial(future)

    _run(reloader, scenario)
    assert counts.success == 1
    (scheduled,) = logged.at(logging.INFO, "certificate load will be retried")
    assert f"at {not_before + NOT_BEFORE_MARGIN:%Y-%m-%dT%H:%M:%S}Z" in _field(scheduled, "retry")
    assert _field(logged.at(logging.INFO, "certificates reloaded")[0], "trigger") == "retry"


def test_a_wall_clock_corrected_forward_loads_a_not_yet_valid_certificate_at_once(
    pki: PKI, tmp_path: Path, clock: Clock
) -> None:
    """The skewed clock is ours, NTP fixes it: the notBefore is met now, not ten monotonic minutes later."""
    future = Path(issue(pki.ca, tmp_path / "future", client_cn="jinsu", not_before=clock.now + dt.timedelta(hours=1)))
    good = Path(issue(pki.ca, tmp_path / "good", client_cn="jinsu"))
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(good)
    tls = _tls(secret)
    reloader = _reloader(tls, clock)

    async def scenario() -> None:
        secret.update_from(future)  # a replacement that is not valid yet: the good one stays
        await reloader.check()
        assert _client_serial(tls) == _serial(good)
        clock.now += dt.timedelta(hours=1, seconds=2)  # the wall clock jumps; monotonic time does not
        clock.mono += RETRY_INITIAL
        await reloader.check()
        assert _client_serial(tls) == _serial(future)

    _run(reloader, scenario)


def test_the_load_runs_in_a_worker_thread_while_the_loop_keeps_running(
    pki: PKI, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading blocks here until the event loop itself releases it: that can only happen if the loop is free.

    Moved back onto the loop, the load would wait out its 10 s and fail, and it would
    run in the loop's own thread: both are asserted.
    """
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(Path(pki.client.dir))
    tls = _tls(secret)
    reloader = _reloader(tls, clock)
    real_build = tls.build
    threads: list[int] = []
    release = threading.Event()

    async def scenario() -> tuple[int, list[str]]:
        loop = asyncio.get_running_loop()
        entered = asyncio.Event()

        def blocking_build() -> Material:
            threads.append(threading.get_ident())
            loop.call_soon_threadsafe(entered.set)
            if not release.wait(timeout=10):
                raise ConfigError("the event loop was blocked while the certificates were loading")
            return real_build()

        monkeypatch.setattr(tls, "build", blocking_build)
        reload = asyncio.create_task(reloader.reload_all("SIGHUP"))
        async with asyncio.timeout(10):  # a safety net, not a synchronisation
            await entered.wait()  # the load is in progress ...
        release.set()  # ... and the loop runs this line
        return threading.get_ident(), await reload

    loop_thread, problems = _run(reloader, scenario)
    assert problems == []
    assert threads and threads[0] != loop_thread


def test_stop_does_not_wait_for_a_load_stuck_on_a_hung_volume(
    pki: PKI, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reload_module, "STOP_TIMEOUT", 0.1)
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(Path(pki.client.dir))
    tls = _tls(secret)
    first = tls.material
    reloader = _reloader(tls, clock)
    release = threading.Event()

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        entered = asyncio.Event()

        def stuck_build() -> Material:
            loop.call_soon_threadsafe(entered.set)
            release.wait(timeout=30)
            raise ConfigError("cannot read tls.crt: Input/output error")

        monkeypatch.setattr(tls, "build", stuck_build)
        await reloader.start()
        reload = reloader.request("SIGHUP")
        await entered.wait()
        await reloader.stop()  # returns although the read has not
        stopped_while_stuck = not release.is_set()
        release.set()  # let the worker thread end, so that the loop can close
        return stopped_while_stuck and reload.cancelled()

    try:
        assert uvloop.run(main())
    finally:
        release.set()
    assert tls.material is first


def test_the_expiry_window_is_the_one_passed_in(pki: PKI, tmp_path: Path, clock: Clock, logged: Logged) -> None:
    soon = Path(issue(pki.ca, tmp_path / "soon", client_cn="jinsu", not_after=clock.now + dt.timedelta(days=3)))
    secret = SecretDir(tmp_path / "secret")
    secret.update_from(soon)
    tls = _tls(secret)

    async def nothing() -> None:
        return None

    _run(_reloader(tls, clock, expiry_warning=2 * DAY), nothing)
    assert "certificate expires soon" not in logged.messages()
    _run(_reloader(tls, clock, expiry_warning=4 * DAY), nothing)
    assert logged.messages().count("certificate expires soon") == 1
