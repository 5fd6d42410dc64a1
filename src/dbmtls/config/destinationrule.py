"""Istio DestinationRule -> dbmtls databases, with Istio's own semantics, field by field.

A DestinationRule written for a mesh is a dbmtls config as it is (README, "An Istio
DestinationRule is a dbmtls config", which also has the table of what each field becomes).
The rules this module follows, in the order it applies them:

1. **The shape.**  Every field of the current API (``networking.istio.io`` v1alpha3, v1beta1,
   v1) is known, at every level, ``portLevelSettings`` and ``subsets`` included; an unknown
   key is an error naming it, so that a typo (``tsl:``) never silently means "use the
   rule-level TLS instead".
2. **What can never work here**, before anything an annotation could fix: a wildcard host,
   ``ISTIO_MUTUAL`` (the mesh's own identity), TLS under ``subsets`` (a subset is chosen by a
   VirtualService route, which dbmtls does not have), ``tunnel``, ``proxyProtocol``, ``caCrl``.
3. **What Istio itself validates** (istio/istio ``pkg/config/validation``: ``ValidateTLS``,
   ``validateTrafficPolicy``), with the same outcome: ``insecureSkipVerify`` excludes
   ``caCertificates``/``subjectAltNames`` (and ``credentialName`` with SIMPLE); MUTUAL needs a
   client certificate and key unless ``credentialName`` gives them; ``credentialName`` excludes
   file paths; a traffic policy must set something.  One thing is stricter than Istio: a ``tls``
   block without ``mode`` is an error, because Istio's default (DISABLE, plaintext) is never
   what someone who wrote a TLS block meant.
4. **The ports.**  The rule-level ``tls`` applies to every port of the host and a
   ``portLevelSettings`` entry with ``tls`` replaces it (not merged) for its port, as in Istio.
   The ports are those of a Service or ServiceEntry for the host among the inputs
   (``mesh.py``), else the ``portLevelSettings`` ports plus the default port of the rule's
   protocol.  A port whose TLS is absent or DISABLE has nothing for dbmtls to do: it is
   skipped with a note.
5. **The protocol of each port**: the ``dbmtls.io/protocol`` annotation, else what the
   Service/ServiceEntry port declares, else the well-known port, else a protocol name that is a
   word of the host; when nothing says, opaque TCP (TLS from the first byte), which is what
   Istio does with a protocol it does not know.
6. **What only a mesh uses** (load balancing, connection pools, outlier detection, retry
   budget, ``exportTo``, ``workloadSelector``, subsets without TLS) is accepted and listed as
   ignored for every database it would have concerned.

``map_destination_rule`` is pure apart from ``credentialName``, which the caller's resolver
turns into file paths (``credentials.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbmtls.config import credentials
from dbmtls.config.explain import DatabaseExplanation, Note, Origin
from dbmtls.config.mesh import ISTIO_API_VERSIONS, MeshIndex, MeshPort, MeshService, Says, declared_protocol
from dbmtls.config.model import split_host_port
from dbmtls.errors import ConfigError
from dbmtls.protocols.registry import REGISTRY

API_VERSIONS = ISTIO_API_VERSIONS
ANNOTATION_PROTOCOL = "dbmtls.io/protocol"
ANNOTATION_LISTEN = "dbmtls.io/listen"
ANNOTATION_ADDRESS = "dbmtls.io/address"
ANNOTATIONS = (ANNOTATION_PROTOCOL, ANNOTATION_LISTEN, ANNOTATION_ADDRESS)

# --- the shape of the current API ------------------------------------------------------------
#
# A node is a dict of the keys a mapping may hold (value: the node of that key), a one-element
# list (a list of such nodes), or ANY (a value whose contents dbmtls does not look into: a
# free-form map such as labels, or a leaf).

ANY: None = None
Node = dict[str, Any] | list[Any] | None

TLS_FIELDS = (
    "mode",
    "clientCertificate",
    "privateKey",
    "caCertificates",
    "credentialName",
    "subjectAltNames",
    "sni",
    "insecureSkipVerify",
    "caCrl",
)
# dbmtls's own additions to ClientTLSSettings (Istio's API has them only for servers)
TLS_EXTENSIONS = ("minProtocolVersion", "maxProtocolVersion")
_TLS: dict[str, Node] = dict.fromkeys((*TLS_FIELDS, *TLS_EXTENSIONS), ANY)
_CONNECTION_POOL: dict[str, Node] = {
    "tcp": {
        "maxConnections": ANY,
        "connectTimeout": ANY,
        "tcpKeepalive": {"probes": ANY, "time": ANY, "interval": ANY},
        "maxConnectionDuration": ANY,
        "idleTimeout": ANY,
    },
    "http": dict.fromkeys(
        (
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "idleTimeout",
            "h2UpgradePolicy",
            "useClientProtocol",
            "maxConcurrentStreams",
        ),
        ANY,
    ),
}
_LOAD_BALANCER: dict[str, Node] = {
    "simple": ANY,
    "consistentHash": {
        "httpHeaderName": ANY,
        "httpCookie": ANY,  # name, path, ttl and, in newer releases, cookie attributes
        "useSourceIp": ANY,
        "httpQueryParameterName": ANY,
        "ringHash": {"minimumRingSize": ANY},
        "maglev": {"tableSize": ANY},
        "minimumRingSize": ANY,
    },
    "localityLbSetting": {
        "distribute": [{"from": ANY, "to": ANY}],
        "failover": [{"from": ANY, "to": ANY}],
        "failoverPriority": ANY,
        "enabled": ANY,
    },
    "warmupDurationSecs": ANY,
    "warmup": {"duration": ANY, "minimumPercent": ANY, "aggression": ANY},
}
_OUTLIER_DETECTION: dict[str, Node] = dict.fromkeys(
    (
        "splitExternalLocalOriginErrors",
        "consecutiveLocalOriginFailures",
        "consecutiveGatewayErrors",
        "consecutive5xxErrors",
        "interval",
        "baseEjectionTime",
        "maxEjectionPercent",
        "minHealthPercent",
        "consecutiveErrors",
    ),
    ANY,
)
_PORT_POLICY: dict[str, Node] = {
    "port": {"number": ANY},
    "loadBalancer": _LOAD_BALANCER,
    "connectionPool": _CONNECTION_POOL,
    "outlierDetection": _OUTLIER_DETECTION,
    "tls": _TLS,
}
_POLICY: dict[str, Node] = {
    "loadBalancer": _LOAD_BALANCER,
    "connectionPool": _CONNECTION_POOL,
    "outlierDetection": _OUTLIER_DETECTION,
    "tls": _TLS,
    "portLevelSettings": [_PORT_POLICY],
    "tunnel": {"protocol": ANY, "targetHost": ANY, "targetPort": ANY},
    "proxyProtocol": {"version": ANY},
    "retryBudget": {"percent": ANY, "minRetryConcurrency": ANY, "budgetInterval": ANY},
}
_SPEC: dict[str, Node] = {
    "host": ANY,
    "trafficPolicy": _POLICY,
    "subsets": [{"name": ANY, "labels": ANY, "trafficPolicy": _POLICY}],
    "exportTo": ANY,
    "workloadSelector": {"matchLabels": ANY},
}
_TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}

# Fields that matter only to a mesh, and why ignoring them changes nothing about TLS.
MESH_ONLY: dict[str, str] = {
    "loadBalancer": "load balancing across endpoints (dbmtls dials one address)",
    "connectionPool": "the mesh's connection pool and HTTP settings (dbmtls has its own maxConnections, "
    "connectTimeout and idleTimeout)",
    "outlierDetection": "ejecting endpoints (dbmtls dials one address)",
    "retryBudget": "HTTP retries (dbmtls relays bytes, it never retries a request)",
}
_SPEC_IGNORED = {
    "exportTo": "which namespaces see the rule; a dbmtls process uses every rule it is given",
    "workloadSelector": "which workloads use the rule; for dbmtls, the process it is given to",
}


def is_destination_rule(doc: dict[str, Any]) -> bool:
    return doc.get("kind") == "DestinationRule"


def _err(source: str, path: str, message: str) -> ConfigError:
    return ConfigError(message, source=source, path=path)


def check_shape(value: Any, node: Node, source: str, path: str) -> None:
    """Unknown keys are errors at every level; mappings and lists must be what the API says."""
    if node is ANY or value is None:
        return
    if isinstance(node, list):
        if not isinstance(value, list):
            raise _err(source, path, "must be a list")
        for i, item in enumerate(value):
            check_shape(item, node[0], source, f"{path}[{i}]")
        return
    if not isinstance(value, dict):
        raise _err(source, path, "must be a mapping")
    for key, item in value.items():
        if key not in node:
            known = ", ".join(node)
            raise _err(source, f"{path}.{key}", f"unknown field (check the spelling; the fields here are: {known})")
        check_shape(item, node[key], source, f"{path}.{key}")


# --- the result --------------------------------------------------------------------------------


@dataclass
class MappedDatabase:
    raw: dict[str, Any]  # a database as in a dbmtls config, to be validated by the model
    tls_path: str  # YAML path of the TLS block it came from: errors about tls.* are put there
    explanation: DatabaseExplanation


@dataclass
class MappedRule:
    databases: list[MappedDatabase] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)  # ports skipped, and why


CredentialResolver = Callable[[str, bool, bool], credentials.Credential]


def default_credentials(credentials_dir: str = credentials.DEFAULT_CREDENTIALS_DIR) -> CredentialResolver:
    def resolve(name: str, mutual: bool, verify: bool) -> credentials.Credential:
        return credentials.resolve(name, mutual=mutual, verify=verify, credentials_dir=credentials_dir)

    return resolve


# --- the rule -------------------------------------------------------------------------------------


@dataclass
class _Rule:
    source: str
    name: str
    namespace: str | None
    host: str
    annotations: dict[str, str]
    spec: dict[str, Any]
    policy: dict[str, Any]


def _read(doc: dict[str, Any], source: str) -> _Rule:
    """Step 1: the shape, at every level."""
    unknown = sorted(set(doc) - _TOP_LEVEL)
    if unknown:
        raise _err(source, unknown[0], "unknown top-level field of a DestinationRule (check the spelling)")
    api = doc.get("apiVersion")
    if api not in API_VERSIONS:
        raise _err(source, "apiVersion", f"unsupported DestinationRule apiVersion {api!r}; one of {API_VERSIONS}")
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _err(source, "metadata", "must be a mapping")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _err(source, "metadata.name", "a DestinationRule needs a metadata.name")
    raw_annotations = meta.get("annotations") or {}
    if not isinstance(raw_annotations, dict):
        raise _err(source, "metadata.annotations", "must be a mapping")
    annotations = {str(k): str(v) for k, v in raw_annotations.items()}
    for key in annotations:
        if key.startswith("dbmtls.io/") and key not in ANNOTATIONS:
            raise _err(
                source,
                f"metadata.annotations.{key}",
                f"unknown dbmtls annotation (check the spelling; a DestinationRule may carry {', '.join(ANNOTATIONS)})",
            )
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise _err(source, "spec", "a DestinationRule needs a spec")
    check_shape(spec, _SPEC, source, "spec")
    policy = spec.get("trafficPolicy") or {}
    namespace = meta.get("namespace")
    host = spec.get("host")
    return _Rule(
        source,
        name,
        str(namespace) if namespace else None,
        host if isinstance(host, str) else "",
        annotations,
        spec,
        policy,
    )


def _set(tls: dict[str, Any]) -> dict[str, Any]:
    """The fields a TLS block sets: ``key:`` with nothing after it (null) is the field left out."""
    return {k: v for k, v in tls.items() if v is not None}


def _tls_blocks(policy: dict[str, Any], prefix: str) -> list[tuple[dict[str, Any], str]]:
    """Every TLS block of a traffic policy, with its YAML path."""
    out: list[tuple[dict[str, Any], str]] = []
    if isinstance(policy.get("tls"), dict):
        out.append((policy["tls"], f"{prefix}.tls"))
    for i, pls in enumerate(policy.get("portLevelSettings") or []):
        if isinstance(pls, dict) and isinstance(pls.get("tls"), dict):
            out.append((pls["tls"], f"{prefix}.portLevelSettings[{i}].tls"))
    return out


def _subset_policies(rule: _Rule) -> list[tuple[str, Any]]:
    return [
        (f"spec.subsets[{i}].trafficPolicy", (subset or {}).get("trafficPolicy"))
        for i, subset in enumerate(rule.spec.get("subsets") or [])
    ]


def _never_works(rule: _Rule) -> None:
    """Step 2: what no annotation or other document could fix, said first."""
    src, host = rule.source, rule.host
    if not host:
        raise _err(src, "spec.host", "a DestinationRule needs a host")
    if "*" in host:
        raise _err(
            src,
            "spec.host",
            f"{host} is a wildcard: dbmtls connects to one server and must know its name; "
            "write one DestinationRule per server host",
        )
    for tls, path in _tls_blocks(rule.policy, "spec.trafficPolicy"):
        if tls.get("mode") == "ISTIO_MUTUAL":
            raise _err(
                src,
                f"{path}.mode",
                "ISTIO_MUTUAL uses the mesh's own certificates, which dbmtls does not have; "
                "use MUTUAL with clientCertificate, privateKey and caCertificates file paths (or credentialName)",
            )
    for i, subset in enumerate(rule.spec.get("subsets") or []):
        sp = (subset or {}).get("trafficPolicy") or {}
        for _tls, path in _tls_blocks(sp, f"spec.subsets[{i}].trafficPolicy"):
            raise _err(
                src,
                path,
                "TLS settings of a subset apply only to traffic a VirtualService routes to that subset, and "
                "dbmtls has no routes: move them to spec.trafficPolicy.tls (or its portLevelSettings), or "
                "write a DestinationRule per server",
            )
    policies = [("spec.trafficPolicy", rule.policy), *_subset_policies(rule)]
    for prefix, policy in policies:
        policy = policy or {}
        if policy.get("tunnel") is not None:
            raise _err(
                src,
                f"{prefix}.tunnel",
                "dbmtls connects to the server directly and cannot tunnel through an HTTP CONNECT/POST proxy: "
                "remove tunnel, and point dbmtls.io/address at an address that reaches the server",
            )
        if policy.get("proxyProtocol") is not None:
            raise _err(
                src,
                f"{prefix}.proxyProtocol",
                "dbmtls does not send a PROXY protocol header: remove proxyProtocol (a server that requires "
                "one will refuse dbmtls's connections)",
            )
    for tls, path in _tls_blocks(rule.policy, "spec.trafficPolicy"):
        if tls.get("caCrl"):
            raise _err(
                src,
                f"{path}.caCrl",
                "dbmtls does not check certificate revocation lists: remove caCrl (rotate the server's "
                "certificate to revoke it)",
            )


_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")


def _istio_validation(rule: _Rule) -> None:
    """Step 3: what Istio's validation rejects (pkg/config/validation), with the same outcome."""
    src = rule.source
    policies = [("spec.trafficPolicy", rule.spec.get("trafficPolicy")), *_subset_policies(rule)]
    for prefix, policy in policies:
        if policy is not None and not policy:
            raise _err(src, prefix, "traffic policy must have at least one field (as in Istio): remove it or fill it")
        for i, pls in enumerate((policy or {}).get("portLevelSettings") or []):
            path = f"{prefix}.portLevelSettings[{i}]"
            pls = pls or {}
            number = (pls.get("port") or {}).get("number")
            if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
                raise _err(src, f"{path}.port.number", "portLevelSettings entries need a port number 1-65535")
            if not set(pls) - {"port"}:
                raise _err(src, path, "port traffic policy must have at least one field besides port (as in Istio)")
    names: dict[str, int] = {}
    for i, subset in enumerate(rule.spec.get("subsets") or []):
        if not isinstance((subset or {}).get("name"), str) or not subset["name"]:
            raise _err(src, f"spec.subsets[{i}].name", "a subset needs a name (as in Istio)")
        if subset["name"] in names:
            raise _err(src, f"spec.subsets[{i}].name", f"duplicate subset name (spec.subsets[{names[subset['name']]}])")
        names[subset["name"]] = i
    _validate_selection(rule)
    for tls, path in _tls_blocks(rule.policy, "spec.trafficPolicy"):
        _validate_tls(tls, src, path)


def _validate_selection(rule: _Rule) -> None:
    """``exportTo`` and ``workloadSelector`` as Istio validates them (validateExportTo,
    validateWorkloadSelector): dbmtls ignores them, but the Kubernetes injector applies them, and
    a rule ``kubectl apply`` would refuse must not work here."""
    src, spec = rule.source, rule.spec
    export = spec.get("exportTo")
    if export is not None:
        if not isinstance(export, list) or not all(isinstance(e, str) and e for e in export):
            raise _err(src, "spec.exportTo", "must be a list of namespaces, '.' or '*'")
        own = {".", rule.namespace} if rule.namespace else {"."}
        seen = [rule.namespace if e == "." and rule.namespace else e for e in export]
        if len(set(seen)) != len(seen):
            raise _err(src, "spec.exportTo", "duplicate entries in exportTo (as in Istio)")
        if "*" in export and len(export) > 1:
            raise _err(src, "spec.exportTo", "cannot have both public (*) and non-public exportTo values (as in Istio)")
        # without a metadata.namespace, a single namespace may well be the rule's own
        beyond = set(export) - own if rule.namespace else set(export) & {"*"}
        if spec.get("workloadSelector") is not None and (beyond or len(export) > 1):
            raise _err(
                src,
                "spec.exportTo",
                "a rule with a workloadSelector applies only in its own namespace: exportTo may only be '.' "
                "(as in Istio)",
            )
    selector = spec.get("workloadSelector")
    if selector is not None:
        labels = selector.get("matchLabels") or {}
        if not isinstance(labels, dict):
            raise _err(src, "spec.workloadSelector.matchLabels", "must be a mapping of label to value")
        for key, value in labels.items():
            if not key or "*" in str(key) or "*" in str(value):
                raise _err(
                    src,
                    f"spec.workloadSelector.matchLabels.{key}",
                    "an empty key or a wildcard is not supported in a selector (as in Istio)",
                )


def _validate_tls(tls: dict[str, Any], src: str, path: str) -> None:
    tls = _set(tls)
    if "mode" not in tls:
        # Istio's default mode is DISABLE: TLS settings without a mode would silently mean
        # plaintext, which is never what someone who wrote a TLS block meant.
        raise _err(src, f"{path}.mode", "a tls block without a mode: set mode: SIMPLE or MUTUAL (or DISABLE)")
    mode = tls["mode"]
    if mode not in _MODES:
        raise _err(src, f"{path}.mode", f"unknown TLS mode {mode!r}; one of {', '.join(_MODES)}")
    for key in ("clientCertificate", "privateKey", "caCertificates", "credentialName", "sni", "caCrl"):
        if key in tls and not isinstance(tls[key], str):
            raise _err(src, f"{path}.{key}", "must be a string")
    sans = tls.get("subjectAltNames")
    if sans is not None and (not isinstance(sans, list) or not all(isinstance(s, str) for s in sans)):
        raise _err(src, f"{path}.subjectAltNames", "must be a list of names")
    skip = tls.get("insecureSkipVerify")
    if skip is not None and not isinstance(skip, bool):
        raise _err(src, f"{path}.insecureSkipVerify", "must be true or false")
    if skip:
        # Istio: "cannot specify CaCertificates or CredentialName or SubjectAltNames when
        # InsecureSkipVerify is set true" (SIMPLE; with MUTUAL credentialName still gives the key pair)
        clash = ["caCertificates", "subjectAltNames"] + (["credentialName"] if mode == "SIMPLE" else [])
        for key in clash:
            if tls.get(key):
                raise _err(
                    src,
                    f"{path}.{key}",
                    f"insecureSkipVerify skips verifying the server, so {key} would be ignored (Istio rejects "
                    f"this too): remove {key} or insecureSkipVerify",
                )
    if mode in ("SIMPLE", "MUTUAL") and tls.get("credentialName"):
        for key in ("clientCertificate", "privateKey", "caCertificates", "caCrl"):
            if key in tls:
                raise _err(
                    src,
                    f"{path}.{key}",
                    "credentialName gives the certificates: remove the file paths, or remove credentialName "
                    "(Istio accepts only one of the two)",
                )
        try:
            credentials.secret_name(tls["credentialName"])
        except ValueError as exc:
            raise _err(src, f"{path}.credentialName", str(exc)) from None
    elif mode == "MUTUAL":
        for key in ("clientCertificate", "privateKey"):
            if not tls.get(key):
                raise _err(
                    src,
                    f"{path}.{key}",
                    f"mode MUTUAL needs clientCertificate and privateKey (or credentialName): {key} is missing",
                )


# --- ports and protocols ------------------------------------------------------------------------------


@dataclass
class _Target:
    port: int
    port_origin: Origin
    tls: dict[str, Any] | None
    tls_path: str
    mesh_port: MeshPort | None = None
    port_policy: dict[str, Any] | None = None
    port_policy_path: str | None = None
    # the port is the default port of the protocol the annotation or the host names: that
    # protocol is the port's, whatever else uses the same port number
    default_of_rule_protocol: bool = False


def _rule_protocol(rule: _Rule) -> tuple[str | None, Origin | None]:
    """The protocol the annotation or the host names, for a rule without Service/ServiceEntry ports."""
    explicit = rule.annotations.get(ANNOTATION_PROTOCOL)
    if explicit is not None:
        spec = REGISTRY.find(explicit)
        if spec is None:
            raise _err(
                rule.source,
                f"metadata.annotations.{ANNOTATION_PROTOCOL}",
                f"unknown protocol {explicit!r}; one of {', '.join(REGISTRY.names)}",
            )
        return spec.name, Origin(
            f"annotation {ANNOTATION_PROTOCOL}: {explicit}", rule.source, f"metadata.annotations.{ANNOTATION_PROTOCOL}"
        )
    spec = REGISTRY.named_in_host(rule.host)
    if spec is not None:
        return spec.name, Origin(f"the word {spec.name!r} in the host {rule.host}", rule.source, "spec.host")
    return None, None


def _targets(rule: _Rule, service: MeshService | None, notes: list[Note]) -> list[_Target]:
    """Step 4: every port the rule's TLS applies to, with the TLS block that applies."""
    src = rule.source
    rule_tls = rule.policy.get("tls")
    by_port: dict[int, tuple[int, dict[str, Any]]] = {}
    for i, pls in enumerate(rule.policy.get("portLevelSettings") or []):
        number = pls["port"]["number"]
        if number in by_port:
            raise _err(
                src,
                f"spec.trafficPolicy.portLevelSettings[{i}].port.number",
                f"port {number} is already set by portLevelSettings[{by_port[number][0]}]",
            )
        by_port[number] = (i, pls)

    ports: list[tuple[int, Origin, MeshPort | None]] = []
    default_port: int | None = None
    if service is not None:
        for sp in service.ports:
            ports.append((sp.number, Origin(f"{service.title} port {sp.number}", service.source, sp.path), sp))
        known = {p for p, _, _ in ports}
        for number, (i, _pls) in by_port.items():
            if number not in known:
                notes.append(
                    Note(
                        f"port {number} is not a port of {service.title} ({service.source}): this entry applies "
                        "to no connection (as in Istio)",
                        src,
                        f"spec.trafficPolicy.portLevelSettings[{i}]",
                    )
                )
    else:
        for number, (i, _pls) in by_port.items():
            path = f"spec.trafficPolicy.portLevelSettings[{i}].port.number"
            ports.append((number, Origin("portLevelSettings", src, path), None))
        protocol, _origin = _rule_protocol(rule)
        default = REGISTRY.get(protocol).default_port if protocol else None
        if rule_tls is not None and default is not None and default not in by_port:
            ports.insert(0, (default, Origin(f"the default port of {protocol}"), None))
            default_port = default

    targets: list[_Target] = []
    for number, origin, mp in ports:
        tls, tls_path = rule_tls, "spec.trafficPolicy.tls"
        pls_path = None
        pls = None
        if number in by_port:
            i, pls = by_port[number]
            pls_path = f"spec.trafficPolicy.portLevelSettings[{i}]"
            if "tls" in pls:
                tls, tls_path = pls["tls"], f"{pls_path}.tls"
        targets.append(_Target(number, origin, tls, tls_path, mp, pls, pls_path, number == default_port))

    if not targets and rule_tls is not None and rule_tls["mode"] != "DISABLE":
        if service is not None:
            raise ConfigError(
                f"{service.title} lists no ports, so nothing says where DestinationRule {rule.name} connects: "
                "add its ports",
                source=service.source,
                path="spec.ports",
            )
        raise _err(
            src,
            "spec.trafficPolicy.portLevelSettings",
            f"cannot tell which port of {rule.host} to connect to: add portLevelSettings with a port.number, "
            f"put the Service or ServiceEntry of {rule.host} among the inputs, or name a protocol with a default "
            f"port in the annotation {ANNOTATION_PROTOCOL}: <{'|'.join(REGISTRY.names)}>",
        )
    return targets


def _protocol(rule: _Rule, target: _Target, service: MeshService | None) -> tuple[str, Origin, list[Note]]:
    """Step 5: the protocol of one port, and how it was chosen."""
    src = rule.source
    explicit = rule.annotations.get(ANNOTATION_PROTOCOL)
    if explicit is not None or target.default_of_rule_protocol:
        protocol, origin = _rule_protocol(rule)
        assert protocol is not None
        assert origin is not None
        return protocol, origin, []
    if service is not None and target.mesh_port is not None:
        declared = declared_protocol(service, target.mesh_port)
        where = f"{service.title} port {target.port} {declared.how}"
        if declared.says is Says.APP_TLS:
            raise ConfigError(
                f"{where}: the app already speaks TLS on this port, and dbmtls would encrypt it again; "
                f"declare the port with the database's protocol (or tcp), or set the annotation "
                f"{ANNOTATION_PROTOCOL} on DestinationRule {rule.name}",
                source=service.source,
                path=declared.path,
            )
        if declared.protocol is not None:
            return declared.protocol, Origin(where, service.source, declared.path), []
    spec = REGISTRY.by_port(target.port)
    if spec is not None:
        return spec.name, Origin(f"the well-known port {target.port} of {spec.name}"), []
    protocol, origin = _rule_protocol(rule)
    if protocol is not None and origin is not None:
        return protocol, origin, []
    note = Note(
        f"nothing says which database listens on {rule.host} port {target.port}: relayed as opaque TCP with TLS "
        f"from the first byte, as Istio does with an unknown protocol; for a database that negotiates TLS "
        f"in-band (PostgreSQL, MySQL) set the annotation {ANNOTATION_PROTOCOL} or name the Service port",
        src,
        "spec.host",
    )
    return "tcp", Origin("nothing names a protocol: opaque TCP (Istio's default)"), [note]


# --- one database -------------------------------------------------------------------------------------


def _tls_settings(
    rule: _Rule,
    target: _Target,
    service: MeshService | None,
    resolve: CredentialResolver,
    exp: DatabaseExplanation,
) -> dict[str, Any]:
    tls = _set(target.tls or {})
    src, path = rule.source, target.tls_path
    mode = tls["mode"]
    out: dict[str, Any] = {"mode": mode}
    by_rule = f"DestinationRule {rule.name}"
    exp.origins["tls.mode"] = Origin(by_rule, src, f"{path}.mode")
    for key in ("sni", "subjectAltNames", "insecureSkipVerify", *TLS_EXTENSIONS):
        if key in tls and tls[key] is not None:
            out[key] = tls[key]
            exp.origins[f"tls.{key}"] = Origin(by_rule, src, f"{path}.{key}")
    # Istio verifies a ServiceEntry's subjectAltNames when the rule names none
    entry_sans = service.subject_alt_names if service is not None and not tls.get("insecureSkipVerify") else ()
    if "subjectAltNames" not in out and service is not None and entry_sans:
        out["subjectAltNames"] = list(entry_sans)
        exp.origins["tls.subjectAltNames"] = Origin(
            f"{service.title} subjectAltNames (the rule sets none)", service.source, "spec.subjectAltNames"
        )
    if mode == "SIMPLE":
        for key in ("clientCertificate", "privateKey"):
            if key in tls:
                exp.ignored.append(
                    Note(
                        f"mode SIMPLE presents no client certificate, so {key} is not used (as in Istio)",
                        src,
                        f"{path}.{key}",
                    )
                )
    if tls.get("credentialName"):
        name = credentials.secret_name(tls["credentialName"])
        cred = resolve(name, mode == "MUTUAL", not tls.get("insecureSkipVerify"))
        for key, file in cred.files.items():
            out[key] = file
            exp.origins[f"tls.{key}"] = Origin(cred.how(file), src, f"{path}.credentialName")
        exp.notes += [Note(n, src, f"{path}.credentialName") for n in cred.notes]
        exp.hints.append(cred.hint)
    else:
        keys = ("clientCertificate", "privateKey", "caCertificates") if mode == "MUTUAL" else ("caCertificates",)
        for key in keys:
            if key in tls:
                out[key] = tls[key]
                exp.origins[f"tls.{key}"] = Origin(by_rule, src, f"{path}.{key}")
    exp.defaults()
    return out


def _ignored(rule: _Rule, target: _Target, service: MeshService | None) -> list[Note]:
    src = rule.source
    out = [Note(f"ignored: {why}", src, f"spec.{k}") for k, why in _SPEC_IGNORED.items() if k in rule.spec]
    out += [Note(f"ignored: {why}", src, f"spec.trafficPolicy.{k}") for k, why in MESH_ONLY.items() if k in rule.policy]
    if target.port_policy is not None:
        out += [
            Note(f"ignored: {why}", src, f"{target.port_policy_path}.{k}")
            for k, why in MESH_ONLY.items()
            if k in target.port_policy
        ]
    if rule.spec.get("subsets"):
        out.append(
            Note(
                "ignored: subsets take effect only for traffic a VirtualService routes to them, and dbmtls has no "
                "routes",
                src,
                "spec.subsets",
            )
        )
    if service is not None:
        out += [Note(f"ignored: {n.message}", n.source, n.path) for n in service.ignored]
    return out


def _dial(rule: _Rule, target: _Target, service: MeshService | None, single: bool) -> tuple[str | None, Origin | None]:
    src = rule.source
    override = rule.annotations.get(ANNOTATION_ADDRESS)
    if override is not None:
        path = f"metadata.annotations.{ANNOTATION_ADDRESS}"
        try:
            host, port = split_host_port(override, default_port=target.port)
        except ValueError as exc:
            raise _err(src, path, str(exc)) from None
        if not single and port != target.port and ":" in override.rsplit("]", 1)[-1]:
            raise _err(
                src,
                path,
                f"{override} names one port, but this rule has several: write only the host (each port is "
                "dialled on it), or use overrides.<database>.dial",
            )
        return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}", Origin(ANNOTATION_ADDRESS, src, path)
    if service is None or target.mesh_port is None:
        return None, None
    mp = target.mesh_port
    if service.kind == "ServiceEntry":
        if service.endpoints and service.resolution in ("STATIC", "DNS", "DNS_ROUND_ROBIN"):
            ep = service.endpoints[0]
            target_port = mp.target_port if isinstance(mp.target_port, int) else None
            port = (ep.ports.get(mp.name) if mp.name else None) or target_port or mp.number
            host = f"[{ep.address}]" if ":" in ep.address else ep.address
            return f"{host}:{port}", Origin(f"{service.title} endpoints[0]", service.source, ep.path)
        if isinstance(mp.target_port, int) and mp.target_port != mp.number:
            return f"{rule.host}:{mp.target_port}", Origin(
                f"{service.title} port {mp.number} targetPort", service.source, f"{mp.path}.targetPort"
            )
    elif service.headless and isinstance(mp.target_port, int) and mp.target_port != mp.number:
        # a headless Service has no virtual IP forwarding port -> targetPort: its DNS names the pods
        return f"{rule.host}:{mp.target_port}", Origin(
            f"{service.title} (headless) port {mp.number} targetPort", service.source, f"{mp.path}.targetPort"
        )
    return None, None


_DISABLED = (
    "mode DISABLE, no TLS to originate: skipped (for a plaintext relay, write a dbmtls config with tls.mode: DISABLE)"
)


def map_destination_rule(
    doc: dict[str, Any],
    source: str,
    mesh: MeshIndex | None = None,
    resolve_credential: CredentialResolver | None = None,
) -> MappedRule:
    """The databases a rule yields (raw dicts for the model), with where each setting came from.

    ``mesh``: the Services and ServiceEntries among the inputs.  ``resolve_credential`` turns a
    ``credentialName`` into files (default: the Secret mounted under the default credentials
    directory, looked up on this machine).
    """
    rule = _read(doc, source)
    _never_works(rule)
    _istio_validation(rule)
    resolve = resolve_credential or default_credentials()
    out = MappedRule()
    blocks = _tls_blocks(rule.policy, "spec.trafficPolicy")
    if not blocks:
        out.notes.append(Note("no TLS settings: nothing for dbmtls to do, skipped", source, "spec.trafficPolicy"))
        return out
    if all(tls.get("mode") == "DISABLE" for tls, _path in blocks):
        for _tls, path in blocks:
            out.notes.append(Note(_DISABLED, source, f"{path}.mode"))
        return out
    service = mesh.lookup(rule.host, rule.namespace, source) if mesh is not None else None
    targets = []
    for target in _targets(rule, service, out.notes):
        where = f"port {target.port}"
        if target.tls is None:
            out.notes.append(Note(f"{where} has no TLS settings: nothing for dbmtls to do", source, target.tls_path))
        elif target.tls["mode"] == "DISABLE":
            out.notes.append(Note(f"{where}: {_DISABLED}", source, f"{target.tls_path}.mode"))
        elif (
            service is not None
            and target.mesh_port is not None
            and declared_protocol(service, target.mesh_port).says is Says.UDP
            and ANNOTATION_PROTOCOL not in rule.annotations
        ):
            out.notes.append(
                Note(
                    f"{where} of {service.title} is not TCP: TLS does not apply", service.source, target.mesh_port.path
                )
            )
        else:
            targets.append(target)
    single = len(targets) == 1
    if not single and targets:
        for key in (ANNOTATION_LISTEN,):
            if key in rule.annotations:
                raise _err(
                    source,
                    f"metadata.annotations.{key}",
                    f"names one listener, but this rule yields {len(targets)} databases (ports "
                    f"{', '.join(str(t.port) for t in targets)}): use overrides.<database>.listen instead",
                )
    for target in targets:
        exp = DatabaseExplanation()
        protocol, proto_origin, proto_notes = _protocol(rule, target, service)
        exp.notes += proto_notes
        name = rule.name if single else f"{rule.name}-{target.port}"
        exp.origins["name"] = Origin(
            f"DestinationRule {rule.name}" + ("" if single else f" and port {target.port}"), source, "metadata.name"
        )
        exp.origins["protocol"] = proto_origin
        exp.origins["address"] = Origin(f"DestinationRule {rule.name}", source, "spec.host")
        exp.origins["port"] = target.port_origin
        if single and ANNOTATION_LISTEN in rule.annotations:
            listen = rule.annotations[ANNOTATION_LISTEN]
            exp.origins["listen"] = Origin(ANNOTATION_LISTEN, source, f"metadata.annotations.{ANNOTATION_LISTEN}")
        else:
            listen = f"127.0.0.1:{target.port}"
            exp.origins["listen"] = Origin(f"loopback on the server's port {target.port}")
        db: dict[str, Any] = {
            "name": name,
            "protocol": protocol,
            "listen": listen,
            "address": f"{rule.host}:{target.port}",
            "tls": _tls_settings(rule, target, service, resolve, exp),
        }
        dial, dial_origin = _dial(rule, target, service, single)
        if dial is not None and dial_origin is not None:
            db["dial"] = dial
            exp.origins["dial"] = dial_origin
            from_endpoints = dial_origin.path is not None and "endpoints" in dial_origin.path
            if service is not None and from_endpoints and len(service.endpoints) > 1:
                exp.notes.append(
                    Note(
                        f"{service.title} has {len(service.endpoints)} endpoints; dbmtls dials only the first "
                        "(no load balancing or failover)",
                        service.source,
                        "spec.endpoints",
                    )
                )
        exp.ignored += _ignored(rule, target, service)
        out.databases.append(MappedDatabase(db, target.tls_path, exp))
    return out
