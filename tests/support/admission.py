"""AdmissionReviews as the API server sends them, and an HTTPS client for the webhook.

``pod()`` is a Pod as a ReplicaSet controller creates it and as the webhook sees it: after
defaulting and after the built-in ServiceAccount admission plugin added the projected
``kube-api-access-*`` volume, with ``generateName``, ``ownerReferences`` and no ``name``.
"""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import jsonpatch

from dbmtls.k8s.inject import InjectError, InjectOptions, inject_object
from dbmtls.k8s.webhook import IDLE_TIMEOUT, Inject, Mesh, ServingCertificate, WebhookServer, decode_patch

T = TypeVar("T")

NAMESPACE = "shop"


def pod(*, opt_in: bool = True, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    labels = {"app": "orders", "pod-template-hash": "7c9d8f6b5"}
    if opt_in:
        labels["dbmtls.io/inject"] = "true"
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "orders-7c9d8f6b5-",
            "namespace": NAMESPACE,
            "creationTimestamp": None,
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-28T04:00:00Z", **(annotations or {})},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "orders-7c9d8f6b5",
                    "uid": "0d1f7c62-6a43-4f4e-9a55-1b1e2f9d8c10",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-11-28T04:00:01Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:generateName": {}}},
                }
            ],
        },
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": "orders-config", "defaultMode": 420}},
                {
                    "name": "kube-api-access-x7k2q",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                            {
                                "downwardAPI": {
                                    "items": [
                                        {
                                            "path": "namespace",
                                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                                        }
                                    ]
                                }
                            },
                        ],
                        "defaultMode": 420,
                    },
                },
            ],
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/orders:1.4.2",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "DATABASE_URL", "value": "postgres://orders@orders-db:5432/orders"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/orders", "readOnly": True},
                        {
                            "name": "kube-api-access-x7k2q",
                            "readOnly": True,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        },
                    ],
                    "readinessProbe": {
                        "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                        "timeoutSeconds": 1,
                        "periodSeconds": 10,
                        "successThreshold": 1,
                        "failureThreshold": 3,
                    },
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "orders",
            "serviceAccount": "orders",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {},
    }


def review(
    obj: dict[str, Any] | None,
    *,
    operation: str = "CREATE",
    kind: str = "Pod",
    group: str = "",
    resource: str = "pods",
    sub_resource: str | None = None,
    uid: str | None = None,
) -> dict[str, Any]:
    """An AdmissionReview request exactly as kube-apiserver sends it (a ReplicaSet controller's Pod)."""
    gvk = {"group": group, "version": "v1", "kind": kind}
    gvr = {"group": group, "version": "v1", "resource": resource}
    request: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": gvk,
        "resource": gvr,
        "requestKind": gvk,
        "requestResource": gvr,
        "namespace": NAMESPACE,
        "operation": operation,
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": "5b9f0c1e-2a6d-4c3b-8e7f-0a1b2c3d4e5f",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
        },
        "object": obj,
        "oldObject": copy.deepcopy(obj) if operation == "UPDATE" else None,
        "dryRun": False,
        "options": {
            "kind": "CreateOptions" if operation == "CREATE" else "UpdateOptions",
            "apiVersion": "meta.k8s.io/v1",
            "fieldManager": "kube-controller-manager",
        },
    }
    if sub_resource:
        request["subResource"] = sub_resource
    return {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request}


SIDECAR = {
    "name": "dbmtls",
    "image": "dbmtls:test",
    "restartPolicy": "Always",
    "args": ["run", "-c", "env:DBMTLS_CONFIG", "--log-format", "json"],
    "env": [{"name": "DBMTLS_CONFIG", "value": "databases: []\n"}],
}


def adding_inject(obj: Any, mesh: Any, options: InjectOptions, *, namespace: str | None = None) -> Any:
    """A stand-in for ``inject_object`` with its contract: adds a native sidecar when opted in, once."""
    out = copy.deepcopy(obj)
    meta = out.setdefault("metadata", {})
    if meta.get("labels", {}).get("dbmtls.io/inject") != "true" and not options.namespace_default:
        return out
    if "dbmtls.io/status" in meta.get("annotations", {}):
        return out
    out["spec"].setdefault("initContainers", []).insert(0, dict(SIDECAR, image=options.image))
    meta.setdefault("annotations", {})["dbmtls.io/status"] = json.dumps(
        {"container": "dbmtls", "namespace": namespace, "rules": len(mesh)}
    )
    return out


def refusing_inject(obj: Any, mesh: Any, options: InjectOptions, *, namespace: str | None = None) -> Any:
    raise InjectError("pod shop/orders-7c9d8f6b5-*: no DestinationRule for host orders-db (annotation dbmtls.io/hosts)")


def broken_inject(obj: Any, mesh: Any, options: InjectOptions, *, namespace: str | None = None) -> Any:
    raise RuntimeError("injector bug")


def apply_answer(obj: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """What the API server does with the webhook's answer: apply its JSONPatch (if any)."""
    ops = decode_patch(answer)
    if ops is None:
        return copy.deepcopy(obj)
    assert answer["response"]["patchType"] == "JSONPatch"
    result: dict[str, Any] = jsonpatch.apply_patch(obj, ops)
    return result


# --- HTTPS -------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def client_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def post(
    port: int,
    ca_file: str,
    body: bytes | dict[str, Any],
    *,
    path: str = "/inject",
    content_type: str | None = "application/json",
    method: str = "POST",
) -> Reply:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPSConnection("localhost", port, context=client_context(ca_file), timeout=10)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def get(port: int, ca_file: str, path: str) -> Reply:
    return post(port, ca_file, b"", path=path, content_type=None, method="GET")


def serving_serial(port: int, ca_file: str, *, sni: bool = True) -> int:
    """The serial number of the certificate the server presents in a new handshake (``sni``: send a name)."""
    from cryptography import x509

    ctx = client_context(ca_file)
    if not sni:
        ctx.check_hostname = False  # an address, as a webhook configured by IP is reached: no SNI
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost" if sni else None) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# --- a webhook server in a thread of its own ------------------------------------------------------


class RunningWebhook:
    """``WebhookServer`` on its own event loop thread, for tests that talk to it with blocking clients."""

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        *,
        mesh: Mesh | None = None,
        inject: Inject = inject_object,
        options: InjectOptions | None = None,
        poll: float = 0.05,
        idle_timeout: float = IDLE_TIMEOUT,
        ca_file: str = "",
    ) -> None:
        self.ca_file = ca_file  # what clients trust to reach it (for the tests' convenience)
        self.cert = ServingCertificate(cert_file, key_file)
        self.mesh = mesh or Mesh()
        self.inject = inject
        self.options = options or InjectOptions(image="dbmtls:test")
        self.poll = poll
        self.idle_timeout = idle_timeout
        self.server: WebhookServer | None = None
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.cert.load()
        self.server = WebhookServer(
            "127.0.0.1:0", self.cert, self.mesh, self.options, inject=self.inject, idle_timeout=self.idle_timeout
        )
        await self.server.start()
        self.cert.start(self.poll)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.stop(grace=1.0)
            await self.cert.stop()

    def __enter__(self) -> RunningWebhook:
        self._thread.start()
        if not self._ready.wait(timeout=10) or self._error is not None:
            raise AssertionError(f"the webhook did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        self.loop.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (to read or change its state safely)."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.ports[0]
