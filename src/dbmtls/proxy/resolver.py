"""Resolving the servers' names through DNS only (``dns.mode: direct``).

Why not getaddrinfo: it reads /etc/hosts first.  In a Kubernetes pod the injector's
``hostAliases`` point every name the app uses for a database at 127.0.0.1, where dbmtls
listens, and /etc/hosts is shared by all the pod's containers: through getaddrinfo dbmtls
would connect to itself.  So in mode direct the names are asked of the nameservers of
resolv.conf (or ``dns.nameservers``), with its search list and ndots, as glibc's DNS backend
would, and /etc/hosts is never read.

One resolver per process, reused by every connection.  resolv.conf is ``stat``-ed at each
resolution and parsed again only when it changed (device, inode, mtime, size): a stat costs
microseconds next to a DNS round trip, needs no watcher, and sees both an in-place write and
a file renamed over it.  What the parse gave, a usable resolver or the problem with the file,
is kept until the file changes, so a broken file is not parsed again per connection either.

Answers are cached for their TTL (dnspython's cache, negative answers included), so that
connection churn does not become a DNS query per connection; the cache goes with the resolver
when resolv.conf changes.  A and AAAA are asked concurrently, each walking the search list.
Addresses are tried IPv4 first, then IPv6: most clusters are IPv4 (AAAA gets no answer) or
dual-stack (both work), and an IPv6 route that silently drops packets would otherwise use up
the whole connectTimeout before IPv4 is tried.  Once A has answered, AAAA gets 50 ms more
(RFC 8305's resolution delay) so that a nameserver that never answers AAAA does not hold up
every connection.

Every failure becomes :class:`~dbmtls.errors.NameNotResolved`, whose message names the name,
the search list, the nameservers and what they answered.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dbmtls.config.model import DnsConfig
from dbmtls.errors import NameNotResolved

if TYPE_CHECKING:
    import dns.asyncresolver

# dnspython is imported where it is used, not here: only ``dns.mode: direct`` needs it, and with
# what it pulls in (its DNS-over-HTTPS/QUIC transports: httpx, h2, anyio, ...) it is 6 to 7 MiB
# of RSS that every other process would carry for nothing (docs/memory.md).

# RFC 8305 "Resolution Delay": how long AAAA may lag behind a successful A.
AAAA_GRACE = 0.05
# RFC 6761 6.3: "localhost" is loopback without asking DNS (glibc gets it from /etc/hosts).
_LOCALHOST = ("127.0.0.1", "::1")


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ns_text(address: str, port: int) -> str:
    shown = f"[{address}]" if ":" in address else address
    return shown if port == 53 else f"{shown}:{port}"


@dataclass(frozen=True)
class Setup:
    """What one version of resolv.conf (plus ``dns.nameservers``) gives."""

    resolver: dns.asyncresolver.Resolver | None  # None: ``problem`` says why
    problem: str | None
    search: tuple[str, ...]  # the suffixes tried for a relative name (search list, else domain)
    ndots: int
    nameservers: tuple[str, ...]  # as people write them: "10.96.0.10", "127.0.0.1:5353"

    def describe(self, source: str) -> str:
        if self.problem:
            return self.problem
        search = " ".join(self.search) or "none"
        return f"nameservers {', '.join(self.nameservers)}; search {search}; ndots {self.ndots} (from {source})"


def load_setup(config: DnsConfig, text: str) -> Setup:
    """Parse resolv.conf ``text`` with dnspython's parser, then apply ``dns.nameservers``."""
    import dns.asyncresolver
    import dns.exception
    import dns.name
    import dns.nameserver
    import dns.resolver

    path = config.resolvConf
    resolver = dns.asyncresolver.Resolver(configure=False)
    problem = None
    try:
        resolver.read_resolv_conf(io.StringIO(text))
    except dns.resolver.NoResolverConfiguration:
        # raised at the end, after the search list and options were read: with
        # dns.nameservers the file needs no nameserver line
        if not config.nameservers:
            problem = f"{path} has no nameserver line (and dns.nameservers is empty)"
    except (dns.exception.DNSException, ValueError) as exc:
        problem = f"cannot parse {path}: {exc}"
    if config.nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in config.nameserver_addresses]
    resolver.lifetime = config.timeout
    resolver.cache = dns.resolver.Cache()
    servers: list[str] = []
    for ns in resolver.nameservers:
        if isinstance(ns, dns.nameserver.Do53Nameserver):
            servers.append(_ns_text(ns.address, ns.port))
        else:
            servers.append(str(ns))
    if resolver.search:
        search = tuple(s.to_text(omit_final_dot=True) for s in resolver.search)
    elif resolver.domain is not None and resolver.domain != dns.name.root:
        search = (resolver.domain.to_text(omit_final_dot=True),)
    else:
        search = ()
    return Setup(
        resolver=None if problem else resolver,
        problem=problem,
        search=search,
        ndots=1 if resolver.ndots is None else resolver.ndots,
        nameservers=tuple(servers),
    )


def _failure_text(exc: BaseException, rdtype: str, timeout: float) -> str:
    """What one A or AAAA lookup ran into, in words."""
    import dns.exception  # loaded already: the lookup that failed came from load_setup's resolver
    import dns.name
    import dns.resolver

    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "NXDOMAIN (no such name)"
    if isinstance(exc, dns.resolver.NoAnswer):
        return f"no {rdtype} record"
    if isinstance(exc, dns.exception.Timeout | TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        said = "; ".join(f"{_ns_text(str(e[0]), int(e[2]))} answered {e[3]}" for e in errors)
        return f"no nameserver gave an answer ({said or 'none left to ask'})"
    if isinstance(exc, dns.resolver.YXDOMAIN):
        return "the name is too long once a search suffix is added (YXDOMAIN)"
    if isinstance(exc, dns.name.NameTooLong | dns.name.LabelTooLong | dns.name.EmptyLabel):
        return f"not a valid DNS name ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _combine(failures: dict[str, str]) -> str:
    a, aaaa = failures["A"], failures["AAAA"]
    if a == aaaa:
        return a
    if a == "no A record" and aaaa == "no AAAA record":
        return "no A or AAAA record"
    return f"A: {a}; AAAA: {aaaa}"


class DirectResolver:
    """DNS-only resolution of server names; one per process (see the module docstring)."""

    def __init__(self, config: DnsConfig) -> None:
        self.config = config
        self._key: tuple[int, int, int, int] | None = None
        self._setup: Setup | None = None

    def setup(self) -> Setup:
        """The current setup, parsing resolv.conf again only when it changed."""
        path = self.config.resolvConf
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._key or self._setup is None:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                self._setup = load_setup(self.config, text)
                self._key = key
        except OSError as exc:
            # not kept: the file may appear any moment (and a stat that fails is as cheap)
            self._key = None
            return Setup(None, f"cannot read {path}: {exc.strerror or exc}", (), 1, ())
        return self._setup

    def describe(self) -> str:
        return self.setup().describe(self.config.resolvConf)

    async def resolve(self, host: str) -> tuple[str, ...]:
        """``host``'s addresses, IPv4 first; raises NameNotResolved."""
        if host.rstrip(".").lower() == "localhost":
            return _LOCALHOST
        setup = self.setup()
        where = self._where(host, setup)
        if setup.resolver is None:
            raise NameNotResolved(f"cannot resolve {host} ({where}): {setup.problem}")
        timeout = self.config.timeout
        tasks = {
            rdtype: asyncio.ensure_future(self._lookup(setup.resolver, host, rdtype, timeout))
            for rdtype in ("A", "AAAA")
        }
        try:
            # backstop only: dnspython's own lifetime (the same timeout) ends each lookup
            async with asyncio.timeout(timeout + 1.0):
                await asyncio.wait([tasks["A"]])
                a = tasks["A"].result()
                if isinstance(a, tuple) and a:
                    await asyncio.wait([tasks["AAAA"]], timeout=AAAA_GRACE)
                else:
                    await asyncio.wait([tasks["AAAA"]])
        except TimeoutError:
            pass
        finally:
            for task in tasks.values():
                task.cancel()
        addresses: list[str] = []
        failures: dict[str, str] = {}
        for rdtype, task in tasks.items():
            if not task.done() or task.cancelled():
                failures[rdtype] = f"no answer within {timeout:g}s"
                continue
            result = task.result()
            if isinstance(result, tuple):
                addresses += result
            else:
                failures[rdtype] = _failure_text(result, rdtype, timeout)
        if addresses:
            return tuple(addresses)
        raise NameNotResolved(f"cannot resolve {host} ({where}): {_combine(failures)}")

    @staticmethod
    async def _lookup(
        resolver: dns.asyncresolver.Resolver, host: str, rdtype: str, lifetime: float
    ) -> tuple[str, ...] | Exception:
        """One record type through the search list; a failure is returned, never raised
        (so that a lookup nobody waits for any more cannot log "exception never retrieved")."""
        try:
            answer = await resolver.resolve(host, rdtype, search=True, lifetime=lifetime)
        except Exception as exc:
            return exc
        return tuple(str(rd.address) for rd in answer)

    @staticmethod
    def _where(host: str, setup: Setup) -> str:
        parts = []
        if setup.search and not host.endswith("."):
            parts.append(f"searched {', '.join(setup.search)}")
        parts.append(f"nameservers {', '.join(setup.nameservers) or 'none'}")
        return "; ".join(parts)


def make_resolver(config: DnsConfig) -> DirectResolver | None:
    """The process's resolver for ``dns.mode: direct``; None for system (getaddrinfo)."""
    return DirectResolver(config) if config.mode == "direct" else None


async def resolve_all(resolver: DirectResolver, hosts: Sequence[str]) -> dict[str, tuple[str, ...] | NameNotResolved]:
    """Resolve several names at once (``dbmtls check``): each name's addresses or its error."""

    async def one(host: str) -> tuple[str, ...] | NameNotResolved:
        try:
            return await resolver.resolve(host)
        except NameNotResolved as exc:
            return exc

    unique = list(dict.fromkeys(hosts))
    results = await asyncio.gather(*(one(h) for h in unique))
    return dict(zip(unique, results, strict=True))
