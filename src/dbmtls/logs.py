"""Logging: human-readable by default, JSON on request; structured fields, never secrets.

Call sites pass ``extra={"fields": {...}}``; the text format renders them as
``key=value`` pairs (quoted when needed), the JSON format as top-level keys.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from typing import Any

LOG = logging.getLogger("dbmtls")
CONN_LOG = logging.getLogger("dbmtls.conn")


# Values can come from apps (a DB user name): anything that could fake a field or a line (space,
# quote, '=', control characters such as newline, DEL) gets the value quoted, JSON-escaped.
_NEEDS_QUOTES = re.compile(r'[\x00-\x20"=\x7f]')


def _fmt_value(v: object) -> str:
    s = str(v)
    if not s or _NEEDS_QUOTES.search(s):
        return json.dumps(s)
    return s


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        fields: dict[str, Any] = getattr(record, "fields", {})
        tail = " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items() if v is not None)
        line = f"{ts} {record.levelname:<7} {record.getMessage()}"
        if tail:
            line += " " + tail
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in getattr(record, "fields", {}).items():
            if v is not None:
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    # A record per connection: skip what logging collects for every record and neither format
    # prints (the logging HOWTO's "Optimization" list): the caller's frame, the thread, the
    # process id (a getpid syscall) and the multiprocessing name.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("dbmtls")
    root.handlers[:] = [handler]
    root.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger("dbmtls").setLevel(level.upper())
