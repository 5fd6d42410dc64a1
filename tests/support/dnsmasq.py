"""A real DNS server for the ``dns.mode: direct`` tests: dnsmasq on a free UDP+TCP port.

It answers only what the test gives it (``--host-record``: an A record, and no AAAA, which
dnsmasq then answers NODATA like a cluster DNS for an IPv4 Service), NXDOMAIN for every other
name (``--local=/#/``: never forwarded anywhere), and reads neither /etc/hosts nor
/etc/resolv.conf.  Queries are logged, so a test can see what was asked.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


class Dnsmasq:
    def __init__(self, workdir: Path, records: dict[str, str], *, listen: str = "127.0.0.1", port: int = 0) -> None:
        """``port`` 0: a free one.  A fixed port (53, for a resolv.conf nameserver line) needs root."""
        if shutil.which("dnsmasq") is None:
            raise RuntimeError("dnsmasq is not installed (scripts/setup.sh installs dnsmasq-base)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.records = records
        self.listen = listen
        self.fixed_port = port
        self.port = port
        self.log_path = workdir / "dnsmasq.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        return [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",  # no distribution config
            "--pid-file=",
            f"--port={self.port}",
            f"--listen-address={self.listen}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--local=/#/",  # everything not below is NXDOMAIN, never forwarded
            "--local-ttl=30",  # like a cluster DNS (dnsmasq's default, 0, would make nothing cacheable)
            *(f"--host-record={name},{address}" for name, address in self.records.items()),
            "--log-queries",
            "--log-facility=-",
        ]

    def start(self, timeout: float = 10.0) -> Dnsmasq:
        for _ in range(5):  # the free port may be taken between the check and dnsmasq's bind
            self.port = self.fixed_port or free_udp_tcp_port()
            log = open(self.log_path, "wb")  # noqa: SIM115 -- handed to the child
            self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if "started, version" in self.log():
                    return self  # logged once its sockets are bound (a bind failure exits before it)
                if self.proc.poll() is not None:
                    break
                time.sleep(0.02)
            self.stop()
            if self.fixed_port or "Address already in use" not in self.log():
                break
        raise AssertionError(f"dnsmasq did not start:\n{self.log()}")

    @property
    def nameserver(self) -> str:
        return self.listen if self.port == 53 else f"{self.listen}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def queries(self) -> list[str]:
        """The names asked, in order ("A foo.ns1.svc.cluster.local")."""
        out = []
        for line in self.log().splitlines():
            if "query[" in line:
                kind = line.split("query[", 1)[1].split("]", 1)[0]
                name = line.split("] ", 1)[1].split(" from ", 1)[0]
                out.append(f"{kind} {name}")
        return out

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(timeout=10)
            self.proc = None


def write_resolv_conf(
    path: Path, *, nameservers: Sequence[str] = (), search: Sequence[str] = (), ndots: int = 1
) -> Path:
    lines = [f"nameserver {n}" for n in nameservers]
    if search:
        lines.append("search " + " ".join(search))
    lines.append(f"options ndots:{ndots}")
    path.write_text("\n".join(lines) + "\n")
    return path
