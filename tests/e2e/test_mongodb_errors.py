"""MongoDB apps see why the upstream failed: a real driver (pymongo) against ``dbmtls run``.

Each failure is a ``protocol: mongodb`` listener of one dbmtls process: nothing listening,
a server whose certificate does not chain to our CA, a server that rejects our client
certificate (TLS 1.3: the rejection arrives after the handshake, while the driver's
``hello`` is already waiting), and a client certificate file that does not exist.  The
driver must show dbmtls's text in its ``ServerSelectionTimeoutError`` and dbmtls must log
the reason.  pymongo (4.20) sends every message as ``OP_MSG``, its first ``hello``
included; the legacy ``OP_QUERY`` -> ``OP_REPLY`` path that older drivers take is checked
with raw bytes, decoded with pymongo's ``bson``.

mongod is not installed here, so the TLS servers are ``support.tls_echo`` (the real
OpenSSL server side with client certificates required); no test needs a working server.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pymongo
import pytest
from pymongo.errors import ServerSelectionTimeoutError

from support.certs import PKI
from support.net import free_port
from support.proc import Dbmtls, on_plane, tls_block
from support.tls_echo import TLSEchoServer

pytestmark = pytest.mark.e2e

OP_REPLY, OP_QUERY, OP_COMPRESSED, OP_MSG = 1, 2004, 2012, 2013


class Proxy:
    def __init__(self, proc: Dbmtls, ports: dict[str, int]) -> None:
        self.proc = proc
        self.ports = ports


@pytest.fixture(scope="module")
def proxy(pki: PKI, echo: TLSEchoServer, tmp_path_factory: pytest.TempPathFactory, data_plane: str) -> Iterator[Proxy]:
    work = tmp_path_factory.mktemp("dbmtls-mongodb")
    good = f"localhost:{echo.port}"
    missing = dict(tls_block(pki), clientCertificate=str(work / "missing.crt"))
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "refused": (f"127.0.0.1:{free_port()}", tls_block(pki)),
        "wrongca": (good, tls_block(pki, ca=str(pki.other_ca / "ca.crt"))),
        "badclient": (good, tls_block(pki, client=pki.client_for("mallory", ca=pki.other_ca))),
        "nomaterial": (good, missing),
    }
    ports = {name: free_port() for name in variants}
    databases = [
        {"name": name, "protocol": "mongodb", "listen": f"127.0.0.1:{ports[name]}", "address": address, "tls": tls}
        for name, (address, tls) in variants.items()
    ]
    proc = Dbmtls(work, {"databases": databases, "drainTimeout": "1s", "dataPlane": data_plane})
    on_plane(proc.start(wait_ports=tuple(ports.values())), data_plane)
    yield Proxy(proc, ports)
    assert proc.stop() == 0


def driver_error(port: int) -> str:
    """The ServerSelectionTimeoutError text a pymongo app sees for this listener."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        f"mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=2000"
    )
    try:
        client.admin.command("ping")
    except ServerSelectionTimeoutError as exc:
        return str(exc)
    finally:
        client.close()
    raise AssertionError("the ping succeeded through a failing upstream")


CASES = {
    # name: (text in the driver's error and the log, codeName, log reason)
    "refused": ("connection to 127.0.0.1:", "HostUnreachable", "connection_refused"),
    "wrongca": ("server certificate not trusted", "HostUnreachable", "unknown_ca"),
    "badclient": ("rejected the client certificate", "AuthenticationFailed", "client_cert_rejected"),
    "nomaterial": ("TLS material is not loaded", "HostUnreachable", "handshake_failed"),
}


@pytest.fixture(scope="module")
def driver_errors(proxy: Proxy) -> dict[str, str]:
    """Every case's driver error, the clients run side by side (each waits out its 2 s selection timeout)."""
    with ThreadPoolExecutor(len(CASES)) as pool:
        futures = {name: pool.submit(driver_error, proxy.ports[name]) for name in CASES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_driver_shows_the_reason(proxy: Proxy, driver_errors: dict[str, str], name: str) -> None:
    text, code, reason = CASES[name]
    message = driver_errors[name]
    assert re.search(rf"dbmtls: \[{name}\] [^']*{re.escape(text)}[^']* \(hint: ", message), message
    assert f"'code': {18 if code == 'AuthenticationFailed' else 6}, 'codeName': '{code}'" in message
    line = proxy.proc.wait_line(rf"connection failed db={name} .*reason={reason}\b")
    assert text in line


# --- the bytes, for what a driver does not show -----------------------------------------------


def bson_cstring_doc(key: str, value: int) -> bytes:
    element = b"\x10" + key.encode() + b"\x00" + struct.pack("<i", value)
    return struct.pack("<i", 4 + len(element) + 1) + element + b"\x00"


def op_msg(request_id: int) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson_cstring_doc("hello", 1)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, OP_MSG) + body


def op_query(request_id: int) -> bytes:
    body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + bson_cstring_doc("isMaster", 1)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, OP_QUERY) + body


def recv_message(sock: socket.socket) -> tuple[tuple[int, int, int, int], bytes]:
    def exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise AssertionError(f"closed after {bytes(buf)!r}")
            buf += chunk
        return bytes(buf)

    header = struct.unpack("<iiii", exact(16))
    return header, exact(header[0] - 16)


def test_each_request_is_answered_then_garbage_closes(proxy: Proxy) -> None:
    pymongo_bson = pytest.importorskip("bson")
    with socket.create_connection(("127.0.0.1", proxy.ports["refused"]), timeout=10) as s:
        s.sendall(op_msg(41))
        (_, _, response_to, op), body = recv_message(s)
        assert (response_to, op) == (41, OP_MSG)
        doc = pymongo_bson.decode(body[5:])
        assert doc["ok"] == 0.0 and doc["code"] == 6 and doc["codeName"] == "HostUnreachable"
        assert doc["errmsg"].startswith("dbmtls: [refused] connection to 127.0.0.1:")

        s.sendall(op_query(42))
        (_, _, response_to, op), body = recv_message(s)
        assert (response_to, op) == (42, OP_REPLY)
        assert pymongo_bson.decode(body[20:])["codeName"] == "HostUnreachable"

        started = time.monotonic()
        s.sendall(struct.pack("<iiii", 16 + 9, 43, 0, OP_COMPRESSED) + struct.pack("<iiB", OP_MSG, 0, 0))
        assert s.recv(100) == b""  # closed at once, not at the end of the error window
        assert time.monotonic() - started < 1.5


def test_rejection_while_the_app_is_idle_is_answered_at_its_first_request(proxy: Proxy) -> None:
    """TLS 1.3: the server rejects our certificate before the app has said anything."""
    with socket.create_connection(("127.0.0.1", proxy.ports["badclient"]), timeout=10) as s:
        time.sleep(0.5)  # the scenario itself: an app that connects and only later sends its hello
        s.sendall(op_msg(7))
        (_, _, response_to, op), body = recv_message(s)
        assert (response_to, op) == (7, OP_MSG)
        assert b"AuthenticationFailed" in body and b"rejected the client certificate" in body
