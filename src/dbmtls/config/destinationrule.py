"""Istio DestinationRule -> dbmtls databases.

A DestinationRule written for a mesh is a valid dbmtls config file as-is.
Mapping (documented in the README):

* ``spec.host`` is the server host; it is also the default SNI and the name the
  server certificate must carry.
* ``spec.trafficPolicy.tls`` applies to every port;
  ``spec.trafficPolicy.portLevelSettings[].tls`` replaces it for that port
  (Istio semantics: replaced, not merged).  One dbmtls database per port.
* The protocol comes from the ``dbmtls.io/protocol`` annotation, else from the
  well-known port, else from a protocol name that is a dash-separated word of the
  host (``foo-redis-master`` -> redis), else it is an error saying what to add.
* The listener is ``127.0.0.1:<port>`` unless ``dbmtls.io/listen`` says otherwise.
* What dbmtls cannot honour is an error, never a silent no-op: ``ISTIO_MUTUAL``
  (needs the mesh's own CA), ``credentialName`` (Kubernetes secret lookup: mount
  the secret and use file paths), ``subsets`` with their own TLS.
"""

from __future__ import annotations

from typing import Any

from dbmtls.errors import ConfigError
from dbmtls.protocols.registry import REGISTRY

API_VERSIONS = ("networking.istio.io/v1alpha3", "networking.istio.io/v1beta1", "networking.istio.io/v1")
ANNOTATION_PROTOCOL = "dbmtls.io/protocol"
ANNOTATION_LISTEN = "dbmtls.io/listen"
ANNOTATION_ADDRESS = "dbmtls.io/address"

_TLS_FIELDS = {
    "mode",
    "clientCertificate",
    "privateKey",
    "caCertificates",
    "sni",
    "subjectAltNames",
    "insecureSkipVerify",
    "minProtocolVersion",
    "maxProtocolVersion",
    "caCrl",
    "credentialName",
}
# DestinationRule.spec fields; workloadSelector and exportTo choose *which* proxies use the
# rule, which for a dbmtls process is "this one", so they are accepted and ignored.
_SPEC_FIELDS = {"host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"}
# Fields of a DestinationRule that concern load balancing or routing, not TLS:
# dbmtls does not implement them, and ignoring them changes nothing about security.
_IGNORED_POLICY = {"loadBalancer", "connectionPool", "outlierDetection", "tunnel", "proxyProtocol"}


def is_destination_rule(doc: dict[str, Any]) -> bool:
    return doc.get("kind") == "DestinationRule"


def _err(source: str, path: str, message: str) -> ConfigError:
    return ConfigError(message, source=source, path=path)


def _map_tls(tls: Any, source: str, path: str) -> dict[str, Any]:
    if not isinstance(tls, dict):
        raise _err(source, path, "must be a mapping")
    unknown = set(tls) - _TLS_FIELDS
    if unknown:
        raise _err(source, f"{path}.{sorted(unknown)[0]}", "unknown field in ClientTLSSettings")
    if "mode" not in tls and set(tls) - {"mode"}:
        # Istio's default mode is DISABLE: TLS settings without a mode would silently mean
        # plaintext, which is never what someone who wrote a CA path meant.
        raise _err(source, f"{path}.mode", "TLS settings without a mode: set mode: SIMPLE or MUTUAL (or DISABLE)")
    mode = tls.get("mode", "DISABLE")
    if mode == "ISTIO_MUTUAL":
        raise _err(
            source,
            f"{path}.mode",
            "ISTIO_MUTUAL uses the mesh's own certificates, which dbmtls does not have; "
            "use MUTUAL with clientCertificate, privateKey and caCertificates file paths",
        )
    if "credentialName" in tls:
        raise _err(
            source,
            f"{path}.credentialName",
            "dbmtls reads certificates from files: mount the secret as a volume and set "
            "clientCertificate/privateKey/caCertificates to its tls.crt/tls.key/ca.crt",
        )
    if tls.get("caCrl"):
        raise _err(source, f"{path}.caCrl", "certificate revocation lists are not supported yet")
    out = {k: v for k, v in tls.items() if k not in ("caCrl", "credentialName")}
    out["mode"] = mode
    return out


def _protocol_for(port: int | None, host: str, annotations: dict[str, Any], source: str) -> str:
    explicit = annotations.get(ANNOTATION_PROTOCOL)
    if explicit is not None:
        spec = REGISTRY.find(str(explicit))
        if spec is None:
            raise _err(
                source,
                f"metadata.annotations.{ANNOTATION_PROTOCOL}",
                f"unknown protocol {explicit!r}; one of {', '.join(REGISTRY.names)}",
            )
        return spec.name
    spec = (REGISTRY.by_port(port) if port is not None else None) or REGISTRY.named_in_host(host)
    if spec is not None:
        return spec.name
    raise _err(
        source,
        "metadata.annotations",
        f"cannot tell the protocol of {host}"
        + (f" port {port}" if port else "")
        + f": add the annotation {ANNOTATION_PROTOCOL}: <{'|'.join(REGISTRY.names)}>",
    )


def _checked_rule(doc: dict[str, Any], source: str) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """The rule's name, host, annotations and traffic policy, once nothing in it is unsupported."""
    api = doc.get("apiVersion")
    if api not in API_VERSIONS:
        raise _err(source, "apiVersion", f"unsupported DestinationRule apiVersion {api!r}; one of {API_VERSIONS}")
    meta = doc.get("metadata") or {}
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise _err(source, "spec", "a DestinationRule needs a spec")
    unknown_spec = set(spec) - _SPEC_FIELDS
    if unknown_spec:
        raise _err(source, f"spec.{sorted(unknown_spec)[0]}", "unknown field in DestinationRule spec (check spelling)")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _err(source, "metadata.name", "a DestinationRule needs a metadata.name")
    host = spec.get("host")
    if not isinstance(host, str) or not host or "*" in host:
        raise _err(source, "spec.host", "needs a concrete host name (wildcards cannot be dialled)")
    annotations = meta.get("annotations") or {}
    if spec.get("subsets"):
        for i, subset in enumerate(spec["subsets"]):
            if isinstance(subset, dict) and (subset.get("trafficPolicy") or {}).get("tls"):
                raise _err(source, f"spec.subsets[{i}].trafficPolicy.tls", "per-subset TLS is not supported")
    policy = spec.get("trafficPolicy") or {}
    if not isinstance(policy, dict):
        raise _err(source, "spec.trafficPolicy", "must be a mapping")
    unknown = set(policy) - _IGNORED_POLICY - {"tls", "portLevelSettings"}
    if unknown:
        raise _err(source, f"spec.trafficPolicy.{sorted(unknown)[0]}", "unknown field in TrafficPolicy")
    return name, host, annotations, policy


def _tls_targets(policy: dict[str, Any], source: str) -> list[tuple[int | None, Any, str]]:
    """(port, TLS settings, their YAML path) per database; port None: the protocol's default."""
    default_tls = policy.get("tls")
    per_port: list[tuple[int, Any, str]] = []
    for i, pls in enumerate(policy.get("portLevelSettings") or []):
        number = ((pls or {}).get("port") or {}).get("number")
        if not isinstance(number, int) or not 0 < number < 65536:
            raise _err(source, f"spec.trafficPolicy.portLevelSettings[{i}].port.number", "needs a port number")
        if "tls" in pls:
            per_port.append((number, pls["tls"], f"spec.trafficPolicy.portLevelSettings[{i}].tls"))
        elif default_tls is not None:
            per_port.append((number, default_tls, "spec.trafficPolicy.tls"))

    targets: list[tuple[int | None, Any, str]] = list(per_port)
    if not per_port:
        if default_tls is None:
            raise _err(source, "spec.trafficPolicy.tls", "no TLS settings: nothing for dbmtls to do")
        targets = [(None, default_tls, "spec.trafficPolicy.tls")]
    return targets


def map_destination_rule(doc: dict[str, Any], source: str) -> list[tuple[dict[str, Any], str]]:
    """Return raw database dicts (to be validated by the model), each with its YAML path prefix."""
    name, host, annotations, policy = _checked_rule(doc, source)
    targets = _tls_targets(policy, source)

    out: list[tuple[dict[str, Any], str]] = []
    for port, tls, tls_path in targets:
        protocol = _protocol_for(port, host, annotations, source)
        if port is None:
            port = REGISTRY.get(protocol).default_port
            if port is None:
                raise _err(
                    source, "spec.trafficPolicy", f"protocol {protocol} has no default port: use portLevelSettings"
                )
        db: dict[str, Any] = {
            "name": name if len(targets) == 1 else f"{name}-{port}",
            "protocol": protocol,
            "listen": annotations.get(ANNOTATION_LISTEN, f"127.0.0.1:{port}")
            if len(targets) == 1
            else f"127.0.0.1:{port}",
            "address": f"{host}:{port}",
            "tls": _map_tls(tls, source, tls_path),
        }
        if ANNOTATION_ADDRESS in annotations and len(targets) == 1:
            db["dial"] = annotations[ANNOTATION_ADDRESS]
        out.append((db, tls_path))
    return out
