"""A directory laid out like a mounted Kubernetes Secret, updated the way the kubelet does it.

    dir/tls.crt -> ..data/tls.crt
    dir/..data  -> ..2026_11_28_04_00_00.a1b2c3d4
    dir/..2026_11_28_04_00_00.a1b2c3d4/tls.crt   (the real files)

An update (the kubelet's AtomicWriter) writes a new timestamped directory, points ``..data_tmp``
at it and renames that over ``..data`` (one atomic rename: a reader sees the old set or the new
set, never a mix), adds the user-visible links of new files, removes the links of files that
left the payload, then removes the old directory.  A reader holding a path through the links
follows the swap; one holding the old directory open sees it vanish.

``fs_group`` does what the kubelet does for a pod with ``securityContext.fsGroup``: the files
belong to that group and are group-readable (mode | 0440), which is how a non-root container
such as the dbmtls image (uid/gid 65532) can read a Secret whose files root owns.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

_counter = itertools.count()


def make_secret_volume(
    path: Path,
    files: Mapping[str, bytes],
    *,
    mode: int = 0o644,
    modes: Mapping[str, int] | None = None,
    fs_group: int | None = None,
) -> Path:
    """A new Secret volume at ``path`` holding ``files``; ``mode`` is the volume's
    ``defaultMode``, ``modes`` per-file ``items[].mode``."""
    path.mkdir(parents=True, exist_ok=True)
    if (path / "..data").is_symlink():
        raise FileExistsError(f"{path} already holds a Secret volume: use swap_secret_volume")
    os.chmod(path, 0o755)  # noqa: S103 -- a volume directory any container user can traverse, as mounted
    _write(path, files, mode=mode, modes=modes or {}, fs_group=fs_group)
    return path


def swap_secret_volume(
    path: Path,
    files: Mapping[str, bytes],
    *,
    mode: int = 0o644,
    modes: Mapping[str, int] | None = None,
    fs_group: int | None = None,
) -> None:
    """Replace the whole payload of the Secret volume at ``path`` atomically, as the kubelet does
    when the Secret changes."""
    if not (path / "..data").is_symlink():
        raise FileNotFoundError(f"{path} is not a Secret volume (no ..data link): use make_secret_volume")
    _write(path, files, mode=mode, modes=modes or {}, fs_group=fs_group)


def _write(
    path: Path, files: Mapping[str, bytes], *, mode: int, modes: Mapping[str, int], fs_group: int | None
) -> None:
    # The kubelet names the directory after the UTC time plus a random suffix (os.MkdirTemp);
    # the counter keeps the names of updates within one second in order, for people reading them.
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + f"{next(_counter):04d}"
    target = Path(tempfile.mkdtemp(prefix=stamp, dir=path))
    os.chmod(target, 0o755)  # noqa: S103 -- the kubelet makes it 0755: the files keep their own modes
    for name, data in files.items():
        if "/" in name or name.startswith(".."):
            raise ValueError(f"{name!r}: Secret keys are plain file names")
        file = target / name
        file.write_bytes(data)
        file_mode = modes.get(name, mode)
        if fs_group is not None:
            os.chown(file, -1, fs_group)
            file_mode |= 0o440
        os.chmod(file, file_mode)
    if fs_group is not None:
        os.chown(target, -1, fs_group)
    data_link = path / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    old_names = {p.name for p in path.iterdir() if p.is_symlink() and not p.name.startswith("..")}
    tmp = path / "..data_tmp"
    os.symlink(target.name, tmp)
    os.rename(tmp, data_link)
    for name in files:
        link = path / name
        if not link.is_symlink():
            os.symlink(f"..data/{name}", link)
    for name in old_names - set(files):
        (path / name).unlink()
    if old is not None:
        shutil.rmtree(path / old)


class SecretDir:
    """A Secret volume updated in place; private keys 0600 (an ``items[].mode``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def update(self, files: dict[str, bytes]) -> None:
        modes = {name: 0o600 for name in files if name.endswith(".key")}
        if (self.path / "..data").is_symlink():
            swap_secret_volume(self.path, files, modes=modes)
        else:
            make_secret_volume(self.path, files, modes=modes)

    def update_from(self, src: Path, names: tuple[str, ...] = ("tls.crt", "tls.key", "ca.crt")) -> None:
        self.update({n: (src / n).read_bytes() for n in names})

    def file(self, name: str) -> str:
        return str(self.path / name)
