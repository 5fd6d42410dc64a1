"""The proxies under test, each started from a config file written to the temp dir.

Every proxy does the same job: plaintext on a loopback port toward the load
generator, verified mutual TLS toward the server (chain against the test CA,
host name ``localhost``, client certificate CN=jinsu).  Settings that change
the work done (threads, workers) are pinned to one core's worth: HAProxy
``nbthread 1``, nginx ``worker_processes 1``; stunnel and PgBouncer are what
they are (stunnel: a thread per connection; PgBouncer: one thread).  Logging
stays at each proxy's default level, as shipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Service, as_user, chown_tree, free_port, wait_port

from support.certs import PKI

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


@dataclass(frozen=True)
class Upstream:
    port: int
    protocol: str  # dbmtls protocol: redis, postgres, mysql
    host: str = "127.0.0.1"  # where to dial
    name: str = "localhost"  # the name the server certificate must carry


class Proxy:
    """A started proxy: `port` is where the app connects, `pids` are what CPU is charged to."""

    def __init__(self, name: str, service: Service, *, extra_ports: tuple[int, ...] = ()) -> None:
        self.name = name
        self.service = service
        self.extra_ports = extra_ports  # must listen too (dbmtls's admin server when measuring with metrics)

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def pids(self) -> list[int]:
        return [self.service.pid]

    def start(self) -> Proxy:
        self.service.start()
        for port in self.extra_ports:
            try:
                wait_port(port, timeout=10)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"{self.name}: nothing listens on {port}; log:\n{self.service.tail()}") from None
        return self

    def stop(self) -> None:
        self.service.stop()


def _dir(workdir: Path, name: str) -> Path:
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def dbmtls(
    workdir: Path,
    pki: PKI,
    up: Upstream,
    *,
    metrics: bool = False,
    label: str = "dbmtls",
    data_plane: str = "python",
    resumption: bool | None = None,
    preconnect: int = 0,
) -> DbmtlsProxy:
    d = _dir(workdir, re.sub(r"[^\w.+-]+", "-", label))
    port = free_port()
    config = dbmtls_config(pki, up, port, data_plane=data_plane, resumption=resumption, preconnect=preconnect)
    cfg = d / "dbmtls.yaml"
    cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
    admin_port = free_port() if metrics else None
    admin = f"127.0.0.1:{admin_port}" if admin_port else "off"
    cmd = [sys.executable, "-m", "dbmtls", "run", "-c", str(cfg), "--admin", admin]
    extra = (admin_port,) if admin_port else ()
    service = Service(label, cmd, d / "dbmtls.log", port=port)
    return DbmtlsProxy(label, service, extra_ports=extra, data_plane=data_plane)


def dbmtls_config(
    pki: PKI | None,
    up: Upstream,
    port: int,
    *,
    data_plane: str = "python",
    resumption: bool | None = None,
    preconnect: int = 0,
) -> dict[str, Any]:
    """dbmtls's config for one database.  ``tls.sessionResumption`` and ``preconnect`` are written
    only when asked for (--resumption, --preconnect): a dbmtls that does not know them rejects the
    whole file, so a plain run must not depend on them."""
    tls: dict[str, object] = {
        "mode": "MUTUAL",
        "clientCertificate": pki.client.cert if pki else "client.crt",
        "privateKey": pki.client.key if pki else "client.key",
        "caCertificates": pki.ca_cert if pki else "ca.crt",
    }
    if resumption is not None:
        tls["sessionResumption"] = resumption
    database: dict[str, object] = {
        "name": "bench",
        "protocol": up.protocol,
        "listen": f"127.0.0.1:{port}",
        "address": f"{up.name}:{up.port}",
        "dial": f"{up.host}:{up.port}",
        "tls": tls,
    }
    if preconnect > 0:
        database["preconnect"] = {"connections": preconnect, "maxIdle": "30s"}
    # dataPlane native: the relay in dbmtls._native (docs/native.md)
    return {"dataPlane": data_plane, "databases": [database]}


class DbmtlsProxy(Proxy):
    """dbmtls, which says in its log which data plane relays each database."""

    def __init__(self, name: str, service: Service, *, extra_ports: tuple[int, ...], data_plane: str) -> None:
        super().__init__(name, service, extra_ports=extra_ports)
        self.data_plane = data_plane
        self._log_from = 0

    def start(self) -> DbmtlsProxy:
        self.mark_log()
        super().start()
        return self

    def mark_log(self) -> None:
        """The log file is appended to (a later suite's dbmtls of the same name writes to it too):
        this start's lines are those after the current end."""
        log = self.service.log
        self._log_from = log.stat().st_size if log.exists() else 0

    def ran_plane(self) -> str:
        """The data plane that relays the database, from this start's log: ``native``, ``python``
        (asked for python, or native asked for and not had: no extension, or a protocol the native
        plane does not relay yet) or ``unknown`` (native asked for, and the log does not say)."""
        if self.data_plane != "native":
            return "python"
        try:
            with open(self.service.log, "rb") as f:
                f.seek(self._log_from)
                text = f.read(1 << 20).decode(errors="replace")
        except FileNotFoundError:
            return "unknown"
        if "dataPlane native is not available" in text:
            return "python"
        for line in text.splitlines():
            if "data plane native" in line:
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                return "native" if "bench" in fields.get("native", "").split(",") else "python"
        return "unknown"


def stunnel(workdir: Path, pki: PKI, up: Upstream, *, protocol: str | None = None) -> Proxy:
    d = _dir(workdir, "stunnel")
    port = free_port()
    cfg = d / "stunnel.conf"
    cfg.write_text(
        "foreground = yes\n"
        f"output = {d / 'stunnel.log'}\n"
        f"pid =\n"
        "[bench]\n"
        "client = yes\n"
        f"accept = 127.0.0.1:{port}\n"
        f"connect = {up.host}:{up.port}\n"
        + (f"protocol = {protocol}\n" if protocol else "")
        + f"cert = {pki.client.cert}\n"
        f"key = {pki.client.key}\n"
        f"CAfile = {pki.ca_cert}\n"
        "verifyChain = yes\n"
        f"checkHost = {up.name}\n"
        f"sni = {up.name}\n"
    )
    return Proxy("stunnel", Service("stunnel", ["stunnel4", str(cfg)], d / "stdout.log", port=port))


def haproxy(workdir: Path, pki: PKI, up: Upstream, *, maxconn: int = 2000) -> Proxy:
    d = _dir(workdir, "haproxy")
    port = free_port()
    pem = d / "client.pem"  # HAProxy wants certificate and key in one file
    pem.write_text(Path(pki.client.cert).read_text() + Path(pki.client.key).read_text())
    os.chmod(pem, 0o600)
    cfg = d / "haproxy.cfg"
    cfg.write_text(
        "global\n"
        "  nbthread 1\n"
        f"  maxconn {maxconn}\n"
        "defaults\n"
        "  mode tcp\n"
        f"  maxconn {maxconn}\n"
        "  timeout connect 5s\n"
        "  timeout client 120s\n"
        "  timeout server 120s\n"
        "frontend fe\n"
        f"  bind 127.0.0.1:{port}\n"
        "  default_backend be\n"
        "backend be\n"
        f"  server db {up.host}:{up.port} ssl verify required ca-file {pki.ca_cert} crt {pem}"
        f" sni str({up.name}) verifyhost {up.name}\n"
    )
    # -db: foreground, no daemon, a single process; SIGUSR1 is its soft stop.
    cmd = ["haproxy", "-db", "-f", str(cfg)]
    return Proxy("HAProxy", Service("haproxy", cmd, d / "haproxy.log", port=port, stop_signal=signal.SIGTERM))


def nginx(workdir: Path, pki: PKI, up: Upstream, *, worker_connections: int = 2048, passthrough: bool = False) -> Proxy:
    """nginx stream, doing the upstream TLS like dbmtls; ``passthrough``: a plain layer-4 relay that
    only copies bytes (the client does its own TLS through it): the floor of any relay's cost."""
    d = _dir(workdir, "nginx-passthrough" if passthrough else "nginx")
    port = free_port()
    cfg = d / "nginx.conf"
    cfg.write_text(
        f"load_module {NGINX_STREAM_MODULE};\n"
        "daemon off;\n"
        "worker_processes 1;\n"
        f"pid {d / 'nginx.pid'};\n"
        f"error_log {d / 'error.log'} warn;\n"
        f"events {{ worker_connections {worker_connections}; }}\n"
        "stream {\n"
        "  server {\n"
        f"    listen 127.0.0.1:{port};\n"
        f"    proxy_pass {up.host}:{up.port};\n"
        + (
            ""
            if passthrough
            else "    proxy_ssl on;\n"
            f"    proxy_ssl_certificate {pki.client.cert};\n"
            f"    proxy_ssl_certificate_key {pki.client.key};\n"
            f"    proxy_ssl_trusted_certificate {pki.ca_cert};\n"
            "    proxy_ssl_verify on;\n"
            # nginx before 1.23.4 (Debian 12 ships 1.22) offers only TLS 1.0-1.2 toward the server
            # by default; every other relay and dbmtls negotiate TLS 1.3 (bench/README.md, Caveats)
            "    proxy_ssl_protocols TLSv1.2 TLSv1.3;\n"
            f"    proxy_ssl_name {up.name};\n"
            "    proxy_ssl_server_name on;\n"
        )
        + "  }\n"
        "}\n"
    )
    cmd = ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(cfg)]
    name = "nginx L4 passthrough" if passthrough else "nginx"
    return Proxy(name, Service(d.name, cmd, d / "stdout.log", port=port, stop_signal=signal.SIGQUIT))


def pgbouncer(workdir: Path, pki: PKI, up: Upstream, *, db: str, user: str, pool_size: int = 20) -> Proxy:
    """Session pooling, server_tls_sslmode=verify-full, trust on the app side (it refuses to run as root)."""
    d = _dir(workdir, "pgbouncer")
    port = free_port()
    cert, key, ca = d / "client.crt", d / "client.key", d / "ca.crt"
    shutil.copy(pki.client.cert, cert)
    shutil.copy(pki.client.key, key)
    shutil.copy(pki.ca_cert, ca)
    os.chmod(key, 0o600)
    (d / "users.txt").write_text(f'"{user}" ""\n')
    cfg = d / "pgbouncer.ini"
    cfg.write_text(
        "[databases]\n"
        f"{db} = host={up.name} port={up.port} dbname={db} user={user}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        f"logfile = {d / 'pgbouncer.log'}\n"
        "auth_type = trust\n"
        f"auth_file = {d / 'users.txt'}\n"
        "pool_mode = session\n"
        f"max_client_conn = {max(500, pool_size * 2)}\n"
        f"default_pool_size = {pool_size}\n"
        "server_tls_sslmode = verify-full\n"
        f"server_tls_ca_file = {ca}\n"
        f"server_tls_cert_file = {cert}\n"
        f"server_tls_key_file = {key}\n"
    )
    chown_tree(d, "postgres")
    os.chmod(workdir, 0o755)  # noqa: S103 -- pgbouncer runs as postgres and reads its files here
    cmd = as_user("postgres", ["pgbouncer", str(cfg)])
    return Proxy("PgBouncer", Service("pgbouncer", cmd, d / "stdout.log", port=port, stop_signal=signal.SIGINT))
