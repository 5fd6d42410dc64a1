"""Loading: YAML files (several, each possibly multi-document) -> one validated Config.

A document is a dbmtls config, an Istio DestinationRule, or a document that tells a rule
about its host: a ServiceEntry or a Kubernetes Service (``mesh.py``).  Documents of any other
kind (VirtualService, Gateway, PeerAuthentication, ...) are skipped with a note, so that a
file can be used as people keep them; a ``kind: List`` is read item by item.

Two passes, because a rule may come before the Service that gives its ports, and
``credentialsDir`` (for ``credentialName``) may be set in a later file: first every document
is read, classified and, for a dbmtls config, its top-level sections validated; then, in input
order, the databases are made and validated one by one, so that an error names its file and
YAML path.  Then top-level sections are taken from the last file that sets them,
``overrides`` are applied by database name, and the whole is validated once more for
cross-file rules (unique names and listeners).

Besides the Config, the loader records where each setting came from and what was ignored
(``explain.py``), for ``dbmtls check``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import yaml

from dbmtls.config import credentials
from dbmtls.config.destinationrule import (
    ANNOTATION_LISTEN,
    CredentialResolver,
    default_credentials,
    is_destination_rule,
    map_destination_rule,
)
from dbmtls.config.explain import DatabaseExplanation, Explanation, Note, Origin
from dbmtls.config.mesh import MeshIndex
from dbmtls.config.model import Config, DatabaseConfig, FieldError, split_host_port
from dbmtls.config.schema import ValidationError
from dbmtls.errors import ConfigError

_TOP_LEVEL = {
    "databases",
    "admin",
    "log",
    "dns",
    "drainTimeout",
    "dataPlane",
    "nativeThreads",
    "certificateExpiryWarning",
    "maxConnections",
    "overrides",
    "credentialsDir",
}
_OVERRIDE_FIELDS = {
    "listen",
    "address",
    "dial",
    "allowRemoteClients",
    "maxConnections",
    "idleTimeout",
    "preconnect",
    "tls",
}
# An override may repoint the certificate files of a database (one from a DestinationRule
# whose paths are those of the pod, say), never weaken how the server is verified
# (sessionResumption does not: resumed connections are name-checked, docs/tls-resumption.md).
_OVERRIDE_TLS_FIELDS = {"clientCertificate", "privateKey", "caCertificates", "sessionResumption"}


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _known_fields() -> list[str]:
    """Every field name of the config models, for "did you mean" hints."""
    names: set[str] = set()
    seen: set[type] = set()

    def walk(model: type) -> None:
        if model in seen or not hasattr(model, "model_fields"):
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            for arg in (info.annotation, *getattr(info.annotation, "__args__", ())):
                for inner in (arg, *getattr(arg, "__args__", ())):
                    if isinstance(inner, type):
                        walk(inner)

    walk(Config)
    return sorted(names)


def _spelling(errors: list[Any], key: str, parent: tuple[Any, ...]) -> str:
    """A likely intended name for unknown field ``key``: a missing sibling first, else any field."""
    missing = [str(e["loc"][-1]) for e in errors if e["type"] == "missing" and tuple(e["loc"][:-1]) == parent]
    match = difflib.get_close_matches(key, missing, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, _known_fields(), n=1, cutoff=0.75
    )
    return f": did you mean {match[0]}?" if match else " (check the spelling)"


def _from_validation(err: ValidationError, source: str, prefix: str = "", drop: int = 0) -> ConfigError:
    errors = err.errors()
    # A misspelled key explains the "Field required" of the key it was meant to be: say it first.
    errors = sorted(errors, key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    path = _loc(first["loc"][drop:])
    blamed = (first.get("ctx") or {}).get("error")
    if isinstance(blamed, FieldError):
        path = f"{path}.{blamed.field}" if path else blamed.field
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field" + _spelling(errors, str(first["loc"][-1]), tuple(first["loc"][:-1]))
    msg = msg.removeprefix("Value error, ")
    more = len(errors) - 1
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
                first["msg"].removeprefix("Value error, "),
                source=source,
                path=f"metadata.annotations.{ANNOTATION_LISTEN}",
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
    explanation: DatabaseExplanation


@dataclass
class _Collected:
    entries: list[_Entry] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    overrides: list[_Override] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)


@dataclass(frozen=True)
class Explained:
    """A loaded config and the account of how it was made (``dbmtls check``)."""

    config: Config
    explanation: Explanation


def load_config(paths: Sequence[str | Path]) -> Config:
    """Read, merge and validate ``paths`` in order; a ConfigError names the file and YAML path."""
    return explain_config(paths).config


def explain_config(paths: Sequence[str | Path]) -> Explained:
    """``load_config``, and where each setting came from, what was ignored and what was skipped.

    Inputs that yield no database although they hold documents that could have (rules,
    Services, other kinds) are an error listing why each gave none: whoever passed them expected
    a database.  A dbmtls config that simply lists none stays valid, as it always was.
    """
    if not paths:
        raise ConfigError("no configuration file given (use -c FILE)")
    sources = ", ".join(str(p) for p in paths)
    explained = explain_documents([item for p in paths for item in _documents(Path(p))], sources)
    notes = explained.explanation.notes
    if not explained.config.databases and notes:
        raise ConfigError(f"no database to relay: {'; '.join(str(n) for n in notes)}")
    return explained


def config_from_documents(documents: Iterable[tuple[dict[str, Any], str]], sources: str) -> Config:
    """Merge and validate (document, source) pairs in order: what ``load_config`` does after reading.

    The Kubernetes injector calls this on the documents it generates, so that a pod is only
    ever given a configuration that ``dbmtls run`` will accept.
    """
    return explain_documents(documents, sources).config


ISTIO_GROUP = "networking.istio.io/"


def explain_documents(documents: Iterable[tuple[dict[str, Any], str]], sources: str) -> Explained:
    """``config_from_documents`` with the explanation; zero databases is not an error here."""
    collected = _Collected()
    mesh = MeshIndex()
    ordered: list[tuple[str, dict[str, Any], str]] = []  # (what, document, source), in input order
    for doc, src in _flatten(documents):
        kind = doc.get("kind")
        if kind is None and "apiVersion" not in doc:
            _collect_sections(doc, src, collected)
            ordered.append(("config", doc, src))
        elif is_destination_rule(doc):
            ordered.append(("rule", doc, src))
        elif kind == "Service" or (kind == "ServiceEntry" and str(doc.get("apiVersion")).startswith(ISTIO_GROUP)):
            mesh.add(doc, src)
        else:
            collected.notes.append(Note(f"{_title(doc)}: not used by dbmtls, skipped", src))
    credentials_dir = str(collected.sections.get("credentialsDir") or credentials.DEFAULT_CREDENTIALS_DIR)
    resolve = default_credentials(credentials_dir)
    for what, doc, src in ordered:
        if what == "config":
            _collect_databases(doc, src, collected, resolve)
        else:
            _collect_destination_rule(doc, src, collected, mesh, resolve)
    collected.notes += mesh.unused_notes()
    _apply_overrides(collected, _index_by_name(collected.entries))
    _check_listeners(collected.entries)
    try:
        config = Config.model_validate({**collected.sections, "databases": [e.db for e in collected.entries]})
    except ValidationError as exc:
        raise _from_validation(exc, sources) from None
    explanation = Explanation({e.db.name: e.explanation for e in collected.entries}, collected.notes)
    return Explained(config, explanation)


def _title(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    kind = doc.get("kind") or f"a document of apiVersion {doc.get('apiVersion')} without a kind"
    return f"{kind} {ns + '/' if ns else ''}{name or ''}".rstrip()


def _flatten(documents: Iterable[tuple[dict[str, Any], str]]) -> Iterator[tuple[dict[str, Any], str]]:
    """``kind: List`` (what ``kubectl get -o yaml`` prints) item by item."""
    for doc, src in documents:
        items = doc.get("items")
        if doc.get("kind") == "List" and isinstance(items, list):
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ConfigError("expected a mapping", source=src, path=f"items[{i}]")
                yield from _flatten([(item, f"{src} items[{i}]")])
        else:
            yield doc, src


def _documents(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Each document of a file, with the source its errors name."""
    source = str(path)
    docs = _load_documents(path)
    if not docs:
        raise ConfigError("the file is empty", source=source)
    base = None if source.startswith(ENV_PREFIX) else path.resolve().parent
    for n, doc in enumerate(docs):
        src = source if len(docs) == 1 else f"{source} (document {n + 1})"
        if not isinstance(doc, dict):
            raise ConfigError("expected a mapping at the top level", source=src)
        yield (_relative_to(doc, base) if base is not None else doc), src


_FILE_FIELDS = ("clientCertificate", "privateKey", "caCertificates")


def _relative_to(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative file paths in ``doc`` made relative to its file's directory, not to the cwd.

    A config names its certificates next to itself (``pki/client/tls.crt``); `dbmtls check` run
    from another directory, or a service manager's working directory, must find the same files.
    Only the fields that name files are touched; the document is copied, never changed.
    """

    def fix(value: Any) -> Any:
        return str(base / value) if isinstance(value, str) and value and not os.path.isabs(value) else value

    def fix_tls(tls: Any) -> Any:
        if not isinstance(tls, dict):
            return tls
        out = {k: fix(v) if k in _FILE_FIELDS else v for k, v in tls.items()}
        users = out.get("userCertificates")
        if isinstance(users, dict):
            out["userCertificates"] = {
                u: {k: fix(v) if k in _FILE_FIELDS else v for k, v in c.items()} if isinstance(c, dict) else c
                for u, c in users.items()
            }
        return out

    def fix_db(db: Any) -> Any:
        return {**db, "tls": fix_tls(db["tls"])} if isinstance(db, dict) and "tls" in db else db

    out = dict(doc)
    if doc.get("kind") == "DestinationRule":
        spec = doc.get("spec")
        policy = spec.get("trafficPolicy") if isinstance(spec, dict) else None
        if isinstance(policy, dict):
            new_policy = {**policy}
            if "tls" in policy:
                new_policy["tls"] = fix_tls(policy["tls"])
            levels = policy.get("portLevelSettings")
            if isinstance(levels, list):
                new_policy["portLevelSettings"] = [
                    {**pl, "tls": fix_tls(pl["tls"])} if isinstance(pl, dict) and "tls" in pl else pl for pl in levels
                ]
            out["spec"] = {**spec, "trafficPolicy": new_policy}  # type: ignore[dict-item]
        return out
    if "kind" in doc:
        return out
    if isinstance(doc.get("databases"), list):
        out["databases"] = [fix_db(db) for db in doc["databases"]]
    if isinstance(doc.get("overrides"), dict):
        out["overrides"] = {name: fix_db(o) for name, o in doc["overrides"].items()}
    if "credentialsDir" in doc:
        out["credentialsDir"] = fix(doc["credentialsDir"])
    dns = doc.get("dns")
    if isinstance(dns, dict) and "resolvConf" in dns:
        out["dns"] = {**dns, "resolvConf": fix(dns["resolvConf"])}
    return out


def _collect_destination_rule(
    doc: dict[str, Any], src: str, collected: _Collected, mesh: MeshIndex, resolve: CredentialResolver
) -> None:
    mapped = map_destination_rule(doc, src, mesh, resolve)
    collected.notes += mapped.notes
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    for m in mapped.databases:
        db = _database_from_dict(m.raw, src, "", m.tls_path)
        from_annotation = annotations.get(ANNOTATION_LISTEN) == m.raw["listen"]
        listen_path = f"metadata.annotations.{ANNOTATION_LISTEN}" if from_annotation else "spec"
        collected.entries.append(_Entry(db, (src, "metadata.name"), (src, listen_path), m.explanation))


def _collect_sections(doc: dict[str, Any], src: str, collected: _Collected) -> None:
    """A dbmtls config's top-level sections (everything but its databases), validated now."""
    unknown = set(doc) - _TOP_LEVEL
    if unknown:
        key = sorted(unknown)[0]
        match = difflib.get_close_matches(key, sorted(_TOP_LEVEL), n=1, cutoff=0.6)
        hint = f": did you mean {match[0]}?" if match else " (check the spelling)"
        raise ConfigError(f"unknown field{hint}", source=src, path=key)
    rest = {k: v for k, v in doc.items() if k not in ("databases", "overrides")}
    try:
        Config.model_validate(rest)
    except ValidationError as exc:
        raise _from_validation(exc, src) from None
    collected.sections.update(rest)
    collected.overrides += _overrides(doc, src)


def _collect_databases(doc: dict[str, Any], src: str, collected: _Collected, resolve: CredentialResolver) -> None:
    dbs = doc.get("databases") or []
    if not isinstance(dbs, list):
        raise ConfigError("must be a list", source=src, path="databases")
    for i, raw in enumerate(dbs):
        prefix = f"databases[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError("must be a mapping", source=src, path=prefix)
        exp = DatabaseExplanation()
        raw = _with_credential(raw, src, prefix, resolve, exp)
        db = _database_from_dict(raw, src, prefix, None)
        _explain_native(db, raw, src, prefix, exp)
        collected.entries.append(_Entry(db, (src, f"{prefix}.name"), (src, f"{prefix}.listen"), exp))


def _with_credential(
    raw: dict[str, Any], src: str, prefix: str, resolve: CredentialResolver, exp: DatabaseExplanation
) -> dict[str, Any]:
    """``tls.credentialName`` in a dbmtls config: the mounted Secret's files, as for a DestinationRule."""
    tls = raw.get("tls")
    if not isinstance(tls, dict) or "credentialName" not in tls:
        return raw
    path = f"{prefix}.tls"
    for key in ("clientCertificate", "privateKey", "caCertificates"):
        if key in tls:
            raise ConfigError(
                "credentialName gives the certificates: remove the file paths, or remove credentialName",
                source=src,
                path=f"{path}.{key}",
            )
    try:
        name = credentials.secret_name(tls["credentialName"])
    except ValueError as exc:
        raise ConfigError(str(exc), source=src, path=f"{path}.credentialName") from None
    mode = tls.get("mode", "SIMPLE")
    cred = resolve(name, mode == "MUTUAL", not tls.get("insecureSkipVerify"))
    new_tls = {k: v for k, v in tls.items() if k != "credentialName"}
    for key, file in cred.files.items():
        new_tls[key] = file
        exp.origins[f"tls.{key}"] = Origin(cred.how(file), src, f"{path}.credentialName")
    exp.notes += [Note(n, src, f"{path}.credentialName") for n in cred.notes]
    exp.hints.append(cred.hint)
    return {**raw, "tls": new_tls}


def _explain_native(db: DatabaseConfig, raw: dict[str, Any], src: str, prefix: str, exp: DatabaseExplanation) -> None:
    """Origins of a database written in a dbmtls config: what the file sets, else the defaults."""
    for key in raw:
        if key != "tls":
            exp.origins.setdefault(key, Origin("dbmtls config", src, f"{prefix}.{key}"))
    for key in raw.get("tls") or {}:
        exp.origins.setdefault(f"tls.{key}", Origin("dbmtls config", src, f"{prefix}.tls.{key}"))
    try:
        split_host_port(db.address)
        exp.origins["port"] = Origin("address", src, f"{prefix}.address")
    except ValueError:
        exp.origins["port"] = Origin(f"the default port of {db.protocol}")
    exp.defaults()


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
        tls = fields.get("tls")
        if tls is not None and (not isinstance(tls, dict) or set(tls) - _OVERRIDE_TLS_FIELDS):
            raise ConfigError(
                "an override may repoint only the certificate files (and set sessionResumption): "
                f"{', '.join(sorted(_OVERRIDE_TLS_FIELDS))}",
                source=src,
                path=f"overrides.{name}.tls",
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
        for key, value in fields.items():
            if key == "tls":
                merged["tls"] = {**merged.get("tls", {}), **value}
                for tls_key in value:
                    entry.explanation.origins[f"tls.{tls_key}"] = Origin(
                        "override", src, f"overrides.{name}.tls.{tls_key}"
                    )
            else:
                merged[key] = value
                entry.explanation.origins[key] = Origin("override", src, f"overrides.{name}.{key}")
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
