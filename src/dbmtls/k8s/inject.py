"""The sidecar injector: documents in, the same documents out with the dbmtls sidecar added.

Skeleton: the signatures are fixed; the body is being written (issue 10).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dbmtls import __version__


@dataclass(frozen=True)
class InjectOptions:
    image: str = f"dbmtls:{__version__}"
    native_sidecar: bool = True
    cluster_domain: str = "cluster.local"
    # The webhook entry for namespaces labelled dbmtls.io/inject=enabled: inject unless opted out.
    namespace_default: bool = False


class InjectError(ValueError):
    """A workload that asks for the sidecar but cannot get one; the message names what to fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def inject_object(
    obj: Any, mesh: Sequence[dict[str, Any]], options: InjectOptions, *, namespace: str | None = None
) -> Any:
    """A new object with the sidecar added when its pod template opts in (else an equal copy)."""
    return copy.deepcopy(obj)


def inject_documents(docs: list[Any], mesh: Sequence[dict[str, Any]], options: InjectOptions) -> list[Any]:
    """The CLI path: DestinationRules among ``docs`` join ``mesh``; every document goes through."""
    rules = [*mesh, *(d for d in docs if isinstance(d, dict) and d.get("kind") == "DestinationRule")]
    return [inject_object(d, rules, options) for d in docs]
