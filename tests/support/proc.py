"""Run ``dbmtls run`` as a real subprocess, as users do, and read its log."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from support.net import free_port, wait_port


class Dbmtls:
    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any] | str,
        *,
        admin: bool = False,
        args: tuple[str, ...] = (),
        nofile: int | None = None,
        wrap: tuple[str, ...] = (),
    ):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"dbmtls-{time.monotonic_ns()}.yaml"
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)
        self.log_path = self.config_path.with_suffix(".log")
        self.admin_port = free_port() if admin else None
        self.args = args
        self.nofile = nofile  # RLIMIT_NOFILE (soft and hard) for the process: fd exhaustion tests
        self.wrap = wrap  # a command that execs the rest (e.g. unshare into a private /etc/hosts)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        assert self.admin_port is not None
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait_ports: tuple[int, ...] = ()) -> Dbmtls:
        admin = f"127.0.0.1:{self.admin_port}" if self.admin_port else "off"
        cmd = [
            *self.wrap,
            sys.executable,
            "-m",
            "dbmtls",
            "run",
            "-c",
            str(self.config_path),
            "--admin",
            admin,
            *self.args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ}, preexec_fn=limit if nofile else None
        )
        try:
            for port in wait_ports:
                wait_port(port)
            if self.admin_port:
                wait_port(self.admin_port)
        except TimeoutError:
            self.stop(check=False)
            raise AssertionError(f"dbmtls did not start; log:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the dbmtls log after {timeout}s:\n{self.log()}")

    def wait_line(self, pattern: str, timeout: float = 10.0) -> str:
        """The first log line matching the regular expression ``pattern`` (waiting for it)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matches {pattern!r}:\n{self.log()}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, *, check: bool = True, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            if check:
                raise AssertionError(f"dbmtls did not exit after SIGTERM; log:\n{self.log()}") from None
        self._log.close()
        self.proc = None
        if check and code != 0:
            raise AssertionError(f"dbmtls exited {code}; log:\n{self.log()}")
        return code

    def __enter__(self) -> Dbmtls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(check=False)


def on_plane(proc: Dbmtls, data_plane: str) -> Dbmtls:
    """After ``start``: make sure the process runs the data plane the test asked for (the native
    plane falls back to python, with a log line, when it cannot run)."""
    if data_plane == "native":
        line = proc.wait_line(r"data plane native native=")
        # every protocol runs natively: a database left on python would test that plane twice
        assert " python=" not in line, line
    return proc


def tls_block(pki: Any, *, client: Any = None, ca: str | None = None, **extra: Any) -> dict[str, Any]:
    c = client or pki.client
    out: dict[str, Any] = {
        "mode": "MUTUAL",
        "clientCertificate": c.cert,
        "privateKey": c.key,
        "caCertificates": ca or pki.ca_cert,
    }
    out.update(extra)
    return out
