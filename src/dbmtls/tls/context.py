"""Client-side TLS toward the database: contexts, name verification, error classification.

Secure by default: CERT_REQUIRED, host name verification, TLS 1.2 minimum.
``insecureSkipVerify`` is the only way to turn verification off, and the caller
logs a warning for it on every start.

Name verification: when the names to verify are just the SNI (the common case),
OpenSSL does it during the handshake (``check_hostname``).  When
``subjectAltNames`` lists other names (Istio semantics: the server certificate
must carry one of them), OpenSSL cannot be told to verify a name other than the
SNI through Python's API, so the chain is still verified by OpenSSL and the
names are matched here after the handshake, before any application byte is sent.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from dbmtls.config.model import TLSSettings
from dbmtls.errors import (
    CertificateExpired,
    ClientCertRejected,
    NameMismatch,
    TLSHandshakeError,
    TLSRefused,
    TLSVersionMismatch,
    UnknownCA,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from dbmtls.tls.certfields import subject_alt_names
from dbmtls.tls.resume import ResumingContext, SessionCache

_VERSIONS = {"TLSV1_2": ssl.TLSVersion.TLSv1_2, "TLSV1_3": ssl.TLSVersion.TLSv1_3}


class FastSSLObject(ssl.SSLObject):
    """An SSLObject whose per-record methods are the C implementation itself.

    uvloop's TLS layer calls ``read``, ``write`` and ``pending`` for every record in
    both directions; ``ssl.SSLObject`` implements each as a Python function that only
    forwards to ``_ssl._SSLSocket``.  Binding the C methods on the instance removes
    those Python frames from the relay's hot path; the signatures and semantics are
    the same (``read(len[, buffer])``, ``write(data)``, ``pending()``).
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> FastSSLObject:
        self: FastSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        impl = self._sslobj  # type: ignore[attr-defined]
        self.read = impl.read  # type: ignore[method-assign]
        self.write = impl.write  # type: ignore[method-assign]
        self.pending = impl.pending  # type: ignore[method-assign]
        return self


def build_context(
    tls: TLSSettings,
    verify_names: Sequence[str],
    server_name: str,
    cert: tuple[str, str] | None,
    alpn: Sequence[str] = (),
) -> ssl.SSLContext:
    """Build an SSLContext. Raises ssl.SSLError/OSError on bad material (the caller names the file)."""
    if tls.sessionResumption:
        # per identity (this context) and server name: see dbmtls.tls.resume
        ctx: ssl.SSLContext = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.sessions = SessionCache()  # type: ignore[attr-defined]
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslobject_class = FastSSLObject
    ctx.minimum_version = _VERSIONS[tls.minProtocolVersion]
    if tls.maxProtocolVersion:
        ctx.maximum_version = _VERSIONS[tls.maxProtocolVersion]
    # Sessions are kept on this context (dbmtls.tls.resume), so a reload, which builds new
    # contexts, drops them: no connection resumes a session made with an old certificate.
    if tls.insecureSkipVerify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = tuple(verify_names) == (server_name,)
        if tls.caCertificates:
            ctx.load_verify_locations(cafile=tls.caCertificates)
            if not ctx.get_ca_certs():
                raise ssl.SSLError(f"no CA certificate found in {tls.caCertificates}")
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        ctx.load_cert_chain(cert[0], cert[1], password=no_passphrase)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def needs_name_check(ctx: ssl.SSLContext) -> bool:
    return ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname


def _dns_match(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern == name:
        return True
    # RFC 6125: a wildcard only as the whole left-most label, matching exactly one label.
    # ... and never for a whole public suffix-like name ("*.com", "*."), which OpenSSL refuses too.
    if pattern.startswith("*.") and "*" not in pattern[2:] and "." in pattern[2:].strip("."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


def match_names(der: bytes, wanted: Sequence[str]) -> bool:
    """True if the certificate carries one of ``wanted`` as a DNS, IP or URI SAN."""
    san = subject_alt_names(der)
    if san is None:
        return False
    dns, ips, uris = san.dns, san.ips, san.uris
    for name in wanted:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        if ip is not None:
            if ip in ips:
                return True
        elif "://" in name:
            if name in uris:
                return True
        elif any(_dns_match(p, name) for p in dns):
            return True
    return False


def check_peer_names(sslobj: ssl.SSLObject | ssl.SSLSocket | None, wanted: Sequence[str]) -> None:
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der or not match_names(der, wanted):
        raise NameMismatch(f"server certificate carries none of the names {', '.join(wanted)}")


class EncryptedKey(ValueError):
    """A private key protected by a passphrase, which a sidecar has nobody to ask for."""


def no_passphrase() -> bytes:
    """``load_cert_chain``'s password callback: without one, OpenSSL asks on the terminal and
    a process with no terminal (a container) would read EOF or hang instead of failing."""
    raise EncryptedKey("the private key is encrypted with a passphrase")


# OpenSSL verify codes (X509_V_ERR_*) -> our error classes
_VERIFY_CODES: dict[int, type[TLSHandshakeError]] = {
    9: CertificateExpired,  # CERT_NOT_YET_VALID
    10: CertificateExpired,  # CERT_HAS_EXPIRED
    18: UnknownCA,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: UnknownCA,  # SELF_SIGNED_CERT_IN_CHAIN
    20: UnknownCA,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: UnknownCA,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    2: UnknownCA,  # UNABLE_TO_GET_ISSUER_CERT
    62: NameMismatch,  # HOSTNAME_MISMATCH
    64: NameMismatch,  # IP_ADDRESS_MISMATCH
}
# Alerts the server sends when it does not like *our* certificate.
_CLIENT_CERT_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
    "HANDSHAKE_FAILURE",
)


def classify(exc: BaseException, *, target: str, server_name: str, client_cert: bool = True) -> UpstreamError:
    """Translate a foreign exception from connect/handshake into the error tree (one boundary).

    ``client_cert``: whether we offered a client certificate.  A server that wants one and got
    none sends the same alerts as one that dislikes ours; only the fix differs.
    """
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        cls = _VERIFY_CODES.get(exc.verify_code, TLSHandshakeError)
        detail = exc.verify_message or exc.reason or str(exc)
        if cls is NameMismatch:
            detail = f"server certificate does not match {server_name!r} ({detail})"
        elif cls is UnknownCA:
            detail = f"server certificate not trusted: {detail}"
        elif cls is CertificateExpired:
            detail = f"server certificate invalid: {detail}"
        return cls(f"TLS handshake with {target} failed: {detail}")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if "ALERT" in reason and any(a in reason for a in _CLIENT_CERT_ALERTS):
            alert = reason.split("ALERT_", 1)[-1].lower().replace("_", " ")
            if not client_cert:
                return ClientCertRejected(
                    f"server {target} wants a client certificate and none was sent (TLS alert: {alert})",
                    hint="the server requires mutual TLS: set tls.mode MUTUAL with clientCertificate and privateKey",
                )
            return ClientCertRejected(f"server {target} rejected the client certificate (TLS alert: {alert})")
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            return TLSRefused(f"server {target} did not answer with TLS (is TLS enabled on that port?)")
        if "VERSION" in reason or "PROTOCOL" in reason:
            return TLSVersionMismatch(f"TLS handshake with {target} failed: no common protocol version ({reason})")
        return TLSHandshakeError(f"TLS handshake with {target} failed: {reason or exc}")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"timed out talking to {target}")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamUnreachable(f"connection to {target} refused")
    if isinstance(exc, socket.gaierror):
        return UpstreamUnreachable(f"cannot resolve {target}: {exc.strerror}")
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError | ConnectionAbortedError):
        return TLSHandshakeError(
            f"{target} closed the connection during the TLS handshake",
            hint="the server may require a client certificate or not speak TLS on that port",
        )
    if isinstance(exc, OSError):
        return UpstreamUnreachable(f"cannot connect to {target}: {exc.strerror or exc}")
    return UpstreamError(f"unexpected error talking to {target}: {type(exc).__name__}: {exc}")
