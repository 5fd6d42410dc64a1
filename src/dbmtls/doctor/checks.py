"""The doctor's judgements, sans-IO: facts in, a step (status, what was found, the fix) out.

``run.py`` gathers the facts (addresses, the handshake's messages, the server's
answer); everything that decides and explains lives here, so it can be tested with
made-up facts, and every fix is phrased in one place.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from dbmtls.doctor import certinfo
from dbmtls.doctor.report import Status, Step
from dbmtls.doctor.target import Target
from dbmtls.doctor.tlswire import CertificateRequest, alert_name
from dbmtls.tls.context import match_names

# --- /etc/hosts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostsEntry:
    line: int
    text: str
    address: str


def hosts_entries(text: str, name: str) -> list[HostsEntry]:
    """The lines of a hosts file that give ``name`` an address (as glibc reads them)."""
    wanted = name.rstrip(".").lower()
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if len(fields) >= 2 and wanted in (f.rstrip(".").lower() for f in fields[1:]):
            out.append(HostsEntry(number, raw.strip(), fields[0]))
    return out


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def hosts_override_is_suspicious(name: str, entries: Sequence[HostsEntry]) -> bool:
    """A name other than localhost pointed at loopback: in an injected pod, that is dbmtls itself."""
    return name.rstrip(".").lower() != "localhost" and any(_is_loopback(e.address) for e in entries)


# --- the server's certificate ----------------------------------------------------------------------

_EXPIRED, _NOT_YET_VALID = 10, 9
_UNKNOWN_CA = (2, 18, 19, 20, 21)
_SELF_SIGNED_LEAF = 18
NAME_MISMATCH = (62, 64)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def explain_verify(
    target: Target,
    code: int | None,
    message: str,
    chain: list[x509.Certificate],
    cas: list[x509.Certificate],
    now: dt.datetime,
) -> Step:
    """Why OpenSSL (or our subjectAltNames check) refused the server's certificate."""
    title = "server certificate"
    data = {"verify_code": code, "verify_message": message}
    if not chain:
        return Step("verify", title, Status.FAIL, f"not trusted: {message}", data=data)
    leaf = chain[0]
    ca_opt = target.option("caCertificates")
    ca_file = target.tls.caCertificates
    ours = [certinfo.name_text(c.subject) for c in cas]
    where = f"our CA file {ca_file} holds {'; '.join(ours)}" if ca_file else "we use the system trust store"
    if code in (_EXPIRED, _NOT_YET_VALID) or (code is None and certinfo.validity_problem(leaf, now)):
        for i, cert in enumerate(chain):
            problem = certinfo.validity_problem(cert, now)
            if problem:
                which = "the server's certificate"
                if i:
                    which = f"the CA {certinfo.name_text(cert.subject)} in its chain"
                subject = f" ({certinfo.name_text(cert.subject)})" if i == 0 else ""
                if problem.startswith("expired"):
                    fix = (
                        "renew the server's certificate and make the server load it (reload or restart it); "
                        f"if it is not really expired, this machine's clock is wrong (it says {certinfo.stamp(now)})"
                    )
                else:
                    fix = (
                        "the issuer's clock or this machine's is off "
                        f"(this machine says {certinfo.stamp(now)}): fix the clocks, or wait until then"
                    )
                return Step("verify", title, Status.FAIL, f"{which}{subject} {problem}", fix=fix, data=data)
    if code in _UNKNOWN_CA:
        issuer = certinfo.name_text(leaf.issuer)
        details = [where]
        if code == _SELF_SIGNED_LEAF or leaf.issuer == leaf.subject:
            return Step(
                "verify",
                title,
                Status.FAIL,
                f"the server presents a self-signed certificate ({certinfo.name_text(leaf.subject)}), "
                "which we do not trust",
                details=details,
                fix=f"give the server a certificate issued by your CA{' (' + ours[0] + ')' if ours else ''}, "
                f"or put this certificate into {ca_opt}",
                data=data,
            )
        same_name = [c for c in cas if c.subject == leaf.issuer or any(c.subject == x.issuer for x in chain)]
        if same_name and not any(_signed_by(cert, ca) for cert in chain for ca in cas):
            details.append(
                f"our CA file has a CA named {issuer}, but not the one that signed the server's certificate "
                "(a CA made again under the same name has a new key)"
            )
            fix = (
                "reissue the server's certificate from the current CA, or put the CA that signed it into "
                f"{ca_opt} (`dbmtls certs ca` refuses to overwrite a CA for this reason)"
            )
        else:
            if len(chain) == 1:
                details.append(
                    f"the server sends no intermediate: if {issuer} is an intermediate CA, the server's "
                    "certificate file must hold it after the leaf"
                )
            fix = (
                f"put the CA that issued the server's certificate ({issuer}) into {ca_opt}, "
                f"or reissue the server's certificate from {ours[0] if ours else 'a CA we trust'}"
            )
        return Step(
            "verify",
            title,
            Status.FAIL,
            f"unknown CA: the server's certificate is issued by {issuer}, which we do not trust",
            details=details,
            fix=fix,
            data=data,
        )
    if code in NAME_MISMATCH:
        carried = certinfo.sans(leaf)
        expected = " or ".join(target.verify_names)
        data["subject_alt_names"] = carried  # type: ignore[assignment]
        if not carried:
            subject_cn = certinfo.cn(leaf.subject)
            return Step(
                "verify",
                title,
                Status.FAIL,
                f"the server's certificate has no subjectAltNames (CN={subject_cn}), so it is valid for no name",
                fix=f"reissue it with {target.verify_names[0]} as a DNS subjectAltName (clients ignore the CN)",
                data=data,
            )
        how = f"use --sni {carried[0]}"
        if target.from_config:
            how = f"set tls.sni or tls.subjectAltNames to {carried[0]}"
        return Step(
            "verify",
            title,
            Status.FAIL,
            f"the server's certificate is for {', '.join(carried)}, not {expected}",
            fix=f"{how} (a name the certificate carries), or reissue it with {target.verify_names[0]} "
            "in its subjectAltNames",
            data=data,
        )
    return Step(
        "verify",
        title,
        Status.FAIL,
        f"not trusted: {message}",
        details=[where],
        fix=f"compare the server's chain above with {ca_opt}",
        data=data,
    )


def verified(target: Target, chain: list[x509.Certificate], anchor: x509.Certificate | None, now: dt.datetime) -> Step:
    leaf = chain[0] if chain else None
    details = []
    status = Status.OK
    carried = [n for n in target.verify_names if leaf is not None and match_names(leaf.public_bytes(Encoding.DER), [n])]
    summary = "verified"
    if anchor is not None:
        summary += f" up to {certinfo.name_text(anchor.subject)}"
    if carried:
        summary += f"; valid for {', '.join(carried)}"
    for i, cert in enumerate(chain):
        soon = certinfo.expires_within(cert, now, target.expiry_warning)
        if soon:
            status = Status.WARN
            which = "the server's certificate" if i == 0 else f"the CA {certinfo.name_text(cert.subject)}"
            details.append(f"{which} {soon}")
    fix = "renew it before it expires (and make the server load the new one)" if status is Status.WARN else None
    return Step("verify", "server certificate", status, summary, details=details, fix=fix)


# --- client certificates ----------------------------------------------------------------------------


def cert_request_step(request: CertificateRequest | None, known: bool) -> Step:
    title = "client certificate request"
    if request is not None:
        names = [certinfo.der_name_text(n) for n in request.authorities]
        data = {"requested": True, "authorities": names}
        if names:
            return Step(
                "client-cert-request",
                title,
                Status.OK,
                "the server asks for a client certificate issued by one of: " + "; ".join(names),
                data=data,
            )
        return Step(
            "client-cert-request",
            title,
            Status.OK,
            "the server asks for a client certificate (it names no CAs: only its configuration says which it trusts)",
            data=data,
        )
    if known:
        return Step(
            "client-cert-request",
            title,
            Status.OK,
            "the server does not ask for a client certificate",
            data={"requested": False, "authorities": []},
        )
    return Step(
        "client-cert-request",
        title,
        Status.SKIP,
        "unknown: the handshake stopped before the server said",
        data={"requested": None},
    )


def _issuers(chain: Sequence[x509.Certificate]) -> list[x509.Name]:
    out = []
    for cert in chain:
        out += [cert.issuer, cert.subject] if cert is not chain[0] else [cert.issuer]
    return out


def client_cert_step(
    target: Target,
    chain: list[x509.Certificate] | None,
    request: CertificateRequest | None,
    known: bool,
    now: dt.datetime,
) -> Step:
    """Our certificate as this server will judge it: usage, dates, issuer vs the CAs it accepts."""
    title = "our client certificate"
    mutual = target.option("mode") if not target.from_config else "tls.mode: MUTUAL with clientCertificate/privateKey"
    if not chain:
        if request is not None:
            return Step(
                "client-cert",
                title,
                Status.WARN,
                "we have none to send, and the server asks for one",
                details=["a server that requires one rejects the connection: see the server's answer below"],
                fix=f"if it does, set {mutual}",
            )
        return Step("client-cert", title, Status.OK, "none configured, and none asked for")
    leaf = chain[0]
    subject = certinfo.name_text(leaf.subject)
    data = certinfo.describe(leaf)
    problems: list[str] = []
    fixes: list[str] = []
    details: list[str] = [f"subject {subject}, issued by {certinfo.name_text(leaf.issuer)}"]
    validity = certinfo.validity_problem(leaf, now)
    if validity:
        problems.append(f"it {validity}")
        fixes.append("issue a new client certificate")
    eku = certinfo.extended_key_usage(leaf)
    if eku is not None and "clientAuth" not in eku:
        problems.append(f"its Extended Key Usage is {', '.join(eku)}, without clientAuth: servers refuse it")
        fixes.append("reissue it for client authentication (dbmtls certs issue --client CN)")
    accepted = [certinfo.der_name(n) for n in (request.authorities if request else ())]
    issuer_not_named = False
    if accepted:
        if any(certinfo.same_name(issuer, a) for issuer in _issuers(chain) for a in accepted):
            details.append("its issuer is one of the CAs the server accepts")
        else:
            names = "; ".join(certinfo.name_text(a) if a else "?" for a in accepted)
            issuer_not_named = True
            problems.append(f"it is issued by {certinfo.name_text(leaf.issuer)}, and the server accepts only {names}")
            fixes.append(
                f"use a client certificate issued by {names}, or add {certinfo.name_text(leaf.issuer)} to the "
                "server's CA file (ssl_ca_file, tls-ca-cert-file, ssl-ca)"
            )
    if problems:
        # only the CA names disagree: the server may still accept it (a chain it did not name)
        data["issuer_not_named"] = issuer_not_named and len(problems) == 1
        return Step("client-cert", title, Status.FAIL, "; ".join(problems), details, "; ".join(fixes), data)
    if known and request is None:
        return Step(
            "client-cert",
            title,
            Status.WARN,
            f"{subject}: the server did not ask for it, so it was not sent",
            details=[*details, "the server checks no client certificates: anyone who can reach it can connect"],
            fix="require client certificates on the server (ssl_ca_file + clientcert/cert in pg_hba.conf, "
            "tls-auth-clients yes, REQUIRE X509) if mutual TLS is the point",
            data=data,
        )
    soon = certinfo.expires_within(leaf, now, target.expiry_warning)
    if soon:
        return Step("client-cert", title, Status.WARN, f"{subject} {soon}", details, "renew it before it expires", data)
    return Step(
        "client-cert", title, Status.OK, f"{subject} (clientAuth, valid until {data['not_after']})", details, None, data
    )


# --- the server's verdict on our certificate ---------------------------------------------------------------


def rejected_step(
    target: Target,
    alert: int | None,
    closed: bool,
    sent_cert: bool,
    our_issuer: str | None,
    request: CertificateRequest | None,
    when: str,
) -> Step:
    """The server sent an alert (or hung up) after our side of the handshake."""
    title = "server's answer"
    accepted = "; ".join(certinfo.der_name_text(n) for n in request.authorities) if request else ""
    from_ca = accepted or "a CA the server trusts"
    mutual = "tls.mode: MUTUAL with clientCertificate and privateKey" if target.from_config else "--cert and --key"
    data = {"alert": alert_name(alert) if alert is not None else None, "closed": closed}
    what = f"TLS alert {alert_name(alert)}" if alert is not None else "it closed the connection"
    if (alert in (116, 40) or alert is None) and not sent_cert:
        return Step(
            "answer",
            title,
            Status.FAIL,
            f"the server requires a client certificate and we sent none ({what} {when})",
            fix=f"set {mutual}: a client certificate issued by {from_ca}",
            data=data,
        )
    if alert == 48:
        return Step(
            "answer",
            title,
            Status.FAIL,
            f"the server does not trust the CA of our certificate ({our_issuer}): {what} {when}",
            fix=f"use a client certificate issued by {from_ca}, or add {our_issuer} to the server's CA file "
            "(ssl_ca_file, tls-ca-cert-file, ssl-ca)",
            data=data,
        )
    if alert == 45:
        return Step(
            "answer",
            title,
            Status.FAIL,
            f"the server says our certificate is expired ({what} {when})",
            fix="renew the client certificate (or fix the server's clock)",
            data=data,
        )
    if alert == 49:
        return Step(
            "answer",
            title,
            Status.FAIL,
            f"the server verified our certificate but denies access ({what} {when})",
            fix="the server's own access rules refuse this identity: see its configuration and log",
            data=data,
        )
    if alert == 51:
        return Step(
            "answer",
            title,
            Status.FAIL,
            f"the server could not verify our signature ({what} {when})",
            fix="the private key must be the one of the client certificate",
            data=data,
        )
    if alert is None:
        return Step(
            "answer",
            title,
            Status.FAIL,
            f"the server closed the connection {when} without a word",
            fix="it most likely rejected our client certificate: compare its issuer and usage with the server's "
            "CA file, and see the server's log",
            data=data,
        )
    return Step(
        "answer",
        title,
        Status.FAIL,
        f"the server rejected our certificate: {what} {when}",
        fix=f"check that the client certificate is issued by {from_ca}, has clientAuth usage and is valid; "
        "the server's log says which",
        data=data,
    )
