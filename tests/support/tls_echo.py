"""A TLS echo server that requires client certificates, for the ``tcp`` and ``mongodb`` relays.

No OS package gives a "TLS-only echo service with client certificates required", and a
real mongod is not installed here, so the e2e tests for the opaque relays use this small
threaded server.  It runs the real OpenSSL server side (the same checks a database does:
chain to its CA, not expired, client certificate required), echoes every byte back until
the client half-closes, and records what it saw: the subject CN of each client
certificate and the handshake errors, so a test can assert which identity dbmtls
presented and why a handshake was refused.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.x509.oid import NameOID

from support.certs import Pair


class TLSEchoServer:
    def __init__(self, server: Pair, ca_cert: str) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(server.cert, server.key)
        self.ctx.load_verify_locations(cafile=ca_cert)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.peer_cns: list[str] = []
        self.handshake_errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept_loop, name="tls-echo", daemon=True)

    def start(self) -> TLSEchoServer:
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        # unblock accept() by connecting once, then close the listener
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            pass
        self._accept_thread.join(timeout=5)
        self.sock.close()
        for t in self._threads:
            t.join(timeout=5)

    def wait_for(self, predicate: Callable[[TLSEchoServer], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met: cns={self.peer_cns} errors={self.handshake_errors}")
            time.sleep(0.02)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self._lock:
                self.handshake_errors.append(getattr(exc, "reason", None) or str(exc))
            raw.close()
            return
        with tls:
            der = tls.getpeercert(binary_form=True)
            cn = ""
            if der:
                attrs = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                cn = str(attrs[0].value) if attrs else ""
            with self._lock:
                self.peer_cns.append(str(cn))
            try:
                while chunk := tls.recv(65536):
                    tls.sendall(chunk)
            except (ssl.SSLError, OSError) as exc:
                # TLS 1.3: a client certificate the server rejects shows up on the first read
                with self._lock:
                    self.handshake_errors.append(getattr(exc, "reason", None) or str(exc))
