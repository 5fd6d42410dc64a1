"""The native data plane (``dataPlane: native``, docs/native.md).

The C extension ``dbmtls._native`` runs the server-side TLS handshake and the relay of an
established connection in native threads, with both sockets and the TLS state owned by C; this
package is its Python side: contexts that mirror the database's ``ssl.SSLContext``
(``dbmtls.native.tls``) and the glue the sessions use (``dbmtls.native.plane``).

The extension is optional.  Where it was not built (no compiler or OpenSSL headers at install
time, another platform), ``dataPlane: native`` falls back to the Python data plane and the start-up
log says why.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_loaded: tuple[ModuleType | None, str | None] | None = None


def load() -> tuple[ModuleType | None, str | None]:
    """The extension module, or None and why it cannot be used."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = (importlib.import_module("dbmtls._native"), None)
        except ImportError as exc:
            _loaded = (None, f"the extension dbmtls._native is not available ({exc})")
    return _loaded
