"""A small development CA: ``dbmtls certs ca/issue``, the demo, the tests and the benchmarks.

The files it writes have the shape of a cert-manager / Kubernetes TLS Secret
(``tls.crt``, ``tls.key``, ``ca.crt``) so that the same directory layout works
for a local demo and for a mounted Secret.  The certificates follow what strict
verifiers expect (OpenSSL's X509_STRICT, Python 3.13's default flags): critical
BasicConstraints on the CA, KeyUsage, SKI/AKI, SAN on every leaf.

Private keys are created with mode 0600 from the first byte (never chmod'ed
afterwards, which would leave a window where they are world-readable), every
file is replaced atomically so that a certificate watcher never sees half a
PEM, and nothing here ever prints or logs key material.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dbmtls.errors import ConfigError

KeyType = Literal["ecdsa", "rsa"]
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

__all__ = ["KeyType", "PrivateKey", "create_ca", "describe", "issue", "load_ca"]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
TLS_CERT = "tls.crt"
TLS_KEY = "tls.key"

# Leaves start a little in the past so that a peer whose clock lags ours does
# not reject a certificate issued a moment ago as "not yet valid".
CLOCK_SKEW = dt.timedelta(minutes=5)
RSA_BITS = 2048
# RFC 5280: serials are positive and at most 20 octets, so below 2**159.
MAX_SERIAL = 2**159

# A DNS-name-ish client principal: labels of letters, digits, '-' and '_'
# (database user names often contain '_', CockroachDB takes the user from a DNS
# SAN), not starting or ending with '-'.
_DNSISH_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNSISH = re.compile(rf"{_DNSISH_LABEL}(?:\.{_DNSISH_LABEL})*")


# --- public API ---------------------------------------------------------------------


def create_ca(
    out_dir: str | Path,
    *,
    common_name: str = "dbmtls dev CA",
    key_type: KeyType = "ecdsa",
    days: int = 3650,
) -> Path:
    """Write ``out_dir/ca.crt`` and ``out_dir/ca.key`` (0600), plus ``tls.crt``/``tls.key``.

    ``tls.*`` hold the same CA because that is how cert-manager shapes a CA
    Secret (``tls.crt`` = CA cert, ``tls.key`` = CA key, ``ca.crt``).  Returns ``out_dir``.
    """
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    out = Path(out_dir)
    key = _generate_key(key_type)
    name = x509.Name([_cn(common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # No path length limit: tests may hang an intermediate below this CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True, rsa_key=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = _key_pem(key)
    _ensure_dir(out)
    # Key before certificate: a reader that pairs ca.crt with ca.key must never
    # find a new certificate next to the old key.
    _write_atomic(out / CA_KEY, key_pem, private=True)
    _write_atomic(out / CA_CERT, cert_pem, private=False)
    _write_atomic(out / TLS_KEY, key_pem, private=True)
    _write_atomic(out / TLS_CERT, cert_pem, private=False)
    return out


def issue(
    ca_dir: str | Path,
    out_dir: str | Path,
    *,
    server_names: Sequence[str] = (),
    client_cn: str | None = None,
    key_type: KeyType = "ecdsa",
    days: int = 90,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    serial: int | None = None,
) -> Path:
    """Issue a leaf certificate signed by the CA in ``ca_dir``; returns ``out_dir``.

    Writes ``tls.crt`` (leaf), ``tls.key`` (0600; PKCS#8 for ecdsa, PKCS#1 for
    rsa) and ``ca.crt`` (the CA certificate): a Kubernetes TLS Secret's shape.

    ``server_names`` (DNS names and IP addresses) go to the SAN with EKU
    serverAuth, and the first one becomes the CN.  ``client_cn`` becomes the CN
    with EKU clientAuth, plus a DNS SAN when it looks like a DNS name.  With both,
    the certificate has both EKUs and the CN is ``client_cn`` (the identity
    PostgreSQL/MySQL read from the subject; hostname checks only look at SANs).

    Naive datetimes are taken as UTC.  Without ``not_before`` the validity
    starts 5 minutes ago; if ``not_after`` is given and falls before that, the
    validity starts ``days`` before ``not_after`` (so an expired certificate is
    just ``not_after=<past>``).  Without ``not_after`` it ends ``days`` after
    the start (or after now, whichever is later).
    """
    names = [n.strip() for n in server_names]
    _check_leaf_request(names, client_cn, days, serial)
    out = Path(out_dir)
    if out.resolve() == Path(ca_dir).resolve():
        # The CA directory's tls.* are the CA itself; overwriting them with a
        # leaf would quietly break consumers of the cert-manager CA shape.
        raise ValueError("out_dir must differ from ca_dir")

    ca_cert, ca_key = load_ca(ca_dir)
    key = _generate_key(key_type)
    validity = _validity(days, not_before, not_after)
    cert = _sign_leaf(ca_cert, ca_key, key, names, client_cn, serial=serial, validity=validity)

    _ensure_dir(out)
    # ca.crt first (a reloader that sees the new leaf can already verify it),
    # then the key, then the leaf, as in create_ca.
    _write_atomic(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write_atomic(out / TLS_KEY, _key_pem(key), private=True)
    _write_atomic(out / TLS_CERT, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return out


def load_ca(ca_dir: str | Path) -> tuple[x509.Certificate, PrivateKey]:
    """Read ``ca.crt`` and ``ca.key`` from ``ca_dir``; ConfigError if missing, invalid or mismatched."""
    d = Path(ca_dir)
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    cert_pem = _read(cert_path, "CA certificate")
    key_pem = _read(key_path, "CA private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}", source=str(cert_path)) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message may quote parts of the input: do not pass it on.
        raise ConfigError("not an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)", source=str(key_path)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError("CA key must be ECDSA or RSA", source=str(key_path))
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ConfigError(f"{CA_KEY} does not match {CA_CERT}", source=str(d))
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ConfigError("certificate is not a CA (BasicConstraints CA=true missing)", source=str(cert_path))
    return cert, key


def describe(cert_path: str | Path) -> str:
    """One line: subject CN, SANs, not-after, serial (hex) and issuer CN of a PEM certificate."""
    path = Path(cert_path)
    try:
        cert = x509.load_pem_x509_certificate(_read(path, "certificate"))
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}", source=str(path)) from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = ",".join(_describe_name(g) for g in san)
    except x509.ExtensionNotFound:
        sans = "-"
    not_after = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"CN={_first_cn(cert.subject)} SAN={sans} notAfter={not_after} "
        f"serial={cert.serial_number:x} issuer=CN={_first_cn(cert.issuer)}"
    )


# --- helpers ------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    lifetime = dt.timedelta(days=days)
    now = _now()
    if not_before is not None:
        start = _utc(not_before)
    else:
        start = now - CLOCK_SKEW
        if not_after is not None and _utc(not_after) <= start:
            start = _utc(not_after) - lifetime
    end = _utc(not_after) if not_after is not None else max(start, now) + lifetime
    if end <= start:
        raise ValueError(f"not_after ({end.isoformat()}) must be after not_before ({start.isoformat()})")
    return start, end


def _check_leaf_request(names: Sequence[str], client_cn: str | None, days: int, serial: int | None) -> None:
    """ValueError for arguments that are wrong whatever the CA holds: checked before it is read."""
    if any(not n for n in names):
        raise ValueError("server_names must not contain empty names")
    if client_cn is not None and not client_cn.strip():
        raise ValueError("client_cn must not be empty")
    if not names and client_cn is None:
        raise ValueError("give server_names, client_cn, or both")
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    if serial is not None and not 0 < serial < MAX_SERIAL:
        raise ValueError("serial must be a positive integer below 2**159 (20 octets)")


def _sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    key: PrivateKey,
    names: Sequence[str],
    client_cn: str | None,
    *,
    serial: int | None,
    validity: tuple[dt.datetime, dt.datetime],
) -> x509.Certificate:
    """The leaf certificate ``issue`` describes, signed with ``ca_key``."""
    sans: list[x509.GeneralName] = [_san(n) for n in names]
    if client_cn is not None and _is_dnsish(client_cn):
        sans.append(x509.DNSName(client_cn))
    sans = list(dict.fromkeys(sans))  # dedupe, keep order (client_cn may also be a server name)

    usages: list[x509.ObjectIdentifier] = []
    if names:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client_cn is not None:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)

    subject = x509.Name([_cn(client_cn if client_cn is not None else names[0])])
    start, end = validity
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False, rsa_key=isinstance(key, rsa.RSAPrivateKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _generate_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ValueError(f"key_type must be 'ecdsa' or 'rsa', got {key_type!r}")


def _key_pem(key: PrivateKey) -> bytes:
    # RSA as PKCS#1 ("BEGIN RSA PRIVATE KEY"), cert-manager's default encoding,
    # which every database server and client library reads; EC as PKCS#8.
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if isinstance(key, rsa.RSAPrivateKey)
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return b""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_usage(*, ca: bool, rsa_key: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        # RSA key exchange (TLS 1.2 RSA suites) encrypts to the leaf key.
        key_encipherment=not ca and rsa_key,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # Reuse the CA's own SKI when it has one, so that AKI matches it exactly
    # even for a CA made elsewhere with a different SKI method.
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        pub = ca_cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise ConfigError("CA public key must be ECDSA or RSA") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(pub)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _cn(value: str) -> x509.NameAttribute[str]:
    if not 1 <= len(value) <= 64:
        # RFC 5280 upper bound for commonName; cryptography rejects longer ones.
        raise ValueError(f"common name must be 1-64 characters, got {len(value)}")
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        # SANs are IA5String: internationalised names go in as A-labels.
        ascii_name = name if name.isascii() else name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a valid DNS name or IP address: {name!r}") from None
    return x509.DNSName(ascii_name)


def _is_dnsish(name: str) -> bool:
    if len(name) > 253:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return _DNSISH.fullmatch(name) is not None
    return False  # an IP address is not a user name


def _first_cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return "-"
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _describe_name(g: x509.GeneralName) -> str:
    if isinstance(g, x509.DNSName):
        return f"DNS:{g.value}"
    if isinstance(g, x509.IPAddress):
        return f"IP:{g.value}"
    if isinstance(g, x509.UniformResourceIdentifier):
        return f"URI:{g.value}"
    if isinstance(g, x509.RFC822Name):
        return f"email:{g.value}"
    return type(g).__name__


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", source=str(path)) from None


def _ensure_dir(path: Path) -> None:
    # 0700: the directory holds private keys; an existing directory keeps the
    # mode its owner chose.
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_atomic(path: Path, data: bytes, *, private: bool) -> None:
    """Write via a temp file in the same directory, fsync, rename over ``path``.

    Private files are opened with 0600 so they are never readable by others,
    not even for the instant between create and chmod.
    """
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
