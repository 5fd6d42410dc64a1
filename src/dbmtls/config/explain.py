"""Where each setting of a database came from, and what the inputs said that dbmtls does not use.

``dbmtls check`` prints this next to the effective configuration: a value that was inferred
(a protocol from a Service port name, a port from a ServiceEntry, a listener from the port)
is only trustworthy when the user can see why it was chosen, and a field of a mesh config that
dbmtls ignores must be listed, never dropped without a word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Origin:
    """Where one value came from: ``how`` in words, and the file and YAML path when there is one."""

    how: str
    source: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.source, self.path) if p)
        return f"{self.how} ({where})" if where else self.how

    def as_json(self) -> dict[str, Any]:
        return {"from": self.how, "source": self.source, "path": self.path}


@dataclass(frozen=True)
class Note:
    """Something the input said that produced no setting: an ignored field, a skipped document."""

    message: str
    source: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.source, self.path) if p)
        return f"{where}: {self.message}" if where else self.message

    def as_json(self) -> dict[str, Any]:
        return {"message": self.message, "source": self.source, "path": self.path}


# Why a TLS setting a database does not set has the value it has (``check`` prints it).
TLS_DEFAULTS = {
    "tls.mode": "SIMPLE (verify the server, no client certificate)",
    "tls.clientCertificate": "none: no default client certificate is presented",
    "tls.privateKey": "none: no default client certificate is presented",
    "tls.caCertificates": "the system trust store (no caCertificates)",
    "tls.sni": "the host of address",
    "tls.subjectAltNames": "the SNI name is verified",
    "tls.insecureSkipVerify": "false: the server's chain and name are verified",
    "tls.minProtocolVersion": "TLSV1_2",
    "tls.maxProtocolVersion": "none: the highest both sides support",
    "tls.sessionResumption": "true: sessions are resumed, per identity and server name",
}


@dataclass
class DatabaseExplanation:
    """One database: the origin of each setting (by dotted field name), what was ignored, notes."""

    origins: dict[str, Origin] = field(default_factory=dict)
    ignored: list[Note] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    # For a certificate error: what the user must know to fix it (e.g. the credentialName's
    # expected files and the credentialsDir setting).
    hints: list[str] = field(default_factory=list)

    def defaults(self) -> None:
        """Every TLS setting not set by the inputs: its default, and why."""
        for key, why in TLS_DEFAULTS.items():
            self.origins.setdefault(key, Origin(f"default: {why}"))

    def as_json(self) -> dict[str, Any]:
        return {
            "provenance": {k: v.as_json() for k, v in self.origins.items()},
            "ignored": [n.as_json() for n in self.ignored],
            "notes": [n.as_json() for n in self.notes],
        }


@dataclass
class Explanation:
    """The whole input: per database (by name), and notes about documents that gave no database."""

    databases: dict[str, DatabaseExplanation] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
