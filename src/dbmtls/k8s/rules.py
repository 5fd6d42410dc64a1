"""Which DestinationRules apply to a pod, and what they mean inside the pod.

Istio's rules for a client workload (docs/kubernetes.md#which-rules-apply):

* a rule with a ``workloadSelector`` applies only to pods of its own namespace whose labels
  include every ``matchLabels`` entry;
* a rule without one applies to every pod of its namespace, and to pods of other namespaces
  it is exported to (``exportTo`` absent or ``*``: everywhere; ``.``: its own namespace only);
* when several rules name the same host, the one with a selector wins, then the one in the
  pod's namespace, then the oldest (``metadata.creationTimestamp``, then input order).

A rule given without a namespace (``kubectl apply -n`` style) counts as one of the pod's
namespace.  A rule that carries no TLS settings at all is about load balancing or the like,
not about dbmtls: it is left out, and said so in the log.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dbmtls.k8s.names import ServiceName, service_name

CREDENTIALS_DIR = "/var/run/secrets/dbmtls/credentials"


@dataclass(frozen=True)
class AppliedRule:
    doc: dict[str, Any]  # the rule, with credentialName turned into file paths
    namespace: str
    service: ServiceName
    credentials: tuple[str, ...]  # Secret names to mount into the sidecar


def _meta(doc: dict[str, Any]) -> dict[str, Any]:
    meta = doc.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _has_tls(spec: dict[str, Any]) -> bool:
    policy = spec.get("trafficPolicy")
    if not isinstance(policy, dict):
        return False
    if policy.get("tls") is not None:
        return True
    return any(isinstance(p, dict) and p.get("tls") is not None for p in policy.get("portLevelSettings") or [])


def _selects(rule: dict[str, Any], rule_ns: str, pod_ns: str, pod_labels: dict[str, str]) -> int | None:
    """Priority of ``rule`` for this pod (lower wins), or None when it does not apply."""
    spec = rule.get("spec")
    if not isinstance(spec, dict):
        return None
    selector = spec.get("workloadSelector")
    if isinstance(selector, dict):
        if rule_ns != pod_ns:
            return None
        wanted = selector.get("matchLabels") or {}
        if not isinstance(wanted, dict) or any(pod_labels.get(str(k)) != str(v) for k, v in wanted.items()):
            return None
        return 0
    if rule_ns == pod_ns:
        return 1
    export = spec.get("exportTo")
    if export is None or "*" in export or pod_ns in export:
        return 2
    return None


def applicable_rules(
    mesh: Sequence[dict[str, Any]], pod_ns: str, pod_labels: dict[str, str], cluster_domain: str
) -> tuple[list[AppliedRule], list[str]]:
    """The rules that configure this pod's sidecar, one per host, and notes on the ones left out."""
    candidates: list[tuple[int, str, int, dict[str, Any], str, ServiceName]] = []
    notes: list[str] = []
    for order, rule in enumerate(mesh):
        if not isinstance(rule, dict) or rule.get("kind") != "DestinationRule":
            continue
        rule_ns = str(_meta(rule).get("namespace") or pod_ns)
        priority = _selects(rule, rule_ns, pod_ns, pod_labels)
        if priority is None:
            continue
        spec = rule["spec"]
        host = spec.get("host")
        name = _meta(rule).get("name", "?")
        if not isinstance(host, str) or not host:
            continue  # the config loader reports it when the rule is compiled
        if not _has_tls(spec):
            notes.append(f"DestinationRule {rule_ns}/{name} has no TLS settings: not used by dbmtls")
            continue
        created = str(_meta(rule).get("creationTimestamp") or "")
        svc = service_name(host, rule_ns, cluster_domain)
        candidates.append((priority, created or "~", order, rule, rule_ns, svc))

    chosen: dict[str, tuple[int, str, int, dict[str, Any], str, ServiceName]] = {}
    for cand in sorted(candidates, key=lambda c: (c[0], c[1], c[2])):
        fqdn = cand[5].fqdn
        if fqdn in chosen:
            winner = chosen[fqdn]
            notes.append(
                f"DestinationRule {cand[4]}/{_meta(cand[3]).get('name')} for {fqdn} is shadowed by "
                f"{winner[4]}/{_meta(winner[3]).get('name')} (Istio's precedence)"
            )
            continue
        chosen[fqdn] = cand
    applied = []
    for _p, _c, _order, rule, rule_ns, svc in sorted(chosen.values(), key=lambda c: c[2]):
        doc, secrets = _with_credential_files(rule)
        applied.append(AppliedRule(doc, rule_ns, svc, secrets))
    return applied, notes


def credential_dir(secret: str) -> str:
    return f"{CREDENTIALS_DIR}/{secret}"


def _tls_blocks(spec: dict[str, Any]) -> list[dict[str, Any]]:
    policy = spec.get("trafficPolicy")
    if not isinstance(policy, dict):
        return []
    blocks = [policy.get("tls")]
    blocks += [p.get("tls") for p in policy.get("portLevelSettings") or [] if isinstance(p, dict)]
    return [b for b in blocks if isinstance(b, dict)]


def _with_credential_files(rule: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``credentialName: S`` -> the files of Secret S, mounted by the injector at ``credential_dir(S)``.

    The Secret is read in cert-manager's (and ``kubernetes.io/tls``'s) layout: ``tls.crt``,
    ``tls.key`` and ``ca.crt``.  As in Istio, with SIMPLE the Secret only supplies the CA.
    File paths written next to ``credentialName`` are an error in Istio, and stay one: the
    config loader reports them, because the name is left in place in that case.
    """
    doc = copy.deepcopy(rule)
    secrets: list[str] = []
    for tls in _tls_blocks(doc["spec"]):
        secret = tls.get("credentialName")
        if not isinstance(secret, str) or not secret:
            continue
        if any(k in tls for k in ("clientCertificate", "privateKey", "caCertificates")):
            continue  # both ways at once: the loader's error names the field
        base = credential_dir(secret)
        del tls["credentialName"]
        if tls.get("mode") == "MUTUAL":
            tls["clientCertificate"] = f"{base}/tls.crt"
            tls["privateKey"] = f"{base}/tls.key"
        tls["caCertificates"] = f"{base}/ca.crt"
        if secret not in secrets:
            secrets.append(secret)
    return doc, tuple(secrets)
