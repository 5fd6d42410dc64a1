"""A real PostgreSQL 15 cluster for the tests: initdb into a temp dir, TLS with the test CA.

The tests run as root and PostgreSQL refuses to, so the cluster belongs to the
unprivileged ``postgres`` user: its directory lives outside pytest's root-only
tmp tree and the server is exec'd through ``setpriv`` (no intermediate process,
so the signal that stops it reaches the postmaster).  Administration goes over
the unix socket in the temp dir (``local all postgres trust``); TCP access is
whatever ``hba`` says -- by default TLS only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from support.certs import Pair
from support.net import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"

# TLS only for TCP; cert auth (CN must equal the user) for everyone but the SCRAM user,
# who needs a password *and* a client certificate from the CA.
DEFAULT_HBA = """\
local all postgres trust
hostssl all scram_user 127.0.0.1/32 scram-sha-256 clientcert=verify-ca
hostssl all all 127.0.0.1/32 cert clientcert=verify-full
"""


def _as_postgres() -> list[str]:
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


class PostgresTLS:
    def __init__(
        self,
        server: Pair | None,
        ca_cert: str | None,
        *,
        ssl: bool = True,
        hba: str = DEFAULT_HBA,
        max_connections: int = 160,
        listen: str = "127.0.0.1",
    ) -> None:
        if not (PG_BIN / "postgres").exists():
            raise RuntimeError(f"PostgreSQL 15 is not installed ({PG_BIN})")
        self.listen = listen  # another loopback address (127.0.0.3) tells it apart from the proxy's side
        self.port = free_port(listen)
        self.root = Path(tempfile.mkdtemp(prefix="dbmtls-pg-"))
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.log_path = self.root / "server.log"
        self.server = server
        self.ca_cert = ca_cert
        self.ssl = ssl
        self.hba = hba
        self.max_connections = max_connections
        self.proc: subprocess.Popen[bytes] | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> PostgresTLS:
        pw = pwd.getpwnam("postgres")
        self.sockdir.mkdir()
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chown(self.sockdir, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            [*_as_postgres(), str(PG_BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        conf = [
            f"listen_addresses = '{self.listen}'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.sockdir}'",
            f"max_connections = {self.max_connections}",
            "shared_buffers = 32MB",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "log_connections = on",
            "log_disconnections = off",
            "log_min_messages = info",
            f"ssl = {'on' if self.ssl else 'off'}",
        ]
        if self.ssl:
            assert self.server is not None and self.ca_cert is not None
            for src, name in (
                (self.server.cert, "server.crt"),
                (self.server.key, "server.key"),
                (self.ca_cert, "ca.crt"),
            ):
                dst = self.data / name
                shutil.copyfile(src, dst)
                os.chown(dst, pw.pw_uid, pw.pw_gid)
                dst.chmod(0o600)
            conf += ["ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'", "ssl_ca_file = 'ca.crt'"]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n".join(conf) + "\n")
        (self.data / "pg_hba.conf").write_text(self.hba)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            [*_as_postgres(), str(PG_BIN / "postgres"), "-D", str(self.data)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{self.log()}")
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", str(self.sockdir), "-p", str(self.port)], check=False
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- administration over the unix socket ------------------------------------------

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run SQL as the superuser; return psql's unaligned, tuples-only output."""
        out = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", str(self.sockdir), "-p", str(self.port),
             "-U", SUPERUSER, "-d", database, "-c", statement],
            check=False, capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "/usr/bin")},
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"SQL failed: {statement}\n{out.stderr}")
        return out.stdout.strip()

    def create_user(self, name: str, *, password: str | None = None, database: str | None = None) -> None:
        pw = f" PASSWORD '{password}'" if password else ""
        self.sql(f'CREATE ROLE "{name}" LOGIN{pw}')
        if database:
            self.sql(f'CREATE DATABASE "{database}" OWNER "{name}"')

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def wait_log(self, needle: str, *, since: int = 0, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_since(since)
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the postgres log after {timeout}s:\n{self.log_since(since)}")
