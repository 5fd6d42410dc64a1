"""The dev PKI: certificate contents, file modes, and real TLS handshakes with Python's ssl."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dbmtls.errors import ConfigError
from dbmtls.pki import create_ca, describe, issue, load_ca

T = TypeVar("T", bound=x509.ExtensionType)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ext(cert: x509.Certificate, kind: type[T]) -> T:
    return cert.extensions.get_extension_for_class(kind).value


def _cn(name: x509.Name) -> str:
    value = name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    return create_ca(tmp_path / "ca")


@pytest.fixture
def server_dir(ca_dir: Path, tmp_path: Path) -> Path:
    return issue(ca_dir, tmp_path / "server", server_names=["localhost", "127.0.0.1", "::1"])


@pytest.fixture
def client_dir(ca_dir: Path, tmp_path: Path) -> Path:
    return issue(ca_dir, tmp_path / "client", client_cn="app_user")


# --- certificate contents ------------------------------------------------------------


def test_ca_files_and_extensions(ca_dir: Path) -> None:
    assert {p.name for p in ca_dir.iterdir()} == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert _mode(ca_dir) == 0o700
    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(ca_dir / "tls.key") == 0o600
    assert (ca_dir / "tls.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    assert (ca_dir / "tls.key").read_bytes() == (ca_dir / "ca.key").read_bytes()

    ca = _cert(ca_dir / "ca.crt")
    assert _cn(ca.subject) == "dbmtls dev CA"
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = _ext(ca, x509.KeyUsage)
    assert ku.key_cert_sign
    assert ku.crl_sign
    assert not ku.digital_signature
    ski = _ext(ca, x509.SubjectKeyIdentifier)
    assert _ext(ca, x509.AuthorityKeyIdentifier).key_identifier == ski.digest
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert b"BEGIN PRIVATE KEY" in (ca_dir / "ca.key").read_bytes()

    cert, key = load_ca(ca_dir)
    assert cert == ca
    assert isinstance(key, ec.EllipticCurvePrivateKey)


def test_server_cert(ca_dir: Path, server_dir: Path) -> None:
    ca = _cert(ca_dir / "ca.crt")
    leaf = _cert(server_dir / "tls.crt")
    leaf.verify_directly_issued_by(ca)
    assert (server_dir / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    assert _mode(server_dir / "tls.key") == 0o600
    assert _mode(server_dir) == 0o700
    assert b"BEGIN PRIVATE KEY" in (server_dir / "tls.key").read_bytes()

    assert _cn(leaf.subject) == "localhost"
    san = _ext(leaf, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(_ext(leaf, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not _ext(leaf, x509.BasicConstraints).ca
    ku = _ext(leaf, x509.KeyUsage)
    assert ku.digital_signature
    assert not ku.key_encipherment
    assert not ku.key_cert_sign
    assert _ext(leaf, x509.AuthorityKeyIdentifier).key_identifier == _ext(ca, x509.SubjectKeyIdentifier).digest
    assert _ext(leaf, x509.SubjectKeyIdentifier).digest != _ext(ca, x509.SubjectKeyIdentifier).digest
    # Random 159-bit serial, validity starting a few minutes in the past.
    assert 0 < leaf.serial_number < 2**159
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=6) < leaf.not_valid_before_utc < now - dt.timedelta(minutes=4)
    assert leaf.not_valid_after_utc - now > dt.timedelta(days=89)


def test_client_cert(ca_dir: Path, client_dir: Path) -> None:
    leaf = _cert(client_dir / "tls.crt")
    leaf.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))
    assert _cn(leaf.subject) == "app_user"
    assert list(_ext(leaf, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # CockroachDB reads the principal from a DNS SAN.
    assert _ext(leaf, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == ["app_user"]


def test_client_cn_that_is_not_a_dns_name_gets_no_san(ca_dir: Path, tmp_path: Path) -> None:
    leaf = _cert(issue(ca_dir, tmp_path / "c", client_cn="Jane Doe") / "tls.crt")
    assert _cn(leaf.subject) == "Jane Doe"
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_client_and_server_usages(ca_dir: Path, tmp_path: Path) -> None:
    out = issue(ca_dir, tmp_path / "both", server_names=["node1", "10.0.0.1"], client_cn="node1", serial=4242)
    leaf = _cert(out / "tls.crt")
    assert set(_ext(leaf, x509.ExtendedKeyUsage)) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _cn(leaf.subject) == "node1"
    # client_cn equal to a server name is not listed twice.
    assert _ext(leaf, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == ["node1"]
    assert leaf.serial_number == 4242
    assert "serial=1092" in describe(out / "tls.crt")


def test_rsa_keys(tmp_path: Path) -> None:
    ca_dir = create_ca(tmp_path / "ca", key_type="rsa", common_name="rsa CA")
    out = issue(ca_dir, tmp_path / "leaf", server_names=["db"], key_type="rsa")
    for key_file in (ca_dir / "ca.key", out / "tls.key"):
        pem = key_file.read_bytes()
        assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
        assert _mode(key_file) == 0o600
    leaf = _cert(out / "tls.crt")
    pub = leaf.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    assert pub.key_size == 2048
    assert _ext(leaf, x509.KeyUsage).key_encipherment
    leaf.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))
    _, key = load_ca(ca_dir)
    assert isinstance(key, rsa.RSAPrivateKey)


def test_ecdsa_leaf_under_rsa_ca(tmp_path: Path) -> None:
    ca_dir = create_ca(tmp_path / "ca", key_type="rsa")
    leaf = _cert(issue(ca_dir, tmp_path / "leaf", client_cn="app") / "tls.crt")
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    leaf.verify_directly_issued_by(_cert(ca_dir / "ca.crt"))


def test_validity_overrides(ca_dir: Path, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = _cert(
        issue(ca_dir, tmp_path / "old", server_names=["x"], not_after=now - dt.timedelta(days=1)) / "tls.crt"
    )
    assert expired.not_valid_after_utc < now
    assert expired.not_valid_before_utc < expired.not_valid_after_utc

    start = now + dt.timedelta(days=2)
    future = _cert(issue(ca_dir, tmp_path / "new", server_names=["x"], not_before=start, days=3) / "tls.crt")
    assert future.not_valid_before_utc == start.replace(microsecond=0)
    assert future.not_valid_after_utc == (start + dt.timedelta(days=3)).replace(microsecond=0)

    with pytest.raises(ValueError, match="not_after"):
        issue(ca_dir, tmp_path / "bad", server_names=["x"], not_before=now, not_after=now - dt.timedelta(hours=1))


def test_reissue_replaces_files(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "leaf"
    first = _cert(issue(ca_dir, out, server_names=["a"]) / "tls.crt")
    second = _cert(issue(ca_dir, out, server_names=["a"]) / "tls.crt")
    assert first.serial_number != second.serial_number
    assert _mode(out / "tls.key") == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]  # no temp files left


def test_invalid_arguments(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="server_names"):
        issue(ca_dir, tmp_path / "x")
    with pytest.raises(ValueError, match="serial"):
        issue(ca_dir, tmp_path / "x", client_cn="a", serial=0)
    with pytest.raises(ValueError, match="out_dir"):
        issue(ca_dir, ca_dir, client_cn="a")
    assert not (tmp_path / "x").exists()


def test_load_ca_errors(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_ca(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="not found"):
        issue(tmp_path / "nowhere", tmp_path / "leaf", client_cn="a")

    other = create_ca(tmp_path / "other")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "ca.crt").write_bytes((ca_dir / "ca.crt").read_bytes())
    (mixed / "ca.key").write_bytes((other / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        load_ca(mixed)

    leaf = issue(ca_dir, tmp_path / "leaf", client_cn="a")
    notca = tmp_path / "notca"
    notca.mkdir()
    (notca / "ca.crt").write_bytes((leaf / "tls.crt").read_bytes())
    (notca / "ca.key").write_bytes((leaf / "tls.key").read_bytes())
    with pytest.raises(ConfigError, match="not a CA"):
        load_ca(notca)

    (notca / "ca.key").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="private key") as info:
        load_ca(notca)
    assert "garbage" not in str(info.value)


def test_describe(ca_dir: Path, server_dir: Path) -> None:
    leaf = _cert(server_dir / "tls.crt")
    line = describe(server_dir / "tls.crt")
    assert "\n" not in line
    assert "CN=localhost" in line
    assert "DNS:localhost,IP:127.0.0.1,IP:::1" in line
    assert f"serial={leaf.serial_number:x}" in line
    assert leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") in line
    assert line.endswith("issuer=CN=dbmtls dev CA")
    assert "PRIVATE" not in describe(ca_dir / "ca.crt")


# --- real handshakes with Python's ssl -----------------------------------------------


def _server_ctx(server_dir: Path, ca_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server_dir / "tls.crt", server_dir / "tls.key")
    ctx.load_verify_locations(ca_dir / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_ctx(ca_dir: Path, client_dir: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    if client_dir is not None:
        ctx.load_cert_chain(client_dir / "tls.crt", client_dir / "tls.key")
    return ctx


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> str:
    """Run a full handshake through memory BIOs (no threads, no sockets); return the client CN seen by the server."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for label, obj in (("client", client), ("server", server)):
            if not done[label]:
                try:
                    obj.do_handshake()
                    done[label] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not finish"
    # TLS 1.3: the server checks the client certificate after the client is
    # done; a data round trip makes sure neither side is still rejecting.
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"
    peer = server.getpeercert(binary_form=True)
    assert peer is not None
    return _cn(x509.load_der_x509_certificate(peer).subject)


def test_mutual_tls_handshake(ca_dir: Path, server_dir: Path, client_dir: Path) -> None:
    cn = _handshake(_server_ctx(server_dir, ca_dir), _client_ctx(ca_dir, client_dir), "localhost")
    assert cn == "app_user"


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
def test_hostname_and_ip_verification(ca_dir: Path, server_dir: Path, client_dir: Path, hostname: str) -> None:
    client_ctx = _client_ctx(ca_dir, client_dir)
    assert client_ctx.check_hostname
    assert _handshake(_server_ctx(server_dir, ca_dir), client_ctx, hostname) == "app_user"


@pytest.mark.parametrize("hostname", ["otherhost", "127.0.0.2"])
def test_hostname_mismatch_is_rejected(ca_dir: Path, server_dir: Path, client_dir: Path, hostname: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(_server_ctx(server_dir, ca_dir), _client_ctx(ca_dir, client_dir), hostname)


def test_expired_server_cert_is_rejected(ca_dir: Path, client_dir: Path, tmp_path: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    old = issue(ca_dir, tmp_path / "old", server_names=["localhost"], not_after=past)
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        _handshake(_server_ctx(old, ca_dir), _client_ctx(ca_dir, client_dir), "localhost")


def test_server_cert_from_other_ca_is_rejected(ca_dir: Path, client_dir: Path, tmp_path: Path) -> None:
    rogue_ca = create_ca(tmp_path / "rogue")
    rogue = issue(rogue_ca, tmp_path / "rogue-server", server_names=["localhost"])
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(_server_ctx(rogue, ca_dir), _client_ctx(ca_dir, client_dir), "localhost")


def test_client_without_certificate_is_rejected(ca_dir: Path, server_dir: Path) -> None:
    with pytest.raises(ssl.SSLError, match="did not return a certificate"):
        _handshake(_server_ctx(server_dir, ca_dir), _client_ctx(ca_dir, None), "localhost")


def test_server_only_cert_cannot_be_used_as_client(ca_dir: Path, server_dir: Path) -> None:
    # EKU serverAuth only: OpenSSL's server refuses it as a client certificate.
    with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
        _handshake(_server_ctx(server_dir, ca_dir), _client_ctx(ca_dir, server_dir), "localhost")


def test_certs_commands_never_overwrite_key_material_without_force(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dbmtls.cli import main

    run = CliRunner().invoke
    ca = tmp_path / "ca"
    assert run(main, ["certs", "ca", "--out", str(ca)]).exit_code == 0
    before = (ca / "ca.key").read_bytes()
    again = run(main, ["certs", "ca", "--out", str(ca)])
    assert again.exit_code == 1
    assert "holds a CA already" in again.output and "--force" in again.output
    assert (ca / "ca.key").read_bytes() == before
    assert run(main, ["certs", "ca", "--out", str(ca), "--force"]).exit_code == 0
    assert (ca / "ca.key").read_bytes() != before

    leaf = ["certs", "issue", "--ca", str(ca), "--out", str(tmp_path / "client"), "--client", "jinsu"]
    assert run(main, leaf).exit_code == 0
    cert = (tmp_path / "client" / "tls.crt").read_bytes()
    refused = run(main, leaf)
    assert refused.exit_code == 1 and "holds a certificate already" in refused.output
    assert (tmp_path / "client" / "tls.crt").read_bytes() == cert
    assert run(main, [*leaf, "--force"]).exit_code == 0
    assert (tmp_path / "client" / "tls.crt").read_bytes() != cert
