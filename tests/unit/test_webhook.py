"""The admission webhook over real HTTPS (the repo's dev PKI), in-process, in a thread of its own.

AdmissionReviews are built as kube-apiserver sends them (support/admission.py).  Two kinds of
injector behind the server:

* ``adding_inject``: a stand-in with the injector's contract (adds a native sidecar to a Pod
  that opts in, never twice), so that the patch path is exercised whatever the real
  function does today;
* the real ``inject_object``: asserted generically, so that the tests hold for any body the
  function gets: the patch applied to the Pod is exactly the function's result, and a Pod it
  leaves alone gets no patch at all.

Every patched Pod is validated against the Kubernetes 1.29 schema (strict: unknown fields
are errors), as the API server would after the webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client
import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbmtls.k8s import webhook as wh
from dbmtls.k8s.inject import InjectError, InjectOptions, inject_object
from dbmtls.k8s.webhook import CertificateError, Mesh, ServingCertificate, decode_patch, load_rule_files
from support import admission as adm
from support.admission import RunningWebhook, adding_inject, apply_answer, get, post, serving_serial
from support.certs import PKI, Pair
from support.k8s_secret import SecretDir

DEADLINE = 10.0
RULES_YAML = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: orders-db
  namespace: shop
  annotations: {dbmtls.io/protocol: postgres}
spec:
  host: orders-db.shop.svc.cluster.local
  trafficPolicy:
    tls: {mode: MUTUAL, credentialName: orders-db-client}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: v1
kind: List
items:
  - apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {name: cache, namespace: shop}
    spec:
      host: redis-master
      trafficPolicy: {tls: {mode: MUTUAL, credentialName: cache-client}}
  - apiVersion: v1
    kind: Service
    metadata: {name: ignored-too}
"""


def validate_pod(pod: dict[str, Any]) -> None:
    kubernetes_validate.validate(pod, "1.29", strict=True)


def metrics(hook: RunningWebhook) -> dict[str, float]:
    text = get(hook.port, hook_ca(hook), "/metrics").body.decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def hook_ca(hook: RunningWebhook) -> str:
    return hook.ca_file


@pytest.fixture
def rules(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES_YAML)
    return load_rule_files([str(path)])


def _start(pki: PKI, **kwargs: Any) -> RunningWebhook:
    return RunningWebhook(pki.server.cert, pki.server.key, ca_file=pki.ca_cert, **kwargs)


@pytest.fixture
def fake_hook(pki: PKI, rules: list[dict[str, Any]]) -> Iterator[RunningWebhook]:
    with _start(pki, mesh=Mesh(rules), inject=adding_inject) as hook:
        yield hook


@pytest.fixture
def real_hook(pki: PKI, rules: list[dict[str, Any]]) -> Iterator[RunningWebhook]:
    with _start(pki, mesh=Mesh(rules)) as hook:
        yield hook


def _admit(hook: RunningWebhook, review: dict[str, Any], path: str = "/inject") -> dict[str, Any]:
    reply = post(hook.port, hook_ca(hook), review, path=path)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    answer: dict[str, Any] = reply.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review["request"]["uid"]
    return answer


# --- the decision ------------------------------------------------------------------------------


def test_static_rules_files_keep_destination_rules_only(rules: list[dict[str, Any]]) -> None:
    assert [(r["apiVersion"], r["metadata"]["name"]) for r in rules] == [
        ("networking.istio.io/v1", "orders-db"),
        ("networking.istio.io/v1beta1", "cache"),  # from inside a kind: List
    ]


def test_an_opted_in_pod_gets_the_patch_that_makes_the_injected_pod(fake_hook: RunningWebhook) -> None:
    pod = adm.pod()
    answer = _admit(fake_hook, adm.review(pod))
    response = answer["response"]
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patched = apply_answer(pod, answer)
    expected = adding_inject(pod, fake_hook.mesh.rules(), fake_hook.options, namespace=adm.NAMESPACE)
    assert patched == expected
    assert patched["spec"]["initContainers"][0]["name"] == "dbmtls"
    # the injector got the request's namespace and the rules from the -f files
    assert json.loads(patched["metadata"]["annotations"]["dbmtls.io/status"]) == {
        "container": "dbmtls",
        "namespace": "shop",
        "rules": 2,
    }
    assert patched["spec"]["containers"] == pod["spec"]["containers"]  # the app is left alone
    validate_pod(patched)


def test_reinvocation_of_an_injected_pod_gives_no_patch(fake_hook: RunningWebhook) -> None:
    # reinvocationPolicy: IfNeeded sends the webhook its own output again: it must be a no-op
    pod = adm.pod()
    injected = apply_answer(pod, _admit(fake_hook, adm.review(pod)))
    again = _admit(fake_hook, adm.review(injected))
    assert again["response"] == {"uid": again["response"]["uid"], "allowed": True}
    assert "patch" not in again["response"] and "patchType" not in again["response"]


def test_a_pod_that_does_not_opt_in_gets_no_patch(fake_hook: RunningWebhook) -> None:
    pod = adm.pod(opt_in=False)
    answer = _admit(fake_hook, adm.review(pod))
    assert answer["response"] == {"uid": answer["response"]["uid"], "allowed": True}
    validate_pod(apply_answer(pod, answer))


@pytest.mark.parametrize(
    ("path", "injected"),
    [
        ("/inject", False),
        ("/inject/namespace-default", True),  # what a MutatingWebhookConfiguration can name
        ("/inject?namespaceDefault=true", True),
        ("/inject?namespaceDefault=false", False),
        ("/inject/namespace-default?namespaceDefault=false", False),
    ],
)
def test_the_namespace_entry_injects_pods_without_the_label(
    fake_hook: RunningWebhook, path: str, injected: bool
) -> None:
    pod = adm.pod(opt_in=False)
    answer = _admit(fake_hook, adm.review(pod), path=path)
    assert ("patch" in answer["response"]) == injected
    patched = apply_answer(pod, answer)
    assert bool(patched["spec"].get("initContainers")) == injected
    validate_pod(patched)


def test_bad_namespace_default_queries_are_refused(fake_hook: RunningWebhook) -> None:
    pod = adm.pod(opt_in=False)
    for bad in ("/inject?namespaceDefault=yes", "/inject?namespaceDefault=true&namespaceDefault=false", "/inject?x=1"):
        reply = post(fake_hook.port, hook_ca(fake_hook), adm.review(pod), path=bad)
        assert reply.status == 400, bad
        assert b"namespaceDefault" in reply.body or b"unknown query parameter" in reply.body


@pytest.mark.parametrize("opt_in", [True, False])
@pytest.mark.parametrize("namespace_default", [False, True])
def test_real_injector_patch_is_exactly_its_result(
    real_hook: RunningWebhook, rules: list[dict[str, Any]], opt_in: bool, namespace_default: bool
) -> None:
    pod = adm.pod(opt_in=opt_in)
    options = InjectOptions(image="dbmtls:test", namespace_default=namespace_default)
    path = f"/inject?namespaceDefault={str(namespace_default).lower()}"
    expected: Any
    try:
        expected = inject_object(copy.deepcopy(pod), rules, options, namespace=adm.NAMESPACE)
    except InjectError as exc:
        expected = exc
    if isinstance(expected, InjectError):  # the function refuses this pod: so must the webhook
        denied = _admit(real_hook, adm.review(pod), path=path)
        assert denied["response"]["allowed"] is False
        assert denied["response"]["status"]["message"] == expected.message
        return
    answer = _admit(real_hook, adm.review(pod), path=path)
    assert answer["response"]["allowed"] is True
    patched = apply_answer(pod, answer)
    assert patched == expected
    # with these rules the injector adds its sidecar exactly when the pod or its namespace opts in
    assert (expected != pod) == (opt_in or namespace_default)
    assert ("patch" in answer["response"]) == (expected != pod)  # unchanged: no patch fields at all
    validate_pod(patched)
    # and the result, sent again (reinvocation), is left as it is
    again = _admit(real_hook, adm.review(patched), path=path)
    assert "patch" not in again["response"]


def test_the_real_injectors_refusal_reaches_the_api_server(pki: PKI) -> None:
    # a rule for a host whose protocol nothing tells: the injector refuses, naming the fix
    unknown = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "orders-db", "namespace": "shop"},
        "spec": {"host": "orders-db", "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "c"}}},
    }
    pod = adm.pod()
    with pytest.raises(InjectError) as refused:
        inject_object(pod, [unknown], InjectOptions(), namespace=adm.NAMESPACE)
    with _start(pki, mesh=Mesh([unknown])) as hook:
        response = _admit(hook, adm.review(pod))["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    assert response["status"]["message"] == refused.value.message
    assert "dbmtls.io/protocol" in response["status"]["message"]


def test_an_inject_error_denies_with_422_and_the_message(pki: PKI) -> None:
    with _start(pki, inject=adm.refusing_inject) as hook:
        answer = _admit(hook, adm.review(adm.pod()))
        response = answer["response"]
        assert response["allowed"] is False
        assert "patch" not in response
        assert response["status"] == {
            "status": "Failure",
            "code": 422,
            "reason": "Invalid",
            "message": "pod shop/orders-7c9d8f6b5-*: no DestinationRule for host orders-db "
            "(annotation dbmtls.io/hosts)",
        }
        assert metrics(hook)["dbmtls_webhook_requests_total{result=denied}"] == 1


def test_an_injector_bug_denies_with_500_and_the_server_goes_on(pki: PKI) -> None:
    with _start(pki, inject=adm.broken_inject) as hook:
        for _ in range(2):
            response = _admit(hook, adm.review(adm.pod()))["response"]
            assert response["allowed"] is False
            assert response["status"]["code"] == 500
            assert "RuntimeError: injector bug" in response["status"]["message"]
        assert get(hook.port, pki.ca_cert, "/healthz").status == 200
        assert metrics(hook)["dbmtls_webhook_requests_total{result=error}"] == 2


@pytest.mark.parametrize(
    "review",
    [
        adm.review(adm.pod(), operation="UPDATE"),
        adm.review(adm.pod(), operation="DELETE"),
        adm.review(
            {"apiVersion": "apps/v1", "kind": "Deployment"}, kind="Deployment", group="apps", resource="deployments"
        ),
        adm.review(adm.pod(), sub_resource="ephemeralcontainers"),
        adm.review({"apiVersion": "v1", "kind": "Binding"}, kind="Binding", sub_resource="binding"),
    ],
    ids=["update", "delete", "deployment", "ephemeralcontainers", "binding"],
)
def test_anything_but_a_pod_create_is_allowed_untouched(pki: PKI, review: dict[str, Any]) -> None:
    # broken_inject proves the injector is not even called
    with _start(pki, inject=adm.broken_inject) as hook:
        answer = _admit(hook, review)
        assert answer["response"] == {"uid": review["request"]["uid"], "allowed": True}
        assert metrics(hook)["dbmtls_webhook_requests_total{result=skipped}"] == 1


# --- bad requests --------------------------------------------------------------------------------


def _review_text(**changes: Any) -> bytes:
    doc = adm.review(adm.pod())
    for key, value in changes.items():
        if key == "uid":
            if value is None:
                del doc["request"]["uid"]
            else:
                doc["request"]["uid"] = value
        elif value is None:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b'{"kind": "AdmissionReview", ', "application/json", 400, b"not JSON"),
        (b"\xff\xfe", "application/json", 400, b"not JSON"),
        (b"[1, 2]", "application/json", 400, b"not an AdmissionReview"),
        (_review_text(kind="Pod"), "application/json", 400, b"not an AdmissionReview"),
        (_review_text(apiVersion="admission.k8s.io/v1beta1"), "application/json", 400, b"must be admission.k8s.io/v1"),
        (_review_text(request=None), "application/json", 400, b"has no request"),
        (_review_text(uid=None), "application/json", 400, b"has no uid"),
        (_review_text(uid=""), "application/json", 400, b"has no uid"),
        (_review_text(), "text/plain", 415, b"Content-Type must be application/json"),
        (_review_text(), None, 415, b"Content-Type must be application/json"),
    ],
    ids=[
        "truncated",
        "not-utf8",
        "array",
        "wrong-kind",
        "v1beta1",
        "no-request",
        "no-uid",
        "empty-uid",
        "text",
        "no-type",
    ],
)
def test_bad_requests_get_a_clear_http_error(
    fake_hook: RunningWebhook, body: bytes, content_type: str | None, status: int, message: bytes
) -> None:
    reply = post(fake_hook.port, hook_ca(fake_hook), body, content_type=content_type)
    assert reply.status == status
    assert message in reply.body
    assert reply.headers["connection"] == "close"
    assert get(fake_hook.port, hook_ca(fake_hook), "/healthz").status == 200  # and it goes on serving


def test_charset_parameter_is_accepted(fake_hook: RunningWebhook) -> None:
    reply = post(fake_hook.port, hook_ca(fake_hook), _review_text(), content_type="application/json; charset=utf-8")
    assert reply.status == 200


def test_a_review_without_a_pod_is_refused_in_the_review(fake_hook: RunningWebhook) -> None:
    review = adm.review(None)
    answer = _admit(fake_hook, review)
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == 400
    assert "no Pod object" in answer["response"]["status"]["message"]


def test_methods_and_paths(fake_hook: RunningWebhook) -> None:
    ca = hook_ca(fake_hook)
    assert get(fake_hook.port, ca, "/inject").status == 405
    assert post(fake_hook.port, ca, b"x", path="/healthz", content_type="text/plain").status == 405
    assert get(fake_hook.port, ca, "/nope").status == 404
    assert get(fake_hook.port, ca, "/healthz").body == b"ok\n"


def _tls(port: int, ca: str) -> ssl.SSLSocket:
    ctx = adm.client_context(ca)
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _read_all(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return data
        if not chunk:
            return data
        data += chunk


def test_a_body_over_the_cap_is_refused_before_it_is_sent(fake_hook: RunningWebhook) -> None:
    with _tls(fake_hook.port, hook_ca(fake_hook)) as sock:
        sock.sendall(
            b"POST /inject HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (wh.MAX_BODY + 1)
        )
        reply = _read_all(sock)  # answered from the head alone: the 3 MiB never had to be sent
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"over 3145728 bytes" in reply


def test_a_chunked_body_over_the_cap_is_cut_off(fake_hook: RunningWebhook) -> None:
    with _tls(fake_hook.port, hook_ca(fake_hook)) as sock:
        sock.sendall(
            b"POST /inject HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent <= wh.MAX_BODY:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
            pass  # the server answered and closed while we were still sending
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert metrics(fake_hook)["dbmtls_webhook_http_errors_total{code=413}"] == 1


def test_a_body_under_the_cap_is_read(fake_hook: RunningWebhook) -> None:
    pod = adm.pod()
    pod["metadata"]["annotations"]["big"] = "x" * (2 * 1024 * 1024)  # the size etcd still takes
    answer = _admit(fake_hook, adm.review(pod))
    assert apply_answer(pod, answer)["spec"]["initContainers"][0]["name"] == "dbmtls"


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /inject HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n",
    ],
    ids=["garbage", "http2-line", "huge-head"],
)
def test_malformed_http_gets_400(fake_hook: RunningWebhook, raw: bytes) -> None:
    with _tls(fake_hook.port, hook_ca(fake_hook)) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
            sock.sendall(raw)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400 ")


def test_a_slow_request_is_timed_out(fake_hook: RunningWebhook, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wh, "READ_TIMEOUT", 0.3)
    with _tls(fake_hook.port, hook_ca(fake_hook)) as sock:
        sock.sendall(b"POST /inject HTTP/1.1\r\nHost: localhost\r\n")  # and then nothing
        started = time.monotonic()
        assert _read_all(sock) == b""  # closed by the server, not by our own DEADLINE
        assert time.monotonic() - started < DEADLINE / 2


def test_an_idle_kept_alive_connection_is_closed(pki: PKI) -> None:
    with _start(pki, inject=adding_inject, idle_timeout=0.3) as hook, _tls(hook.port, pki.ca_cert) as sock:
        started = time.monotonic()
        assert _read_all(sock) == b""
        assert time.monotonic() - started < DEADLINE / 2


def test_connections_are_kept_alive_between_reviews(fake_hook: RunningWebhook) -> None:
    conn = http.client.HTTPSConnection("localhost", fake_hook.port, context=adm.client_context(hook_ca(fake_hook)))
    try:
        socks = []
        for _ in range(3):
            conn.request("POST", "/inject", body=_review_text(), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.getheader("Connection") is None
            decode_patch(json.loads(resp.read()))
            socks.append(conn.sock)
        assert socks[0] is socks[1] is socks[2]  # one TLS connection for all three
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(fake_hook: RunningWebhook) -> None:
    bodies = [_review_text(), json.dumps(adm.review(adm.pod(opt_in=False))).encode()]
    head = b"POST /inject HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    data = head % len(bodies[0]) + b"\r\n" + bodies[0]
    data += head % len(bodies[1]) + b"Connection: close\r\n\r\n" + bodies[1]
    with _tls(fake_hook.port, hook_ca(fake_hook)) as sock:
        sock.sendall(data)  # both at once, before reading anything
        replies = _read_all(sock)
    first, second = replies.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and b'"patch"' in first
    assert second.startswith(b"200 ") and b'"patch"' not in second


def test_connections_over_the_cap_are_closed(pki: PKI) -> None:
    with _start(pki, inject=adding_inject) as hook:
        assert hook.server is not None
        hook.server.max_connections = 2
        with _tls(hook.port, pki.ca_cert) as one, _tls(hook.port, pki.ca_cert) as two:
            _wait(lambda: hook.call(lambda: len(hook.server._conns)) == 2, "two open connections")  # type: ignore[union-attr]
            with _tls(hook.port, pki.ca_cert) as three:
                assert _read_all(three) == b""  # closed at once, nothing buffered for it
            assert hook.server.refused == 1
            one.close()
            two.close()
        assert get(hook.port, pki.ca_cert, "/healthz").status == 200  # a slot again once they are gone


def test_shutdown_finishes_a_request_in_progress_and_closes_idle_connections(pki: PKI) -> None:
    body = _review_text()
    with _start(pki, inject=adding_inject) as hook:
        assert hook.server is not None
        server, port = hook.server, hook.port
        with _tls(port, pki.ca_cert) as busy, _tls(port, pki.ca_cert) as idle:
            busy.sendall(
                b"POST /inject HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:100])
            )
            _wait(
                lambda: hook.call(lambda: sorted(c.busy for c in server._conns.values())) == [False, True],
                "one busy and one idle connection",
            )
            stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=DEADLINE), hook.loop)
            assert _read_all(idle) == b""  # closed by the shutdown, without an answer
            assert not stopping.done()  # still waiting for the busy one
            busy.sendall(body[100:])
            reply = _read_all(busy)
            stopping.result(timeout=DEADLINE)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert b"Connection: close" in reply
        assert b'"patch"' in reply
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()  # no longer listening


# --- health, readiness, metrics ------------------------------------------------------------------


def test_metrics(fake_hook: RunningWebhook) -> None:
    _admit(fake_hook, adm.review(adm.pod()))
    _admit(fake_hook, adm.review(adm.pod(opt_in=False)))
    post(fake_hook.port, hook_ca(fake_hook), b"{", content_type="application/json")
    m = metrics(fake_hook)
    assert m["dbmtls_webhook_requests_total{result=injected}"] == 1
    assert m["dbmtls_webhook_requests_total{result=unchanged}"] == 1
    assert m["dbmtls_webhook_requests_total{result=invalid}"] == 1
    assert m["dbmtls_webhook_requests_total{result=denied}"] == 0  # zeros, not gaps
    assert m["dbmtls_webhook_http_errors_total{code=400}"] == 1
    assert m["dbmtls_webhook_request_duration_seconds_count"] == 2
    assert m["dbmtls_webhook_destination_rules"] == 2
    assert m["dbmtls_webhook_certificate_reloads_total{result=success}"] == 0
    cert = fake_hook.cert.current
    assert cert is not None
    assert m["dbmtls_webhook_certificate_expiry_timestamp_seconds"] == cert.not_after.timestamp()


class _Source:
    def __init__(self) -> None:
        self.synced = False
        self.problem: str | None = "403 Forbidden: cannot list destinationrules"
        self.rules: tuple[dict[str, Any], ...] = ()

    def snapshot(self) -> tuple[dict[str, Any], ...]:
        return self.rules


def test_not_ready_until_the_rules_are_listed(pki: PKI, rules: list[dict[str, Any]]) -> None:
    source = _Source()
    with _start(pki, mesh=Mesh(rules, source), inject=adding_inject) as hook:
        reply = get(hook.port, pki.ca_cert, "/readyz")
        assert reply.status == 503
        assert b"DestinationRules not listed yet: 403 Forbidden" in reply.body

        def synced() -> None:
            source.synced = True
            source.problem = None
            source.rules = ({"kind": "DestinationRule", "metadata": {"name": "w", "namespace": "x"}},)

        hook.call(synced)
        assert get(hook.port, pki.ca_cert, "/readyz").status == 200
        # the injector sees the -f rules and then the watched ones, per request
        status = apply_answer(adm.pod(), _admit(hook, adm.review(adm.pod())))["metadata"]["annotations"]
        assert json.loads(status["dbmtls.io/status"])["rules"] == 3
        assert metrics(hook)["dbmtls_webhook_destination_rules"] == 3


# --- the serving certificate ---------------------------------------------------------------------


def _server_pair(pki: PKI, tag: str, **kwargs: Any) -> Pair:
    return pki.server_for("localhost", "127.0.0.1", tag=tag, **kwargs)


def _serial(pair: Pair) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(pair.cert).read_bytes()).serial_number


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_the_serving_certificate_is_reloaded_under_the_running_server(pki: PKI, tmp_path: Path) -> None:
    first, second = _server_pair(pki, "rot-a"), _server_pair(pki, "rot-b")
    secret = SecretDir(tmp_path / "serving")
    secret.update_from(first.dir, ("tls.crt", "tls.key"))
    with RunningWebhook(
        secret.file("tls.crt"), secret.file("tls.key"), ca_file=pki.ca_cert, inject=adding_inject
    ) as hook:
        assert serving_serial(hook.port, pki.ca_cert) == _serial(first)
        kept = http.client.HTTPSConnection("localhost", hook.port, context=adm.client_context(pki.ca_cert))
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() == b"ok\n"

        secret.update_from(second.dir, ("tls.crt", "tls.key"))  # the kubelet's ..data swap
        _wait(lambda: serving_serial(hook.port, pki.ca_cert) == _serial(second), "the new certificate in a handshake")
        assert serving_serial(hook.port, pki.ca_cert, sni=False) == _serial(second)  # without SNI too
        assert metrics(hook)["dbmtls_webhook_certificate_reloads_total{result=success}"] == 1
        kept.request("GET", "/healthz")  # a connection made before keeps working
        assert kept.getresponse().read() == b"ok\n"
        kept.close()

        # a broken pair (the key of another certificate) keeps the one in use
        secret.update({"tls.crt": Path(first.cert).read_bytes(), "tls.key": Path(second.key).read_bytes()})
        _wait(
            lambda: metrics(hook)["dbmtls_webhook_certificate_reloads_total{result=failure}"] == 1,
            "the failed reload",
        )
        assert serving_serial(hook.port, pki.ca_cert) == _serial(second)
        assert hook.cert.last_error is not None and "cannot load the pair" in hook.cert.last_error
        assert get(hook.port, pki.ca_cert, "/readyz").status == 200

        # an expired replacement is refused too
        expired = _server_pair(pki, "rot-old", expired=True)
        secret.update_from(expired.dir, ("tls.crt", "tls.key"))
        _wait(
            lambda: metrics(hook)["dbmtls_webhook_certificate_reloads_total{result=failure}"] == 2,
            "the refused expired certificate",
        )
        assert "expired" in (hook.cert.last_error or "")
        assert serving_serial(hook.port, pki.ca_cert) == _serial(second)

        # and a good pair after the broken ones is taken
        third = _server_pair(pki, "rot-c")
        secret.update_from(third.dir, ("tls.crt", "tls.key"))
        _wait(lambda: serving_serial(hook.port, pki.ca_cert) == _serial(third), "the third certificate")
        assert _admit(hook, adm.review(adm.pod()))["response"]["allowed"] is True


def test_a_file_rewritten_in_place_is_reloaded(pki: PKI, tmp_path: Path) -> None:
    first, second = _server_pair(pki, "inplace-a"), _server_pair(pki, "inplace-b")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(Path(first.cert).read_bytes())
    key.write_bytes(Path(first.key).read_bytes())
    with RunningWebhook(str(cert), str(key)) as hook:
        assert serving_serial(hook.port, pki.ca_cert) == _serial(first)
        # key first, then certificate: in between the pair does not match (one failure), after it does
        key.write_bytes(Path(second.key).read_bytes())
        cert.write_bytes(Path(second.cert).read_bytes())
        os.utime(cert, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a new mtime even on a coarse clock
        _wait(lambda: serving_serial(hook.port, pki.ca_cert) == _serial(second), "the rewritten certificate")


def test_a_bad_pair_at_startup_is_a_clear_error(pki: PKI) -> None:
    other = _server_pair(pki, "startup-b")
    with pytest.raises(CertificateError, match="cannot load the pair"):
        ServingCertificate(pki.server.cert, other.key).load()
    with pytest.raises(CertificateError, match="cannot read"):
        ServingCertificate("/nonexistent/tls.crt", pki.server.key).load()
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        ServingCertificate(pki.server.key, pki.server.key).load()


def test_an_expired_certificate_is_served_but_not_ready(pki: PKI) -> None:
    expired = _server_pair(pki, "startup-old", expired=True)
    with RunningWebhook(expired.cert, expired.key) as hook:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the certificate is expired: look at /readyz anyway
        conn = http.client.HTTPSConnection("localhost", hook.port, context=ctx)
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        assert resp.status == 503
        assert b"serving certificate expired at" in resp.read()
        conn.close()


# --- the decision without HTTP --------------------------------------------------------------------


def _request(obj: Any) -> dict[str, Any]:
    request: dict[str, Any] = adm.review(adm.pod())["request"]
    request["object"] = obj
    return request


def test_an_injector_that_changes_its_argument_still_gets_the_right_patch() -> None:
    def in_place(obj: Any, mesh: Any, options: InjectOptions, *, namespace: str | None = None) -> Any:
        obj["spec"]["containers"].append({"name": "extra", "image": "x"})
        return obj

    pod = adm.pod()
    verdict = wh.review(_request(pod), (), InjectOptions(), inject=in_place)
    assert verdict.result == "injected"
    assert apply_answer(pod, verdict.review)["spec"]["containers"][-1]["name"] == "extra"
    assert pod == adm.pod()  # what the API server sent is not touched


@pytest.mark.parametrize("obj", [None, [1], "pod", 7])
def test_a_request_object_that_is_not_a_pod_is_refused(obj: Any) -> None:
    verdict = wh.review(_request(obj), (), InjectOptions(), inject=adm.broken_inject)
    assert verdict.result == "invalid"
    assert verdict.review["response"]["allowed"] is False
    assert verdict.review["response"]["status"]["code"] == 400


def test_a_non_string_namespace_is_refused() -> None:
    request = _request(adm.pod())
    request["namespace"] = ["shop"]
    verdict = wh.review(request, (), InjectOptions(), inject=adding_inject)
    assert verdict.result == "invalid"
    assert "namespace" in verdict.review["response"]["status"]["message"]


def test_an_injector_returning_something_unpatchable_is_an_internal_error() -> None:
    def weird(obj: Any, mesh: Any, options: InjectOptions, *, namespace: str | None = None) -> Any:
        return {1, 2}

    verdict = wh.review(_request(adm.pod()), (), InjectOptions(), inject=weird)
    assert verdict.result == "error"
    assert verdict.review["response"]["status"]["code"] == 500


def test_the_inject_paths_pass_the_api_servers_check_of_service_paths() -> None:
    # kube-apiserver validates clientConfig.service.path segment by segment as DNS-1123
    # subdomains; a path it refuses could never be configured (a query string never can).
    import re

    subdomain = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
    for path in wh.INJECT_PATHS:
        assert all(subdomain.fullmatch(segment) for segment in path[1:].split("/")), path
    assert not subdomain.fullmatch("inject?namespaceDefault=true")


def test_the_deployed_webhook_configuration_names_only_paths_this_server_serves() -> None:
    from support.kube import kustomize_build

    docs = kustomize_build(Path(__file__).resolve().parents[2] / "deploy" / "base")
    (config,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    paths = sorted(w["clientConfig"]["service"]["path"] for w in config["webhooks"])
    assert paths == ["/inject", "/inject/namespace-default"]
    assert all(p in wh.INJECT_PATHS for p in paths)
