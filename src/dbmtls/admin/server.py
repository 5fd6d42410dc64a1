"""The admin HTTP server: health, readiness, metrics, effective config, shutdown, log level.

Endpoints (all on the admin address, loopback by default):

=====================  ======  ===========================================================
``/healthz``           GET     200 while the process runs
``/readyz``            GET     200 when every listener is bound and all TLS material is
                               loaded and the process is not draining; else 503 + reasons
``/metrics``           GET     Prometheus text format (see ``metrics.py``)
``/config``            GET     effective configuration as JSON (file paths, never PEM)
``/quitquitquit``      POST    start a graceful drain, then exit 0
``/reload``            POST    re-read certificate files now (like SIGHUP); 200 when every
                               database loaded, else 500 + what failed (old material kept)
``/loglevel``          GET     current level; POST with body ``debug|info|warning|error``
=====================  ======  ===========================================================

``admin.publicListen`` opens a second, read-only server with only ``/healthz``, ``/readyz``
and ``/metrics`` (GET/HEAD).  In a Kubernetes pod the kubelet's probes and Prometheus reach
the pod IP, not its loopback, while ``/quitquitquit`` or ``/loglevel`` must stay reachable
from inside the pod only: two listeners keep those apart without any authentication scheme.

HTTP/1.1 is parsed by h11: a sans-IO state machine (bytes in, events out; no
sockets, threads or event loop of its own) of about 2,500 lines of pure Python
with no dependencies.  It parses request lines, headers, ``Content-Length`` and
chunked bodies the way a hand-written parser rarely does, while this module
keeps the socket, the bounds and the seven fixed routes; a full HTTP stack (a
web framework, its own server) would be far more code than the task needs.

One request per connection, answered with ``Connection: close``.  The head is
bounded by ``MAX_HEAD``, the body by ``MAX_BODY``, reading both by
``READ_TIMEOUT``: anything malformed, too large, cut short or too slow gets a
400.  Handing the answer to the kernel is bounded by ``WRITE_TIMEOUT``, and at
most ``MAX_CONNECTIONS`` connections are open at once (see ``AdminServer``).

There is no authentication, so what a web page in the operator's browser could
make it do is refused (see ``_refusal``): a request whose Host is not a loopback
name gets a 403 unless ``admin.allowRemote`` is set (DNS rebinding), and so does
a POST with an ``Origin`` header or a ``Sec-Fetch-Site`` other than
``same-origin`` or ``none`` (CSRF).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11

from dbmtls.admin.control import Control
from dbmtls.config.model import split_host_port
from dbmtls.errors import ConfigError
from dbmtls.logs import LOG, set_level

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_HEAD = 8192
MAX_BODY = 1024
READ_TIMEOUT = 5.0
RELOAD_ANSWER_TIMEOUT = 10.0
WRITE_TIMEOUT = 5.0
# With its listeners and spare, the admin server then fits in the descriptors the data path
# leaves alone (dbmtls.proxy.limits.FD_RESERVE, 64, shared with stdio, the event loop and
# certificate reads), so a saturated data path and a flood of admin clients together still
# do not run the process out of descriptors.
MAX_CONNECTIONS = 32
ACCEPT_BATCH = 32
ACCEPT_RETRY_DELAY = 0.5
ABUSE_LOG_INTERVAL = 60.0
# accept() errors that belong to one pending connection (Linux reports the network errors of
# a connection that failed in the backlog from accept itself): skip it, keep accepting.
_PENDING_CONNECTION_ERRORS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENONET,
        errno.EOPNOTSUPP,
        errno.ECONNRESET,
    }
)
_READ_CHUNK = 4096
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_BAD_REQUEST = (400, "text/plain", b"bad request\n")


class _BadRequest(Exception):
    """A request h11 accepts but this server does not: over a bound, or not HTTP/1.x."""


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> _Request | None:
    """Feed ``conn`` from ``reader`` until one whole request is in; None if the client sent nothing.

    Raises ``h11.RemoteProtocolError`` (malformed, cut short) or ``_BadRequest`` (too large).
    """
    request: h11.Request | None = None
    body = bytearray()
    head_budget = MAX_HEAD
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if request is None:
                # h11's max_incomplete_event_size only bounds a head that is still incomplete;
                # never feeding it more than MAX_HEAD bytes before the head is complete also
                # bounds a complete one that arrives in a single read.
                if head_budget <= 0:
                    raise _BadRequest("request head too large")
                data = await reader.read(head_budget)
                head_budget -= len(data)
            else:
                data = await reader.read(_READ_CHUNK)
            conn.receive_data(data)  # b"": the client closed its side
        elif isinstance(event, h11.Request):
            if not event.http_version.startswith(b"1."):  # h11 parses any "HTTP/d.d" request line
                raise _BadRequest("not HTTP/1.x")
            request = event
            length = next((int(v) for k, v in event.headers if k == b"content-length"), 0)
            if length > MAX_BODY:
                raise _BadRequest("request body too large")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _BadRequest("request body too large")
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return _Request(
                request.method.decode("ascii").upper(),
                request.target.decode("latin-1"),
                {k.decode("ascii"): v.decode("latin-1") for k, v in request.headers},
                bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None  # closed before sending a byte: nothing to answer
        else:
            raise _BadRequest(f"unexpected {event!r}")


async def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of ``host`` (``localhost``: 127.0.0.1 and ::1), as asyncio binds them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bullets(lines: list[str]) -> str:
    return "".join(f"- {line}\n" for line in lines)


def _response(conn: h11.Connection, status: int, ctype: str, payload: bytes, *, head_only: bool) -> bytes:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(payload))), ("Connection", "close")]
    parts = [conn.send(h11.Response(status_code=status, reason=_REASONS.get(status, "OK"), headers=headers))]
    if not head_only:
        parts.append(conn.send(h11.Data(data=payload)))
    parts.append(conn.send(h11.EndOfMessage()))
    return b"".join(p for p in parts if p)


class _Throttle:
    """Say something at most once per ``interval``: abuse must not turn into a flood of log lines."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: float | None = None

    def ready(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True


def _is_loopback_host(value: str, listen_host: str) -> bool:
    """Whether a Host header names this machine's loopback (or exactly the configured listen host)."""
    try:
        host, _port = split_host_port(value, default_port=80)  # any port: port-forwards renumber it
    except ValueError:
        return False
    host = host.lower()
    if host in ("localhost", listen_host.lower()):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1, as literals only
    except ValueError:
        return False


def _refusal(request: _Request, *, allow_remote: bool, listen_host: str) -> tuple[int, str, bytes] | None:
    """The answer to a request a browser could have been made to send, or None to serve it."""
    text = "text/plain; charset=utf-8"
    host = request.headers.get("host")
    # DNS rebinding: a page on evil.example re-resolves its own name to 127.0.0.1 and then reads
    # /config and /metrics as same-origin.  Its requests still carry Host: evil.example, which is
    # the one thing it cannot change.  (No Host at all, HTTP/1.0, is no browser's request.)
    if host is not None and not allow_remote and not _is_loopback_host(host, listen_host):
        return (
            403,
            text,
            b"refused: the Host header does not name a loopback address; the admin API only answers "
            b"requests addressed to localhost, 127.0.0.0/8 or [::1] (set admin.allowRemote: true "
            b"to answer any name)\n",
        )
    if request.method == "POST":
        # Browsers send Origin on every cross-site POST, and Sec-Fetch-Site on every request
        # (same-origin, same-site, cross-site, or none when a person typed the URL): a web page
        # must not be able to stop the sidecar or change its log level (CSRF against localhost).
        if "origin" in request.headers:
            return 403, "text/plain", b"cross-origin requests are refused\n"
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.strip().lower() not in ("same-origin", "none"):
            return 403, "text/plain", b"cross-site requests are refused (Sec-Fetch-Site)\n"
    return None


class AdminServer:
    """The admin HTTP server, with its own bounded share of the process.

    It accepts on its own listening sockets (not ``asyncio.start_server``) because of what
    uvloop does when ``accept()`` fails: on EMFILE/ENFILE libuv closes a reserved descriptor,
    accepts every pending connection and closes it at once (so a liveness probe fails exactly
    when the data path has used up the descriptors), and when that reserve is gone (libuv
    documents the trick as unreliable with other threads opening files, as the certificate
    reloader's worker does) or on any other accept error it reports the error to uvloop,
    which closes the listening socket for good while ``Server.is_serving()`` still says True.
    Here an accept error never closes the listener:

    * EMFILE/ENFILE: the server holds one spare descriptor (``/dev/null``) of its own; it
      gives it up to accept the waiting connection and serves it, and takes the spare back
      when a descriptor is free again.  Without a spare it stops accepting for
      ``ACCEPT_RETRY_DELAY`` and tries again; waiting connections stay in the backlog;
    * errors of one pending connection (ECONNABORTED, EPROTO, network errors): skipped;
    * anything else (ENOBUFS, ENOMEM, ...): paused and retried like EMFILE.

    At most ``MAX_CONNECTIONS`` connections are open at once; beyond that a new one is closed
    as soon as it is accepted.  Each one lasts at most ``READ_TIMEOUT`` to read the request,
    ``RELOAD_ANSWER_TIMEOUT`` for ``/reload``, and ``WRITE_TIMEOUT`` to hand the answer to the
    kernel, after which it is aborted: a client that never reads cannot keep a slot.  Refused
    connections and accept failures are logged at most once per ``ABUSE_LOG_INTERVAL``.
    """

    def __init__(
        self,
        control: Control,
        listen: str,
        *,
        allow_remote: bool = False,
        public: bool = False,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.control = control
        # public: the read-only server of ``admin.publicListen`` (see the module docstring);
        # its callers (kubelet, Prometheus) name the pod IP in Host, so no Host check there.
        self.public = public
        self.listen = listen
        self.allow_remote = allow_remote
        self.max_connections = max_connections
        # made at the first scrape (``metrics()``): prometheus_client and what it imports (1 to 2
        # MiB of RSS) stay out of a process that nobody scrapes (docs/memory.md)
        self._registry: CollectorRegistry | None = None
        self._listen_host = split_host_port(listen)[0]
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._spare: int | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._refused = 0
        self._full_log = _Throttle(ABUSE_LOG_INTERVAL)
        self._accept_log = _Throttle(ABUSE_LOG_INTERVAL)
        self._spare_log = _Throttle(ABUSE_LOG_INTERVAL)

    @property
    def open_connections(self) -> int:
        return len(self._tasks)

    def metrics(self) -> bytes:
        """The Prometheus exposition of the process now (``GET /metrics``)."""
        from dbmtls.admin.metrics import make_registry, render

        if self._registry is None:
            self._registry = make_registry(self.control)
        return render(self._registry)

    @property
    def ports(self) -> list[int]:
        return [int(s.getsockname()[1]) for s in self._sockets]

    # --- listening -----------------------------------------------------------------------

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        try:
            self._sockets = await _bind(host, port)
        except OSError as exc:
            field = "admin.publicListen" if self.public else "admin.listen"
            raise ConfigError(f"cannot listen on {self.listen}: {exc.strerror or exc}", path=field) from None
        self._take_spare()
        self._accepting(True)
        LOG.info("admin server listening", extra={"fields": {"listen": self.listen}})

    async def stop(self) -> None:
        self._accepting(False)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _accepting(self, on: bool) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            if on:
                loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                loop.remove_reader(sock.fileno())

    def _take_spare(self) -> None:
        if self._spare is None and self._sockets:
            with contextlib.suppress(OSError):  # none free now: taken again when one is
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _accept(self, listener: socket.socket) -> None:
        self._take_spare()  # lost to an earlier EMFILE: take it back while a descriptor is free
        for _ in range(ACCEPT_BATCH):  # bounded: a flood cannot keep the loop in here
            try:
                sock, _peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PENDING_CONNECTION_ERRORS:
                    continue  # that one connection failed before we took it; the next may not
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._spare is not None:
                    os.close(self._spare)  # our own descriptor, given up for this connection
                    self._spare = None
                    if self._spare_log.ready():
                        LOG.warning(
                            "out of file descriptors: admin connection accepted on the spare descriptor",
                            extra={"fields": {"error": exc.strerror or str(exc)}},
                        )
                    try:
                        sock, _peer = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        return
                    except OSError as again:  # another thread took the descriptor first
                        exc = again
                    else:
                        self._admit(sock)
                        continue
                self._pause(exc)
                return
            self._admit(sock)

    def _pause(self, exc: OSError) -> None:
        """Stop accepting for a moment instead of spinning on an error that a moment may cure."""
        if self._accept_log.ready():
            LOG.warning(
                "admin server cannot accept connections, retrying",
                extra={"fields": {"error": exc.strerror or str(exc), "retry_in": f"{ACCEPT_RETRY_DELAY:g}s"}},
            )
        self._accepting(False)
        self._retry = asyncio.get_running_loop().call_later(ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self._take_spare()
        self._accepting(True)

    def _admit(self, sock: socket.socket) -> None:
        if len(self._tasks) >= self.max_connections:
            sock.close()  # at once: no task, no buffer, no timer for a connection beyond the cap
            self._refused += 1
            if self._full_log.ready():
                LOG.warning(
                    "admin server at its connection limit, closing new connections",
                    extra={"fields": {"limit": self.max_connections, "refused_total": self._refused}},
                )
            return
        task = asyncio.get_running_loop().create_task(self._connection(sock))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._take_spare()  # a descriptor was just freed: the spare comes first
        if not task.cancelled() and (exc := task.exception()) is not None:  # _handle catches the rest
            LOG.error("admin connection failed", exc_info=exc)

    # --- one connection --------------------------------------------------------------------

    async def _connection(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        except OSError:
            sock.close()
            return
        # drain() then returns only once the whole answer is in the kernel, so that the
        # close after it never leaves bytes in a user-space buffer a client may never read.
        transport.set_write_buffer_limits(high=0)
        await self._handle(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        delivered = False
        try:
            head_only = False
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    request = await _read_request(conn, reader)
            except (h11.RemoteProtocolError, _BadRequest, TimeoutError):
                status, ctype, payload = _BAD_REQUEST
            else:
                if request is None:
                    delivered = True
                    return
                head_only = request.method == "HEAD"
                refusal = _refusal(
                    request, allow_remote=self.allow_remote or self.public, listen_host=self._listen_host
                )
                if refusal is not None:
                    status, ctype, payload = refusal
                else:
                    status, ctype, payload = await self.route(request.method, request.target, request.body)
            writer.write(_response(conn, status, ctype, payload, head_only=head_only))
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
            delivered = True
        except (ConnectionError, TimeoutError):
            pass  # gone, or not reading its answer: aborted below
        except Exception:
            LOG.exception("admin request failed")
        finally:
            if delivered:
                writer.close()
            else:
                writer.transport.abort()  # close() would wait for a reader that may never come

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if self.public and (path not in PUBLIC_PATHS or method not in ("GET", "HEAD")):
            return 404, text, b"not found (this is the read-only listener: /healthz, /readyz, /metrics)\n"
        if path == "/healthz":
            return 200, text, b"ok\n"
        if path == "/readyz":
            problems = self.control.readiness()
            if problems:
                return 503, text, ("not ready\n" + _bullets(problems)).encode()
            return 200, text, b"ready\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics()
        if path == "/config":
            dump = self.control.config.model_dump(mode="json")
            return 200, "application/json", json.dumps(dump, indent=2).encode() + b"\n"
        if path == "/quitquitquit":
            if method != "POST":
                return 405, text, b"use POST\n"
            self.control.request_shutdown("/quitquitquit")
            return 200, text, b"draining\n"
        if path == "/reload":
            if method != "POST":
                return 405, text, b"use POST\n"
            try:
                async with asyncio.timeout(RELOAD_ANSWER_TIMEOUT):
                    problems = await self.control.reload("/reload")
            except TimeoutError:
                # a file read hanging on a stuck volume: answer, the reload goes on and logs its result
                return 503, text, f"reload still running after {RELOAD_ANSWER_TIMEOUT:g}s; see the log\n".encode()
            if problems:
                return 500, text, ("reload failed\n" + _bullets(problems)).encode()
            return 200, text, b"reloaded\n"
        if path == "/loglevel":
            if method == "POST":
                level = body.decode("ascii", "replace").strip().lower()
                if level not in ("debug", "info", "warning", "error"):
                    return 400, text, b"level must be debug, info, warning or error\n"
                set_level(level)
                LOG.warning("log level changed", extra={"fields": {"level": level}})
            current = logging.getLevelName(logging.getLogger("dbmtls").level).lower()
            return 200, text, f"{current}\n".encode()
        return 404, text, b"not found\n"
