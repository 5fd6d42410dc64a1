"""deploy/: the kustomizations build offline with the real kubectl, and what they build is
what an API server would accept and what the design says.

Built-in kinds are validated strictly against the Kubernetes OpenAPI schemas of the oldest and
newest versions we support (kubernetes-validate); CRD kinds (cert-manager, Prometheus
Operator, Istio) have no schema offline and are checked by hand (``support.kube``).
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from dbmtls import __version__
from dbmtls.admin.metrics import make_registry, render
from dbmtls.k8s.certmanager import K8sCerts
from dbmtls.k8s.certmanager import render as render_certs
from dbmtls.k8s.inject import InjectOptions, inject_documents
from dbmtls.k8s.sidecar import HEALTH_PORT_NAME
from support.kube import cross_object_checks, kustomize_build, pod_spec, selector_matches, validate_object

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BUILDS = ("base", "monitoring", "examples/redis-mtls")
# What the webhook serves (INJECT_PATHS in src/dbmtls/k8s/webhook.py, compared with the module
# itself where it is importable); the configuration may name only these.
WEBHOOK_PATHS = {"/inject", "/inject/namespace-default"}

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def built() -> dict[str, list[Obj]]:
    return {b: kustomize_build(DEPLOY / b) for b in BUILDS}


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: found {len(found)}"
    return found[0]


# --- every build, every object ---------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_every_object_is_one_the_api_server_accepts(built: dict[str, list[Obj]], build: str) -> None:
    objs = built[build]
    assert objs
    problems = []
    for obj in objs:
        try:
            validate_object(obj)
        except AssertionError as exc:
            problems.append(str(exc))
    assert problems == []


def _webhook_module() -> Any:
    try:
        return importlib.import_module("dbmtls.k8s.webhook")
    except ImportError:  # not merged yet, or its extras missing
        return None


def test_webhook_paths_are_the_ones_the_webhook_serves() -> None:
    webhook = _webhook_module()
    if webhook is None:
        pytest.skip("dbmtls.k8s.webhook is not importable here")
    assert set(webhook.INJECT_PATHS) == WEBHOOK_PATHS


def test_references_land_on_objects_that_exist(built: dict[str, list[Obj]]) -> None:
    # the webhook with its monitoring, as a cluster has them together; the example on its own
    assert cross_object_checks(built["base"] + built["monitoring"], webhook_paths=WEBHOOK_PATHS) == []
    assert cross_object_checks(built["examples/redis-mtls"]) == []


def test_nothing_is_left_without_a_namespace(built: dict[str, list[Obj]]) -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration", "ClusterIssuer"}
    for build, objs in built.items():
        for o in objs:
            has_ns = "namespace" in o["metadata"]
            assert has_ns != (o["kind"] in cluster_scoped), f"{build}: {o['kind']} {o['metadata']['name']}"


# --- base --------------------------------------------------------------------------------------------


def test_base_contents(built: dict[str, list[Obj]]) -> None:
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in built["base"])
    assert kinds == [
        "Certificate/dbmtls-webhook-ca",
        "Certificate/dbmtls-webhook-tls",
        "ClusterRole/dbmtls-webhook",
        "ClusterRoleBinding/dbmtls-webhook",
        "Deployment/dbmtls-webhook",
        "Issuer/dbmtls-selfsigned",
        "Issuer/dbmtls-webhook-ca",
        "MutatingWebhookConfiguration/dbmtls",
        "Namespace/dbmtls-system",
        "PodDisruptionBudget/dbmtls-webhook",
        "Service/dbmtls-webhook",
        "ServiceAccount/dbmtls-webhook",
    ]
    assert {o["metadata"].get("namespace") for o in built["base"]} == {None, "dbmtls-system"}


def test_rbac_is_read_only_destination_rules_and_nothing_else(built: dict[str, list[Obj]]) -> None:
    role = one(built["base"], "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": ["networking.istio.io"], "resources": ["destinationrules"], "verbs": ["get", "list", "watch"]}
    ]
    assert not [o for o in built["base"] if o["kind"] in ("Role", "RoleBinding")]
    binding = one(built["base"], "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dbmtls-webhook", "namespace": "dbmtls-system"}]


def test_webhook_deployment(built: dict[str, list[Obj]]) -> None:
    dep = one(built["base"], "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spec = dep["spec"]["template"]["spec"]
    spread = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
    assert spread == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    [c] = spec["containers"]
    assert c["args"] == [
        "webhook",
        "--listen",
        "0.0.0.0:8443",
        "--tls-cert",
        "/etc/dbmtls/webhook/tls.crt",
        "--tls-key",
        "/etc/dbmtls/webhook/tls.key",
        "--image",
        "$(DBMTLS_SIDECAR_IMAGE)",
    ]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        assert c[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    assert set(c["resources"]["requests"]) == {"cpu", "memory"} and "memory" in c["resources"]["limits"]
    # the serving certificate: the whole Secret, read-only, no subPath (rotation is seen)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/dbmtls/webhook")
    assert mount == {"name": "webhook-tls", "mountPath": "/etc/dbmtls/webhook", "readOnly": True}
    volume = next(v for v in spec["volumes"] if v["name"] == "webhook-tls")
    cert = one(built["base"], "Certificate", "dbmtls-webhook-tls")
    assert volume["secret"]["secretName"] == cert["spec"]["secretName"]
    pdb = one(built["base"], "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1


def test_image_is_set_in_one_place_and_reaches_the_sidecar_flag(built: dict[str, list[Obj]], tmp_path: Path) -> None:
    [c] = one(built["base"], "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert c["image"] == env["DBMTLS_SIDECAR_IMAGE"] == f"dbmtls:{__version__}"
    # a user's overlay that sets the image moves both (kustomizeconfig.yaml carries over)
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(DEPLOY / "base", overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [base],
                "images": [{"name": "dbmtls", "newName": "registry.example.com/team/dbmtls", "newTag": "9.9.9"}],
            }
        )
    )
    [c] = one(kustomize_build(overlay), "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert c["image"] == env["DBMTLS_SIDECAR_IMAGE"] == "registry.example.com/team/dbmtls:9.9.9"


def test_service_and_serving_certificate(built: dict[str, list[Obj]]) -> None:
    svc = one(built["base"], "Service")
    assert svc["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    cert = one(built["base"], "Certificate", "dbmtls-webhook-tls")["spec"]
    assert cert["dnsNames"] == [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
    assert cert["usages"] == ["digital signature", "server auth"]
    assert cert["privateKey"]["rotationPolicy"] == "Always"
    chain = [one(built["base"], "Issuer", "dbmtls-selfsigned"), one(built["base"], "Certificate", "dbmtls-webhook-ca")]
    assert "selfSigned" in chain[0]["spec"] and chain[1]["spec"]["isCA"] is True
    assert one(built["base"], "Issuer", "dbmtls-webhook-ca")["spec"]["ca"]["secretName"] == "dbmtls-webhook-ca"


def test_mutating_webhook_configuration(built: dict[str, list[Obj]]) -> None:
    cfg = one(built["base"], "MutatingWebhookConfiguration")
    assert cfg["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "dbmtls-system/dbmtls-webhook-tls"
    hooks = {w["name"]: w for w in cfg["webhooks"]}
    assert list(hooks) == ["namespace.inject.dbmtls.io", "object.inject.dbmtls.io"]
    for w in hooks.values():
        assert w["rules"] == [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        assert w["admissionReviewVersions"] == ["v1"]
        assert (w["sideEffects"], w["failurePolicy"], w["timeoutSeconds"]) == ("None", "Fail", 10)
        assert (w["reinvocationPolicy"], w["matchPolicy"]) == ("IfNeeded", "Equivalent")
        assert w["clientConfig"]["service"]["name"] == "dbmtls-webhook"
        assert w["clientConfig"]["service"]["port"] == 443
    ns_hook, obj_hook = hooks["namespace.inject.dbmtls.io"], hooks["object.inject.dbmtls.io"]
    assert ns_hook["clientConfig"]["service"]["path"] == "/inject/namespace-default"
    assert obj_hook["clientConfig"]["service"]["path"] == "/inject"
    assert obj_hook["objectSelector"] == {"matchLabels": {"dbmtls.io/inject": "true"}}
    system = {
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": ["kube-system", "kube-public", "dbmtls-system"],
    }
    assert ns_hook["namespaceSelector"]["matchExpressions"] == [
        {"key": "dbmtls.io/inject", "operator": "In", "values": ["enabled"]},
        system,
    ]
    assert obj_hook["namespaceSelector"]["matchExpressions"] == [
        {"key": "dbmtls.io/inject", "operator": "NotIn", "values": ["enabled", "disabled"]},
        system,
    ]


@pytest.mark.parametrize(
    ("ns_labels", "pod_labels", "expected"),
    [
        ({}, {}, []),
        ({}, {"dbmtls.io/inject": "true"}, ["object.inject.dbmtls.io"]),
        ({"dbmtls.io/inject": "enabled"}, {}, ["namespace.inject.dbmtls.io"]),
        ({"dbmtls.io/inject": "enabled"}, {"dbmtls.io/inject": "true"}, ["namespace.inject.dbmtls.io"]),
        ({"dbmtls.io/inject": "enabled"}, {"dbmtls.io/inject": "false"}, []),
        ({"dbmtls.io/inject": "disabled"}, {"dbmtls.io/inject": "true"}, []),
        ({"kubernetes.io/metadata.name": "kube-system"}, {"dbmtls.io/inject": "true"}, []),
        ({"kubernetes.io/metadata.name": "dbmtls-system", "dbmtls.io/inject": "enabled"}, {}, []),
    ],
)
def test_each_pod_reaches_the_webhook_at_most_once(
    built: dict[str, list[Obj]], ns_labels: dict[str, str], pod_labels: dict[str, str], expected: list[str]
) -> None:
    cfg = one(built["base"], "MutatingWebhookConfiguration")
    called = [
        w["name"]
        for w in cfg["webhooks"]
        if selector_matches(w.get("namespaceSelector"), {"kubernetes.io/metadata.name": "app", **ns_labels})
        and selector_matches(w.get("objectSelector"), pod_labels)
    ]
    assert called == expected


def test_the_webhook_never_sends_its_own_pods_to_itself(built: dict[str, list[Obj]]) -> None:
    ns = one(built["base"], "Namespace")
    assert ns["metadata"]["labels"]["dbmtls.io/inject"] == "disabled"
    labels = one(built["base"], "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["dbmtls.io/inject"] == "false"


# --- monitoring --------------------------------------------------------------------------------------


def _sidecar_metric_names() -> set[str]:
    """Every sample name the sidecar's /metrics can carry (families render even when empty)."""
    text = render(make_registry(SimpleNamespace(runtimes={}, reload_counts={}))).decode()
    return _sample_names(text)


def _sample_names(text: str) -> set[str]:
    names: set[str] = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = m.groups()
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


# The webhook's metrics as src/dbmtls/k8s/webhook.py renders them; checked against the module
# itself where it is importable (its extras installed).
WEBHOOK_METRICS = {
    "dbmtls_webhook_requests_total",
    "dbmtls_webhook_http_errors_total",
    "dbmtls_webhook_request_duration_seconds_bucket",
    "dbmtls_webhook_request_duration_seconds_sum",
    "dbmtls_webhook_request_duration_seconds_count",
    "dbmtls_webhook_destination_rules",
    "dbmtls_webhook_certificate_reloads_total",
    "dbmtls_webhook_certificate_expiry_timestamp_seconds",
}
# Not ours: the API server's admission metrics and Prometheus's own `up`.
EXTERNAL_METRICS = {
    "up",
    "apiserver_admission_webhook_rejection_count",
    "apiserver_admission_webhook_admission_duration_seconds_bucket",
}


def _webhook_metric_names() -> set[str] | None:
    """What the webhook module renders, or None where it is not importable."""
    webhook = _webhook_module()
    if webhook is None:
        return None
    cert = SimpleNamespace(reloads={"success": 0, "failure": 0}, current=None)
    metrics = webhook.WebhookMetrics(webhook.Mesh(), cert)
    return _sample_names(metrics.render().decode())


def test_alerts_use_metric_names_that_exist(built: dict[str, list[Obj]]) -> None:
    rule = one(built["monitoring"], "PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    # metric names: ours and the API server's by prefix, `up` by its selector; not inside
    # string literals (label values such as error_type="apiserver_internal_error")
    bare = [re.sub(r'"(?:\\.|[^"\\])*"', '""', e) for e in exprs]
    used = {n for e in bare for n in re.findall(r"\b(?:dbmtls|apiserver)_[a-z0-9_]+\b|\bup(?=\{)", e)}
    sidecar, webhook_names = _sidecar_metric_names(), _webhook_metric_names()
    if webhook_names is not None:
        assert webhook_names >= WEBHOOK_METRICS
    unknown = used - sidecar - WEBHOOK_METRICS - EXTERNAL_METRICS
    assert unknown == set()
    # and the alerts the design asks for are there
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "DbmtlsClientCertificateExpiringSoon",
        "DbmtlsCertificateReloadFailing",
        "DbmtlsSidecarNotReady",
        "DbmtlsWebhookDown",
        "DbmtlsWebhookCallsFailing",
        "DbmtlsWebhookErrors",
    } <= alerts
    assert "dbmtls_certificate_not_after_timestamp_seconds" in used
    assert "dbmtls_certificate_reloads_total" in used


def test_pod_monitor_scrapes_the_sidecar_health_port(built: dict[str, list[Obj]]) -> None:
    pm = one(built["monitoring"], "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == HEALTH_PORT_NAME
    assert pm["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    sm = one(built["monitoring"], "ServiceMonitor")
    tls = sm["spec"]["endpoints"][0]["tlsConfig"]
    assert tls["serverName"] in one(built["base"], "Certificate", "dbmtls-webhook-tls")["spec"]["dnsNames"]


# --- the example ---------------------------------------------------------------------------------------


def test_example_client_opts_in_and_its_rule_selects_it(built: dict[str, list[Obj]]) -> None:
    objs = built["examples/redis-mtls"]
    dep = one(objs, "Deployment", "redis-client")
    meta = dep["spec"]["template"]["metadata"]
    assert meta["labels"]["dbmtls.io/inject"] == "true" and meta["annotations"]["dbmtls.io/inject"] == "true"
    found = pod_spec(dep)
    assert found is not None
    [app] = found[1]["containers"]
    assert "redis-cli -h foo-redis-master SET foo bar" in " ".join(app["args"])
    assert not any("--tls" in a for a in app.get("args", []) + app.get("command", []))
    rule = one(objs, "DestinationRule", "db-mtls")
    assert rule["spec"]["host"] == "foo-redis-master"
    assert rule["spec"]["workloadSelector"]["matchLabels"].items() <= meta["labels"].items()
    assert rule["spec"]["trafficPolicy"]["tls"] == {"mode": "MUTUAL", "credentialName": "jinsu-tls"}
    client = one(objs, "Certificate", "jinsu")["spec"]
    assert (client["secretName"], client["commonName"]) == ("jinsu-tls", "jinsu")
    assert {o["metadata"].get("namespace") for o in objs} == {None, "istio-redis-mtls"}


def test_example_certificates_are_what_the_command_prints() -> None:
    text = (DEPLOY / "examples/redis-mtls/certificates.yaml").read_text()
    opts = K8sCerts(
        namespace="istio-redis-mtls", server="foo-redis-master", headless=("foo-redis-headless",), clients=("jinsu",)
    )
    # regenerate with the command in the file's first line when this fails
    assert text == render_certs(opts)


def test_example_server_certificate_covers_what_the_bitnami_chart_uses(built: dict[str, list[Obj]]) -> None:
    spec = one(built["examples/redis-mtls"], "Certificate", "foo-redis-master")["spec"]
    values = yaml.safe_load((DEPLOY / "examples/redis-mtls/redis-values.yaml").read_text())
    assert values["tls"]["existingSecret"] == spec["secretName"]
    assert values["tls"]["authClients"] is True
    names = set(spec["dnsNames"])
    # the names of the seed's hand-written list that a verifier can match, and more
    for n in (
        "foo-redis-master",
        "foo-redis-master.istio-redis-mtls",
        "foo-redis-master.istio-redis-mtls.svc.cluster.local",
        "foo-redis-headless.istio-redis-mtls.svc.cluster.local",
        "*.foo-redis-headless.istio-redis-mtls.svc.cluster.local",
        "localhost",
    ):
        assert n in names
    assert "127.0.0.1" not in names and "127.0.0.1" in spec["ipAddresses"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "legacy"])
def test_the_example_through_the_real_injector(built: dict[str, list[Obj]], native: bool) -> None:
    """What the webhook would make of the example's client: every check passes on it too."""
    objs = built["examples/redis-mtls"]
    injected = inject_documents(copy.deepcopy(objs), [], InjectOptions(native_sidecar=native))
    dep = one(injected, "Deployment", "redis-client")
    assert dep != one(objs, "Deployment", "redis-client")
    validate_object(dep)
    assert cross_object_checks(injected) == []
    found = pod_spec(dep)
    assert found is not None
    spec = found[1]
    sidecar = (spec["initContainers"] if native else spec["containers"])[0]
    assert sidecar["name"] == "dbmtls"
    # the PodMonitor scrapes the port the injector really names
    ports = {p["name"] for p in sidecar["ports"]}
    assert one(built["monitoring"], "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] in ports
    # the client certificate's Secret is what the sidecar mounts, and only the sidecar
    client_secret = one(objs, "Certificate", "jinsu")["spec"]["secretName"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    [mount] = [m for m in sidecar["volumeMounts"] if volumes[m["name"]].get("secret")]
    assert volumes[mount["name"]]["secret"]["secretName"] == client_secret
    app = next(c for c in spec["containers"] if c["name"] == "redis-cli")
    assert "volumeMounts" not in app
    # the name the app uses points at the sidecar
    assert any("foo-redis-master" in a["hostnames"] for a in spec["hostAliases"])
