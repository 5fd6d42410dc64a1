"""The TLS identity of one database, loaded from files and swapped atomically.

Loading is two steps so that the slow one can leave the event loop:

* ``ClientTLS.attempt()`` reads and validates *everything* (certificate chain
  parses, key matches certificate, not expired, not yet valid, CA bundle
  non-empty) into a new ``Material`` and builds its SSLContexts.  It only reads
  the immutable configuration and the files and changes nothing, so it is safe
  to run in a worker thread (the reloader does, with ``asyncio.to_thread``);
* ``ClientTLS.apply()`` then swaps the result in with a single attribute
  assignment, on the event loop, the only thread that reads ``material``.

A broken or half-written replacement therefore never makes things worse: the
old material stays in use and the error says which file is wrong (ghostunnel's
certloader does the same).  Open connections keep the context they were made
with; new connections pick up the new one at once (``context_for`` is called per
connection).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from dbmtls.config.model import DatabaseConfig
from dbmtls.errors import ConfigError, IdentityError, TLSHandshakeError
from dbmtls.tls.certfields import CertFields, load_pem
from dbmtls.tls.context import EncryptedKey, build_context


@dataclass(frozen=True)
class CertInfo:
    kind: str  # "client" or "ca"
    path: str
    subject: str
    serial: int
    not_after: dt.datetime


@dataclass(frozen=True)
class Material:
    default: ssl.SSLContext | None
    by_user: dict[str, ssl.SSLContext]
    certs: tuple[CertInfo, ...]
    warnings: tuple[str, ...] = field(default=())


class CertificateNotYetValid(ConfigError):
    """A client certificate whose notBefore is still ahead of our clock.

    Its own class, with the instant as data, because it is the one failure that
    cures itself with time: the reloader retries exactly when it becomes valid
    instead of backing off (a certificate issued at pod start by an issuer whose
    clock runs ahead of ours must not leave the database unready until a SIGHUP).
    """

    def __init__(self, message: str, *, not_before: dt.datetime, path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.not_before = not_before


def fingerprint(paths: list[str]) -> str:
    """A digest of the files' *contents* (through symlinks), a read error counting as content.

    Content, not paths or mtimes, is what changes when the kubelet swaps a Secret's
    ``..data`` symlink or an editor renames a new file over the old one.
    """
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode() + b"\0")
        try:
            with open(p, "rb") as f:
                h.update(f.read())
        except OSError as exc:
            h.update(f"<{exc.errno}>".encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Attempt:
    """What one load found: the files' fingerprint and either new material or the error."""

    fingerprint: str
    material: Material | None
    error: ConfigError | None


def _read_certs(path: str, what: str, yaml_path: str) -> list[CertFields]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} not found", path=yaml_path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}", path=yaml_path) from None
    try:
        certs = load_pem(data)  # OpenSSL's decoding where built, else cryptography's (certfields.py)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{what} file {path} holds no PEM certificate (empty or truncated?)", path=yaml_path)
    return certs


def _pair_problem(cert_path: str, key_path: str, openssl_says: str) -> str:
    """Why OpenSSL could not load a key pair, in words (it only says "PEM lib")."""
    try:
        with open(key_path, "rb") as f:
            key = f.read()
    except OSError:
        key = b""
    if b"PRIVATE KEY-----" not in key:
        if b"-----BEGIN CERTIFICATE-----" in key:
            return (
                f"privateKey {key_path} holds a certificate, not a private key "
                f"(clientCertificate and privateKey swapped? the key is the file with 'PRIVATE KEY')"
            )
        return f"privateKey {key_path} holds no PEM private key (empty, truncated or DER?)"
    if b"ENCRYPTED" in key:
        return f"privateKey {key_path} is encrypted with a passphrase; dbmtls needs it unencrypted"
    return f"cannot load key pair {cert_path} / {key_path}: {openssl_says}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _info(kind: str, path: str, cert: CertFields) -> CertInfo:
    return CertInfo(kind, path, cert.subject, cert.serial, cert.not_after)


def _in_kubernetes_volume(path: str) -> bool:
    """Whether ``path`` is a file of a Secret/ConfigMap volume (the kubelet's ``..data`` layout).

    The kubelet writes those files itself (0644 by default, or 0440 with an fsGroup so that a
    non-root container can read them), and the volume is visible only to the containers that
    mount it: "chmod 600 it" is advice that cannot be followed there, and not needed.
    """
    parent = os.path.dirname(os.path.abspath(path))
    data = os.path.join(parent, "..data")
    return os.path.islink(data) and os.path.realpath(path).startswith(os.path.realpath(data) + os.sep)


def key_permission_warning(path: str) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and not _in_kubernetes_volume(path):
        return f"private key {path} is readable by group/others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
    return None


class ClientTLS:
    """Loads, validates and holds the TLS contexts of one database."""

    def __init__(self, db: DatabaseConfig) -> None:
        self.db = db
        self.alpn = db.spec.alpn  # only where the protocol defines one
        self.material: Material | None = None
        self.last_error: str | None = None
        # The last failed attempt (None after a success): the reloader reads its class, e.g.
        # CertificateNotYetValid, to decide when to try again.
        self.last_failure: ConfigError | None = None
        # The files' fingerprint when they were last tried (None: never tried).
        self.tried_fingerprint: str | None = None

    @property
    def enabled(self) -> bool:
        return self.db.tls.mode != "DISABLE"

    def files(self) -> list[str]:
        t = self.db.tls
        out = [p for p in (t.clientCertificate, t.privateKey, t.caCertificates) if p]
        for uc in t.userCertificates.values():
            out += [uc.clientCertificate, uc.privateKey]
        return out

    def _context(self, cert: tuple[str, str] | None, yaml_path: str) -> ssl.SSLContext:
        t = self.db.tls
        try:
            return _build(self.db, cert, self.alpn)
        except ssl.SSLError as exc:
            text = exc.reason or str(exc)
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise ConfigError(
                    f"private key {cert[1] if cert else '?'} does not match certificate {cert[0] if cert else '?'}",
                    path=f"{yaml_path}.privateKey",
                ) from None
            if cert is not None and ("PEM" in str(exc) or "KEY" in str(exc).upper()):
                raise ConfigError(_pair_problem(cert[0], cert[1], text), path=f"{yaml_path}.privateKey") from None
            raise ConfigError(f"cannot build TLS context: {text}", path="tls.caCertificates") from None
        except EncryptedKey:
            key = cert[1] if cert else "?"
            raise ConfigError(
                f"privateKey {key} is encrypted with a passphrase; dbmtls needs it unencrypted "
                f"(openssl pkey -in {key} -out plain.key)",
                path=f"{yaml_path}.privateKey",
            ) from None
        except FileNotFoundError as exc:
            raise ConfigError(f"file {exc.filename} not found", path=yaml_path) from None
        except OSError as exc:
            where = "caCertificates" if exc.filename == t.caCertificates else "privateKey"
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}", path=f"{yaml_path}.{where}") from None

    def build(self) -> Material:
        """Read and validate every file; raise ConfigError naming the file and what is wrong."""
        now = _now()
        t = self.db.tls
        certs: list[CertInfo] = []
        warnings: list[str] = []
        if not self.enabled:
            return Material(None, {}, ())
        if t.caCertificates and not t.insecureSkipVerify:
            for c in _read_certs(t.caCertificates, "CA bundle", "tls.caCertificates"):
                certs.append(_info("ca", t.caCertificates, c))
        pairs: list[tuple[str | None, str, str, str]] = []
        if t.clientCertificate and t.privateKey:
            pairs.append((None, t.clientCertificate, t.privateKey, "tls"))
        for user, uc in t.userCertificates.items():
            pairs.append((user, uc.clientCertificate, uc.privateKey, f"tls.userCertificates.{user}"))
        by_user: dict[str, ssl.SSLContext] = {}
        default: ssl.SSLContext | None = None
        for who, cert_path, key_path, yaml_path in pairs:
            leaf = _read_certs(cert_path, "client certificate", f"{yaml_path}.clientCertificate")[0]
            if leaf.not_after <= now:
                raise ConfigError(
                    f"client certificate {cert_path} expired at {leaf.not_after:%Y-%m-%d %H:%M:%S}Z",
                    path=f"{yaml_path}.clientCertificate",
                )
            if (not_before := leaf.not_before) > now:
                raise CertificateNotYetValid(
                    f"client certificate {cert_path} is not valid before {not_before:%Y-%m-%d %H:%M:%S}Z",
                    not_before=not_before,
                    path=f"{yaml_path}.clientCertificate",
                )
            if (w := key_permission_warning(key_path)) is not None:
                warnings.append(w)
            ctx = self._context((cert_path, key_path), yaml_path)
            certs.append(_info("client", cert_path, leaf))
            if who is None:
                default = ctx
            else:
                by_user[who] = ctx
        if default is None and not pairs:
            default = self._context(None, "tls")  # SIMPLE: server verification only
        return Material(default, by_user, tuple(certs), tuple(warnings))

    def attempt(self) -> Attempt:
        """Fingerprint the files, then build from them; never raises a ConfigError, changes nothing.

        Safe in a worker thread.  The fingerprint is taken *before* the files are read:
        a file replaced in between is then loaded new but recorded old, so the next
        poll sees a change and loads it again; the other order could miss a change.
        """
        fp = fingerprint(self.files())
        try:
            return Attempt(fp, self.build(), None)
        except ConfigError as exc:
            return Attempt(fp, None, exc)

    def apply(self, attempt: Attempt) -> None:
        """Swap in the attempt's material, or record its error and keep the old material (on the loop)."""
        self.tried_fingerprint = attempt.fingerprint
        if attempt.material is None:
            self.last_failure = attempt.error
            self.last_error = attempt.error.message if attempt.error is not None else "not loaded"
            return
        self.material = attempt.material  # one assignment: a connection sees the old or the new, never a mix
        self.last_error = None
        self.last_failure = None

    def load(self) -> Material:
        """Build and swap in new material in this thread; on error keep the old one and raise.

        For start-up (``Proxy.start``), before any listener is bound and so before any
        connection could wait for it; a running process reloads through ``attempt`` in a
        worker thread and ``apply`` on the loop (``dbmtls.tls.reload``).
        """
        attempt = self.attempt()
        self.apply(attempt)
        if attempt.material is None:
            raise attempt.error or ConfigError("TLS material not loaded")
        return attempt.material

    def context_for(self, user: str | None) -> ssl.SSLContext | None:
        """The context for a connection (None: TLS disabled).  Fail closed when nothing fits."""
        if not self.enabled:
            return None
        m = self.material
        if m is None:
            raise TLSHandshakeError(
                f"TLS material is not loaded: {self.last_error or 'not loaded yet'}",
                hint="fix the certificate files; dbmtls reloads them automatically",
            )
        if user is not None and user in m.by_user:
            return m.by_user[user]
        if m.default is None:
            raise IdentityError(
                f"no client certificate configured for database user {user!r}",
                hint=f"add {user!r} under tls.userCertificates, or connect as one of: {', '.join(sorted(m.by_user))}",
            )
        return m.default


def _build(db: DatabaseConfig, cert: tuple[str, str] | None, alpn: Sequence[str]) -> ssl.SSLContext:
    return build_context(db.tls, db.verify_names, db.server_name, cert, alpn)
