"""The container, volumes and probes the injector adds: one place for what a sidecar looks like.

Why each setting is what it is: docs/kubernetes.md#the-sidecar.
"""

from __future__ import annotations

from typing import Any

CONTAINER = "dbmtls"
HEALTH_PORT = 15021  # admin.publicListen: read-only /healthz, /readyz, /metrics on the pod IP
HEALTH_PORT_NAME = "dbmtls-health"
ADMIN_LISTEN = "127.0.0.1:15000"  # the full admin API, reachable from inside the pod only
CONFIG_ENV = "DBMTLS_CONFIG"
USER_CONFIG_DIR = "/etc/dbmtls/config"
USER_CONFIG_KEY = "dbmtls.yaml"
UID = 65532  # the image's non-root user ("nonroot" in distroless images)

# Resources: a relay's steady state is a few MB plus ~40 KB per connection (README, memory).
RESOURCE_ANNOTATIONS = {
    "dbmtls.io/proxyCPU": ("requests", "cpu", "10m"),
    "dbmtls.io/proxyMemory": ("requests", "memory", "32Mi"),
    "dbmtls.io/proxyCPULimit": ("limits", "cpu", None),
    "dbmtls.io/proxyMemoryLimit": ("limits", "memory", "128Mi"),
}


def resources(annotations: dict[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, (section, resource, default) in RESOURCE_ANNOTATIONS.items():
        value = annotations.get(key, default)
        if value:
            out.setdefault(section, {})[resource] = str(value)
    return out


def security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": HEALTH_PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 1,
    }


def container(
    *,
    image: str,
    args: list[str],
    config_yaml: str,
    mounts: list[dict[str, Any]],
    annotations: dict[str, str],
    native: bool,
) -> dict[str, Any]:
    """The sidecar container.  Native: an initContainer with restartPolicy Always (k8s >= 1.29)."""
    c: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "args": args,
        "env": [{"name": CONFIG_ENV, "value": config_yaml}],
        "ports": [{"name": HEALTH_PORT_NAME, "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "resources": resources(annotations),
        "securityContext": security_context(),
        "volumeMounts": mounts,
        # /readyz is 200 once every listener is bound and all certificates are loaded.
        "readinessProbe": _http_probe("/readyz", 5, 3),
        "livenessProbe": _http_probe("/healthz", 10, 3),
    }
    if native:
        c["restartPolicy"] = "Always"
        # The kubelet starts the next container only once this passes: the app never sees a
        # closed port.  120 s at 1 s covers a slow image pull of the certificates' Secret.
        c["startupProbe"] = _http_probe("/readyz", 1, 120)
    else:
        # Before native sidecars, the kubelet still starts containers in order and waits for a
        # postStart hook to finish before starting the next one: `dbmtls wait` holds the app
        # back until the proxy is ready (the trick Istio's holdApplicationUntilProxyStarts uses).
        c["lifecycle"] = {"postStart": {"exec": {"command": ["dbmtls", "wait", "--timeout", "120s"]}}}
    return c
