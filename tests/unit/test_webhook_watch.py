"""The DestinationRule watcher against a fake API server (support/fake_kube.py says why it is fake).

Each test runs the fake and the watcher on one event loop and waits for *state*: the
watcher's ``wait_for`` (checked after each change it makes) or the fake's request log;
a deadline turns a hang into a failure, nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dbmtls.k8s import watch as watch_mod
from dbmtls.k8s.watch import DestinationRuleWatcher
from support.fake_kube import FakeKube, rule

DEADLINE = 10.0


def _run(test: Callable[[FakeKube], Awaitable[None]], fake: FakeKube | None = None) -> None:
    async def main() -> None:
        server = await (fake or FakeKube()).start()
        try:
            await test(server)
        finally:
            await server.stop()

    asyncio.run(main())


def _watcher(fake: FakeKube, **kwargs: Any) -> DestinationRuleWatcher:
    kwargs = {"backoff_initial": 0.01, "backoff_max": 0.05, **kwargs}
    return DestinationRuleWatcher.from_server(fake.url, **kwargs)


@contextlib.asynccontextmanager
async def _watching(fake: FakeKube, **kwargs: Any) -> AsyncIterator[DestinationRuleWatcher]:
    """A started watcher, stopped when the block ends (whatever the test's assertions did)."""
    w = _watcher(fake, **kwargs)
    w.start()
    try:
        yield w
    finally:
        await w.stop()


async def _until(watcher: DestinationRuleWatcher, predicate: Callable[[DestinationRuleWatcher], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        await watcher.wait_for(predicate)


def _keys(w: DestinationRuleWatcher) -> list[tuple[str, str]]:
    return [(r["metadata"]["namespace"], r["metadata"]["name"]) for r in w.snapshot()]


def _hosts(w: DestinationRuleWatcher) -> dict[str, str]:
    return {r["metadata"]["name"]: r["spec"]["host"] for r in w.snapshot()}


def test_list_then_watch_follows_added_modified_deleted() -> None:
    async def test(fake: FakeKube) -> None:
        fake.put(rule("shop", "orders-db", "orders-db.shop.svc.cluster.local"))
        fake.put(rule("cache", "redis", "redis-master"))
        async with _watching(fake) as w:
            await _until(w, lambda w: w.synced)
            assert _keys(w) == [("cache", "redis"), ("shop", "orders-db")]  # sorted by (namespace, name)
            first = w.snapshot()[1]
            assert first["apiVersion"] == "networking.istio.io/v1"
            assert first["kind"] == "DestinationRule"
            assert "managedFields" not in first["metadata"]  # dropped: bookkeeping only
            assert first["spec"]["trafficPolicy"]["tls"]["credentialName"] == "orders-db-client"
            assert w.version == "v1"
            assert w.resource_version == str(fake.rv)

            fake.put(rule("billing", "ledger", "ledger-pg"))
            await _until(w, lambda w: ("billing", "ledger") in w.rules)
            fake.put(rule("cache", "redis", "redis-replica"))
            await _until(w, lambda w: _hosts(w).get("redis") == "redis-replica")
            fake.delete("shop", "orders-db")
            await _until(w, lambda w: ("shop", "orders-db") not in w.rules)
            assert _keys(w) == [("billing", "ledger"), ("cache", "redis")]
            assert w.resource_version == str(fake.rv)
            assert w.lists == 1 and w.errors == 0  # all of it through one watch, no relist
            watches = fake.watches()
            assert watches[0].params["resourceVersion"] == "1002"  # from the list's version
            assert watches[0].path == "/apis/networking.istio.io/v1/destinationrules"  # all namespaces

    _run(test)


def test_snapshot_is_stable_until_a_change() -> None:
    async def test(fake: FakeKube) -> None:
        fake.put(rule("a", "one", "one"))
        async with _watching(fake) as w:
            await _until(w, lambda w: w.synced)
            before = w.snapshot()
            assert w.snapshot() is before  # no copy per request
            fake.put(rule("a", "two", "two"))
            await _until(w, lambda w: len(w.rules) == 2)
            after = w.snapshot()
            assert after is not before
            assert len(before) == 1  # a snapshot already handed out does not change under its reader

    _run(test)


@pytest.mark.parametrize(("served", "expected"), [(("v1beta1", "v1alpha3"), "v1beta1"), (("v1alpha3",), "v1alpha3")])
def test_falls_back_to_an_older_version_when_v1_is_not_served(served: tuple[str, ...], expected: str) -> None:
    async def test(fake: FakeKube) -> None:
        fake.put(rule("shop", "orders-db", "orders-db"))
        async with _watching(fake) as w:
            await _until(w, lambda w: w.synced)
            assert w.version == expected
            assert w.snapshot()[0]["apiVersion"] == f"networking.istio.io/{expected}"
            tried = [r.path.split("/")[3] for r in fake.lists()]
            assert tried == ["v1", "v1beta1", "v1alpha3"][: tried.index(expected) + 1]
            fake.put(rule("shop", "ledger", "ledger"))
            await _until(w, lambda w: ("shop", "ledger") in w.rules)
            assert fake.watches()[0].path == f"/apis/networking.istio.io/{expected}/destinationrules"

    _run(test, FakeKube(served=served))


def test_no_version_served_means_no_rules_and_ready() -> None:
    async def test(fake: FakeKube) -> None:
        async with _watching(fake) as w:
            await _until(w, lambda w: w.synced)
            assert w.snapshot() == ()
            assert w.problem is not None and "no version" in w.problem
            # it keeps asking: Istio may be installed later
            async with asyncio.timeout(DEADLINE):
                await fake.wait_requests(lambda: len(fake.lists()) >= 6)

    _run(test, FakeKube(served=()))


def test_list_items_without_apiversion_and_kind_get_them() -> None:
    async def test(fake: FakeKube) -> None:
        fake.put(rule("shop", "orders-db", "orders-db"))
        async with _watching(fake) as w:
            await _until(w, lambda w: w.synced)
            doc = w.snapshot()[0]
            assert (doc["apiVersion"], doc["kind"]) == ("networking.istio.io/v1", "DestinationRule")

    _run(test, FakeKube(items_with_kind=False))


def test_a_chunked_list_is_read_to_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_mod, "LIST_CHUNK", 3)

    async def test(fake: FakeKube) -> None:
        for i in range(8):
            fake.put(rule("ns", f"r{i}", f"host{i}"))
        async with _watching(fake) as w:
            await _until(w, lambda w: w.synced)
            assert len(w.rules) == 8
            pages = fake.lists()
            assert [p.params.get("continue") for p in pages] == [None, "3", "6"]
            assert all(p.params["limit"] == "3" for p in pages)

    _run(test)


def test_410_gone_relists_at_once_and_drops_rules_deleted_meanwhile() -> None:
    async def test(fake: FakeKube) -> None:
        fake.put(rule("shop", "orders-db", "orders-db"))
        fake.put(rule("shop", "ledger", "ledger"))
        async with _watching(
            fake, backoff_initial=30.0, backoff_max=30.0
        ) as w:  # a backoff here would time the test out
            await _until(w, lambda w: w.synced)
            async with asyncio.timeout(DEADLINE):
                await fake.wait_requests(lambda: len(fake.watches()) == 1)
            # Changes the watcher never sees as events: its version is compacted away meanwhile.
            fake.objects.pop(("shop", "orders-db"))
            fake.rv += 5
            fake.compact()
            fake.drop_watches(clean=True)  # lightkube watches again from its version: 410
            await _until(w, lambda w: w.lists == 2)
            assert _keys(w) == [("shop", "ledger")]
            assert w.errors == 1 and w.problem is None
            async with asyncio.timeout(DEADLINE):
                await fake.wait_requests(lambda: len(fake.watches()) == 3)
            # the first watch, its retry from the compacted version (410), the one after the list
            assert [r.params["resourceVersion"] for r in fake.watches()] == ["1002", "1002", str(fake.rv)]

    _run(test)


def test_a_broken_connection_relists_with_backoff_and_goes_on() -> None:
    async def test(fake: FakeKube) -> None:
        fake.put(rule("shop", "orders-db", "orders-db"))
        async with _watching(fake) as w:
            await _until(w, lambda w: w.synced)
            async with asyncio.timeout(DEADLINE):
                await fake.wait_requests(lambda: len(fake.watches()) == 1)
            fake.drop_watches()  # cut mid-stream, no final chunk
            await _until(w, lambda w: w.lists == 2)
            assert w.errors == 1
            fake.put(rule("shop", "ledger", "ledger"))
            await _until(w, lambda w: ("shop", "ledger") in w.rules)

    _run(test)


def test_forbidden_is_explained_and_retried_until_allowed(caplog: pytest.LogCaptureFixture) -> None:
    async def test(fake: FakeKube) -> None:
        fake.put(rule("shop", "orders-db", "orders-db"))
        async with _watching(fake) as w:
            await _until(w, lambda w: w.errors >= 2)
            assert not w.synced
            assert w.problem is not None and w.problem.startswith("403 Forbidden")
            errors = [getattr(r, "fields", {}).get("error", "") for r in caplog.records]
            assert any("needs get, list and watch on destinationrules.networking.istio.io" in e for e in errors)
            fake.forbidden = False  # the ClusterRole is bound
            await _until(w, lambda w: w.synced)
            assert _keys(w) == [("shop", "orders-db")]

    _run(test, FakeKube(forbidden=True))


def test_a_quiet_watch_is_restarted_from_the_last_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # A connection that died silently looks like a quiet one: after timeoutSeconds plus the
    # margin without an event the watcher watches again, from its version, without a relist.
    monkeypatch.setattr(watch_mod, "WATCH_MARGIN", 0.05)

    async def test(fake: FakeKube) -> None:
        fake.put(rule("shop", "orders-db", "orders-db"))
        fake.hang_watches = True  # the fake never ends a watch on its own: as a dead connection
        async with _watching(fake, watch_timeout=1) as w:
            await _until(w, lambda w: w.synced)
            async with asyncio.timeout(DEADLINE):
                await fake.wait_requests(lambda: len(fake.watches()) >= 2)
            assert w.lists == 1 and w.errors == 0
            assert {r.params["resourceVersion"] for r in fake.watches()} == {str(fake.rv)}
            assert fake.watches()[0].params["timeoutSeconds"] == "1"

    _run(test)
