"""Loading: YAML files (several, each possibly multi-document) -> one validated Config.

Each document is either a dbmtls config or an Istio DestinationRule.  Every
document is validated on its own first, so that an error names its file and
YAML path; then the databases are concatenated, top-level sections are taken
from the last file that sets them, ``overrides`` are applied by database name,
and the whole is validated once more for cross-file rules (unique names and
listeners).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import yaml
from pydantic import ValidationError

from dbmtls.config.destinationrule import is_destination_rule, map_destination_rule
from dbmtls.config.model import Config, DatabaseConfig, FieldError
from dbmtls.errors import ConfigError

_TOP_LEVEL = {
    "databases",
    "admin",
    "log",
    "dns",
    "drainTimeout",
    "certificateExpiryWarning",
    "maxConnections",
    "overrides",
}
_OVERRIDE_FIELDS = {"listen", "address", "dial", "allowRemoteClients", "maxConnections", "idleTimeout"}


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-"):
            continue  # a pydantic validator wrapper, not a YAML key
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


ENV_PREFIX = "env:"


def _load_documents(path: Path) -> list[Any]:
    text = _read_text(path)
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", source=str(path), path=where) from None


def _read_text(path: Path) -> str:
    """The file's text; ``env:NAME`` reads the environment variable NAME instead.

    The Kubernetes injector hands the sidecar its generated config in an environment variable:
    a webhook may only patch the pod, not create a ConfigMap for it (docs/kubernetes.md).
    """
    name = str(path)
    if name.startswith(ENV_PREFIX):
        value = os.environ.get(name.removeprefix(ENV_PREFIX))
        if value is None:
            raise ConfigError("environment variable not set", source=name)
        return value
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=str(path)) from None


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


_Override: TypeAlias = tuple[str, str, dict[str, Any]]  # (source, database name, fields)


@dataclass
class _Entry:
    db: DatabaseConfig
    # (file, YAML path) of the database's name and of its listener: an error about two
    # databases must point at both, and they may come from different files.
    name_at: tuple[str, str]
    listen_at: tuple[str, str]


@dataclass
class _Collected:
    entries: list[_Entry] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    overrides: list[_Override] = field(default_factory=list)


def load_config(paths: Sequence[str | Path]) -> Config:
    """Read, merge and validate ``paths`` in order; a ConfigError names the file and YAML path."""
    if not paths:
        raise ConfigError("no configuration file given (use -c FILE)")
    return config_from_documents(
        (item for p in paths for item in _documents(Path(p))), ", ".join(str(p) for p in paths)
    )


def config_from_documents(documents: Iterable[tuple[dict[str, Any], str]], sources: str) -> Config:
    """Merge and validate (document, source) pairs in order: what ``load_config`` does after reading.

    The Kubernetes injector calls this on the documents it generates, so that a pod is only
    ever given a configuration that ``dbmtls run`` will accept.
    """
    collected = _Collected()
    for doc, src in documents:
        if is_destination_rule(doc):
            _collect_destination_rule(doc, src, collected)
        else:
            _collect_config(doc, src, collected)
    _apply_overrides(collected, _index_by_name(collected.entries))
    _check_listeners(collected.entries)
    try:
        return Config.model_validate({**collected.sections, "databases": [e.db for e in collected.entries]})
    except ValidationError as exc:
        raise _from_validation(exc, sources) from None


def _documents(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Each document of a file, with the source its errors name.

    A generator, so that a document's errors are reported before the next
    document is checked or the next file read.
    """
    source = str(path)
    docs = _load_documents(path)
    if not docs:
        raise ConfigError("the file is empty", source=source)
    for n, doc in enumerate(docs):
        src = source if len(docs) == 1 else f"{source} (document {n + 1})"
        if not isinstance(doc, dict):
            raise ConfigError("expected a mapping at the top level", source=src)
        yield doc, src


def _collect_destination_rule(doc: dict[str, Any], src: str, collected: _Collected) -> None:
    mapped = map_destination_rule(doc, src)
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    for raw, tls_path in mapped:
        db = _database_from_dict(raw, src, "", tls_path)
        from_annotation = annotations.get("dbmtls.io/listen") == raw["listen"]
        listen_path = "metadata.annotations.dbmtls.io/listen" if from_annotation else "spec"
        collected.entries.append(_Entry(db, (src, "metadata.name"), (src, listen_path)))


def _collect_config(doc: dict[str, Any], src: str, collected: _Collected) -> None:
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
        db = _database_from_dict(raw, src, f"databases[{i}]", None)
        collected.entries.append(_Entry(db, (src, f"databases[{i}].name"), (src, f"databases[{i}].listen")))
    rest = {k: v for k, v in doc.items() if k not in ("databases", "overrides")}
    try:
        Config.model_validate(rest)
    except ValidationError as exc:
        raise _from_validation(exc, src) from None
    collected.sections.update(rest)
    collected.overrides += _overrides(doc, src)


def _overrides(doc: dict[str, Any], src: str) -> list[_Override]:
    ov = doc.get("overrides") or {}
    if not isinstance(ov, dict):
        raise ConfigError("must be a mapping of database name to fields", source=src, path="overrides")
    out: list[_Override] = []
    for name, fields in ov.items():
        if not isinstance(fields, dict) or set(fields) - _OVERRIDE_FIELDS:
            raise ConfigError(
                f"an override may set only {', '.join(sorted(_OVERRIDE_FIELDS))}",
                source=src,
                path=f"overrides.{name}",
            )
        out.append((src, str(name), fields))
    return out


def _index_by_name(entries: list[_Entry]) -> dict[str, int]:
    by_name: dict[str, int] = {}
    for i, entry in enumerate(entries):
        name = entry.db.name
        if name in by_name:
            first_src, first_path = entries[by_name[name]].name_at
            raise ConfigError(
                f"database name {name!r} is already used by {first_path} in {first_src}",
                source=entry.name_at[0],
                path=entry.name_at[1],
            )
        by_name[name] = i
    return by_name


def _apply_overrides(collected: _Collected, by_name: dict[str, int]) -> None:
    for src, name, fields in collected.overrides:
        if name not in by_name:
            raise ConfigError(
                f"no database named {name!r} (known: {', '.join(sorted(by_name)) or 'none'})",
                source=src,
                path=f"overrides.{name}",
            )
        entry = collected.entries[by_name[name]]
        merged = entry.db.model_dump(by_alias=True, exclude_unset=True)
        merged.update(fields)
        entry.db = _database_from_dict(merged, src, f"overrides.{name}", None)
        if "listen" in fields:
            entry.listen_at = (src, f"overrides.{name}.listen")


def _check_listeners(entries: list[_Entry]) -> None:
    listeners: dict[str, _Entry] = {}
    for entry in entries:
        listen = entry.db.listen
        if listen in listeners:
            first = listeners[listen]
            first_src, first_path = first.listen_at
            raise ConfigError(
                f"{listen} is already the listener of {first.db.name!r} ({first_path} in {first_src}); "
                "every database needs its own listen address",
                source=entry.listen_at[0],
                path=entry.listen_at[1],
            )
        listeners[listen] = entry
