"""The protocol registry: the one place a protocol is declared, and what is derived from it."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path

import pytest

from dbmtls import protocols
from dbmtls.config.model import Config
from dbmtls.errors import CONNECTION_FAILURES, ConfigError, Reason
from dbmtls.protocols import tables
from dbmtls.protocols.registry import REGISTRY, Registry
from dbmtls.protocols.spec import ProtocolSpec
from dbmtls.proxy import sessions
from dbmtls.proxy.runtime import DatabaseRuntime
from dbmtls.proxy.server import Proxy, load_session
from dbmtls.proxy.upstream import Dialer

ROOT = Path(__file__).resolve().parents[2]


def _config(protocol: str) -> Config:
    db = {"name": "d", "protocol": protocol, "listen": "127.0.0.1:1", "address": "h:7", "tls": {"mode": "SIMPLE"}}
    return Config.model_validate({"databases": [db]})


@pytest.mark.parametrize("path", ["README.md", "docs/errors.md"])
def test_generated_tables_are_current(path: str) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    assert "<!-- BEGIN generated:" in text
    assert tables.render(text) == text, f"run: python -m dbmtls.protocols.tables --write  ({path} is stale)"


@pytest.mark.parametrize("spec", list(REGISTRY), ids=lambda s: s.name)
def test_every_protocol_has_a_session_driver_and_its_ports(spec: ProtocolSpec) -> None:
    for name in spec.names:
        db = _config(name).databases[0]
        assert db.protocol == spec.name  # aliases are stored as the canonical name
        assert db.spec is spec
        assert db.upstream == ("h", 7)
    rt = DatabaseRuntime(_config(spec.name).databases[0], Dialer())
    session = load_session(spec, rt)
    assert callable(session.run)
    assert type(session).__module__.startswith("dbmtls.proxy.sessions.")
    for reason in CONNECTION_FAILURES:
        assert spec.wire_code(reason)


@pytest.mark.parametrize(
    ("name", "reason", "code"),
    [
        ("postgres", Reason.APP_PROTOCOL, "08P01"),
        ("postgres", Reason.TOO_MANY_CONNECTIONS, "53300"),
        ("cockroachdb", Reason.CLIENT_CERT_REJECTED, "28000"),
        ("mysql", Reason.NO_CERTIFICATE_FOR_USER, "1045 (28000)"),
        ("mariadb", Reason.TOO_MANY_CONNECTIONS, "1040 (08004)"),
        ("mongodb", Reason.CLIENT_CERT_REJECTED, "18 AuthenticationFailed"),
        ("redis", Reason.UNKNOWN_CA, "-ERR"),
    ],
)
def test_wire_codes(name: str, reason: Reason, code: str) -> None:
    assert REGISTRY.get(name).wire_code(reason) == code


def test_every_spec_in_the_protocols_package_is_registered() -> None:
    """A protocols/x.py with a SPEC but no registry line would be a database nobody can use."""
    found = set()
    for info in pkgutil.iter_modules(protocols.__path__):
        module = importlib.import_module(f"dbmtls.protocols.{info.name}")
        found |= {v for v in vars(module).values() if isinstance(v, ProtocolSpec)}
    assert found == set(REGISTRY)


def test_every_session_driver_is_named_by_a_registered_protocol() -> None:
    named = {spec.session.partition(":")[0] for spec in REGISTRY}
    modules = {f"dbmtls.proxy.sessions.{i.name}" for i in pkgutil.iter_modules(sessions.__path__)}
    assert modules - named == {"dbmtls.proxy.sessions.common"}  # the shared relay step, not a driver


def test_unknown_protocol_is_an_error_not_a_relay() -> None:
    with pytest.raises(ValueError, match="unknown protocol 'sqlserver'; one of redis"):
        _config("sqlserver")


def test_a_driver_that_does_not_resolve_stops_the_start() -> None:
    spec = dataclasses.replace(REGISTRY.get("redis"), session="dbmtls.proxy.sessions.tds:TdsSession")
    rt = DatabaseRuntime(_config("redis").databases[0], Dialer())
    with pytest.raises(RuntimeError, match=r"session driver 'dbmtls\.proxy\.sessions\.tds:TdsSession' not found"):
        load_session(spec, rt)


def test_proxy_builds_one_driver_per_database() -> None:
    proxy = Proxy(_config("postgresql"))
    assert type(proxy.sessions["d"]).__name__ == "PostgresSession"


def test_registry_refuses_ambiguity() -> None:
    redis = REGISTRY.get("redis")
    with pytest.raises(ValueError, match="registered twice"):
        Registry((redis, dataclasses.replace(redis, name="valkey", aliases=("redis",))))
    with pytest.raises(ValueError, match="port 6379 registered twice"):
        Registry((redis, dataclasses.replace(redis, name="valkey")))


def test_lookups() -> None:
    assert REGISTRY.by_port(26257) is REGISTRY.get("cockroachdb")
    assert REGISTRY.by_port(3306) is REGISTRY.get("mysql")
    assert REGISTRY.named_in_host("orders-mongodb-0.db") is REGISTRY.get("mongodb")
    assert REGISTRY.named_in_host("mongo-express.tools") is None  # aliases are not guessed from hosts
    assert REGISTRY.named_in_host("tcp-proxy.example") is None  # tcp is never guessed from a host
    with pytest.raises(KeyError, match="one of redis"):
        REGISTRY.get("oracle")


def test_destination_rule_uses_the_registry(tmp_path: Path) -> None:
    from dbmtls.config.load import load_config

    rule = tmp_path / "dr.yaml"
    rule.write_text(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: pg\n"
        "  annotations: {dbmtls.io/protocol: postgresql}\n"
        "spec:\n  host: db.example\n  trafficPolicy:\n    tls: {mode: SIMPLE}\n"
    )
    (db,) = load_config([rule]).databases
    assert (db.protocol, db.upstream) == ("postgres", ("db.example", 5432))
    rule.write_text(rule.read_text().replace("postgresql", "oracle"))
    with pytest.raises(ConfigError, match="unknown protocol 'oracle'"):
        load_config([rule])
