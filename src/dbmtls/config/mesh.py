"""Kubernetes Services and Istio ServiceEntries: which ports a host has, and what they carry.

Istio learns the protocol and the ports of a destination from the service registry, not from
the DestinationRule; dbmtls reads the same documents when they are among its inputs:

* a ServiceEntry's ``hosts`` and ``ports[]`` (``number``, ``protocol``, ``name``,
  ``targetPort``), its ``endpoints`` (where to connect) and ``subjectAltNames``;
* a Service's ``metadata.name``/``namespace`` and ``ports[]``: ``appProtocol`` first, else the
  port name by Istio's convention ``<protocol>[-<suffix>]`` (docs: "Protocol Selection").

A DestinationRule host is matched to them the way the cluster resolves names (``names``
below): ``foo`` in the rule's namespace, ``foo.ns``, ``foo.ns.svc``, ``foo.ns.svc.<domain>``;
anything else is an external name, matched as written (or by a ServiceEntry wildcard host).
A document without a namespace is in "the namespace it will be applied to": it matches
documents of any namespace, and when that is ambiguous the rule must name the namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dbmtls.config.explain import Note
from dbmtls.errors import ConfigError
from dbmtls.protocols.registry import REGISTRY

ISTIO_API_VERSIONS = ("networking.istio.io/v1alpha3", "networking.istio.io/v1beta1", "networking.istio.io/v1")

_TLD_HINTS = frozenset({"com", "net", "org", "io", "dev", "cloud", "internal", "local", "example", "test"})


# --- names ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostKey:
    """A host as the cluster resolves it: a service (name, namespace) or an external name."""

    name: str
    namespace: str | None  # None: a service of "the namespace the document is applied to"
    service: bool  # False: an external name, compared as written

    def matches(self, other: HostKey) -> bool:
        if self.service != other.service or self.name != other.name:
            return False
        if not self.service:
            return True
        return self.namespace is None or other.namespace is None or self.namespace == other.namespace


def host_key(host: str, namespace: str | None) -> HostKey:
    """``host`` written in a document of ``namespace``: short, ``foo.ns``, ``foo.ns.svc[.domain]``, or external."""
    host = host.lower().rstrip(".")
    parts = host.split(".")
    if len(parts) == 1:
        return HostKey(host, namespace, True)
    if len(parts) >= 3 and parts[2] == "svc":
        return HostKey(parts[0], parts[1], True)
    if len(parts) == 2 and parts[1] not in _TLD_HINTS:
        # "foo.ns": how apps name a service of another namespace; a real domain has a TLD
        return HostKey(parts[0], parts[1], True)
    return HostKey(host, None, False)


# --- what a port says about its protocol ---------------------------------------------------------


class Says(Enum):
    """What a protocol word (Istio protocol, appProtocol, port name prefix) tells dbmtls."""

    PROTOCOL = "protocol"  # a database dbmtls knows (or tcp for an HTTP-family port)
    NOTHING = "nothing"  # TCP, or a word nobody knows: Istio treats the bytes as opaque
    APP_TLS = "app-tls"  # TLS/HTTPS: the app already speaks TLS on this port
    UDP = "udp"  # or SCTP: not TCP, TLS does not apply


# Istio's protocol names that carry HTTP: dbmtls does TLS origination for them as for any
# opaque stream (what Istio's sidecar does with a DestinationRule's TLS on such a port).
_HTTP_FAMILY = frozenset({"http", "http2", "grpc", "grpc-web", "http_proxy", "kubernetes.io/h2c", "kubernetes.io/ws"})
_APP_TLS = frozenset({"https", "tls", "kubernetes.io/wss"})


def protocol_word(word: str) -> tuple[Says, str | None]:
    """(what ``word`` says, the dbmtls protocol it names)."""
    w = word.strip().lower()
    if w in ("tcp", ""):
        return Says.NOTHING, None
    if w in ("udp", "sctp"):
        return Says.UDP, None
    if w in _APP_TLS:
        return Says.APP_TLS, None
    if w in _HTTP_FAMILY:
        return Says.PROTOCOL, "tcp"
    spec = REGISTRY.find(w)
    if spec is not None:
        return Says.PROTOCOL, spec.name
    return Says.NOTHING, None


def port_name_protocol(name: str) -> tuple[Says, str | None, str]:
    """A port name by Istio's convention ``<protocol>[-<suffix>]``: (says, protocol, the word used).

    Istio reads only the prefix.  When the prefix says nothing more than "TCP" (``tcp-postgres``,
    the usual spelling for a database Istio does not know), dbmtls also reads the other words.
    """
    lowered = name.lower()
    if lowered.startswith("grpc-web"):
        return Says.PROTOCOL, "tcp", "grpc-web"
    words = lowered.split("-")
    says, proto = protocol_word(words[0])
    if says is not Says.NOTHING:
        return says, proto, words[0]
    for word in words[1:]:
        spec = REGISTRY.find(word)
        if spec is not None and spec.name != "tcp":
            return Says.PROTOCOL, spec.name, word
    return Says.NOTHING, None, words[0]


# --- the documents --------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshPort:
    number: int
    path: str  # YAML path of this port in its document, e.g. spec.ports[1]
    name: str | None
    protocol: str | None  # ServiceEntry ``protocol`` (Istio's names)
    app_protocol: str | None  # Service ``appProtocol``
    target_port: int | str | None


@dataclass(frozen=True)
class Endpoint:
    address: str
    path: str
    ports: dict[str, int]


@dataclass(frozen=True)
class MeshService:
    kind: str  # "ServiceEntry" or "Service"
    name: str
    namespace: str | None
    source: str
    hosts: tuple[HostKey, ...]
    wildcards: tuple[str, ...]  # ServiceEntry hosts like "*.example.com": the suffix ".example.com"
    ports: tuple[MeshPort, ...]
    endpoints: tuple[Endpoint, ...] = ()
    resolution: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    headless: bool = False
    ignored: tuple[Note, ...] = ()

    @property
    def title(self) -> str:
        return f"{self.kind} {self.namespace + '/' if self.namespace else ''}{self.name}"

    def serves(self, key: HostKey) -> bool:
        if any(h.matches(key) for h in self.hosts):
            return True
        return not key.service and any(key.name.endswith(w) for w in self.wildcards)


@dataclass
class MeshIndex:
    """Every Service and ServiceEntry of the inputs, and which of them a rule used."""

    services: list[MeshService] = field(default_factory=list)
    used: set[int] = field(default_factory=set)

    def add(self, doc: dict[str, Any], source: str) -> None:
        kind = doc.get("kind")
        self.services.append(_service_entry(doc, source) if kind == "ServiceEntry" else _service(doc, source))

    def lookup(self, host: str, namespace: str | None, source: str) -> MeshService | None:
        """The Service or ServiceEntry that ``host`` (of a rule in ``namespace``) names, if any.

        A ServiceEntry wins over a Service of the same name: it is what the mesh routes by.
        Two candidates of the same kind that only match because a namespace is missing are an
        error: choosing one silently could dial the wrong server.
        """
        key = host_key(host, namespace)
        found = [(i, s) for i, s in enumerate(self.services) if s.serves(key)]
        if not found:
            return None
        for kind in ("ServiceEntry", "Service"):
            same = [(i, s) for i, s in found if s.kind == kind]
            if not same:
                continue
            exact = [(i, s) for i, s in same if any(h.namespace == key.namespace for h in s.hosts)] or same
            if len(exact) > 1:
                raise ConfigError(
                    f"host {host} matches {' and '.join(s.title + ' (' + s.source + ')' for _, s in exact)}: "
                    "write the host with its namespace (name.namespace.svc.cluster.local), or give the "
                    "documents a metadata.namespace",
                    source=source,
                    path="spec.host",
                )
            index, service = exact[0]
            self.used.add(index)
            return service
        return None

    def unused_notes(self) -> list[Note]:
        return [
            Note(f"{s.title}: no DestinationRule names its host: not used", s.source)
            for i, s in enumerate(self.services)
            if i not in self.used
        ]


def _err(source: str, path: str, message: str) -> ConfigError:
    return ConfigError(message, source=source, path=path)


def _mapping(value: Any, source: str, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(source, path, "must be a mapping")
    return value


def _known_fields(value: dict[str, Any], known: set[str], source: str, path: str, what: str) -> None:
    """Istio rejects unknown fields; so do we, naming the first one (sorted, so stable)."""
    unknown = sorted(set(value) - known)
    if unknown:
        raise _err(source, f"{path}.{unknown[0]}", f"unknown field in {what} (check the spelling)")


def _list(value: Any, source: str, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _err(source, path, "must be a list")
    return value


def _port_number(value: Any, source: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _err(source, path, f"must be a port number 1-65535, got {value!r}")
    return value


def _meta(doc: dict[str, Any], source: str) -> tuple[str, str | None]:
    meta = _mapping(doc.get("metadata"), source, "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _err(source, "metadata.name", f"a {doc.get('kind')} needs a metadata.name")
    ns = meta.get("namespace")
    return name, str(ns) if ns else None


# ServiceEntry.spec: the fields of the current API (networking.istio.io v1alpha3, v1beta1, v1)
_SE_SPEC = {"hosts", "addresses", "ports", "location", "resolution", "endpoints", "workloadSelector", "exportTo"}
_SE_SPEC |= {"subjectAltNames"}
_SE_PORT = {"number", "protocol", "name", "targetPort"}
_SE_ENDPOINT = {"address", "ports", "labels", "network", "locality", "weight", "serviceAccount"}
_SE_IGNORED = {
    "addresses": "virtual IPs the app may use; the app connects to dbmtls's listener instead",
    "location": "MESH_EXTERNAL/MESH_INTERNAL changes only the mesh's own mTLS and telemetry",
    "workloadSelector": "endpoints from WorkloadEntries are not among the inputs; the host is dialled",
    "exportTo": "visibility across namespaces; a dbmtls process uses every input it is given",
}


def _service_entry(doc: dict[str, Any], source: str) -> MeshService:
    if doc.get("apiVersion") not in ISTIO_API_VERSIONS:
        raise _err(source, "apiVersion", f"unsupported ServiceEntry apiVersion {doc.get('apiVersion')!r}")
    name, ns = _meta(doc, source)
    spec = _mapping(doc.get("spec"), source, "spec")
    _known_fields(spec, _SE_SPEC, source, "spec", "ServiceEntry spec")
    hosts: list[HostKey] = []
    wildcards: list[str] = []
    for i, h in enumerate(_list(spec.get("hosts"), source, "spec.hosts")):
        if not isinstance(h, str) or not h:
            raise _err(source, f"spec.hosts[{i}]", "must be a host name")
        if h.startswith("*"):
            wildcards.append(h[1:].lower())
        else:
            hosts.append(host_key(h, ns))
    ports: list[MeshPort] = []
    for i, p in enumerate(_list(spec.get("ports"), source, "spec.ports")):
        path = f"spec.ports[{i}]"
        p = _mapping(p, source, path)
        _known_fields(p, _SE_PORT, source, path, "ServiceEntry port")
        number = _port_number(p.get("number"), source, f"{path}.number")
        target = p.get("targetPort")
        if target is not None:
            target = _port_number(target, source, f"{path}.targetPort")
        protocol = p.get("protocol")
        ports.append(MeshPort(number, path, _opt_str(p.get("name")), _opt_str(protocol), None, target))
    endpoints: list[Endpoint] = []
    for i, e in enumerate(_list(spec.get("endpoints"), source, "spec.endpoints")):
        path = f"spec.endpoints[{i}]"
        e = _mapping(e, source, path)
        _known_fields(e, _SE_ENDPOINT, source, path, "WorkloadEntry")
        eports = _mapping(e.get("ports"), source, f"{path}.ports")
        checked = {str(k): _port_number(v, source, f"{path}.ports.{k}") for k, v in eports.items()}
        if isinstance(e.get("address"), str) and e["address"]:
            endpoints.append(Endpoint(e["address"], path, checked))
    sans = tuple(str(s) for s in _list(spec.get("subjectAltNames"), source, "spec.subjectAltNames"))
    ignored = tuple(Note(why, source, f"spec.{k}") for k, why in _SE_IGNORED.items() if k in spec)
    resolution = _opt_str(spec.get("resolution"))
    return MeshService(
        "ServiceEntry",
        name,
        ns,
        source,
        tuple(hosts),
        tuple(wildcards),
        tuple(ports),
        tuple(endpoints),
        resolution,
        sans,
        ignored=ignored,
    )


def _service(doc: dict[str, Any], source: str) -> MeshService:
    if doc.get("apiVersion") != "v1":
        raise _err(source, "apiVersion", f"unsupported Service apiVersion {doc.get('apiVersion')!r}; expected v1")
    name, ns = _meta(doc, source)
    spec = _mapping(doc.get("spec"), source, "spec")
    ports: list[MeshPort] = []
    for i, p in enumerate(_list(spec.get("ports"), source, "spec.ports")):
        path = f"spec.ports[{i}]"
        p = _mapping(p, source, path)
        number = _port_number(p.get("port"), source, f"{path}.port")
        target = p.get("targetPort")
        if target is not None and not isinstance(target, str):
            target = _port_number(target, source, f"{path}.targetPort")
        transport = str(p.get("protocol") or "TCP")
        ports.append(MeshPort(number, path, _opt_str(p.get("name")), transport, _opt_str(p.get("appProtocol")), target))
    headless = spec.get("clusterIP") == "None"
    return MeshService(
        "Service", name, ns, source, (HostKey(name.lower(), ns, True),), (), tuple(ports), headless=headless
    )


def _opt_str(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


# --- one port's protocol, as Istio would read it ---------------------------------------------------


@dataclass(frozen=True)
class PortProtocol:
    """What a Service/ServiceEntry port says: ``protocol`` None when it says nothing dbmtls can use."""

    protocol: str | None
    how: str
    path: str  # YAML path in the document
    says: Says


def declared_protocol(service: MeshService, port: MeshPort) -> PortProtocol:
    """The protocol ``port`` declares, with Istio's precedence for its kind of document.

    ServiceEntry: ``protocol`` (Istio's names); the name is only a label to Istio, but dbmtls also
    reads its words when ``protocol`` says no more than TCP.  Service: ``appProtocol``, else the
    name.  UDP/SCTP Service ports are not TCP at all.
    """
    if service.kind == "Service":
        if port.protocol and port.protocol.upper() in ("UDP", "SCTP"):
            return PortProtocol(None, f"Service port protocol {port.protocol}", f"{port.path}.protocol", Says.UDP)
        if port.app_protocol:
            says, proto = protocol_word(port.app_protocol)
            if says is not Says.NOTHING:
                return PortProtocol(proto, f"appProtocol {port.app_protocol}", f"{port.path}.appProtocol", says)
    elif port.protocol:
        says, proto = protocol_word(port.protocol)
        if says is not Says.NOTHING:
            return PortProtocol(proto, f"protocol {port.protocol}", f"{port.path}.protocol", says)
    if port.name:
        says, proto, word = port_name_protocol(port.name)
        if says is not Says.NOTHING:
            prefix = port.name.lower().split("-")[0]
            how = f"port name {port.name}" + (f" (the word {word!r})" if word != prefix else "")
            return PortProtocol(proto, how, f"{port.path}.name", says)
    return PortProtocol(None, "nothing", port.path, Says.NOTHING)
