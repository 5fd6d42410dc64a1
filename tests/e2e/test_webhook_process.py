"""``dbmtls webhook`` as a process, as a Deployment runs it: CLI flags, files, a watch, SIGTERM.

The cluster is the fake API server of support/fake_kube.py (no real one is available here),
reached through a kubeconfig file in ``KUBECONFIG``, the way lightkube finds a cluster
outside a pod.  Waiting is on the port, on ``/readyz`` and on metrics, each with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dbmtls.k8s.inject import InjectOptions, inject_object
from dbmtls.k8s.watch import _plain
from support import admission as adm
from support.admission import apply_answer, get, post
from support.certs import PKI
from support.fake_kube import FakeKubeThread, rule
from support.net import free_port, wait_port

pytestmark = pytest.mark.e2e
DEADLINE = 15.0
STATIC_RULE = rule("shop", "orders-db", "orders-db.shop.svc.cluster.local", protocol="postgres")


class Webhook:
    def __init__(self, tmp: Path, pki: PKI, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.ca = pki.ca_cert
        self.log_path = tmp / f"webhook-{self.port}.log"
        self.cmd = [
            sys.executable,
            "-m",
            "dbmtls",
            "webhook",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--tls-cert",
            pki.server.cert,
            "--tls-key",
            pki.server.key,
            *args,
        ]
        base = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
        self.env = {**base, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Webhook:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_port(self.port, timeout=DEADLINE)
        except TimeoutError:
            raise AssertionError(f"the webhook did not listen; log:\n{self.log()}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def until(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; log:\n{self.log()}")
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        text = get(self.port, self.ca, "/metrics").body.decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
        raise AssertionError(f"no {name} in /metrics")

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=DEADLINE)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[FakeKubeThread, Path]]:
    with FakeKubeThread() as fake:
        fake.call(fake.fake.put, rule("cache", "redis", "redis-master"))
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": fake.fake.url}}],
            "users": [{"name": "fake", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(config))
        yield fake, path


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(
        yaml.safe_dump_all([STATIC_RULE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}])
    )
    return path


def test_the_cli_serves_reviews_with_file_and_watched_rules_and_stops_on_sigterm(
    tmp_path: Path, pki: PKI, kube: tuple[FakeKubeThread, Path], rules_file: Path
) -> None:
    fake, kubeconfig = kube
    args = ("-f", str(rules_file), "--watch", "--log-format", "json", "--image", "registry.example/dbmtls:9")
    with Webhook(tmp_path, pki, *args, env={"KUBECONFIG": str(kubeconfig)}) as hook:
        hook.until("/readyz 200", lambda: get(hook.port, hook.ca, "/readyz").status == 200)
        assert hook.metric("dbmtls_webhook_destination_rules") == 2  # one from -f, one watched

        # the same pure function, given what the webhook knows: the file's rule, then the watched one
        watched = [_plain(obj, "v1") for obj in fake.call(lambda: list(fake.fake.objects.values()))]
        options = InjectOptions(image="registry.example/dbmtls:9")
        pod = adm.pod()
        expected = inject_object(pod, [STATIC_RULE, *watched], options, namespace=adm.NAMESPACE)
        reply = post(hook.port, hook.ca, adm.review(pod))
        assert reply.status == 200
        assert "patch" in reply.json()["response"]
        patched = apply_answer(pod, reply.json())
        assert patched == expected
        kubernetes_validate.validate(patched, "1.29", strict=True)
        sidecar = patched["spec"]["initContainers"][0]
        assert sidecar["image"] == "registry.example/dbmtls:9"
        # both rules made it into the sidecar's config: the file's and the watched one
        config = next(e["value"] for e in sidecar["env"] if e["name"] == "DBMTLS_CONFIG")
        assert "orders-db" in config and "redis-master" in config

        fake.call(fake.fake.put, rule("billing", "ledger", "ledger-pg"))
        hook.until("the new rule", lambda: hook.metric("dbmtls_webhook_destination_rules") == 3)

        assert hook.terminate() == 0
        lines = [json.loads(line) for line in hook.log().splitlines()]  # every line is JSON
        messages = [line["msg"] for line in lines]
        assert "DestinationRules listed" in messages
        assert messages[-2:] == ["shutting down", "stopped"]
        started = next(line for line in lines if line["msg"] == "webhook started")
        assert started["watch"] is True and started["rules_from_files"] == 1


def test_outside_a_cluster_it_does_not_watch(tmp_path: Path, pki: PKI, rules_file: Path) -> None:
    # no KUBERNETES_SERVICE_HOST, no KUBECONFIG: ready at once, with the file's rules only
    with Webhook(tmp_path, pki, "-f", str(rules_file)) as hook:
        assert get(hook.port, hook.ca, "/readyz").status == 200
        assert hook.metric("dbmtls_webhook_destination_rules") == 1
        answer = post(hook.port, hook.ca, adm.review(adm.pod(opt_in=False))).json()
        assert answer["response"]["allowed"] is True
        assert hook.terminate() == 0
        assert "watch=False" in hook.log()


def test_in_a_pod_it_watches_and_is_not_ready_without_the_api_server(tmp_path: Path, pki: PKI) -> None:
    # KUBERNETES_SERVICE_HOST set (as in every pod) but nothing answers: not ready, still serving
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(free_port())}
    with Webhook(tmp_path, pki, env=env) as hook:
        reply = get(hook.port, hook.ca, "/readyz")
        assert reply.status == 503
        assert b"DestinationRules not listed yet" in reply.body
        assert get(hook.port, hook.ca, "/healthz").status == 200
        hook.until("the reason in the log", lambda: "serviceaccount/token" in hook.log())
        assert b"cannot configure the Kubernetes client" in get(hook.port, hook.ca, "/readyz").body
        assert hook.terminate() == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--listen", "127.0.0.1"), 2, "missing ':port'"),
        (("-f", "/nonexistent/rules.yaml"), 2, "/nonexistent/rules.yaml: cannot read"),
        (("--tls-key", "__CA_KEY__"), 1, "serving certificate"),
    ],
    ids=["listen", "rules-file", "key-mismatch"],
)
def test_cli_errors_are_clear(tmp_path: Path, pki: PKI, args: tuple[str, ...], code: int, message: str) -> None:
    args = tuple(str(pki.ca / "ca.key") if a == "__CA_KEY__" else a for a in args)
    cmd = [
        sys.executable,
        "-m",
        "dbmtls",
        "webhook",
        "--listen",
        "127.0.0.1:1",
        "--tls-cert",
        pki.server.cert,
        "--tls-key",
        pki.server.key,
        "--no-watch",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
