"""What one idle TLS client connection costs by itself: OpenSSL through Python's ``ssl``, no proxy.

    .venv/bin/python bench/tls_footprint.py            # 2000 connections, TLS 1.3 then TLS 1.2

The floor under dbmtls's per-connection memory: the same client handshake dbmtls does toward
Redis (verified chain and name, client certificate, ``MemoryBIO`` as uvloop's TLS layer uses),
one ``PING``, and the connection held.  Prints the RSS growth of this process per connection.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench.servers import Redis  # noqa: E402

from support import churn  # noqa: E402
from support.certs import PKI, make_pki  # noqa: E402

Held = tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]


def _pump(sock: socket.socket, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
    if data := outgoing.read():
        sock.sendall(data)
    incoming.write(sock.recv(65536))


def connect(ctx: ssl.SSLContext, port: int) -> Held:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            _pump(sock, incoming, outgoing)
    tls.write(churn.PING)
    sock.sendall(outgoing.read())
    while True:
        try:
            if tls.read(100):
                break
        except ssl.SSLWantReadError:
            _pump(sock, incoming, outgoing)
    return sock, tls, incoming, outgoing


def footprint(pki: PKI, port: int, count: int, version: ssl.TLSVersion) -> float:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_cert)
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    ctx.maximum_version = version
    warm = [connect(ctx, port) for _ in range(20)]
    before = churn.rss_kib(os.getpid())
    held = [connect(ctx, port) for _ in range(count)]
    after = churn.rss_kib(os.getpid())
    for sock, *_ in warm + held:
        sock.close()
    return (after - before) / count


VERSIONS = {"1.3": ssl.TLSVersion.TLSv1_3, "1.2": ssl.TLSVersion.TLSv1_2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=2000, help="connections held")
    p.add_argument("--tls", choices=sorted(VERSIONS), help="only this version, in this process")
    args = p.parse_args(argv)
    if args.tls is None:
        # each version in a fresh process: memory freed by one run would be reused by the next
        for version in VERSIONS:
            subprocess.run([sys.executable, __file__, "-n", str(args.n), "--tls", version], check=True)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="dbmtls-tls-footprint-"))
    try:
        pki = make_pki(workdir / "pki")
        server = Redis(workdir, pki, maxclients=args.n + 100).start()
        try:
            kib = footprint(pki, server.tls_port, args.n, VERSIONS[args.tls])
            print(f"TLS {args.tls}: {kib:.1f} KiB per idle client connection ({ssl.OPENSSL_VERSION})", flush=True)
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
