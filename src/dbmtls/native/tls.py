"""Native twins of the database's ``ssl.SSLContext`` objects.

The native plane performs the TLS handshake itself (Python's ``ssl`` does not give out its
``SSL*``), so it needs an OpenSSL context of its own.  It is built *from the Python context*,
right after it, in the same ``ClientTLS.build()`` (so in the reloader's worker thread, never on
the event loop): same files, and every setting Python exposes copied from it (options, minimum
and maximum version, verify mode, cipher list, security level) rather than restated, so the
two cannot drift apart; ``tests/unit/test_native.py`` compares them.  Host name verification is
set per connection (``dbmtls.native.plane``), as CPython does for ``server_hostname``.

Each twin travels with the context it mirrors (an attribute of the ``ssl.SSLContext``), so a
reload swaps both with the one assignment of ``ClientTLS.apply``, and a connection always uses
the native context of the material it was given.  Open connections keep theirs (OpenSSL counts
references): a reload never touches them.
"""

from __future__ import annotations

import ssl
from types import ModuleType
from typing import Any

from dbmtls.config.model import DatabaseConfig
from dbmtls.errors import ConfigError
from dbmtls.tls.certfields import load_der
from dbmtls.tls.material import ClientTLS, Material

_ATTR = "_dbmtls_native_context"


def alpn_wire(protocols: tuple[str, ...] | list[str]) -> bytes:
    """ALPN protocol names in the wire format OpenSSL takes (length-prefixed)."""
    out = b""
    for name in protocols:
        raw = name.encode()
        out += bytes([len(raw)]) + raw
    return out


def _version(v: ssl.TLSVersion) -> int:
    # MINIMUM_SUPPORTED / MAXIMUM_SUPPORTED are negative in Python and 0 ("no bound") in OpenSSL
    return max(int(v.value), 0)


def build_twin(
    module: ModuleType,
    ctx: ssl.SSLContext,
    db: DatabaseConfig,
    cert: tuple[str, str] | None,
    alpn: tuple[str, ...] | list[str],
) -> Any:
    """An ``dbmtls._native.Context`` with ``ctx``'s settings and files (``tls.context.build_context``)."""
    tls = db.tls
    verify = ctx.verify_mode == ssl.CERT_REQUIRED
    # TLS 1.2 suites by name, in Python's order (TLS 1.3 suites are OpenSSL's defaults on both)
    ciphers = ":".join(c["name"] for c in ctx.get_ciphers() if c.get("protocol") != "TLSv1.3")
    twin = module.Context(
        cafile=tls.caCertificates if verify and tls.caCertificates else None,
        default_verify_paths=verify and not tls.caCertificates,
        certfile=cert[0] if cert else None,
        keyfile=cert[1] if cert else None,
        verify=verify,
        options=int(ctx.options),
        min_version=_version(ctx.minimum_version),
        max_version=_version(ctx.maximum_version),
        ciphers=ciphers,
        security_level=ctx.security_level,
        alpn=alpn_wire(alpn),
    )
    if tls.sessionResumption:
        twin.enable_sessions()  # per identity (this context) and server name: docs/tls-resumption.md
    return twin


def twin_of(ctx: ssl.SSLContext) -> Any:
    """The native context made with ``ctx``; a context without one is a bug of dbmtls."""
    twin = getattr(ctx, _ATTR, None)
    if twin is None:
        raise RuntimeError("no native context was built for this SSLContext")
    return twin


class NativeClientTLS(ClientTLS):
    """``ClientTLS`` whose every context also has its native twin."""

    def __init__(self, db: DatabaseConfig, module: ModuleType) -> None:
        super().__init__(db)
        self._module = module

    def build(self) -> Material:
        material = super().build()
        t = self.db.tls
        jobs: list[tuple[ssl.SSLContext, tuple[str, str] | None, str]] = []
        if material.default is not None:
            pair = (t.clientCertificate, t.privateKey) if t.clientCertificate and t.privateKey else None
            jobs.append((material.default, pair, "tls"))
        for user, ctx in material.by_user.items():
            uc = t.userCertificates[user]
            jobs.append((ctx, (uc.clientCertificate, uc.privateKey), f"tls.userCertificates.{user}"))
        for ctx, pair, yaml_path in jobs:
            try:
                twin = build_twin(self._module, ctx, self.db, pair, self.alpn)
            except self._module.Error as exc:
                raise ConfigError(f"native data plane: cannot build the TLS context: {exc}", path=yaml_path) from None
            if pair is not None:
                _same_leaf(twin, pair[0], material, yaml_path)
            setattr(ctx, _ATTR, twin)
        return material


def _same_leaf(twin: Any, cert_path: str, material: Material, yaml_path: str) -> None:
    """The files are read twice (by Python, then by OpenSSL here): make sure the certificate the
    native context presents is the one Python validated (expiry, not-before), not a newer file
    written in between.  A mismatch fails this load; the reloader sees the changed files and
    loads both again."""
    der = twin.leaf_der()
    leaf = load_der(der) if der else None
    for info in material.certs:
        same = leaf is not None and (leaf.serial, leaf.not_after) == (info.serial, info.not_after)
        if info.kind == "client" and info.path == cert_path and same:
            return
    raise ConfigError(
        f"client certificate {cert_path} changed while it was being loaded; it is loaded again at the next check",
        path=f"{yaml_path}.clientCertificate",
    )
