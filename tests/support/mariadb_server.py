"""A real MariaDB server (the OS package's ``mariadbd``), TLS required, on a free port.

``mariadb-install-db`` makes a fresh data directory (about half a second), ``mariadbd`` runs on
it with its own unix socket and TCP port, and accounts are created as root over that socket
with the ``mariadb`` CLI (a unix socket counts as secure transport, so ``require_secure_transport``
does not get in the way of the set-up).

The server drops privileges to the ``mysql`` user when the tests run as root, so everything it
reads (data directory, certificate copies) lives in a directory of its own under /tmp that that
user owns: pytest's tmp directories are private to root.  ``stop()`` removes it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from support.certs import Pair
from support.net import free_port, wait_port


class MariaDB:
    def __init__(
        self,
        server: Pair | None,
        ca_cert: str | None,
        *,
        require_secure_transport: bool = True,
        max_connections: int = 300,
    ) -> None:
        """``server=None``: TLS off (the server does not offer CLIENT_SSL)."""
        for tool in ("mariadbd", "mariadb-install-db", "mariadb"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (make setup installs mariadb-server)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dbmtls-mariadb-"))
        self.datadir = self.dir / "data"
        self.socket = str(self.dir / "mysqld.sock")
        self.log_path = self.dir / "error.log"
        self._as_root = os.geteuid() == 0
        tls_args: list[str] = []
        if server is not None:
            assert ca_cert is not None
            certs = self.dir / "certs"
            certs.mkdir()
            for src, name in ((server.cert, "server.crt"), (server.key, "server.key"), (ca_cert, "ca.crt")):
                shutil.copyfile(src, certs / name)
            tls_args = [
                f"--ssl-cert={certs / 'server.crt'}",
                f"--ssl-key={certs / 'server.key'}",
                f"--ssl-ca={certs / 'ca.crt'}",
                f"--require-secure-transport={'ON' if require_secure_transport else 'OFF'}",
            ]
        else:
            tls_args = ["--skip-ssl"]
        common = [
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--innodb-log-file-size=8M",
            "--innodb-buffer-pool-size=32M",
        ]
        if self._as_root:
            common.append("--user=mysql")
        self.install_cmd = [
            "mariadb-install-db",
            *common,
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
        ]
        self.cmd = [
            "mariadbd",
            *common,
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket}",
            f"--pid-file={self.dir / 'mysqld.pid'}",
            f"--log-error={self.log_path}",
            "--skip-log-bin",
            "--skip-name-resolve",
            f"--max-connections={max_connections}",
            "--max-allowed-packet=256M",
            "--innodb-flush-log-at-trx-commit=0",
            *tls_args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def _chown(self) -> None:
        if not self._as_root:
            return
        mysql = pwd.getpwnam("mysql")
        for root, dirs, files in os.walk(self.dir):
            for name in (root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)):
                os.chown(name, mysql.pw_uid, mysql.pw_gid)

    def start(self) -> MariaDB:
        self._chown()
        subprocess.run(self.install_cmd, check=True, capture_output=True, timeout=60)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # "ready for connections" comes after the port opens and after the signal handling
            # is set up (a SIGTERM before that is not acted on until much later).
            deadline = time.monotonic() + 30
            while "ready for connections" not in self._log():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise TimeoutError("mariadbd is not ready")
                time.sleep(0.02)
            wait_port(self.port, timeout=5)
        except Exception:
            log = self._log()
            self.stop()
            raise RuntimeError(f"mariadbd did not start:\n{log}") from None
        return self

    def _log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def sql(self, statements: str) -> str:
        """Run SQL as root over the unix socket; returns the tab-separated output."""
        out = subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot", "--batch", "--skip-column-names"],
            input=statements.encode(),
            check=True,
            capture_output=True,
            timeout=30,
        )
        return out.stdout.decode()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
