"""The README's and docs' reference tables, made from the registry and the error tree.

    python -m dbmtls.protocols.tables            # print them
    python -m dbmtls.protocols.tables --write    # rewrite the generated blocks in README.md
                                                 # and docs/errors.md

A generated block sits between ``<!-- BEGIN generated: NAME -->`` and
``<!-- END generated: NAME -->``; ``tests/unit/test_registry.py`` fails when a block
differs from what the code says, so the tables cannot drift from the code.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from dbmtls.errors import CONNECTION_FAILURES, DESCRIPTIONS, Reason
from dbmtls.protocols.registry import REGISTRY, Registry
from dbmtls.protocols.spec import ProtocolSpec


def _yes(flag: bool) -> str:
    return "yes" if flag else "—"


def protocols_table(registry: Registry = REGISTRY) -> str:
    rows = [
        "| `protocol:` | database | default port | TLS toward the server | per-user certificates "
        "| errors the app sees |",
        "|---|---|---|---|---|---|",
    ]
    for spec in registry:
        names = " ".join(f"`{n}`" for n in spec.names)
        port = str(spec.default_port) if spec.default_port else "—"
        rows.append(
            f"| {names} | {spec.title} | {port} | {spec.upgrade} | {_yes(spec.user_before_tls)} | {spec.errors} |"
        )
    return "\n".join(rows)


def _families(registry: Registry) -> list[tuple[str, Callable[[Reason], str]]]:
    """One column per way of spelling errors (PostgreSQL and CockroachDB share one).

    A reason a protocol can never produce (no per-user certificates without users) shows "—".
    """
    columns: list[tuple[list[ProtocolSpec], Callable[[Reason], str]]] = []
    for spec in registry:
        for specs, code in columns:
            if code is spec.wire_code:
                specs.append(spec)
                break
        else:
            columns.append(([spec], spec.wire_code))
    out: list[tuple[str, Callable[[Reason], str]]] = []
    for specs, code in columns:
        title = " / ".join(s.title.split(" (")[0] for s in specs)
        if any(s.user_before_tls for s in specs):
            out.append((title, code))
        else:
            out.append((title, _without_users(code)))
    return out


def _without_users(code: Callable[[Reason], str]) -> Callable[[Reason], str]:
    def spelled(reason: Reason) -> str:
        # without a user known before TLS there are neither per-user certificates nor a login to fail
        return "—" if reason in (Reason.NO_CERTIFICATE_FOR_USER, Reason.AUTH_FAILED) else code(reason)

    return spelled


def errors_table(registry: Registry = REGISTRY) -> str:
    families = _families(registry)
    rows = [
        "| failure | log and metric `reason` | " + " | ".join(title for title, _ in families) + " |",
        "|---|---|" + "---|" * len(families),
    ]
    for reason in CONNECTION_FAILURES:
        codes = " | ".join(
            _cell(code(reason)) if code(reason) == "—" else _NOT_SPELLED.get(reason) or _cell(code(reason))
            for _, code in families
        )
        rows.append(f"| {DESCRIPTIONS[reason]} | `{reason.value}` | {codes} |")
    return "\n".join(rows)


# Failures dbmtls does not spell itself: nobody is left to tell, the stream is already under
# way (the reset is passed on), or the server's own error reached the app.
_NOT_SPELLED = {
    Reason.APP_CLOSED: "—",
    Reason.APP_TIMEOUT: "close",
    Reason.UPSTREAM_RESET: "reset",
    Reason.AUTH_FAILED: "server's own",
}


def _cell(code: str) -> str:
    return code if code == "—" else f"`{code}`"


TABLES: dict[str, Callable[[], str]] = {"protocols": protocols_table, "errors": errors_table}
_BLOCK = re.compile(r"(<!-- BEGIN generated: (\w+) -->\n)(.*?)(<!-- END generated: \2 -->)", re.DOTALL)


def render(text: str) -> str:
    """``text`` with every generated block replaced by what the code says now."""

    def fill(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"unknown generated block {name!r}")
        return m.group(1) + TABLES[name]() + "\n" + m.group(4)

    return _BLOCK.sub(fill, text)


def main(argv: list[str]) -> int:
    if "--write" not in argv:
        for name, make in TABLES.items():
            print(f"<!-- {name} -->\n{make()}\n")
        return 0
    root = Path(__file__).resolve().parents[3]
    for rel in ("README.md", "docs/errors.md"):
        path = root / rel
        if path.exists():
            path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
