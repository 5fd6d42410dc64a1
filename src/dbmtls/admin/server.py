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

HTTP/1.1 is parsed by h11: a sans-IO state machine (bytes in, events out; no
sockets, threads or event loop of its own) of about 2,500 lines of pure Python
with no dependencies.  It parses request lines, headers, ``Content-Length`` and
chunked bodies the way a hand-written parser rarely does, while this module
keeps the socket, the bounds and the seven fixed routes; a full HTTP stack (a
web framework, its own server) would be far more code than the task needs.

One request per connection, answered with ``Connection: close``.  The head is
bounded by ``MAX_HEAD``, the body by ``MAX_BODY``, reading both by
``READ_TIMEOUT``: anything malformed, too large, cut short or too slow gets a
400.

There is no authentication, so what a web page in the operator's browser could
make it do is refused (see ``_refusal``): a request whose Host is not a loopback
name gets a 403 unless ``admin.allowRemote`` is set (DNS rebinding), and so does
a POST with an ``Origin`` header or a ``Sec-Fetch-Site`` other than
``same-origin`` or ``none`` (CSRF).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass

import h11

from dbmtls.admin.control import Control
from dbmtls.admin.metrics import make_registry, render
from dbmtls.config.model import split_host_port
from dbmtls.errors import ConfigError
from dbmtls.logs import LOG, set_level

MAX_HEAD = 8192
MAX_BODY = 1024
READ_TIMEOUT = 5.0
RELOAD_ANSWER_TIMEOUT = 10.0
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


def _bullets(lines: list[str]) -> str:
    return "".join(f"- {line}\n" for line in lines)


def _response(conn: h11.Connection, status: int, ctype: str, payload: bytes, *, head_only: bool) -> bytes:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(payload))), ("Connection", "close")]
    parts = [conn.send(h11.Response(status_code=status, reason=_REASONS.get(status, "OK"), headers=headers))]
    if not head_only:
        parts.append(conn.send(h11.Data(data=payload)))
    parts.append(conn.send(h11.EndOfMessage()))
    return b"".join(p for p in parts if p)


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
    def __init__(self, control: Control, listen: str, *, allow_remote: bool = False) -> None:
        self.control = control
        self.listen = listen
        self.allow_remote = allow_remote
        self.registry = make_registry(control)
        self._listen_host = split_host_port(listen)[0]
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        try:
            self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.listen}: {exc.strerror or exc}", path="admin.listen") from None
        LOG.info("admin server listening", extra={"fields": {"listen": self.listen}})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    request = await _read_request(conn, reader)
            except (h11.RemoteProtocolError, _BadRequest, TimeoutError):
                writer.write(_response(conn, *_BAD_REQUEST, head_only=False))
            else:
                if request is None:
                    return
                refusal = _refusal(request, allow_remote=self.allow_remote, listen_host=self._listen_host)
                if refusal is not None:
                    status, ctype, payload = refusal
                else:
                    status, ctype, payload = await self.route(request.method, request.target, request.body)
                writer.write(_response(conn, status, ctype, payload, head_only=request.method == "HEAD"))
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:
            LOG.exception("admin request failed")
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if path == "/healthz":
            return 200, text, b"ok\n"
        if path == "/readyz":
            problems = self.control.readiness()
            if problems:
                return 503, text, ("not ready\n" + _bullets(problems)).encode()
            return 200, text, b"ready\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", render(self.registry)
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
