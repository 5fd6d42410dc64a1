"""A finished connection is freed by reference counting, never left to the cyclic garbage collector.

Under connection churn, anything a connection leaves in a reference cycle lives until a full
collection: the relay, both transports, the SSL object, OpenSSL's state and uvloop's 256 KiB
TLS read buffer.  A connection that stays open for a second (the relay's half-close linger)
survives the young-generation collections and is only freed by the rare full ones, so hundreds
of finished connections pile up and fragment the heap (``bench/churn.py``: 470 MB after 20,000
Redis connections).  ``bench/memtrace.py`` shows which objects; this test keeps it fixed.

The proxy runs in-process on uvloop with real TLS toward ``support.tls_echo``; the automatic
collector is off while the connections run, so whatever is still alive after they closed is
garbage that only a collection would free (or a real leak).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import socket

import pytest
import uvloop

from dbmtls.config.model import Config
from dbmtls.proxy.server import Proxy
from support.certs import PKI
from support.net import free_port
from support.tls_echo import TLSEchoServer

PING = b"*1\r\n$4\r\nPING\r\n"
# The objects of one connection (dbmtls's, uvloop's and the ssl module's).
PER_CONNECTION = {
    "Conn",
    "Relay",
    "_Half",
    "_Tap",
    "Endpoint",
    "_Accepted",
    "SSLProtocol",
    "_SSLProtocolTransport",
    "TCPTransport",
    "MemoryBIO",
}


def _left() -> collections.Counter[str]:
    return collections.Counter(n for o in gc.get_objects() if (n := type(o).__name__) in PER_CONNECTION)


@pytest.mark.parametrize("protocol", ["redis", "tcp"])
def test_finished_connections_leave_nothing_for_the_garbage_collector(
    pki: PKI, echo: TLSEchoServer, protocol: str
) -> None:
    port = free_port()
    config = Config.model_validate(
        {
            "databases": [
                {
                    "name": "db",
                    "protocol": protocol,
                    "listen": f"127.0.0.1:{port}",
                    "address": f"localhost:{echo.port}",
                    "tls": {
                        "mode": "MUTUAL",
                        "clientCertificate": pki.client.cert,
                        "privateKey": pki.client.key,
                        "caCertificates": pki.ca_cert,
                    },
                }
            ]
        }
    )
    n = 5

    def client() -> None:
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(PING)
                got = b""
                while len(got) < len(PING):
                    chunk = s.recv(100)
                    assert chunk, got
                    got += chunk
                assert got == PING

    async def main() -> collections.Counter[str]:
        proxy = Proxy(config)
        await proxy.start()
        rt = proxy.runtimes["db"]
        try:
            gc.collect()
            gc.disable()
            try:
                await asyncio.get_running_loop().run_in_executor(None, client)
                # one task per connection, done once both sides closed (a second after the app's EOF)
                _done, pending = await asyncio.wait(list(proxy._tasks), timeout=15)
                assert not pending and rt.stats.closed == n and not rt.active
                del _done
                await asyncio.sleep(0.1)  # the transports' last callbacks
                return _left()
            finally:
                gc.enable()
        finally:
            await proxy.close_listeners()
            proxy.close_all()

    left = uvloop.run(main())
    assert not left, f"still alive after {n} finished connections (cyclic garbage): {dict(left)}"
