"""Mesh config as it is written in the wild: DestinationRules with the ServiceEntries and
Services they name, read with Istio's semantics.

The expected outcomes are Istio's, from its API reference (networking.istio.io
DestinationRule, ServiceEntry; "Protocol Selection" for Service port names and appProtocol)
and its validation code (istio/istio pkg/config/validation: ValidateTLS,
validateTrafficPolicy, validatePortTrafficPolicies), not dbmtls's earlier behaviour.  Where
Istio has no opinion (a file with a VirtualService in it, a rule that can never work here),
the case says what an Istio user would expect the same YAML to mean.  Every input is loaded
from a real file, so each error is asserted with its file, YAML path and fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from dbmtls.cli import main
from dbmtls.config.credentials import DEFAULT_CREDENTIALS_DIR
from dbmtls.config.load import Explained, explain_config, load_config
from dbmtls.config.model import DatabaseConfig
from dbmtls.errors import ConfigError
from support.certs import PKI

MUTUAL = {
    "mode": "MUTUAL",
    "clientCertificate": "/c/tls.crt",
    "privateKey": "/c/tls.key",
    "caCertificates": "/c/ca.crt",
}
SIMPLE = {"mode": "SIMPLE", "caCertificates": "/c/ca.crt"}


def dr(
    spec: dict[str, Any],
    *,
    name: str = "rule",
    namespace: str | None = None,
    annotations: dict[str, str] | None = None,
    api: str = "networking.istio.io/v1",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": api, "kind": "DestinationRule", "metadata": meta, "spec": spec}


def rule(host: str, tls: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    """A rule with rule-level TLS (MUTUAL by default); keyword arguments go to dr()."""
    return dr({"host": host, "trafficPolicy": {"tls": MUTUAL if tls is None else tls}}, **over)


def svc(name: str, *ports: dict[str, Any], namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"ports": list(ports), **spec}}


def se(
    name: str, hosts: list[str], *ports: dict[str, Any], namespace: str | None = None, **spec: Any
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": meta,
        "spec": {"hosts": hosts, "ports": list(ports), **spec},
    }


def write_docs(tmp_path: Path, *docs: dict[str, Any], name: str = "mesh.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return p


def load(tmp_path: Path, *docs: dict[str, Any]) -> Explained:
    return explain_config([write_docs(tmp_path, *docs)])


def one(tmp_path: Path, *docs: dict[str, Any]) -> DatabaseConfig:
    (db,) = load(tmp_path, *docs).config.databases
    return db


def error(tmp_path: Path, *docs: dict[str, Any]) -> ConfigError:
    p = write_docs(tmp_path, *docs)
    with pytest.raises(ConfigError) as info:
        load_config([p])
    assert info.value.source is not None and info.value.source.startswith(str(p)), info.value
    return info.value


def doc_n(tmp_path: Path, n: int) -> str:
    return f"{tmp_path / 'mesh.yaml'} (document {n})"


# --- files as people keep them ---------------------------------------------------------------------

OTHER_KINDS = [
    {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "vs"}, "spec": {}},
    {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "gw"}, "spec": {}},
    {"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "default"}, "spec": {}},
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "pa"}, "spec": {}},
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "ap"}, "spec": {}},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app", "namespace": "shop"}, "spec": {}},
]


def test_other_kinds_are_skipped_with_a_note_each(tmp_path: Path) -> None:
    explained = load(tmp_path, *OTHER_KINDS[:3], rule("foo-redis-master"), *OTHER_KINDS[3:])
    (db,) = explained.config.databases
    assert (db.name, db.protocol) == ("rule", "redis")
    skipped = [str(n) for n in explained.explanation.notes]
    assert skipped == [
        f"{doc_n(tmp_path, 1)}: VirtualService vs: not used by dbmtls, skipped",
        f"{doc_n(tmp_path, 2)}: Gateway gw: not used by dbmtls, skipped",
        f"{doc_n(tmp_path, 3)}: Sidecar default: not used by dbmtls, skipped",
        f"{doc_n(tmp_path, 5)}: PeerAuthentication pa: not used by dbmtls, skipped",
        f"{doc_n(tmp_path, 6)}: AuthorizationPolicy ap: not used by dbmtls, skipped",
        f"{doc_n(tmp_path, 7)}: Deployment shop/app: not used by dbmtls, skipped",
    ]


def test_a_rule_without_tls_is_skipped_and_the_next_one_used(tmp_path: Path) -> None:
    """A load-balancing-only rule first in the file must not stop the TLS rule after it."""
    lb_only = dr({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}}, name="lb")
    explained = load(tmp_path, lb_only, rule("orders-postgres", name="pg"))
    assert [d.name for d in explained.config.databases] == ["pg"]
    assert [str(n) for n in explained.explanation.notes] == [
        f"{doc_n(tmp_path, 1)}: spec.trafficPolicy: no TLS settings: nothing for dbmtls to do, skipped"
    ]


def test_a_list_is_read_item_by_item(tmp_path: Path) -> None:
    """What ``kubectl get dr,svc -o yaml`` prints."""
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [svc("pg", {"name": "tcp-postgresql", "port": 15432}), rule("pg")],
    }
    db = one(tmp_path, listing)
    assert (db.protocol, db.upstream) == ("postgres", ("pg", 15432))


def test_inputs_that_yield_no_database_are_one_error_listing_why(tmp_path: Path) -> None:
    lb_only = dr({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}})
    disabled = dr({"host": "legacy", "trafficPolicy": {"tls": {"mode": "DISABLE"}}}, name="legacy")
    p = write_docs(tmp_path, OTHER_KINDS[0], lb_only, disabled, svc("unused", {"port": 80}))
    with pytest.raises(ConfigError) as info:
        load_config([p])
    message = info.value.message
    assert message.startswith("no database to relay: ")
    for part in (
        f"{p} (document 1): VirtualService vs: not used by dbmtls, skipped",
        f"{p} (document 2): spec.trafficPolicy: no TLS settings: nothing for dbmtls to do, skipped",
        f"{p} (document 3): spec.trafficPolicy.tls.mode: mode DISABLE, no TLS to originate: skipped",
        f"{p} (document 4): Service unused: no DestinationRule names its host: not used",
    ):
        assert part in message


def test_rules_services_and_configs_may_come_in_any_order_and_file(tmp_path: Path) -> None:
    """The Service after the rule, in another file, and credentialsDir set by a later file still count."""
    rules = write_docs(tmp_path, rule("pg", {"mode": "MUTUAL", "credentialName": "pg-client"}), name="rules.yaml")
    services = write_docs(tmp_path, svc("pg", {"name": "tcp-postgresql", "port": 15432}), name="services.yaml")
    local = tmp_path / "local.yaml"
    local.write_text(f"credentialsDir: {tmp_path / 'creds'}\n")
    (db,) = load_config([rules, services, local]).databases
    assert (db.protocol, db.upstream[1]) == ("postgres", 15432)
    assert db.tls.clientCertificate == f"{tmp_path}/creds/pg-client/tls.crt"


# --- Istio's validation, accepted and rejected --------------------------------------------------------

ACCEPTED_TLS = [
    pytest.param({"mode": "SIMPLE"}, id="simple-system-trust"),
    pytest.param(
        {"mode": "SIMPLE", "caCertificates": "/c/ca.crt", "sni": "db", "subjectAltNames": ["db"]}, id="simple"
    ),
    pytest.param({"mode": "SIMPLE", "clientCertificate": "/c/tls.crt", "privateKey": "/c/tls.key"}, id="simple-cert"),
    pytest.param(MUTUAL, id="mutual"),
    pytest.param({"mode": "MUTUAL", "clientCertificate": "/c/tls.crt", "privateKey": "/c/tls.key"}, id="mutual-no-ca"),
    pytest.param({"mode": "MUTUAL", "credentialName": "client-credential"}, id="mutual-credential"),
    pytest.param({"mode": "SIMPLE", "credentialName": "ca-only"}, id="simple-credential"),
    pytest.param({"mode": "MUTUAL", "credentialName": "c", "insecureSkipVerify": True}, id="mutual-credential-skip"),
    pytest.param({"mode": "SIMPLE", "insecureSkipVerify": True, "sni": "db"}, id="simple-skip"),
    pytest.param({**MUTUAL, "caCertificates": None, "insecureSkipVerify": True}, id="mutual-skip-null-ca"),
]


@pytest.mark.parametrize("tls", ACCEPTED_TLS)
def test_tls_settings_istio_accepts(tmp_path: Path, tls: dict[str, Any]) -> None:
    db = one(tmp_path, rule("foo-redis-master", tls))
    assert db.tls.mode == tls["mode"]
    assert db.tls.insecureSkipVerify == bool(tls.get("insecureSkipVerify"))


REJECTED_TLS = [
    # ValidateTLS: insecureSkipVerify with SIMPLE excludes caCertificates, credentialName, subjectAltNames
    ({"mode": "SIMPLE", "insecureSkipVerify": True, "caCertificates": "/c/ca.crt"}, "caCertificates", "insecureSkip"),
    ({"mode": "SIMPLE", "insecureSkipVerify": True, "subjectAltNames": ["db"]}, "subjectAltNames", "insecureSkip"),
    ({"mode": "SIMPLE", "insecureSkipVerify": True, "credentialName": "c"}, "credentialName", "insecureSkip"),
    # ... and with MUTUAL caCertificates and subjectAltNames (credentialName still gives the key pair)
    ({**MUTUAL, "insecureSkipVerify": True}, "caCertificates", "remove caCertificates or insecureSkipVerify"),
    (
        {"mode": "MUTUAL", "credentialName": "c", "insecureSkipVerify": True, "subjectAltNames": ["x"]},
        "subjectAltNames",
        "insecureSkipVerify skips verifying the server",
    ),
    # client certificate and key are required for MUTUAL only, unless credentialName gives them
    ({"mode": "MUTUAL", "privateKey": "/c/tls.key"}, "clientCertificate", "mode MUTUAL needs clientCertificate"),
    ({"mode": "MUTUAL", "clientCertificate": "/c/tls.crt"}, "privateKey", "privateKey is missing"),
    # only one of file paths or credentialName
    ({"mode": "MUTUAL", "credentialName": "c", "clientCertificate": "/c/tls.crt"}, "clientCertificate", "only one"),
    ({"mode": "SIMPLE", "credentialName": "c", "caCertificates": "/c/ca.crt"}, "caCertificates", "only one"),
    # a tls block without a mode: Istio would read DISABLE (plaintext); never what was meant
    ({}, "mode", "a tls block without a mode"),
    ({"caCertificates": "/c/ca.crt"}, "mode", "set mode: SIMPLE or MUTUAL"),
    ({"mode": "mutual"}, "mode", "unknown TLS mode 'mutual'; one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"),
    ({"mode": "SIMPLE", "insecureSkipVerify": "yes"}, "insecureSkipVerify", "must be true or false"),
    ({"mode": "SIMPLE", "subjectAltNames": "db"}, "subjectAltNames", "must be a list of names"),
    ({"mode": "MUTUAL", "credentialName": "configmap://ca"}, "credentialName", "only a Secret name"),
    ({"mode": "MUTUAL", "credentialName": "Not_A_Secret"}, "credentialName", "not a Kubernetes Secret name"),
]


@pytest.mark.parametrize(("tls", "field", "message"), REJECTED_TLS)
def test_tls_settings_istio_rejects(tmp_path: Path, tls: dict[str, Any], field: str, message: str) -> None:
    err = error(tmp_path, rule("foo-redis-master", tls))
    assert err.path == f"spec.trafficPolicy.tls.{field}"
    assert message in err.message


@pytest.mark.parametrize(
    ("policy", "path", "message"),
    [
        ({}, "spec.trafficPolicy", "traffic policy must have at least one field"),
        (
            {"portLevelSettings": [{"port": {"number": 5432}}]},
            "spec.trafficPolicy.portLevelSettings[0]",
            "must have at least one field besides port",
        ),
        (
            {"portLevelSettings": [{"tls": MUTUAL}]},
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "need a port number",
        ),
        (
            {"portLevelSettings": [{"port": {"number": 70000}, "tls": MUTUAL}]},
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "1-65535",
        ),
        (
            {
                "portLevelSettings": [
                    {"port": {"number": 5432}, "tls": MUTUAL},
                    {"port": {"number": 5432}, "tls": SIMPLE},
                ]
            },
            "spec.trafficPolicy.portLevelSettings[1].port.number",
            "port 5432 is already set by portLevelSettings[0]",
        ),
    ],
)
def test_traffic_policies_istio_rejects(tmp_path: Path, policy: dict[str, Any], path: str, message: str) -> None:
    err = error(tmp_path, dr({"host": "orders-postgres", "trafficPolicy": policy}))
    assert err.path == path
    assert message in err.message


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        ({"subsets": [{"labels": {"v": "1"}}]}, "spec.subsets[0].name", "a subset needs a name"),
        ({"subsets": [{"name": "v1"}, {"name": "v1"}]}, "spec.subsets[1].name", "duplicate subset name"),
        ({"exportTo": [".", "shop"]}, "spec.exportTo", "duplicate entries in exportTo"),
        ({"exportTo": ["*", "other"]}, "spec.exportTo", "cannot have both public (*) and non-public"),
        (
            {"exportTo": ["other"], "workloadSelector": {"matchLabels": {"app": "a"}}},
            "spec.exportTo",
            "a rule with a workloadSelector applies only in its own namespace",
        ),
        (
            {"workloadSelector": {"matchLabels": {"app": "web-*"}}},
            "spec.workloadSelector.matchLabels.app",
            "wildcard is not supported",
        ),
    ],
)
def test_subsets_and_selection_istio_rejects(tmp_path: Path, extra: dict[str, Any], path: str, message: str) -> None:
    spec = {"host": "pg", "trafficPolicy": {"tls": MUTUAL}, **extra}
    err = error(tmp_path, dr(spec, namespace="shop"))
    assert err.path == path
    assert message in err.message


@pytest.mark.parametrize(
    "extra",
    [
        {"exportTo": ["."]},
        {"exportTo": ["shop"], "workloadSelector": {"matchLabels": {"app": "a"}}},
        {"exportTo": ["*"]},
        {"exportTo": ["shop", "other"]},
        {"subsets": [{"name": "v1"}, {"name": "v2", "labels": {"version": "v2"}}]},
    ],
)
def test_subsets_and_selection_istio_accepts(tmp_path: Path, extra: dict[str, Any]) -> None:
    assert one(tmp_path, dr({"host": "orders-postgres", "trafficPolicy": {"tls": MUTUAL}, **extra}, namespace="shop"))


# --- unknown keys, at every level -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"hots": "pg"}, "spec.hots"),
        ({"trafficPolicy": {"tsl": MUTUAL}}, "spec.trafficPolicy.tsl"),
        # a typo in a port-level entry must not silently leave the rule-level TLS in charge
        (
            {"trafficPolicy": {"tls": SIMPLE, "portLevelSettings": [{"port": {"number": 5432}, "tsl": MUTUAL}]}},
            "spec.trafficPolicy.portLevelSettings[0].tsl",
        ),
        (
            {"trafficPolicy": {"portLevelSettings": [{"port": {"numbr": 5432}, "tls": MUTUAL}]}},
            "spec.trafficPolicy.portLevelSettings[0].port.numbr",
        ),
        ({"trafficPolicy": {"tls": {**MUTUAL, "sniName": "pg"}}}, "spec.trafficPolicy.tls.sniName"),
        (
            {"trafficPolicy": {"tls": MUTUAL, "loadBalancer": {"simpel": "RANDOM"}}},
            "spec.trafficPolicy.loadBalancer.simpel",
        ),
        (
            {"trafficPolicy": {"tls": MUTUAL, "connectionPool": {"tcp": {"maxConnection": 5}}}},
            "spec.trafficPolicy.connectionPool.tcp.maxConnection",
        ),
        (
            {"trafficPolicy": {"tls": MUTUAL, "outlierDetection": {"consecutive5xx": 5}}},
            "spec.trafficPolicy.outlierDetection.consecutive5xx",
        ),
        (
            {"trafficPolicy": {"tls": MUTUAL, "retryBudget": {"percentage": 5}}},
            "spec.trafficPolicy.retryBudget.percentage",
        ),
        (
            {"trafficPolicy": {"tls": MUTUAL}, "subsets": [{"name": "v1", "lables": {"v": "1"}}]},
            "spec.subsets[0].lables",
        ),
        (
            {"trafficPolicy": {"tls": MUTUAL}, "subsets": [{"name": "v1", "trafficPolicy": {"tsl": MUTUAL}}]},
            "spec.subsets[0].trafficPolicy.tsl",
        ),
        # DestinationRule's selector is matchLabels (ServiceEntry's is labels)
        (
            {"trafficPolicy": {"tls": MUTUAL}, "workloadSelector": {"labels": {"app": "x"}}},
            "spec.workloadSelector.labels",
        ),
    ],
)
def test_unknown_keys_are_errors_at_every_level(tmp_path: Path, spec: dict[str, Any], path: str) -> None:
    err = error(tmp_path, dr({"host": "pg", **spec}))
    assert err.path == path
    assert "unknown field (check the spelling; the fields here are: " in err.message


def test_unknown_dbmtls_annotation_and_top_level_key(tmp_path: Path) -> None:
    err = error(tmp_path, rule("pg", annotations={"dbmtls.io/protocl": "postgres"}))
    assert (err.path, err.detail.split(" (")[0]) == (
        "metadata.annotations.dbmtls.io/protocl",
        "unknown dbmtls annotation",
    )
    doc = {**rule("pg"), "specs": {}}
    assert error(tmp_path, doc).path == "specs"


def test_every_field_of_the_current_api_is_accepted(tmp_path: Path) -> None:
    """A rule using every field Istio documents (those that matter only to a mesh included) loads."""
    mesh_only = {
        "loadBalancer": {
            "simple": "LEAST_REQUEST",
            "consistentHash": {"httpCookie": {"name": "u", "ttl": "0s"}, "ringHash": {"minimumRingSize": 1024}},
            "localityLbSetting": {"enabled": True, "failover": [{"from": "us-east", "to": "us-west"}]},
            "warmupDurationSecs": "60s",
            "warmup": {"duration": "60s", "minimumPercent": 10, "aggression": 1.0},
        },
        "connectionPool": {
            "tcp": {
                "maxConnections": 100,
                "connectTimeout": "30ms",
                "tcpKeepalive": {"time": "7200s", "interval": "75s"},
                "maxConnectionDuration": "1h",
                "idleTimeout": "1h",
            },
            "http": {
                "http1MaxPendingRequests": 1,
                "http2MaxRequests": 1000,
                "maxRequestsPerConnection": 10,
                "maxRetries": 3,
                "idleTimeout": "1h",
                "h2UpgradePolicy": "UPGRADE",
                "maxConcurrentStreams": 9,
            },
        },
        "outlierDetection": {
            "consecutive5xxErrors": 7,
            "interval": "5m",
            "baseEjectionTime": "15m",
            "maxEjectionPercent": 10,
            "minHealthPercent": 0,
            "splitExternalLocalOriginErrors": True,
            "consecutiveLocalOriginFailures": 3,
            "consecutiveGatewayErrors": 2,
        },
    }
    spec = {
        "host": "orders-postgres.shop.svc.cluster.local",
        "exportTo": ["."],
        "workloadSelector": {"matchLabels": {"app": "orders"}},
        "trafficPolicy": {
            **mesh_only,
            "retryBudget": {"percent": 20, "minRetryConcurrency": 3},
            "tls": {**MUTUAL, "sni": "orders-postgres", "subjectAltNames": ["orders-postgres"]},
            "portLevelSettings": [{"port": {"number": 5432}, **mesh_only, "tls": MUTUAL}],
        },
        "subsets": [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": mesh_only}],
    }
    db = one(tmp_path, dr(spec))
    assert (db.protocol, db.upstream) == ("postgres", ("orders-postgres.shop.svc.cluster.local", 5432))


# --- what only a mesh uses: accepted, listed as ignored ---------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ignored_path"),
    [
        (
            {"trafficPolicy": {"tls": MUTUAL, "loadBalancer": {"simple": "ROUND_ROBIN"}}},
            "spec.trafficPolicy.loadBalancer",
        ),
        (
            {"trafficPolicy": {"tls": MUTUAL, "loadBalancer": {"warmup": {"duration": "1m"}}}},
            "spec.trafficPolicy.loadBalancer",
        ),
        (
            {"trafficPolicy": {"tls": MUTUAL, "connectionPool": {"tcp": {"maxConnections": 100}}}},
            "spec.trafficPolicy.connectionPool",
        ),
        (
            {"trafficPolicy": {"tls": MUTUAL, "connectionPool": {"http": {"http2MaxRequests": 100}}}},
            "spec.trafficPolicy.connectionPool",
        ),
        (
            {"trafficPolicy": {"tls": MUTUAL, "outlierDetection": {"consecutive5xxErrors": 7}}},
            "spec.trafficPolicy.outlierDetection",
        ),
        ({"trafficPolicy": {"tls": MUTUAL, "retryBudget": {"percent": 20}}}, "spec.trafficPolicy.retryBudget"),
        ({"trafficPolicy": {"tls": MUTUAL}, "exportTo": ["."]}, "spec.exportTo"),
        (
            {"trafficPolicy": {"tls": MUTUAL}, "workloadSelector": {"matchLabels": {"app": "a"}}},
            "spec.workloadSelector",
        ),
        ({"trafficPolicy": {"tls": MUTUAL}, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}, "spec.subsets"),
        (
            {
                "trafficPolicy": {
                    "portLevelSettings": [
                        {"port": {"number": 6379}, "tls": MUTUAL, "connectionPool": {"tcp": {"maxConnections": 5}}}
                    ]
                }
            },
            "spec.trafficPolicy.portLevelSettings[0].connectionPool",
        ),
    ],
)
def test_mesh_only_fields_are_listed_as_ignored(tmp_path: Path, spec: dict[str, Any], ignored_path: str) -> None:
    explained = load(tmp_path, dr({"host": "foo-redis-master", **spec}))
    (db,) = explained.config.databases
    assert (db.protocol, db.upstream[1], db.tls.mode) == ("redis", 6379, "MUTUAL")
    ignored = {n.path: n.message for n in explained.explanation.databases[db.name].ignored}
    assert ignored_path in ignored
    assert ignored[ignored_path].startswith("ignored: ")


def test_simple_with_a_client_certificate_ignores_it_as_istio_does(tmp_path: Path) -> None:
    """Istio's own example (IST0128) has SIMPLE with a client certificate: accepted, never presented."""
    tls = {"mode": "SIMPLE", "clientCertificate": "/etc/certs/myclientcert.pem", "privateKey": "/etc/certs/k.pem"}
    explained = load(tmp_path, rule("foo-redis-master", tls))
    (db,) = explained.config.databases
    assert (db.tls.mode, db.tls.clientCertificate, db.tls.privateKey) == ("SIMPLE", None, None)
    ignored = [n.path for n in explained.explanation.databases["rule"].ignored]
    assert "spec.trafficPolicy.tls.clientCertificate" in ignored
    assert "spec.trafficPolicy.tls.privateKey" in ignored


# --- what dbmtls cannot honour: errors naming the field and what to do instead --------------------------


@pytest.mark.parametrize(
    ("spec", "path", "fix"),
    [
        ({"host": "*.example.com", "trafficPolicy": {"tls": MUTUAL}}, "spec.host", "one DestinationRule per server"),
        (
            {"host": "pg", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}},
            "spec.trafficPolicy.tls.mode",
            "use MUTUAL with clientCertificate, privateKey and caCertificates",
        ),
        (
            {
                "host": "pg",
                "trafficPolicy": {"portLevelSettings": [{"port": {"number": 5432}, "tls": {"mode": "ISTIO_MUTUAL"}}]},
            },
            "spec.trafficPolicy.portLevelSettings[0].tls.mode",
            "ISTIO_MUTUAL uses the mesh's own certificates",
        ),
        (
            {
                "host": "pg",
                "trafficPolicy": {"tls": MUTUAL},
                "subsets": [{"name": "v1", "trafficPolicy": {"tls": MUTUAL}}],
            },
            "spec.subsets[0].trafficPolicy.tls",
            "move them to spec.trafficPolicy.tls",
        ),
        (
            {"host": "pg", "trafficPolicy": {"tls": MUTUAL, "tunnel": {"targetHost": "proxy", "targetPort": 8080}}},
            "spec.trafficPolicy.tunnel",
            "remove tunnel, and point dbmtls.io/address",
        ),
        (
            {"host": "pg", "trafficPolicy": {"tls": MUTUAL, "proxyProtocol": {"version": "V2"}}},
            "spec.trafficPolicy.proxyProtocol",
            "remove proxyProtocol",
        ),
        (
            {
                "host": "pg",
                "trafficPolicy": {"tls": MUTUAL},
                "subsets": [{"name": "v1", "trafficPolicy": {"proxyProtocol": {"version": "V1"}}}],
            },
            "spec.subsets[0].trafficPolicy.proxyProtocol",
            "does not send a PROXY protocol header",
        ),
        (
            {"host": "pg", "trafficPolicy": {"tls": {**MUTUAL, "caCrl": "/c/crl.pem"}}},
            "spec.trafficPolicy.tls.caCrl",
            "remove caCrl",
        ),
    ],
)
def test_what_dbmtls_cannot_honour_is_an_error(tmp_path: Path, spec: dict[str, Any], path: str, fix: str) -> None:
    err = error(tmp_path, dr(spec))
    assert err.path == path
    assert fix in err.message


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        # the case: plaintext at rule level, the real TLS hidden under a subset's port
        (
            {
                "host": "db.example.com",
                "trafficPolicy": {"tls": {"mode": "DISABLE"}},
                "subsets": [
                    {
                        "name": "tls",
                        "labels": {"v": "2"},
                        "trafficPolicy": {"portLevelSettings": [{"port": {"number": 5432}, "tls": MUTUAL}]},
                    },
                ],
            },
            "spec.subsets[0].trafficPolicy.portLevelSettings[0].tls",
        ),
        # no protocol, no port: ISTIO_MUTUAL is what can never work, so it is said first
        ({"host": "db.example.com", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}, "spec.trafficPolicy.tls.mode"),
        ({"host": "*.db.example.com", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}, "spec.host"),
        # credentialName with an ISTIO_MUTUAL port: not "mount the Secret", but the mode
        (
            {
                "host": "db.example.com",
                "trafficPolicy": {
                    "tls": {"mode": "MUTUAL", "credentialName": "c"},
                    "portLevelSettings": [{"port": {"number": 1}, "tls": {"mode": "ISTIO_MUTUAL"}}],
                },
            },
            "spec.trafficPolicy.portLevelSettings[0].tls.mode",
        ),
    ],
)
def test_the_first_error_is_the_real_one(tmp_path: Path, spec: dict[str, Any], path: str) -> None:
    assert error(tmp_path, dr(spec)).path == path


# --- protocol: annotation, then the documents, then well-known ports and names, else opaque TCP ------------

PG_TCP = {"name": "tcp", "port": 15432}


@pytest.mark.parametrize(
    ("docs", "protocol", "origin"),
    [
        # the annotation beats everything
        (
            [svc("db", {"name": "redis", "port": 6380}), rule("db", annotations={"dbmtls.io/protocol": "mysql"})],
            "mysql",
            "annotation dbmtls.io/protocol: mysql",
        ),
        (
            [
                se("db", ["db.example.com"], {"number": 443, "name": "tls", "protocol": "TLS"}),
                rule("db.example.com", annotations={"dbmtls.io/protocol": "postgres"}),
            ],
            "postgres",
            "annotation dbmtls.io/protocol",
        ),
        # ServiceEntry: protocol, Istio's names
        (
            [
                se("m", ["mymongodb.somedomain"], {"number": 27018, "name": "mongodb", "protocol": "MONGO"}),
                rule("mymongodb.somedomain"),
            ],
            "mongodb",
            "ServiceEntry m port 27018 protocol MONGO",
        ),
        (
            [
                se("r", ["cache.example.com"], {"number": 6380, "name": "r", "protocol": "REDIS"}),
                rule("cache.example.com"),
            ],
            "redis",
            "protocol REDIS",
        ),
        (
            [
                se("my", ["sql.example.com"], {"number": 3307, "name": "x", "protocol": "MYSQL"}),
                rule("sql.example.com"),
            ],
            "mysql",
            "protocol MYSQL",
        ),
        (
            [
                se("h", ["api.example.com"], {"number": 8080, "name": "web", "protocol": "HTTP"}),
                rule("api.example.com"),
            ],
            "tcp",
            "protocol HTTP",
        ),
        # TCP says only "not HTTP": the name, then the well-known port, then the host
        (
            [
                se("p", ["pg.example.com"], {"number": 5433, "name": "tcp-postgres", "protocol": "TCP"}),
                rule("pg.example.com"),
            ],
            "postgres",
            "port name tcp-postgres (the word 'postgres')",
        ),
        (
            [se("p", ["pg.example.com"], {"number": 5432, "name": "db", "protocol": "TCP"}), rule("pg.example.com")],
            "postgres",
            "the well-known port 5432 of postgres",
        ),
        # Service: appProtocol first (IANA names and Istio's), then the name by Istio's convention
        (
            [svc("db", {"name": "db", "port": 15432, "appProtocol": "postgresql"}), rule("db")],
            "postgres",
            "appProtocol postgresql",
        ),
        (
            [svc("db", {"name": "redis", "port": 16000, "appProtocol": "mysql"}), rule("db")],
            "mysql",
            "appProtocol mysql",
        ),
        ([svc("db", {"name": "x", "port": 16000, "appProtocol": "mongodb"}), rule("db")], "mongodb", "appProtocol"),
        ([svc("db", {"name": "x", "port": 8080, "appProtocol": "kubernetes.io/h2c"}), rule("db")], "tcp", "h2c"),
        ([svc("db", {"name": "mongo", "port": 27018}), rule("db")], "mongodb", "port name mongo"),
        ([svc("db", {"name": "redis-primary", "port": 16379}), rule("db")], "redis", "port name redis-primary"),
        ([svc("db", {"name": "tcp-postgresql", "port": 15432}), rule("db")], "postgres", "the word 'postgresql'"),
        ([svc("db", {"name": "tcp-mariadb", "port": 13306}), rule("db")], "mariadb", "the word 'mariadb'"),
        ([svc("db", {"name": "grpc-web", "port": 9000}), rule("db")], "tcp", "port name grpc-web"),
        ([svc("db", {"name": "tcp", "port": 5432}), rule("db")], "postgres", "the well-known port 5432"),
        (
            [svc("orders-redis", {**PG_TCP, "port": 9000}), rule("orders-redis")],
            "redis",
            "the word 'redis' in the host",
        ),
        # a Service of another name says nothing about this host
        ([svc("other", {"name": "mysql", "port": 3307}), rule("foo-redis-master")], "redis", "in the host"),
        # nothing says: opaque TCP, as Istio does
        ([svc("db", {"name": "client", "port": 9000}), rule("db")], "tcp", "nothing names a protocol"),
        (
            [
                dr(
                    {
                        "host": "db.example.com",
                        "trafficPolicy": {"portLevelSettings": [{"port": {"number": 9000}, "tls": MUTUAL}]},
                    }
                )
            ],
            "tcp",
            "opaque TCP (Istio's default)",
        ),
        # without documents: the well-known port of a port-level entry, or the host's word with its default port
        (
            [
                dr(
                    {
                        "host": "db.example.com",
                        "trafficPolicy": {"portLevelSettings": [{"port": {"number": 3306}, "tls": MUTUAL}]},
                    }
                )
            ],
            "mysql",
            "the well-known port 3306 of mysql",
        ),
        ([rule("cockroachdb-public")], "cockroachdb", "the word 'cockroachdb' in the host"),
    ],
)
def test_protocol_precedence(tmp_path: Path, docs: list[dict[str, Any]], protocol: str, origin: str) -> None:
    explained = load(tmp_path, *docs)
    (db,) = explained.config.databases
    assert db.protocol == protocol
    assert origin in str(explained.explanation.databases[db.name].origins["protocol"])


def test_opaque_tcp_is_said_in_check(tmp_path: Path) -> None:
    explained = load(tmp_path, svc("db", {"name": "client", "port": 9000}), rule("db"))
    (note,) = explained.explanation.databases["rule"].notes
    assert note.message.startswith("nothing says which database listens on db port 9000: relayed as opaque TCP")
    assert "set the annotation dbmtls.io/protocol or name the Service port" in note.message


@pytest.mark.parametrize(
    ("port", "where"),
    [
        ({"name": "https-db", "port": 8443}, "spec.ports[0].name"),
        ({"name": "db", "port": 8443, "appProtocol": "tls"}, "spec.ports[0].appProtocol"),
    ],
)
def test_a_port_where_the_app_speaks_tls_is_an_error(tmp_path: Path, port: dict[str, Any], where: str) -> None:
    err = error(tmp_path, svc("db", port), rule("db"))
    assert err.path == where
    assert err.source == doc_n(tmp_path, 1)
    assert "the app already speaks TLS on this port, and dbmtls would encrypt it again" in err.message
    assert "set the annotation dbmtls.io/protocol on DestinationRule rule" in err.message


@pytest.mark.parametrize("transport", ["UDP", "SCTP"])
def test_a_port_that_is_not_tcp_is_skipped_with_a_note(tmp_path: Path, transport: str) -> None:
    explained = load(
        tmp_path,
        svc("db", {"name": "dns", "port": 53, "protocol": transport}, {"name": "pg", "port": 5432}),
        rule("db"),
    )
    assert [(d.name, d.protocol) for d in explained.config.databases] == [("rule", "postgres")]
    assert any("port 53 of Service db is not TCP" in str(n) for n in explained.explanation.notes)


# --- ports: from the documents; only when none names one is it an error ------------------------------------


def test_rule_level_tls_applies_to_every_port_of_the_service(tmp_path: Path) -> None:
    explained = load(
        tmp_path,
        svc("pg", {"name": "tcp-postgresql", "port": 5432}, {"name": "http-metrics", "port": 9187}, namespace="db"),
        rule("pg.db.svc.cluster.local", name="pg"),
    )
    dbs = {d.name: d for d in explained.config.databases}
    assert set(dbs) == {"pg-5432", "pg-9187"}
    assert (dbs["pg-5432"].protocol, dbs["pg-5432"].listen) == ("postgres", "127.0.0.1:5432")
    assert (dbs["pg-9187"].protocol, dbs["pg-9187"].listen) == ("tcp", "127.0.0.1:9187")
    origin = explained.explanation.databases["pg-9187"].origins["port"]
    assert (origin.how, origin.path) == ("Service db/pg port 9187", "spec.ports[1]")


def test_port_level_settings_replace_the_rule_level_tls_for_their_port_only(tmp_path: Path) -> None:
    spec = {
        "host": "pg",
        "trafficPolicy": {
            "tls": MUTUAL,
            "portLevelSettings": [
                {"port": {"number": 9187}, "tls": {"mode": "DISABLE"}},
                {"port": {"number": 9999}, "tls": SIMPLE},
            ],
        },
    }
    explained = load(
        tmp_path, svc("pg", {"name": "tcp-postgresql", "port": 5432}, {"name": "metrics", "port": 9187}), dr(spec)
    )
    (db,) = explained.config.databases
    assert (db.name, db.upstream[1], db.tls.mode) == ("rule", 5432, "MUTUAL")
    notes = [str(n) for n in explained.explanation.notes]
    assert any(
        "portLevelSettings[0].tls.mode: port 9187: mode DISABLE, no TLS to originate: skipped" in n for n in notes
    )
    assert any(
        "port 9999 is not a port of Service pg" in n and "applies to no connection (as in Istio)" in n for n in notes
    )


def test_a_port_level_entry_without_tls_keeps_the_rules_tls_and_the_default_port(tmp_path: Path) -> None:
    """The issue's case: a load-balancing-only port entry no longer loses the rule's default port."""
    spec = {
        "host": "foo-redis-master",
        "trafficPolicy": {
            "tls": MUTUAL,
            "portLevelSettings": [{"port": {"number": 26379}, "loadBalancer": {"simple": "RANDOM"}}],
        },
    }
    dbs = {d.upstream[1]: d for d in load(tmp_path, dr(spec)).config.databases}
    assert set(dbs) == {6379, 26379}
    assert dbs[6379].tls.mode == dbs[26379].tls.mode == "MUTUAL"
    assert [dbs[6379].name, dbs[26379].name] == ["rule-6379", "rule-26379"]


def test_serviceentry_target_port_endpoints_and_subject_alt_names(tmp_path: Path) -> None:
    entry = se(
        "pg",
        ["pg.example.com"],
        {"number": 5432, "name": "tcp-pg", "protocol": "TCP"},
        {"number": 6432, "name": "bouncer", "protocol": "TCP", "targetPort": 16432},
        resolution="STATIC",
        endpoints=[{"address": "10.0.0.7", "ports": {"tcp-pg": 15432}}, {"address": "10.0.0.8"}],
        subjectAltNames=["pg.internal"],
    )
    explained = load(tmp_path, entry, rule("pg.example.com", name="pg"))
    dbs = {d.name: d for d in explained.config.databases}
    # an endpoint's own port for the named port, else the targetPort, else the number
    assert dbs["pg-5432"].dial_target == ("10.0.0.7", 15432)
    assert dbs["pg-6432"].dial_target == ("10.0.0.7", 16432)
    # the name verified is the host's; the ServiceEntry's subjectAltNames when the rule names none
    assert dbs["pg-5432"].server_name == "pg.example.com"
    assert dbs["pg-5432"].verify_names == ("pg.internal",)
    notes = [n.message for n in explained.explanation.databases["pg-5432"].notes]
    assert "ServiceEntry pg has 2 endpoints; dbmtls dials only the first (no load balancing or failover)" in notes
    # the rule's own subjectAltNames win
    tls = {**MUTUAL, "subjectAltNames": ["pg.example.com"]}
    dbs = {d.name: d for d in load(tmp_path, entry, rule("pg.example.com", tls, name="pg")).config.databases}
    assert dbs["pg-5432"].verify_names == ("pg.example.com",)


def test_dns_serviceentry_target_port_and_headless_service(tmp_path: Path) -> None:
    entry = se(
        "r",
        ["cache.example.com"],
        {"number": 6379, "name": "redis", "protocol": "REDIS", "targetPort": 16379},
        resolution="DNS",
    )
    assert one(tmp_path, entry, rule("cache.example.com")).dial_target == ("cache.example.com", 16379)
    # a Service's targetPort is behind its virtual IP: dialled only when the Service is headless
    port = {"name": "tcp-postgresql", "port": 5432, "targetPort": 15432}
    assert one(tmp_path, svc("pg", port), rule("pg")).dial_target == ("pg", 5432)
    assert one(tmp_path, svc("pg", port, clusterIP="None"), rule("pg")).dial_target == ("pg", 15432)


def test_no_port_anywhere_names_the_field_to_add(tmp_path: Path) -> None:
    err = error(tmp_path, rule("db.example.com", annotations={"dbmtls.io/protocol": "tcp"}))
    assert err.path == "spec.trafficPolicy.portLevelSettings"
    assert "add portLevelSettings with a port.number, put the Service or ServiceEntry of db.example.com" in err.message


def test_a_service_without_ports_is_named(tmp_path: Path) -> None:
    err = error(tmp_path, se("pg", ["pg.example.com"]), rule("pg.example.com"))
    assert (err.source, err.path) == (doc_n(tmp_path, 1), "spec.ports")
    assert "ServiceEntry pg lists no ports, so nothing says where DestinationRule rule connects" in err.message


def test_listen_and_address_annotations_with_several_ports(tmp_path: Path) -> None:
    ports = ({"name": "tcp-postgresql", "port": 5432}, {"name": "tcp-bouncer", "port": 6432})
    err = error(tmp_path, svc("pg", *ports), rule("pg", annotations={"dbmtls.io/listen": "127.0.0.1:15432"}))
    assert err.path == "metadata.annotations.dbmtls.io/listen"
    assert "yields 2 databases (ports 5432, 6432): use overrides.<database>.listen instead" in err.message
    dbs = load(tmp_path, svc("pg", *ports), rule("pg", annotations={"dbmtls.io/address": "10.1.2.3"})).config.databases
    assert [d.dial_target for d in dbs] == [("10.1.2.3", 5432), ("10.1.2.3", 6432)]
    err = error(tmp_path, svc("pg", *ports), rule("pg", annotations={"dbmtls.io/address": "10.1.2.3:7000"}))
    assert "names one port, but this rule has several: write only the host" in err.message


# --- host matching: short, namespaced, FQDN ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "rule_ns", "svc_ns", "matches"),
    [
        ("pg", "db", "db", True),
        ("pg", None, "db", True),  # a rule without namespace: the namespace it will be applied to
        ("pg", "db", None, True),
        ("pg", "other", "db", False),  # Istio reads a short host in the rule's namespace
        ("pg.db", "other", "db", True),
        ("pg.db.svc", "other", "db", True),
        ("pg.db.svc.cluster.local", "other", "db", True),
        ("PG.DB.SVC.CLUSTER.LOCAL.", None, "db", True),
        ("pg.other.svc.cluster.local", None, "db", False),
        ("pg.example.com", "db", "db", False),  # an external name is not a cluster service
    ],
)
def test_service_host_matching(
    tmp_path: Path, host: str, rule_ns: str | None, svc_ns: str | None, matches: bool
) -> None:
    service = svc("pg", {"name": "tcp-postgresql", "port": 15432}, namespace=svc_ns)
    db = one(tmp_path, service, rule(host, namespace=rule_ns, annotations={"dbmtls.io/protocol": "postgres"}))
    assert db.upstream[1] == (15432 if matches else 5432)


@pytest.mark.parametrize(
    ("hosts", "rule_host", "matches"),
    [
        (["pg.example.com"], "pg.example.com", True),
        (["*.example.com"], "pg.example.com", True),
        (["other.example.com"], "pg.example.com", False),
        (["pg"], "pg.shop.svc.cluster.local", True),  # a short ServiceEntry host in its own namespace
    ],
)
def test_serviceentry_host_matching(tmp_path: Path, hosts: list[str], rule_host: str, matches: bool) -> None:
    entry = se("pg", hosts, {"number": 15432, "name": "pg", "protocol": "TCP"}, namespace="shop")
    db = one(tmp_path, entry, rule(rule_host, annotations={"dbmtls.io/protocol": "postgres"}))
    assert db.upstream[1] == (15432 if matches else 5432)


def test_ambiguous_host_asks_for_the_namespace_and_a_serviceentry_wins_over_a_service(tmp_path: Path) -> None:
    a = svc("pg", {"name": "tcp-postgresql", "port": 15432}, namespace="a")
    b = svc("pg", {"name": "tcp-postgresql", "port": 25432}, namespace="b")
    err = error(tmp_path, a, b, rule("pg"))
    assert err.path == "spec.host"
    assert "host pg matches Service a/pg" in err.message and "Service b/pg" in err.message
    assert "write the host with its namespace" in err.message
    assert one(tmp_path, a, b, rule("pg", namespace="b")).upstream[1] == 25432
    entry = se("pg", ["pg.a.svc.cluster.local"], {"number": 35432, "name": "pg", "protocol": "TCP"})
    assert one(tmp_path, a, entry, rule("pg.a.svc.cluster.local")).upstream[1] == 35432


@pytest.mark.parametrize(
    ("doc", "path", "message"),
    [
        (se("x", ["db"], {"number": 1, "name": "p", "protocl": "TCP"}), "spec.ports[0].protocl", "unknown field"),
        (se("x", ["db"], {"number": 0, "name": "p"}), "spec.ports[0].number", "port number 1-65535"),
        (
            {**se("x", ["db"]), "spec": {"hosts": ["db"], "prots": []}},
            "spec.prots",
            "unknown field in ServiceEntry spec",
        ),
        (svc("x", {"name": "p", "port": "5432"}), "spec.ports[0].port", "port number"),
        ({**svc("x"), "apiVersion": "v2"}, "apiVersion", "unsupported Service apiVersion"),
        (
            {**se("x", ["db"]), "apiVersion": "networking.istio.io/v2"},
            "apiVersion",
            "unsupported ServiceEntry apiVersion",
        ),
    ],
)
def test_malformed_services_and_serviceentries(tmp_path: Path, doc: dict[str, Any], path: str, message: str) -> None:
    err = error(tmp_path, doc, rule("foo-redis-master"))
    assert (err.source, err.path) == (doc_n(tmp_path, 1), path)
    assert message in err.message


# --- credentialName ---------------------------------------------------------------------------------------


def _secret(root: Path, name: str, files: tuple[str, ...]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_text("x")
    return d


@pytest.mark.parametrize(
    ("mode", "files", "expected", "note"),
    [
        ("MUTUAL", ("tls.crt", "tls.key", "ca.crt"), ("tls.crt", "tls.key", "ca.crt"), None),
        ("MUTUAL", ("cert", "key", "cacert"), ("cert", "key", "cacert"), None),
        # a public ACME issuer's Secret has no CA: the system trust store, said in check
        ("MUTUAL", ("tls.crt", "tls.key"), ("tls.crt", "tls.key", None), "ca.crt does not exist"),
        # SIMPLE: the Secret only supplies the CA, as in Istio
        ("SIMPLE", ("ca.crt",), (None, None, "ca.crt"), None),
        ("SIMPLE", ("cacert",), (None, None, "cacert"), None),
        # not mounted: the cert-manager names, so that check and /readyz name what they expected
        ("MUTUAL", (), ("tls.crt", "tls.key", "ca.crt"), "is not mounted: expected tls.crt, tls.key, ca.crt or cert"),
    ],
)
def test_credential_name_layouts(
    tmp_path: Path, mode: str, files: tuple[str, ...], expected: tuple[str | None, ...], note: str | None
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    if files:
        _secret(creds, "pg-client", files)
    local = tmp_path / "local.yaml"
    local.write_text(f"credentialsDir: {creds}\n")
    rules = write_docs(tmp_path, rule("orders-postgres", {"mode": mode, "credentialName": "kubernetes://pg-client"}))
    explained = explain_config([rules, local])
    (db,) = explained.config.databases
    got = (db.tls.clientCertificate, db.tls.privateKey, db.tls.caCertificates)
    assert got == tuple(f"{creds}/pg-client/{f}" if f else None for f in expected)
    notes = [n.message for n in explained.explanation.databases[db.name].notes]
    assert (note is None and not notes) or any(note in n for n in notes if note)
    origin = explained.explanation.databases[db.name].origins["tls.caCertificates"]
    if expected[2]:
        assert origin.how.startswith("credentialName pg-client: ")
        assert origin.path == "spec.trafficPolicy.tls.credentialName"


def test_credential_name_defaults_to_where_the_injector_mounts_secrets(tmp_path: Path) -> None:
    from dbmtls.k8s.rules import CREDENTIALS_DIR

    assert DEFAULT_CREDENTIALS_DIR == CREDENTIALS_DIR == "/var/run/secrets/dbmtls/credentials"
    db = one(tmp_path, rule("orders-postgres", {"mode": "MUTUAL", "credentialName": "jinsu-tls"}))
    assert db.tls.clientCertificate == "/var/run/secrets/dbmtls/credentials/jinsu-tls/tls.crt"


def test_credential_name_in_a_dbmtls_config(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    _secret(creds, "app", ("cert", "key", "cacert"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "credentialsDir": str(creds),
                "databases": [
                    {
                        "name": "cache",
                        "protocol": "redis",
                        "listen": "127.0.0.1:16379",
                        "address": "cache:6379",
                        "tls": {"mode": "MUTUAL", "credentialName": "app"},
                    }
                ],
            }
        )
    )
    (db,) = load_config([cfg]).databases
    assert (db.tls.clientCertificate, db.tls.caCertificates) == (f"{creds}/app/cert", f"{creds}/app/cacert")


def test_check_names_the_files_a_missing_secret_should_have(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    local = tmp_path / "local.yaml"
    local.write_text(f"credentialsDir: {creds}\n")
    rules = write_docs(tmp_path, rule("orders-postgres", {"mode": "MUTUAL", "credentialName": "pg-client"}))
    result = CliRunner().invoke(main, ["check", "-c", str(rules), "-c", str(local)])
    assert result.exit_code == 1
    assert f"file {creds}/pg-client/ca.crt not found" in result.stderr or f"{creds}/pg-client/" in result.stderr
    assert (
        f"credentialName pg-client is read from {creds}/pg-client/ (tls.crt, tls.key, ca.crt or cert, key, cacert"
        in (result.stderr)
    )
    assert "or set credentialsDir (or overrides.<database>.tls) to where the files are" in result.stderr
    args = ["check", "--json", "--no-bind-check", "-c", str(rules), "-c", str(local)]  # 5432 may be taken here
    out = json.loads(CliRunner().invoke(main, args).stdout)
    (err,) = out["errors"]
    assert err["kind"] == "certificate" and err["database"] == "rule"
    assert err["from"]["path"] == "spec.trafficPolicy.tls.credentialName"
    assert err["hints"] and "credentialsDir" in err["hints"][0]


# --- check explains itself ---------------------------------------------------------------------------------


def test_check_json_gives_provenance_ignored_notes_and_errors(tmp_path: Path) -> None:
    entry = se(
        "m",
        ["mymongodb.somedomain"],
        {"number": 27018, "name": "mongodb", "protocol": "MONGO"},
        resolution="STATIC",
        endpoints=[{"address": "127.0.0.1"}],
    )
    spec = {"host": "mymongodb.somedomain", "trafficPolicy": {"tls": MUTUAL, "loadBalancer": {"simple": "RANDOM"}}}
    p = write_docs(tmp_path, OTHER_KINDS[0], entry, dr(spec, name="mtls-mongocluster"))
    result = CliRunner().invoke(main, ["check", "--json", "-c", str(p)])
    assert result.exit_code == 1  # the certificate files do not exist
    out = json.loads(result.stdout)
    assert out["ok"] is False
    (db,) = out["databases"]
    prov = db["provenance"]
    assert prov["protocol"] == {
        "from": "ServiceEntry m port 27018 protocol MONGO",
        "source": f"{p} (document 2)",
        "path": "spec.ports[0].protocol",
    }
    assert prov["port"]["path"] == "spec.ports[0]"
    assert prov["listen"]["from"] == "loopback on the server's port 27018"
    assert prov["dial"]["path"] == "spec.endpoints[0]"
    assert prov["tls.clientCertificate"]["path"] == "spec.trafficPolicy.tls.clientCertificate"
    assert prov["tls.sni"]["from"] == "default: the host of address"
    assert db["values"]["tls.sni"] == "mymongodb.somedomain"
    assert {i["path"] for i in db["ignored"]} == {"spec.trafficPolicy.loadBalancer"}
    assert out["notes"] == [
        {"message": "VirtualService vs: not used by dbmtls, skipped", "source": f"{p} (document 1)", "path": None}
    ]
    (err,) = out["errors"]
    assert (err["kind"], err["database"], err["field"]) == ("certificate", "mtls-mongocluster", "tls.caCertificates")
    assert err["message"] == "CA bundle file /c/ca.crt not found"
    assert err["from"]["path"] == "spec.trafficPolicy.tls.caCertificates"
    assert out["config"]["databases"][0]["dial"] == "127.0.0.1:27018"


def test_check_text_explains_each_setting(tmp_path: Path) -> None:
    p = write_docs(
        tmp_path, svc("pg", {"name": "tcp-postgresql", "port": 15432}, namespace="db"), rule("pg.db.svc.cluster.local")
    )
    result = CliRunner().invoke(main, ["check", "-c", str(p)])
    lines = result.stdout.splitlines()
    why = "Service db/pg port 15432 port name tcp-postgresql (the word 'postgresql')"
    assert f"#   protocol: postgres <- {why} ({p} (document 1): spec.ports[0].name)" in lines
    assert f"#   port: 15432 <- Service db/pg port 15432 ({p} (document 1): spec.ports[0])" in lines
    assert f"#   tls.mode: MUTUAL <- DestinationRule rule ({p} (document 2): spec.trafficPolicy.tls.mode)" in lines
    # the output stays a loadable dbmtls config
    assert yaml.safe_load(result.stdout)["databases"][0]["address"] == "pg.db.svc.cluster.local:15432"


def test_a_config_error_in_json(tmp_path: Path) -> None:
    p = write_docs(tmp_path, rule("pg", {"mode": "ISTIO_MUTUAL"}))
    result = CliRunner().invoke(main, ["check", "--json", "-c", str(p)])
    assert result.exit_code == 2
    (err,) = json.loads(result.stdout)["errors"]
    assert (err["kind"], err["source"], err["path"]) == ("config", str(p), "spec.trafficPolicy.tls.mode")
    assert "ISTIO_MUTUAL" in err["message"]


def test_overrides_repoint_certificates_of_a_rule_for_a_laptop(tmp_path: Path, pki: PKI) -> None:
    """The DestinationRule as it is in the cluster, unchanged; a local file points at local files."""
    rules = write_docs(tmp_path, rule("foo-redis-master", {"mode": "MUTUAL", "credentialName": "jinsu-tls"}, name="db"))
    local = tmp_path / "local.yaml"
    local.write_text(
        yaml.safe_dump(
            {
                "overrides": {
                    "db": {
                        "listen": "127.0.0.1:16379",
                        "tls": {
                            "clientCertificate": pki.client.cert,
                            "privateKey": pki.client.key,
                            "caCertificates": pki.ca_cert,
                        },
                    }
                }
            }
        )
    )
    result = CliRunner().invoke(main, ["check", "--json", "-c", str(rules), "-c", str(local)])
    assert result.exit_code == 0, result.output
    (db,) = json.loads(result.stdout)["databases"]
    assert db["values"]["tls.privateKey"] == pki.client.key
    assert db["provenance"]["tls.privateKey"] == {
        "from": "override",
        "source": str(local),
        "path": "overrides.db.tls.privateKey",
    }
    assert db["provenance"]["listen"]["path"] == "overrides.db.listen"


# --- the injector maps rules with the same semantics ----------------------------------------------------


def test_the_injector_refuses_a_pod_whose_rules_leave_nothing_to_do() -> None:
    """A DISABLE-only rule yields no database: a sidecar without one would never start."""
    from dbmtls.k8s.inject import InjectError, InjectOptions, inject_object

    disabled = rule("legacy-db", {"mode": "DISABLE"}, namespace="ns")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "annotations": {"dbmtls.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }
    with pytest.raises(InjectError, match=r"leave dbmtls nothing to do .* no dbmtls.io/config annotation"):
        inject_object(pod, [disabled], InjectOptions())
    # a MUTUAL rule next to it is injected as before
    mutual = rule("orders-postgres", {"mode": "MUTUAL", "credentialName": "pg-client"}, namespace="ns")
    out = inject_object(pod, [disabled, mutual], InjectOptions())
    (env,) = out["spec"]["initContainers"][0]["env"][:1]
    assert [d["name"] for d in yaml.safe_load(env["value"])["databases"]] == ["rule"]


def test_every_setting_check_shows_says_where_it_came_from(tmp_path: Path) -> None:
    """A rule-derived and a written database alike: no value without an origin (dial only when set)."""
    rules = write_docs(tmp_path, svc("pg", {"name": "tcp-postgresql", "port": 15432}), rule("pg"))
    native = tmp_path / "c.yaml"
    native.write_text(
        yaml.safe_dump({"databases": [{"name": "n", "protocol": "redis", "listen": "127.0.0.1:1", "address": "r"}]})
    )
    out = json.loads(CliRunner().invoke(main, ["check", "--json", "-c", str(rules), "-c", str(native)]).stdout)
    for db in out["databases"]:
        missing = {k for k, v in db["values"].items() if v is not None or k != "dial"} - set(db["provenance"])
        assert not missing, (db["name"], missing)
    native_db = next(d for d in out["databases"] if d["name"] == "n")
    assert native_db["provenance"]["port"]["from"] == "the default port of redis"
    assert native_db["provenance"]["tls.mode"]["from"] == "default: SIMPLE (verify the server, no client certificate)"
    assert native_db["provenance"]["address"] == {
        "from": "dbmtls config",
        "source": str(native),
        "path": "databases[0].address",
    }
