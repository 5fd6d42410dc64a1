"""The doctor's walk from a name to a logged-in session, one step at a time.

Steps, in order; a step that fails stops the ones that need it (they are listed as
skipped, so the output always shows the whole path):

1. ``files`` -- our CA bundle, client certificates and keys load, and each key matches;
2. ``dns`` -- the name resolves the way the proxy resolves it (getaddrinfo, or DNS only
   in ``dns.mode: direct``), and whether ``/etc/hosts`` overrides it;
3. ``tcp`` -- connect, with refused / timed out / unreachable told apart;
4. ``preamble`` -- the protocol's plaintext part (``probes``);
5. ``tls`` -- the handshake with the project's own verifying context
   (:func:`dbmtls.tls.context.build_context`, as the proxy builds it), the version,
   cipher and the server's chain (recorded from the handshake messages, so it is shown
   also when verification fails: ``tlswire``);
6. ``verify`` -- the verification verdict and its exact reason (``checks.explain_verify``);
7. ``client-cert-request`` -- whether the server asks for a client certificate, and from
   which CAs (the CertificateRequest's ``certificate_authorities``);
8. ``client-cert`` -- our certificate against that: usage, dates, issuer;
9. ``answer`` -- the server's verdict on our certificate (TLS 1.3 sends it after the
   handshake: the first read gets the alert);
10. ``login`` (PostgreSQL, MySQL; ``--user`` or the config's ``userCertificates``).

Nothing is sent over a TLS session whose server was not verified: a failed verification
ends the handshake (OpenSSL aborts it), and the later steps are skipped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from cryptography import x509

from dbmtls.doctor import certinfo, checks
from dbmtls.doctor.probes import ANSWER_WAIT, Probe, probe_for
from dbmtls.doctor.report import Report, Status, Step
from dbmtls.doctor.target import Login, Target
from dbmtls.doctor.tlswire import ALERTS, TLS13, HandshakeLog, alert_name, cipher_name, version_name
from dbmtls.doctor.wire import Wire
from dbmtls.errors import NameMismatch, NameNotResolved, TLSRefused
from dbmtls.proxy.resolver import DirectResolver, is_ip_literal
from dbmtls.tls.context import build_context, check_peer_names, classify, needs_name_check
from dbmtls.tls.material import key_permission_warning

HOSTS_FILE = "/etc/hosts"


def diagnose(target: Target, *, hosts_file: str = HOSTS_FILE, now: dt.datetime | None = None) -> Report:
    """Run every step against ``target``; never raises for anything the network or the server does."""
    return Doctor(target, hosts_file=hosts_file, now=now).run()


@dataclass
class Handshake:
    log: HandshakeLog
    attached: bool  # the message callback worked: CertificateRequest and alerts are known
    sock: ssl.SSLSocket | None = None  # the handshake completed (and the names were checked)
    error: BaseException | None = None
    verify_code: int | None = None
    verify_message: str = ""
    chain: list[x509.Certificate] = field(default_factory=list)
    anchor: x509.Certificate | None = None

    @property
    def version(self) -> int | None:
        return self.log.version

    @property
    def request_known(self) -> bool:
        if not self.attached:
            return False
        if self.sock is not None or self.log.server_finished or self.log.sent_finished:
            return True
        # TLS 1.3 sends a CertificateRequest before the server's Certificate
        return self.version == TLS13 and bool(self.chain)


def _chain(sock: ssl.SSLSocket, method: str) -> list[x509.Certificate]:
    """get_(un)verified_chain: public since Python 3.13, on the C object before."""
    for obj in (sock, getattr(sock, "_sslobj", None)):
        fn = getattr(obj, method, None)
        if fn is None:
            continue
        try:
            items = fn() or []
        except (ssl.SSLError, ValueError):
            return []
        ders = [i if isinstance(i, bytes) else i.public_bytes(ssl._ssl.ENCODING_DER) for i in items]  # type: ignore[attr-defined]
        return certinfo.load_der_chain(ders)
    return []


def _alert_from(exc: BaseException) -> int | None:
    reason = getattr(exc, "reason", None) or ""
    if "ALERT_" not in reason:
        return None
    name = reason.split("ALERT_", 1)[1].lower()
    for code, alert in ALERTS.items():
        if alert == name:
            return code
    return None


def _resolve(host: str, port: int, timeout: float) -> list[str]:
    """getaddrinfo in a daemon thread, bounded: the call itself has no timeout."""
    result: list[object] = []
    done = threading.Event()

    def work() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            result.append(exc)
        done.set()

    threading.Thread(target=work, name="doctor-getaddrinfo", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"getaddrinfo did not answer within {timeout:g}s")
    found = result[0]
    if isinstance(found, OSError):
        raise found
    assert isinstance(found, list)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


class Doctor:
    def __init__(self, target: Target, *, hosts_file: str = HOSTS_FILE, now: dt.datetime | None = None) -> None:
        self.t = target
        self.hosts_file = hosts_file
        self.now = now or dt.datetime.now(dt.UTC)
        self.probe = probe_for(target)
        self.report = Report(target.name, target.spec.name, target.address, target.server_name)
        self.addresses: list[str] = []
        self.connected: str | None = None
        self.cas: list[x509.Certificate] = []
        self.identity_chain: list[x509.Certificate] | None = None
        self.wires: list[Wire] = []
        tls = target.tls.mode != "DISABLE"
        self.plan = [
            *([("files", "local files")] if tls else []),
            ("dns", "DNS"),
            ("tcp", "TCP connect"),
            *(
                [
                    ("preamble", self.probe.preamble_title),
                    ("tls", "TLS handshake"),
                    ("verify", "server certificate"),
                    ("client-cert-request", "client certificate request"),
                    ("client-cert", "our client certificate"),
                    ("answer", "server's answer"),
                ]
                if tls
                else [("tls", "TLS")]
            ),
            *[("login", f"login as {login.user}") for login in (target.logins if self._has_login else ())],
        ]

    @property
    def _has_login(self) -> bool:
        return self.t.spec.user_before_tls

    # --- bookkeeping ------------------------------------------------------------------------

    def add(self, step: Step, started: float | None = None) -> Step:
        if started is not None:
            step.elapsed_ms = (time.monotonic() - started) * 1000
        for earlier in self.report.steps:
            if step.fix is not None and earlier.fix == step.fix:
                step.fix = f"as for {earlier.title}, above"
                break
        self.report.steps.append(step)
        return step

    def skip_rest(self, reason: str) -> None:
        done = len(self.report.steps)
        for step_id, title in self.plan[done:]:
            self.report.steps.append(Step(step_id, title, Status.SKIP, f"skipped: {reason}"))

    def run(self) -> Report:
        try:
            self._run()
        finally:
            for wire in self.wires:
                wire.close()
        return self.report

    def _run(self) -> None:
        files_ok = True
        if self.t.tls.mode != "DISABLE":
            files_ok = self.add(self.files_step()).status is not Status.FAIL
        started = time.monotonic()
        if self.add(self.dns_step(), started).status is Status.FAIL:
            return self.skip_rest("the name does not resolve")
        started = time.monotonic()
        wire = self.connect()
        if wire is None:
            return self.skip_rest("no TCP connection")
        self.report.steps[-1].elapsed_ms = (time.monotonic() - started) * 1000
        if self.t.tls.mode == "DISABLE":
            self.add(
                Step(
                    "tls",
                    "TLS",
                    Status.WARN,
                    "tls.mode is DISABLE: dbmtls talks plaintext to this server, nothing is verified",
                    fix="set tls.mode: SIMPLE (or MUTUAL) unless the network itself is trusted",
                )
            )
            return self.skip_rest("tls.mode is DISABLE")
        started = time.monotonic()
        preamble = self.preamble(wire, self.probe)
        self.add(preamble[0], started)
        if not preamble[1]:
            return self.skip_rest(f"the {self.probe.preamble_title} step failed")
        if not files_ok:
            return self.skip_rest("our certificate files cannot be used (see local files)")
        if preamble[2]:
            wire = self.reconnect()
            if wire is None:
                self.add(Step("tls", "TLS handshake", Status.FAIL, "a second connection for TLS failed"))
                return self.skip_rest("no TLS session")
        self.tls_steps(wire)

    # --- files -----------------------------------------------------------------------------------

    def files_step(self) -> Step:
        t = self.t.tls
        details: list[str] = []
        problems: list[str] = []
        fixes: list[str] = []
        warnings: list[str] = []
        if t.insecureSkipVerify:
            warnings.append("insecureSkipVerify is on: the server is NOT verified")
        elif t.caCertificates:
            try:
                self.cas = certinfo.load_certs(t.caCertificates, "CA file")
                subjects = "; ".join(certinfo.name_text(c.subject) for c in self.cas)
                details.append(f"CA file {t.caCertificates}: {subjects}")
            except certinfo.FileProblem as exc:
                problems.append(str(exc))
                fixes.append(
                    f"point {self.t.option('caCertificates')} at the PEM file of the CA "
                    "that issued the server's certificate"
                )
        else:
            details.append("CA: the system trust store")
        pairs = []
        if self.t.identity is not None:
            pairs.append(self.t.identity)
        pairs += [login.cert for login in self.t.logins if login.cert is not None and login.cert not in pairs]
        for cert_path, key_path in pairs:
            try:
                chain = certinfo.load_certs(cert_path, "client certificate")
                check = certinfo.check_key(key_path, chain[0])
            except certinfo.FileProblem as exc:
                problems.append(str(exc))
                fixes.append("give the certificate and the private key issued with it (tls.crt and tls.key)")
                continue
            if not check.matches:
                problems.append(f"private key {key_path} does not match client certificate {cert_path}")
                fixes.append("use the key issued with this certificate (tls.crt and tls.key of the same Secret)")
                continue
            details.append(
                f"client certificate {cert_path}: {certinfo.name_text(chain[0].subject)}; "
                f"key {key_path} ({check.kind}) matches"
            )
            if (w := key_permission_warning(key_path)) is not None:
                warnings.append(w)
            if (cert_path, key_path) == self.t.identity:
                self.identity_chain = chain
        if not pairs:
            details.append("no client certificate (mode SIMPLE)")
        if problems:
            return Step("files", "local files", Status.FAIL, "; ".join(problems), details, "; ".join(fixes))
        if warnings:
            return Step("files", "local files", Status.WARN, "; ".join(warnings), details)
        return Step("files", "local files", Status.OK, "certificates and keys load", details)

    # --- DNS and TCP -----------------------------------------------------------------------------

    def dns_step(self) -> Step:
        host, t = self.t.host, self.t
        try:
            with open(self.hosts_file, encoding="utf-8", errors="replace") as f:
                entries = checks.hosts_entries(f.read(), host)
        except OSError:
            entries = []
        hosts_data = [{"line": e.line, "text": e.text} for e in entries]
        if is_ip_literal(host):
            self.addresses = [host]
            return Step("dns", "DNS", Status.OK, f"{host} is an IP address: nothing to resolve")
        if t.dns.mode == "direct":
            resolver = DirectResolver(t.dns)
            details = [f"dns.mode direct (DNS only, like the proxy): {resolver.describe()}"]
            details += [
                f"/etc/hosts line {e.line} has it ({e.text}): ignored in dns.mode direct, as the proxy ignores it"
                for e in entries
            ]
            try:
                self.addresses = list(asyncio.run(resolver.resolve(host)))
            except NameNotResolved as exc:
                return Step("dns", "DNS", Status.FAIL, exc.message, details, exc.hint, {"hosts_file": hosts_data})
            return Step(
                "dns",
                "DNS",
                Status.OK,
                f"{host} -> {', '.join(self.addresses)} (DNS)",
                details,
                data={"addresses": self.addresses, "source": "dns", "hosts_file": hosts_data},
            )
        try:
            self.addresses = _resolve(host, self.t.port, self.t.connect_timeout)
        except TimeoutError as exc:
            return Step(
                "dns",
                "DNS",
                Status.FAIL,
                str(exc),
                fix="check the nameservers in /etc/resolv.conf and their reachability",
            )
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_NONAME:
                fix = (
                    f"check the spelling of {host} (a Kubernetes Service is NAME.NAMESPACE or "
                    "NAME.NAMESPACE.svc.cluster.local); names under .invalid never resolve"
                )
            elif exc.errno == socket.EAI_AGAIN:
                fix = "DNS did not answer: check the nameservers in /etc/resolv.conf and that they are reachable"
            else:
                fix = "check the name and /etc/resolv.conf"
            return Step(
                "dns",
                "DNS",
                Status.FAIL,
                f"cannot resolve {host}: {exc.strerror}",
                fix=fix,
                data={"hosts_file": hosts_data},
            )
        details = [f"/etc/hosts line {e.line} overrides DNS for {host}: {e.text}" for e in entries]
        data = {
            "addresses": self.addresses,
            "source": "/etc/hosts" if entries else "getaddrinfo",
            "hosts_file": hosts_data,
        }
        summary = f"{host} -> {', '.join(self.addresses)} (getaddrinfo{', from /etc/hosts' if entries else ''})"
        if entries and checks.hosts_override_is_suspicious(host, entries):
            details.append(self._dns_alone(host))
            return Step(
                "dns",
                "DNS",
                Status.WARN,
                summary,
                details,
                fix="in a pod where dbmtls was injected, hostAliases point this name at dbmtls itself: "
                "set dns.mode: direct in the dbmtls config so that the proxy asks DNS only",
                data=data,
            )
        return Step("dns", "DNS", Status.OK, summary, details, data=data)

    def _dns_alone(self, host: str) -> str:
        from dbmtls.config.model import DnsConfig

        resolver = DirectResolver(DnsConfig(mode="direct", timeout=min(2.0, self.t.connect_timeout)))
        try:
            found = asyncio.run(resolver.resolve(host))
        except NameNotResolved as exc:
            return f"DNS alone: {exc.message}"
        return f"DNS alone (dns.mode direct) gives {', '.join(found)}"

    def _open(self, address: str, timeout: float) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((address, self.t.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self) -> Wire | None:
        deadline = time.monotonic() + self.t.connect_timeout
        failures: list[tuple[str, OSError]] = []
        for address in self.addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                failures.append((address, TimeoutError("no time left")))
                break
            try:
                sock = self._open(address, left)
            except OSError as exc:
                failures.append((address, exc))
                continue
            self.connected = address
            wire = Wire(sock, self.t.handshake_timeout)
            self.wires.append(wire)
            shown = f"[{address}]:{self.t.port}" if ":" in address else f"{address}:{self.t.port}"
            details = [f"{a}: {self._why(e)[0]}" for a, e in failures]
            self.add(Step("tcp", "TCP connect", Status.OK, f"connected to {shown}", details))
            return wire
        first = failures[0][1] if failures else OSError("no address")
        summary, fix = self._why(first)
        details = [f"{a}: {self._why(e)[0]}" for a, e in failures] if len(failures) > 1 else []
        self.add(Step("tcp", "TCP connect", Status.FAIL, f"{self.t.address}: {summary}", details, fix))
        return None

    def _why(self, exc: OSError) -> tuple[str, str]:
        if isinstance(exc, ConnectionRefusedError):
            return (
                "connection refused: nothing listens on that port",
                "start the server, or fix the port in the address; a server that listens only on "
                "another interface (bind, listen_addresses, bind-address) refuses too",
            )
        if isinstance(exc, TimeoutError):
            return (
                f"no answer within {self.t.connect_timeout:g}s",
                "a firewall, security group or NetworkPolicy drops the packets, or the host is down "
                "(connectTimeout bounds the wait)",
            )
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return (
                f"unreachable ({exc.strerror})",
                "there is no route from here to that address: check the address, routes and VPN",
            )
        return (exc.strerror or str(exc), "check the address and the network")

    def reconnect(self) -> Wire | None:
        assert self.connected is not None
        try:
            sock = self._open(self.connected, self.t.connect_timeout)
        except OSError:
            return None
        wire = Wire(sock, self.t.handshake_timeout)
        self.wires.append(wire)
        return wire

    def preamble(self, wire: Wire, probe: Probe) -> tuple[Step, bool, bool]:
        try:
            result = probe.preamble(wire, self.t)
        except (OSError, EOFError) as exc:
            step = Step(
                "preamble",
                probe.preamble_title,
                Status.FAIL,
                f"the connection failed: {getattr(exc, 'strerror', None) or exc}",
                fix="see the server's log",
            )
            return step, False, False
        return result.step, result.go_on, result.fresh_connection

    # --- TLS ---------------------------------------------------------------------------------------

    def handshake(self, wire: Wire, cert: tuple[str, str] | None) -> Handshake:
        t = self.t
        log = HandshakeLog()
        ctx = build_context(t.tls, t.verify_names, t.server_name, cert, t.spec.alpn)
        hs = Handshake(log, log.attach(ctx))
        sock = ctx.wrap_socket(wire.sock, server_hostname=t.server_name, do_handshake_on_connect=False)
        wire.sock = sock
        sock.settimeout(t.handshake_timeout)
        try:
            sock.do_handshake()
            if needs_name_check(ctx):
                check_peer_names(sock, t.verify_names)
            hs.sock = sock
        except ssl.SSLCertVerificationError as exc:
            hs.verify_code, hs.verify_message = exc.verify_code, exc.verify_message or str(exc.reason)
        except NameMismatch as exc:
            hs.verify_code, hs.verify_message = checks.NAME_MISMATCH[0], exc.message
        except (OSError, EOFError) as exc:  # ssl.SSLError, timeouts and resets are OSErrors
            hs.error = exc
        ders = log.server_chain()
        hs.chain = certinfo.load_der_chain(ders) if ders else _chain(sock, "get_unverified_chain")
        if hs.sock is not None:
            verified = _chain(sock, "get_verified_chain")
            hs.anchor = verified[-1] if verified else None
        return hs

    def tls_steps(self, wire: Wire) -> None:
        t = self.t
        started = time.monotonic()
        try:
            hs = self.handshake(wire, t.identity)
        except (OSError, ValueError) as exc:  # the context or the name itself (files passed, so rare)
            self.add(Step("tls", "TLS handshake", Status.FAIL, f"cannot build the TLS context: {exc}"))
            return self.skip_rest("no TLS context")
        log = hs.log
        hello = log.server_hello()
        version = version_name(hello[0]) if hello else (hs.sock.version() if hs.sock else None) or "?"
        cipher = cipher_name(hello[1]) if hello else "?"
        rejected_in_handshake = hs.error is not None and log.sent_finished
        chain_data = [certinfo.describe(c) for c in hs.chain]
        if hs.sock is not None or hs.verify_code is not None or rejected_in_handshake:
            summary = f"{version}, {cipher}"
            if hs.verify_code is not None:
                summary += "; the server's certificate is judged below"
            self.add(
                Step(
                    "tls",
                    "TLS handshake",
                    Status.OK,
                    summary,
                    ["server chain:", *certinfo.chain_lines(hs.chain)] if hs.chain else [],
                    data={"version": version, "cipher": cipher, "chain": chain_data},
                ),
                started,
            )
        else:
            assert hs.error is not None
            self.add(self.tls_failure(hs, version), started)
            return self.skip_rest("the TLS handshake failed")
        # verification
        if t.tls.insecureSkipVerify:
            self.add(
                Step(
                    "verify",
                    "server certificate",
                    Status.WARN,
                    "not verified: insecureSkipVerify is on",
                    fix="turn insecureSkipVerify off and set caCertificates to the server's CA",
                )
            )
        elif hs.verify_code is not None:
            self.add(checks.explain_verify(t, hs.verify_code, hs.verify_message, hs.chain, self.cas, self.now))
        else:
            self.add(checks.verified(t, hs.chain, hs.anchor, self.now))
        # client certificates
        request = log.certificate_request()
        if hs.attached:
            self.add(checks.cert_request_step(request, hs.request_known))
        else:
            self.add(
                Step(
                    "client-cert-request",
                    "client certificate request",
                    Status.SKIP,
                    "unknown: this Python has no TLS message callback (ssl.SSLContext._msg_callback)",
                )
            )
        self.add(checks.client_cert_step(t, self.identity_chain, request, hs.request_known and hs.attached, self.now))
        if hs.verify_code is not None:
            return self.skip_rest("the server's certificate is not trusted (nothing is sent to an unverified server)")
        if t.tls.insecureSkipVerify:
            return self.skip_rest("the server is not verified (insecureSkipVerify): nothing is sent to it")
        if rejected_in_handshake:
            assert hs.error is not None
            self.add(self.rejected(hs, hs.error, "during the handshake"))
            return self.skip_rest("the server rejected the TLS session")
        self.answer_and_login(wire, hs)
        self._reconcile()

    def _reconcile(self) -> None:
        """The server's answer outranks our guess from the CA names it listed."""
        found = {s.id: s for s in self.report.steps}
        ours, answer = found.get("client-cert"), found.get("answer")
        if ours and answer and answer.status is Status.OK and ours.data.get("issuer_not_named"):
            ours.status = Status.WARN
            ours.details.append(
                "the server accepted it all the same: it trusts the issuer through a CA it did not name"
            )
            ours.fix = None

    def tls_failure(self, hs: Handshake, version: str) -> Step:
        t, exc = self.t, hs.error
        assert exc is not None
        title = "TLS handshake"
        alert = hs.log.received_alert() or _alert_from(exc)
        data = {"version": version if version != "?" else None, "alert": alert_name(alert) if alert else None}
        direct = " (PostgreSQL before 17 does not do direct TLS: set directTls: false)" if t.direct_tls else ""
        if isinstance(exc, TimeoutError):
            return Step(
                "tls",
                title,
                Status.FAIL,
                f"no TLS answer within {t.handshake_timeout:g}s",
                fix="the port may not speak TLS (a plaintext server waits for its own protocol) "
                f"or the network drops packets{direct}",
                data=data,
            )
        if alert == 70:
            return Step(
                "tls",
                title,
                Status.FAIL,
                "no TLS version in common (alert protocol_version)",
                fix=f"we allow {t.tls.minProtocolVersion}..{t.tls.maxProtocolVersion or 'TLSV1_3'}: "
                "change minProtocolVersion/maxProtocolVersion or update the server's TLS settings",
                data=data,
            )
        if alert == 112:
            return Step(
                "tls",
                title,
                Status.FAIL,
                f"the server has no certificate for the name {t.server_name} (alert unrecognized_name)",
                fix=f"set {t.option('sni')} to a name the server serves",
                data=data,
            )
        if alert == 120:
            return Step(
                "tls",
                title,
                Status.FAIL,
                f"the server wants an ALPN protocol we do not offer (we offer: {', '.join(t.spec.alpn) or 'none'})",
                fix="see the server's TLS settings",
                data=data,
            )
        if alert is not None:
            return Step(
                "tls",
                title,
                Status.FAIL,
                f"the server refused the handshake: TLS alert {alert_name(alert)}",
                fix="no cipher suite or signature algorithm in common, or the server wants something we do not "
                "send: see the server's log",
                data=data,
            )
        err = classify(exc, target=t.address, server_name=t.server_name)
        if isinstance(err, TLSRefused):
            return Step(
                "tls",
                title,
                Status.FAIL,
                "the server's answer to our ClientHello is not TLS: this port speaks plaintext",
                fix=f"point the address at the server's TLS port, or turn TLS on in the server{direct}",
                data=data,
            )
        if isinstance(exc, ssl.SSLEOFError | ConnectionError | EOFError):
            return Step(
                "tls",
                title,
                Status.FAIL,
                "the server closed the connection on our ClientHello",
                fix="the port may not speak TLS, or the server accepts none of our TLS versions and ciphers; "
                f"see the server's log{direct}",
                data=data,
            )
        return Step("tls", title, Status.FAIL, err.message, fix=err.hint, data=data)

    def rejected(
        self, hs: Handshake, exc: BaseException | None, when: str, chain: list[x509.Certificate] | None = None
    ) -> Step:
        chain = chain if chain is not None else self.identity_chain
        alert = hs.log.received_alert() if hs.attached else None
        if alert is None and exc is not None:
            alert = _alert_from(exc)
        if hs.attached:
            # no Certificate message: none was asked for; an empty one (7 bytes in TLS 1.2, 8 in
            # 1.3) means we had none to send
            sent = hs.log.sent_certificate()
            sent_cert = sent is not None and len(sent) > 8
        else:
            sent_cert = chain is not None
        issuer = certinfo.name_text(chain[0].issuer) if chain else None
        return checks.rejected_step(
            self.t,
            alert,
            alert is None,
            sent_cert,
            issuer,
            hs.log.certificate_request(),
            when,
        )

    def answer_and_login(self, wire: Wire, hs: Handshake) -> None:
        t, probe = self.t, self.probe
        after = "on the first read after the handshake"
        logins = list(t.logins) if self._has_login else []
        subject = certinfo.cn(self.identity_chain[0].subject) if self.identity_chain else None
        if probe.question is not None:
            try:
                wire.send(probe.question)
                data = wire.recv(4096)
            except TimeoutError:
                self.add(Step("answer", "server's answer", Status.WARN, f"no answer within {wire.timeout:g}s"))
                return self.skip_rest("no answer")
            except OSError as exc:
                self.add(self.rejected(hs, exc, after))
                return self.skip_rest("the server rejected the TLS session")
            if not data:
                self.add(self.rejected(hs, None, after))
                return self.skip_rest("the server rejected the TLS session")
            status, summary = probe.judge_answer(data)
            self.add(Step("answer", "server's answer", status, summary))
            return None
        if logins and logins[0].cert == t.identity:
            first = logins.pop(0)
            try:
                step = probe.login(wire, t, first, subject)
            except TimeoutError:
                self.add(Step("answer", "server's answer", Status.FAIL, f"no answer within {wire.timeout:g}s"))
                return self.skip_rest("no answer")
            except (OSError, EOFError) as exc:
                self.add(self.rejected(hs, exc, after))
                return self.skip_rest("the server rejected the TLS session")
            self.add(
                Step(
                    "answer",
                    "server's answer",
                    Status.OK,
                    "the server answered our login: it accepted "
                    + ("our certificate at the TLS level" if self.identity_chain else "the TLS session"),
                )
            )
            self.add(step)
        elif hs.sock is not None and hs.sock.version() == "TLSv1.2":
            summary = "the server accepted the session (TLS 1.2: its verdict on our certificate is in the handshake)"
            self.add(Step("answer", "server's answer", Status.OK, summary))
        else:
            wait = min(ANSWER_WAIT, t.handshake_timeout)
            try:
                data = wire.recv(4096, timeout=wait)
            except TimeoutError:
                summary = f"no alert within {wait:g}s after the handshake: the server accepted the session"
                self.add(Step("answer", "server's answer", Status.OK, summary))
            except OSError as exc:
                self.add(self.rejected(hs, exc, after))
                return self.skip_rest("the server rejected the TLS session")
            else:
                if not data:
                    self.add(self.rejected(hs, None, after))
                    return self.skip_rest("the server rejected the TLS session")
                status, summary = probe.judge_answer(data)
                self.add(Step("answer", "server's answer", status, summary))
        for login in logins:
            self.add(self.login_on_new_connection(login))
        return None

    def login_on_new_connection(self, login: Login) -> Step:
        """A login whose certificate is not the one of the main connection: its own connection."""
        title = f"login as {login.user}"
        chain: list[x509.Certificate] | None = None
        if login.cert is not None:
            try:
                chain = certinfo.load_certs(login.cert[0], "client certificate")
            except certinfo.FileProblem as exc:
                return Step("login", title, Status.FAIL, str(exc))
        wire = self.reconnect()
        if wire is None:
            return Step("login", title, Status.FAIL, "a new connection for this login failed")
        probe = probe_for(self.t)
        step, go_on, _ = self.preamble(wire, probe)
        if not go_on:
            return Step("login", title, Status.FAIL, f"{probe.preamble_title}: {step.summary}", fix=step.fix)
        try:
            hs = self.handshake(wire, login.cert)
        except (OSError, ValueError) as exc:
            return Step("login", title, Status.FAIL, f"cannot build the TLS context: {exc}")
        if hs.sock is None:
            if hs.verify_code is not None:
                return Step("login", title, Status.FAIL, f"the server was not verified: {hs.verify_message}")
            rejected = self.rejected(hs, hs.error, "during the handshake", chain)
            return Step("login", title, Status.FAIL, rejected.summary, fix=rejected.fix)
        try:
            return probe.login(wire, self.t, login, certinfo.cn(chain[0].subject) if chain else None)
        except TimeoutError:
            return Step("login", title, Status.FAIL, f"no answer within {wire.timeout:g}s")
        except (OSError, EOFError) as exc:
            rejected = self.rejected(hs, exc, "after the handshake", chain)
            return Step("login", title, Status.FAIL, rejected.summary, fix=rejected.fix)
