"""The doctor's sans-IO half: handshake message parsing, names, judgements, targets, rendering."""

from __future__ import annotations

import datetime as dt
import errno
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from dbmtls.config.model import TLSSettings
from dbmtls.doctor import (
    Report,
    Status,
    Step,
    TargetError,
    certinfo,
    checks,
    from_url,
    render_json,
    render_text,
    run,
    tlswire,
)
from dbmtls.doctor.target import Target
from dbmtls.pki import create_ca, issue
from dbmtls.protocols.registry import REGISTRY
from support.certs import PKI


def _message(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def _vec(width: int, data: bytes) -> bytes:
    return len(data).to_bytes(width, "big") + data


def _names(*names: x509.Name) -> bytes:
    return _vec(2, b"".join(_vec(2, n.public_bytes()) for n in names))


CA1 = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "dbmtls test CA")])
CA2 = x509.Name(
    [
        x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "KR"),
        x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Platform, Inc."),
        x509.NameAttribute(x509.NameOID.COMMON_NAME, "Datenbank-CA ü"),
    ]
)


# --- the handshake messages -----------------------------------------------------------------------------


def test_tls12_certificate_request_lists_the_ca_names() -> None:
    body = _vec(1, b"\x01\x40") + _vec(2, b"\x04\x03\x08\x04") + _names(CA1, CA2)
    names = tlswire.parse_certificate_request(_message(13, body), tls13=False)
    assert names == [CA1.public_bytes(), CA2.public_bytes()]
    assert [certinfo.der_name_text(n) for n in names] == [
        "CN=dbmtls test CA",
        "CN=Datenbank-CA ü,O=Platform\\, Inc.,C=KR",
    ]


def test_tls13_certificate_request_reads_the_certificate_authorities_extension() -> None:
    sig_algs = (13).to_bytes(2, "big") + _vec(2, _vec(2, b"\x04\x03"))
    authorities = (47).to_bytes(2, "big") + _vec(2, _names(CA2))
    body = _vec(1, b"") + _vec(2, sig_algs + authorities)
    assert tlswire.parse_certificate_request(_message(13, body), tls13=True) == [CA2.public_bytes()]
    # no extension 47: a request that names no CAs (Redis, MariaDB)
    assert tlswire.parse_certificate_request(_message(13, _vec(1, b"") + _vec(2, sig_algs)), tls13=True) == []


def test_certificate_messages_of_both_versions(pki: PKI) -> None:
    ders = [c.public_bytes(Encoding.DER) for c in certinfo.load_certs(pki.server.cert, "c")]
    ders.append(certinfo.load_certs(pki.ca_cert, "ca")[0].public_bytes(Encoding.DER))
    tls12 = _vec(3, b"".join(_vec(3, d) for d in ders))
    tls13 = _vec(1, b"") + _vec(3, b"".join(_vec(3, d) + _vec(2, b"") for d in ders))
    assert tlswire.parse_certificate(_message(11, tls12), tls13=False) == ders
    assert tlswire.parse_certificate(_message(11, tls13), tls13=True) == ders


def test_server_hello_version_from_supported_versions() -> None:
    ext = (43).to_bytes(2, "big") + _vec(2, b"\x03\x04")
    body = b"\x03\x03" + bytes(32) + _vec(1, bytes(32)) + b"\x13\x02" + b"\x00" + _vec(2, ext)
    assert tlswire.parse_server_hello(_message(2, body)) == (0x0304, 0x1302)
    assert tlswire.cipher_name(0x1302) == "TLS_AES_256_GCM_SHA384"
    assert tlswire.version_name(0x0304) == "TLSv1.3"


@given(st.binary(max_size=300), st.booleans())
def test_parsers_never_raise(data: bytes, tls13: bool) -> None:
    tlswire.parse_server_hello(data)
    tlswire.parse_certificate(data, tls13=tls13)
    tlswire.parse_certificate_request(data, tls13=tls13)
    certinfo.der_name(data)


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLObject:
    """A whole handshake in memory (no sockets): pump bytes between two SSLObjects."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, obj in enumerate((c, s)):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            return c
    raise AssertionError("no handshake")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_the_log_sees_what_openssl_got(pki: PKI, version: ssl.TLSVersion) -> None:
    """OpenSSL's own handshake, recorded through the message callback: chain, request, our certificate."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server.cert, pki.server.key)
    server.load_verify_locations(pki.ca_cert)
    server.verify_mode = ssl.CERT_REQUIRED
    server.maximum_version = version
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(pki.ca_cert)
    client.load_cert_chain(pki.client.cert, pki.client.key)
    log = tlswire.HandshakeLog()
    assert log.attach(client)
    obj = _handshake(client, server)
    assert log.version == (0x0304 if version is ssl.TLSVersion.TLSv1_3 else 0x0303)
    chain = certinfo.load_der_chain(log.server_chain() or [])
    assert [certinfo.name_text(c.subject) for c in chain] == ["CN=localhost", "CN=dbmtls test CA"]
    assert log.certificate_request() == tlswire.CertificateRequest(())  # Python's server names no CAs
    sent = log.sent_certificate()
    assert sent is not None and len(sent) > 8
    assert log.sent_finished and log.server_finished
    assert log.received_alert() is None
    # the fallback for a Python without the callback: get_unverified_chain (private before 3.13)
    fallback = run._chain(obj, "get_unverified_chain")  # type: ignore[arg-type]
    assert [c.subject for c in fallback] == [c.subject for c in chain]


# --- names and certificates --------------------------------------------------------------------------------


def test_hosts_entries() -> None:
    text = "# comment\n127.0.0.1\tlocalhost\n10.0.0.5 db.example db  # the database\n::1 ip6-localhost\n"
    assert checks.hosts_entries(text, "DB.example.") == [
        checks.HostsEntry(3, "10.0.0.5 db.example db  # the database", "10.0.0.5")
    ]
    assert checks.hosts_entries(text, "the") == []  # a comment is not a name
    pod = checks.hosts_entries("127.0.0.1 foo-redis-master foo-redis-master.ns1\n", "foo-redis-master")
    assert checks.hosts_override_is_suspicious("foo-redis-master", pod)
    assert not checks.hosts_override_is_suspicious("localhost", checks.hosts_entries(text, "localhost"))
    assert not checks.hosts_override_is_suspicious("db", checks.hosts_entries(text, "db"))


def _target(**tls: object) -> Target:
    return Target(
        name="t",
        spec=REGISTRY.get("redis"),
        host="db.example",
        port=6379,
        server_name="db.example",
        verify_names=("db.example",),
        tls=TLSSettings.model_validate(tls),
    )


def test_a_ca_made_again_under_the_same_name_is_called_out(tmp_path: Path) -> None:
    old = create_ca(tmp_path / "old", common_name="team CA")
    new = create_ca(tmp_path / "new", common_name="team CA")  # `certs ca` run again: same name, new key
    server = issue(old, tmp_path / "server", server_names=["db.example"])
    chain = certinfo.load_certs(str(server / "tls.crt"), "server")
    cas = certinfo.load_certs(str(new / "ca.crt"), "ca")
    step = checks.explain_verify(
        _target(caCertificates=str(new / "ca.crt")), 20, "unable to get local issuer certificate", chain, cas, _now()
    )
    assert step.status is Status.FAIL
    assert step.summary == "unknown CA: the server's certificate is issued by CN=team CA, which we do not trust"
    assert any("a CA made again under the same name has a new key" in d for d in step.details)
    assert step.fix is not None and step.fix.startswith("reissue the server's certificate from the current CA")


def test_not_yet_valid_and_soon_expiring(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", common_name="CA")
    later = _now() + dt.timedelta(days=30)
    server = issue(ca, tmp_path / "s", server_names=["db.example"], days=10)
    chain = certinfo.load_certs(str(server / "tls.crt"), "s")
    step = checks.explain_verify(_target(), 9, "certificate is not yet valid", chain, [], _now() - dt.timedelta(days=2))
    assert step.summary.startswith("the server's certificate (CN=db.example) not valid before ")
    assert checks.verified(_target(), chain, None, _now()).status is Status.OK
    soon = checks.verified(_target(), chain, None, _now() + dt.timedelta(days=5))  # 5 of 10 days left, < 7d
    assert soon.status is Status.WARN
    assert soon.details[0].startswith("the server's certificate expires in 5 days")
    assert checks.explain_verify(_target(), 10, "certificate has expired", chain, [], later).summary.startswith(
        "the server's certificate (CN=db.example) expired at "
    )


def test_client_certificate_without_client_auth_usage(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", common_name="CA")
    server_only = issue(ca, tmp_path / "s", server_names=["app"])  # serverAuth only
    chain = certinfo.load_certs(str(server_only / "tls.crt"), "c")
    step = checks.client_cert_step(_target(), chain, tlswire.CertificateRequest(()), True, _now())
    assert step.status is Status.FAIL
    assert "its Extended Key Usage is serverAuth, without clientAuth" in step.summary


def test_key_checks_name_the_file_and_never_show_the_key(pki: PKI, tmp_path: Path) -> None:
    cert = certinfo.load_certs(pki.client.cert, "c")[0]
    assert certinfo.check_key(pki.client.key, cert).matches
    assert not certinfo.check_key(pki.server.key, cert).matches
    with pytest.raises(certinfo.FileProblem, match="holds a certificate, not a key"):
        certinfo.check_key(pki.client.cert, cert)
    with pytest.raises(certinfo.FileProblem, match=r"holds no PEM certificate .*swapped"):
        certinfo.load_certs(pki.client.key, "client certificate")
    with pytest.raises(certinfo.FileProblem, match="does not exist"):
        certinfo.load_certs(str(tmp_path / "nope.crt"), "CA file")


@pytest.mark.parametrize(
    ("exc", "said", "fix"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "connection refused", "start the server"),
        (TimeoutError(), "no answer within 5s", "a firewall, security group or NetworkPolicy drops the packets"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "unreachable (No route to host)", "there is no route"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "unreachable", "there is no route"),
    ],
)
def test_tcp_failures_each_with_its_fix(exc: OSError, said: str, fix: str) -> None:
    summary, hint = run.Doctor(_target())._why(exc)
    assert summary.startswith(said)
    assert hint.startswith(fix)


# --- targets and rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "protocol", "host", "port"),
    [
        ("postgres://db:6432", "postgres", "db", 6432),
        ("postgresql://db", "postgres", "db", 5432),
        ("cockroachdb://crdb", "cockroachdb", "crdb", 26257),
        ("mysql://db", "mysql", "db", 3306),
        ("mariadb://[::1]:3307", "mariadb", "::1", 3307),
        ("redis://cache", "redis", "cache", 6379),
        ("rediss://cache:6380", "redis", "cache", 6380),
        ("mongodb://mongo", "mongodb", "mongo", 27017),
        ("tcp://svc:8443", "tcp", "svc", 8443),
    ],
)
def test_urls(url: str, protocol: str, host: str, port: int) -> None:
    t = from_url(url)
    assert (t.spec.name, t.host, t.port, t.server_name, t.tls.mode) == (protocol, host, port, host, "SIMPLE")


def test_url_user_database_password_and_errors() -> None:
    t = from_url("postgres://alice:s3cret@db/orders", cert="c", key="k", ca="ca", sni="db.internal")
    assert t.name == "postgres://alice:***@db/orders"  # the password is never printed
    assert [(x.user, x.cert) for x in t.logins] == [("alice", ("c", "k"))]
    assert (t.database, t.server_name, t.tls.mode, t.tls.caCertificates) == ("orders", "db.internal", "MUTUAL", "ca")
    for bad in ("ftp://db", "tcp://db", "postgres://", "mongodb://a,b"):
        with pytest.raises(TargetError):
            from_url(bad)
    with pytest.raises(TargetError, match="--cert and --key go together"):
        from_url("redis://db", cert="c")
    with pytest.raises(TargetError, match="Redis has no login step"):
        from_url("redis://db", user="u")


def test_rendering_marks_and_ok() -> None:
    report = Report("db", "redis", "db:6379", "db")
    report.steps += [
        Step("dns", "DNS", Status.OK, "db -> 10.0.0.5"),
        Step("verify", "server certificate", Status.WARN, "expires soon", ["in 2 days"], "renew it"),
        Step("answer", "server's answer", Status.SKIP, "skipped: x"),
    ]
    assert report.ok  # warnings and skips do not fail
    text = render_text([report])
    assert (
        "✓ DNS: db -> 10.0.0.5\n! server certificate: expires soon\n    in 2 days\n    fix: renew it\n- server" in text
    )
    report.steps.append(Step("login", "login as u", Status.FAIL, "no"))
    assert not report.ok
    assert render_text([report]).endswith("=> failed: login as u")
    assert '"ok": false' in render_json([report])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_the_servers_answer_outranks_the_ca_names(tmp_path: Path) -> None:
    """A server may trust an issuer it does not name: once it accepted us, the mismatch is a warning."""
    ca = create_ca(tmp_path / "ca", common_name="issuing CA")
    client = issue(ca, tmp_path / "c", client_cn="app")
    chain = certinfo.load_certs(str(client / "tls.crt"), "c")
    named = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "root CA")]).public_bytes()
    step = checks.client_cert_step(_target(), chain, tlswire.CertificateRequest((named,)), True, _now())
    assert step.status is Status.FAIL and step.data["issuer_not_named"] is True
    doctor = run.Doctor(_target())
    doctor.report.steps += [step, Step("answer", "server's answer", Status.OK, "Redis answered PING over TLS")]
    doctor._reconcile()
    assert doctor.report.steps[0].status == Status.WARN and step.fix is None
    assert "the server accepted it all the same" in step.details[-1]
