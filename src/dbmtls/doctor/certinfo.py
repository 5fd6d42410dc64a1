"""Certificates as people read them: subjects, SANs, dates, usages; and our own files.

Pure functions over ``cryptography`` objects.  Private keys are loaded only to compare
their public half with a certificate; nothing here ever returns or formats key material.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class FileProblem(Exception):
    """One of our files cannot be used; the message says which and why."""


def name_text(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty name)"


def cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def sans(cert: x509.Certificate) -> list[str]:
    """The subjectAltNames as plain values (DNS names, IP addresses, URIs)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for general in ext:
        if isinstance(general, x509.DNSName | x509.UniformResourceIdentifier | x509.RFC822Name):
            out.append(general.value)
        elif isinstance(general, x509.IPAddress):
            out.append(str(general.value))
    return out


def extended_key_usage(cert: x509.Certificate) -> list[str] | None:
    """The EKU purposes by name (None: no EKU extension, i.e. any purpose)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    names = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}
    return [names.get(oid, oid.dotted_string) for oid in eku]


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def stamp(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def validity_problem(cert: x509.Certificate, now: dt.datetime) -> str | None:
    """'expired ...' / 'not valid before ...' or None."""
    if cert.not_valid_after_utc <= now:
        days = (now - cert.not_valid_after_utc).days
        return f"expired at {stamp(cert.not_valid_after_utc)} ({_days(days)} ago)"
    if cert.not_valid_before_utc > now:
        return f"not valid before {stamp(cert.not_valid_before_utc)} (now is {stamp(now)})"
    return None


def _days(n: int) -> str:
    return "less than a day" if n < 1 else f"{n} day{'s' if n != 1 else ''}"


def expires_within(cert: x509.Certificate, now: dt.datetime, seconds: float) -> str | None:
    left = cert.not_valid_after_utc - now
    if dt.timedelta(0) < left <= dt.timedelta(seconds=seconds):
        return f"expires in {_days(round(left.total_seconds() / 86400))}, at {stamp(cert.not_valid_after_utc)}"
    return None


def describe(cert: x509.Certificate) -> dict[str, Any]:
    """For JSON: everything public a person compares when TLS fails."""
    return {
        "subject": name_text(cert.subject),
        "issuer": name_text(cert.issuer),
        "subject_alt_names": sans(cert),
        "not_before": stamp(cert.not_valid_before_utc),
        "not_after": stamp(cert.not_valid_after_utc),
        "serial": f"{cert.serial_number:x}",
        "sha256": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        "ca": is_ca(cert),
        "extended_key_usage": extended_key_usage(cert),
    }


def one_line(cert: x509.Certificate) -> str:
    parts = [f"subject {name_text(cert.subject)}", f"issuer {name_text(cert.issuer)}"]
    names = sans(cert)
    if names:
        parts.append(f"SANs {', '.join(names)}")
    elif not is_ca(cert):
        parts.append("no SANs")
    parts.append(f"valid {stamp(cert.not_valid_before_utc)} .. {stamp(cert.not_valid_after_utc)}")
    return "; ".join(parts)


def chain_lines(chain: list[x509.Certificate]) -> list[str]:
    return [f"[{i}] {one_line(c)}" for i, c in enumerate(chain)]


def load_der_chain(ders: list[bytes]) -> list[x509.Certificate]:
    out = []
    for der in ders:
        try:
            out.append(x509.load_der_x509_certificate(der))
        except ValueError:
            break
    return out


# --- our files ---------------------------------------------------------------------------


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileProblem(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise FileProblem(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_certs(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        hint = " (it holds a private key: are the certificate and key files swapped?)" if b"PRIVATE KEY" in data else ""
        raise FileProblem(f"{what} {path} holds no PEM certificate{hint}")
    return certs


@dataclass(frozen=True)
class KeyCheck:
    matches: bool
    kind: str  # "ECDSA P-256", "RSA 2048", ...


def check_key(path: str, cert: x509.Certificate) -> KeyCheck:
    """Load the private key in ``path`` and compare it with ``cert``; never shows the key."""
    data = _read(path, "private key")
    if b"PRIVATE KEY" not in data:
        if b"CERTIFICATE" in data:
            raise FileProblem(
                f"private key {path} holds a certificate, not a key (are the certificate and key files swapped?)"
            )
        raise FileProblem(f"private key {path} holds no PEM private key")
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise FileProblem(
            f"private key {path} is encrypted (password protected): dbmtls needs an unencrypted key "
            "(e.g. openssl pkey -in KEY -out KEY.plain, kept mode 600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise FileProblem(f"private key {path} cannot be loaded: {exc}") from None
    ours = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyCheck(ours == theirs, _key_kind(key))


def _key_kind(key: PrivateKeyTypes) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.removeprefix("_")


# --- distinguished names as a CertificateRequest carries them (DER) ------------------------------

_STRING_TAGS = {0x0C, 0x13, 0x14, 0x16, 0x1A, 0x1C, 0x1E}


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, value, next position) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated")
    return tag, data[pos : pos + length], pos + length


def _oid(value: bytes) -> str:
    if not value:
        raise ValueError("empty OID")
    arcs = [value[0] // 40, value[0] % 40] if value[0] < 80 else [2, value[0] - 80]
    n = 0
    for b in value[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(n)
            n = 0
    return ".".join(map(str, arcs))


def _string(tag: int, value: bytes) -> str:
    if tag == 0x1E:
        return value.decode("utf-16-be", "replace")
    if tag == 0x1C:
        return value.decode("utf-32-be", "replace")
    return value.decode("utf-8", "replace")


def der_name(der: bytes) -> x509.Name | None:
    """A DER Name (SEQUENCE OF SET OF {OID, string}) as an ``x509.Name``; None if not one."""
    try:
        tag, body, end = _tlv(der, 0)
        if tag != 0x30 or end != len(der):
            return None
        rdns = []
        pos = 0
        while pos < len(body):
            tag, rdn_body, pos = _tlv(body, pos)
            if tag != 0x31:
                return None
            attrs = []
            inner = 0
            while inner < len(rdn_body):
                tag, atv, inner = _tlv(rdn_body, inner)
                oid_tag, oid_value, at = _tlv(atv, 0)
                value_tag, value, _ = _tlv(atv, at)
                if tag != 0x30 or oid_tag != 0x06 or value_tag not in _STRING_TAGS:
                    return None
                attrs.append(x509.NameAttribute(x509.ObjectIdentifier(_oid(oid_value)), _string(value_tag, value)))
            rdns.append(x509.RelativeDistinguishedName(attrs))
        return x509.Name(rdns)
    except ValueError:
        return None


def der_name_text(der: bytes) -> str:
    name = der_name(der)
    return name_text(name) if name is not None else f"(unparsable name, {len(der)} bytes)"


def same_name(a: x509.Name | None, b: x509.Name | None) -> bool:
    """Names compared the forgiving way OpenSSL does (case and spacing of values aside)."""
    if a is None or b is None:
        return False
    return " ".join(name_text(a).lower().split()) == " ".join(name_text(b).lower().split())
