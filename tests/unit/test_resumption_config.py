"""``tls.sessionResumption`` and ``preconnect``: defaults, validation messages, and the contexts
they make (docs/tls-resumption.md).  What they do on the wire is in tests/e2e/test_resumption.py."""

from __future__ import annotations

import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dbmtls.config.load import load_config
from dbmtls.config.model import Config, TLSSettings
from dbmtls.errors import ConfigError
from dbmtls.tls.context import build_context
from dbmtls.tls.resume import PER_NAME, SessionCache, cache_of
from support.certs import PKI


def db(**over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": "cache",
        "protocol": "redis",
        "listen": "127.0.0.1:16379",
        "address": "redis.example:6379",
        "tls": {"mode": "SIMPLE"},
    }
    out.update(over)
    return out


def load(tmp: Path, *dbs: dict[str, Any]) -> Config:
    p = tmp / "dbmtls.yaml"
    p.write_text(yaml.safe_dump({"databases": list(dbs)}))
    return load_config([p])


def error(tmp: Path, *dbs: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp, *dbs)
    return info.value


def test_defaults_resumption_on_preconnect_off(tmp_path: Path) -> None:
    d = load(tmp_path, db()).databases[0]
    assert d.tls.sessionResumption is True
    assert (d.preconnect.connections, d.preconnect.maxIdle) == (0, 30.0)


def test_preconnect_values(tmp_path: Path) -> None:
    d = load(tmp_path, db(preconnect={"connections": 4, "maxIdle": "20s"})).databases[0]
    assert (d.preconnect.connections, d.preconnect.maxIdle) == (4, 20.0)


@pytest.mark.parametrize(
    ("over", "where", "says"),
    [
        ({"preconnect": {"connections": -1}}, "preconnect.connections", "greater than or equal to 0"),
        ({"preconnect": {"connections": 65}}, "preconnect.connections", "less than or equal to 64"),
        ({"preconnect": {"connections": 2, "maxIdle": "0s"}}, "preconnect.maxIdle", "positive"),
        ({"preconnect": {"connections": 2, "maxidle": "5s"}}, "preconnect.maxidle", "did you mean maxIdle"),
        ({"tls": {"mode": "SIMPLE", "sessionResumption": "maybe"}}, "tls.sessionResumption", "boolean"),
        (
            {"protocol": "mysql", "address": "db:3306", "preconnect": {"connections": 2}},
            "preconnect.connections",
            "preconnect applies to redis, mongodb, tcp only",
        ),
        (
            {"protocol": "postgres", "address": "db:5432", "preconnect": {"connections": 2}},
            "preconnect.connections",
            "postgres chooses the identity",
        ),
        ({"tls": {"mode": "DISABLE"}, "preconnect": {"connections": 2}}, "preconnect.connections", "DISABLE"),
    ],
)
def test_invalid_values_are_named(tmp_path: Path, over: dict[str, Any], where: str, says: str) -> None:
    err = error(tmp_path, db(**over))
    assert where in (err.path or ""), err.detail
    assert says in err.detail


def test_contexts_carry_a_cache_only_when_resumption_is_on(pki: PKI) -> None:
    on = build_context(TLSSettings(caCertificates=pki.ca_cert), ("localhost",), "localhost", None)
    off = build_context(
        TLSSettings(caCertificates=pki.ca_cert, sessionResumption=False), ("localhost",), "localhost", None
    )
    assert isinstance(cache_of(on), SessionCache)
    assert cache_of(off) is None
    # each context (identity) has its own cache: nothing is shared between identities
    other = build_context(TLSSettings(caCertificates=pki.ca_cert), ("localhost",), "localhost", None)
    assert cache_of(other) is not cache_of(on)


class _Session:
    """Stands for an ssl.SSLSession (those only come from a handshake)."""

    def __init__(self, n: int, *, expired: bool = False) -> None:
        self.n = n
        self.time = 0 if expired else sys.maxsize // 4
        self.timeout = 1


def test_the_cache_is_bounded_per_name_single_use_and_backs_off() -> None:
    cache = SessionCache(reuse=False)
    sessions: list[Any] = [_Session(i) for i in range(PER_NAME + 2)]
    for s in sessions:
        cache.put("a", s)
    assert len(cache) == PER_NAME  # the oldest went
    assert cache.take("b") is None  # per name
    taken = cache.take("a")
    assert taken is sessions[-1]  # the newest
    assert cache.take("a") is sessions[-2]  # taken out: single use
    cache.put("a", _Session(99, expired=True))  # type: ignore[arg-type]
    assert cache.take("a") is sessions[-3]  # an expired one is dropped, not offered
    cache.refused("a")
    assert cache.backing_off("a") and len(cache) == 0
    cache.put("a", _Session(100))  # type: ignore[arg-type]
    assert cache.take("a") is None  # nothing offered during the backoff


def test_a_resuming_context_is_still_an_sslcontext(pki: PKI) -> None:
    ctx = build_context(TLSSettings(caCertificates=pki.ca_cert), ("localhost",), "localhost", None)
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED


def test_overrides_may_set_preconnect_and_session_resumption(tmp_path: Path) -> None:
    """A database from a DestinationRule has no preconnect of its own: an override gives it one."""
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump({"databases": [db()]}))
    o = tmp_path / "o.yaml"
    o.write_text("overrides: {cache: {preconnect: {connections: 3}, tls: {sessionResumption: false}}}\n")
    d = load_config([a, o]).databases[0]
    assert d.preconnect.connections == 3
    assert d.tls.sessionResumption is False


def test_with_reuse_a_session_stays_until_it_is_not_accepted() -> None:
    """CPython before 3.12.8 leaks a copy on every read of SSLObject.session: there the cache
    reuses a session and asks for a new one only when it has none (tls.resume.GETTER_LEAKS)."""
    cache = SessionCache(reuse=True)
    assert cache.wants("a")
    s: Any = _Session(1)
    cache.put("a", s)
    assert not cache.wants("a")  # no read of the getter while a session is there
    assert [cache.take("a"), cache.take("a")] == [s, s]  # offered again and again
    assert cache.wants("b")  # per name
    cache.not_resumed("a", s)  # the server did a full handshake: it is stale
    assert cache.take("a") is None and cache.wants("a")
    expired: Any = _Session(2, expired=True)
    cache.put("a", expired)
    assert cache.wants("a") and cache.take("a") is None
    cache.put("a", s)
    cache.refused("a")
    assert not cache.wants("a") and cache.take("a") is None  # backing off: neither read nor offered


def test_the_getter_leak_is_known_for_this_python() -> None:
    from dbmtls.tls.resume import GETTER_LEAKS

    assert (sys.version_info < (3, 12, 8) or (3, 13) <= sys.version_info < (3, 13, 1)) == GETTER_LEAKS


def test_a_server_that_gives_no_session_is_not_asked_again_for_a_while() -> None:
    """PostgreSQL issues no tickets: reading the session of each of its connections would only
    leak (GETTER_LEAKS); after one that gave none, the next ones are not read."""
    for reuse in (True, False):
        cache = SessionCache(reuse=reuse)
        assert cache.wants("pg")
        cache.none_given("pg")
        assert not cache.wants("pg")
        assert cache.wants("other")
