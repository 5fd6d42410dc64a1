"""Shared fixtures: one throwaway PKI per session, real servers per module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.certs import PKI, make_pki
from support.redis_server import RedisTLS
from support.tls_echo import TLSEchoServer

# docker_daemon, dbmtls_image, containers: the Docker fixtures, for any test that needs them
pytest_plugins = ["support.docker"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def redis_tls(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTLS]:
    """mTLS-only Redis: port 0, tls-auth-clients yes (the seed scenario's step 4)."""
    server = RedisTLS(tmp_path_factory.mktemp("redis"), pki.server, pki.ca_cert).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def echo(pki: PKI) -> Iterator[TLSEchoServer]:
    """A TLS echo server that requires client certificates and records their CNs."""
    server = TLSEchoServer(pki.server, pki.ca_cert).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["python", "native"])
def data_plane(request: pytest.FixtureRequest) -> str:
    """The ``dataPlane`` a module's dbmtls runs with: the end-to-end tests of the protocols the native
    plane relays (Redis, MongoDB, TCP) run against both, asserting the same things (docs/native.md).

    Without the extension the native runs are skipped with the reason, unless
    ``DBMTLS_REQUIRE_NATIVE=1`` (set it in CI, where the extension is always built) makes that a
    failure: a silent fallback would test the Python plane twice.
    """
    plane: str = request.param
    if plane == "native":
        from dbmtls.native import load

        module, why = load()
        if module is None:
            if os.environ.get("DBMTLS_REQUIRE_NATIVE") == "1":
                pytest.fail(f"DBMTLS_REQUIRE_NATIVE=1: {why}")
            pytest.skip(str(why))
    return plane


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite the expected outputs of golden-file tests (tests/k8s/golden) from the current code",
    )
