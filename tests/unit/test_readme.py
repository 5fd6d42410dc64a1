"""The README is tested: every fenced block says how, and the checkable ones are checked here.

Each block is preceded by a marker comment, ``<!-- readme: KIND ... -->``:

=========  ======================================================================================
run        executed by a test named in the marker (tests/e2e/test_readme.py runs the walk-through)
setup      the setup commands that ``make test`` itself runs before any test
config     a dbmtls config or Istio documents: loaded here with the real loader, as written
tree       a source tree: every path in it exists
output     what a command prints (a sample; the marker names the test that keeps it real, if any)
not-run    cannot run here (a registry, a cluster, example hosts): the marker must say why
=========  ======================================================================================

A block without a marker fails: a new example is either checked or says why it cannot be.
"""

from __future__ import annotations

import re

import pytest
import yaml

from dbmtls.config.load import config_from_documents
from support.readme import KINDS, ROOT, Block, of_kind


def test_every_block_says_how_it_is_tested() -> None:
    unmarked = [f"README.md:{b.line}" for b in of_kind(None) if b.kind not in KINDS]
    assert unmarked == [], f"add <!-- readme: {'|'.join(KINDS)} ... --> before these blocks"
    reasonless = [str(b) for b in of_kind(None) if b.kind in ("not-run", "run") and not b.note]
    assert reasonless == [], "a not-run block says why; a run block names what runs it"


def test_the_walk_through_is_there() -> None:
    """The "By hand" walk-through: certificates, servers, a config, check, run, clients."""
    (walk,) = [b for b in of_kind("run") if "dbmtls run" in b.text]
    for step in ("certs ca", "certs issue", "try-servers.sh start", "dbmtls check", "dbmtls run", "redis-cli", "psql"):
        assert step in walk.text, step


@pytest.mark.parametrize("block", of_kind("config"), ids=str)
def test_config_blocks_load_as_written(block: Block) -> None:
    """The loader `dbmtls run` uses accepts the block (certificate files are examples: not read)."""
    docs = [d for d in yaml.safe_load_all(block.text) if d is not None]
    assert docs
    config = config_from_documents([(d, f"README.md:{block.line}") for d in docs], "README.md")
    assert config.databases


def tree_paths(text: str) -> list[str]:
    """The paths a tree block names: the first column, nested by indentation under folders."""
    paths: list[str] = []
    folders: list[tuple[int, str]] = []  # (indent, path) of the enclosing folders
    for raw in text.splitlines():
        indent = len(raw) - len(raw.lstrip(" "))
        entry = re.split(r" {2,}", raw.strip(), maxsplit=1)[0]
        if not raw.strip() or indent >= 20:
            continue  # a description's continuation line
        while folders and folders[-1][0] >= indent:
            folders.pop()
        parent = folders[-1][1] if folders else ""
        names = [parent + n for n in entry.split(", ")]
        paths += names
        if len(names) == 1 and names[0].endswith("/"):
            folders.append((indent, names[0]))
    return paths


@pytest.mark.parametrize("block", of_kind("tree"), ids=str)
def test_tree_blocks_name_paths_that_exist(block: Block) -> None:
    """Every file or folder the architecture tree names is in the repository."""
    paths = tree_paths(block.text)
    assert len(paths) > 20 and "src/dbmtls/k8s/" in paths and "src/dbmtls/protocols/registry.py" in paths
    assert [p for p in paths if not (ROOT / p).exists()] == []
