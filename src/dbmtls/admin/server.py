"""The admin HTTP server: health, readiness, metrics, effective config, shutdown, log level.

Endpoints (all on the admin address, loopback by default):

=====================  ======  ===========================================================
``/healthz``           GET     200 while the process runs
``/readyz``            GET     200 when every listener is bound and all TLS material is
                               loaded and the process is not draining; else 503 + reasons
``/metrics``           GET     Prometheus text format (see ``metrics.py``)
``/config``            GET     effective configuration as JSON (file paths, never PEM)
``/quitquitquit``      POST    start a graceful drain, then exit 0
``/reload``            POST    re-read certificate files now (like SIGHUP)
``/loglevel``          GET     current level; POST with body ``debug|info|warning|error``
=====================  ======  ===========================================================

It speaks just enough HTTP/1.1 for probes, Prometheus and curl: one request per
connection, bounded head and body, ``Connection: close``.  A full HTTP stack
would be a large dependency for seven fixed routes.
"""

from __future__ import annotations

import asyncio
import json
import logging

from dbmtls.admin.control import Control
from dbmtls.admin.metrics import make_registry, render
from dbmtls.config.model import split_host_port
from dbmtls.errors import ConfigError
from dbmtls.logs import LOG, set_level

MAX_HEAD = 8192
MAX_BODY = 1024
READ_TIMEOUT = 5.0
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class AdminServer:
    def __init__(self, control: Control, listen: str) -> None:
        self.control = control
        self.listen = listen
        self.registry = make_registry(control)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        try:
            self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True, limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.listen}: {exc.strerror or exc}", path="admin.listen") from None
        LOG.info("admin server listening", extra={"fields": {"listen": self.listen}})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
                    method, path, headers = _parse_head(head)
                    length = int(headers.get("content-length", "0") or 0)
                    if length < 0 or length > MAX_BODY:
                        raise ValueError("body too large")
                    body = await reader.readexactly(length) if length else b""
                if method == "POST" and "origin" in headers:
                    # Browsers send Origin on every cross-site POST: a web page must not be able
                    # to stop the sidecar or change its log level (CSRF against localhost).
                    status, ctype, payload = 403, "text/plain", b"cross-origin requests are refused\n"
                else:
                    status, ctype, payload = self.route(method, path, body)
            except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                status, ctype, payload = 400, "text/plain", b"bad request\n"
            head_out = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head_out.encode("ascii") + payload)
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:
            LOG.exception("admin request failed")
        finally:
            writer.close()

    def route(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if path == "/healthz":
            return 200, text, b"ok\n"
        if path == "/readyz":
            problems = self.control.readiness()
            if problems:
                return 503, text, ("not ready\n" + "".join(f"- {p}\n" for p in problems)).encode()
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
            self.control.reload("/reload")
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


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    if len(head) > MAX_HEAD:
        raise ValueError("head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("bad header")
        headers[name.strip().lower()] = value.strip()
    return parts[0].upper(), parts[1], headers
