"""A throwaway PKI per test session, made with dbmtls's own dev PKI (never committed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from dbmtls.pki import create_ca, issue


@dataclass(frozen=True)
class Pair:
    dir: Path

    @property
    def cert(self) -> str:
        return str(self.dir / "tls.crt")

    @property
    def key(self) -> str:
        return str(self.dir / "tls.key")

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.crt")


@dataclass(frozen=True)
class PKI:
    root: Path
    ca: Path  # the CA the servers trust and sign with
    other_ca: Path  # an unrelated CA
    server: Pair  # localhost, 127.0.0.1
    client: Pair  # CN=jinsu (the seed scenario's client)

    def client_for(self, cn: str, *, ca: Path | None = None) -> Pair:
        out = self.root / f"client-{cn}-{(ca or self.ca).name}"
        if not (out / "tls.crt").exists():
            issue(ca or self.ca, out, client_cn=cn)
        return Pair(out)

    def server_for(self, *names: str, ca: Path | None = None, expired: bool = False, tag: str = "") -> Pair:
        label = "-".join(names) + ("-expired" if expired else "") + tag + "-" + (ca or self.ca).name
        out = self.root / f"server-{label}"
        if not (out / "tls.crt").exists():
            now = dt.datetime.now(dt.UTC)
            issue(
                ca or self.ca,
                out,
                server_names=names,
                not_after=now - dt.timedelta(days=1) if expired else None,
            )
        return Pair(out)

    @property
    def ca_cert(self) -> str:
        return str(self.ca / "ca.crt")


def make_pki(root: Path) -> PKI:
    ca = create_ca(root / "ca", common_name="dbmtls test CA")
    other = create_ca(root / "other-ca", common_name="some other CA")
    server = issue(ca, root / "server", server_names=["localhost", "127.0.0.1"])
    client = issue(ca, root / "client", client_cn="jinsu")
    return PKI(root, Path(ca), Path(other), Pair(Path(server)), Pair(Path(client)))
