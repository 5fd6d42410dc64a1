"""The few fields of a certificate a running sidecar reads, without importing cryptography.

The control plane reads certificate files for their subject, serial number and validity (expiry
checks, metrics, log lines: ``tls/material.py``) and, when ``subjectAltNames`` are configured, a
server certificate's SANs (``tls/context.py``).  cryptography decodes all of that, but importing
its Rust extension costs a running process about 10 MiB of RSS (docs/memory.md).  Where the
native extension is built, OpenSSL (loaded anyway, by ``ssl``) decodes them instead
(``dbmtls._native.cert_fields``); cryptography stays the fallback, imported only when it is
needed: no native extension, or a certificate with something unusual in it (a name attribute that
is not a string, a repeated or undecodable SAN extension, a PEM block OpenSSL would not take).
Either way the answers are cryptography's: the subject is formatted exactly like
``Name.rfc4514_string()`` and tests/unit/test_certfields.py compares the two on many certificates.
"""

from __future__ import annotations

import binascii
import datetime as dt
import importlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

# cryptography's short names (x509/name.py, _NAMEOID_TO_NAME); every other OID is dotted.
_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class CertFields:
    subject: str  # RFC 4514, as cryptography's Name.rfc4514_string()
    serial: int
    not_before: dt.datetime  # UTC
    not_after: dt.datetime  # UTC


@dataclass(frozen=True, slots=True)
class SubjectAltNames:
    dns: tuple[str, ...]
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    uris: tuple[str, ...]


class _Unusual(Exception):
    """Something the fast path leaves to cryptography."""


def _escape(value: str) -> str:
    """RFC 4514 escaping (its 2.4), as cryptography's ``_escape_dn_value`` does it."""
    if not value:
        return ""
    for ch, esc in (("\\", "\\\\"), ('"', '\\"'), ("+", "\\+"), (",", "\\,"), (";", "\\;"), ("<", "\\<"), (">", "\\>")):
        value = value.replace(ch, esc)
    value = value.replace("\0", "\\00")
    if value[0] == "#" or (value[0] == " " and len(value) > 1):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


def _rfc4514(rdns: Any) -> str:
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(oid, oid)}={_escape(value)}" for oid, value in rdn) for rdn in reversed(rdns)
    )


def _utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


_NO_EXTENSION = object()
_extension: Any = None


def _native() -> Any:
    """dbmtls._native, the compiled module itself (not the dbmtls.native package, which builds
    on this one), or None where it was not built."""
    global _extension
    if _extension is None:
        try:
            _extension = importlib.import_module("dbmtls._native")
        except ImportError:
            _extension = _NO_EXTENSION
    return None if _extension is _NO_EXTENSION else _extension


def _fast(der: bytes) -> tuple[CertFields, Any]:
    module = _native()
    if module is None:
        raise _Unusual
    try:
        serial, not_before, not_after, subject, sans = module.cert_fields(der)
    except module.Error:
        raise _Unusual from None
    return CertFields(_rfc4514(subject), int(serial, 16), _utc(not_before), _utc(not_after)), sans


def _pem_blocks(data: bytes) -> list[bytes]:
    """The DER of each CERTIFICATE block; _Unusual for anything else PEM-like in the file (other
    block types, headers, odd spacing), which cryptography then reads its own way."""
    matches = list(_PEM.finditer(data))
    if not matches or len(matches) != data.count(b"-----BEGIN "):
        raise _Unusual
    try:
        return [binascii.a2b_base64(b"".join(m.group(1).split()), strict_mode=True) for m in matches]
    except binascii.Error:
        raise _Unusual from None


def load_pem(data: bytes) -> list[CertFields]:
    """Every certificate of a PEM file, in order.  ValueError when none can be read (the same
    cases in which cryptography's ``load_pem_x509_certificates`` raises)."""
    try:
        return [_fast(der)[0] for der in _pem_blocks(data)]
    except _Unusual:
        pass
    from cryptography import x509  # the fallback; imported only now (docs/memory.md)

    return [_from_cryptography(c) for c in x509.load_pem_x509_certificates(data)]


def load_der(der: bytes) -> CertFields:
    """One DER certificate (ValueError if it is not one)."""
    try:
        return _fast(der)[0]
    except _Unusual:
        pass
    from cryptography import x509

    return _from_cryptography(x509.load_der_x509_certificate(der))


def subject_alt_names(der: bytes) -> SubjectAltNames | None:
    """The DNS, IP and URI names of a DER certificate's SAN extension, None without one."""
    try:
        _fields, sans = _fast(der)
    except _Unusual:
        return _sans_from_cryptography(der)
    if sans is None:
        return None
    if any(kind == "ip" and len(v) not in (4, 16) for kind, v in sans):
        return _sans_from_cryptography(der)  # malformed: cryptography says what it makes of it
    dns = tuple(v for kind, v in sans if kind == "dns")
    uris = tuple(v for kind, v in sans if kind == "uri")
    ips = tuple(ipaddress.ip_address(v) for kind, v in sans if kind == "ip" and len(v) in (4, 16))
    return SubjectAltNames(dns, ips, uris)


def _from_cryptography(cert: Any) -> CertFields:
    return CertFields(
        cert.subject.rfc4514_string(), cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc
    )


def _sans_from_cryptography(der: bytes) -> SubjectAltNames | None:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return SubjectAltNames(
        tuple(san.get_values_for_type(x509.DNSName)),
        tuple(
            ip
            for ip in san.get_values_for_type(x509.IPAddress)
            if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
        ),
        tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
    )
