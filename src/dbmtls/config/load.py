"""Loading: YAML files (several, each possibly multi-document) -> one validated Config.

Each document is either a dbmtls config or an Istio DestinationRule.  Every
document is validated on its own first, so that an error names its file and
YAML path; then the databases are concatenated, top-level sections are taken
from the last file that sets them, ``overrides`` are applied by database name,
and the whole is validated once more for cross-file rules (unique names and
listeners).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dbmtls.config.destinationrule import is_destination_rule, map_destination_rule
from dbmtls.config.model import Config, DatabaseConfig, FieldError
from dbmtls.errors import ConfigError

_TOP_LEVEL = {"databases", "admin", "log", "drainTimeout", "certificateExpiryWarning", "overrides"}
_OVERRIDE_FIELDS = {"listen", "address", "dial", "allowRemoteClients"}


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _from_validation(err: ValidationError, source: str, prefix: str = "", drop: int = 0) -> ConfigError:
    first = err.errors()[0]
    path = _loc(first["loc"][drop:])
    blamed = (first.get("ctx") or {}).get("error")
    if isinstance(blamed, FieldError):
        path = f"{path}.{blamed.field}" if path else blamed.field
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling)"
    msg = msg.removeprefix("Value error, ")
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return ConfigError(msg, source=source, path=path or None)


def _load_documents(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=str(path)) from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", source=str(path), path=where) from None


def _database_from_dict(raw: dict[str, Any], source: str, prefix: str, tls_path: str | None) -> DatabaseConfig:
    """Validate one database; ``tls_path`` is set for DestinationRules, whose YAML shape differs."""
    try:
        return DatabaseConfig.model_validate(raw)
    except ValidationError as exc:
        if tls_path is None:
            raise _from_validation(exc, source, prefix) from None
        first = exc.errors()[0]
        loc = first["loc"]
        if loc and loc[0] == "tls":
            raise _from_validation(exc, source, tls_path, drop=1) from None
        blamed = (first.get("ctx") or {}).get("error")
        if loc == ("listen",) or (isinstance(blamed, FieldError) and blamed.field == "listen"):
            # the listener of a DestinationRule comes from its annotation (or the port)
            raise ConfigError(
                first["msg"].removeprefix("Value error, "), source=source, path="metadata.annotations.dbmtls.io/listen"
            ) from None
        raise _from_validation(exc, source, "spec") from None


def load_config(paths: Sequence[str | Path]) -> Config:
    if not paths:
        raise ConfigError("no configuration file given (use -c FILE)")
    databases: list[DatabaseConfig] = []
    # (file, YAML path) of each database and of its listener, for cross-file errors
    origins: list[tuple[str, str]] = []
    listen_origins: list[tuple[str, str]] = []
    sections: dict[str, Any] = {}
    overrides: list[tuple[str, str, dict[str, Any]]] = []
    for p in paths:
        path = Path(p)
        source = str(path)
        docs = _load_documents(path)
        if not docs:
            raise ConfigError("the file is empty", source=source)
        for n, doc in enumerate(docs):
            src = source if len(docs) == 1 else f"{source} (document {n + 1})"
            if not isinstance(doc, dict):
                raise ConfigError("expected a mapping at the top level", source=src)
            if is_destination_rule(doc):
                for raw, tls_path in map_destination_rule(doc, src):
                    databases.append(_database_from_dict(raw, src, "", tls_path))
                    origins.append((src, "metadata.name"))
                    annotations = (doc.get("metadata") or {}).get("annotations") or {}
                    from_annotation = annotations.get("dbmtls.io/listen") == raw["listen"]
                    listen_origins.append((src, "metadata.annotations.dbmtls.io/listen" if from_annotation else "spec"))
                continue
            if "kind" in doc or "apiVersion" in doc:
                raise ConfigError(
                    f"unsupported document kind {doc.get('kind')!r}: expected a dbmtls config "
                    "or a networking.istio.io DestinationRule",
                    source=src,
                )
            unknown = set(doc) - _TOP_LEVEL
            if unknown:
                raise ConfigError("unknown field (check the spelling)", source=src, path=sorted(unknown)[0])
            dbs = doc.get("databases") or []
            if not isinstance(dbs, list):
                raise ConfigError("must be a list", source=src, path="databases")
            for i, raw in enumerate(dbs):
                if not isinstance(raw, dict):
                    raise ConfigError("must be a mapping", source=src, path=f"databases[{i}]")
                databases.append(_database_from_dict(raw, src, f"databases[{i}]", None))
                origins.append((src, f"databases[{i}].name"))
                listen_origins.append((src, f"databases[{i}].listen"))
            rest = {k: v for k, v in doc.items() if k not in ("databases", "overrides")}
            try:
                Config.model_validate(rest)
            except ValidationError as exc:
                raise _from_validation(exc, src) from None
            sections.update(rest)
            ov = doc.get("overrides") or {}
            if not isinstance(ov, dict):
                raise ConfigError("must be a mapping of database name to fields", source=src, path="overrides")
            for name, fields in ov.items():
                if not isinstance(fields, dict) or set(fields) - _OVERRIDE_FIELDS:
                    raise ConfigError(
                        f"an override may set only {', '.join(sorted(_OVERRIDE_FIELDS))}",
                        source=src,
                        path=f"overrides.{name}",
                    )
                overrides.append((src, str(name), fields))

    by_name: dict[str, int] = {}
    for i, db in enumerate(databases):
        if db.name in by_name:
            first_src, first_path = origins[by_name[db.name]]
            raise ConfigError(
                f"database name {db.name!r} is already used by {first_path} in {first_src}",
                source=origins[i][0],
                path=origins[i][1],
            )
        by_name[db.name] = i
    for src, name, fields in overrides:
        if name not in by_name:
            raise ConfigError(
                f"no database named {name!r} (known: {', '.join(sorted(by_name)) or 'none'})",
                source=src,
                path=f"overrides.{name}",
            )
        i = by_name[name]
        merged = databases[i].model_dump(by_alias=True, exclude_unset=True)
        merged.update(fields)
        databases[i] = _database_from_dict(merged, src, f"overrides.{name}", None)
        if "listen" in fields:
            listen_origins[i] = (src, f"overrides.{name}.listen")
    listeners: dict[str, int] = {}
    for i, db in enumerate(databases):
        if db.listen in listeners:
            j = listeners[db.listen]
            first_src, first_path = listen_origins[j]
            raise ConfigError(
                f"{db.listen} is already the listener of {databases[j].name!r} ({first_path} in {first_src}); "
                "every database needs its own listen address",
                source=listen_origins[i][0],
                path=listen_origins[i][1],
            )
        listeners[db.listen] = i
    try:
        return Config.model_validate({**sections, "databases": databases})
    except ValidationError as exc:
        raise _from_validation(exc, ", ".join(str(p) for p in paths)) from None
