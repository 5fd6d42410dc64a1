"""The sidecar injector: documents in, the same documents out with the dbmtls sidecar added.

One pure function (no I/O, no clock, no randomness) that both ``dbmtls inject`` and the
admission webhook run, so the two can never disagree.  For a pod template that opts in it adds:

* the ``dbmtls`` container: a native sidecar (first initContainer, ``restartPolicy: Always``,
  a startupProbe on ``/readyz``) or, with ``--no-native-sidecar``, the first container with a
  postStart hook that waits for readiness;
* its configuration, generated from the DestinationRules that apply to the pod (``rules.py``)
  and the ``dbmtls.io/config`` annotation, in the ``DBMTLS_CONFIG`` environment variable;
* ``hostAliases`` that point every name the app uses for each database at the loopback
  address dbmtls listens on, on the database's own port: the app's connection string does not
  change, and the sidecar resolves the real server through DNS (``dns.mode: direct``);
* Secret volumes for ``credentialName`` and the ``sidecar.istio.io/userVolume*`` annotations,
  mounted read-only into the sidecar only, never with subPath (a subPath mount never sees a
  renewed certificate);
* the ``dbmtls.io/status`` annotation, which makes injecting twice a no-op.

Everything else is left as it was.  See docs/kubernetes.md for the user's view.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from dbmtls import __version__
from dbmtls.config.destinationrule import map_destination_rule
from dbmtls.config.load import config_from_documents
from dbmtls.config.model import is_loopback, split_host_port
from dbmtls.errors import ConfigError
from dbmtls.k8s import sidecar
from dbmtls.k8s.names import DNS1123_SUBDOMAIN
from dbmtls.k8s.rules import CREDENTIALS_DIR, AppliedRule, applicable_rules, credential_dir

LOG = logging.getLogger("dbmtls.k8s")

INJECT = "dbmtls.io/inject"
STATUS = "dbmtls.io/status"
CONFIG = "dbmtls.io/config"
ISTIO_USER_VOLUME = "sidecar.istio.io/userVolume"
ISTIO_USER_VOLUME_MOUNT = "sidecar.istio.io/userVolumeMount"
# Paths inside the image that hold certificates of their own: the system trust store.
IMAGE_PATHS = ("/etc/ssl/certs/",)
# The app gets this long after SIGTERM to finish; the drain ends this much earlier so that
# dbmtls exits on its own rather than being killed.
DRAIN_MARGIN = 5
DEFAULT_GRACE = 30

_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass(frozen=True)
class InjectOptions:
    image: str = f"dbmtls:{__version__}"
    native_sidecar: bool = True
    cluster_domain: str = "cluster.local"
    # The webhook entry for namespaces labelled dbmtls.io/inject=enabled: inject unless opted out.
    namespace_default: bool = False
    # The namespace of objects that name none (the CLI's --namespace; the webhook passes the request's).
    default_namespace: str = "default"


class InjectError(ValueError):
    """A workload that asks for the sidecar but cannot get one; the message names what to fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def inject_documents(docs: list[Any], mesh: Sequence[dict[str, Any]], options: InjectOptions) -> list[Any]:
    """The CLI path: DestinationRules among ``docs`` join ``mesh``; every document goes through."""
    rules = [*mesh, *(d for d in _flatten(docs) if isinstance(d, dict) and d.get("kind") == "DestinationRule")]
    return [inject_object(d, rules, options) for d in docs]


def _flatten(docs: list[Any]) -> list[Any]:
    out: list[Any] = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            out += _flatten(d["items"])
        else:
            out.append(d)
    return out


def inject_object(
    obj: Any, mesh: Sequence[dict[str, Any]], options: InjectOptions, *, namespace: str | None = None
) -> Any:
    """A new object with the sidecar added when its pod template opts in (else an equal copy)."""
    out = copy.deepcopy(obj)
    if not isinstance(out, dict):
        return out
    kind = out.get("kind")
    if kind == "List" and isinstance(out.get("items"), list):
        out["items"] = [inject_object(i, mesh, options, namespace=namespace) for i in out["items"]]
        return out
    raw_meta = out.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    ns = str(meta.get("namespace") or namespace or options.default_namespace)
    where = f"{kind} {ns}/{meta.get('name') or meta.get('generateName') or '?'}"
    if kind == "Pod":
        template: Any = out
    elif kind in _TEMPLATE_PATHS and isinstance(out.get("apiVersion"), str) and "/" in out["apiVersion"]:
        template = out
        for key in _TEMPLATE_PATHS[str(kind)]:
            template = template.get(key) if isinstance(template, dict) else None
        if not isinstance(template, dict):
            raise InjectError(f"{where}: no pod template at {'.'.join(_TEMPLATE_PATHS[str(kind)])}")
    else:
        return out
    if not _wants_sidecar(template, meta, options):
        return out
    _inject_pod(template, ns, where, mesh, options)
    return out


def _annotations(meta: Any) -> dict[str, str]:
    raw = meta.get("annotations") if isinstance(meta, dict) else None
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _labels(meta: Any) -> dict[str, str]:
    raw = meta.get("labels") if isinstance(meta, dict) else None
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _wants_sidecar(template: dict[str, Any], obj_meta: dict[str, Any], options: InjectOptions) -> bool:
    """Opt in or out with ``dbmtls.io/inject`` ("true"/"false"), as annotation or label.

    The pod template speaks first, then the object; an explicit "false" always wins over the
    namespace default.  A pod already injected (``dbmtls.io/status``) is left alone, which
    keeps the webhook safe to reinvoke and ``dbmtls inject`` safe to run twice.
    """
    tmeta = template.get("metadata")
    if STATUS in _annotations(tmeta):
        return False
    for meta in (tmeta, obj_meta):
        for source in (_annotations(meta), _labels(meta)):
            value = source.get(INJECT)
            if value is not None:
                return value.strip().lower() in ("true", "enabled", "yes", "on")
    return options.namespace_default


# --- the pod ------------------------------------------------------------------------------


@dataclass
class _Volumes:
    pod: list[dict[str, Any]]  # volumes to add to the pod
    mounts: list[dict[str, Any]]  # their mounts in the sidecar


def _json_annotation(annotations: dict[str, str], key: str, where: str) -> list[dict[str, Any]]:
    """Istio's userVolume annotations: a JSON list, or a JSON map of name -> object."""
    raw = annotations.get(key)
    if raw is None:
        return []
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise InjectError(f"{where}: annotation {key} is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        value = [{"name": name, **item} if isinstance(item, dict) else item for name, item in value.items()]
    if not isinstance(value, list) or not all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in value):
        raise InjectError(f"{where}: annotation {key} must be a JSON list of objects with a name")
    return value


def _volumes(annotations: dict[str, str], rules: list[AppliedRule], config_map: str | None, where: str) -> _Volumes:
    vols = _Volumes([], [])
    for rule in rules:
        for secret in rule.credentials:
            name = credential_volume(secret)
            if any(v["name"] == name for v in vols.pod):
                continue
            vols.pod.append({"name": name, "secret": {"secretName": secret}})
            vols.mounts.append({"name": name, "mountPath": credential_dir(secret), "readOnly": True})
    if config_map is not None:
        vols.pod.append({"name": "dbmtls-config", "configMap": {"name": config_map}})
        vols.mounts.append({"name": "dbmtls-config", "mountPath": sidecar.USER_CONFIG_DIR, "readOnly": True})
    vols.pod += _json_annotation(annotations, ISTIO_USER_VOLUME, where)
    for mount in _json_annotation(annotations, ISTIO_USER_VOLUME_MOUNT, where):
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise InjectError(
                f"{where}: annotation {ISTIO_USER_VOLUME_MOUNT}: mount {mount['name']!r} uses subPath; a subPath "
                "mount never sees a renewed certificate: mount the whole volume and name the files in the rule"
            )
        vols.mounts.append(mount)
    return vols


def credential_volume(secret: str) -> str:
    """The volume name for Secret ``secret``: a DNS-1123 label, unique per Secret.

    A Secret name may hold dots and be 253 characters long, a volume name neither: such a name
    is cleaned and cut, and a hash of the full name keeps two of them apart.
    """
    name = f"dbmtls-cred-{secret}"
    if len(name) <= 63 and "." not in secret:
        return name
    digest = hashlib.sha256(secret.encode()).hexdigest()[:10]
    return f"{name.replace('.', '-')[:52].rstrip('-')}-{digest}"


def _grace(spec: dict[str, Any]) -> int:
    value = spec.get("terminationGracePeriodSeconds")
    return value if isinstance(value, int) and value >= 0 else DEFAULT_GRACE


def _inject_pod(
    template: dict[str, Any], ns: str, where: str, mesh: Sequence[dict[str, Any]], options: InjectOptions
) -> None:
    meta = template.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise InjectError(f"{where}: metadata must be a mapping")
    spec = template.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
        raise InjectError(f"{where}: the pod spec has no containers")
    annotations = _annotations(meta)
    names = {c.get("name") for key in ("containers", "initContainers") for c in spec.get(key) or []}
    if sidecar.CONTAINER in names:
        raise InjectError(f"{where}: a container is already named {sidecar.CONTAINER!r}")

    rules, notes = applicable_rules(mesh, ns, _labels(meta), options.cluster_domain)
    for note in notes:
        LOG.info("%s: %s", where, note)
    config_map, inline = _user_config(annotations, where)
    if not rules and config_map is None and inline is None:
        raise InjectError(
            f"{where} asks for the dbmtls sidecar, but no DestinationRule with TLS settings applies to it "
            f"(namespace {ns}, labels {_labels(meta) or '{}'}) and it has no {CONFIG} annotation: "
            "give the DestinationRule with -f (the webhook watches them), check its workloadSelector, "
            f"or name a dbmtls config in the {CONFIG} annotation"
        )
    volumes = _volumes(annotations, rules, config_map, where)
    config, aliases = _generated_config(rules, ns, inline, _grace(spec), where)
    if not config.get("databases") and config_map is None:
        # e.g. rules whose TLS is mode DISABLE: nothing to originate, and a sidecar without a
        # database would not start
        raise InjectError(
            f"{where} asks for the dbmtls sidecar, but the DestinationRules that apply to it leave dbmtls "
            f"nothing to do (no port with TLS to originate: mode DISABLE?) and it has no {CONFIG} annotation "
            "naming a config with databases"
        )
    _check_paths(config, volumes.mounts, where)
    volumes.pod = _new_volumes(spec, volumes.pod, where)

    args = ["run"]
    if config_map is not None:
        args += ["-c", f"{sidecar.USER_CONFIG_DIR}/{sidecar.USER_CONFIG_KEY}"]
    args += ["-c", f"env:{sidecar.CONFIG_ENV}", "--log-format", "json"]
    container = sidecar.container(
        image=options.image,
        args=args,
        config_yaml=yaml.safe_dump(config, sort_keys=False, default_flow_style=False),
        mounts=volumes.mounts,
        annotations=annotations,
        native=options.native_sidecar,
    )
    if options.native_sidecar:
        # first: other initContainers (a schema migration, say) can already use the database
        spec["initContainers"] = [container, *(spec.get("initContainers") or [])]
    else:
        spec["containers"] = [container, *spec["containers"]]
    if volumes.pod:
        spec["volumes"] = [*(spec.get("volumes") or []), *volumes.pod]
    if aliases:
        spec["hostAliases"] = [
            *(spec.get("hostAliases") or []),
            *({"ip": ip, "hostnames": hostnames} for ip, hostnames in aliases.items()),
        ]
    new_annotations = dict(meta.get("annotations") or {})
    if "prometheus.io/scrape" not in new_annotations:
        new_annotations.update(
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(sidecar.HEALTH_PORT),
                "prometheus.io/path": "/metrics",
            }
        )
    status = {
        "version": __version__,
        "mode": "native" if options.native_sidecar else "container",
        "container": sidecar.CONTAINER,
        "volumes": [v["name"] for v in volumes.pod],
        "hostnames": sorted(h for hs in aliases.values() for h in hs),
    }
    new_annotations[STATUS] = json.dumps(status, separators=(",", ":"))
    meta["annotations"] = new_annotations


def _user_config(annotations: dict[str, str], where: str) -> tuple[str | None, dict[str, Any] | None]:
    """``dbmtls.io/config``: a ConfigMap name (key ``dbmtls.yaml``), or a dbmtls config inline."""
    raw = annotations.get(CONFIG)
    if raw is None:
        return None, None
    text = raw.strip()
    if DNS1123_SUBDOMAIN.match(text) and len(text) <= 253:
        return text, None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InjectError(f"{where}: annotation {CONFIG} is neither a ConfigMap name nor valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise InjectError(f"{where}: annotation {CONFIG} must be a ConfigMap name or a dbmtls config mapping")
    return None, doc


def _next_ip(used: dict[str, set[int]], port: int) -> str:
    """The first loopback address whose ``port`` is free: two databases may share a port."""
    for n in range(1, 255):
        ip = f"127.0.0.{n}"
        if port not in used.setdefault(ip, set()):
            used[ip].add(port)
            return ip
    raise InjectError(f"more than 254 databases on port {port}")


def _generated_config(
    rules: list[AppliedRule], ns: str, inline: dict[str, Any] | None, grace: int, where: str
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The sidecar's dbmtls config and the hostAliases (ip -> names) that lead the app to it."""
    used: dict[str, set[int]] = {}
    aliases: dict[str, list[str]] = {}
    databases: list[dict[str, Any]] = []
    taken: set[str] = set()
    for rule in rules:
        rule_name = f"DestinationRule {rule.namespace}/{rule.doc.get('metadata', {}).get('name', '?')}"
        try:
            result = map_destination_rule(rule.doc, rule_name)
        except ConfigError as exc:
            raise InjectError(f"{where}: {exc.message}") from None
        for note in result.notes:
            LOG.info("%s: %s", where, note)
        mapped = [m.raw for m in result.databases]
        for db in mapped:
            _host, port = split_host_port(db["address"])
            listen = rule.doc.get("metadata", {}).get("annotations", {}).get("dbmtls.io/listen")
            if listen is None or len(mapped) > 1:
                db["listen"] = f"{_next_ip(used, port)}:{port}"
            if "dial" not in db and rule.service.namespace is not None:
                # the rule's short name is read in the rule's namespace, not the pod's search list
                # trailing dot: an absolute name skips the search list (ndots:5 would try 3 suffixes first)
                db["dial"] = f"{rule.service.fqdn}.:{port}"
            _by_credential_name(db.get("tls") or {})
            name = db["name"] if db["name"] not in taken else f"{db['name']}.{rule.namespace}"
            db["name"] = name
            taken.add(name)
            databases.append(db)
            lhost, lport = split_host_port(db["listen"])
            if lport == port and is_loopback(lhost) and not lhost.startswith("unix:"):
                aliases.setdefault(lhost, [])
                aliases[lhost] += [a for a in rule.service.aliases(ns) if a not in aliases[lhost]]
    generated: dict[str, Any] = {
        "dns": {"mode": "direct"},
        "admin": {"listen": sidecar.ADMIN_LISTEN, "publicListen": f"0.0.0.0:{sidecar.HEALTH_PORT}"},
        "drainTimeout": f"{max(1, grace - DRAIN_MARGIN)}s",
    }
    documents: list[tuple[dict[str, Any], str]] = []
    if inline is not None:
        documents.append((inline, f"{where} annotation {CONFIG}"))
        inline_names = {d.get("name") for d in inline.get("databases") or [] if isinstance(d, dict)}
        databases = [d for d in databases if d["name"] not in inline_names]
    config = {**generated, "databases": databases} if databases else dict(generated)
    documents.append((config, f"{where} (generated)"))
    try:
        config_from_documents(documents, where)
    except ConfigError as exc:
        raise InjectError(f"{where}: {exc}") from None
    if inline is not None:
        # the inline config's own databases travel with the generated ones, in one document
        config = {**inline, **generated, "databases": [*(inline.get("databases") or []), *databases]}
    return config, aliases


def _by_credential_name(tls: dict[str, Any]) -> None:
    """Files of a mounted ``credentialName`` Secret go back to ``credentialName`` in the config.

    The sidecar's loader then picks the Secret's layout (cert-manager's ``tls.crt``... or
    Istio's generic ``cert``...) from the files it finds when it starts, which the injector
    cannot see; the mount directory is the loader's default ``credentialsDir``.
    """
    secrets = set()
    for key in ("clientCertificate", "privateKey", "caCertificates"):
        value = tls.get(key)
        if isinstance(value, str) and value.startswith(CREDENTIALS_DIR + "/"):
            secrets.add(value[len(CREDENTIALS_DIR) + 1 :].split("/", 1)[0])
    if len(secrets) == 1:
        for key in ("clientCertificate", "privateKey", "caCertificates"):
            tls.pop(key, None)
        tls["credentialName"] = secrets.pop()


def _cert_paths(config: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for db in config.get("databases") or []:
        tls = db.get("tls") or {}
        for key in ("clientCertificate", "privateKey", "caCertificates"):
            if isinstance(tls.get(key), str):
                out.append((f"{db.get('name')}: tls.{key}", tls[key]))
        for user, uc in (tls.get("userCertificates") or {}).items():
            for key in ("clientCertificate", "privateKey"):
                if isinstance((uc or {}).get(key), str):
                    out.append((f"{db.get('name')}: tls.userCertificates.{user}.{key}", uc[key]))
    return out


def _check_paths(config: dict[str, Any], mounts: list[dict[str, Any]], where: str) -> None:
    """Every certificate file must be on a volume of the sidecar, or the pod starts not ready."""
    roots = [str(m.get("mountPath", "")).rstrip("/") + "/" for m in mounts] + list(IMAGE_PATHS)
    for what, path in _cert_paths(config):
        if not any(path.startswith(root) for root in roots):
            raise InjectError(
                f"{where}: {what} is {path}, which is on no volume of the sidecar: use credentialName "
                f"(the injector mounts the Secret), or mount the Secret into the sidecar with the "
                f"{ISTIO_USER_VOLUME} and {ISTIO_USER_VOLUME_MOUNT} annotations"
            )


def _new_volumes(spec: dict[str, Any], new: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The volumes to add: one the pod already has, identical, is shared, not added twice."""
    existing = {v.get("name"): v for v in spec.get("volumes") or [] if isinstance(v, dict)}
    out: list[dict[str, Any]] = []
    for vol in new:
        name = vol["name"]
        if name in existing and existing[name] == vol:
            continue
        if name in existing or any(v["name"] == name for v in out):
            raise InjectError(f"{where}: the pod already has a different volume named {name!r}; rename one of them")
        out.append(vol)
    return out
