"""Kubernetes service names: what a DestinationRule host means, and every name an app may use.

A pod reaches a Service ``foo`` in namespace ``ns`` as ``foo`` (only from inside ``ns``: the
short name goes through the pod's DNS search list, which starts with its own namespace),
``foo.ns``, ``foo.ns.svc`` and ``foo.ns.svc.<cluster domain>``.  A DestinationRule's short
host is read in the rule's own namespace, as Istio does (docs/kubernetes.md#names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class ServiceName:
    """A host as the cluster resolves it.  ``namespace`` is None for names outside the cluster."""

    host: str  # as written in the rule
    name: str
    namespace: str | None
    cluster_domain: str

    @property
    def fqdn(self) -> str:
        if self.namespace is None:
            return self.host
        return f"{self.name}.{self.namespace}.svc.{self.cluster_domain}"

    def aliases(self, pod_namespace: str) -> list[str]:
        """Every spelling an app in ``pod_namespace`` may use for this service."""
        if self.namespace is None:
            return [self.host]
        ns = self.namespace
        names = [f"{self.name}.{ns}", f"{self.name}.{ns}.svc", self.fqdn]
        if ns == pod_namespace:
            names.insert(0, self.name)
        return names


def service_name(host: str, rule_namespace: str, cluster_domain: str) -> ServiceName:
    """``host`` of a rule in ``rule_namespace``: ``foo``, ``foo.ns``, ``foo.ns.svc[.domain]`` or external."""
    host = host.lower().rstrip(".")
    parts = host.split(".")
    suffix = f".svc.{cluster_domain}"
    if len(parts) == 1:
        return ServiceName(host, host, rule_namespace, cluster_domain)
    if host.endswith(suffix) and len(parts) == 2 + len(suffix.split(".")) - 1:
        return ServiceName(host, parts[0], parts[1], cluster_domain)
    if len(parts) == 3 and parts[2] == "svc":
        return ServiceName(host, parts[0], parts[1], cluster_domain)
    if len(parts) == 2 and DNS1123_LABEL.match(parts[1]) and parts[1] not in _TOP_LEVEL_HINTS:
        # "foo.ns": how apps name a service of another namespace; a real domain has a TLD
        return ServiceName(host, parts[0], parts[1], cluster_domain)
    return ServiceName(host, host, None, cluster_domain)


# Two-label names that are domains, not "service.namespace": enough to keep "db.example" or
# "redis.internal" out of the cluster's naming (a namespace is rarely called "com").
_TOP_LEVEL_HINTS = frozenset({"com", "net", "org", "io", "dev", "cloud", "internal", "local", "example", "test"})
