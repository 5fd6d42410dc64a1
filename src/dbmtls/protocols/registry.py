"""The protocol registry: every database dbmtls speaks, one line each.

Adding a database: ``protocols/x.py`` with ``SPEC`` (wire knowledge, sans-IO),
``proxy/sessions/x.py`` with the driver ``SPEC.session`` names, and one line below.
A protocol that is not listed here does not exist for dbmtls: the config rejects
it by name.
"""

from __future__ import annotations

from collections.abc import Iterator

from dbmtls.protocols import mongodb, mysql, postgres, redis, tcp
from dbmtls.protocols.spec import ProtocolSpec


class Registry:
    def __init__(self, specs: tuple[ProtocolSpec, ...]) -> None:
        self._specs = specs
        self._by_name: dict[str, ProtocolSpec] = {}
        self._by_port: dict[int, ProtocolSpec] = {}
        for spec in specs:
            for name in spec.names:
                if name in self._by_name:
                    raise ValueError(f"protocol name {name!r} registered twice")
                self._by_name[name] = spec
            for port in spec.well_known_ports:
                if port in self._by_port:
                    raise ValueError(f"well-known port {port} registered twice")
                self._by_port[port] = spec

    def __iter__(self) -> Iterator[ProtocolSpec]:
        return iter(self._specs)

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical names, in registry order."""
        return tuple(s.name for s in self._specs)

    def get(self, name: str) -> ProtocolSpec:
        """The spec for a canonical name or an alias; KeyError names the known ones."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown protocol {name!r}; one of {', '.join(self.names)}") from None

    def find(self, name: str) -> ProtocolSpec | None:
        return self._by_name.get(name)

    def by_port(self, port: int) -> ProtocolSpec | None:
        return self._by_port.get(port)

    def named_in_host(self, host: str) -> ProtocolSpec | None:
        """The protocol a dash-separated word of the host's first label names, if any."""
        for word in host.split(".")[0].split("-"):
            spec = self._by_name.get(word)
            # canonical names only: an alias such as "mongo" is too common a word ("mongo-express")
            if spec is not None and spec.named_in_hosts and spec.name == word:
                return spec
        return None


REGISTRY = Registry(
    (redis.SPEC, mongodb.SPEC, tcp.SPEC, postgres.SPEC, postgres.COCKROACHDB, mysql.SPEC, mysql.MARIADB)
)
