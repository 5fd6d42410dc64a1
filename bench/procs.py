"""Long-running processes for the benchmark: servers and proxies, each logging to a file in the temp dir."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

from support.net import free_port, wait_port

__all__ = ["Service", "as_user", "chown_tree", "free_port", "wait_port"]


def as_user(user: str, cmd: list[str]) -> list[str]:
    """Prefix cmd so it runs as an unprivileged OS user when we are root (postgres, pgbouncer refuse root)."""
    if os.geteuid() != 0:
        return cmd
    # setpriv execs (no PAM session, no extra parent process), so the PID we start is the server's own.
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]


def chown_tree(path: Path, user: str) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        for f in files:
            os.chown(os.path.join(dirpath, f), pw.pw_uid, pw.pw_gid)


class Service:
    """One process started in the foreground; its PID (or its child's, behind runuser) is what we measure."""

    def __init__(self, name: str, cmd: list[str], log: Path, *, port: int, stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.cmd = cmd
        self.log = log
        self.port = port
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Service:
        if shutil.which(self.cmd[0]) is None and not Path(self.cmd[0]).exists():
            raise RuntimeError(f"{self.cmd[0]} is not installed")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.log.parent
            )
        try:
            wait_port(self.port, timeout=timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.name} did not listen on {self.port}; log:\n{self.tail()}") from None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}; log:\n{self.tail()}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                # The whole session: nginx/haproxy workers must go too.
                os.killpg(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
