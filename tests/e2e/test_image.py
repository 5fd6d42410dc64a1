"""The container image, run the way the sidecar runs in a pod.

Every container runs with what the injected securityContext asks for: a read-only root
filesystem, no capabilities, no privilege escalation, and the image's own user (65532).  The
certificates are bind-mounted read-only in the layout of a mounted Kubernetes Secret
(``..data`` symlink swapped atomically on update, files root-owned and readable through an
fsGroup), and rotated the way the kubelet rotates them.  The real redis-server listens on
127.0.0.2, a different address from the proxy's listener, so a relay that goes anywhere else
could not pass.

The image is built at most once per session (tests/support/docker.py) and not at all when the
tag already carries this tree's source hash.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from dbmtls import __version__
from support.certs import PKI, Pair
from support.docker import HASH_LABEL, Containers, docker, json_lines, source_hash
from support.k8s_secret import make_secret_volume, swap_secret_volume
from support.net import free_port, recv_line
from support.redis_server import RedisTLS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    # the first test may pay for a cold image build (debootstrap) inside its setup
    pytest.mark.timeout(1800),
]

UID = GID = 65532
# what the injector's securityContext amounts to, in docker run options
LOCKED_DOWN = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
MOUNT = "/var/run/secrets/dbmtls/credentials/redis"  # where the injector mounts credentialName "redis"
SERVER_IP = "127.0.0.2"  # Linux routes all of 127/8 to lo: a second address with no setup


def _secret_files(pair: Pair) -> dict[str, bytes]:
    return {name: (pair.dir / name).read_bytes() for name in ("tls.crt", "tls.key", "ca.crt")}


def _secret(path: Path, pair: Pair) -> Path:
    # defaultMode 0440 with fsGroup 65532: root owns the files, the sidecar's group reads them
    return make_secret_volume(path, _secret_files(pair), mode=0o440, fs_group=GID)


def _config_dir(path: Path, listen_port: int, upstream: RedisTLS) -> Path:
    path.mkdir(mode=0o755)
    config = {
        "databases": [
            {
                "name": "cache",
                "protocol": "redis",
                "listen": f"127.0.0.1:{listen_port}",
                "address": f"{upstream.bind}:{upstream.port}",
                "tls": {
                    "mode": "MUTUAL",
                    "clientCertificate": f"{MOUNT}/tls.crt",
                    "privateKey": f"{MOUNT}/tls.key",
                    "caCertificates": f"{MOUNT}/ca.crt",
                },
            }
        ],
        "drainTimeout": "30s",
    }
    (path / "dbmtls.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (path / "dbmtls.yaml").chmod(0o644)
    return path


def _serial(pair: Pair) -> int:
    return x509.load_pem_x509_certificate(Path(pair.cert).read_bytes()).serial_number


def _redis_cli(port: int, *args: str) -> str:
    """The plaintext redis-cli an app container would run, from the host."""
    proc = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _proc_status(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@pytest.fixture(scope="module")
def redis_on_2(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTLS]:
    """TLS-only Redis requiring client certificates, on 127.0.0.2, certificate for that address."""
    server = RedisTLS(
        tmp_path_factory.mktemp("redis-image"), pki.server_for(SERVER_IP), pki.ca_cert, bind=SERVER_IP
    ).start()
    yield server
    server.stop()


# Runs inside the image: who it runs as, what it may do, and whether every module of dbmtls
# was compiled at build time into a .pyc that stays valid (unchecked-hash: flags == 1).
PROBE = r"""
import errno, importlib.util, json, pathlib
import dbmtls
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
try:
    open("/opt/dbmtls/probe", "w")
    write = "written"
except OSError as exc:
    write = errno.errorcode[exc.errno]
pkg = pathlib.Path(dbmtls.__file__).parent
pycs = {str(p): pathlib.Path(importlib.util.cache_from_source(str(p))) for p in pkg.rglob("*.py")}
flags = {src: int.from_bytes(pyc.read_bytes()[4:8], "little") if pyc.exists() else None for src, pyc in pycs.items()}
try:
    import pip
    has_pip = True
except ImportError:
    has_pip = False
print(json.dumps({"uid": status["Uid"].split(), "gid": status["Gid"].split(), "cap_eff": status["CapEff"].strip(),
                  "no_new_privs": status["NoNewPrivs"].strip(), "write": write, "pyc_flags": flags, "pip": has_pip}))
"""


def test_image_runs_as_nonroot_on_a_read_only_root(containers: Containers, dbmtls_image: str) -> None:
    out = containers.run_once("version", options=(*LOCKED_DOWN, "--network", "none"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"dbmtls {__version__}"

    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", dbmtls_image).stdout)
    assert config["User"] == f"{UID}:{GID}"  # numeric: runAsNonRoot can verify it
    assert config["Entrypoint"] == ["dbmtls"]
    assert "15021/tcp" in config["ExposedPorts"]
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.title"] == "dbmtls"
    assert labels[HASH_LABEL] == source_hash()

    probe = containers.run_once(
        "-c", PROBE, options=(*LOCKED_DOWN, "--network", "none", "--entrypoint", "/opt/dbmtls/bin/python3")
    )
    assert probe.returncode == 0, probe.stderr
    facts = json.loads(probe.stdout)
    assert facts["uid"] == [str(UID)] * 4
    assert facts["gid"] == [str(GID)] * 4
    assert facts["cap_eff"] == "0000000000000000"
    assert facts["no_new_privs"] == "1"
    assert facts["write"] == "EROFS"
    assert not facts["pip"], "pip is left in the runtime venv"
    assert facts["pyc_flags"], "no dbmtls modules found"
    not_compiled = {src: flags for src, flags in facts["pyc_flags"].items() if flags != 1}
    assert not not_compiled, f"modules without an unchecked-hash .pyc: {not_compiled}"


def test_check_with_a_mounted_config_and_secret(
    containers: Containers, pki: PKI, redis_on_2: RedisTLS, tmp_path: Path
) -> None:
    cfg = _config_dir(tmp_path / "cfg", free_port(), redis_on_2)
    good = _secret(tmp_path / "secret", pki.client_for("image-check"))
    out = containers.run_once(
        "check",
        "-c",
        "/cfg/dbmtls.yaml",
        options=(*LOCKED_DOWN, "--network", "none", "-v", f"{cfg}:/cfg:ro", "-v", f"{good}:{MOUNT}:ro"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"-> {SERVER_IP}:{redis_on_2.port}" in out.stdout  # the effective config, as dbmtls reads it
    assert f"clientCertificate: {MOUNT}/tls.crt" in out.stdout

    # The mistake this layout invites: a Secret hardened with defaultMode 0400 but no fsGroup
    # is root's alone, and the sidecar's user can read none of it.  check says so, and which file.
    private = make_secret_volume(tmp_path / "root-only", _secret_files(pki.client_for("image-check")), mode=0o400)
    out = containers.run_once(
        "check",
        "-c",
        "/cfg/dbmtls.yaml",
        options=(*LOCKED_DOWN, "--network", "none", "-v", f"{cfg}:/cfg:ro", "-v", f"{private}:{MOUNT}:ro"),
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"cannot read CA bundle file {MOUNT}/ca.crt: Permission denied" in out.stderr, out.stderr


def _reloads(logs: str) -> list[dict[str, Any]]:
    return [rec for rec in json_lines(logs) if rec.get("msg") == "certificates reloaded"]


def test_relay_rotation_and_drain_in_the_container(
    containers: Containers, pki: PKI, redis_on_2: RedisTLS, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    cfg = _config_dir(tmp_path / "cfg", port, redis_on_2)
    first = pki.client_for("image-first")
    secret = _secret(tmp_path / "secret", first)
    box = containers.run(
        "run",
        "-c",
        "/cfg/dbmtls.yaml",
        "--admin",
        f"127.0.0.1:{admin}",
        "--log-format",
        "json",  # as the injected sidecar runs
        options=(*LOCKED_DOWN, "--network", "host", "-v", f"{cfg}:/cfg:ro", "-v", f"{secret}:{MOUNT}:ro"),
    )
    # what the legacy-mode sidecar's postStart hook runs: returns once /readyz says ready
    box.exec("dbmtls", "wait", "--admin", f"127.0.0.1:{admin}", "--timeout", "30s")

    # PID 1 of the container is dbmtls itself (exec-form entrypoint), unprivileged
    status = _proc_status(box.exec("cat", "/proc/1/status").stdout)
    assert status["Uid"].split() == [str(UID)] * 4
    assert status["CapEff"].strip() == "0000000000000000"
    assert "dbmtls" in box.exec("cat", "/proc/1/cmdline").stdout

    # a plaintext app on the host, mutual TLS from the container to 127.0.0.2
    assert _redis_cli(port, "SET", "image", "first") == "OK"
    assert _redis_cli(port, "GET", "image") == "first"

    # the kubelet updates the Secret: a new client certificate from the same CA
    second = pki.client_for("image-second")
    before = len(_reloads(box.logs()))
    swap_secret_volume(secret, _secret_files(second), mode=0o440, fs_group=GID)
    box.wait_log(r'"msg": "certificates reloaded"', count=before + 1)
    reload = _reloads(box.logs())[-1]
    assert reload["trigger"] == "file change", reload
    assert reload["db"] == "cache"
    assert f"{_serial(second):x}" in reload["serials"], reload
    assert f"{_serial(first):x}" not in reload["serials"], reload
    # new connections (new upstream handshakes, now with the new certificate) still work
    assert _redis_cli(port, "SET", "image", "second") == "OK"
    assert _redis_cli(port, "GET", "image") == "second"

    # docker stop = the kubelet's SIGTERM: an open connection is drained, not cut.  First the
    # four redis-cli connections must be gone on the server side too (up to 1 s after the app's
    # EOF), so that the one opened here is the only one the drain waits for.
    box.wait_log(r'"msg": "connection closed"', count=4)
    app = socket.create_connection(("127.0.0.1", port), timeout=10)
    stopper: subprocess.Popen[str] | None = None
    try:
        app.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert recv_line(app) == b"+PONG\r\n"
        stopper = subprocess.Popen(
            ["docker", "stop", "--time", "60", box.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        box.wait_log(r'"msg": "draining"')
        draining = next(r for r in json_lines(box.logs()) if r["msg"] == "draining")
        assert draining["open_connections"] == 1, draining
        _wait_refused(port)  # the listener is closed: new connections are refused
        app.sendall(b"*2\r\n$3\r\nGET\r\n$5\r\nimage\r\n")  # the open one still relays
        assert recv_line(app) == b"$6\r\n"
        assert recv_line(app) == b"second\r\n"
    finally:
        app.close()  # the drain can end now
        out = stopper.communicate(timeout=90)[0] if stopper is not None else ""
    assert stopper is not None
    assert stopper.returncode == 0, out
    state = box.inspect()["State"]
    assert (state["Running"], state["ExitCode"], state["OOMKilled"]) == (False, 0, False), state
    records = json_lines(box.logs())
    messages = [r["msg"] for r in records]
    assert "stopped" in messages
    assert messages.index("shutting down") < messages.index("draining") < messages.index("stopped")
    assert next(r for r in records if r["msg"] == "shutting down")["why"] == "SIGTERM"
    assert "drain timeout: closing remaining connections" not in messages
    assert not [r for r in records if r["level"] == "error"], records


def _wait_refused(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, f"127.0.0.1:{port} still accepts connections while draining"
        time.sleep(0.05)
