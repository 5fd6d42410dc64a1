"""``credentialName``: a Kubernetes Secret, read from the directory where it is mounted.

Istio's sidecars fetch a ``credentialName`` Secret from the API server; dbmtls reads files.
The Secret is therefore expected mounted at ``<credentialsDir>/<name>/`` (default
``/var/run/secrets/dbmtls/credentials/<name>/``, where the Kubernetes injector mounts it), in
one of the two layouts Istio accepts for a client credential:

* ``tls.crt``, ``tls.key``, ``ca.crt``: a ``kubernetes.io/tls`` Secret, cert-manager's layout;
* ``cert``, ``key``, ``cacert``: Istio's generic Secret.

Which layout is decided by the files that exist when the config is loaded.  When neither
does, the cert-manager names are used, so that ``dbmtls check`` and ``/readyz`` name the files
they expected (and a Secret mounted later in that layout is picked up by the reloader).  A
Secret without a CA file (a cert-manager Certificate from a public ACME issuer has none) means
the system trust store, as ``caCertificates`` left out does; ``check`` says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CREDENTIALS_DIR = "/var/run/secrets/dbmtls/credentials"

# (client certificate, private key, CA) per layout, in the order they are tried
LAYOUTS: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("cert-manager (kubernetes.io/tls)", ("tls.crt", "tls.key", "ca.crt")),
    ("Istio generic Secret", ("cert", "key", "cacert")),
)
EXPECTED_FILES = " or ".join(", ".join(names) for _, names in LAYOUTS)
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_KUBERNETES_PREFIX = "kubernetes://"


@dataclass(frozen=True)
class Credential:
    """What a ``credentialName`` resolved to: the files to use and how they were chosen."""

    name: str
    directory: str
    layout: str  # one of LAYOUTS' names, or "" when the directory holds neither
    files: dict[str, str]  # TLS field (clientCertificate, privateKey, caCertificates) -> path
    notes: tuple[str, ...] = ()

    def how(self, file: str) -> str:
        """Where ``file`` came from, for ``check``."""
        return f"credentialName {self.name}: {self.layout or 'not mounted, expected'} {file.rsplit('/', 1)[-1]}"

    @property
    def hint(self) -> str:
        """What to do when its files cannot be loaded."""
        return (
            f"credentialName {self.name} is read from {self.directory}/ ({EXPECTED_FILES}): mount the Secret there, "
            "or set credentialsDir (or overrides.<database>.tls) to where the files are"
        )

    @property
    def expected(self) -> str:
        """The files the Secret should provide, for an error message."""
        return f"{EXPECTED_FILES} in {self.directory}/"


def secret_name(value: object) -> str:
    """The Secret name of a ``credentialName`` value; ValueError says what is wrong with it."""
    if not isinstance(value, str) or not value:
        raise ValueError("credentialName must be the name of a Secret")
    name = value.removeprefix(_KUBERNETES_PREFIX)
    if "://" in name:
        raise ValueError(
            f"credentialName {value!r}: dbmtls reads Secrets mounted as files; only a Secret name "
            f"(or {_KUBERNETES_PREFIX}NAME) can be mounted"
        )
    if not _SECRET_NAME.match(name) or len(name) > 253:
        raise ValueError(f"credentialName {value!r} is not a Kubernetes Secret name (a DNS-1123 subdomain)")
    return name


def resolve(name: str, *, mutual: bool, verify: bool, credentials_dir: str) -> Credential:
    """The files of Secret ``name`` under ``credentials_dir``, looked up now.

    ``mutual``: the client certificate and key are used (mode MUTUAL); with SIMPLE, as in
    Istio, the Secret only supplies the CA.  ``verify``: the CA is used (not insecureSkipVerify).
    """
    directory = str(Path(credentials_dir) / name)
    layout, (cert, key, ca) = _layout(Path(directory), mutual)
    files: dict[str, str] = {}
    notes: list[str] = []
    if mutual:
        files["clientCertificate"] = f"{directory}/{cert}"
        files["privateKey"] = f"{directory}/{key}"
    if verify:
        if layout and not (Path(directory) / ca).exists():
            notes.append(
                f"{directory}/{ca} does not exist: the server is verified against the system trust store "
                "(as with caCertificates left out)"
            )
        else:
            files["caCertificates"] = f"{directory}/{ca}"
    if not layout:
        notes.append(f"Secret {name!r} is not mounted: expected {Credential(name, directory, '', {}).expected}")
    return Credential(name, directory, layout, files, tuple(notes))


def _layout(directory: Path, mutual: bool) -> tuple[str, tuple[str, str, str]]:
    for layout, names in LAYOUTS:
        wanted = names[:2] if mutual else names[2:]
        if any((directory / n).exists() for n in wanted):
            return layout, names
    return "", LAYOUTS[0][1]
