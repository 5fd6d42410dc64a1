"""Mesh config end to end: ServiceEntry + DestinationRule and Service + DestinationRule pairs, as
a cluster keeps them, run by the real ``dbmtls run`` against real TLS servers (Redis, PostgreSQL
15, MariaDB) with real clients.

Every server listens on a random port, never its well-known one, and no rule carries a
``dbmtls.io/protocol`` annotation: the protocol can only come from the ServiceEntry's ``protocol``
or the Service's port name / ``appProtocol``.  Read wrongly (opaque TCP), PostgreSQL and MariaDB
would refuse the connection, since they negotiate TLS in-band; for Redis, whose TLS starts at the
first byte, a failure is provoked and the app must get a Redis ``-ERR`` (opaque TCP only closes).

The inputs are one multi-document file holding the pairs next to a VirtualService and a rule
without TLS (skipped with a note), and a laptop file with ``credentialsDir`` and the overrides a
developer would write; the certificates come by ``credentialName`` from Secret directories in
both layouts Istio accepts (cert-manager's ``tls.crt``/``tls.key``/``ca.crt`` and the generic
``cert``/``key``/``cacert``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
import redis
import yaml

from support.certs import PKI, Pair
from support.mariadb_server import MariaDB
from support.net import free_port
from support.pg_server import PostgresTLS
from support.proc import Dbmtls
from support.redis_server import RedisTLS

pytestmark = pytest.mark.e2e

NS = "shop"
REDIS_SE_HOST = "cache.mesh.test"
REDIS_SE_ALIAS = "cache-alias.mesh.test"  # verified through the ServiceEntry's subjectAltNames
REDIS_SE_WRONG = "cache-wrong.mesh.test"  # its ServiceEntry names a SAN the server does not have
PG_SE_HOST = "orders.mesh.test"
MARIA_SE_HOST = "catalog.mesh.test"
PG_USER = "jinsu"  # cert authentication: the client certificate's CN
MARIA_USER, MARIA_PASSWORD = "x509user", "x509-pw"


def fqdn(name: str) -> str:
    return f"{name}.{NS}.svc.cluster.local"


@dataclass
class Mesh:
    proxy: Dbmtls
    files: list[Path]
    listen: dict[str, int]  # database name -> the port dbmtls listens on


def _secret(root: Path, name: str, client: Pair, ca: str, generic: bool) -> None:
    """A Secret's files as the kubelet mounts them, in one of the two layouts Istio accepts."""
    d = root / name
    d.mkdir(parents=True)
    names = ("cert", "key", "cacert") if generic else ("tls.crt", "tls.key", "ca.crt")
    for src, dst in zip((client.cert, client.key, ca), names, strict=True):
        shutil.copyfile(src, d / dst)
        (d / dst).chmod(0o600)


def _se(name: str, host: str, port: dict[str, Any], target: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "hosts": [host],
            "ports": [port],
            "location": "MESH_EXTERNAL",
            "resolution": "STATIC",
            "endpoints": [{"address": "127.0.0.1", "ports": {port["name"]: target}}],
            **spec,
        },
    }


def _svc(name: str, port: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"app": name}, "ports": [port]},
    }


def _dr(name: str, host: str, credential: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"host": host, "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": credential}}, **spec},
    }


@pytest.fixture(scope="module")
def servers(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    # the name verified is the rule's host as written (short, namespaced or full), as for any rule
    redis_cert = pki.server_for(REDIS_SE_HOST, fqdn("cache"))
    pg_cert = pki.server_for(PG_SE_HOST, fqdn("orders"), "orders")
    maria_cert = pki.server_for(MARIA_SE_HOST, fqdn("catalog"), f"catalog.{NS}")
    started: list[Any] = []
    try:
        cache = RedisTLS(tmp_path_factory.mktemp("redis"), redis_cert, pki.ca_cert).start()
        started.append(cache)
        pg = PostgresTLS(pg_cert, pki.ca_cert).start()
        started.append(pg)
        pg.create_user(PG_USER)
        maria = MariaDB(maria_cert, pki.ca_cert).start()
        started.append(maria)
        maria.sql(
            f"CREATE USER '{MARIA_USER}'@'%' IDENTIFIED BY '{MARIA_PASSWORD}' REQUIRE X509;\n"
            f"GRANT USAGE ON *.* TO '{MARIA_USER}'@'%';\n"
        )
        yield {"redis": cache, "pg": pg, "maria": maria}
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture(scope="module")
def mesh(pki: PKI, servers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("mesh")
    creds = work / "credentials"
    _secret(creds, "app-client", pki.client, pki.ca_cert, generic=False)
    _secret(creds, "app-client-generic", pki.client, pki.ca_cert, generic=True)
    cache, pg, maria = servers["redis"], servers["pg"], servers["maria"]
    # the ServiceEntries' port numbers are what the app uses: dbmtls listens on them
    se_ports = {"redis-se": free_port(), "redis-se-alias": free_port(), "redis-se-wrong": free_port()}
    se_ports |= {"pg-se": free_port(), "maria-se": free_port()}
    redis_port = {"name": "tcp-cache", "protocol": "REDIS"}
    docs: list[dict[str, Any]] = [
        # --- ServiceEntry + DestinationRule -------------------------------------------------------
        _se("cache", REDIS_SE_HOST, {**redis_port, "number": se_ports["redis-se"]}, cache.port),
        _dr(
            "redis-se",
            REDIS_SE_HOST,
            "app-client",
            trafficPolicy={
                "tls": {"mode": "MUTUAL", "credentialName": "app-client"},
                "loadBalancer": {"simple": "LEAST_REQUEST"},  # only a mesh balances: listed as ignored
            },
        ),
        _se(
            "cache-alias",
            REDIS_SE_ALIAS,
            {**redis_port, "number": se_ports["redis-se-alias"]},
            cache.port,
            subjectAltNames=[REDIS_SE_HOST],
        ),
        _dr("redis-se-alias", REDIS_SE_ALIAS, "app-client"),
        _se(
            "cache-wrong",
            REDIS_SE_WRONG,
            {**redis_port, "number": se_ports["redis-se-wrong"]},
            cache.port,
            subjectAltNames=["nobody.mesh.test"],
        ),
        _dr("redis-se-wrong", REDIS_SE_WRONG, "app-client"),
        _se("orders", PG_SE_HOST, {"number": se_ports["pg-se"], "name": "tcp-postgresql", "protocol": "TCP"}, pg.port),
        _dr("pg-se", PG_SE_HOST, "app-client-generic"),
        _se("catalog", MARIA_SE_HOST, {"number": se_ports["maria-se"], "name": "db", "protocol": "MYSQL"}, maria.port),
        _dr("maria-se", MARIA_SE_HOST, "app-client"),
        # --- Service + DestinationRule: the Service port is the server's; the laptop file below
        # moves the listener and dials the local server, as a developer would ---------------------
        _svc("cache", {"name": "redis", "port": cache.port, "targetPort": 6379}),
        _dr("redis-svc", fqdn("cache"), "app-client"),
        _svc("orders", {"name": "tcp-postgresql", "port": pg.port}),
        _dr("pg-svc", "orders", "app-client", subsets=[{"name": "v1", "labels": {"version": "v1"}}]),
        _svc("catalog", {"name": "db", "port": maria.port, "appProtocol": "mysql"}),
        _dr("maria-svc", f"catalog.{NS}", "app-client-generic"),
        # --- what a real file also holds ----------------------------------------------------------
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "orders"},
            "spec": {"hosts": ["orders"], "tcp": [{"route": [{"destination": {"host": "orders"}}]}]},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "lb-only"},
            "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
        },
    ]
    mesh_file = work / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    svc_listen = {"redis-svc": free_port(), "pg-svc": free_port(), "maria-svc": free_port()}
    local = {
        "credentialsDir": str(creds),
        "overrides": {name: {"listen": f"127.0.0.1:{port}", "dial": "127.0.0.1"} for name, port in svc_listen.items()},
    }
    local_file = work / "local.yaml"
    local_file.write_text(yaml.safe_dump(local))
    proxy = Dbmtls(work, mesh_file.read_text(), args=("-c", str(local_file)))
    listen = {**se_ports, **svc_listen}
    with proxy:
        proxy.start(wait_ports=tuple(listen.values()))
        yield Mesh(proxy, [proxy.config_path, local_file], listen)


def test_check_says_where_each_protocol_came_from(mesh: Mesh) -> None:
    args = [arg for f in mesh.files for arg in ("-c", str(f))]
    proc = subprocess.run(
        # the proxy under test holds the listen ports: --no-bind-check, as for any running dbmtls
        [sys.executable, "-m", "dbmtls", "check", "--json", "--no-bind-check", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    dbs = {d["name"]: d for d in out["databases"]}
    assert set(dbs) == set(mesh.listen)
    expected = {
        "redis-se": ("redis", "ServiceEntry shop/cache port", "protocol REDIS"),
        "pg-se": ("postgres", "ServiceEntry shop/orders port", "port name tcp-postgresql (the word 'postgresql')"),
        "maria-se": ("mysql", "ServiceEntry shop/catalog port", "protocol MYSQL"),
        "redis-svc": ("redis", "Service shop/cache port", "port name redis"),
        "pg-svc": ("postgres", "Service shop/orders port", "port name tcp-postgresql"),
        "maria-svc": ("mysql", "Service shop/catalog port", "appProtocol mysql"),
    }
    for name, (protocol, document, how) in expected.items():
        assert dbs[name]["values"]["protocol"] == protocol
        assert dbs[name]["provenance"]["protocol"]["from"].startswith(document)
        assert how in dbs[name]["provenance"]["protocol"]["from"]
    assert dbs["pg-se"]["provenance"]["tls.clientCertificate"]["from"] == (
        "credentialName app-client-generic: Istio generic Secret cert"
    )
    assert dbs["redis-svc"]["provenance"]["dial"]["path"] == "overrides.redis-svc.dial"
    assert {i["path"] for i in dbs["redis-se"]["ignored"]} >= {"spec.trafficPolicy.loadBalancer", "spec.location"}
    assert any(i["path"] == "spec.subsets" for i in dbs["pg-svc"]["ignored"])
    skipped = {n["message"] for n in out["notes"]}
    assert "VirtualService orders: not used by dbmtls, skipped" in skipped
    assert "no TLS settings: nothing for dbmtls to do, skipped" in skipped


@pytest.mark.parametrize("name", ["redis-se", "redis-se-alias", "redis-svc"])
def test_redis(mesh: Mesh, name: str) -> None:
    client = redis.Redis(host="127.0.0.1", port=mesh.listen[name], socket_timeout=10)
    try:
        assert client.set(f"k-{name}", "v") is True
        assert client.get(f"k-{name}") == b"v"
    finally:
        client.close()


def test_redis_failure_is_a_redis_error(mesh: Mesh) -> None:
    """The ServiceEntry's subjectAltNames are verified; the failure reaches the app as ``-ERR``."""
    client = redis.Redis(host="127.0.0.1", port=mesh.listen["redis-se-wrong"], socket_timeout=10)
    try:
        with pytest.raises(redis.ResponseError, match="dbmtls: \\[redis-se-wrong\\]"):
            client.ping()
    finally:
        client.close()
    mesh.proxy.wait_line(r"connection failed db=redis-se-wrong .*reason=name_mismatch\b")


@pytest.mark.parametrize("name", ["pg-se", "pg-svc"])
def test_postgresql(mesh: Mesh, name: str) -> None:
    conninfo = f"host=127.0.0.1 port={mesh.listen[name]} user={PG_USER} dbname=postgres"
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        row = conn.execute("select current_user, ssl, client_dn from pg_stat_ssl where pid = pg_backend_pid()")
        assert row.fetchone() == (PG_USER, True, f"/CN={PG_USER}")


@pytest.mark.parametrize("name", ["maria-se", "maria-svc"])
def test_mariadb(mesh: Mesh, name: str) -> None:
    conn = pymysql.connect(
        host="127.0.0.1", port=mesh.listen[name], user=MARIA_USER, password=MARIA_PASSWORD, connect_timeout=10
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
            (row,) = cur.fetchall()
            assert row[1].startswith("TLSv1.")
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone() == (f"{MARIA_USER}@%",)
    finally:
        conn.close()


def test_run_logs_what_it_ignored_and_skipped(mesh: Mesh) -> None:
    """A sidecar's log is often all anyone reads: the ignored fields and skipped documents are there."""
    ignored = mesh.proxy.wait_line(r"config field ignored db=redis-se .*spec\.trafficPolicy\.loadBalancer")
    assert "LEAST_REQUEST" not in ignored  # the field is named, its value is not echoed
    mesh.proxy.wait_line(r"config note .*VirtualService orders: not used by dbmtls, skipped")
