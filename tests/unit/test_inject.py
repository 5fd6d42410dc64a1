"""``dbmtls inject``: golden files, and what every injected pod must satisfy.

Each ``tests/k8s/golden/NAME.yaml`` is run through the real CLI and compared with
``NAME.injected.yaml``; a first line ``# options: ...`` gives extra CLI flags.  After a deliberate
change, regenerate with ``pytest tests/unit/test_inject.py --update-golden`` and review the diff.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from dbmtls.cli import main
from dbmtls.config.load import config_from_documents
from dbmtls.k8s.inject import STATUS, InjectError, InjectOptions, inject_documents, inject_object
from support.kube import pod_spec, validate_object

GOLDEN = Path(__file__).parent.parent / "k8s" / "golden"
CASES = sorted(p for p in GOLDEN.glob("*.yaml") if not p.name.endswith(".injected.yaml"))


def _options(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    return first.removeprefix("# options:").split() if first.startswith("# options:") else []


def _inject_cli(path: Path, *extra: str) -> str:
    result = CliRunner().invoke(main, ["inject", "-f", str(path), "--image", "dbmtls:test", *_options(path), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def _spec(obj: dict[str, Any]) -> dict[str, Any]:
    found = pod_spec(obj)
    assert found is not None, obj.get("kind")
    return found[1]


def _template(obj: dict[str, Any]) -> dict[str, Any]:
    return obj if obj["kind"] == "Pod" else _template_of(obj)


def _template_of(obj: dict[str, Any]) -> dict[str, Any]:
    node = obj["spec"]
    if obj["kind"] == "CronJob":
        node = node["jobTemplate"]["spec"]
    return dict(node["template"])


def _sidecar(obj: dict[str, Any]) -> dict[str, Any] | None:
    if pod_spec(obj) is None:
        return None
    spec = _spec(obj)
    for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
        if c["name"] == "dbmtls":
            return dict(c)
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden(case: Path, request: pytest.FixtureRequest) -> None:
    out = _inject_cli(case)
    expected = case.with_suffix(".injected.yaml")
    if request.config.getoption("--update-golden"):
        expected.write_text(out)
    assert expected.exists(), f"{expected.name} missing: run with --update-golden"
    assert out == expected.read_text()


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_injecting_twice_changes_nothing(case: Path, tmp_path: Path) -> None:
    once = tmp_path / "once.yaml"
    once.write_text(_inject_cli(case))
    assert _inject_cli(once) == once.read_text()


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_injected_objects_validate_and_run(case: Path) -> None:
    """Schema-valid at the versions the mode supports, API-server rules, and a config `run` accepts."""
    native = "--no-native-sidecar" not in _options(case)
    docs = [d for d in yaml.safe_load_all(_inject_cli(case)) if d]
    injected = 0
    for obj in docs:
        if obj.get("kind") == "DestinationRule":
            continue
        versions = ("1.29.0", "1.37.0") if native else ("1.25.0", "1.37.0")
        validate_object(obj, versions=versions)  # schema + what the API server checks beyond it
        side = _sidecar(obj)
        if side is None:
            continue
        injected += 1
        spec = _spec(obj)
        if native:
            assert spec["initContainers"][0]["name"] == "dbmtls"
            assert side["restartPolicy"] == "Always" and side["startupProbe"]["httpGet"]["path"] == "/readyz"
        else:
            assert spec["containers"][0]["name"] == "dbmtls"
            assert side["lifecycle"]["postStart"]["exec"]["command"][:2] == ["dbmtls", "wait"]
        sc = side["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]}
        assert not sc["allowPrivilegeEscalation"] and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        # certificates: read-only, never subPath, and only in the sidecar
        sidecar_volumes = {m["name"] for m in side["volumeMounts"]}
        for m in side["volumeMounts"]:
            assert m.get("readOnly") is True and "subPath" not in m
        for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
            if c["name"] != "dbmtls":
                assert not sidecar_volumes & {m["name"] for m in c.get("volumeMounts") or []}
        # the generated configuration is one `dbmtls run` accepts
        env = {e["name"]: e["value"] for e in side["env"]}
        config = config_from_documents([(yaml.safe_load(env["DBMTLS_CONFIG"]), "env")], "env")
        assert config.dns.mode == "direct"
        assert config.admin.publicListen == "0.0.0.0:15021"
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert config.drainTimeout == grace - 5
        # every database the app may name resolves, through hostAliases, to its listener
        ports = {db.listen for db in config.databases}
        for alias in spec.get("hostAliases") or []:
            assert any(listen.startswith(alias["ip"] + ":") for listen in ports)
        status = json.loads(_template(obj)["metadata"]["annotations"][STATUS])
        assert status["container"] == "dbmtls"
    assert injected, "no object was injected"


# --- decisions, one at a time -----------------------------------------------------------------

RULE: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "r", "namespace": "ns"},
    "spec": {"host": "foo-redis-master", "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "c"}}},
}


def _pod(annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "annotations": annotations or {}, "labels": labels or {}},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }


def test_hostaliases_cover_every_name_and_point_at_the_listener() -> None:
    out = inject_object(_pod({"dbmtls.io/inject": "true"}), [RULE], InjectOptions())
    (alias,) = out["spec"]["hostAliases"]
    assert alias == {
        "ip": "127.0.0.1",
        "hostnames": [
            "foo-redis-master",
            "foo-redis-master.ns",
            "foo-redis-master.ns.svc",
            "foo-redis-master.ns.svc.cluster.local",
        ],
    }
    env = out["spec"]["initContainers"][0]["env"][0]["value"]
    (db,) = yaml.safe_load(env)["databases"]
    assert db["listen"] == "127.0.0.1:6379"
    # the verified name stays the rule's host; the connection goes to the rule's namespace
    assert db["address"] == "foo-redis-master:6379"
    assert db["dial"] == "foo-redis-master.ns.svc.cluster.local.:6379"


def test_opt_out_wins_over_namespace_default_and_no_opinion_follows_it() -> None:
    options = InjectOptions(namespace_default=True)
    assert "initContainers" not in inject_object(_pod({"dbmtls.io/inject": "false"}), [RULE], options)["spec"]
    assert "initContainers" not in inject_object(_pod(labels={"dbmtls.io/inject": "false"}), [RULE], options)["spec"]
    assert inject_object(_pod(), [RULE], options)["spec"]["initContainers"][0]["name"] == "dbmtls"
    assert "initContainers" not in inject_object(_pod(), [RULE], InjectOptions())["spec"]


def test_the_input_is_never_modified() -> None:
    pod = _pod({"dbmtls.io/inject": "true"})
    before = json.dumps(pod, sort_keys=True)
    inject_object(pod, [RULE], InjectOptions())
    assert json.dumps(pod, sort_keys=True) == before


def test_a_rule_for_other_workloads_or_namespaces_does_not_apply() -> None:
    selected = {**RULE, "spec": {**RULE["spec"], "workloadSelector": {"matchLabels": {"app": "other"}}}}
    with pytest.raises(InjectError, match="no DestinationRule with TLS settings applies"):
        inject_object(_pod({"dbmtls.io/inject": "true"}, {"app": "mine"}), [selected], InjectOptions())
    private = {**RULE, "metadata": {"name": "r", "namespace": "elsewhere"}, "spec": {**RULE["spec"], "exportTo": ["."]}}
    with pytest.raises(InjectError, match="no DestinationRule"):
        inject_object(_pod({"dbmtls.io/inject": "true"}), [private], InjectOptions())


def test_a_selector_rule_wins_over_a_namespace_rule_for_the_same_host() -> None:
    wide = {**RULE, "metadata": {"name": "wide", "namespace": "ns"}}
    narrow = {
        **RULE,
        "metadata": {"name": "narrow", "namespace": "ns"},
        "spec": {
            "host": "foo-redis-master",
            "workloadSelector": {"matchLabels": {"app": "mine"}},
            "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "narrow-cert"}},
        },
    }
    out = inject_object(_pod({"dbmtls.io/inject": "true"}, {"app": "mine"}), [wide, narrow], InjectOptions())
    volumes = [v["secret"]["secretName"] for v in out["spec"]["volumes"]]
    assert volumes == ["narrow-cert"]


def test_a_certificate_outside_the_sidecars_volumes_is_an_error_naming_the_fix() -> None:
    rule = {
        **RULE,
        "spec": {
            "host": "foo-redis-master",
            "trafficPolicy": {
                "tls": {
                    "mode": "MUTUAL",
                    "clientCertificate": "/app-certs/tls.crt",
                    "privateKey": "/app-certs/tls.key",
                }
            },
        },
    }
    with pytest.raises(InjectError, match=r"/app-certs/tls.crt, which is on no volume of the sidecar.*credentialName"):
        inject_object(_pod({"dbmtls.io/inject": "true"}), [rule], InjectOptions())


def test_subpath_user_volume_mounts_are_refused() -> None:
    pod = _pod(
        {
            "dbmtls.io/inject": "true",
            "sidecar.istio.io/userVolume": '[{"name":"c","secret":{"secretName":"s"}}]',
            "sidecar.istio.io/userVolumeMount": '[{"name":"c","mountPath":"/c/tls.crt","subPath":"tls.crt"}]',
        }
    )
    with pytest.raises(InjectError, match="subPath"):
        inject_object(pod, [RULE], InjectOptions())


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"sidecar.istio.io/userVolume": "[{"}, "not valid JSON"),
        ({"sidecar.istio.io/userVolume": '["x"]'}, "JSON list of objects with a name"),
        ({"dbmtls.io/config": "databases: ["}, "neither a ConfigMap name nor valid YAML"),
        ({"dbmtls.io/config": "databases: [{name: x}]"}, "protocol"),
    ],
)
def test_bad_annotations_are_named(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(InjectError, match=message):
        inject_object(_pod({"dbmtls.io/inject": "true", **annotations}), [RULE], InjectOptions())


def test_a_rule_dbmtls_cannot_honour_blocks_injection_with_the_rules_own_error() -> None:
    rule = {**RULE, "spec": {"host": "foo-redis-master", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}}
    with pytest.raises(InjectError, match="ISTIO_MUTUAL"):
        inject_object(_pod({"dbmtls.io/inject": "true"}), [rule], InjectOptions())


def test_non_workloads_and_lists_pass_through() -> None:
    docs: list[Any] = [
        {"apiVersion": "v1", "kind": "List", "items": [_pod({"dbmtls.io/inject": "true"})]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}},
        "not even a mapping",
    ]
    out = inject_documents(docs, [RULE], InjectOptions())
    assert out[0]["items"][0]["spec"]["initContainers"][0]["name"] == "dbmtls"
    assert out[1:] == docs[1:]


def test_cli_reads_stdin_and_reports_errors_without_a_traceback() -> None:
    pod = yaml.safe_dump(_pod({"dbmtls.io/inject": "true"}))
    rule = yaml.safe_dump(RULE)
    ok = CliRunner().invoke(main, ["inject", "-f", "-"], input=pod + "---\n" + rule)
    assert ok.exit_code == 0, ok.output
    assert "restartPolicy: Always" in ok.output
    bad = CliRunner().invoke(main, ["inject", "-f", "-"], input=pod)
    assert bad.exit_code == 1
    assert "no DestinationRule with TLS settings applies" in bad.output
    assert "Traceback" not in bad.output


def test_credential_volume_names_are_valid_and_distinct() -> None:
    from dbmtls.k8s.inject import credential_volume
    from dbmtls.k8s.names import DNS1123_LABEL

    long_a, long_b = "a" * 60 + "-one", "a" * 60 + "-two"
    names = [credential_volume(s) for s in ("jinsu-tls", "jinsu.tls", long_a, long_b)]
    assert names[0] == "dbmtls-cred-jinsu-tls"
    assert all(len(n) <= 63 and DNS1123_LABEL.match(n) for n in names), names
    assert len(set(names)) == 4


def _pods_of(docs: list[Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, its pod template) for every document with a pod template."""
    return [(d, _template(d)) for d in docs if isinstance(d, dict) and pod_spec(d) is not None]


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_the_webhook_gives_each_pod_what_the_cli_gives_its_template(case: Path) -> None:
    """Both paths run one function: the Pod the API server would create equals the CLI's template.

    The webhook sees Pods, not their workloads, so a workload that opts in at its own level is
    sent with the opt-in label on the Pod (as a webhook user writes it; docs/kubernetes.md).
    """
    from dbmtls.k8s import webhook
    from support.admission import apply_answer, review

    inputs = [d for d in yaml.safe_load_all(case.read_text()) if d]
    expected = [d for d in yaml.safe_load_all(_inject_cli(case)) if d]
    mesh = [d for d in inputs if d.get("kind") == "DestinationRule"]
    options = InjectOptions(image="dbmtls:test", native_sidecar="--no-native-sidecar" not in _options(case))
    compared = 0
    for (obj, template), (_out, want) in zip(_pods_of(inputs), _pods_of(expected), strict=True):
        meta = copy.deepcopy(template.get("metadata") or {})
        obj_opt_in = {**(obj["metadata"].get("labels") or {}), **(obj["metadata"].get("annotations") or {})}
        if "dbmtls.io/inject" in obj_opt_in and obj is not template:
            meta.setdefault("labels", {}).setdefault("dbmtls.io/inject", obj_opt_in["dbmtls.io/inject"])
        labels = meta.get("labels") or {}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(template["spec"])}
        request = review(pod)["request"]
        request["namespace"] = obj["metadata"].get("namespace", "default")
        verdict = webhook.review(request, mesh, options)
        created = apply_answer(pod, verdict.review)
        want_meta = copy.deepcopy(want.get("metadata") or {})
        if labels.get("dbmtls.io/inject") is not None:
            want_meta.setdefault("labels", {}).setdefault("dbmtls.io/inject", labels["dbmtls.io/inject"])
        assert created["spec"] == want["spec"]
        assert created["metadata"] == want_meta
        compared += 1
    assert compared
