"""tests/support/kube.py catches what it claims to catch (a checker that passes everything
would make every test that uses it pass too)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from support.kube import (
    api_server_checks,
    cross_object_checks,
    kubectl,
    parse_quantity,
    pod_spec,
    validate_object,
)

Obj = dict[str, Any]


def pod() -> Obj:
    """A pod with a native sidecar, as the injector makes them (the shape, not the content)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "namespace": "prod", "labels": {"app": "web"}},
        "spec": {
            "initContainers": [
                {
                    "name": "dbmtls",
                    "image": "dbmtls:0.1.0",
                    "restartPolicy": "Always",
                    "ports": [{"name": "dbmtls-health", "containerPort": 15021}],
                    "startupProbe": {"httpGet": {"path": "/readyz", "port": "dbmtls-health"}},
                    "env": [{"name": "DBMTLS_CONFIG", "value": "databases: []"}],
                    "volumeMounts": [
                        {"name": "dbmtls-cred-jinsu-tls", "mountPath": "/var/run/secrets/x", "readOnly": True}
                    ],
                }
            ],
            "containers": [{"name": "app", "image": "redis:7", "ports": [{"name": "http", "containerPort": 8080}]}],
            "volumes": [{"name": "dbmtls-cred-jinsu-tls", "secret": {"secretName": "jinsu-tls"}}],
            "hostAliases": [{"ip": "127.0.0.1", "hostnames": ["foo-redis-master", "foo-redis-master.prod"]}],
        },
    }


def wrap(kind: str, p: Obj) -> Obj:
    template: Obj = {"metadata": {"labels": p["metadata"]["labels"]}, "spec": p["spec"]}
    selector = {"matchLabels": p["metadata"]["labels"]}
    meta = {"name": "w", "namespace": "prod"}
    if kind == "Pod":
        return p
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        spec: Obj = {"selector": selector, "template": template}
        if kind == "StatefulSet":
            spec["serviceName"] = "w"
        return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": spec}
    template["spec"] = template["spec"] | {"restartPolicy": "Never"}
    if kind == "Job":
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {"template": template}}
    assert kind == "CronJob"
    job = {"template": template}
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": meta,
        "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": job}},
    }


KINDS = ("Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")


@pytest.mark.parametrize("kind", KINDS)
def test_a_good_workload_of_every_kind_passes(kind: str) -> None:
    obj = wrap(kind, pod())
    validate_object(obj)
    found = pod_spec(obj)
    assert found is not None and found[1]["initContainers"][0]["name"] == "dbmtls"


def _spec(obj: Obj) -> Obj:
    found = pod_spec(obj)
    assert found is not None
    return found[1]


Mutation = Callable[[Obj], None]

MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "duplicate container name": (
        lambda s: s["containers"].__setitem__(0, s["containers"][0] | {"name": "dbmtls"}),
        "container name 'dbmtls' is used twice",
    ),
    "mount without volume": (lambda s: s["volumes"].clear(), "names no volume of the pod"),
    "subPath on a secret": (
        lambda s: s["initContainers"][0]["volumeMounts"][0].__setitem__("subPath", "tls.crt"),
        "mounts a Secret with subPath",
    ),
    "startupProbe on a plain init container": (
        lambda s: s["initContainers"][0].pop("restartPolicy"),
        "startupProbe is allowed on an init container only with restartPolicy: Always",
    ),
    "restartPolicy on a regular container": (
        lambda s: s["containers"][0].__setitem__("restartPolicy", "Always"),
        "restartPolicy on a regular container is not allowed",
    ),
    "port name too long": (
        lambda s: s["containers"][0]["ports"][0].__setitem__("name", "a-sixteen-chars1"),
        "is not an IANA service name",
    ),
    "port name used by two containers": (
        lambda s: s["containers"][0]["ports"][0].__setitem__("name", "dbmtls-health"),
        "port name 'dbmtls-health' is also used by container 'dbmtls'",
    ),
    "port number used by two containers": (
        lambda s: s["containers"][0]["ports"][0].__setitem__("containerPort", 15021),
        "containerPort 15021/TCP is also declared",
    ),
    "probe on a missing port name": (
        lambda s: s["initContainers"][0]["startupProbe"]["httpGet"].__setitem__("port", "health"),
        "httpGet port 'health' names no port of this container",
    ),
    "invalid env name": (
        lambda s: s["initContainers"][0]["env"].append({"name": "9LIVES", "value": "x"}),
        "env name '9LIVES' is not valid in Kubernetes 1.29.0",
    ),
    "env twice": (
        lambda s: s["initContainers"][0]["env"].append({"name": "DBMTLS_CONFIG", "value": "x"}),
        "env 'DBMTLS_CONFIG' is set twice",
    ),
    "request above limit": (
        lambda s: s["containers"][0].__setitem__(
            "resources", {"requests": {"memory": "1Gi"}, "limits": {"memory": "128Mi"}}
        ),
        "request memory=1Gi exceeds limit 128Mi",
    ),
    "bad hostAliases ip": (
        lambda s: s["hostAliases"][0].__setitem__("ip", "localhost"),
        "hostAliases ip 'localhost' is not an IP address",
    ),
    "bad hostAliases name": (
        lambda s: s["hostAliases"][0]["hostnames"].append("Foo_Bar"),
        "hostAliases hostname 'Foo_Bar'",
    ),
    "unknown field (schema)": (
        lambda s: s["containers"][0].__setitem__("imagePullPolicyy", "Always"),
        "'imagePullPolicyy' was unexpected",
    ),
}


@pytest.mark.parametrize("kind", ["Pod", "Deployment", "CronJob"])
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_mistake_is_caught_in_every_workload_kind(kind: str, mutation: str) -> None:
    obj = wrap(kind, pod())
    change, message = MUTATIONS[mutation]
    change(_spec(obj))
    with pytest.raises(AssertionError, match=re.escape(message)):
        validate_object(obj)


def test_native_sidecars_need_1_29_and_env_names_relax_in_1_34() -> None:
    obj = pod()
    assert any("needs Kubernetes >= 1.29" in p for p in api_server_checks(obj, "1.28.0"))
    assert api_server_checks(obj, "1.29.0") == []
    _spec(obj)["initContainers"][0]["env"].append({"name": "my var", "value": "x"})
    assert any("'my var'" in p for p in api_server_checks(obj, "1.33.0"))
    assert api_server_checks(obj, "1.34.0") == []


def test_job_restart_policy_and_deployment_selector() -> None:
    job = wrap("Job", pod())
    _spec(job)["restartPolicy"] = "Always"
    assert any("restartPolicy 'Always' is not allowed for a Job" in p for p in api_server_checks(job))
    dep = wrap("Deployment", pod())
    dep["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    assert any("does not match the pod template's labels" in p for p in api_server_checks(dep))


def test_cross_object_references() -> None:
    dep = wrap("Deployment", pod())
    svc: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "prod"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "jinsu-tls", "namespace": "prod"}}
    assert cross_object_checks([dep, svc, secret]) == []
    assert cross_object_checks([dep, svc]) == [
        "Deployment prod/w: volume 'dbmtls-cred-jinsu-tls': Secret jinsu-tls is not written here"
    ]
    bad = copy.deepcopy(svc)
    bad["spec"]["ports"][0]["targetPort"] = 9090
    assert cross_object_checks([dep, bad, secret]) == [
        "Service prod/web: targetPort 9090 is no container port of Deployment prod/w"
    ]


def test_quantities() -> None:
    assert parse_quantity("100m") == Decimal("0.1")
    assert parse_quantity("64Mi") == 64 * 2**20
    assert parse_quantity("1e3") == 1000
    assert parse_quantity(2) == 2
    for bad in ("64MB", "", "1.2.3", True):
        with pytest.raises(ValueError, match="not a quantity"):
            parse_quantity(bad)


def test_kubectl_is_found() -> None:
    assert kubectl().endswith("kubectl")
