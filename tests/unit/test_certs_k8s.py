"""``dbmtls certs k8s``: cert-manager manifests whose names are right by construction.

The manifests are parsed back from the command's output and checked field by field.  There
is no OpenAPI schema for cert-manager's CRDs offline, so well-formedness is checked by hand
(``support.kube.crd_problems``: required fields, enums, durations, the names) instead.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from dbmtls.cli import main
from dbmtls.k8s.certmanager import CertManagerError, K8sCerts, manifests, render, server_dns_names
from dbmtls.pki import create_ca, issue
from support.kube import crd_problems, cross_object_checks

NS = "istio-redis-mtls"


def run(*args: str) -> tuple[int, str, list[dict[str, Any]]]:
    result = CliRunner().invoke(main, ["certs", "k8s", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    docs = [d for d in yaml.safe_load_all(result.output) if d] if result.exit_code == 0 else []
    return result.exit_code, result.output, docs


def by_name(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def test_the_seed_scenario_names() -> None:
    code, out, docs = run("--namespace", NS, "--server", "foo-redis-master", "--headless", "foo-redis-headless")
    assert code == 0, out
    spec = by_name(docs, "Certificate", "foo-redis-master")["spec"]
    assert spec["dnsNames"] == [
        "foo-redis-master",
        f"foo-redis-master.{NS}",
        f"foo-redis-master.{NS}.svc",
        f"foo-redis-master.{NS}.svc.cluster.local",
        "foo-redis-headless",
        f"foo-redis-headless.{NS}",
        f"foo-redis-headless.{NS}.svc",
        f"foo-redis-headless.{NS}.svc.cluster.local",
        f"*.foo-redis-headless.{NS}",
        f"*.foo-redis-headless.{NS}.svc",
        f"*.foo-redis-headless.{NS}.svc.cluster.local",
        "localhost",
    ]
    # The seed's list had 127.0.0.1 among dnsNames, where no verifier matches an address.
    assert spec["ipAddresses"] == ["127.0.0.1", "::1"]
    assert spec["secretName"] == "foo-redis-master-tls"
    assert spec["commonName"] == "foo-redis-master"
    # client auth as well: Redis replicas and Bitnami's probes present the server certificate
    assert spec["usages"] == ["digital signature", "server auth", "client auth"]


@pytest.mark.parametrize(
    "args",
    [
        ("--server", "db"),
        ("--server", "db", "--headless", "db-hl", "--headless", "db-peers", "--ip", "10.0.0.7", "--ip", "fd00::1"),
        ("--server", "db", "--ip", "127.0.0.1", "--cluster-domain", "corp.example"),
        ("--server", "db", "--client", "alice", "--client", "app_user=app-user", "--rsa"),
    ],
    ids=["plain", "headless+ips", "domain", "clients+rsa"],
)
def test_no_ip_address_ever_lands_in_dns_names(args: tuple[str, ...]) -> None:
    code, out, docs = run("-n", "prod", *args)
    assert code == 0, out
    certs = [d for d in docs if d["kind"] == "Certificate"]
    assert certs
    for cert in certs:
        for name in cert["spec"].get("dnsNames", []):
            with pytest.raises(ValueError, match="does not appear to be"):
                ipaddress.ip_address(name)
        for ip in cert["spec"].get("ipAddresses", []):
            ipaddress.ip_address(ip)
    server = by_name(docs, "Certificate", "db")["spec"]
    extra = [args[i + 1] for i, a in enumerate(args) if a == "--ip"]
    assert set(server["ipAddresses"]) == {"127.0.0.1", "::1", *(str(ipaddress.ip_address(ip)) for ip in extra)}
    assert len(server["ipAddresses"]) == len(set(server["ipAddresses"]))


def test_cluster_domain_and_several_headless_services() -> None:
    names = server_dns_names("db", ["db-hl", "db-peers"], "prod", "corp.example")
    assert "db.prod.svc.corp.example" in names
    assert "*.db-peers.prod.svc.corp.example" in names
    assert not any(n.endswith("cluster.local") for n in names)
    # no single-label wildcard (OpenSSL refuses to match "*.db-hl"), no wildcard of the ClusterIP Service
    assert "*.db-hl" not in names and not any(n.startswith("*.db.") for n in names)
    assert len(names) == len(set(names))


def test_the_whole_output_is_well_formed_cert_manager_v1() -> None:
    code, out, docs = run(
        "-n", NS, "--server", "foo-redis-master", "--headless", "foo-redis-headless", "--client", "jinsu"
    )
    assert code == 0, out
    assert [d["kind"] for d in docs] == ["ClusterIssuer", "Certificate", "Issuer", "Certificate", "Certificate"]
    for d in docs:
        assert crd_problems(d) == []
    # every issuerRef lands on an issuer of the output, every CA Secret is written by it
    assert cross_object_checks(docs) == []
    assert "namespace" not in docs[0]["metadata"]  # ClusterIssuer: cluster-scoped
    assert all(d["metadata"]["namespace"] == NS for d in docs[1:])
    ca = by_name(docs, "Certificate", "dbmtls-ca")["spec"]
    assert ca["isCA"] is True and ca["privateKey"]["rotationPolicy"] == "Never"
    assert by_name(docs, "Issuer", "dbmtls-ca")["spec"] == {"ca": {"secretName": ca["secretName"]}}


def test_client_certificates_and_key_defaults() -> None:
    code, out, docs = run("-n", NS, "--client", "jinsu", "--client", "app_user=app-user")
    assert code == 0, out
    jinsu = by_name(docs, "Certificate", "jinsu")["spec"]
    assert jinsu["secretName"] == "jinsu-tls"
    assert jinsu["commonName"] == "jinsu"
    assert jinsu["dnsNames"] == ["jinsu"]
    assert jinsu["usages"] == ["digital signature", "client auth"]
    assert (jinsu["duration"], jinsu["renewBefore"]) == ("2160h", "360h")
    assert jinsu["privateKey"] == {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always"}
    assert jinsu["issuerRef"] == {"name": "dbmtls-ca", "kind": "Issuer", "group": "cert-manager.io"}
    user = by_name(docs, "Certificate", "app-user")["spec"]
    # the database user stays the CN; it is not a DNS name, so no DNS SAN
    assert (user["commonName"], user["secretName"], "dnsNames" in user) == ("app_user", "app-user-tls", False)


def test_rsa_is_pkcs1_2048_with_key_encipherment() -> None:
    code, out, docs = run("-n", NS, "--server", "db", "--client", "jinsu", "--rsa")
    assert code == 0, out
    for name in ("db", "jinsu"):
        spec = by_name(docs, "Certificate", name)["spec"]
        assert spec["privateKey"] == {"algorithm": "RSA", "size": 2048, "encoding": "PKCS1", "rotationPolicy": "Always"}
        assert spec["usages"][:2] == ["digital signature", "key encipherment"]
        assert crd_problems(by_name(docs, "Certificate", name)) == []


@pytest.mark.parametrize(
    ("issuer", "ref"),
    [
        ("corp-ca", {"name": "corp-ca", "kind": "Issuer", "group": "cert-manager.io"}),
        ("clusterissuer/corp-ca", {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}),
        ("ClusterIssuer/corp-ca", {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}),
    ],
)
def test_an_existing_issuer_replaces_the_chain(issuer: str, ref: dict[str, str]) -> None:
    code, out, docs = run("-n", NS, "--client", "jinsu", "--ca-issuer", issuer)
    assert code == 0, out
    assert [d["kind"] for d in docs] == ["Certificate"]
    assert docs[0]["spec"]["issuerRef"] == ref


def test_no_leaf_prints_the_chain_alone() -> None:
    code, out, docs = run("-n", NS)
    assert code == 0, out
    assert [d["kind"] for d in docs] == ["ClusterIssuer", "Certificate", "Issuer"]


def test_the_output_says_what_made_it_and_what_each_document_is_for() -> None:
    code, out, _ = run("-n", NS, "--server", "foo-redis-master", "--client", "jinsu")
    assert code == 0
    assert out.startswith("# Generated by: dbmtls certs k8s --namespace istio-redis-mtls --server foo-redis-master")
    assert "tls.existingSecret: foo-redis-master-tls" in out
    assert "credentialName: jinsu-tls" in out
    assert out.count("\n---\n") == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-n", "Prod"), "--namespace 'Prod': not a valid DNS-1123 label"),
        (("-n", "a" * 64), "longer than 63 characters"),
        (("-n", NS, "--server", "Foo"), "--server 'Foo': not a valid DNS-1035 label"),
        (("-n", NS, "--server", "1db"), "--server '1db': not a valid DNS-1035 label"),
        (("-n", NS, "--server", "127.0.0.1"), "an IP address goes in --ip"),
        (("-n", NS, "--server", "db.prod"), "--server 'db.prod': not a valid DNS-1035 label"),
        (("-n", NS, "--server", "db", "--headless", "db_hl"), "--headless 'db_hl'"),
        (("-n", NS, "--server", "db", "--ip", "10.0.0.300"), "--ip '10.0.0.300': not an IPv4 or IPv6 address"),
        (("-n", NS, "--headless", "db-hl"), "give --server NAME too"),
        (("-n", NS, "--client", "app_user"), "e.g. --client app_user=app-user"),
        (("-n", NS, "--client", "x" * 65), "at most 64 characters"),
        (("-n", NS, "--client", "=x"), "the common name must not be empty"),
        (("-n", NS, "--client", "jinsu", "--client", "jinsu"), "two Certificates would be named 'jinsu'"),
        (("-n", NS, "--server", "db", "--client", "db"), "two Certificates would be named 'db'"),
        (("-n", NS, "--client", "dbmtls-ca"), "two Certificates would be named 'dbmtls-ca'"),
        (("-n", NS, "--client", "a=db", "--client", "b=db"), "two Certificates would be named 'db'"),
        (("-n", NS, "--ca-issuer", "corp-ca"), "nothing to print"),
        (("-n", NS, "--client", "x", "--ca-issuer", "vault/corp"), "give NAME (an Issuer) or clusterissuer/NAME"),
        (("-n", NS, "--client", "x", "--ca-issuer", "Corp"), "--ca-issuer 'Corp'"),
        (("-n", NS, "--server", "db", "--cluster-domain", "Cluster.Local"), "--cluster-domain"),
    ],
)
def test_bad_input_is_a_usage_error_that_says_what_is_wrong(args: tuple[str, ...], message: str) -> None:
    code, out, _ = run(*args)
    assert code == 2, out
    assert message in out
    assert "Traceback" not in out


def test_secret_collisions_are_refused_in_the_library_too() -> None:
    # "db" as the server writes db-tls; a client whose object name is "db-tls" writes db-tls-tls,
    # fine; but a client named like the CA Secret's Certificate would overwrite the CA.
    assert manifests(K8sCerts(namespace="a", server="db", clients=("db-tls",)))
    with pytest.raises(CertManagerError, match="dbmtls-ca"):
        manifests(K8sCerts(namespace="a", clients=("x=dbmtls-ca",)))


def test_render_is_deterministic() -> None:
    opts = K8sCerts(namespace=NS, server="db", headless=("db-hl",), clients=("a", "b"))
    assert render(opts) == render(opts)


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str) -> bool:
    """An in-memory TLS handshake; True when the client accepts the server certificate for ``name``."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError:
                return False
            except ssl.SSLError:
                if side is server:  # the client's alert after it rejected the certificate
                    continue
                raise
            peer_in.write(out.read())
        if client.version() is not None and server.version() is not None:
            return True
    raise AssertionError("handshake did not finish")


def test_openssl_accepts_every_name_a_client_uses_and_no_other(tmp_path: Path) -> None:
    """The names, issued into a real certificate, checked by OpenSSL's own host matching."""
    spec = by_name(
        manifests(K8sCerts(namespace=NS, server="foo-redis-master", headless=("foo-redis-headless",))),
        "Certificate",
        "foo-redis-master",
    )["spec"]
    create_ca(tmp_path / "ca")
    issue(tmp_path / "ca", tmp_path / "srv", server_names=[*spec["dnsNames"], *spec["ipAddresses"]])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "srv/tls.crt", tmp_path / "srv/tls.key")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca/ca.crt"))
    pod = "foo-redis-replicas-0.foo-redis-headless"
    for name in (
        "foo-redis-master",
        f"foo-redis-master.{NS}",
        f"foo-redis-master.{NS}.svc",
        f"foo-redis-master.{NS}.svc.cluster.local",
        f"foo-redis-headless.{NS}.svc.cluster.local",
        f"{pod}.{NS}",
        f"{pod}.{NS}.svc",
        f"{pod}.{NS}.svc.cluster.local",
        "localhost",
        "127.0.0.1",
        "::1",
    ):
        assert _handshake(server_ctx, client_ctx, name), name
    for name in (pod, f"foo-redis.{NS}", "foo-redis-master.other.svc", "10.0.0.1"):
        assert not _handshake(server_ctx, client_ctx, name), name
