"""dbmtls.tls.certfields gives cryptography's answers, decoded by OpenSSL (or by cryptography).

Every certificate here is made with cryptography, then read three ways: by cryptography itself
(the reference), by the native extension's fast path, and with the extension hidden (the
fallback).  The three must agree on the subject string (RFC 4514, cryptography's formatting and
escaping), the serial number, the validity and the SANs, and fail on the same bad input.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from dbmtls.native import load
from dbmtls.tls import certfields
from dbmtls.tls.certfields import CertFields, SubjectAltNames, load_der, load_pem, subject_alt_names
from dbmtls.tls.context import match_names

KEY = ec.generate_private_key(ec.SECP256R1())
UTC = dt.UTC


@pytest.fixture(params=["native", "fallback"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with OpenSSL's decoding and with cryptography's (the extension hidden).  On
    the native way, a certificate left to cryptography fails the test: the fast path must be
    what answered."""
    if request.param == "native":
        if load()[0] is None:
            pytest.skip("the native extension is not built")

        def fallback(*_: object) -> None:
            raise AssertionError("the fast path left this certificate to cryptography")

        monkeypatch.setattr(certfields, "_from_cryptography", fallback)
        monkeypatch.setattr(certfields, "_sans_from_cryptography", fallback)
    else:
        monkeypatch.setattr(certfields, "_native", lambda: None)
    return str(request.param)


def make(
    subject: x509.Name,
    *,
    serial: int = 1234567,
    not_before: dt.datetime = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    not_after: dt.datetime = dt.datetime(2035, 6, 7, 8, 9, 10, tzinfo=UTC),
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(KEY, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def reference(cert: x509.Certificate) -> CertFields:
    return CertFields(
        cert.subject.rfc4514_string(), cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc
    )


def attr(oid: ObjectIdentifier, value: str, tag: Any = None) -> x509.NameAttribute[str]:
    return x509.NameAttribute(oid, value) if tag is None else x509.NameAttribute(oid, value, _type=tag)


SUBJECTS = {
    "cn only": x509.Name([attr(NameOID.COMMON_NAME, "app.example")]),
    "usual": x509.Name(
        [
            attr(NameOID.COUNTRY_NAME, "DE"),
            attr(NameOID.STATE_OR_PROVINCE_NAME, "Berlin"),
            attr(NameOID.LOCALITY_NAME, "Berlin"),
            attr(NameOID.ORGANIZATION_NAME, "Example GmbH"),
            attr(NameOID.ORGANIZATIONAL_UNIT_NAME, "Platform"),
            attr(NameOID.COMMON_NAME, "jinsu"),
        ]
    ),
    "every short name and dotted ones": x509.Name(
        [
            attr(NameOID.DOMAIN_COMPONENT, "com"),
            attr(NameOID.DOMAIN_COMPONENT, "example"),
            attr(NameOID.USER_ID, "u1001"),
            attr(NameOID.STREET_ADDRESS, "Main St 1"),
            attr(NameOID.EMAIL_ADDRESS, "ops@example.com"),
            attr(NameOID.SERIAL_NUMBER, "42"),
            attr(NameOID.COMMON_NAME, "x"),
        ]
    ),
    "characters RFC 4514 escapes": x509.Name(
        [
            attr(NameOID.ORGANIZATION_NAME, 'a,b+c"d\\e<f>g;h'),
            attr(NameOID.ORGANIZATIONAL_UNIT_NAME, "#leading hash"),
            attr(NameOID.LOCALITY_NAME, " leading and trailing space "),
            attr(NameOID.STATE_OR_PROVINCE_NAME, " "),
            attr(NameOID.COMMON_NAME, "nul\0inside"),
        ]
    ),
    "unicode in UTF8String, BMPString and UniversalString": x509.Name(
        [
            attr(NameOID.ORGANIZATION_NAME, "Jürgen & Søn 株式会社"),
            attr(NameOID.ORGANIZATIONAL_UNIT_NAME, "Größe", x509.name._ASN1Type.BMPString),
            attr(NameOID.LOCALITY_NAME, "Zürich 🚀", x509.name._ASN1Type.UniversalString),
            attr(NameOID.COMMON_NAME, "printable", x509.name._ASN1Type.PrintableString),
        ]
    ),
    "multi-valued RDN": x509.Name(
        [
            x509.RelativeDistinguishedName([attr(NameOID.ORGANIZATION_NAME, "Org")]),
            x509.RelativeDistinguishedName(
                [attr(NameOID.COMMON_NAME, "multi"), attr(NameOID.ORGANIZATIONAL_UNIT_NAME, "unit")]
            ),
        ]
    ),
    "empty subject": x509.Name([]),
    "unknown OID": x509.Name(
        [attr(ObjectIdentifier("1.3.6.1.4.1.55555.1.2"), "private"), attr(NameOID.COMMON_NAME, "y")]
    ),
}


@pytest.mark.parametrize("name", SUBJECTS)
def test_subject_serial_and_validity_are_cryptographys(name: str, way: str) -> None:
    cert = make(SUBJECTS[name])
    assert load_pem(pem(cert)) == [reference(cert)]
    assert load_der(der(cert)) == reference(cert)


@pytest.mark.parametrize(
    ("serial", "not_before", "not_after"),
    [
        (1, dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC), dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)),
        # 20 bytes, the largest serial RFC 5280 allows; times past 2049 are GeneralizedTime
        ((1 << 159) - 1, dt.datetime(2020, 2, 29, tzinfo=UTC), dt.datetime(2050, 1, 1, tzinfo=UTC)),
        (0x00FF00FF00FF, dt.datetime(2026, 12, 3, tzinfo=UTC), dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_serials_and_times(serial: int, not_before: dt.datetime, not_after: dt.datetime, way: str) -> None:
    cert = make(SUBJECTS["cn only"], serial=serial, not_before=not_before, not_after=not_after)
    assert load_der(der(cert)) == reference(cert)


def test_a_bundle_keeps_its_order(way: str) -> None:
    certs = [make(x509.Name([attr(NameOID.COMMON_NAME, f"c{i}")]), serial=100 + i) for i in range(4)]
    assert load_pem(pem(*certs)) == [reference(c) for c in certs]
    # CRLF line ends and text around the blocks, as bundles made on other systems have
    crlf = b"Bag Attributes\r\n" + pem(*certs).replace(b"\n", b"\r\n") + b"trailing words\r\n"
    assert load_pem(crlf) == [reference(c) for c in certs]


def test_a_file_with_other_pem_blocks_reads_as_cryptography_reads_it() -> None:
    """The fast path declines a file with other blocks (a key here): cryptography reads it."""
    cert = make(SUBJECTS["usual"])
    key = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    data = key + pem(cert)
    assert load_pem(data) == [reference(c) for c in x509.load_pem_x509_certificates(data)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a certificate at all\n",
        b"-----BEGIN CERTIFICATE-----\nbm90IERFUg==\n-----END CERTIFICATE-----\n",  # base64 of "not DER"
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    ],
)
def test_what_cryptography_refuses_is_refused(data: bytes, way: str) -> None:
    """With cryptography's own words: OpenSSL's decoding declines, cryptography refuses."""
    with pytest.raises(ValueError, match=re.escape(refusal(x509.load_pem_x509_certificates, data))):
        load_pem(data)


def test_a_truncated_bundle_is_refused(way: str) -> None:
    data = pem(make(SUBJECTS["usual"]))[:500]
    with pytest.raises(ValueError, match=re.escape(refusal(x509.load_pem_x509_certificates, data))):
        load_pem(data)
    cut = der(make(SUBJECTS["usual"]))[:-10]
    with pytest.raises(ValueError, match=re.escape(refusal(x509.load_der_x509_certificate, cut))):
        load_der(cut)


def refusal(read: Any, data: bytes) -> str:
    try:
        read(data)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("cryptography read it")


def test_subject_alt_names(way: str) -> None:
    sans: list[x509.GeneralName] = [
        x509.DNSName("db.example"),
        x509.DNSName("*.db.example"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        x509.IPAddress(ipaddress.ip_address("fd00::17")),
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/data/sa/db"),
        x509.RFC822Name("ops@example.com"),  # never matched, not returned
    ]
    got = subject_alt_names(der(make(SUBJECTS["cn only"], sans=sans)))
    assert got == SubjectAltNames(
        ("db.example", "*.db.example"),
        (ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("fd00::17")),
        ("spiffe://cluster.local/ns/data/sa/db",),
    )
    assert subject_alt_names(der(make(SUBJECTS["cn only"]))) is None


def test_match_names_on_both_ways(way: str) -> None:
    cert = der(
        make(
            SUBJECTS["cn only"],
            sans=[
                x509.DNSName("*.db.example"),
                x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
                x509.UniformResourceIdentifier("spiffe://c/ns/a"),
            ],
        )
    )
    assert match_names(cert, ["replica.db.example"])
    assert match_names(cert, ["10.1.2.3"])
    assert match_names(cert, ["spiffe://c/ns/a"])
    assert not match_names(cert, ["db.example", "a.b.db.example", "10.1.2.4", "spiffe://c/ns/b"])
    assert not match_names(der(make(SUBJECTS["cn only"])), ["app.example"])  # CN is never a SAN


def test_an_unusual_attribute_goes_to_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name attribute that is not a string (x500UniqueIdentifier, a BIT STRING) is one the
    fast path declines: the answer is cryptography's, made by cryptography."""
    module = load()[0]
    if module is None:
        pytest.skip("the native extension is not built")
    unique = x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, b"\x01\x02", _type=x509.name._ASN1Type.BitString)
    cert = make(x509.Name([unique, attr(NameOID.COMMON_NAME, "z")]))
    with pytest.raises(module.Error):
        module.cert_fields(der(cert))
    assert load_der(der(cert)) == reference(cert)
    assert reference(cert).subject.startswith("CN=z,2.5.4.45=#")
