"""Fake PostgreSQL servers for what no package gives: hostile and misbehaving upstreams.

A real PostgreSQL never answers ``S`` followed by plaintext, so the man-in-the-middle
of CVE-2021-23222 needs a fake; PostgreSQL 15 (the packaged version) has no direct
TLS, so that is faked too, with a TLS server that insists on ALPN ``postgresql``
the way PostgreSQL 17 does.  Every fake records exactly what it received, so a test
can prove that nothing of the app's startup crossed the network in clear.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from support.certs import Pair

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"

Mode = Literal["s_plus_extra", "s_then_extra", "n", "e", "garbage", "direct_tls"]

# What a man in the middle would inject after 'S': an AuthenticationOk, as if the
# server had accepted the app without any TLS.
INJECTED = b"R\x00\x00\x00\x08\x00\x00\x00\x00"


def pg_error(message: str, sqlstate: str = "XX000") -> bytes:
    body = b"SFATAL\x00VFATAL\x00C" + sqlstate.encode() + b"\x00M" + message.encode() + b"\x00\x00"
    return b"E" + struct.pack("!I", len(body) + 4) + body


@dataclass
class Seen:
    """One connection as the fake saw it."""

    raw: bytearray = field(default_factory=bytearray)  # every byte read off TCP (before any TLS)
    inside_tls: bytearray = field(default_factory=bytearray)  # decrypted bytes (direct_tls)
    alpn: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class FakePG:
    def __init__(self, mode: Mode, server: Pair | None = None) -> None:
        self.mode = mode
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        # accept() in a thread is not woken by close(): poll, so stop() is prompt
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.connections: list[Seen] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stopped = False

    def start(self) -> FakePG:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            seen = Seen()
            self.connections.append(seen)
            threading.Thread(target=self._handle, args=(client, seen), daemon=True).start()

    def _read_rest(self, client: socket.socket, seen: Seen, timeout: float = 3.0) -> None:
        """Record whatever else the client sends until it closes (or the timeout)."""
        client.settimeout(timeout)
        try:
            while chunk := client.recv(65536):
                seen.raw += chunk
        except OSError:
            pass

    def _handle(self, client: socket.socket, seen: Seen) -> None:
        try:
            if self.mode == "direct_tls":
                self._direct_tls(client, seen)
                return
            client.settimeout(5)
            while len(seen.raw) < 8:
                chunk = client.recv(8 - len(seen.raw))
                if not chunk:
                    return
                seen.raw += chunk
            if self.mode == "s_plus_extra":
                client.sendall(b"S" + INJECTED)
            elif self.mode == "s_then_extra":
                client.sendall(b"S")
                time.sleep(0.05)
                client.sendall(INJECTED)
            elif self.mode == "n":
                client.sendall(b"N")
            elif self.mode == "e":
                client.sendall(pg_error("fake server says: out of memory (not to be shown)"))
            elif self.mode == "garbage":
                client.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            self._read_rest(client, seen)
        except OSError:
            pass  # ssl.SSLError included: the client gave up, which is what some tests expect
        finally:
            client.close()
            seen.done.set()

    def _direct_tls(self, client: socket.socket, seen: Seen) -> None:
        assert self.server is not None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server.cert, self.server.key)
        ctx.set_alpn_protocols(["postgresql"])
        client.settimeout(5)
        first = client.recv(1, socket.MSG_PEEK)
        seen.raw += first
        with ctx.wrap_socket(client, server_side=True) as tls:
            seen.alpn = tls.selected_alpn_protocol()
            if seen.alpn != "postgresql":
                return  # PostgreSQL 17 closes: "received direct SSL connection request without ALPN"
            header = tls.recv(4)
            seen.inside_tls += header
            if len(header) == 4:
                length = struct.unpack("!I", header)[0]
                while len(seen.inside_tls) < length:
                    chunk = tls.recv(length - len(seen.inside_tls))
                    if not chunk:
                        break
                    seen.inside_tls += chunk
            tls.sendall(pg_error("hello from the direct TLS fake", "28000"))
