"""``dns`` config, resolv.conf parsing, the error texts and when the resolver is (never) asked.

The resolution itself, against a real DNS server, is in ``tests/e2e/test_dns_direct.py``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import dns.message
import dns.resolver
import pytest
import yaml
from click.testing import CliRunner

from dbmtls.cli import main
from dbmtls.config.load import load_config
from dbmtls.config.model import Config, DnsConfig
from dbmtls.errors import ConfigError, NameNotResolved, Reason
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.resolver import DirectResolver, load_setup
from dbmtls.proxy.runtime import Conn, DatabaseRuntime
from dbmtls.proxy.server import Proxy
from dbmtls.proxy.upstream import Dialer

K8S_RESOLV_CONF = """\
# written by the kubelet
nameserver 10.96.0.10
search ns1.svc.cluster.local svc.cluster.local cluster.local
options ndots:5 timeout:3 rotate
"""


def database(address: str = "foo-redis-master:6379") -> dict[str, Any]:
    return {"name": "cache", "protocol": "redis", "listen": "127.0.0.1:16379", "address": address}


def load(tmp_path: Path, dns_section: Any, address: str = "foo-redis-master:6379") -> Config:
    p = tmp_path / "dbmtls.yaml"
    p.write_text(yaml.safe_dump({"databases": [database(address)], "dns": dns_section}))
    return load_config([p])


def config_error(tmp_path: Path, dns_section: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, dns_section)
    return info.value


# --- config --------------------------------------------------------------------------------------


def test_default_is_system(tmp_path: Path) -> None:
    p = tmp_path / "dbmtls.yaml"
    p.write_text(yaml.safe_dump({"databases": [database()]}))
    assert load_config([p]).dns == DnsConfig(mode="system")


def test_direct_with_every_field(tmp_path: Path) -> None:
    section = {
        "mode": "direct",
        "resolvConf": "/run/resolv.conf",
        "nameservers": ["10.96.0.10", "127.0.0.1:5353", "[fd00::10]:53", "fd00::11"],
        "timeout": "1500ms",
    }
    d = load(tmp_path, section).dns
    assert (d.mode, d.resolvConf, d.timeout) == ("direct", "/run/resolv.conf", 1.5)
    assert d.nameserver_addresses == (("10.96.0.10", 53), ("127.0.0.1", 5353), ("fd00::10", 53), ("fd00::11", 53))


@pytest.mark.parametrize(
    ("section", "path", "text"),
    [
        ({"mode": "dirct"}, "dns.mode", "'system' or 'direct'"),
        ({"mode": "direct", "nameservers": ["dns.example"]}, "dns.nameservers[0]", "must be an IP address"),
        ({"mode": "direct", "nameservers": ["10.0.0.1", "10.0.0.2:99999"]}, "dns.nameservers[1]", "port must be"),
        ({"mode": "direct", "nameservers": ["fd00::1]:53"]}, "dns.nameservers[0]", "[addr]:port"),
        ({"mode": "direct", "nameservers": "10.0.0.1"}, "dns.nameservers", "tuple"),
        ({"mode": "direct", "timeout": "soon"}, "dns.timeout", "expected a duration"),
        ({"mode": "direct", "timeout": 0}, "dns.timeout", "must be positive"),
        ({"mode": "direct", "resolvConf": ""}, "dns.resolvConf", "at least 1 character"),
        ({"mode": "direct", "resolvconf": "/x"}, "dns.resolvconf", "unknown field"),
        ({"nameservers": ["10.0.0.1"]}, "dns.nameservers", "mode system resolves with getaddrinfo"),
        ({"mode": "system", "resolvConf": "/x"}, "dns.resolvConf", "set mode: direct, or remove resolvConf"),
        ({"mode": "system", "timeout": "2s"}, "dns.timeout", "ignores timeout"),
        ("direct", "dns", "valid dictionary"),
    ],
)
def test_bad_dns_sections_name_the_path(tmp_path: Path, section: Any, path: str, text: str) -> None:
    err = config_error(tmp_path, section)
    assert err.path == path
    assert text in err.message
    assert "Value error" not in err.message


def test_printed_effective_config_loads_again(tmp_path: Path) -> None:
    """``dbmtls check`` prints every field, defaults included: mode system with the default
    values must not be refused as "ignored settings"."""
    dumped = load(tmp_path, {"mode": "system"}).model_dump(mode="json")
    assert dumped["dns"] == {"mode": "system", "resolvConf": "/etc/resolv.conf", "nameservers": [], "timeout": 5.0}
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(dumped))
    assert load_config([again]).dns.mode == "system"


def test_last_file_sets_dns(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text(yaml.safe_dump({"databases": [database()], "dns": {"mode": "direct"}}))
    second = tmp_path / "b.yaml"
    second.write_text(yaml.safe_dump({"dns": {"mode": "direct", "timeout": "2s"}}))
    assert load_config([first, second]).dns.timeout == 2.0


# --- resolv.conf ---------------------------------------------------------------------------------


def test_resolv_conf_of_a_pod() -> None:
    setup = load_setup(DnsConfig(mode="direct", timeout=4.0), K8S_RESOLV_CONF)
    assert setup.problem is None
    assert setup.resolver is not None
    assert setup.nameservers == ("10.96.0.10",)
    assert setup.search == ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert setup.ndots == 5
    assert (setup.resolver.timeout, setup.resolver.rotate, setup.resolver.lifetime) == (3.0, True, 4.0)
    assert setup.resolver.cache is not None
    assert setup.describe("/etc/resolv.conf") == (
        "nameservers 10.96.0.10; search ns1.svc.cluster.local svc.cluster.local cluster.local; ndots 5 "
        "(from /etc/resolv.conf)"
    )


def test_domain_line_is_the_search_list() -> None:
    setup = load_setup(DnsConfig(mode="direct"), "domain corp.example\nnameserver 192.0.2.1\n")
    assert setup.search == ("corp.example",)
    assert setup.ndots == 1


def test_nameservers_override_the_file_but_search_and_ndots_stay() -> None:
    config = DnsConfig(mode="direct", nameservers=("127.0.0.1:5353", "[::1]:5353", "192.0.2.9"))
    setup = load_setup(config, K8S_RESOLV_CONF)
    assert setup.nameservers == ("127.0.0.1:5353", "[::1]:5353", "192.0.2.9")
    assert setup.ndots == 5
    assert setup.search[0] == "ns1.svc.cluster.local"


def test_with_nameservers_the_file_needs_no_nameserver_line() -> None:
    text = "search ns1.svc.cluster.local\noptions ndots:3\n"
    setup = load_setup(DnsConfig(mode="direct", nameservers=("127.0.0.1:5353",)), text)
    assert setup.problem is None
    assert (setup.search, setup.ndots) == (("ns1.svc.cluster.local",), 3)


def test_no_nameserver_is_a_problem_not_a_crash() -> None:
    setup = load_setup(DnsConfig(mode="direct", resolvConf="/etc/resolv.conf"), "search a.example\n")
    assert setup.resolver is None
    assert setup.problem == "/etc/resolv.conf has no nameserver line (and dns.nameservers is empty)"


def test_unparseable_search_entry_is_a_problem() -> None:
    setup = load_setup(DnsConfig(mode="direct"), f"nameserver 10.0.0.1\nsearch {'x' * 70}.example\n")
    assert setup.resolver is None
    assert setup.problem is not None and setup.problem.startswith("cannot parse /etc/resolv.conf:")


def test_resolv_conf_is_parsed_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(K8S_RESOLV_CONF)
    resolver = DirectResolver(DnsConfig(mode="direct", resolvConf=str(path)))
    first = resolver.setup()
    assert resolver.setup() is first  # unchanged: the same resolver (and its cache)
    path.write_text(K8S_RESOLV_CONF.replace("10.96.0.10", "10.96.0.100"))
    second = resolver.setup()
    assert second is not first
    assert second.nameservers == ("10.96.0.100",)
    # renamed over (what editors and the kubelet do), same size, mtime put back: the inode differs
    st = path.stat()
    replacement = tmp_path / "resolv.conf.new"
    replacement.write_text(K8S_RESOLV_CONF.replace("10.96.0.10", "10.96.0.111"))
    assert replacement.stat().st_size == st.st_size
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    replacement.replace(path)
    assert resolver.setup().nameservers == ("10.96.0.111",)


def test_missing_resolv_conf_fails_each_resolution_then_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    resolver = DirectResolver(DnsConfig(mode="direct", resolvConf=str(path)))
    with pytest.raises(NameNotResolved) as info:
        asyncio.run(resolver.resolve("foo-redis-master"))
    assert info.value.message == (
        f"cannot resolve foo-redis-master (nameservers none): cannot read {path}: No such file or directory"
    )
    assert info.value.reason is Reason.CONNECTION_REFUSED
    path.write_text(K8S_RESOLV_CONF)
    assert resolver.setup().nameservers == ("10.96.0.10",)


# --- error texts ---------------------------------------------------------------------------------


def _resolver_answering(tmp_path: Path, answers: dict[str, Any]) -> DirectResolver:
    """A DirectResolver whose A/AAAA lookups return ``answers`` (addresses, or an exception)."""
    path = tmp_path / "resolv.conf"
    path.write_text(K8S_RESOLV_CONF)

    class Scripted(DirectResolver):
        @staticmethod
        async def _lookup(resolver: Any, host: str, rdtype: str, lifetime: float) -> tuple[str, ...] | Exception:
            answer = answers[rdtype]
            if isinstance(answer, float):
                await asyncio.sleep(answer)  # a nameserver that is slow for this type
                return ("2001:db8::7",)
            if isinstance(answer, tuple | Exception):
                return answer
            raise AssertionError(answer)

    return Scripted(DnsConfig(mode="direct", resolvConf=str(path), timeout=0.5))


def dns_error(cls: type[Exception], **kwargs: Any) -> Exception:
    """A dnspython exception (its constructors carry no type annotations)."""
    return cls(**kwargs)


def _refused() -> Exception:
    return dns_error(
        dns.resolver.NoNameservers,
        request=dns.message.make_query("foo-redis-master.", "A"),
        errors=[("10.96.0.10", False, 53, "REFUSED", None), ("10.96.0.11", False, 5353, "SERVFAIL", None)],
    )


WHERE = "searched ns1.svc.cluster.local, svc.cluster.local, cluster.local; nameservers 10.96.0.10"


@pytest.mark.parametrize(
    ("a", "aaaa", "what"),
    [
        (dns_error(dns.resolver.NXDOMAIN), dns_error(dns.resolver.NXDOMAIN), "NXDOMAIN (no such name)"),
        (dns_error(dns.resolver.NoAnswer), dns_error(dns.resolver.NoAnswer), "no A or AAAA record"),
        (
            dns_error(dns.resolver.LifetimeTimeout, timeout=0.5, errors=[]),
            dns_error(dns.resolver.NXDOMAIN),
            "A: no answer within 0.5s",
        ),
        (
            _refused(),
            _refused(),
            "no nameserver gave an answer (10.96.0.10 answered REFUSED; 10.96.0.11:5353 answered SERVFAIL)",
        ),
        (
            dns_error(dns.resolver.NoAnswer),
            dns_error(dns.resolver.NXDOMAIN),
            "A: no A record; AAAA: NXDOMAIN (no such name)",
        ),
    ],
)
def test_failure_messages(tmp_path: Path, a: Exception, aaaa: Exception, what: str) -> None:
    resolver = _resolver_answering(tmp_path, {"A": a, "AAAA": aaaa})
    with pytest.raises(NameNotResolved) as info:
        asyncio.run(resolver.resolve("foo-redis-master"))
    assert info.value.message.startswith(f"cannot resolve foo-redis-master ({WHERE}): {what}")
    assert "dbmtls check" in (info.value.hint or "")


def test_absolute_name_is_not_searched(tmp_path: Path) -> None:
    resolver = _resolver_answering(
        tmp_path, {"A": dns_error(dns.resolver.NXDOMAIN), "AAAA": dns_error(dns.resolver.NXDOMAIN)}
    )
    with pytest.raises(NameNotResolved) as info:
        asyncio.run(resolver.resolve("db.example."))
    assert info.value.message == "cannot resolve db.example. (nameservers 10.96.0.10): NXDOMAIN (no such name)"


def test_ipv4_first_then_ipv6(tmp_path: Path) -> None:
    resolver = _resolver_answering(tmp_path, {"A": ("10.0.0.7", "10.0.0.8"), "AAAA": ("2001:db8::7",)})
    assert asyncio.run(resolver.resolve("foo-redis-master")) == ("10.0.0.7", "10.0.0.8", "2001:db8::7")


def test_a_slow_aaaa_does_not_hold_up_a_found_a(tmp_path: Path) -> None:
    resolver = _resolver_answering(tmp_path, {"A": ("10.0.0.7",), "AAAA": 30.0})

    async def timed() -> tuple[tuple[str, ...], float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        found = await resolver.resolve("foo-redis-master")
        return found, loop.time() - started

    found, took = asyncio.run(timed())
    assert found == ("10.0.0.7",)
    assert took < 1.0  # AAAA got its 50 ms, not the 0.5 s timeout (nor its 30 s)


def test_aaaa_alone_is_enough(tmp_path: Path) -> None:
    resolver = _resolver_answering(tmp_path, {"A": dns_error(dns.resolver.NoAnswer), "AAAA": ("2001:db8::9",)})
    assert asyncio.run(resolver.resolve("foo-redis-master")) == ("2001:db8::9",)


def test_localhost_never_asks_dns(tmp_path: Path) -> None:
    resolver = _resolver_answering(tmp_path, {})  # any lookup would fail the test (KeyError)
    assert asyncio.run(resolver.resolve("localhost")) == ("127.0.0.1", "::1")


# --- when the resolver is asked ------------------------------------------------------------------


class Recording(DirectResolver):
    def __init__(self) -> None:
        super().__init__(DnsConfig(mode="direct"))
        self.asked: list[str] = []

    async def resolve(self, host: str) -> tuple[str, ...]:
        self.asked.append(host)
        return ("192.0.2.50",)


def _addresses(dialer: Dialer, address: str, dial: str | None = None) -> tuple[str, ...]:
    db = {**database(address), **({"dial": dial} if dial else {})}
    config = Config.model_validate({"databases": [db]})
    conn = Conn(DatabaseRuntime(config.databases[0], dialer), Endpoint(), "test")
    return asyncio.run(dialer.addresses(conn))


@pytest.mark.parametrize("address", ["10.0.0.7:6379", "[fd00::7]:6379", "127.0.0.1:6379"])
def test_ip_literals_never_ask_the_resolver(address: str) -> None:
    resolver = Recording()
    found = _addresses(Dialer(resolver), address)
    assert found == (address.rsplit(":", 1)[0].strip("[]"),)
    assert resolver.asked == []


def test_names_ask_the_resolver_and_dial_wins_over_address() -> None:
    resolver = Recording()
    assert _addresses(Dialer(resolver), "foo-redis-master:6379") == ("192.0.2.50",)
    assert _addresses(Dialer(resolver), "foo-redis-master:6379", dial="other-name:6380") == ("192.0.2.50",)
    assert _addresses(Dialer(resolver), "foo-redis-master:6379", dial="10.1.1.1:6380") == ("10.1.1.1",)
    assert resolver.asked == ["foo-redis-master", "other-name"]


def test_mode_system_has_no_resolver_and_passes_the_name_on(tmp_path: Path) -> None:
    proxy = Proxy(load(tmp_path, {"mode": "system"}))
    assert proxy.dialer.resolver is None
    assert _addresses(proxy.dialer, "foo-redis-master:6379") == ("foo-redis-master",)
    direct = Proxy(load(tmp_path, {"mode": "direct"}))
    assert isinstance(direct.dialer.resolver, DirectResolver)


# --- dbmtls check --------------------------------------------------------------------------------


def test_check_says_mode_system(tmp_path: Path) -> None:
    p = tmp_path / "dbmtls.yaml"
    p.write_text(yaml.safe_dump({"databases": [database()]}))
    result = CliRunner().invoke(main, ["check", "-c", str(p)])
    assert result.exit_code == 0, result.output
    assert "# dns: mode system (getaddrinfo: /etc/hosts first, then the system's DNS)" in result.stdout


def test_check_direct_with_a_broken_resolv_conf_fails(tmp_path: Path) -> None:
    rc = tmp_path / "resolv.conf"
    rc.write_text("search a.example\n")
    p = tmp_path / "dbmtls.yaml"
    p.write_text(yaml.safe_dump({"databases": [database()], "dns": {"mode": "direct", "resolvConf": str(rc)}}))
    result = CliRunner().invoke(main, ["check", "-c", str(p)])
    assert result.exit_code == 1
    assert f"# dns: mode direct (DNS only, never /etc/hosts): {rc} has no nameserver line" in result.stdout
    assert (
        f"dbmtls: error: database 'cache': cannot resolve foo-redis-master (searched a.example; nameservers none): "
        f"{rc} has no nameserver line" in result.stderr
    )


def test_check_direct_with_ip_addresses_only_asks_nothing(tmp_path: Path) -> None:
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 192.0.2.1\n")  # never asked: nothing there answers
    p = tmp_path / "dbmtls.yaml"
    p.write_text(
        yaml.safe_dump({"databases": [database("10.0.0.7:6379")], "dns": {"mode": "direct", "resolvConf": str(rc)}})
    )
    result = CliRunner().invoke(main, ["check", "-c", str(p)])
    assert result.exit_code == 0, result.output
    assert "nameservers 192.0.2.1; search " in result.stdout


# --- trying the addresses ------------------------------------------------------------------------


class Outcomes(Dialer):
    """``open`` fails or succeeds per address, as the test says; records the order."""

    def __init__(self, outcomes: dict[str, OSError | None]) -> None:
        super().__init__()
        self.outcomes = outcomes
        self.tried: list[str] = []

    async def open(self, conn: Conn, ep: Endpoint, host: str) -> None:
        self.tried.append(host)
        error = self.outcomes[host]
        if error is not None:
            raise error


def _open_any(dialer: Outcomes, hosts: tuple[str, ...]) -> None:
    config = Config.model_validate({"databases": [database()]})
    conn = Conn(DatabaseRuntime(config.databases[0], dialer), Endpoint(), "test")
    asyncio.run(dialer.open_any(conn, Endpoint(), hosts))


def test_addresses_are_tried_in_order_until_one_connects() -> None:
    dialer = Outcomes({"10.0.0.7": ConnectionRefusedError(111, "refused"), "10.0.0.8": None, "fd00::7": None})
    _open_any(dialer, ("10.0.0.7", "10.0.0.8", "fd00::7"))
    assert dialer.tried == ["10.0.0.7", "10.0.0.8"]


def test_all_refused_is_refused() -> None:
    dialer = Outcomes({"10.0.0.7": ConnectionRefusedError(111, "a"), "10.0.0.8": ConnectionRefusedError(111, "b")})
    with pytest.raises(ConnectionRefusedError):
        _open_any(dialer, ("10.0.0.7", "10.0.0.8"))
    assert dialer.tried == ["10.0.0.7", "10.0.0.8"]


def test_different_failures_are_all_named() -> None:
    dialer = Outcomes(
        {"10.0.0.7": ConnectionRefusedError(111, "Connection refused"), "fd00::7": OSError(101, "Network unreachable")}
    )
    with pytest.raises(OSError, match=r"^10\.0\.0\.7: Connection refused, fd00::7: Network unreachable$"):
        _open_any(dialer, ("10.0.0.7", "fd00::7"))
