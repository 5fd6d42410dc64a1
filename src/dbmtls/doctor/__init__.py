"""``dbmtls doctor``: the TLS troubleshooting of a database connection, step by step.

``target`` says what to check (a config's database or a URL), ``run`` walks the steps
with thin, bounded I/O, ``probes`` speak each protocol's part, ``tlswire`` reads the
handshake's messages, ``checks`` and ``certinfo`` judge and explain, ``report`` renders.
See docs/doctor.md.
"""

from dbmtls.doctor.report import Report, Status, Step, render_json, render_text
from dbmtls.doctor.run import diagnose
from dbmtls.doctor.target import Login, Target, TargetError, from_database, from_url

__all__ = [
    "Login",
    "Report",
    "Status",
    "Step",
    "Target",
    "TargetError",
    "diagnose",
    "from_database",
    "from_url",
    "render_json",
    "render_text",
]
