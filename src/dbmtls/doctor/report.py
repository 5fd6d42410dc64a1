"""The doctor's result: steps with a status, what was found, and a fix for each failure.

A :class:`Report` is plain data (rendered as text lines with ✓/✗/! or as JSON with the
same content), so the checks never print and the renderings cannot disagree.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"  # works, but something deserves attention; does not change the exit code
    FAIL = "fail"
    SKIP = "skip"  # not run: an earlier step failed, or it does not apply


MARKS = {Status.OK: "✓", Status.WARN: "!", Status.FAIL: "✗", Status.SKIP: "-"}


@dataclass
class Step:
    id: str  # stable, for JSON consumers: dns, tcp, preamble, tls, verify, ...
    title: str  # for people
    status: Status
    summary: str
    details: list[str] = field(default_factory=list)
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    elapsed_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": str(self.status),
            "summary": self.summary,
            "details": self.details,
            "fix": self.fix,
            "data": self.data,
            "elapsed_ms": None if self.elapsed_ms is None else round(self.elapsed_ms, 1),
        }


@dataclass
class Report:
    name: str  # the database's name, or the URL given
    protocol: str
    address: str  # host:port dialled
    server_name: str  # the name the server certificate must carry (SNI)
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status is not Status.FAIL for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "address": self.address,
            "server_name": self.server_name,
            "ok": self.ok,
            "steps": [s.as_dict() for s in self.steps],
        }


def render_text(reports: Sequence[Report]) -> str:
    lines: list[str] = []
    for i, report in enumerate(reports):
        if i:
            lines.append("")
        lines.append(f"{report.name} ({report.protocol}) -> {report.address}, expecting the name {report.server_name}")
        for step in report.steps:
            lines.append(f"{MARKS[step.status]} {step.title}: {step.summary}")
            lines += [f"    {d}" for d in step.details]
            if step.fix:
                lines.append(f"    fix: {step.fix}")
        failed = [s.title for s in report.steps if s.status is Status.FAIL]
        lines.append(f"=> {'all checks passed' if not failed else 'failed: ' + ', '.join(failed)}")
    return "\n".join(lines)


def render_json(reports: Sequence[Report]) -> str:
    doc = {"ok": all(r.ok for r in reports), "reports": [r.as_dict() for r in reports]}
    return json.dumps(doc, indent=2, ensure_ascii=False)
