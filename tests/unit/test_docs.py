"""Comments and docs point inside the repository, at anchors that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"docs/([\w/.-]+\.md)(?:#([\w-]+))?")
CODE = sorted(p for d in ("src", "tests", "bench") for p in (ROOT / d).rglob("*") if p.suffix in {".py", ".md"})
SOURCES = [*CODE, ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"#+\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_every_docs_citation_resolves() -> None:
    cited = 0
    for path in SOURCES:
        for m in CITATION.finditer(path.read_text(encoding="utf-8")):
            page = ROOT / "docs" / m.group(1)
            assert page.exists(), f"{path.relative_to(ROOT)} cites missing {m.group(0)}"
            if m.group(2):
                assert m.group(2) in _anchors(page), f"{path.relative_to(ROOT)} cites missing anchor {m.group(0)}"
            cited += 1
    assert cited > 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_to_documents_outside_the_repository(path: Path) -> None:
    if path == Path(__file__):
        return
    text = path.read_text(encoding="utf-8")
    for outside in ("protocols.md", "anchors.md", "style.md", "seed-scenario.md", "shared/reference"):
        assert outside not in text, f"{path.relative_to(ROOT)} refers to {outside}, which is not in the repository"
    # section numbers of a document that is not here ("1.6 step 5", "rule 0.1", "section 2")
    stray = re.search(r"\b(?:rule \d+\.\d+|section \d+(?:\.\d+)?|\d+\.\d+ step \d+)\b", text)
    assert stray is None, f"{path.relative_to(ROOT)}: {stray.group(0)!r} cites a numbered section of no file here"


def test_no_merge_conflict_markers_anywhere() -> None:
    """A conflict resolved in a hurry must not ship its markers (docs render them as text)."""
    root = Path(__file__).resolve().parents[2]
    files = [*root.glob("*.md"), *root.glob("docs/**/*.md"), *root.glob("src/**/*.py"), *root.glob("deploy/**/*.yaml")]
    files += [*root.glob("tests/**/*.py"), *root.glob("tests/**/*.yaml"), root / "Dockerfile", root / "Makefile"]
    marked = [
        f"{p.relative_to(root)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="
    ]
    assert marked == []
