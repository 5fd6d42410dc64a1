"""A directory laid out like a mounted Kubernetes Secret, updated the way the kubelet does it.

    dir/tls.crt -> ..data/tls.crt
    dir/..data  -> ..2026_11_28_04_00_00.123456789
    dir/..2026_11_28_04_00_00.123456789/tls.crt   (the real files)

An update writes a new timestamped directory, points ``..data_tmp`` at it and
renames that over ``..data`` (one atomic rename), then removes the old one.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

_counter = itertools.count()


class SecretDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def update(self, files: dict[str, bytes]) -> None:
        new = f"..2026_{next(_counter):06d}"
        target = self.path / new
        target.mkdir()
        for name, data in files.items():
            (target / name).write_bytes(data)
            if name.endswith(".key"):
                os.chmod(target / name, 0o600)
        old = os.readlink(self.path / "..data") if (self.path / "..data").is_symlink() else None
        tmp = self.path / "..data_tmp"
        os.symlink(new, tmp)
        os.rename(tmp, self.path / "..data")
        for name in files:
            link = self.path / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if old is not None:
            shutil.rmtree(self.path / old)

    def update_from(self, src: Path, names: tuple[str, ...] = ("tls.crt", "tls.key", "ca.crt")) -> None:
        self.update({n: (src / n).read_bytes() for n in names})

    def file(self, name: str) -> str:
        return str(self.path / name)
