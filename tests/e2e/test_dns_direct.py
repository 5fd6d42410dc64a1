"""``dns.mode: direct`` against a real DNS server (dnsmasq), end to end.

The Kubernetes situation, on one machine: the pod's /etc/hosts (hostAliases, shared by every
container) points foo-redis-master and its longer names at 127.0.0.1, where dbmtls listens;
the real server is elsewhere (here a TLS-only redis-server on 127.0.0.2, which Linux routes to
lo like all of 127/8), known only to DNS (dnsmasq, with the pod's search list and ndots:5 in a
resolv.conf the test writes).  dbmtls runs in a private mount namespace whose /etc/hosts is the
test's, so nothing on the machine changes.  In mode system it follows /etc/hosts to 127.0.0.1
(a decoy listener there sees the connection: the test would fail without the feature); in
mode direct it asks DNS only and reaches the real server, verified by its configured name.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from click.testing import CliRunner

from dbmtls.cli import main
from dbmtls.config.model import Config, DnsConfig
from dbmtls.errors import NameNotResolved, Reason
from dbmtls.protocols import mysql
from dbmtls.proxy.resolver import DirectResolver, make_resolver
from support.certs import PKI
from support.dnsmasq import Dnsmasq, write_resolv_conf
from support.net import free_port
from support.pg_wire import encode_startup
from support.proc import Dbmtls, tls_block
from support.redis_server import RedisTLS
from support.transcript import Harness, harness

pytestmark = pytest.mark.e2e

FQDN = "foo-redis-master.ns1.svc.cluster.local"
SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")
# every name an app in namespace ns1 may use for the Service, as the injector's hostAliases list them
HOST_ALIASES = ("foo-redis-master", "foo-redis-master.ns1", "foo-redis-master.ns1.svc", FQDN)
UNREACHABLE_NAMESERVER = "192.0.2.53"  # TEST-NET-1: resolv.conf's own line, replaced by dns.nameservers


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"), {FQDN: "127.0.0.2"}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def resolv_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resolv") / "resolv.conf"
    return write_resolv_conf(path, nameservers=[UNREACHABLE_NAMESERVER], search=SEARCH, ndots=5)


def direct(dnsmasq: Dnsmasq, resolv_conf: Path, **more: Any) -> DnsConfig:
    return DnsConfig(mode="direct", resolvConf=str(resolv_conf), nameservers=(dnsmasq.nameserver,), **more)


def where(dnsmasq: Dnsmasq) -> str:
    return f"searched {', '.join(SEARCH)}; nameservers {dnsmasq.nameserver}"


# --- the resolver against dnsmasq ----------------------------------------------------------------


@pytest.mark.parametrize("name", [*HOST_ALIASES, f"{FQDN}."])
def test_every_service_name_resolves_through_the_search_list(dnsmasq: Dnsmasq, resolv_conf: Path, name: str) -> None:
    resolver = DirectResolver(direct(dnsmasq, resolv_conf))
    assert asyncio.run(resolver.resolve(name)) == ("127.0.0.2",)


def test_short_name_is_searched_first_with_ndots_5(dnsmasq: Dnsmasq, resolv_conf: Path) -> None:
    before = len(dnsmasq.queries())
    resolver = DirectResolver(direct(dnsmasq, resolv_conf))
    asyncio.run(resolver.resolve("foo-redis-master"))
    asked = dnsmasq.queries()[before:]
    # A and AAAA each walk the search list and stop at the first suffix that exists
    assert sorted(asked) == [f"A {FQDN}", f"AAAA {FQDN}"]
    # answers (AAAA's "no record" too) are cached for their TTL: a second resolution asks nothing
    assert asyncio.run(resolver.resolve("foo-redis-master")) == ("127.0.0.2",)
    assert dnsmasq.queries()[before + 2 :] == []
    # ... while a fresh resolver (a changed resolv.conf) asks again
    asyncio.run(DirectResolver(direct(dnsmasq, resolv_conf)).resolve("foo-redis-master"))
    assert len(dnsmasq.queries()) == before + 4


def test_nxdomain_names_the_name_the_search_list_and_the_nameserver(dnsmasq: Dnsmasq, resolv_conf: Path) -> None:
    resolver = DirectResolver(direct(dnsmasq, resolv_conf))
    with pytest.raises(NameNotResolved) as info:
        asyncio.run(resolver.resolve("no-such-db"))
    assert info.value.message == f"cannot resolve no-such-db ({where(dnsmasq)}): NXDOMAIN (no such name)"
    assert info.value.reason is Reason.CONNECTION_REFUSED
    assert f"A no-such-db.{SEARCH[0]}" in dnsmasq.queries()
    assert "A no-such-db" in dnsmasq.queries()  # ... and the name as it is, last


def test_a_nameserver_that_never_answers_is_a_timeout(resolv_conf: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        ns = f"127.0.0.1:{silent.getsockname()[1]}"
        config = DnsConfig(mode="direct", resolvConf=str(resolv_conf), nameservers=(ns,), timeout=0.4)
        resolver = DirectResolver(config)
        started = time.monotonic()
        with pytest.raises(NameNotResolved) as info:
            asyncio.run(resolver.resolve("foo-redis-master"))
        took = time.monotonic() - started
    assert info.value.message == (
        f"cannot resolve foo-redis-master (searched {', '.join(SEARCH)}; nameservers {ns}): no answer within 0.4s"
    )
    assert 0.3 < took < 2.0


def test_the_nameserver_line_of_resolv_conf(tmp_path: Path) -> None:
    """The pod's own path: no dns.nameservers, the nameserver comes from resolv.conf, port 53
    (a resolv.conf line has no port, so this dnsmasq listens on 53 of an address of its own)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a DNS server on port 53 for a resolv.conf nameserver line")
    server = Dnsmasq(tmp_path / "dnsmasq", {FQDN: "127.0.0.2"}, listen="127.53.0.1", port=53)
    try:
        server.start()
    except AssertionError as exc:
        pytest.skip(f"port 53 of 127.53.0.1 is not available: {exc}")
    try:
        rc = write_resolv_conf(tmp_path / "resolv.conf", nameservers=["127.53.0.1"], search=SEARCH, ndots=5)
        resolver = DirectResolver(DnsConfig(mode="direct", resolvConf=str(rc)))
        assert asyncio.run(resolver.resolve("foo-redis-master")) == ("127.0.0.2",)
        assert f"A {FQDN}" in server.queries()
        with pytest.raises(NameNotResolved) as info:
            asyncio.run(resolver.resolve("no-such-db"))
        assert "; nameservers 127.53.0.1): NXDOMAIN" in info.value.message
    finally:
        server.stop()


# --- the app's error, per protocol (the sessions with a scripted server, the DNS real) -------------


def _proxied(pki: PKI, protocol: str, address: str, dns_config: DnsConfig) -> Config:
    tls = {"mode": "MUTUAL", "clientCertificate": pki.client.cert, "privateKey": pki.client.key}
    tls["caCertificates"] = pki.ca_cert
    db = {"name": "db", "protocol": protocol, "listen": "127.0.0.1:1", "address": address, "tls": tls}
    return Config.model_validate({"databases": [db], "dns": dns_config.model_dump()})


def _run(config: Config, script: Any) -> Harness:
    async def go() -> Harness:
        async with harness(config) as h:
            h.dialer.resolver = make_resolver(config.dns)
            await script(h)
            await h.finished()
            return h

    return asyncio.run(go())


def test_session_dials_the_address_dns_gave(pki: PKI, dnsmasq: Dnsmasq, resolv_conf: Path) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        server = await h.dialer.server()
        app.send(b"PING\r\n")
        await server.expect(b"PING\r\n")
        server.send(b"+PONG\r\n")
        await app.expect(b"+PONG\r\n")
        server.hang_up()
        assert await app.closed() == b""

    h = _run(_proxied(pki, "redis", "foo-redis-master:6379", direct(dnsmasq, resolv_conf)), script)
    assert h.dialer.hosts == ["127.0.0.2"]


def test_postgres_app_gets_fatal_08001_naming_the_dns_failure(pki: PKI, dnsmasq: Dnsmasq, resolv_conf: Path) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        app.send(encode_startup((3, 0), {"user": "alice", "database": "shop"}))
        said = await app.closed()
        assert said[:1] == b"E"
        assert b"SFATAL\0" in said
        assert b"C08001\0" in said
        assert f"cannot resolve no-such-db ({where(dnsmasq)}): NXDOMAIN".encode() in said

    h = _run(_proxied(pki, "postgres", "no-such-db:5432", direct(dnsmasq, resolv_conf)), script)
    assert h.conns[0].error is not None and h.conns[0].error.reason is Reason.CONNECTION_REFUSED
    assert h.dialer.hosts == []  # nothing was dialled


def test_mysql_app_gets_an_err_packet_naming_the_dns_failure(pki: PKI, dnsmasq: Dnsmasq, resolv_conf: Path) -> None:
    async def script(h: Harness) -> None:
        app = h.connect()
        said = await app.closed()
        payload = said[4:]
        assert payload[:1] == b"\xff"
        assert int.from_bytes(payload[1:3], "little") == mysql.ER_HANDSHAKE_ERROR[0]
        assert b"cannot resolve no-such-db (" in payload
        assert b"NXDOMAIN" in payload

    _run(_proxied(pki, "mysql", "no-such-db:3306", direct(dnsmasq, resolv_conf)), script)


# --- dbmtls check ----------------------------------------------------------------------------------


def test_check_resolves_every_database_and_fails_on_nxdomain(
    dnsmasq: Dnsmasq, resolv_conf: Path, tmp_path: Path
) -> None:
    databases = [
        {"name": "cache", "protocol": "redis", "listen": "127.0.0.1:16379", "address": "foo-redis-master:6379"},
        {"name": "lost", "protocol": "redis", "listen": "127.0.0.1:16380", "address": "no-such-db:6379"},
        {"name": "byip", "protocol": "redis", "listen": "127.0.0.1:16381", "address": "10.0.0.7:6379"},
    ]
    dns_section = direct(dnsmasq, resolv_conf).model_dump()
    p = tmp_path / "dbmtls.yaml"
    p.write_text(yaml.safe_dump({"databases": databases, "dns": dns_section}))
    before = len(dnsmasq.queries())
    result = CliRunner().invoke(main, ["check", "-c", str(p)])
    assert result.exit_code == 1, result.output
    assert f"# dns: mode direct (DNS only, never /etc/hosts): nameservers {dnsmasq.nameserver}; " in result.stdout
    assert "#   cache: foo-redis-master -> 127.0.0.2" in result.stdout
    assert f"dbmtls: error: database 'lost': cannot resolve no-such-db ({where(dnsmasq)}): NXDOMAIN" in result.stderr
    assert "cache" not in result.stderr
    assert not any("10.0.0.7" in q for q in dnsmasq.queries()[before:])  # an IP is never asked
    assert yaml.safe_load(result.stdout)["dns"]["mode"] == "direct"  # the comments keep it YAML


# --- end to end: a real redis-server, dbmtls in a pod-like /etc/hosts ----------------------------


class Decoy:
    """Whatever listens on 127.0.0.1 at the server's port (in a pod: dbmtls itself): it counts
    the connections it gets and closes them."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the test is over
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=5)


def private_hosts(hosts: Path) -> tuple[str, ...]:
    """The command prefix that runs a program with ``hosts`` as its /etc/hosts (skip if impossible)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: dbmtls runs in a private mount namespace with its own /etc/hosts")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private /etc/hosts")
    wrap = (
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
    )  # fmt: skip
    probe = [*wrap, sys.executable, "-c", "import socket; print(socket.gethostbyname('foo-redis-master'))"]
    out = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or out.stdout.strip() != "127.0.0.1":
        pytest.skip(f"cannot give dbmtls a private /etc/hosts (unshare --mount): {out.stderr.strip() or out.stdout}")
    return wrap


@dataclass
class Pod:
    pki: PKI
    port: int  # the server's port: redis on 127.0.0.2, the decoy on 127.0.0.1
    decoy: Decoy
    wrap: tuple[str, ...]
    work: Path

    def dbmtls(self, dns_section: dict[str, Any]) -> tuple[Dbmtls, dict[str, int]]:
        ports = {"cache": free_port(), "lost": free_port()}
        databases = [
            {
                "name": name,
                "protocol": "redis",
                "listen": f"127.0.0.1:{ports[name]}",
                "address": f"{host}:{self.port}",
                "tls": tls_block(self.pki),
                "connectTimeout": "3s",
                "handshakeTimeout": "3s",
            }
            for name, host in (("cache", "foo-redis-master"), ("lost", "no-such-db"))
        ]
        config = {"databases": databases, "dns": dns_section, "drainTimeout": "2s"}
        proc = Dbmtls(self.work, config, wrap=self.wrap).start(wait_ports=tuple(ports.values()))
        return proc, ports


@pytest.fixture(scope="module")
def pod(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    work = tmp_path_factory.mktemp("pod")
    hosts = work / "hosts"
    # what the injector's hostAliases make of the pod's /etc/hosts (no-such-db too: mode direct
    # must not find it there either)
    hosts.write_text(f"127.0.0.1\tlocalhost\n127.0.0.1\t{' '.join(HOST_ALIASES)} no-such-db\n")
    wrap = private_hosts(hosts)
    decoy = Decoy(free_port())
    # the certificate carries the Service's names, not 127.0.0.2: dbmtls must verify the name
    server_pair = pki.server_for("foo-redis-master", FQDN)
    server = RedisTLS(work / "redis", server_pair, pki.ca_cert, bind="127.0.0.2", port=decoy.sock.getsockname()[1])
    server.start()
    try:
        yield Pod(pki, server.port, decoy, wrap, work)
    finally:
        server.stop()
        decoy.close()


def test_mode_system_follows_etc_hosts_to_127_0_0_1(pod: Pod) -> None:
    """The setup is the pod's: without mode direct, dbmtls connects to 127.0.0.1 (itself, in a pod)."""
    proc, ports = pod.dbmtls({"mode": "system"})
    try:
        before = pod.decoy.accepted
        client = redis.Redis(port=ports["cache"], socket_timeout=15)
        with pytest.raises(redis.ResponseError, match=r"^dbmtls: \[cache\] foo-redis-master:\d+ closed the conn"):
            client.set("foo", "bar")
        client.close()
        assert pod.decoy.accepted > before
    finally:
        assert proc.stop() == 0


def test_mode_direct_reaches_the_real_server_and_names_nxdomain(pod: Pod, dnsmasq: Dnsmasq, resolv_conf: Path) -> None:
    dns_section = {"mode": "direct", "resolvConf": str(resolv_conf), "nameservers": [dnsmasq.nameserver]}
    proc, ports = pod.dbmtls(dns_section)
    try:
        before = pod.decoy.accepted
        client = redis.Redis(port=ports["cache"], socket_timeout=15)
        assert client.set("foo", "bar")
        assert client.get("foo") == b"bar"
        client.close()
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(ports["cache"]), "GET", "foo"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout.strip() == "bar", out
        assert pod.decoy.accepted == before  # /etc/hosts was not followed
        assert f"A {FQDN}" in dnsmasq.queries()
        line = proc.wait_line(r"dns mode direct: names are resolved through DNS only")
        assert f"nameservers={dnsmasq.nameserver}" in line
        # a name DNS does not know (though /etc/hosts does): the app reads why
        lost = redis.Redis(port=ports["lost"], socket_timeout=15)
        expected = f"dbmtls: [lost] cannot resolve no-such-db ({where(dnsmasq)}): NXDOMAIN (no such name)"
        with pytest.raises(redis.ResponseError) as info:
            lost.set("foo", "bar")
        lost.close()
        assert str(info.value).startswith(expected)
        assert "(hint: check the database address" in str(info.value)
        line = proc.wait_line(r"connection failed db=lost .*reason=connection_refused\b")
        assert "cannot resolve no-such-db" in line
    finally:
        assert proc.stop() == 0


def test_connect_failure_says_what_dns_gave(pki: PKI, dnsmasq: Dnsmasq, resolv_conf: Path) -> None:
    async def script(h: Harness) -> None:
        h.dialer.refuse = ConnectionRefusedError()
        app = h.connect()
        app.send(b"PING\r\n")
        app.send_eof()
        said = await app.closed()
        assert said.startswith(
            b"-ERR dbmtls: [db] connection to foo-redis-master:6379 refused (foo-redis-master resolved to 127.0.0.2)"
        ), said

    h = _run(_proxied(pki, "redis", "foo-redis-master:6379", direct(dnsmasq, resolv_conf)), script)
    assert h.dialer.hosts == ["127.0.0.2"]
