"""The README's commands, run as a first-time user runs them.

The "By hand" walk-through block is taken from README.md and run by bash exactly as written, in
a fresh directory, with this venv's ``dbmtls`` first on PATH (what ``. .venv/bin/activate``
does): the certificates, the two TLS-only servers (scripts/try-servers.sh), the config written
out, ``check``, ``run``, ``redis-cli`` and ``psql`` in plaintext, SIGTERM.  The ports are the
README's own, so they must be free (the test says which one is not).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.net import free_port
from support.readme import of_kind

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def _taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_the_by_hand_walk_through_runs_as_written(tmp_path: Path) -> None:
    (walk,) = [b for b in of_kind("run") if "dbmtls run" in b.text]
    busy = [p for p in (16379, 15432, 6380, 5433, 15000) if _taken(p)]
    assert not busy, f"the README walk-through uses ports {busy}, which something on this machine holds"
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")  # the walk-through runs from a checkout
    try:
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", walk.text],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run([str(ROOT / "scripts" / "try-servers.sh"), "stop", str(tmp_path / "try")], check=False)
    shown = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, shown
    lines = done.stdout.splitlines()
    assert "OK" in lines and "bar" in lines and "jinsu" in lines, shown  # redis-cli SET, GET; psql
    assert "dbmtls is ready" in done.stdout + done.stderr, shown
    assert "listen 127.0.0.1:6380" not in done.stderr  # check found the ports free
    assert " stopped" in done.stderr, shown  # dbmtls drained and stopped on SIGTERM
    assert not (tmp_path / "try" / "try-servers").exists()  # try-servers.sh stop cleaned up


def test_make_demo_runs_the_story(tmp_path: Path) -> None:
    """`make demo` is setup (run by `make test` already) and then `dbmtls demo`."""
    done = subprocess.run(
        ["dbmtls", "demo"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Demo passed" in done.stdout


def test_try_servers_refuses_without_certificates(tmp_path: Path) -> None:
    """The helper says what is missing instead of starting servers that cannot work."""
    env = {**_env(), "REDIS_PORT": str(free_port()), "PG_PORT": str(free_port())}
    done = subprocess.run(
        [str(ROOT / "scripts" / "try-servers.sh"), "start", str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "pki/ca/ca.crt is missing: run dbmtls certs ca / certs issue first" in done.stderr
