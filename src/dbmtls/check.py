"""``dbmtls check``, one database at a time: its settings, where each came from, its certificate material.

The report is a plain dict because ``check --json`` prints it as it is; the text output is
made from the same dict, so the two never say different things.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbmtls.config.explain import DatabaseExplanation
from dbmtls.config.model import DatabaseConfig
from dbmtls.errors import ConfigError


def shown(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return "(none)" if value is None else str(value)


def origin_text(origin: dict[str, Any]) -> str:
    where = ": ".join(str(p) for p in (origin.get("source"), origin.get("path")) if p)
    return f"{origin['from']} ({where})" if where else str(origin["from"])


def note_text(note: dict[str, Any]) -> str:
    where = ": ".join(str(p) for p in (note.get("source"), note.get("path")) if p)
    return f"{where}: {note['message']}" if where else str(note["message"])


# The settings ``check`` explains, as (name, how to read it from a database).
_EXPLAINED: tuple[tuple[str, Callable[[DatabaseConfig], object]], ...] = (
    ("name", lambda d: d.name),
    ("protocol", lambda d: d.protocol),
    ("address", lambda d: d.upstream[0]),
    ("port", lambda d: d.upstream[1]),
    ("listen", lambda d: d.listen),
    ("dial", lambda d: d.dial),
    *(
        (f"tls.{key}", lambda d, key=key: getattr(d.tls, key))
        for key in ("mode", "clientCertificate", "privateKey", "caCertificates")
    ),
    ("tls.sni", lambda d: d.server_name if d.tls.mode != "DISABLE" else None),
    ("tls.subjectAltNames", lambda d: list(d.verify_names) if d.tls.mode != "DISABLE" else None),
    *(
        (f"tls.{key}", lambda d, key=key: getattr(d.tls, key))
        for key in ("insecureSkipVerify", "minProtocolVersion", "maxProtocolVersion", "sessionResumption")
    ),
)


def database_report(db: DatabaseConfig, explanation: DatabaseExplanation | None) -> dict[str, Any]:
    """One database for ``check``: its settings and their origins, and its certificate material loaded."""
    from dbmtls.tls.material import ClientTLS  # loads OpenSSL contexts: only when checking

    exp = explanation or DatabaseExplanation()
    values = {key: get(db) for key, get in _EXPLAINED}
    provenance = {key: exp.origins[key].as_json() for key, _ in _EXPLAINED if key in exp.origins}
    report: dict[str, Any] = {
        "name": db.name,
        "values": values,
        "provenance": provenance,
        "ignored": [n.as_json() for n in exp.ignored],
        "notes": [n.as_json() for n in exp.notes],
        "warnings": [],
        "errors": [],
    }
    try:
        material = ClientTLS(db).build()
    except ConfigError as exc:
        field = _failed_field(db, exc)
        origin = exp.origins.get(field) if field else None
        text = f"database {db.name!r}: {exc.message}"
        if origin is not None and origin.source:
            text += f" (set at {origin.source}: {origin.path})" if origin.path else f" (from {origin.source})"
        hints = exp.hints if origin is not None and origin.how.startswith("credentialName") else []
        text += "".join(f"; {h}" for h in hints)
        report["errors"].append(
            {
                "kind": "certificate",
                "database": db.name,
                "path": exc.path,
                "field": field,
                "message": exc.detail,
                "from": origin.as_json() if origin is not None else None,
                "hints": hints,
                "text": text,
            }
        )
    else:
        report["warnings"] += list(material.warnings)
    if db.tls.insecureSkipVerify:
        report["warnings"].append("insecureSkipVerify is on: the server is NOT verified")
    return report


def _failed_field(db: DatabaseConfig, exc: ConfigError) -> str | None:
    """Which tls setting a certificate error is about: its path, or the setting naming the file."""
    if exc.path and exc.path.startswith("tls.") and exc.path.count(".") == 1:
        return exc.path
    for key in ("clientCertificate", "privateKey", "caCertificates"):
        value = getattr(db.tls, key)
        if value and value in exc.detail:
            return f"tls.{key}"
    return exc.path
