"""A real redis-server, TLS only, client certificates required, on a free port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from support.certs import Pair
from support.net import free_port, wait_port


class RedisTLS:
    def __init__(
        self,
        workdir: Path,
        server: Pair,
        ca_cert: str,
        *,
        auth_clients: str = "yes",
        maxclients: int = 1000,
        bind: str = "127.0.0.1",
        port: int | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (make setup installs it)")
        self.port = port or free_port(bind)
        self.bind = bind  # another loopback address (127.0.0.2) tells it apart from the proxy's side
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"redis-{self.port}.log"
        self.cmd = [
            "redis-server",
            "--port", "0",
            "--tls-port", str(self.port),
            "--bind", bind,
            "--tls-cert-file", server.cert,
            "--tls-key-file", server.key,
            "--tls-ca-cert-file", ca_cert,
            "--tls-auth-clients", auth_clients,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(self.log_path),
            "--maxclients", str(maxclients),
            "--proto-max-bulk-len", "64mb",
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisTLS:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, host=self.bind)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
