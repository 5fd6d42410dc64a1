"""``dbmtls demo``: the seed scenario (an mTLS-only Redis behind a mesh) on one machine.

1. a CA, a server certificate for ``foo-redis-master`` and a client certificate
   ``jinsu``, like the cert-manager objects of the original write-up;
2. a real redis-server that accepts only TLS with client certificates;
3. plaintext ``redis-cli SET foo bar`` against it: refused;
4. dbmtls started with the write-up's DestinationRule (local paths);
5. the same plaintext ``redis-cli`` through dbmtls: ``OK``, then ``GET foo``;
6. the server goes away: the app now gets a Redis error saying why, not a reset.

Everything it starts is stopped, and its temporary directory removed, on any exit
(including Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from dbmtls.pki import create_ca, issue

BOLD, DIM, GREEN, RED, RESET = ("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m")


def _color(enabled: bool) -> None:
    global BOLD, DIM, GREEN, RED, RESET
    if not enabled:
        BOLD = DIM = GREEN = RED = RESET = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def step(n: int, text: str) -> None:
    print(f"\n{BOLD}{n}. {text}{RESET}", flush=True)


def show_cmd(cmd: list[str], *, expect_ok: bool) -> str:
    print(f"   {DIM}${RESET} {' '.join(cmd)}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
    text = (out.stdout + out.stderr).strip()
    color = GREEN if expect_ok else RED
    for line in text.splitlines() or ["(no output)"]:
        print(f"   {color}{line}{RESET}", flush=True)
    return text


DESTINATION_RULE = """\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: db-mtls
  annotations:
    # Only needed off-cluster: where to listen, and where foo-redis-master really is.
    # The server certificate is still verified against the name foo-redis-master.
    dbmtls.io/listen: 127.0.0.1:{listen}
    dbmtls.io/address: 127.0.0.1:{redis}
spec:
  host: foo-redis-master
  workloadSelector:
    matchLabels:
      app: redis-client-istio
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: {certs}/tls.crt
      privateKey: {certs}/tls.key
      caCertificates: {certs}/ca.crt
"""


@contextlib.contextmanager
def _process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run_demo(*, keep: bool = False) -> int:
    _color(sys.stdout.isatty())
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        print(f"dbmtls demo needs {' and '.join(missing)}: run 'make setup' (installs redis-server via apt)")
        return 2
    # Ctrl-C and SIGTERM both unwind through the finally blocks below.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    tmp = Path(tempfile.mkdtemp(prefix="dbmtls-demo-"))
    try:
        return _run(tmp)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up")
        return 130
    finally:
        if keep:
            print(f"\n{DIM}kept {tmp}{RESET}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp: Path) -> int:
    print(f"{BOLD}dbmtls demo{RESET}: the app speaks plaintext Redis; dbmtls does the mutual TLS.")
    print(f"{DIM}working directory: {tmp}{RESET}")
    ca, server, client = _certificates(tmp)

    redis_port, listen_port = _free_port(), _free_port()
    step(2, f"redis-server accepting only TLS with client certificates, on port {redis_port}")
    print(f"   {DIM}port 0, tls-port {redis_port}, tls-auth-clients yes{RESET}")
    with _process(_redis_command(tmp, ca, server, redis_port), tmp / "redis.log") as redis:
        if not _started("redis-server", redis_port, tmp / "redis.log"):
            return 1

        step(3, "The app, as it is, talking plaintext to the mTLS-only Redis")
        show_cmd(["redis-cli", "-h", "127.0.0.1", "-p", str(redis_port), "SET", "foo", "bar"], expect_ok=False)
        print("   That is the write-up's 'Connection reset by peer'.")

        step(4, "dbmtls with the write-up's DestinationRule (local paths)")
        dbmtls_cmd = _dbmtls_command(tmp, listen_port, redis_port, client)
        with _process(dbmtls_cmd, tmp / "dbmtls.log") as proxy:
            if not _started("dbmtls", listen_port, tmp / "dbmtls.log"):
                return 1
            cli = ["redis-cli", "-h", "127.0.0.1", "-p", str(listen_port)]
            ok = _through_dbmtls(cli, listen_port)
            _server_gone(cli, redis)
            _stop_and_show_log(proxy, tmp / "dbmtls.log")
    if ok:
        print(f"\n{GREEN}{BOLD}Demo passed:{RESET} refused without dbmtls, OK through it, no TLS options in the app.")
        return 0
    print(f"\n{RED}{BOLD}Demo failed:{RESET} expected OK and bar through dbmtls.")
    return 1


def _certificates(tmp: Path) -> tuple[Path, Path, Path]:
    """Step 1: the CA, the server's and the client's directories."""
    step(1, "Certificates, shaped like the cert-manager Secrets of the write-up")
    ca = create_ca(tmp / "ca", common_name="demo CA")
    server_names = ["foo-redis-master", "localhost", "127.0.0.1"]
    server = issue(ca, tmp / "foo-redis-tls", server_names=server_names)
    client = issue(ca, tmp / "client-certs", client_cn="jinsu")
    print(f"   CA                   {ca}/ca.crt")
    print(f"   server (foo-redis)   {server}/tls.crt   names: {', '.join(server_names)}")
    print(f"   client (jinsu)       {client}/tls.crt, tls.key, ca.crt")
    return ca, server, client


def _redis_command(tmp: Path, ca: Path, server: Path, port: int) -> list[str]:
    return [
        "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", f"{server}/tls.crt", "--tls-key-file", f"{server}/tls.key",
        "--tls-ca-cert-file", f"{ca}/ca.crt", "--tls-auth-clients", "yes",
        "--save", "", "--appendonly", "no", "--dir", str(tmp),
    ]  # fmt: skip


def _started(what: str, port: int, log: Path) -> bool:
    if _wait_port(port):
        return True
    print(f"{RED}{what} did not start:{RESET}\n{log.read_text()}")
    return False


def _dbmtls_command(tmp: Path, listen_port: int, redis_port: int, client: Path) -> list[str]:
    """Step 4: write and show the DestinationRule; the command that runs dbmtls with it."""
    dr = tmp / "destinationrule.yaml"
    dr.write_text(DESTINATION_RULE.format(listen=listen_port, redis=redis_port, certs=client))
    print(textwrap.indent(dr.read_text(), "   "))
    admin = f"127.0.0.1:{_free_port()}"
    print(f"   {DIM}${RESET} dbmtls run -c {dr.name} --admin {admin}")
    return [sys.executable, "-m", "dbmtls", "run", "-c", str(dr), "--admin", admin]


def _through_dbmtls(cli: list[str], listen_port: int) -> bool:
    """Step 5; True when Redis answered as it should."""
    step(5, f"The same plaintext redis-cli, pointed at dbmtls on 127.0.0.1:{listen_port}")
    out = show_cmd([*cli, "SET", "foo", "bar"], expect_ok=True)
    got = show_cmd([*cli, "GET", "foo"], expect_ok=True)
    return out == "OK" and got == "bar"


def _server_gone(cli: list[str], redis: subprocess.Popen[bytes]) -> None:
    step(6, "When something is wrong, the app is told what, in Redis's own words")
    redis.terminate()
    redis.wait(timeout=10)
    print("   (redis-server stopped)")
    show_cmd([*cli, "GET", "foo"], expect_ok=False)


def _stop_and_show_log(proxy: subprocess.Popen[bytes], log: Path) -> None:
    print(f"\n{BOLD}dbmtls log{RESET}")
    proxy.send_signal(signal.SIGTERM)
    code = proxy.wait(timeout=40)
    for line in log.read_text().splitlines():
        print(f"   {DIM}{line}{RESET}")
    print(f"   dbmtls exited with code {code} after SIGTERM")


if __name__ == "__main__":  # pragma: no cover
    os._exit(run_demo())
