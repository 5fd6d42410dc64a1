"""Package layering, pinned: no import cycles between the process, the admin API and the TLS layer.

``app`` wires everything together; ``admin`` knows the process only through
``dbmtls.admin.control.Control``; ``tls`` is given what it needs and never
reaches back into ``proxy``.  Imports under ``TYPE_CHECKING`` count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dbmtls

SRC = Path(dbmtls.__file__).parent


def _imports(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted((SRC / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        out[str(path.relative_to(SRC))] = names
    return out


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("admin", ("dbmtls.app",)),
        ("tls", ("dbmtls.app", "dbmtls.admin", "dbmtls.proxy", "dbmtls.native")),
        # the native plane is data path glue: given what it needs, never the process or the admin API
        ("native", ("dbmtls.app", "dbmtls.admin")),
    ],
)
def test_package_does_not_import(package: str, forbidden: tuple[str, ...]) -> None:
    bad = {
        f"{module} imports {name}"
        for module, names in _imports(package).items()
        for name in names
        if name.startswith(forbidden)
    }
    assert not bad
