"""A pod, simulated with real parts: what ``dbmtls inject`` writes, run by a real Docker daemon.

No cluster is available here, so the kubelet's part is played by this test, step by step, from
the injected pod spec itself (not from a config written for the test):

* the pod's network namespace is a "pause" container; the sidecar and the app join it with
  ``--network container:pause`` and so share its loopback, ``/etc/hosts`` and
  ``/etc/resolv.conf``, which is what containers of one pod share;
* ``hostAliases`` become the pause container's ``/etc/hosts`` entries (``--add-host``), and its
  ``resolv.conf`` names a real DNS server (dnsmasq on 127.53.0.1:53) with a cluster's search list;
* Secret volumes are directories in the kubelet's layout (``..data`` symlink swapped atomically
  on update), bind-mounted read-only at the injected mount paths;
* the sidecar container runs with the injected image, args, env and securityContext
  (read-only root, uid 65532, no capabilities, no privilege escalation); the startupProbe is
  polled on its port before the app starts, as the kubelet does with a native sidecar;
* the upstreams are a real TLS-only Redis on 127.0.0.2 and PostgreSQL on 127.0.0.3 that require
  client certificates; the pod's /etc/hosts sends their names to 127.0.0.1, so the sidecar only
  reaches them by resolving through DNS itself.

The pause container runs with ``--network host`` (the Docker daemon here has no bridge), so the
"pod" shares the machine's network namespace; the upstreams' own addresses keep the two sides apart.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from dbmtls.k8s.inject import InjectOptions, inject_documents
from support.certs import PKI, Pair
from support.dnsmasq import Dnsmasq
from support.docker import docker, image_labels
from support.k8s_secret import make_secret_volume, swap_secret_volume
from support.net import recv_line
from support.pg_server import PostgresTLS
from support.redis_server import RedisTLS

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(1800)]

NS = "shop"
REDIS_IP, PG_IP, DNS_IP = "127.0.0.2", "127.0.0.3", "127.53.0.1"
HEALTH = "http://127.0.0.1:15021"
APP_IMAGE = "dbmtls-test-app:bookworm"


@pytest.fixture(scope="session")
def app_image(dbmtls_image: str) -> str:
    """An app image with the clients people use (redis-cli, psql), on the dbmtls image's base."""
    if subprocess.run(["docker", "image", "inspect", APP_IMAGE], capture_output=True, check=False).returncode == 0:
        return APP_IMAGE
    base = (image_labels(dbmtls_image) or {}).get("org.opencontainers.image.base.name", "debian:bookworm-slim")
    dockerfile = (
        f"FROM {base}\n"
        "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
        "redis-tools postgresql-client && rm -rf /var/lib/apt/lists/*\n"
    )
    # apt reaches Debian's mirror through the host's network (the daemon here has no bridge)
    subprocess.run(
        ["docker", "build", "--network", "host", "-t", APP_IMAGE, "-"],
        input=dockerfile.encode(),
        check=True,
        capture_output=True,
        timeout=900,
    )
    return APP_IMAGE


def _manifests(redis_port: int, pg_port: int) -> list[dict[str, Any]]:
    text = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: shop-app, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: shop-app}}}}
  template:
    metadata:
      labels: {{app: shop-app, dbmtls.io/inject: "true"}}
    spec:
      terminationGracePeriodSeconds: 20
      containers:
        - {{name: app, image: {APP_IMAGE}, command: [sleep, infinity]}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: foo-redis, namespace: {NS}}}
spec:
  host: foo-redis-master
  trafficPolicy:
    portLevelSettings:
      - port: {{number: {redis_port}}}
        tls: {{mode: MUTUAL, credentialName: jinsu-tls}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: orders-db
  namespace: {NS}
  annotations: {{dbmtls.io/protocol: postgres}}
spec:
  host: orders-db
  trafficPolicy:
    portLevelSettings:
      - port: {{number: {pg_port}}}
        tls: {{mode: MUTUAL, credentialName: orders-tls}}
"""
    return [d for d in yaml.safe_load_all(text) if d]


def _secret_files(pair: Pair) -> dict[str, bytes]:
    return {name: (pair.dir / name).read_bytes() for name in ("tls.crt", "tls.key", "ca.crt")}


class Pod:
    """The containers of one simulated pod, all removed at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.containers: list[str] = []

    def run(self, role: str, *args: str) -> str:
        name = f"{self.name}-{role}"
        self.containers.append(name)
        docker("run", "-d", "--name", name, *args)
        return name

    def app(self, *command: str) -> subprocess.CompletedProcess[str]:
        """A command in a fresh app container of the pod (its own /etc/hosts is the pod's)."""
        return docker(
            "run", "--rm", "--network", f"container:{self.name}-pause", APP_IMAGE, *command, check=False, timeout=60
        )

    def remove(self) -> None:
        for name in reversed(self.containers):
            docker("rm", "-f", name, check=False)


@pytest.fixture
def pod(request: pytest.FixtureRequest) -> Iterator[Pod]:
    made = Pod(f"dbmtls-pod-{int(time.time() * 1000) % 10**9}")
    yield made
    made.remove()


def _ready(deadline: float) -> None:
    """The native sidecar's startupProbe, as the kubelet runs it: GET /readyz until 200."""
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{HEALTH}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError as exc:  # refused before the listener, 503 (HTTPError) before ready
            last = str(exc)
        time.sleep(0.1)
    raise AssertionError(f"sidecar not ready: {last}")


def _wait_log(container: str, needle: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        logs = docker("logs", container, check=False).stderr
        if needle in logs:
            return logs
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in the logs of {container}:\n{docker('logs', container, check=False).stderr}")


def test_an_injected_pod_runs_with_real_parts(
    pki: PKI, tmp_path: Path, dbmtls_image: str, app_image: str, pod: Pod
) -> None:
    redis = RedisTLS(tmp_path / "redis", pki.server_for("foo-redis-master"), pki.ca_cert, bind=REDIS_IP).start()
    hba = "local all postgres trust\nhostssl all all 127.0.0.0/8 cert clientcert=verify-full\n"
    pg = PostgresTLS(pki.server_for("orders-db"), pki.ca_cert, hba=hba, listen=PG_IP).start()
    dns = Dnsmasq(
        tmp_path / "dns",
        {f"foo-redis-master.{NS}.svc.cluster.local": REDIS_IP, f"orders-db.{NS}.svc.cluster.local": PG_IP},
        listen=DNS_IP,
        port=53,
    )
    try:
        pg.create_user("orders")
        dns.start()
        _run_pod(pki, tmp_path, dbmtls_image, pod, redis, pg, dns)
    finally:
        dns.stop()
        pg.stop()
        redis.stop()


def _run_pod(pki: PKI, tmp_path: Path, image: str, pod: Pod, redis: RedisTLS, pg: PostgresTLS, dns: Dnsmasq) -> None:
    (deployment, *_rules) = inject_documents(_manifests(redis.port, pg.port), [], InjectOptions(image=image))
    spec = deployment["spec"]["template"]["spec"]
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "dbmtls" and sidecar["restartPolicy"] == "Always"

    # the kubelet's part: Secret volumes, /etc/hosts from hostAliases, the pod's resolv.conf
    secrets = {"jinsu-tls": pki.client_for("jinsu"), "orders-tls": pki.client_for("orders")}
    volumes: dict[str, Path] = {}
    for vol in spec["volumes"]:
        name = vol["secret"]["secretName"]
        files = _secret_files(secrets[name])
        if name == "orders-tls":
            # Istio's generic Secret layout (cert, key, cacert): the sidecar picks it when it starts
            files = {"cert": files["tls.crt"], "key": files["tls.key"], "cacert": files["ca.crt"]}
        volumes[vol["name"]] = make_secret_volume(tmp_path / "volumes" / name, files)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        f"nameserver {DNS_IP}\nsearch {NS}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
    )
    add_hosts = [f"--add-host={h}:{alias['ip']}" for alias in spec["hostAliases"] for h in alias["hostnames"]]
    pod.run("pause", "--network", "host", *add_hosts, "-v", f"{resolv}:/etc/resolv.conf:ro", APP_IMAGE, "sleep", "1d")

    sc = sidecar["securityContext"]
    options = ["--network", f"container:{pod.name}-pause", "--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
    options += ["--read-only"] if sc["readOnlyRootFilesystem"] else []
    options += ["--cap-drop", "ALL"] if sc["capabilities"]["drop"] == ["ALL"] else []
    options += ["--security-opt", "no-new-privileges"] if not sc["allowPrivilegeEscalation"] else []
    for env in sidecar["env"]:
        options += ["-e", f"{env['name']}={env['value']}"]
    for mount in sidecar["volumeMounts"]:
        options += ["-v", f"{volumes[mount['name']]}:{mount['mountPath']}:ro"]
    deadline = time.monotonic() + 60
    side = pod.run("dbmtls", *options, sidecar["image"], *sidecar["args"])
    _ready(deadline)

    # the app, unchanged: plaintext, the service's own name and port
    set_ = pod.app("redis-cli", "-h", "foo-redis-master", "-p", str(redis.port), "SET", "pod", "works")
    assert set_.stdout.strip() == "OK", set_
    get = pod.app("redis-cli", "-h", f"foo-redis-master.{NS}.svc.cluster.local", "-p", str(redis.port), "GET", "pod")
    assert get.stdout.strip() == "works", get
    direct = subprocess.run(  # on the real server itself, over its own mTLS
        ["redis-cli", "--tls", "--cacert", pki.ca_cert, "--cert", pki.client.cert, "--key", pki.client.key,
         "-h", REDIS_IP, "-p", str(redis.port), "GET", "pod"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert direct.stdout.strip() == "works", direct
    sql = "select current_user || ' ' || ssl from pg_stat_ssl where pid = pg_backend_pid()"
    psql = pod.app("psql", f"host=orders-db port={pg.port} user=orders dbname=postgres sslmode=disable", "-Atc", sql)
    assert psql.stdout.strip() == "orders true", psql
    # the sidecar asked DNS for the services' full names; the pod's /etc/hosts would have said 127.0.0.1
    asked = dns.queries()
    assert f"A foo-redis-master.{NS}.svc.cluster.local" in asked and f"A orders-db.{NS}.svc.cluster.local" in asked

    # a certificate renewal under traffic: an open connection keeps working, new ones use the new cert
    with socket.create_connection(("127.0.0.1", redis.port), timeout=10) as held:
        held.sendall(b"PING\r\n")
        assert recv_line(held) == b"+PONG\r\n"
        renewed = pki.client_for("jinsu-renewed")
        swap_secret_volume(volumes["dbmtls-cred-jinsu-tls"], _secret_files(renewed))
        serial = x509.load_pem_x509_certificate(Path(renewed.cert).read_bytes()).serial_number
        logs = _wait_log(side, f"client:{serial:x}", time.monotonic() + 30)
        assert "certificates reloaded" in logs
        held.sendall(b"PING\r\n")
        assert recv_line(held) == b"+PONG\r\n"
    again = pod.app("redis-cli", "-h", "foo-redis-master", "-p", str(redis.port), "GET", "pod")
    assert again.stdout.strip() == "works", again

    # the kubelet stops the sidecar last: SIGTERM, a drain, exit 0 within the grace period
    docker("stop", "-t", str(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]), side)
    state = json.loads(docker("inspect", side).stdout)[0]["State"]
    assert state["ExitCode"] == 0, docker("logs", side, check=False).stderr
    assert "draining" in docker("logs", side, check=False).stderr
