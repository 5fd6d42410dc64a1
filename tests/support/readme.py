"""README.md's fenced blocks and their test markers (see tests/unit/test_readme.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
KINDS = ("run", "setup", "config", "tree", "output", "not-run")


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    text: str
    kind: str
    note: str

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.kind})"


def blocks(text: str) -> list[Block]:
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        before = text[: m.start()].rstrip("\n").splitlines()
        comments = []
        for previous in reversed(before):
            if not previous.startswith("<!--"):
                break
            comments.append(previous)
        marker = next((c for c in comments if c.startswith("<!-- readme:")), "")
        body = marker.removeprefix("<!-- readme:").removesuffix("-->").strip()
        kind = re.split(r"[\s:(]", body, maxsplit=1)[0] if body else ""
        line = text[: m.start()].count("\n") + 1
        out.append(Block(line, m.group(1), m.group(2), kind, body[len(kind) :].strip(" :")))
    return out


BLOCKS = blocks(README.read_text(encoding="utf-8"))


def of_kind(kind: str | None) -> list[Block]:
    """The blocks of one kind (None: all of them)."""
    return [b for b in BLOCKS if kind is None or b.kind == kind]
