"""Smoke test: the seed scenario's steps 4-6 with a real redis-server and redis-py."""

from __future__ import annotations

from pathlib import Path

import redis

from support.certs import PKI
from support.net import free_port
from support.proc import Dbmtls, tls_block
from support.redis_server import RedisTLS


def test_set_get_through_dbmtls(pki: PKI, redis_tls: RedisTLS, workdir: Path) -> None:
    port = free_port()
    config = {
        "databases": [
            {
                "name": "cache",
                "protocol": "redis",
                "listen": f"127.0.0.1:{port}",
                "address": f"localhost:{redis_tls.port}",
                "tls": tls_block(pki),
            }
        ]
    }
    with Dbmtls(workdir, config).start(wait_ports=(port,)) as proxy:
        r = redis.Redis(port=port)
        assert r.set("foo", "bar")
        assert r.get("foo") == b"bar"
        r.close()
        proxy.wait_log("connection closed db=cache")
        assert proxy.stop() == 0
