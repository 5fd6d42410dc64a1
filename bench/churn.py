"""Does dbmtls's memory level off under connection churn?  Sequential short connections, RSS as it goes.

    .venv/bin/python bench/churn.py                                   # redis,pg,mysql: 20000/5000/5000
    .venv/bin/python bench/churn.py --protocol redis -n 51000 --every 3000
    .venv/bin/python bench/churn.py --protocol redis --idle 2000      # then KiB per idle connection
    .venv/bin/python bench/churn.py --protocol redis -n 100 --idle 300 --value 1048576   # ... after a 1 MiB GET
    .venv/bin/python bench/churn.py --concurrency 4                   # 4 clients at a time
    .venv/bin/python bench/churn.py --protocol redis --idle 2000 --plane native   # dataPlane: native

For each protocol: a real server (redis-server with ``tls-auth-clients yes``, PostgreSQL 15 with
``cert clientcert=verify-full``, MariaDB 10.11 with a ``REQUIRE X509`` user), one ``dbmtls run``
process (``--admin off``) doing verified mTLS as CN=jinsu, and N connections through it, each
connect + one request (``PING`` / ``SELECT 1``) + close (``tests/support/churn.py``).  Prints
dbmtls's VmRSS and open fds every ``--every`` connections, and a summary: RSS after warm-up
(the first ``--warmup`` connections) and the growth per 1000 connections after it.  With
``--idle M``: then M connections held open (KiB per connection) and closed again (RSS right
after, and once dbmtls's memory trimmer has run).

Needs root (PostgreSQL and MariaDB run as their own users via setpriv) and the servers of
``scripts/setup.sh``.  Everything generated lives in one temp dir, removed at the end
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench.procs import Service, free_port  # noqa: E402

from support import churn  # noqa: E402
from support.certs import PKI, make_pki  # noqa: E402

PROTOCOLS = {"redis": "redis", "pg": "postgres", "mysql": "mysql"}
DEFAULT_N = {"redis": 20000, "pg": 5000, "mysql": 5000}
# How long after closing the idle connections RSS is read again: dbmtls returns freed memory to
# the kernel on a timer (dbmtls.memtrim.CHECK_INTERVAL).
IDLE_LATER = 8.0


@contextmanager
def server(protocol: str, workdir: Path, pki: PKI, *, connections: int = 0) -> Iterator[int]:
    """The database server for ``protocol``, set up for churn and ``connections`` open at once; yields its TLS port."""
    if protocol == "redis":
        from support.redis_server import RedisTLS

        redis = RedisTLS(workdir / "redis", pki.server, pki.ca_cert, maxclients=max(10000, connections + 2000)).start()
        try:
            yield redis.port
        finally:
            redis.stop()
    elif protocol == "postgres":
        from support.pg_server import PostgresTLS

        pg = PostgresTLS(pki.server, pki.ca_cert, hba=churn.PG_HBA, max_connections=max(400, connections + 100))
        try:
            pg.start()
            pg.create_user(churn.USER, database=churn.PG_DATABASE)
            yield pg.port
        finally:
            pg.stop()
    elif protocol == "mysql":
        from support.mariadb_server import MariaDB

        db = MariaDB(pki.server, pki.ca_cert, max_connections=max(300, connections + 100))
        try:
            db.start()
            db.sql(churn.MYSQL_SETUP)
            yield db.port
        finally:
            db.stop()
    else:
        raise ValueError(protocol)


@contextmanager
def dbmtls(protocol: str, server_port: int, workdir: Path, pki: PKI, plane: str = "python") -> Iterator[Service]:
    d = workdir / f"dbmtls-{protocol}-{plane}"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = d / "dbmtls.yaml"
    config = {"dataPlane": plane, "databases": [churn.dbmtls_database(protocol, port, server_port, pki)]}
    cfg.write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-m", "dbmtls", "run", "-c", str(cfg), "--admin", "off"]
    service = Service(f"dbmtls-{protocol}", cmd, d / "dbmtls.log", port=port).start()
    try:
        yield service
    finally:
        service.stop()


def _mb(kib: int) -> str:
    return f"{kib / 1024:.1f} MB"


def run_one(name: str, args: argparse.Namespace, workdir: Path, pki: PKI) -> None:
    protocol = PROTOCOLS[name]
    n = args.n if args.n is not None else DEFAULT_N[name]
    every = args.every or max(1, n // 20)
    with (
        server(protocol, workdir, pki, connections=args.idle) as server_port,
        dbmtls(protocol, server_port, workdir, pki, args.plane) as proxy,
    ):
        pid = proxy.pid
        target = churn.target_for(protocol, proxy.port)
        target.once()  # the first connection pays for imports and lazily built state
        print(
            f"== {name}: {n} connections, concurrency {args.concurrency}, dataPlane {args.plane}, dbmtls pid {pid}",
            flush=True,
        )

        def show(p: churn.Point) -> None:
            rate = p.done / p.seconds if p.seconds else 0.0
            print(
                f"{name:>5} {p.done:>7} conns  rss {_mb(p.rss_kib):>9}  fds {p.fds:>4}  {rate:6.0f} conn/s", flush=True
            )

        started = time.monotonic()
        points = churn.churn(target, n, pid, concurrency=args.concurrency, every=every, on_point=show)
        took = time.monotonic() - started
        settled = churn.settle(pid, seconds=2.0)
        warm = next((p for p in points if p.done >= args.warmup), points[0])
        last = points[-1]
        per_k = (last.rss_kib - warm.rss_kib) / max(1, last.done - warm.done) * 1000
        print(
            f"{name}: {n} connections in {took:.1f}s ({n / took:.0f}/s); rss {_mb(points[0].rss_kib)} at start, "
            f"{_mb(warm.rss_kib)} after {warm.done}, {_mb(last.rss_kib)} after {last.done} "
            f"({per_k:+.0f} KiB per 1000 after warm-up), {_mb(settled)} 2 s later; fds {churn.fd_count(pid)}",
            flush=True,
        )
        if args.idle:
            held = "idle connections"
            if args.value and protocol == "redis":
                churn.redis_set_value(proxy.port, args.value)
                target = dataclasses.replace(target, value_size=args.value)
                held = f"idle connections that each read a {args.value}-byte value"
            idle = churn.idle(target, args.idle, pid, later=IDLE_LATER)
            print(
                f"{name}: {args.idle} {held}: rss {_mb(idle.before_kib)} -> {_mb(idle.open_kib)} "
                f"= {idle.kib_per_connection:.1f} KiB each; {_mb(idle.after_kib)} after closing them, "
                f"{_mb(idle.later_kib)} {IDLE_LATER:g} s later",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="redis,pg,mysql", help="comma-separated: redis, pg, mysql")
    p.add_argument("-n", type=int, default=None, help="connections (default redis 20000, pg 5000, mysql 5000)")
    p.add_argument("--every", type=int, default=0, help="print RSS every K connections (default n/20)")
    p.add_argument("--warmup", type=int, default=2000, help="connections before the growth is measured")
    p.add_argument("--concurrency", type=int, default=1, help="clients at a time")
    p.add_argument("--idle", type=int, default=0, help="afterwards, hold this many connections open")
    p.add_argument("--value", type=int, default=0, help="Redis: each idle connection first GETs a value this large")
    p.add_argument("--plane", choices=("python", "native"), default="python", help="dbmtls's dataPlane")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.protocol.split(",") if s.strip()]
    if unknown := [s for s in names if s not in PROTOCOLS]:
        p.error(f"unknown protocol(s): {', '.join(unknown)}")
    workdir = Path(tempfile.mkdtemp(prefix="dbmtls-churn-"))
    try:
        pki = make_pki(workdir / "pki")
        for name in names:
            run_one(name, args, workdir, pki)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
