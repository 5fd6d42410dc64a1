"""The admin HTTP server in-process: real HTTP over a loopback socket, a fake Control behind it.

Every exchange waits for the server to close the connection (one request per
connection), so the fake's records are complete when a test looks at them: no
sleeps anywhere.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from dbmtls.admin import server as admin_server
from dbmtls.admin.server import MAX_BODY, MAX_HEAD, AdminServer, _is_loopback_host
from dbmtls.config.model import Config
from dbmtls.errors import ConfigError
from dbmtls.proxy.runtime import DatabaseRuntime
from dbmtls.proxy.server import Proxy
from dbmtls.tls.reload import ReloadCounts
from support.net import free_port

T = TypeVar("T")
TEXT = "text/plain; charset=utf-8"


def _config() -> Config:
    return Config.model_validate(
        {
            "databases": [
                {
                    "name": "cache",
                    "protocol": "redis",
                    "listen": "127.0.0.1:6379",
                    "address": "cache.example:6379",
                    "tls": {"mode": "MUTUAL", "clientCertificate": "/c/tls.crt", "privateKey": "/c/tls.key"},
                }
            ]
        }
    )


@dataclass
class FakeControl:
    """What the App offers the admin server, with every call recorded."""

    config: Config = field(default_factory=_config)
    problems: list[str] = field(default_factory=list)
    shutdowns: list[str] = field(default_factory=list)
    reloads: list[str] = field(default_factory=list)
    reload_problems: list[str] = field(default_factory=list)
    counts: dict[str, ReloadCounts] = field(default_factory=lambda: {"cache": ReloadCounts(success=2, failure=1)})

    def __post_init__(self) -> None:
        self._runtimes = Proxy(self.config).runtimes  # built, never started: no sockets

    @property
    def runtimes(self) -> Mapping[str, DatabaseRuntime]:
        return self._runtimes

    @property
    def reload_counts(self) -> Mapping[str, ReloadCounts]:
        return self.counts

    def readiness(self) -> list[str]:
        return list(self.problems)

    def request_shutdown(self, why: str) -> None:
        self.shutdowns.append(why)

    async def reload(self, why: str) -> list[str]:
        self.reloads.append(why)
        return list(self.reload_problems)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


class _Client(asyncio.Protocol):
    """Collects everything the server sends until it closes (a reset after the answer is fine)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


async def _raw(port: int, *chunks: bytes, eof: bool = False) -> bytes:
    """Send ``chunks`` and return all the server sent before it closed the connection."""
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(_Client, "127.0.0.1", port)
    for chunk in chunks:
        transport.write(chunk)
    if eof:
        transport.write_eof()
    try:
        async with asyncio.timeout(10):  # a safety net for a hung server, not a synchronisation
            await client.closed.wait()
    finally:
        transport.close()
    return bytes(client.data)


def _parse(raw: bytes) -> Reply:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw!r}"
    lines = head.decode("ascii").split("\r\n")
    version, status, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body), raw
    return Reply(int(status), headers, body)


async def _request(
    port: int, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> Reply:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    return _parse(await _raw(port, head.encode() + b"\r\n" + body))


def _serve(control: FakeControl, scenario: Callable[[int], Awaitable[T]], **server_options: Any) -> T:
    return _serve_server(control, lambda _server, port: scenario(port), **server_options)


def _serve_server(
    control: FakeControl, scenario: Callable[[AdminServer, int], Awaitable[T]], **server_options: Any
) -> T:
    """Like ``_serve``, for scenarios that also look at the server's state."""

    async def main() -> T:
        port = free_port()
        server = AdminServer(control, f"127.0.0.1:{port}", **server_options)
        await server.start()
        try:
            return await scenario(server, port)
        finally:
            await server.stop()

    return uvloop.run(main())


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait until the server's state satisfies ``condition``.

    The server has no event to wait on for its connection count, and adding one for the
    tests alone is not worth it: the state is polled, and the timeout is only a safety net.
    """
    try:
        async with asyncio.timeout(10):
            while not condition():  # noqa: ASYNC110 -- polling server state, see above
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(what) from None


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def _no_error_logged_and_log_level_kept() -> Iterator[None]:
    """Whatever a client sends, the server answers it; it never fails internally ("admin request failed")."""
    logger = logging.getLogger("dbmtls")
    level = logger.level
    errors = _Errors()
    logger.addHandler(errors)
    try:
        yield
    finally:
        logger.removeHandler(errors)
        logger.setLevel(level)
    assert errors.messages == []


# --- routes ----------------------------------------------------------------------------


def test_healthz_then_the_connection_closes(control: FakeControl) -> None:
    reply = _serve(control, lambda port: _request(port, "GET", "/healthz?verbose=1"))
    assert (reply.status, reply.text) == (200, "ok\n")
    assert reply.headers["content-type"] == TEXT
    assert reply.headers["connection"] == "close"


def test_readyz_lists_the_problems(control: FakeControl) -> None:
    assert _serve(control, lambda port: _request(port, "GET", "/readyz")).text == "ready\n"
    control.problems = ["cache: listener 127.0.0.1:6379 not bound", "draining: shutting down"]
    reply = _serve(control, lambda port: _request(port, "GET", "/readyz"))
    assert reply.status == 503
    assert reply.text == "not ready\n- cache: listener 127.0.0.1:6379 not bound\n- draining: shutting down\n"


def test_metrics_reads_runtimes_and_reload_counts(control: FakeControl) -> None:
    control.runtimes["cache"].stats.accepted = 3
    reply = _serve(control, lambda port: _request(port, "GET", "/metrics"))
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(reply.text)
        for s in fam.samples
    }
    db = ("database", "cache")
    assert samples[("dbmtls_connections_accepted_total", (db,))] == 3
    assert samples[("dbmtls_certificate_reloads_total", (db, ("result", "success")))] == 2
    assert samples[("dbmtls_certificate_reloads_total", (db, ("result", "failure")))] == 1
    assert samples[("dbmtls_tls_material_loaded", (db,))] == 0


def test_config_is_the_effective_config_as_json(control: FakeControl) -> None:
    reply = _serve(control, lambda port: _request(port, "GET", "/config"))
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    assert json.loads(reply.body) == control.config.model_dump(mode="json")


def test_quitquitquit_and_reload_need_post(control: FakeControl) -> None:
    async def scenario(port: int) -> list[Reply]:
        return [
            await _request(port, "GET", "/quitquitquit"),
            await _request(port, "GET", "/reload"),
            await _request(port, "POST", "/reload"),
            await _request(port, "POST", "/quitquitquit"),
        ]

    replies = _serve(control, scenario)
    assert [(r.status, r.text) for r in replies] == [
        (405, "use POST\n"),
        (405, "use POST\n"),
        (200, "reloaded\n"),
        (200, "draining\n"),
    ]
    assert control.reloads == ["/reload"]
    assert control.shutdowns == ["/quitquitquit"]


def test_reload_answers_with_what_failed(control: FakeControl) -> None:
    control.reload_problems = ["cache: private key /c/tls.key does not match certificate /c/tls.crt"]
    reply = _serve(control, lambda port: _request(port, "POST", "/reload"))
    assert (reply.status, reply.text) == (
        500,
        "reload failed\n- cache: private key /c/tls.key does not match certificate /c/tls.crt\n",
    )


def test_reload_that_hangs_is_answered(control: FakeControl, monkeypatch: pytest.MonkeyPatch) -> None:
    """A certificate volume that hangs a read must not hang the admin request (the reload goes on)."""
    monkeypatch.setattr(admin_server, "RELOAD_ANSWER_TIMEOUT", 0.1)
    never = asyncio.Event()

    async def hanging_reload(why: str) -> list[str]:
        control.reloads.append(why)
        await never.wait()
        return []

    monkeypatch.setattr(control, "reload", hanging_reload)
    reply = _serve(control, lambda port: _request(port, "POST", "/reload"))
    assert (reply.status, reply.text) == (503, "reload still running after 0.1s; see the log\n")
    assert control.reloads == ["/reload"]


def test_loglevel_read_and_change(control: FakeControl) -> None:
    async def scenario(port: int) -> list[Reply]:
        return [
            await _request(port, "POST", "/loglevel", b"DEBUG\n"),
            await _request(port, "GET", "/loglevel"),
            await _request(port, "POST", "/loglevel", b"chatty"),
            await _request(port, "GET", "/loglevel"),
        ]

    replies = _serve(control, scenario)
    assert [(r.status, r.text) for r in replies] == [
        (200, "debug\n"),
        (200, "debug\n"),
        (400, "level must be debug, info, warning or error\n"),
        (200, "debug\n"),
    ]


def test_unknown_path_is_404(control: FakeControl) -> None:
    assert _serve(control, lambda port: _request(port, "GET", "/nope")).status == 404


def test_a_chunked_body_is_read(control: FakeControl) -> None:
    head = b"POST /loglevel HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = _serve(control, lambda port: _raw(port, head + b"3\r\nwar\r\n4\r\nning\r\n0\r\n\r\n"))
    assert (_parse(raw).status, _parse(raw).text) == (200, "warning\n")


def test_head_gets_the_headers_without_the_body(control: FakeControl) -> None:
    raw = _serve(control, lambda port: _raw(port, b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: 3",
        b"Connection: close",
    ]
    assert body == b""


def test_a_client_that_sends_nothing_gets_nothing(control: FakeControl) -> None:
    """A port probe (connect, close): there is no request to answer."""
    assert _serve(control, lambda port: _raw(port, eof=True)) == b""


def test_http_1_0_without_host(control: FakeControl) -> None:
    raw = _serve(control, lambda port: _raw(port, b"GET /healthz HTTP/1.0\r\n\r\n"))
    assert (_parse(raw).status, _parse(raw).text) == (200, "ok\n")


def test_one_request_per_connection(control: FakeControl) -> None:
    two = b"POST /reload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n" * 2
    raw = _serve(control, lambda port: _raw(port, two))
    assert raw.count(b"HTTP/1.1 ") == 1 and _parse(raw).status == 200
    assert control.reloads == ["/reload"]


def test_request_arriving_in_pieces(control: FakeControl) -> None:
    pieces = (b"POST /logl", b"evel HTTP/1.1\r\nHo", b"st: localhost\r\nContent-Length: 5\r\n", b"\r\n", b"err", b"or")
    raw = _serve(control, lambda port: _raw(port, *pieces))
    assert (_parse(raw).status, _parse(raw).text) == (200, "error\n")


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), [("/quitquitquit", b""), ("/loglevel", b"debug"), ("/reload", b"")])
def test_post_with_origin_is_refused(control: FakeControl, path: str, body: bytes) -> None:
    """Browsers send Origin on every cross-site POST: a web page cannot drive the admin API."""
    headers = {"Origin": "http://evil.example"}
    reply = _serve(control, lambda port: _request(port, "POST", path, body, headers))
    assert (reply.status, reply.text) == (403, "cross-origin requests are refused\n")
    assert control.shutdowns == [] and control.reloads == []
    assert logging.getLogger("dbmtls").level != logging.DEBUG


def test_get_with_origin_is_answered(control: FakeControl) -> None:
    reply = _serve(control, lambda port: _request(port, "GET", "/healthz", headers={"Origin": "http://x"}))
    assert reply.status == 200


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"hello\r\n\r\n", id="not-a-request-line"),
        pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 64, id="tls-client-hello"),
        pytest.param(b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", id="http-2"),
        pytest.param(b"GET /healthz HTTP/1.1\r\n\r\n", id="http-1.1-without-host"),  # RFC 9112 3.2
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", id="header-without-colon"),
        pytest.param(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n", id="bad-content-length"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\n", id="head-cut-short"),
        pytest.param(b"POST /loglevel HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\ndeb", id="body-cut-short"),
    ],
)
def test_garbage_is_400(control: FakeControl, raw: bytes) -> None:
    reply = _parse(_serve(control, lambda port: _raw(port, raw, eof=True)))
    assert (reply.status, reply.text) == (400, "bad request\n")
    assert control.reloads == []


def test_head_is_bounded(control: FakeControl) -> None:
    def request(head_size: int) -> bytes:
        start = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
        pad = head_size - len(start) - len(b"X-Pad: \r\n\r\n")
        return start + b"X-Pad: " + b"a" * pad + b"\r\n\r\n"

    assert len(request(MAX_HEAD)) == MAX_HEAD
    assert _parse(_serve(control, lambda port: _raw(port, request(MAX_HEAD)))).status == 200
    assert _parse(_serve(control, lambda port: _raw(port, request(MAX_HEAD + 1)))).status == 400
    # a head that never ends is cut off at the bound, not buffered without limit
    endless = _serve(control, lambda port: _raw(port, b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * (4 * MAX_HEAD)))
    assert _parse(endless).status == 400


def test_body_is_bounded(control: FakeControl) -> None:
    at_limit = b"POST /reload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % MAX_BODY + b"x" * MAX_BODY
    assert _parse(_serve(control, lambda port: _raw(port, at_limit))).status == 200
    over = b"POST /reload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    assert _parse(_serve(control, lambda port: _raw(port, over))).status == 400
    chunked = b"POST /reload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    big_chunks = chunked + (b"200\r\n" + b"x" * 0x200 + b"\r\n") * 3 + b"0\r\n\r\n"
    assert _parse(_serve(control, lambda port: _raw(port, big_chunks))).status == 400
    assert control.reloads == ["/reload"]


def test_a_silent_client_gets_400_after_the_read_timeout(control: FakeControl, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_server, "READ_TIMEOUT", 0.2)
    raw = _serve(control, lambda port: _raw(port, b"GET /healthz HTTP/1.1\r\n"))
    assert _parse(raw).status == 400


def test_a_busy_port_is_a_config_error(control: FakeControl) -> None:
    async def main() -> None:
        port = free_port()
        first = AdminServer(control, f"127.0.0.1:{port}")
        await first.start()
        try:
            with pytest.raises(ConfigError, match="cannot listen on"):
                await AdminServer(control, f"127.0.0.1:{port}").start()
        finally:
            await first.stop()

    uvloop.run(main())


# --- DNS rebinding and cross-site requests -------------------------------------------------

REFUSED_HOST = (
    "refused: the Host header does not name a loopback address; the admin API only answers "
    "requests addressed to localhost, 127.0.0.0/8 or [::1] (set admin.allowRemote: true to answer any name)\n"
)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:15000",
        "127.0.0.1.nip.io",  # a name that resolves to loopback is still a name an attacker owns
        "localhost.evil.example",
        "10.0.0.7:15000",
        "[::2]:15000",
        "0.0.0.0:15000",
        "localhost:",  # not a valid port
        "",
    ],
)
@pytest.mark.parametrize("path", ["/config", "/metrics", "/healthz"])
def test_dns_rebinding_a_non_loopback_host_is_refused(control: FakeControl, host: str, path: str) -> None:
    """A page whose name was re-resolved to 127.0.0.1 still sends its own name as Host."""
    raw = _serve(control, lambda port: _raw(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()))
    reply = _parse(raw)
    assert (reply.status, reply.text) == (403, REFUSED_HOST)


@pytest.mark.parametrize(
    "host", ["localhost", "LocalHost:15000", "127.0.0.1", "127.0.0.1:8080", "127.1.2.3", "[::1]", "[::1]:15000"]
)
def test_loopback_hosts_are_answered(control: FakeControl, host: str) -> None:
    raw = _serve(control, lambda port: _raw(port, f"GET /config HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()))
    assert _parse(raw).status == 200


def test_the_configured_listen_host_is_a_loopback_host() -> None:
    assert _is_loopback_host("sidecar.local:15000", "sidecar.local")
    assert _is_loopback_host("SIDECAR.local", "sidecar.local")
    assert not _is_loopback_host("other.local:15000", "sidecar.local")


def test_allow_remote_answers_any_host(control: FakeControl) -> None:
    """Prometheus scrapes by pod IP: with allowRemote the Host is whatever it used."""
    head = b"GET /metrics HTTP/1.1\r\nHost: 10.12.0.7:15000\r\n\r\n"
    assert _parse(_serve(control, lambda port: _raw(port, head), allow_remote=True)).status == 200
    assert _parse(_serve(control, lambda port: _raw(port, head))).status == 403


@pytest.mark.parametrize("site", ["cross-site", "same-site", "Cross-Site"])
def test_a_cross_site_post_without_origin_is_refused(control: FakeControl, site: str) -> None:
    headers = {"Sec-Fetch-Site": site}
    reply = _serve(control, lambda port: _request(port, "POST", "/quitquitquit", headers=headers))
    assert (reply.status, reply.text) == (403, "cross-site requests are refused (Sec-Fetch-Site)\n")
    assert control.shutdowns == []


@pytest.mark.parametrize("site", ["same-origin", "none"])
def test_a_same_origin_or_typed_post_is_served(control: FakeControl, site: str) -> None:
    reply = _serve(control, lambda port: _request(port, "POST", "/reload", headers={"Sec-Fetch-Site": site}))
    assert (reply.status, reply.text) == (200, "reloaded\n")


def test_a_cross_site_get_is_answered(control: FakeControl) -> None:
    """A cross-site page cannot read the answer (no CORS headers) and GETs change nothing."""
    headers = {"Sec-Fetch-Site": "cross-site"}
    assert _serve(control, lambda port: _request(port, "GET", "/healthz", headers=headers)).status == 200


# --- bounded resources ---------------------------------------------------------------------


class _Idle:
    """A client that connects and then does nothing (or never reads), holding a connection open."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, port: int, first: bytes = b"", *, rcvbuf: int | None = None) -> _Idle:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        if first:
            await asyncio.get_running_loop().sock_sendall(sock, first)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()


def test_a_client_that_never_reads_is_aborted_and_blocks_no_one(
    control: FakeControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_server, "WRITE_TIMEOUT", 0.5)
    big = b"x" * (16 << 20)  # far more than the socket buffers on both sides hold
    real_route = AdminServer.route

    async def route(self: AdminServer, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        if path == "/big":
            return 200, "application/octet-stream", big
        return await real_route(self, method, path, body)

    monkeypatch.setattr(AdminServer, "route", route)

    async def scenario(server: AdminServer, port: int) -> tuple[Reply, Reply]:
        stuck = await _Idle.open(port, b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n", rcvbuf=4096)
        try:
            await _until(lambda: server.open_connections == 1, "the never-reading client was not accepted")
            during = await _request(port, "GET", "/healthz")  # served while the other one is stuck
            # the server gives up on it: its slot is free although the client never read or closed
            await _until(lambda: server.open_connections == 0, "a client that never reads kept its connection")
            after = await _request(port, "GET", "/healthz")
        finally:
            stuck.close()
        return during, after

    during, after = _serve_server(control, scenario, max_connections=2)
    assert (during.status, after.status) == (200, 200)


def test_the_connection_cap_holds_and_recovers(
    control: FakeControl, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(admin_server, "READ_TIMEOUT", 60.0)  # the idle clients keep their slots
    caplog.set_level(logging.WARNING, logger="dbmtls")

    async def scenario(server: AdminServer, port: int) -> tuple[list[bytes], Reply]:
        idle = [await _Idle.open(port), await _Idle.open(port)]
        try:
            await _until(lambda: server.open_connections == 2, "the idle clients were not accepted")
            request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
            refused = [await _raw(port, request) for _ in range(3)]  # closed at once, no answer
            assert server.open_connections == 2
        finally:
            for client in idle:
                client.close()
        await _until(lambda: server.open_connections == 0, "closed clients kept their slots")
        return refused, await _request(port, "GET", "/healthz")

    refused, after = _serve_server(control, scenario, max_connections=2)
    assert refused == [b"", b"", b""]
    assert (after.status, after.text) == (200, "ok\n")
    limit_lines = [r for r in caplog.records if "connection limit" in r.getMessage()]
    assert len(limit_lines) == 1  # once per interval, not once per refused connection
    assert getattr(limit_lines[0], "fields", {}) == {"limit": 2, "refused_total": 1}


class _Listener:
    """Stands in for a listening socket: ``accept`` follows a script of results and errors."""

    def __init__(self, *script: OSError | socket.socket) -> None:
        self.script = list(script)

    def accept(self) -> tuple[socket.socket, object]:
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "no more")
        step = self.script.pop(0)
        if isinstance(step, OSError):
            raise step
        return step, ("127.0.0.1", 1)


def _accept_from(server: AdminServer, *script: OSError | socket.socket) -> None:
    """What the loop does when a listening socket is readable, with ``accept`` scripted."""
    server._accept(cast(socket.socket, _Listener(*script)))


def _spare(server: AdminServer) -> int | None:
    return server._spare  # a call, so that mypy does not keep an earlier narrowing of the attribute


def _paused(server: AdminServer) -> bool:
    return server._retry is not None


def _emfile() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


async def _ask(sock: socket.socket) -> Reply:
    """Send a request over one end of a socket pair whose other end the server accepted."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    async with asyncio.timeout(10):
        while chunk := await loop.sock_recv(sock, 4096):
            data += chunk
    sock.close()
    return _parse(data)


def test_accept_errors_never_close_the_listener(
    control: FakeControl, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What uvloop would do (close the listening socket for good) never happens here."""
    monkeypatch.setattr(admin_server, "ACCEPT_RETRY_DELAY", 0.05)
    caplog.set_level(logging.WARNING, logger="dbmtls")

    async def scenario(server: AdminServer, port: int) -> list[Reply]:
        replies = []
        # one pending connection that failed in the backlog is skipped; the next one is served
        ours, theirs = socket.socketpair()
        _accept_from(server, OSError(errno.ECONNABORTED, "aborted"), theirs)
        replies.append(await _ask(ours))

        # out of descriptors: the spare is given up for the waiting connection, which is served
        assert _spare(server) is not None
        ours, theirs = socket.socketpair()
        _accept_from(server, _emfile(), theirs)
        assert _spare(server) is None
        replies.append(await _ask(ours))

        # out of descriptors and no spare: pause, then accept again (the spare is taken back)
        _accept_from(server, _emfile(), _emfile())
        assert _paused(server), "did not pause after EMFILE"
        await _until(lambda: not _paused(server), "never resumed accepting")
        assert _spare(server) is not None
        # ... and any other error is paused on, not spun on
        _accept_from(server, OSError(errno.ENOBUFS, "No buffer space available"))
        assert _paused(server), "did not pause after ENOBUFS"
        await _until(lambda: not _paused(server), "never resumed accepting")
        replies.append(await _request(port, "GET", "/healthz"))  # the real listener still serves
        return replies

    replies = _serve_server(control, scenario)
    assert [r.status for r in replies] == [200, 200, 200]
    paused = [r for r in caplog.records if r.getMessage() == "admin server cannot accept connections, retrying"]
    assert len(paused) == 1  # the ENOBUFS pause right after the EMFILE one is not logged again


def test_out_of_descriptors_health_is_still_answered_and_the_listener_survives() -> None:
    """A real process out of descriptors (lowered RLIMIT_NOFILE, every slot taken).

    uvloop's own server would accept each waiting connection and close it at once (libuv's
    EMFILE trick), so a liveness probe fails exactly then; here each one is answered, on the
    spare descriptor the admin server keeps, and nothing is lost once descriptors are free.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "support.admin_fd_limit"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    def command(line: str) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    def healthz(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data

    try:
        port = int(proc.stdout.readline().split()[1])
        assert _parse(healthz(port)).status == 200
        full = command("fill")
        assert full.startswith("full "), full
        answers = [healthz(port) for _ in range(3)]  # every slot is taken during all three
        assert command("free") == "freed"
        after = healthz(port)
    finally:
        proc.stdin.close()
        proc.wait(timeout=15)
    log = proc.stderr.read()
    assert [_parse(a).status for a in answers] == [200, 200, 200], log
    assert _parse(after).status == 200
    assert log.count("out of file descriptors: admin connection accepted on the spare descriptor") == 1, log
    assert "ERROR" not in log


def test_the_public_listener_serves_only_probes_and_metrics(control: FakeControl) -> None:
    """admin.publicListen: what kubelet and Prometheus need on the pod IP, and nothing that acts."""

    async def scenario(port: int) -> list[Reply]:
        return [
            # the kubelet and Prometheus name the pod IP in Host
            _parse(await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: 10.1.2.3:15021\r\n\r\n")),
            _parse(await _raw(port, b"GET /readyz HTTP/1.1\r\nHost: 10.1.2.3:15021\r\n\r\n")),
            _parse(await _raw(port, b"GET /metrics HTTP/1.1\r\nHost: 10.1.2.3:15021\r\n\r\n")),
            await _request(port, "POST", "/quitquitquit"),
            await _request(port, "POST", "/reload"),
            await _request(port, "POST", "/loglevel", body=b"debug"),
            await _request(port, "GET", "/config"),
            await _request(port, "POST", "/healthz"),
        ]

    replies = _serve(control, scenario, public=True)
    assert [r.status for r in replies] == [200, 200, 200, 404, 404, 404, 404, 404]
    assert control.shutdowns == [] and control.reloads == []
