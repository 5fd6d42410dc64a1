"""Docker for tests: a daemon that answers, the dbmtls image built once per session, and
containers that are always removed.

Fixtures (tests/conftest.py registers this module as a plugin):

``docker_daemon`` (session)
    The daemon behind ``/var/run/docker.sock`` answers.  When it does not, one is started the
    way this project's machines run it (``dockerd --iptables=false --bridge=none``), waited for
    by polling ``docker info`` against a deadline, and stopped at the end of the session.
    Tests are skipped, with the reason, when there is no docker binary, when not root (starting
    dockerd and debootstrapping the base need root) or when the daemon cannot be started;
    ``DBMTLS_REQUIRE_DOCKER=1`` (set by .ci/run) turns those skips into failures, so CI never
    passes without having run them.
``dbmtls_image`` (session)
    ``dbmtls:<version>`` (``DBMTLS_TEST_IMAGE`` overrides the name), built by scripts/image.sh
    unless the image already carries this tree's source hash in its ``io.dbmtls.source-hash``
    label: one build per session at most, none when nothing changed since the last one.
``containers`` (function)
    A :class:`Containers` factory; every container it made is ``docker rm -f``-ed afterwards,
    whether the test passed, failed or timed out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

from dbmtls import __version__

REPO = Path(__file__).resolve().parents[2]
IMAGE_SCRIPT = REPO / "scripts" / "image.sh"
HASH_LABEL = "io.dbmtls.source-hash"
TEST_LABEL = "io.dbmtls.test"  # on every container the tests start: `docker ps -a --filter label=...`
REQUIRE_ENV = "DBMTLS_REQUIRE_DOCKER"
DAEMON_START_TIMEOUT = 60.0
BUILD_TIMEOUT = 1500.0  # cold: debootstrap (1-3 min on 2 cores) + the build; warm: seconds


class DockerError(AssertionError):
    """A docker command failed: the command, its exit code and what it said."""

    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        self.proc = proc


def docker(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise DockerError(args, proc)
    return proc


def daemon_answers(timeout: float = 10.0) -> bool:
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=timeout, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_daemon(
    log_path: Path, timeout: float = DAEMON_START_TIMEOUT, extra_args: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``dockerd --iptables=false --bridge=none`` in the background, once ``docker info`` answers.

    No bridge and no iptables: that is how the daemon runs where the host's network cannot be
    reconfigured, and the tests need neither (containers use ``--network host`` or none).
    ``extra_args`` (``--host``, ``--data-root``, ``--exec-root``, ``--pidfile``) make a daemon
    apart from the default one; ``DOCKER_HOST`` then points the docker CLI at it.
    """
    if shutil.which("dockerd") is None:
        raise RuntimeError("dockerd is not installed (scripts/setup.sh installs docker.io as root)")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["dockerd", "--iptables=false", "--bridge=none", *extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C meant for pytest does not kill it mid-start
        )
    deadline = time.monotonic() + timeout
    while not daemon_answers(timeout=5.0):
        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited {proc.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            stop_daemon(proc)
            raise RuntimeError(f"dockerd did not answer within {timeout:g}s:\n{_tail(log_path)}")
        time.sleep(0.2)
    return proc


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: Docker tests must run here)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if shutil.which("docker") is None:
        _unavailable("no docker binary (scripts/setup.sh installs docker.io when run as root)")
    if os.geteuid() != 0:
        _unavailable("the Docker tests run as root (they may start dockerd and debootstrap a base image)")
    if daemon_answers():
        yield
        return
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    try:
        proc = start_daemon(log)
    except RuntimeError as exc:
        _unavailable(f"the Docker daemon does not answer and could not be started: {exc}")
    try:
        yield
    finally:
        stop_daemon(proc)


def source_hash() -> str:
    """The hash scripts/image.sh stores in the image's label: one definition, in the script."""
    proc = subprocess.run([str(IMAGE_SCRIPT), "--source-hash"], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def image_labels(image: str) -> dict[str, str] | None:
    proc = docker("image", "inspect", "--format", "{{json .Config.Labels}}", image, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout) or {}


@pytest.fixture(scope="session")
def dbmtls_image(docker_daemon: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    name = os.environ.get("DBMTLS_TEST_IMAGE", "dbmtls")
    tag = f"{name}:{__version__}"
    want = source_hash()
    labels = image_labels(tag)
    if labels is not None and labels.get(HASH_LABEL) == want:
        return tag
    log = tmp_path_factory.mktemp("image") / "image.log"
    # PYTHON: this interpreter's pip fills the wheelhouse (the repo's .venv need not exist in a
    # worktree); its configuration and CA bundle are the host's, which is the point.
    env = {**os.environ, "IMAGE": name, "PYTHON": sys.executable}
    started = time.monotonic()
    with open(log, "wb") as out:
        code = subprocess.run(
            [str(IMAGE_SCRIPT)], stdout=out, stderr=subprocess.STDOUT, env=env, timeout=BUILD_TIMEOUT, check=False
        ).returncode
    if code != 0:
        pytest.fail(f"scripts/image.sh exited {code}:\n{_tail(log, 60)}", pytrace=False)
    labels = image_labels(tag)
    assert labels is not None, f"scripts/image.sh did not make {tag}:\n{_tail(log)}"
    assert labels.get(HASH_LABEL) == want, f"{tag} carries {labels.get(HASH_LABEL)!r}, not this tree's {want!r}"
    print(f"\nbuilt {tag} in {time.monotonic() - started:.0f}s:\n{_tail(log)}", file=sys.stderr)
    return tag


class Container:
    """A detached container, by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def logs(self) -> str:
        """stdout and stderr, interleaved as the container wrote them."""
        proc = subprocess.run(
            ["docker", "logs", self.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30, check=False
        )
        return proc.stdout.decode(errors="replace")

    def inspect(self) -> dict[str, Any]:
        info: list[dict[str, Any]] = json.loads(docker("inspect", self.name).stdout)
        return info[0]

    @property
    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 30.0) -> list[str]:
        """The log lines matching the regular expression, once there are ``count`` of them.

        Fails at once, with the log, if the container stops before they appear."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.logs()
            found = [line for line in text.splitlines() if rx.search(line)]
            if len(found) >= count:
                return found
            if not self.running:
                raise AssertionError(f"{self.name} stopped before {count} line(s) matched {pattern!r}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{count} line(s) matching {pattern!r} not in {self.name}'s log after {timeout:g}s:\n{text}"
                )
            time.sleep(0.1)

    def exec(self, *cmd: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command in the container (as the image's user), no shell involved."""
        return docker("exec", self.name, *cmd, check=check, timeout=timeout)

    def stop(self, timeout: int = 30) -> int:
        """``docker stop`` (SIGTERM, SIGKILL after ``timeout`` s); the container's exit code."""
        docker("stop", "--time", str(timeout), self.name, timeout=timeout + 30)
        return int(self.inspect()["State"]["ExitCode"])


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log lines (``--log-format json``) of a log, in order; other lines are skipped."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


class Containers:
    """Starts containers from an image and removes every one of them in ``remove_all``."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.names: list[str] = []

    def _name(self) -> str:
        name = f"dbmtls-test-{uuid.uuid4().hex[:12]}"
        self.names.append(name)  # before `docker run`: a half-started container is removed too
        return name

    def run(self, *args: str, options: Sequence[str] = ()) -> Container:
        """``docker run -d [options] IMAGE args``."""
        name = self._name()
        docker("run", "-d", "--name", name, "--label", TEST_LABEL, *options, self.image, *args)
        return Container(name)

    def run_once(
        self, *args: str, options: Sequence[str] = (), timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """``docker run [options] IMAGE args`` in the foreground: its exit code and output.

        Not ``--rm``: a run cut short by the timeout would leave that container behind."""
        name = self._name()
        try:
            return docker(
                "run", "--name", name, "--label", TEST_LABEL, *options, self.image, *args, check=False, timeout=timeout
            )
        finally:
            docker("rm", "-f", name, check=False)

    def remove_all(self) -> None:
        for name in self.names:
            docker("rm", "-f", "--volumes", name, check=False)
        self.names.clear()


@pytest.fixture
def containers(dbmtls_image: str) -> Iterator[Containers]:
    made = Containers(dbmtls_image)
    try:
        yield made
    finally:
        made.remove_all()
