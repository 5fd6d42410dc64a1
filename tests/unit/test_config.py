"""Config parsing, validation messages, merging/overrides, DestinationRule mapping, ``dbmtls check``.

Every error a user can make should come back naming the file, the YAML path and what is
wrong; the tests assert all three, because a message that loses one of them sends the user
searching.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from dbmtls.cli import main
from dbmtls.config.destinationrule import map_destination_rule
from dbmtls.config.load import load_config
from dbmtls.config.model import Config, parse_duration
from dbmtls.errors import ConfigError
from support.certs import PKI
from support.seed import SEED_DR


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(textwrap.dedent(text))
    return p


def db(**over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": "cache",
        "protocol": "redis",
        "listen": "127.0.0.1:16379",
        "address": "redis.example:6379",
        "tls": {"mode": "MUTUAL", "clientCertificate": "c.crt", "privateKey": "c.key", "caCertificates": "ca.crt"},
    }
    out.update(over)
    return out


def load_dbs(tmp: Path, *dbs: dict[str, Any], name: str = "dbmtls.yaml", **top: Any) -> Config:
    p = tmp / name
    p.write_text(yaml.safe_dump({"databases": list(dbs), **top}))
    return load_config([p])


def error_of(tmp: Path, *dbs: dict[str, Any], **top: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_dbs(tmp, *dbs, **top)
    return info.value


# --- parsing ------------------------------------------------------------------------------


def test_minimal_config_with_defaults(tmp_path: Path) -> None:
    cfg = load_dbs(tmp_path, db())
    (d,) = cfg.databases
    assert d.upstream == ("redis.example", 6379)
    assert d.dial_target == d.upstream
    assert d.server_name == "redis.example"
    assert d.verify_names == ("redis.example",)
    assert d.tls.minProtocolVersion == "TLSV1_2"
    assert not d.tls.insecureSkipVerify
    assert (d.connectTimeout, d.handshakeTimeout) == (5.0, 10.0)
    assert cfg.admin.listen == "127.0.0.1:15000"


def test_default_port_per_protocol_and_sni_and_dial(tmp_path: Path) -> None:
    cfg = load_dbs(
        tmp_path,
        db(address="pg.internal", protocol="postgres", tls={"mode": "SIMPLE", "sni": "pg.example"}),
        db(name="m", listen="unix:/tmp/m.sock", protocol="mongodb", address="[::1]", dial="10.0.0.5"),
    )
    pg, mongo = cfg.databases
    assert pg.upstream == ("pg.internal", 5432)
    assert pg.server_name == "pg.example"
    assert mongo.upstream == ("::1", 27017)
    assert mongo.dial_target == ("10.0.0.5", 27017)  # dial keeps the verified name, takes its port


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), ("2h", 7200.0), ("7d", 604800.0), ("1.5", 1.5), (3, 3.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [("5x", "expected a duration such as 5s"), ("0s", "must be positive"), (True, "expected a duration"), (-1, "")],
)
def test_bad_durations_name_the_field(tmp_path: Path, value: object, message: str) -> None:
    err = error_of(tmp_path, db(connectTimeout=value))
    assert err.path == "databases[0].connectTimeout"
    assert message in err.message
    assert str(tmp_path / "dbmtls.yaml") in err.message


def test_top_level_duration(tmp_path: Path) -> None:
    assert load_dbs(tmp_path, db(), drainTimeout="1500ms").drainTimeout == 1.5
    assert error_of(tmp_path, db(), drainTimeout="soon").path == "drainTimeout"


# --- validation messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "path", "text"),
    [
        (db(tls={"mode": "MUTUAL", "clientCertficate": "x"}), "databases[0].tls.clientCertficate", "unknown field"),
        (db(adress="x:1"), "databases[0].adress", "unknown field"),
        (
            db(tls={"mode": "MUTUAL", "clientCertificate": "c.crt", "caCertificates": "ca"}),
            "databases[0].tls.privateKey",
            "clientCertificate and privateKey must be given together",
        ),
        (
            db(tls={"mode": "MUTUAL", "privateKey": "c.key"}),
            "databases[0].tls.clientCertificate",
            "must be given together",
        ),
        (db(tls={"mode": "MUTUAL"}), "databases[0].tls.clientCertificate", "mode MUTUAL needs clientCertificate"),
        (
            db(tls={"mode": "SIMPLE", "clientCertificate": "c", "privateKey": "k"}),
            "databases[0].tls.mode",
            "only presented in mode MUTUAL",
        ),
        (db(tls={"mode": "STRICT"}), "databases[0].tls.mode", "'DISABLE', 'SIMPLE' or 'MUTUAL'"),
        (db(listen="0.0.0.0:6379"), "databases[0].listen", "is not loopback"),
        (db(listen="10.1.2.3:6379"), "databases[0].listen", "allowRemoteClients: true"),
        (db(listen="localhost"), "databases[0].listen", "missing ':port'"),
        (db(listen="127.0.0.1:70000"), "databases[0].listen", "port must be 1-65535"),
        (db(listen="unix:"), "databases[0].listen", "needs a socket path"),
        (db(address="a:b:c"), "databases[0].address", "IPv6"),
        (db(protocol="oracle"), "databases[0].protocol", "unknown protocol 'oracle'; one of redis"),
        (db(name="has space"), "databases[0].name", "should match pattern"),
        (db(directTls=True), "databases[0].directTls", "postgres only"),
        (
            db(tls={"mode": "MUTUAL", "userCertificates": {"bob": {"clientCertificate": "b", "privateKey": "k"}}}),
            "databases[0].tls.userCertificates",
            "names the user before TLS",
        ),
        (
            db(tls={"mode": "SIMPLE", "minProtocolVersion": "TLSV1_3", "maxProtocolVersion": "TLSV1_2"}),
            "databases[0].tls.maxProtocolVersion",
            "below minProtocolVersion",
        ),
        (db(tls={"mode": "SIMPLE", "minProtocolVersion": "TLSV1_1"}), "databases[0].tls.minProtocolVersion", ""),
    ],
)
def test_validation_messages_name_file_and_path(tmp_path: Path, database: dict[str, Any], path: str, text: str) -> None:
    err = error_of(tmp_path, db(name="first", listen="127.0.0.1:1"), database)
    assert err.path == path.replace("[0]", "[1]")
    assert err.source == str(tmp_path / "dbmtls.yaml")
    assert text in err.message
    assert f"{tmp_path / 'dbmtls.yaml'}: {err.path}: " in err.message
    assert "Value error" not in err.message


def test_remote_listener_allowed_on_purpose(tmp_path: Path) -> None:
    (d,) = load_dbs(tmp_path, db(listen="0.0.0.0:6379", allowRemoteClients=True)).databases
    assert d.listen == "0.0.0.0:6379"


def test_unknown_top_level_field(tmp_path: Path) -> None:
    p = write(tmp_path, "c.yaml", "databses: []\n")
    with pytest.raises(ConfigError) as info:
        load_config([p])
    assert info.value.path == "databses"
    assert "unknown field" in info.value.message


def test_unknown_admin_and_log_fields(tmp_path: Path) -> None:
    assert error_of(tmp_path, db(), admin={"lisen": "x"}).path == "admin.lisen"
    assert error_of(tmp_path, db(), log={"level": "loud"}).path == "log.level"


def test_bad_yaml_names_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.yaml", "databases:\n  - name: a\n   protocol: x\n")
    with pytest.raises(ConfigError) as info:
        load_config([p])
    assert info.value.source == str(p)
    assert info.value.path == "line 3, column 4"
    assert "invalid YAML" in info.value.message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, "empty.yaml", text)
    with pytest.raises(ConfigError, match="the file is empty") as info:
        load_config([p])
    assert info.value.source == str(p)


def test_missing_file_and_no_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config([])


def test_non_mapping_documents(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config([write(tmp_path, "l.yaml", "- a\n- b\n")])
    with pytest.raises(ConfigError, match="must be a list") as info:
        load_config([write(tmp_path, "d.yaml", "databases: {a: 1}\n")])
    assert info.value.path == "databases"


def test_inputs_without_a_database_are_an_error_that_says_why(tmp_path: Path) -> None:
    """Other kinds are skipped with a note (tests/unit/test_mesh.py); only no database at all is an error."""
    p = write(tmp_path, "svc.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ConfigError, match=r"no database to relay: .*svc.yaml: ConfigMap x: not used by dbmtls"):
        load_config([p])


def test_duplicate_name_in_one_file(tmp_path: Path) -> None:
    err = error_of(tmp_path, db(), db(listen="127.0.0.1:2"))
    assert err.path == "databases[1].name"
    assert "'cache' is already used by databases[0].name" in err.message


def test_duplicate_name_across_two_files_names_both(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", yaml.safe_dump({"databases": [db()]}))
    b = write(tmp_path, "b.yaml", yaml.safe_dump({"databases": [db(listen="127.0.0.1:2")]}))
    with pytest.raises(ConfigError) as info:
        load_config([a, b])
    assert info.value.source == str(b)
    assert info.value.path == "databases[0].name"
    assert f"already used by databases[0].name in {a}" in info.value.message


def test_duplicate_listener_across_two_files_names_both(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", yaml.safe_dump({"databases": [db()]}))
    b = write(tmp_path, "b.yaml", yaml.safe_dump({"databases": [db(name="other")]}))
    with pytest.raises(ConfigError) as info:
        load_config([a, b])
    assert info.value.source == str(b)
    assert info.value.path == "databases[0].listen"
    assert "127.0.0.1:16379 is already the listener of 'cache'" in info.value.message
    assert str(a) in info.value.message


def test_multi_document_file_names_the_document(tmp_path: Path) -> None:
    p = write(tmp_path, "m.yaml", yaml.safe_dump({"databases": [db()]}) + "---\n" + "databases: [{name: x}]\n")
    with pytest.raises(ConfigError) as info:
        load_config([p])
    assert info.value.source == f"{p} (document 2)"


# --- merging and overrides -------------------------------------------------------------------


def test_merge_concatenates_databases_and_last_section_wins(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", yaml.safe_dump({"databases": [db()], "log": {"level": "debug"}}))
    b = write(
        tmp_path,
        "b.yaml",
        yaml.safe_dump({"databases": [db(name="pg", protocol="postgres", listen="127.0.0.1:5432")], "log": {}}),
    )
    cfg = load_config([a, b])
    assert [d.name for d in cfg.databases] == ["cache", "pg"]
    assert cfg.log.level == "info"  # b's log section replaced a's


def test_overrides_patch_by_name(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", yaml.safe_dump({"databases": [db(), db(name="b", listen="127.0.0.1:2")]}))
    o = write(
        tmp_path,
        "o.yaml",
        """\
        overrides:
          cache:
            listen: 127.0.0.1:7777
            address: redis.prod:6380
            dial: 10.0.0.7:6380
        """,
    )
    first, second = load_config([a, o]).databases
    assert (first.listen, first.address, first.dial) == ("127.0.0.1:7777", "redis.prod:6380", "10.0.0.7:6380")
    assert first.tls.clientCertificate == str(tmp_path / "c.crt")  # untouched fields stay (relative to the file)
    assert first.server_name == "redis.prod"
    assert second.listen == "127.0.0.1:2"


def test_override_of_unknown_database(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", yaml.safe_dump({"databases": [db()]}))
    o = write(tmp_path, "o.yaml", "overrides: {cahce: {listen: '127.0.0.1:1'}}\n")
    with pytest.raises(ConfigError) as info:
        load_config([a, o])
    assert info.value.source == str(o)
    assert info.value.path == "overrides.cahce"
    assert "no database named 'cahce' (known: cache)" in info.value.message


def test_override_of_other_fields_is_refused(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", yaml.safe_dump({"databases": [db()]}))
    o = write(tmp_path, "o.yaml", "overrides: {cache: {tls: {mode: DISABLE}}}\n")
    with pytest.raises(ConfigError, match="may repoint only the certificate files") as info:
        load_config([a, o])
    assert info.value.path == "overrides.cache.tls"
    o.write_text("overrides: {cache: {protocol: mysql}}\n")
    allowed = "address, allowRemoteClients, dial, idleTimeout, listen, maxConnections, preconnect, tls"
    with pytest.raises(ConfigError, match=f"may set only {allowed}"):
        load_config([a, o])


def test_override_is_validated_with_its_path(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", yaml.safe_dump({"databases": [db()]}))
    o = write(tmp_path, "o.yaml", "overrides: {cache: {listen: '0.0.0.0:6379'}}\n")
    with pytest.raises(ConfigError, match="is not loopback") as info:
        load_config([a, o])
    assert (info.value.source, info.value.path) == (str(o), "overrides.cache.listen")


def test_listener_clash_created_by_an_override(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", yaml.safe_dump({"databases": [db(), db(name="b", listen="127.0.0.1:2")]}))
    o = write(tmp_path, "o.yaml", "overrides: {b: {listen: '127.0.0.1:16379'}}\n")
    with pytest.raises(ConfigError, match="already the listener of 'cache'") as info:
        load_config([a, o])
    assert (info.value.source, info.value.path) == (str(o), "overrides.b.listen")


# --- DestinationRule -------------------------------------------------------------------------


def seed_dr(pki: PKI) -> str:
    return (
        SEED_DR.replace("/client-certs/tls.crt", pki.client.cert)
        .replace("/client-certs/tls.key", pki.client.key)
        .replace("/client-certs/ca.crt", pki.ca_cert)
    )


def test_seed_destination_rule_verbatim(tmp_path: Path) -> None:
    (d,) = load_config([write(tmp_path, "dr.yaml", SEED_DR)]).databases
    assert d.name == "db-mtls"
    assert d.protocol == "redis"  # from the word "redis" in foo-redis-master
    assert d.listen == "127.0.0.1:6379"
    assert d.address == "foo-redis-master:6379"
    assert d.server_name == "foo-redis-master"
    assert d.tls.mode == "MUTUAL"
    assert (d.tls.clientCertificate, d.tls.privateKey, d.tls.caCertificates) == (
        "/client-certs/tls.crt",
        "/client-certs/tls.key",
        "/client-certs/ca.crt",
    )


def test_seed_destination_rule_with_local_paths_and_overrides(tmp_path: Path, pki: PKI) -> None:
    dr = write(tmp_path, "dr.yaml", seed_dr(pki))
    ov = write(tmp_path, "local.yaml", "overrides:\n  db-mtls: {listen: '127.0.0.1:16379', dial: '127.0.0.1:7000'}\n")
    (d,) = load_config([dr, ov]).databases
    assert d.tls.clientCertificate == pki.client.cert
    assert d.listen == "127.0.0.1:16379"
    assert d.dial_target == ("127.0.0.1", 7000)
    assert d.server_name == "foo-redis-master"  # the verified name does not follow dial


def dr(
    spec: dict[str, Any], *, api: str = "networking.istio.io/v1", annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "rule"}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": api, "kind": "DestinationRule", "metadata": meta, "spec": spec}


MUTUAL = {"mode": "MUTUAL", "clientCertificate": "c.crt", "privateKey": "c.key", "caCertificates": "ca.crt"}


def load_dr(tmp_path: Path, doc: dict[str, Any]) -> Config:
    return load_config([write(tmp_path, "dr.yaml", yaml.safe_dump(doc))])


def dr_error(tmp_path: Path, doc: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_dr(tmp_path, doc)
    assert info.value.source == str(tmp_path / "dr.yaml")
    return info.value


@pytest.mark.parametrize(
    "api", ["networking.istio.io/v1alpha3", "networking.istio.io/v1beta1", "networking.istio.io/v1"]
)
def test_all_three_api_versions(tmp_path: Path, api: str) -> None:
    (d,) = load_dr(
        tmp_path,
        dr(
            {"host": "pg.db.svc", "trafficPolicy": {"tls": MUTUAL}},
            api=api,
            annotations={"dbmtls.io/protocol": "postgres"},
        ),
    ).databases
    assert (d.protocol, d.address, d.listen) == ("postgres", "pg.db.svc:5432", "127.0.0.1:5432")


def test_unknown_api_version(tmp_path: Path) -> None:
    err = dr_error(tmp_path, dr({"host": "x", "trafficPolicy": {"tls": MUTUAL}}, api="networking.istio.io/v2"))
    assert err.path == "apiVersion"


def test_port_level_settings_replace_not_merge(tmp_path: Path) -> None:
    spec = {
        "host": "db.example",
        "trafficPolicy": {
            "tls": {**MUTUAL, "sni": "outer.example"},
            "portLevelSettings": [
                {"port": {"number": 6379}, "tls": {"mode": "SIMPLE", "caCertificates": "other-ca.crt"}},
                {"port": {"number": 27017}, "connectionPool": {"tcp": {"maxConnections": 9}}},  # the rule's TLS
                {"port": {"number": 5432}, "loadBalancer": {"simple": "ROUND_ROBIN"}},
            ],
        },
    }
    cfg = load_dr(tmp_path, dr(spec))
    by_port = {d.upstream[1]: d for d in cfg.databases}
    assert set(by_port) == {6379, 27017, 5432}
    redis_db, mongo, pg = by_port[6379], by_port[27017], by_port[5432]
    # port level replaced the whole block: no client cert, no sni from the default
    assert (redis_db.tls.mode, redis_db.tls.clientCertificate, redis_db.tls.sni) == ("SIMPLE", None, None)
    assert redis_db.tls.caCertificates == str(tmp_path / "other-ca.crt")
    assert (mongo.tls.mode, mongo.tls.sni) == ("MUTUAL", "outer.example")
    assert (redis_db.protocol, mongo.protocol, pg.protocol) == ("redis", "mongodb", "postgres")
    assert [d.name for d in cfg.databases] == ["rule-6379", "rule-27017", "rule-5432"]
    assert redis_db.listen == "127.0.0.1:6379"
    assert mongo.listen == "127.0.0.1:27017"


def test_port_level_tls_error_names_its_path(tmp_path: Path) -> None:
    spec = {
        "host": "db.example",
        "trafficPolicy": {"portLevelSettings": [{"port": {"number": 6379}, "tls": {"mode": "MUTUAL"}}]},
    }
    err = dr_error(tmp_path, dr(spec))
    assert err.path == "spec.trafficPolicy.portLevelSettings[0].tls.clientCertificate"


def test_dr_key_pair_half_names_the_tls_path(tmp_path: Path) -> None:
    tls = {"mode": "MUTUAL", "clientCertificate": "c.crt", "caCertificates": "ca.crt"}
    err = dr_error(tmp_path, dr({"host": "foo-redis-master", "trafficPolicy": {"tls": tls}}))
    assert err.path == "spec.trafficPolicy.tls.privateKey"


@pytest.mark.parametrize(
    ("host", "annotations", "protocol", "port"),
    [
        ("foo-redis-master", {}, "redis", 6379),
        ("orders-mongodb-0.orders", {}, "mongodb", 27017),
        ("cockroachdb-public.crdb.svc", {}, "cockroachdb", 26257),
        ("db.example", {"dbmtls.io/protocol": "mysql"}, "mysql", 3306),
        ("foo-redis-master", {"dbmtls.io/protocol": "tcp"}, "tcp", None),
    ],
)
def test_protocol_from_annotation_or_host_word(
    tmp_path: Path, host: str, annotations: dict[str, str], protocol: str, port: int | None
) -> None:
    policy: dict[str, Any] = {"tls": MUTUAL}
    if port is None:
        policy["portLevelSettings"] = [{"port": {"number": 9000}, "loadBalancer": {"simple": "RANDOM"}}]
    (d,) = load_dr(tmp_path, dr({"host": host, "trafficPolicy": policy}, annotations=annotations)).databases
    assert d.protocol == protocol
    assert d.upstream == (host, port or 9000)


def test_protocol_from_well_known_port_beats_host_word(tmp_path: Path) -> None:
    spec = {
        "host": "foo-redis-master",
        "trafficPolicy": {"portLevelSettings": [{"port": {"number": 5432}, "tls": MUTUAL}]},
    }
    (d,) = load_dr(tmp_path, dr(spec)).databases
    assert d.protocol == "postgres"


def test_listen_and_address_annotations(tmp_path: Path) -> None:
    ann = {"dbmtls.io/listen": "127.0.0.1:16379", "dbmtls.io/address": "10.0.0.9:6379"}
    (d,) = load_dr(
        tmp_path, dr({"host": "foo-redis-master", "trafficPolicy": {"tls": MUTUAL}}, annotations=ann)
    ).databases
    assert d.listen == "127.0.0.1:16379"
    assert d.dial_target == ("10.0.0.9", 6379)
    assert d.server_name == "foo-redis-master"


def test_non_loopback_listen_annotation(tmp_path: Path) -> None:
    ann = {"dbmtls.io/listen": "0.0.0.0:6379"}
    err = dr_error(tmp_path, dr({"host": "foo-redis-master", "trafficPolicy": {"tls": MUTUAL}}, annotations=ann))
    assert err.path == "metadata.annotations.dbmtls.io/listen"
    assert "is not loopback" in err.message


def test_no_port_error_says_how_to_fix(tmp_path: Path) -> None:
    """Nothing names a port: the error names the field to add (a protocol alone is opaque TCP, test_mesh.py)."""
    err = dr_error(tmp_path, dr({"host": "db.example", "trafficPolicy": {"tls": MUTUAL}}))
    assert err.path == "spec.trafficPolicy.portLevelSettings"
    assert "cannot tell which port of db.example to connect to: add portLevelSettings with a port.number" in err.message
    assert "annotation dbmtls.io/protocol: <redis|mongodb|tcp|postgres|cockroachdb|mysql|mariadb>" in err.message


def test_unknown_protocol_annotation(tmp_path: Path) -> None:
    err = dr_error(
        tmp_path, dr({"host": "x", "trafficPolicy": {"tls": MUTUAL}}, annotations={"dbmtls.io/protocol": "oracle"})
    )
    assert err.path == "metadata.annotations.dbmtls.io/protocol"


def test_istio_mutual_is_a_clear_error(tmp_path: Path) -> None:
    err = dr_error(tmp_path, dr({"host": "foo-redis-master", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}))
    assert err.path == "spec.trafficPolicy.tls.mode"
    assert "ISTIO_MUTUAL uses the mesh's own certificates" in err.message
    assert "use MUTUAL with clientCertificate, privateKey and caCertificates" in err.message


def test_credential_name_with_file_paths_is_an_error_as_in_istio(tmp_path: Path) -> None:
    tls = {"mode": "MUTUAL", "credentialName": "jinsu-tls", "caCertificates": "/c/ca.crt"}
    err = dr_error(tmp_path, dr({"host": "foo-redis-master", "trafficPolicy": {"tls": tls}}))
    assert err.path == "spec.trafficPolicy.tls.caCertificates"
    assert "credentialName gives the certificates: remove the file paths" in err.message


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        (
            {"host": "foo-redis-master", "trafficPolicy": {"tls": {**MUTUAL, "sniName": "x"}}},
            "spec.trafficPolicy.tls.sniName",
        ),
        ({"host": "foo-redis-master", "trafficPolicy": {"tsl": MUTUAL}}, "spec.trafficPolicy.tsl"),
        ({"hots": "foo-redis-master", "trafficPolicy": {"tls": MUTUAL}}, "spec.hots"),
        ({"host": "*.example.com", "trafficPolicy": {"tls": MUTUAL}}, "spec.host"),
        (
            {
                "host": "foo-redis-master",
                "trafficPolicy": {"tls": MUTUAL},
                "subsets": [{"name": "a", "trafficPolicy": {"tls": MUTUAL}}],
            },
            "spec.subsets[0].trafficPolicy.tls",
        ),
    ],
)
def test_dr_errors_name_the_path(tmp_path: Path, spec: dict[str, Any], path: str) -> None:
    assert dr_error(tmp_path, dr(spec)).path == path


def test_map_destination_rule_is_pure() -> None:
    doc = yaml.safe_load(SEED_DR)
    (mapped,) = map_destination_rule(doc, "seed.yaml").databases
    assert mapped.tls_path == "spec.trafficPolicy.tls"
    assert mapped.raw == {
        "name": "db-mtls",
        "protocol": "redis",
        "listen": "127.0.0.1:6379",
        "address": "foo-redis-master:6379",
        "tls": {
            "mode": "MUTUAL",
            "clientCertificate": "/client-certs/tls.crt",
            "privateKey": "/client-certs/tls.key",
            "caCertificates": "/client-certs/ca.crt",
        },
    }


# --- dbmtls check ------------------------------------------------------------------------------


def test_check_prints_effective_config(tmp_path: Path, pki: PKI) -> None:
    dr_path = write(tmp_path, "dr.yaml", seed_dr(pki))
    ov = write(tmp_path, "local.yaml", "overrides:\n  db-mtls: {listen: '127.0.0.1:16379'}\n")
    result = CliRunner().invoke(main, ["check", "-c", str(dr_path), "-c", str(ov)])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    (d,) = printed["databases"]
    assert (d["name"], d["protocol"], d["listen"], d["address"]) == (
        "db-mtls",
        "redis",
        "127.0.0.1:16379",
        "foo-redis-master:6379",
    )
    assert d["tls"]["clientCertificate"] == pki.client.cert


def test_check_json(tmp_path: Path, pki: PKI) -> None:
    import json

    # the seed rule listens on Redis's own port, which this machine's Redis may hold: not this test's subject
    dr = str(write(tmp_path, "dr.yaml", seed_dr(pki)))
    result = CliRunner().invoke(main, ["check", "--json", "--no-bind-check", "-c", dr])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is True and out["errors"] == []
    assert out["config"]["databases"][0]["tls"]["caCertificates"] == pki.ca_cert
    assert out["databases"][0]["provenance"]["tls.caCertificates"]["path"] == "spec.trafficPolicy.tls.caCertificates"


def test_check_error_names_file_and_path(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "bad.yaml",
        yaml.safe_dump(
            {"databases": [db(), db(name="b", listen="127.0.0.1:2", tls={"mode": "MUTUAL", "clientCertificate": "c"})]}
        ),
    )
    result = CliRunner().invoke(main, ["check", "-c", str(bad)])
    assert result.exit_code != 0
    assert f"{bad}: databases[1].tls.privateKey: missing" in result.stderr
    assert result.stdout == ""


def test_check_subprocess_unknown_field(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it."""
    import subprocess
    import sys

    bad = write(tmp_path, "bad.yaml", yaml.safe_dump({"databases": [db(tls={"mode": "SIMPLE", "caCertficates": "x"})]}))
    proc = subprocess.run(
        [sys.executable, "-m", "dbmtls", "check", "-c", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert f"{bad}: databases[0].tls.caCertficates: unknown field" in proc.stderr


def test_check_bad_certificate_files(tmp_path: Path, pki: PKI) -> None:
    """The config parses but a certificate file is wrong: non-zero, and the message says which."""
    other = pki.client_for("mallory", ca=pki.other_ca)
    cfg = write(
        tmp_path,
        "c.yaml",
        yaml.safe_dump(
            {
                "databases": [
                    db(
                        tls={
                            "mode": "MUTUAL",
                            "clientCertificate": pki.client.cert,
                            "privateKey": other.key,
                            "caCertificates": pki.ca_cert,
                        }
                    )
                ]
            }
        ),
    )
    result = CliRunner().invoke(main, ["check", "-c", str(cfg)])
    assert result.exit_code == 1
    assert "database 'cache': tls.privateKey: private key" in result.stderr
    # the message says it once, then where the setting is (the file and its YAML path)
    assert f"(set at {cfg}: databases[0].tls.privateKey)" in result.stderr
    assert result.stderr.count("tls.privateKey") == 2
    assert f"private key {other.key} does not match certificate {pki.client.cert}" in result.stderr


def test_check_warns_about_insecure_skip_verify(tmp_path: Path) -> None:
    cfg = write(
        tmp_path, "c.yaml", yaml.safe_dump({"databases": [db(tls={"mode": "SIMPLE", "insecureSkipVerify": True})]})
    )
    result = CliRunner().invoke(main, ["check", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "insecureSkipVerify is on" in result.stderr


def test_config_from_an_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``-c env:NAME``: how the Kubernetes injector hands the sidecar its generated config."""
    monkeypatch.setenv("DBMTLS_TEST_CONFIG", yaml.safe_dump({"databases": [db()]}))
    file = write(tmp_path, "more.yaml", "drainTimeout: 7s\n")
    config = load_config(["env:DBMTLS_TEST_CONFIG", file])
    assert [d.name for d in config.databases] == [db()["name"]] and config.drainTimeout == 7
    monkeypatch.delenv("DBMTLS_TEST_CONFIG")
    with pytest.raises(ConfigError, match="environment variable not set") as err:
        load_config(["env:DBMTLS_TEST_CONFIG"])
    assert "env:DBMTLS_TEST_CONFIG" in str(err.value)


@pytest.mark.parametrize("value", ["off", "false", "no", "'off'"])
def test_admin_listen_off_unquoted(tmp_path: Path, value: str) -> None:
    """YAML 1.1 reads `off` as false; `admin: {listen: off}` must still switch the admin server off."""
    config = load_config([write(tmp_path, "c.yaml", f"admin:\n  listen: {value}\n  publicListen: {value}\n")])
    assert config.admin.listen == "off" and config.admin.publicListen == "off"


def test_admin_listen_true_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"admin\.listen"):
        load_config([write(tmp_path, "c.yaml", "admin:\n  listen: on\n")])


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dbmtls check -c conf/dbmtls.yaml` from anywhere finds conf/pki/...; absolute paths stay as they are."""
    conf = tmp_path / "conf"
    (conf / "pki").mkdir(parents=True)
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (conf / "pki" / name).write_bytes((Path(pki.client.cert).parent / name).read_bytes())
    tls = {
        "mode": "MUTUAL",
        "clientCertificate": "pki/tls.crt",
        "privateKey": "pki/tls.key",
        "caCertificates": pki.ca_cert,
    }
    rule = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {
            "name": "rule",
            "annotations": {"dbmtls.io/protocol": "redis", "dbmtls.io/listen": "127.0.0.1:7001"},
        },
        "spec": {"host": "cache", "trafficPolicy": {"tls": {**tls, "caCertificates": "./pki/ca.crt"}}},
    }
    write(conf, "dbmtls.yaml", yaml.safe_dump({"databases": [db(tls=tls)]}))
    write(conf, "rule.yaml", yaml.safe_dump(rule))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config([Path("../conf/dbmtls.yaml"), Path("../conf/rule.yaml")])
    first, second = config.databases
    assert first.tls.clientCertificate == str(conf / "pki" / "tls.crt")
    assert first.tls.privateKey == str(conf / "pki" / "tls.key")
    assert first.tls.caCertificates == pki.ca_cert
    assert second.tls.caCertificates == str(conf / "pki" / "ca.crt")
    result = CliRunner().invoke(main, ["check", "-c", "../conf/dbmtls.yaml"])
    assert result.exit_code == 0, result.output


def test_check_catches_what_would_stop_run(tmp_path: Path, pki: PKI) -> None:
    """A taken listen port and a config with nothing to serve fail `check`, not only `run`."""
    import json
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        plain = db(listen=f"127.0.0.1:{port}", tls={"mode": "DISABLE"})  # no certificate files to trip on
        cfg = write(tmp_path, "c.yaml", yaml.safe_dump({"databases": [plain]}))
        result = CliRunner().invoke(main, ["check", "-c", str(cfg)])
        assert result.exit_code == 1
        assert f"listen 127.0.0.1:{port}: already in use by another process" in result.stderr
        out = json.loads(CliRunner().invoke(main, ["check", "--json", "-c", str(cfg)]).stdout)
        assert [e["kind"] for e in out["errors"]] == ["listen"] and out["ok"] is False
        assert CliRunner().invoke(main, ["check", "--no-bind-check", "-c", str(cfg)]).exit_code == 0
    empty = write(tmp_path, "empty.yaml", "databases: []\n")
    result = CliRunner().invoke(main, ["check", "-c", str(empty)])
    assert result.exit_code == 1 and "no database to serve" in result.stderr


def test_check_warns_about_plaintext_to_the_server(tmp_path: Path) -> None:
    cfg = write(tmp_path, "c.yaml", yaml.safe_dump({"databases": [db(tls={"mode": "DISABLE"})]}))
    result = CliRunner().invoke(main, ["check", "--no-bind-check", "-c", str(cfg)])
    assert result.exit_code == 0
    assert "tls.mode is DISABLE: traffic to the database is NOT encrypted" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "databases:\n  - {name: x, protocl: redis, listen: '127.0.0.1:7000', address: 'localhost:6379'}\n",
            "databases[0].protocl: unknown field: did you mean protocol?",
        ),
        (
            "databases:\n  - name: x\n    protocol: redis\n    listen: 127.0.0.1:7000\n    address: localhost:6379\n"
            "    tls: {mode: MUTUAL, clientCertficate: a, privateKey: b}\n",
            "databases[0].tls.clientCertficate: unknown field: did you mean clientCertificate?",
        ),
        ("databses: []\n", "databses: unknown field: did you mean databases?"),
        ("admin: {lsiten: off}\n", "admin.lsiten: unknown field: did you mean listen?"),
    ],
)
def test_a_misspelled_field_is_named_with_what_was_meant(tmp_path: Path, text: str, message: str) -> None:
    """Not "protocol: Field required (and 1 more error)": the typo is the cause, so it comes first."""
    with pytest.raises(ConfigError) as err:
        load_config([write(tmp_path, "c.yaml", text)])
    assert message in str(err.value)
