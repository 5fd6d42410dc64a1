"""Thin blocking I/O for the doctor: every read and write is bounded by a deadline.

The doctor runs one probe at a time and exits; a blocking socket with a timeout per
call is the simplest thing that can never hang (a doctor that hangs is worse than
none).  The same wrapper serves the plaintext preamble and, after the handshake, the
``ssl.SSLSocket`` (whose ``recv`` raises ``ssl.SSLError`` when the server's alert arrives).
"""

from __future__ import annotations

import socket
import time


class Wire:
    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout

    def _arm(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)

    def send(self, data: bytes) -> None:
        self._arm(time.monotonic() + self.timeout)
        self.sock.sendall(data)

    def recv(self, limit: int = 65536, timeout: float | None = None) -> bytes:
        """Whatever arrives first (``b""``: the server closed)."""
        self._arm(time.monotonic() + (self.timeout if timeout is None else timeout))
        return self.sock.recv(limit)

    def recv_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes, never more (what follows stays in the socket); EOFError if it closes first."""
        deadline = time.monotonic() + self.timeout
        buf = bytearray()
        while len(buf) < n:
            self._arm(deadline)
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"the server closed the connection after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def recv_until(self, done: bytes, limit: int = 4096) -> bytes:
        """Until ``done`` appears, EOF, or ``limit`` bytes; TLS sockets may return more than asked."""
        deadline = time.monotonic() + self.timeout
        buf = bytearray()
        while done not in buf and len(buf) < limit:
            self._arm(deadline)
            chunk = self.sock.recv(limit - len(buf))
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    def pending_plaintext(self) -> bytes:
        """Bytes already waiting in the socket, without blocking (plaintext injected before TLS)."""
        # With a timeout set, Python polls for readability before recv(): non-blocking instead.
        self.sock.settimeout(0)
        try:
            return self.sock.recv(16, socket.MSG_PEEK)
        except OSError:  # BlockingIOError: nothing waiting
            return b""
        finally:
            self.sock.settimeout(self.timeout)

    def close(self) -> None:
        self.sock.close()
