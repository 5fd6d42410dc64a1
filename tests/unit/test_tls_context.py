"""TLS contexts: name matching, classification of real OpenSSL errors, material validation.

The errors ``classify`` sees are produced by real handshakes between two in-memory
SSLObjects (``ssl.MemoryBIO``), with certificates from the session's test PKI: the
verify codes and alert names are OpenSSL's own, not hand-made exceptions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dbmtls.config.model import DatabaseConfig, TLSSettings
from dbmtls.errors import (
    CertificateExpired,
    ClientCertRejected,
    ConfigError,
    NameMismatch,
    TLSHandshakeError,
    TLSRefused,
    TLSVersionMismatch,
    UnknownCA,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from dbmtls.pki import issue
from dbmtls.tls.context import build_context, check_peer_names, classify, match_names, needs_name_check
from dbmtls.tls.material import CertificateNotYetValid, ClientTLS
from support.certs import PKI, Pair
from support.net import free_port

# --- match_names ----------------------------------------------------------------------------


def _cert_with_sans(*names: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored.example")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


SANS = _cert_with_sans(
    x509.DNSName("*.foo-redis.ns.svc.cluster.local"),
    x509.DNSName("foo-redis-master"),
    x509.DNSName("Db.Example.COM"),
    x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
    x509.IPAddress(ipaddress.ip_address("::1")),
    x509.UniformResourceIdentifier("spiffe://cluster.local/ns/db/sa/redis"),
)


@pytest.mark.parametrize(
    ("wanted", "ok"),
    [
        (["foo-redis-master"], True),
        (["FOO-REDIS-MASTER."], True),  # case and a trailing dot do not matter
        (["db.example.com"], True),
        (["redis-0.foo-redis.ns.svc.cluster.local"], True),  # wildcard: exactly one label
        (["a.b.foo-redis.ns.svc.cluster.local"], False),
        (["foo-redis.ns.svc.cluster.local"], False),  # the wildcard needs a label
        (["foo-redis-master.evil"], False),
        (["10.1.2.3"], True),
        (["10.1.2.4"], False),
        (["::1"], True),
        (["0:0:0:0:0:0:0:1"], True),  # IPs compare as addresses, not text
        (["spiffe://cluster.local/ns/db/sa/redis"], True),
        (["spiffe://cluster.local/ns/db/sa/other"], False),
        (["nope", "10.1.2.3"], True),  # any one of the names
        ([], False),
    ],
)
def test_match_names(wanted: list[str], ok: bool) -> None:
    assert match_names(SANS, wanted) is ok


def test_ip_is_not_matched_against_dns_names() -> None:
    der = _cert_with_sans(x509.DNSName("10.1.2.3"))
    assert not match_names(der, ["10.1.2.3"])


def test_wildcard_only_as_whole_leftmost_label() -> None:
    der = _cert_with_sans(x509.DNSName("db*.example.com"), x509.DNSName("*.*.example.com"))
    assert not match_names(der, ["db1.example.com"])
    assert not match_names(der, ["a.b.example.com"])


def test_no_san_extension_matches_nothing() -> None:
    assert not match_names(_cert_with_sans(), ["ignored.example"])  # the CN is never used


def test_check_peer_names_raises_name_mismatch() -> None:
    with pytest.raises(NameMismatch, match=r"carries none of the names other\.example"):
        check_peer_names(None, ["other.example"])


# --- real handshakes in memory --------------------------------------------------------------


def _server_ctx(
    server: Pair, *, client_ca: str | None = None, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server.cert, server.key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_name: str) -> BaseException | None:
    """Run a full handshake plus one round trip; return the first client-side exception, if any."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    server_failed = False
    for _ in range(20):
        try:
            if not c_done:
                client.do_handshake()
                c_done = True
                client.write(b"PING\r\n")
            else:
                client.read(100)  # TLS 1.3: a rejection of our certificate arrives here
                return None
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLError as exc:
            return exc
        s_in.write(c_out.read())
        if not server_failed:
            try:
                if not s_done:
                    server.do_handshake()
                    s_done = True
                else:
                    server.read(100)
                    server.write(b"+PONG\r\n")
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLError:
                server_failed = True  # its alert is in s_out; the client reads it next
        c_in.write(s_out.read())
    raise AssertionError("handshake did not finish")


def _client_ctx(
    pki: PKI,
    *,
    ca: str | None = None,
    names: tuple[str, ...] = ("localhost",),
    server_name: str = "localhost",
    client: Pair | None = None,
    max_version: Literal["TLSV1_2", "TLSV1_3"] | None = None,
) -> ssl.SSLContext:
    tls = TLSSettings(
        mode="MUTUAL" if client else "SIMPLE",
        caCertificates=ca or pki.ca_cert,
        clientCertificate=client.cert if client else None,
        privateKey=client.key if client else None,
        maxProtocolVersion=max_version,
    )
    return build_context(tls, names, server_name, (client.cert, client.key) if client else None)


def _classify(exc: BaseException | None) -> UpstreamError:
    assert exc is not None, "the handshake succeeded"
    return classify(exc, target="db.example:6379", server_name="localhost")


def test_good_handshake(pki: PKI) -> None:
    ctx = _client_ctx(pki, client=pki.client)
    assert _handshake(ctx, _server_ctx(pki.server, client_ca=pki.ca_cert), "localhost") is None
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname


def test_unknown_ca(pki: PKI) -> None:
    err = _classify(_handshake(_client_ctx(pki, ca=str(pki.other_ca / "ca.crt")), _server_ctx(pki.server), "localhost"))
    assert type(err) is UnknownCA
    assert err.reason == "unknown_ca"
    assert "TLS handshake with db.example:6379 failed: server certificate not trusted" in err.message
    assert "unable to get local issuer certificate" in err.message


def test_self_signed_server(pki: PKI, tmp_path: Path) -> None:
    from dbmtls.pki import create_ca

    ca = create_ca(tmp_path / "selfsigned", common_name="localhost")
    selfsigned = Pair(tmp_path / "ss")
    selfsigned.dir.mkdir()
    shutil.copy(Path(ca) / "ca.crt", selfsigned.cert)
    shutil.copy(Path(ca) / "ca.key", selfsigned.key)
    err = _classify(_handshake(_client_ctx(pki), _server_ctx(selfsigned), "localhost"))
    assert type(err) is UnknownCA


def test_name_mismatch_by_openssl(pki: PKI) -> None:
    ctx = _client_ctx(pki, names=("db.example",), server_name="db.example")
    err = _classify(_handshake(ctx, _server_ctx(pki.server), "db.example"))
    assert type(err) is NameMismatch
    assert err.reason == "name_mismatch"
    assert "does not match 'localhost'" in err.message
    assert "Hostname mismatch" in err.message


def test_name_mismatch_by_subject_alt_names(pki: PKI) -> None:
    """subjectAltNames other than the SNI: OpenSSL checks the chain, match_names the name."""
    ctx = _client_ctx(pki, names=("other.example",), server_name="localhost")
    assert needs_name_check(ctx)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = _server_ctx(pki.server).wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.do_handshake()
    with pytest.raises(NameMismatch):
        check_peer_names(client, ["other.example"])
    check_peer_names(client, ["127.0.0.1", "other.example"])  # one of them is enough


def test_expired_server_certificate(pki: PKI) -> None:
    expired = pki.server_for("localhost", expired=True)
    err = _classify(_handshake(_client_ctx(pki), _server_ctx(expired), "localhost"))
    assert type(err) is CertificateExpired
    assert err.reason == "expired"
    assert "certificate has expired" in err.message


@pytest.mark.parametrize("version", ["TLSV1_2", None])
def test_missing_client_certificate(pki: PKI, version: Literal["TLSV1_2"] | None) -> None:
    """TLS 1.2 fails in the handshake; TLS 1.3 on the first read after it (both classified alike)."""
    ctx = _client_ctx(pki, max_version=version)
    err = _classify(_handshake(ctx, _server_ctx(pki.server, client_ca=pki.ca_cert), "localhost"))
    assert type(err) is ClientCertRejected
    assert err.reason == "client_cert_rejected"
    assert "server db.example:6379 rejected the client certificate (TLS alert:" in err.message


def test_unknown_client_certificate(pki: PKI) -> None:
    stranger = pki.client_for("mallory", ca=pki.other_ca)
    ctx = _client_ctx(pki, client=stranger)
    err = _classify(_handshake(ctx, _server_ctx(pki.server, client_ca=pki.ca_cert), "localhost"))
    assert type(err) is ClientCertRejected
    assert "unknown ca" in err.message


def test_server_not_speaking_tls(pki: PKI) -> None:
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = _client_ctx(pki).wrap_bio(c_in, c_out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    c_in.write(b"-ERR unknown command\r\n" * 4)
    with pytest.raises(ssl.SSLError) as info:
        client.do_handshake()
    err = _classify(info.value)
    assert type(err) is TLSRefused
    assert "did not answer with TLS" in err.message


def test_no_common_version(pki: PKI) -> None:
    ctx = _client_ctx(pki, max_version="TLSV1_2")
    err = _classify(_handshake(ctx, _tls13_only(pki), "localhost"))
    assert type(err) is TLSVersionMismatch
    assert "no common protocol version (TLSV1_ALERT_PROTOCOL_VERSION)" in err.message


def _tls13_only(pki: PKI) -> ssl.SSLContext:
    ctx = _server_ctx(pki.server)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def test_socket_errors() -> None:
    port = free_port()
    with pytest.raises(ConnectionRefusedError) as info:
        socket.create_connection(("127.0.0.1", port), timeout=5)
    refused = classify(info.value, target=f"127.0.0.1:{port}", server_name="x")
    assert type(refused) is UpstreamUnreachable
    assert refused.reason == "connection_refused"
    assert f"connection to 127.0.0.1:{port} refused" in refused.message
    assert type(classify(TimeoutError(), target="t", server_name="x")) is UpstreamTimeout
    reset = classify(ConnectionResetError(), target="t", server_name="x")
    assert type(reset) is TLSHandshakeError
    assert "closed the connection during the TLS handshake" in reset.message
    gai = classify(socket.gaierror(-2, "Name or service not known"), target="nohost:1", server_name="x")
    assert type(gai) is UpstreamUnreachable
    assert "cannot resolve nohost:1" in gai.message
    already = UnknownCA("x")
    assert classify(already, target="t", server_name="x") is already
    assert type(classify(RuntimeError("boom"), target="t", server_name="x")) is UpstreamError


def test_insecure_skip_verify_context(pki: PKI) -> None:
    ctx = build_context(TLSSettings(mode="SIMPLE", insecureSkipVerify=True), ("localhost",), "localhost", None)
    assert ctx.verify_mode == ssl.CERT_NONE
    assert not ctx.check_hostname
    assert not needs_name_check(ctx)
    assert _handshake(ctx, _server_ctx(pki.server_for("localhost", expired=True)), "localhost") is None


# --- ClientTLS.build ---------------------------------------------------------------------------


def _db(tmp_path: Path, **tls: object) -> DatabaseConfig:
    return DatabaseConfig.model_validate(
        {"name": "cache", "protocol": "redis", "listen": "127.0.0.1:1", "address": "localhost:6379", "tls": tls}
    )


def _mutual(pki: PKI, cert: str | None = None, key: str | None = None, ca: str | None = None) -> dict[str, object]:
    return {
        "mode": "MUTUAL",
        "clientCertificate": cert or pki.client.cert,
        "privateKey": key or pki.client.key,
        "caCertificates": ca or pki.ca_cert,
    }


def _build_error(tmp_path: Path, **tls: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ClientTLS(_db(tmp_path, **tls)).build()
    return info.value


def test_build_ok(pki: PKI, tmp_path: Path) -> None:
    m = ClientTLS(_db(tmp_path, **_mutual(pki))).build()
    assert m.default is not None
    assert m.warnings == ()
    kinds = sorted((c.kind, c.subject) for c in m.certs)
    assert kinds == [("ca", "CN=dbmtls test CA"), ("client", "CN=jinsu")]


def test_key_mismatch(pki: PKI, tmp_path: Path) -> None:
    other = pki.client_for("mallory")
    err = _build_error(tmp_path, **_mutual(pki, key=other.key))
    assert err.path == "tls.privateKey"
    assert f"private key {other.key} does not match certificate {pki.client.cert}" in err.message


def test_truncated_certificate(pki: PKI, tmp_path: Path) -> None:
    cut = tmp_path / "cut.crt"
    cut.write_bytes(Path(pki.client.cert).read_bytes()[:200])
    err = _build_error(tmp_path, **_mutual(pki, cert=str(cut)))
    assert err.path == "tls.clientCertificate"
    assert f"client certificate file {cut} holds no PEM certificate (empty or truncated?)" in err.message


def test_truncated_key(pki: PKI, tmp_path: Path) -> None:
    cut = tmp_path / "cut.key"
    cut.write_bytes(Path(pki.client.key).read_bytes()[:60])
    os.chmod(cut, 0o600)
    err = _build_error(tmp_path, **_mutual(pki, key=str(cut)))
    assert err.path == "tls.privateKey"
    assert str(cut) in err.message


def test_expired_client_certificate(pki: PKI, tmp_path: Path) -> None:
    old = Pair(
        issue(pki.ca, tmp_path / "old", client_cn="jinsu", not_after=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    )
    err = _build_error(tmp_path, **_mutual(pki, cert=old.cert, key=old.key))
    assert err.path == "tls.clientCertificate"
    assert f"client certificate {old.cert} expired at" in err.message


def test_not_yet_valid_client_certificate(pki: PKI, tmp_path: Path) -> None:
    """The one failure that cures itself: its own class, with the instant, so the reloader can wait for it."""
    not_before = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=1)
    future = Pair(issue(pki.ca, tmp_path / "future", client_cn="jinsu", not_before=not_before))
    err = _build_error(tmp_path, **_mutual(pki, cert=future.cert, key=future.key))
    assert isinstance(err, CertificateNotYetValid)
    assert err.not_before == not_before
    assert err.path == "tls.clientCertificate"
    assert f"is not valid before {not_before:%Y-%m-%d %H:%M:%S}Z" in err.message
    # every other failure is a plain ConfigError
    old = Pair(issue(pki.ca, tmp_path / "old", client_cn="jinsu", not_after=not_before - dt.timedelta(days=2)))
    assert type(_build_error(tmp_path, **_mutual(pki, cert=old.cert, key=old.key))) is ConfigError


@pytest.mark.parametrize("content", [b"", b"# no certificates here\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_empty_or_broken_ca_bundle(pki: PKI, tmp_path: Path, content: bytes) -> None:
    bundle = tmp_path / "ca.crt"
    bundle.write_bytes(content)
    err = _build_error(tmp_path, **_mutual(pki, ca=str(bundle)))
    assert err.path == "tls.caCertificates"
    assert f"CA bundle file {bundle} holds no PEM certificate" in err.message


def test_missing_files(pki: PKI, tmp_path: Path) -> None:
    err = _build_error(tmp_path, **_mutual(pki, ca=str(tmp_path / "nope.crt")))
    assert (err.path, f"CA bundle file {tmp_path / 'nope.crt'} not found" in err.message) == (
        "tls.caCertificates",
        True,
    )
    err = _build_error(tmp_path, **_mutual(pki, cert=str(tmp_path / "nope.crt")))
    assert err.path == "tls.clientCertificate"


def test_group_readable_key_warns(pki: PKI, tmp_path: Path) -> None:
    key = tmp_path / "tls.key"
    shutil.copy(pki.client.key, key)
    os.chmod(key, 0o640)
    m = ClientTLS(_db(tmp_path, **_mutual(pki, key=str(key)))).build()
    (warning,) = m.warnings
    assert f"private key {key} is readable by group/others (mode 640); chmod 600 it" == warning
    os.chmod(key, 0o600)
    assert ClientTLS(_db(tmp_path, **_mutual(pki, key=str(key)))).build().warnings == ()


def test_load_keeps_old_material_on_error(pki: PKI, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    shutil.copy(pki.ca_cert, ca)
    tls = ClientTLS(_db(tmp_path, **_mutual(pki, ca=str(ca))))
    first = tls.load()
    ca.write_bytes(b"")
    with pytest.raises(ConfigError):
        tls.load()
    assert tls.material is first
    assert tls.context_for(None) is first.default
    assert tls.last_error is not None


def test_attempt_changes_nothing_apply_swaps(pki: PKI, tmp_path: Path) -> None:
    """``attempt`` (the worker thread's half) only builds; ``apply`` (the loop's half) swaps or records."""
    ca = tmp_path / "ca.crt"
    shutil.copy(pki.ca_cert, ca)
    tls = ClientTLS(_db(tmp_path, **_mutual(pki, ca=str(ca))))
    good = tls.attempt()
    assert good.material is not None and good.error is None
    assert (tls.material, tls.tried_fingerprint) == (None, None)
    tls.apply(good)
    assert (tls.material, tls.tried_fingerprint) == (good.material, good.fingerprint)
    ca.write_bytes(b"")
    bad = tls.attempt()
    assert bad.material is None and bad.error is not None and bad.fingerprint != good.fingerprint
    assert tls.material is good.material
    tls.apply(bad)
    assert tls.material is good.material  # the old material stays
    assert (tls.last_failure, tls.last_error, tls.tried_fingerprint) == (bad.error, bad.error.message, bad.fingerprint)


def test_a_key_in_a_kubernetes_secret_volume_does_not_warn(pki: PKI, tmp_path: Path) -> None:
    """The kubelet sets those modes (0644, or 0440 with fsGroup); chmod is not the user's to do."""
    from support.k8s_secret import make_secret_volume

    files = {"tls.crt": Path(pki.client.cert).read_bytes(), "tls.key": Path(pki.client.key).read_bytes()}
    volume = make_secret_volume(tmp_path / "secret", files, mode=0o644)
    tls = _mutual(pki, cert=str(volume / "tls.crt"), key=str(volume / "tls.key"))
    assert ClientTLS(_db(tmp_path, **tls)).build().warnings == ()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cert", "holds a certificate, not a private key (clientCertificate and privateKey swapped?"),
        ("empty", "holds no PEM private key"),
        ("encrypted", "is encrypted with a passphrase"),
    ],
)
def test_a_key_file_that_is_not_a_key_says_what_it_is(pki: PKI, tmp_path: Path, content: str, message: str) -> None:
    """OpenSSL only says "[SSL] PEM lib"; the user needs to know which file is wrong and how."""
    from cryptography.hazmat.primitives import serialization

    key = tmp_path / "tls.key"
    if content == "cert":
        shutil.copy(pki.client.cert, key)
    elif content == "empty":
        key.write_bytes(b"")
    else:
        loaded = serialization.load_pem_private_key(Path(pki.client.key).read_bytes(), None)
        key.write_bytes(
            loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    key.chmod(0o600)
    err = _build_error(tmp_path, **_mutual(pki, key=str(key)))
    assert message in err.message and str(key) in err.message
    assert "PEM lib" not in err.message
