"""cert-manager manifests for a database server and its clients: ``dbmtls certs k8s``.

The seed of this project was a hand-written ``Certificate`` whose ``dnsNames`` had to list
every name the probes and the clients use, and got them wrong (the probes failed; an IP
address sat in ``dnsNames``, where no verifier matches it).  This module writes that list
from the names Kubernetes actually gives a Service:

* ``NAME``, ``NAME.NS``, ``NAME.NS.svc``, ``NAME.NS.svc.<cluster-domain>``: what a client in
  the same or another namespace types, and what the search path expands it to;
* for a headless Service the same four plus ``*.`` wildcards of the last three, which the
  per-pod names (``foo-0.H.NS.svc.cluster.local``: replication, cluster bus) match.  No
  ``*.H``: OpenSSL rejects a wildcard with a single label after it;
* ``localhost`` and the loopback IPs, because the database's own probes (Bitnami's
  ``redis-cli -h localhost --tls ...``) connect there.  IPs go to ``ipAddresses`` only: an IP
  in ``dnsNames`` is a DNS SAN no verifier compares with an address.

Everything is pure (options in, dicts out) so that the tests check the manifests without a
cluster; ``render`` adds the comments and the YAML.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

__all__ = [
    "CA_NAME",
    "SELFSIGNED_NAME",
    "CertManagerError",
    "K8sCerts",
    "client_object_name",
    "command_line",
    "manifests",
    "render",
    "server_dns_names",
]

API_VERSION = "cert-manager.io/v1"
# One self-signed ClusterIssuer can sign the CA of every namespace: it holds no secret.
SELFSIGNED_NAME = "dbmtls-selfsigned"
CA_NAME = "dbmtls-ca"
# 90 days, renewed 15 days before expiry (the seed's values): a renewal that fails is noticed
# (cert-manager's own alert, dbmtls's expiry metric) with two weeks left to fix it.
LEAF_DURATION = "2160h"
LEAF_RENEW_BEFORE = "360h"
# The CA: 10 years, renewed a year ahead, and with the SAME key (rotationPolicy Never below): a
# renewed CA certificate with the old subject and key still verifies every leaf issued before,
# and the old one verifies leaves issued after, so servers and clients whose ca.crt has not been
# refreshed yet keep trusting each other.  A new key would split them until every leaf renews.
CA_DURATION = "87600h"
CA_RENEW_BEFORE = "8760h"

# Kubernetes object names (Secret, Certificate): DNS-1123 subdomain.  Namespaces: DNS-1123
# label.  Service names: DNS-1035 label (a letter first), because they become DNS names.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# X.509's upper bound for a CommonName (RFC 5280 ub-common-name); cert-manager enforces it too.
MAX_COMMON_NAME = 64

KeyType = Literal["ecdsa", "rsa"]


class CertManagerError(ValueError):
    """Bad input for ``dbmtls certs k8s``; the message names the option and what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class K8sCerts:
    """What ``dbmtls certs k8s`` was asked for (the CLI options, one to one)."""

    namespace: str
    server: str | None = None
    headless: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    # "CN" (the Certificate and its Secret are named after it) or "CN=NAME" for a CN that
    # cannot name a Kubernetes object (database users such as "app_user").
    clients: tuple[str, ...] = ()
    # None: print the self-signed chain and sign with it.  "NAME": an existing Issuer in the
    # namespace; "clusterissuer/NAME": an existing ClusterIssuer.
    ca_issuer: str | None = None
    cluster_domain: str = "cluster.local"
    key_type: KeyType = "ecdsa"


# --- names ----------------------------------------------------------------------------------


def _check(pattern: re.Pattern[str], value: str, what: str, kind: str, max_len: int) -> None:
    if not value:
        raise CertManagerError(f"{what}: must not be empty")
    if len(value) > max_len:
        raise CertManagerError(f"{what} {value!r}: longer than {max_len} characters (a {kind})")
    if pattern.fullmatch(value) is None:
        rule = {
            "DNS-1123 label": "lower-case letters, digits and '-', starting and ending with a letter or digit",
            "DNS-1035 label": "lower-case letters, digits and '-', starting with a letter, not ending with '-'",
            "DNS-1123 subdomain": "lower-case letters, digits, '-' and '.', each part starting and ending "
            "with a letter or digit",
        }[kind]
        raise CertManagerError(f"{what} {value!r}: not a valid {kind} ({rule})")


def _service_name(value: str, what: str) -> None:
    _check(_DNS1035_LABEL, value, what, "DNS-1035 label", 63)


def _object_name(value: str, what: str) -> None:
    _check(_DNS1123_SUBDOMAIN, value, what, "DNS-1123 subdomain", 253)


def server_dns_names(server: str, headless: Sequence[str], namespace: str, cluster_domain: str) -> list[str]:
    """Every DNS name a client or probe may use for ``server`` (see the module docstring)."""

    def forms(name: str) -> list[str]:
        return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.{cluster_domain}"]

    names = forms(server)
    for h in headless:
        full = forms(h)
        names += full
        names += [f"*.{n}" for n in full[1:]]
    names.append("localhost")
    return list(dict.fromkeys(names))


def client_object_name(client: str) -> tuple[str, str]:
    """``(common name, object name)`` of a ``--client`` value: ``CN`` or ``CN=NAME``."""
    cn, sep, name = client.partition("=")
    cn = cn.strip()
    if not cn:
        raise CertManagerError(f"--client {client!r}: the common name must not be empty")
    if len(cn) > MAX_COMMON_NAME:
        raise CertManagerError(f"--client {cn!r}: a common name has at most {MAX_COMMON_NAME} characters")
    if any(not ch.isprintable() for ch in cn):
        raise CertManagerError(f"--client {cn!r}: the common name has a non-printable character")
    name = name.strip() if sep else cn
    if _DNS1123_SUBDOMAIN.fullmatch(name) is None or len(name) + len("-tls") > 253:
        hint = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.") or "client"
        raise CertManagerError(
            f"--client {client!r}: {name!r} cannot name a Certificate and its Secret (a DNS-1123 subdomain: "
            f"lower-case letters, digits, '-' and '.'); give the object name after '=', "
            f"e.g. --client {cn}={hint}"
        )
    return cn, name


def _issuer_ref(ca_issuer: str | None) -> dict[str, str]:
    if ca_issuer is None:
        return {"name": CA_NAME, "kind": "Issuer", "group": "cert-manager.io"}
    kind, sep, name = ca_issuer.partition("/")
    if not sep:
        kind, name = "issuer", ca_issuer
    kinds = {"issuer": "Issuer", "clusterissuer": "ClusterIssuer"}
    if kind.lower() not in kinds:
        raise CertManagerError(f"--ca-issuer {ca_issuer!r}: give NAME (an Issuer) or clusterissuer/NAME")
    _object_name(name, "--ca-issuer")
    return {"name": name, "kind": kinds[kind.lower()], "group": "cert-manager.io"}


def _ips(values: Sequence[str]) -> list[str]:
    out = ["127.0.0.1", "::1"]
    for v in values:
        try:
            out.append(str(ipaddress.ip_address(v.strip())))
        except ValueError:
            raise CertManagerError(f"--ip {v!r}: not an IPv4 or IPv6 address") from None
    return list(dict.fromkeys(out))


def _validate(opts: K8sCerts) -> None:
    _check(_DNS1123_LABEL, opts.namespace, "--namespace", "DNS-1123 label", 63)
    _object_name(opts.cluster_domain, "--cluster-domain")
    if opts.server is not None:
        try:
            ipaddress.ip_address(opts.server)
        except ValueError:
            pass
        else:
            raise CertManagerError(f"--server {opts.server!r}: an IP address goes in --ip, not --server")
        _service_name(opts.server, "--server")
    for h in opts.headless:
        _service_name(h, "--headless")
    if opts.server is None and (opts.headless or opts.ips):
        raise CertManagerError("--headless and --ip add names to the server certificate: give --server NAME too")
    if opts.ca_issuer is not None and opts.server is None and not opts.clients:
        raise CertManagerError("nothing to print: with --ca-issuer, give --server NAME and/or --client CN")


# --- manifests ------------------------------------------------------------------------------


def _private_key(key_type: KeyType) -> dict[str, Any]:
    # rotationPolicy Always: a renewal is also a new key, so a leaked key dies with its
    # certificate.  RSA keys are PKCS#1 ("BEGIN RSA PRIVATE KEY"), which every old client
    # library reads; ECDSA keys are PKCS#8, as `dbmtls certs issue` writes them.
    if key_type == "rsa":
        return {"algorithm": "RSA", "size": 2048, "encoding": "PKCS1", "rotationPolicy": "Always"}
    return {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always"}


def _usages(key_type: KeyType, *extended: str) -> list[str]:
    # key encipherment only where it means something: TLS 1.2 RSA key transport, RSA keys only.
    base = ["digital signature", "key encipherment"] if key_type == "rsa" else ["digital signature"]
    return [*base, *extended]


def _meta(name: str, namespace: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = {"app.kubernetes.io/managed-by": "dbmtls"}
    return meta


def _ca_chain(namespace: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "ClusterIssuer",
            "metadata": _meta(SELFSIGNED_NAME, None),
            "spec": {"selfSigned": {}},
        },
        {
            "apiVersion": API_VERSION,
            "kind": "Certificate",
            "metadata": _meta(CA_NAME, namespace),
            "spec": {
                "isCA": True,
                "commonName": f"dbmtls CA {namespace}",
                "secretName": CA_NAME,
                "duration": CA_DURATION,
                "renewBefore": CA_RENEW_BEFORE,
                "privateKey": {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Never"},
                "issuerRef": {"name": SELFSIGNED_NAME, "kind": "ClusterIssuer", "group": "cert-manager.io"},
            },
        },
        {
            "apiVersion": API_VERSION,
            "kind": "Issuer",
            "metadata": _meta(CA_NAME, namespace),
            "spec": {"ca": {"secretName": CA_NAME}},
        },
    ]


def _leaf(name: str, opts: K8sCerts, issuer: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"secretName": f"{name}-tls", **body}
    spec.update(
        {
            "duration": LEAF_DURATION,
            "renewBefore": LEAF_RENEW_BEFORE,
            "privateKey": _private_key(opts.key_type),
            "issuerRef": dict(issuer),
        }
    )
    return {"apiVersion": API_VERSION, "kind": "Certificate", "metadata": _meta(name, opts.namespace), "spec": spec}


def manifests(opts: K8sCerts) -> list[dict[str, Any]]:
    """The cert-manager objects for ``opts``: CA chain (unless ``ca_issuer``), server, clients."""
    _validate(opts)
    issuer = _issuer_ref(opts.ca_issuer)
    docs = _ca_chain(opts.namespace) if opts.ca_issuer is None else []
    if opts.server is not None:
        docs.append(
            _leaf(
                opts.server,
                opts,
                issuer,
                {
                    "commonName": opts.server,
                    "dnsNames": server_dns_names(opts.server, opts.headless, opts.namespace, opts.cluster_domain),
                    "ipAddresses": _ips(opts.ips),
                    # client auth too: database servers use their certificate as a client toward
                    # each other (Redis replication and cluster bus, MongoDB replica sets,
                    # CockroachDB nodes) and in their own probes (redis-cli --cert on localhost).
                    "usages": _usages(opts.key_type, "server auth", "client auth"),
                },
            )
        )
    for client in opts.clients:
        cn, name = client_object_name(client)
        body: dict[str, Any] = {"commonName": cn}
        # A DNS SAN with the CN as well, like `dbmtls certs issue`: CockroachDB can take the
        # user from it; a CN that is not a DNS name (app_user) gets none.
        if _DNS1123_SUBDOMAIN.fullmatch(cn) is not None:
            body["dnsNames"] = [cn]
        body["usages"] = _usages(opts.key_type, "client auth")
        docs.append(_leaf(name, opts, issuer, body))
    _unique(docs)
    return docs


def _unique(docs: Sequence[dict[str, Any]]) -> None:
    """Two Certificates with one name, or writing one Secret, would overwrite each other."""
    names: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for d in docs:
        if d["kind"] != "Certificate":
            continue
        name, secret = d["metadata"]["name"], d["spec"]["secretName"]
        what = "the CA" if d["spec"].get("isCA") else f"Certificate {name}"
        if name in names:
            raise CertManagerError(f"two Certificates would be named {name!r} ({names[name]} and {what})")
        if secret in secrets:
            raise CertManagerError(f"{secrets[secret]} and {what} would both write Secret {secret!r}")
        names[name] = what
        secrets[secret] = what


def command_line(opts: K8sCerts) -> str:
    """The ``dbmtls certs k8s`` command that prints these manifests (options in a fixed order)."""
    args = ["dbmtls", "certs", "k8s", "--namespace", opts.namespace]
    if opts.server is not None:
        args += ["--server", opts.server]
    for h in opts.headless:
        args += ["--headless", h]
    for ip in opts.ips:
        args += ["--ip", ip]
    for c in opts.clients:
        args += ["--client", c]
    if opts.ca_issuer is not None:
        args += ["--ca-issuer", opts.ca_issuer]
    if opts.cluster_domain != "cluster.local":
        args += ["--cluster-domain", opts.cluster_domain]
    if opts.key_type == "rsa":
        args.append("--rsa")
    return shlex.join(args)


def _comment(doc: dict[str, Any]) -> list[str]:
    kind, name = doc["kind"], doc["metadata"]["name"]
    spec = doc["spec"]
    if kind == "ClusterIssuer":
        return ["Self-signed ClusterIssuer: signs only the CA below (it holds no key of its own)."]
    if kind == "Issuer":
        return [f"The CA Issuer: signs the certificates below with the key in Secret {CA_NAME}."]
    if spec.get("isCA"):
        return [
            "The CA. Renewal keeps its key (rotationPolicy: Never), so ca.crt files from before",
            "and after a renewal verify the same certificates.",
        ]
    secret = spec["secretName"]
    if "server auth" in spec["usages"]:
        return [
            f"Server certificate for {name}: point the database at Secret {secret}",
            f"(tls.crt, tls.key, ca.crt), e.g. the Bitnami chart's tls.existingSecret: {secret}.",
            "dnsNames are every name clients and probes use; IPs are in ipAddresses",
            "(an IP in dnsNames matches nothing).",
        ]
    return [
        f"Client certificate CN={spec['commonName']}: Secret {secret}. For the dbmtls sidecar use",
        f"credentialName: {secret} in the DestinationRule (mode: MUTUAL).",
    ]


def render(opts: K8sCerts) -> str:
    """``manifests(opts)`` as multi-document YAML, each document with a comment saying what it is for."""
    docs = manifests(opts)
    # The command, not the version: the same command prints the same manifests in every version
    # that has not changed them, so a checked-in copy is compared with a fresh one byte for byte.
    out = [f"# Generated by: {command_line(opts)}\n"]
    for doc in docs:
        comment = "".join(f"# {line}\n" for line in _comment(doc))
        out.append("---\n" + comment + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
    return "".join(out)
