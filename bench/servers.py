"""Redis for the benchmark: TLS with client certificates, plus a plaintext side door.

PostgreSQL and MariaDB come from ``tests/support/`` (shared with the tests);
Redis needs more than ``tests/support/redis_server.py`` gives: a plaintext port
on the same process, for the "plaintext, no TLS" baseline and for reading the
server's own counters (INFO) without adding TLS load.  The counters are how
every run is checked: a proxy that fails handshakes, or answers with errors,
would otherwise look fast.
"""

from __future__ import annotations

import socket
from pathlib import Path

from bench.procs import Service, free_port

from support.certs import PKI


class Redis:
    """redis-server with a TLS port (tls-auth-clients yes) and a plaintext port on the same process."""

    # maxclients: Redis's own default.  A relay that keeps a server connection after its client
    # closed (dbmtls's Python plane: up to 1 s, HALF_CLOSE_LINGER) holds hundreds of them under the
    # connection-per-request load; a limit below production's would refuse some mid-run.
    def __init__(self, workdir: Path, pki: PKI, *, maxclients: int = 10000) -> None:
        self.tls_port = free_port()
        self.plain_port = free_port()
        d = workdir / "redis"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [
            "redis-server",
            "--port", str(self.plain_port),
            "--tls-port", str(self.tls_port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", pki.server.cert,
            "--tls-key-file", pki.server.key,
            "--tls-ca-cert-file", pki.ca_cert,
            "--tls-auth-clients", "yes",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(d),
            "--maxclients", str(maxclients),
        ]  # fmt: skip
        self.service = Service("redis-server", cmd, d / "redis.log", port=self.tls_port)

    def start(self) -> Redis:
        self.service.start()
        return self

    def stop(self) -> None:
        self.service.stop()

    def command(self, *args: bytes) -> bytes:
        """One RESP command on the plaintext port; returns the raw reply (enough for INFO and SET)."""
        out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        with socket.create_connection(("127.0.0.1", self.plain_port), timeout=10) as s:
            s.sendall(out)
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if buf.startswith((b"+", b"-", b":")) and buf.endswith(b"\r\n"):
                    break
                if buf.startswith(b"$"):
                    head, _, rest = buf.partition(b"\r\n")
                    if len(rest) >= int(head[1:]) + 2:
                        break
            return buf

    def info_stats(self) -> dict[str, int]:
        reply = self.command(b"INFO", b"stats").decode()
        out: dict[str, int] = {}
        for line in reply.splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip().isdigit():
                out[key] = int(value)
        return out

    def hits(self) -> int:
        return self.info_stats()["keyspace_hits"]
