"""The three suites: Redis (issue 2), PostgreSQL (issue 3), MySQL/MariaDB (issue 4).

A suite starts one server and every proxy once, checks each path with a small
load (no errors, and the server really saw the requests), then runs each load
``repeat`` times, rotating the order of the targets on every round so no
target always runs first or right after a heavy one.  Proxies that are not
being measured sit idle, so they cost nothing while another one runs.

Guarding against fake-fast numbers: redis-benchmark counts error replies as
completed requests, so every Redis run is checked against the server's own
``keyspace_hits``; every MariaDB run against ``Com_select``.  pgbench checks
each result itself and reports failed transactions; a run with any error is
recorded as an error, never as a number.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import targets
from bench.procstat import cpu_of
from bench.servers import Redis

from support import churn
from support.certs import PKI


@dataclass
class Sample:
    suite: str
    load: str
    target: str
    rate: float | None  # requests / transactions / queries per second, as the load generator reports it
    ops: int  # requests / transactions / queries completed in the run
    cpu: float | None  # proxy CPU seconds over the run; None when the client talks to the server itself
    error: str | None = None

    @property
    def cpu_per_100k(self) -> float | None:
        if self.cpu is None or not self.ops:
            return None
        return self.cpu / self.ops * 100_000


@dataclass
class Leg:
    """One column of the table: how the load generator reaches the server."""

    name: str
    client: list[str]  # the load generator's connection arguments for this path
    proxy: targets.Proxy | None = None
    error: str | None = None
    # What the results JSON says about the column beyond its name (dbmtls: the variant's settings)
    info: dict[str, object] = field(default_factory=dict)

    @property
    def pids(self) -> list[int]:
        return self.proxy.pids if self.proxy is not None else []


@dataclass(frozen=True)
class LoadInfo:
    """One load of a suite, for the results JSON and the charts."""

    suite: str
    name: str  # the label in the tables
    command: str  # the load generator's command line, without the connection arguments
    per_connection: bool  # a new connection per request / transaction / query (compared with direct TLS)


@dataclass(frozen=True)
class Variant:
    """One dbmtls column: its data plane and the settings the run compares."""

    label: str
    plane: str  # dataPlane asked for: python | native
    metrics: bool  # the admin/metrics server on
    resumption: bool | None  # tls.sessionResumption written as this; None: not written (dbmtls's default)
    preconnect: int  # preconnect.connections written; 0: not written


# The per-connection goal (issue 13): dbmtls's rate at least this many times direct TLS's.
PER_CONNECTION_GOAL = 1.3


@dataclass
class Options:
    repeat: int = 3
    metrics: str = "off"  # off | on | both: dbmtls with --admin off, with the admin/metrics server, or both
    # dataPlane(s) of dbmtls: python, native (a protocol the native plane does not relay yet runs on
    # python, and its column says so)
    planes: tuple[str, ...] = ("python",)
    # tls.sessionResumption of the dbmtls columns: None (not written), True, False; one column each
    resumption: tuple[bool | None, ...] = (None,)
    preconnect: int = 0  # > 0: also a dbmtls column with preconnect.connections = this
    only: tuple[str, ...] = ()  # target names to run (empty: all)
    redis_n: tuple[int, int, int] = (100_000, 1_000_000, 15_000)
    redis_conn_n: int = 1500  # redis-benchmark -n of the new-connection-per-request load
    pg_duration: int = 6  # pgbench -T takes whole seconds
    pg_scale: int = 10
    mysql_queries: int = 40_000
    mysql_connects: int = 150
    mem_idle: tuple[int, int] = (2000, 200)  # memory suite: idle connections held (Redis, PostgreSQL)
    mem_churn: tuple[int, int] = (20_000, 2000)  # memory suite: short connections after that
    log: Callable[[str], None] = print
    samples: list[Sample] = field(default_factory=list)
    mem_samples: list[MemSample] = field(default_factory=list)
    loads: list[LoadInfo] = field(default_factory=list)
    # (protocol, dbmtls column) -> why this dbmtls rejects that column's config for the protocol
    # (preconnect is for TLS-first protocols only): the column is left out of that suite
    not_for: dict[tuple[str, str], str] = field(default_factory=dict)
    # (suite, column) -> what the column is beyond its name (Leg.info, plus how it was reached)
    target_info: dict[tuple[str, str], dict[str, object]] = field(default_factory=dict)


class RunError(Exception):
    pass


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RunError(f"{cmd[0]} did not finish in {timeout:.0f}s (a proxy hanging?)") from None


def _first_line(text: str) -> str:
    """The line that says what went wrong: the first mentioning an error, else the first."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "rror" in ln or "failed" in ln.lower()), lines[0] if lines else "")
    return pick[:200]


def _wanted(opts: Options, name: str) -> bool:
    return not opts.only or any(o.lower() in name.lower() for o in opts.only)


def dbmtls_variants(opts: Options) -> list[Variant]:
    """dbmtls's columns: every data plane x metrics setting x resumption setting x (no pool, pool).

    Labels: "dbmtls" (python plane), "dbmtls native"; "+metrics" with --metrics both; " +resume" /
    " -resume" when --resumption wrote tls.sessionResumption true / false; " +poolN" with
    --preconnect N."""
    metrics = {"off": [False], "on": [True], "both": [False, True]}[opts.metrics]
    pools = (0, opts.preconnect) if opts.preconnect > 0 else (0,)
    out = []
    for plane in opts.planes:
        for m in metrics:
            for resumption in opts.resumption:
                for pool in pools:
                    label = "dbmtls" + (" native" if plane == "native" else "")
                    label += "+metrics" if m and opts.metrics == "both" else ""
                    label += {None: "", True: " +resume", False: " -resume"}[resumption]
                    label += f" +pool{pool}" if pool else ""
                    out.append(Variant(label, plane, m, resumption, pool))
    return out


SUITE_PROTOCOLS = {"redis": ["redis"], "pg": ["postgres"], "mysql": ["mysql"], "memory": ["redis", "postgres"]}


def preflight(suites: list[str], opts: Options) -> str | None:
    """--resumption and --preconnect write keys an older dbmtls does not know, and that a dbmtls
    may refuse for a protocol (preconnect: TLS-first protocols only).  Each such column's config is
    loaded with the dbmtls that will run, per protocol, before any server starts: a column refused
    for one protocol is left out of that suite (``opts.not_for``, said in the report); a column
    refused for every protocol of the run stops it, with the loader's message."""
    from dbmtls.config.load import config_from_documents
    from dbmtls.errors import ConfigError

    protocols = sorted({p for s in suites for p in SUITE_PROTOCOLS[s]})
    for v in dbmtls_variants(opts):
        if v.resumption is None and not v.preconnect:
            continue  # what every run writes
        refused = {}
        for protocol in protocols:
            up = targets.Upstream(6379, protocol)
            doc = targets.dbmtls_config(
                None, up, 16379, data_plane=v.plane, resumption=v.resumption, preconnect=v.preconnect
            )
            try:
                config_from_documents([(doc, "bench")], "bench")
            except ConfigError as exc:
                refused[protocol] = str(exc)
        if refused and len(refused) == len(protocols):
            why = "; ".join(f"{p}: {m}" for p, m in refused.items())
            hint = (
                "\n(--resumption writes tls.sessionResumption, --preconnect writes preconnect: both need a "
                "dbmtls that has them)"
                if "unknown field" in why
                else ""
            )
            return f"this dbmtls rejects the config of {v.label!r}: {why}{hint}"
        for protocol, why in refused.items():
            opts.not_for[(protocol, v.label)] = why
            opts.log(f"{v.label}: left out for {protocol}: {why}")
    return None


def _dbmtls_legs(workdir: Path, pki: PKI, up: targets.Upstream, opts: Options) -> list[Leg]:
    out = []
    for v in dbmtls_variants(opts):
        if (up.protocol, v.label) in opts.not_for:
            continue
        proxy = targets.dbmtls(
            workdir,
            pki,
            up,
            metrics=v.metrics,
            label=v.label,
            data_plane=v.plane,
            resumption=v.resumption,
            preconnect=v.preconnect,
        )
        info: dict[str, object] = {
            "plane": v.plane,
            "metrics": v.metrics,
            "sessionResumption": v.resumption,
            "preconnect": v.preconnect,
        }
        out.append(Leg(v.label, [], proxy, info=info))
    return out


def _record(suite: str, legs: list[Leg], opts: Options) -> None:
    for leg in legs:
        opts.target_info[(suite, leg.name)] = {**leg.info, **({"error": leg.error} if leg.error else {})}


@contextlib.contextmanager
def _started(legs: list[Leg], opts: Options) -> Iterator[list[Leg]]:
    try:
        for leg in legs:
            if leg.proxy is None:
                continue
            try:
                leg.proxy.start()
            except Exception as exc:
                leg.error = f"did not start: {_first_line(str(exc))}"
                opts.log(f"  {leg.name}: {leg.error}\n{exc}")
                continue
            if isinstance(leg.proxy, targets.DbmtlsProxy):
                _honest_plane(leg, leg.proxy, opts)
        yield legs
    finally:
        for leg in legs:
            if leg.proxy is not None:
                leg.proxy.stop()


def _honest_plane(leg: Leg, proxy: targets.DbmtlsProxy, opts: Options) -> None:
    """A column asked for dataPlane native says so only if dbmtls's log says the database runs on it;
    a protocol the native plane does not relay runs on python (dbmtls logs why): the column is renamed."""
    ran = proxy.ran_plane()
    leg.info["ran_plane"] = ran
    if proxy.data_plane == "native" and ran != "native":
        old = leg.name
        leg.name = proxy.name = old.replace("dbmtls native", f"dbmtls native (ran {ran})", 1)
        opts.log(f"  {old}: dbmtls's log says this database is not on the native plane; column: {leg.name}")


def _rounds(
    suite: str,
    legs: list[Leg],
    loads: list[tuple[str, Callable[[Leg], Sample]]],
    opts: Options,
    before_load: Callable[[str], None] | None = None,
) -> None:
    for load, run in loads:
        if before_load is not None:
            before_load(load)
        for r in range(opts.repeat):
            live = [leg for leg in legs if leg.error is None]
            order = live[r % len(live) :] + live[: r % len(live)] if live else []
            for leg in order:
                try:
                    sample = run(leg)
                except RunError as exc:
                    sample = Sample(suite, load, leg.name, None, 0, None, str(exc))
                opts.samples.append(sample)
                cpu = f" cpu/100k={sample.cpu_per_100k:.2f}s" if sample.cpu_per_100k is not None else ""
                rate = f"{sample.rate:,.0f}/s" if sample.rate is not None else "-"
                err = f" ERROR {sample.error}" if sample.error else ""
                opts.log(f"  [{suite}] {load} #{r + 1} {leg.name}: {rate} ops={sample.ops}{cpu}{err}")


def _verify(legs: list[Leg], check: Callable[[Leg], Sample], opts: Options) -> None:
    """A small load through every path first: a target that errors is reported n/a, not measured."""
    for leg in legs:
        if leg.error is not None:
            continue
        try:
            s = check(leg)
        except RunError as exc:
            leg.error = str(exc)
        else:
            if s.error is not None:
                leg.error = s.error
        if leg.error is not None:
            opts.log(f"  {leg.name}: check failed, not measured: {leg.error}")
            if leg.proxy is not None:
                opts.log(f"    proxy log tail:\n{leg.proxy.service.tail(10)}")


def _not_measured(suite: str, legs: list[Leg], loads: list[str], opts: Options) -> None:
    for leg in legs:
        if leg.error is not None:
            for load in loads:
                opts.samples.append(Sample(suite, load, leg.name, None, 0, None, leg.error))


# ----------------------------------------------------------------------------------------------- Redis

REDIS_LOADS = [
    ("`-t get -c 50 -P 1`", ["-c", "50", "-P", "1"], 3),
    ("`-t get -c 50 -P 32`", ["-c", "50", "-P", "32"], 3),
    ("`-t get -c 4 -P 1 -d 65536`", ["-c", "4", "-P", "1"], 65536),
]
# -k 0: redis-benchmark closes the connection after every reply and opens a new one (with --tls, a
# full handshake each time: it does not resume sessions), so this load is the connection set-up cost.
REDIS_CONN_LOAD = ("`-t get -c 4 -k 0` (new connection per request)", ["-c", "4", "-P", "1", "-k", "0"], 3)
# redis-benchmark's GET reads this literal key (no -r): it must exist, or -d means nothing.
REDIS_KEY = b"key:__rand_int__"


def redis_suite(workdir: Path, pki: PKI, opts: Options) -> None:
    suite = "redis"
    server = Redis(workdir, pki)
    up = targets.Upstream(server.tls_port, "redis")
    tls_args = ["--tls", "--cert", pki.client.cert, "--key", pki.client.key, "--cacert", pki.ca_cert]
    legs = [
        Leg("plaintext, no TLS", ["-p", str(server.plain_port)]),
        Leg("direct TLS", ["-p", str(server.tls_port), *tls_args]),
    ]
    legs += _dbmtls_legs(workdir, pki, up, opts)
    legs += [
        Leg("stunnel", [], targets.stunnel(workdir, pki, up)),
        Leg("HAProxy", [], targets.haproxy(workdir, pki, up)),
        Leg("nginx", [], targets.nginx(workdir, pki, up)),
    ]
    legs = [leg for leg in legs if _wanted(opts, leg.name)]

    def bench(leg: Leg, load: str, args: list[str], n: int) -> Sample:
        client = leg.client or ["-p", str(leg.proxy.port if leg.proxy else 0)]
        cmd = ["redis-benchmark", "-h", "127.0.0.1", *client, "-t", "get", *args, "-n", str(n), "--csv"]
        stats0 = server.info_stats()
        cpu0 = cpu_of(leg.pids)
        out = _run(cmd, timeout=max(120.0, n / (20 if "-k" in args else 200)))
        cpu = cpu_of(leg.pids) - cpu0
        stats = server.info_stats()
        served = stats["keyspace_hits"] - stats0["keyspace_hits"]
        # A new connection per request must reach the server as one (a preconnect pool opens
        # them ahead, so up to its size may have been counted before the run).
        conns = stats["total_connections_received"] - stats0["total_connections_received"]
        conns_needed = n - opts.preconnect if "-k" in args else 0
        rate = None
        for row in csv.reader(io.StringIO(out.stdout)):
            if row and row[0] == "GET":
                rate = float(row[1])
        error = None
        if out.returncode != 0 or rate is None:
            error = f"redis-benchmark exit {out.returncode}: {_first_line(out.stderr or out.stdout)}"
        elif served < n:
            # Error replies (NOAUTH, a proxy's own message) count as "requests" in redis-benchmark.
            error = f"server answered {served} of {n} GETs with the value: {_first_line(out.stderr)}"
        elif conns < conns_needed:
            error = f"{n} requests on new connections reached the server on {conns} connections"
        elif "error" in out.stderr.lower():
            error = _first_line(out.stderr)
        return Sample(suite, load, leg.name, rate, n, cpu if leg.proxy else None, error)

    loads: list[tuple[str, Callable[[Leg], Sample]]] = []
    sizes: dict[str, int] = {}
    for (label, args, size), n in zip([*REDIS_LOADS, REDIS_CONN_LOAD], [*opts.redis_n, opts.redis_conn_n], strict=True):
        sizes[label] = size
        loads.append((label, lambda leg, label=label, args=args, n=n: bench(leg, label, args, n)))  # type: ignore[misc]
        command = " ".join(["redis-benchmark -t get", *args, "-n", str(n)])
        command += f" (the key holds {size} bytes)" if size > 3 else ""
        opts.loads.append(LoadInfo(suite, label, command, per_connection="-k" in args))

    def set_value(load: str) -> None:
        server.command(b"SET", REDIS_KEY, b"x" * sizes[load])

    try:
        server.start()
        with _started(legs, opts):
            set_value(REDIS_LOADS[0][0])
            _verify(legs, lambda leg: bench(leg, "check", ["-c", "10", "-P", "4"], 2000), opts)
            _record(suite, legs, opts)
            _not_measured(suite, legs, [ld[0] for ld in loads], opts)
            _rounds(suite, legs, loads, opts, before_load=set_value)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ PostgreSQL

PG_HBA = "local all all trust\nhostssl all all 127.0.0.1/32 cert clientcert=verify-full\n"
PG_USER, PG_DB = "jinsu", "bench"
_PG_NUM = {
    "processed": re.compile(r"number of transactions actually processed: (\d+)"),
    "failed": re.compile(r"number of failed transactions: (\d+)"),
    "tps": re.compile(r"^tps = ([\d.]+)", re.M),
}


def pg_suite(workdir: Path, pki: PKI, opts: Options) -> None:
    from support.pg_server import PostgresTLS

    suite = "pg"
    pg = PostgresTLS(pki.server, pki.ca_cert, hba=PG_HBA, max_connections=200)
    try:
        pg.start()
        pg.create_user(PG_USER, database=PG_DB)
        socket = ["-h", str(pg.sockdir), "-p", str(pg.port), "-U", PG_USER, PG_DB]
        init = _run(["pgbench", "-i", "-q", "-s", str(opts.pg_scale), *socket], timeout=600)
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {init.stderr}")
        up = targets.Upstream(pg.port, "postgres")

        def conn(port: int, extra: str = "") -> list[str]:
            return [f"host=127.0.0.1 port={port} user={PG_USER} dbname={PG_DB} {extra}".strip()]

        direct = f"sslmode=verify-full sslcert={pki.client.cert} sslkey={pki.client.key} sslrootcert={pki.ca_cert}"
        legs = [Leg("direct TLS", [f"host=localhost port={pg.port} user={PG_USER} dbname={PG_DB} {direct}"])]
        # The app on libpq's default sslmode (prefer): dbmtls answers its SSLRequest with N.
        legs += _dbmtls_legs(workdir, pki, up, opts)
        # stunnel's pgsql protocol cannot answer the app's own SSLRequest: the app must say sslmode=disable.
        stunnel = targets.stunnel(workdir, pki, up, protocol="pgsql")
        legs.append(Leg("stunnel (`protocol=pgsql`)", ["sslmode=disable"], stunnel))
        legs.append(Leg("PgBouncer", [], targets.pgbouncer(workdir, pki, up, db=PG_DB, user=PG_USER)))
        legs = [leg for leg in legs if _wanted(opts, leg.name)]

        def connstr(leg: Leg) -> list[str]:
            if leg.proxy is None:
                return leg.client
            return conn(leg.proxy.port, " ".join(leg.client))

        def bench(leg: Leg, load: str, args: list[str]) -> Sample:
            cmd = ["pgbench", "-n", *args, *connstr(leg)]
            cpu0 = cpu_of(leg.pids)
            out = _run(cmd, timeout=opts.pg_duration * 3 + 60)
            cpu = cpu_of(leg.pids) - cpu0
            got = {k: rx.search(out.stdout) for k, rx in _PG_NUM.items()}
            processed = int(got["processed"].group(1)) if got["processed"] else 0
            failed = int(got["failed"].group(1)) if got["failed"] else 0
            tps = float(got["tps"].group(1)) if got["tps"] else None
            error = None
            if out.returncode != 0 or failed or not processed or tps is None:
                error = f"pgbench exit {out.returncode}, {failed} failed: {_first_line(out.stderr)}"
            return Sample(suite, load, leg.name, tps, processed, cpu if leg.proxy else None, error)

        t = str(opts.pg_duration)
        pooled, churn = "pgbench `-S -c 8 -j 2`", "pgbench `-S -C -c 4 -j 2` (new connection per tx)"
        loads: list[tuple[str, Callable[[Leg], Sample]]] = [
            (pooled, lambda leg: bench(leg, pooled, ["-S", "-c", "8", "-j", "2", "-T", t])),
            (churn, lambda leg: bench(leg, churn, ["-S", "-C", "-c", "4", "-j", "2", "-T", t])),
        ]
        opts.loads.append(LoadInfo(suite, pooled, f"pgbench -n -S -c 8 -j 2 -T {t}", per_connection=False))
        opts.loads.append(LoadInfo(suite, churn, f"pgbench -n -S -C -c 4 -j 2 -T {t}", per_connection=True))
        with _started(legs, opts):
            _verify(legs, lambda leg: bench(leg, "check", ["-S", "-c", "2", "-j", "1", "-t", "50"]), opts)
            _record(suite, legs, opts)
            _not_measured(suite, legs, [ld[0] for ld in loads], opts)
            _rounds(suite, legs, loads, opts)
    finally:
        pg.stop()


# --------------------------------------------------------------------------------------------- MariaDB

_SLAP_AVG = re.compile(r"Average number of seconds to run all queries: ([\d.]+) seconds")
_SLAP_CLIENTS = re.compile(r"Number of clients running queries: (\d+)")
_SLAP_PER_CLIENT = re.compile(r"Average number of queries per client: (\d+)")
MYSQL_QUERY = "SELECT v FROM t WHERE id = 42"


MYSQL_USER, MYSQL_PASSWORD = "jinsu", "benchpw"
MYSQL_SETUP = """
CREATE USER 'jinsu'@'%' IDENTIFIED BY 'benchpw' REQUIRE X509;
GRANT ALL ON *.* TO 'jinsu'@'%';
CREATE DATABASE bench;
CREATE TABLE bench.t (id INT PRIMARY KEY, v VARCHAR(64));
USE bench;
INSERT INTO t SELECT seq, CONCAT('row ', seq) FROM seq_1_to_1000;
"""


RELAY_ONLY = "nginx L4 passthrough, client TLS"


def mysql_suite(workdir: Path, pki: PKI, opts: Options) -> None:
    from support.mariadb_server import MariaDB

    suite = "mysql"
    db = MariaDB(pki.server, pki.ca_cert)  # require_secure_transport; the user below needs a client cert

    def com_select() -> int:
        return int(db.sql("SHOW GLOBAL STATUS LIKE 'Com_select'").split()[-1])

    try:
        db.start()
        try:
            db.sql(MYSQL_SETUP)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"MariaDB set-up failed: {exc.stderr!r}") from None
        up = targets.Upstream(db.port, "mysql")
        tls = ["--ssl", f"--ssl-ca={pki.ca_cert}", f"--ssl-cert={pki.client.cert}", f"--ssl-key={pki.client.key}"]
        legs = [Leg("direct TLS", [f"--port={db.port}", *tls, "--ssl-verify-server-cert"])]
        # No TLS options at all: the app talks plaintext to dbmtls (MariaDB 10.11 clients default to no TLS).
        legs += _dbmtls_legs(workdir, pki, up, opts)
        # The floor of any relay: nginx copying the client's own TLS bytes, doing no TLS itself.
        # What a relay costs on this load even before it does any TLS (bench/README.md).
        relay = targets.nginx(workdir, pki, up, passthrough=True)
        legs.append(Leg(RELAY_ONLY, [f"--port={relay.port}", *tls, "--ssl-verify-server-cert"], relay))
        legs = [leg for leg in legs if _wanted(opts, leg.name)]

        def bench(leg: Leg, load: str, concurrency: int, queries: int, iterations: int) -> Sample:
            client = leg.client or [f"--port={leg.proxy.port if leg.proxy else 0}"]
            cmd = [
                "mariadb-slap", "--no-defaults", "--protocol=tcp", "--host=127.0.0.1", *client,
                f"--user={MYSQL_USER}", f"--password={MYSQL_PASSWORD}",
                "--create-schema=bench", "--no-drop", f"--query={MYSQL_QUERY}",
                f"--concurrency={concurrency}", f"--iterations={iterations}", f"--number-of-queries={queries}",
            ]  # fmt: skip
            before = com_select()
            cpu0 = cpu_of(leg.pids)
            started = time.monotonic()
            out = _run(cmd, timeout=300)
            wall = time.monotonic() - started
            cpu = cpu_of(leg.pids) - cpu0
            served = com_select() - before
            avg, clients, per = (rx.search(out.stdout) for rx in (_SLAP_AVG, _SLAP_CLIENTS, _SLAP_PER_CLIENT))
            error = None
            rate = None
            total = 0
            if out.returncode != 0 or not (avg and clients and per):
                error = f"mariadb-slap exit {out.returncode}: {_first_line(out.stderr or out.stdout)}"
            else:
                total = int(clients.group(1)) * int(per.group(1)) * iterations
                seconds = float(avg.group(1)) * iterations
                # mariadb-slap rounds its average per iteration to milliseconds: with a few ms per
                # iteration (the connection load) that is a 10-25 % error, so wall time is used
                # there (and for tiny runs); its start-up is the same for every column.
                rate = total / seconds if seconds >= 0.05 and iterations == 1 else total / wall
                if served < total:
                    error = f"server ran {served} of {total} SELECTs"
            return Sample(suite, load, leg.name, rate, total, cpu if leg.proxy else None, error)

        q, conns = opts.mysql_queries, opts.mysql_connects
        select_load = "mariadb-slap `-c 8` SELECT by primary key"
        connect_load = f"mariadb-slap `-c 4`, 1 query per connection ({conns} rounds)"
        loads: list[tuple[str, Callable[[Leg], Sample]]] = [
            (select_load, lambda leg: bench(leg, select_load, 8, q, 1)),
            (connect_load, lambda leg: bench(leg, connect_load, 4, 4, conns)),
        ]
        slap = f"mariadb-slap --query='{MYSQL_QUERY}'"
        opts.loads.append(LoadInfo(suite, select_load, f"{slap} -c 8 --number-of-queries={q}", per_connection=False))
        per_connection = f"{slap} -c 4 --number-of-queries=4 --iterations={conns}"
        opts.loads.append(LoadInfo(suite, connect_load, per_connection, per_connection=True))
        with _started(legs, opts):
            _verify(legs, lambda leg: bench(leg, "check", 2, 200, 1), opts)
            _record(suite, legs, opts)
            _not_measured(suite, legs, [ld[0] for ld in loads], opts)
            _rounds(suite, legs, loads, opts)
    finally:
        db.stop()


# ---------------------------------------------------------------------------------------------- memory

# How long after closing connections memory is read: dbmtls gives freed memory back to the kernel
# on a timer (dbmtls.memtrim.CHECK_INTERVAL, 5 s); every proxy gets the same wait.
MEM_SETTLE = 8.0
MEM_CHURN_CONCURRENCY = 4


@dataclass
class MemSample:
    """One proxy's memory (RSS of its process tree, KiB): idle connections, then churn."""

    database: str  # redis | pg
    target: str
    start_kib: int = 0  # after one connection, nothing open
    idle: int = 0  # connections held open (each ran one request)
    idle_kib: int = 0  # with them open
    closed_kib: int = 0  # MEM_SETTLE s after closing them
    churn: int = 0  # short connections (connect, one request, close), after that
    churn_peak_kib: int = 0  # the highest reading during the churn
    churned_kib: int = 0  # MEM_SETTLE s after the churn
    error: str | None = None

    @property
    def kib_per_idle(self) -> float:
        return (self.idle_kib - self.start_kib) / self.idle if self.idle else 0.0


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _memory_of(database: str, leg: Leg, target: churn.Target, idle: int, n: int, opts: Options) -> MemSample:
    sample = MemSample(database, leg.name, idle=idle, churn=n)
    assert leg.proxy is not None
    pid = leg.proxy.pids[0]
    try:
        target.once()  # whatever a proxy builds on its first connection
        held = churn.idle(target, idle, pid, tree=True, later=MEM_SETTLE)
        sample.start_kib, sample.idle_kib, sample.closed_kib = held.before_kib, held.open_kib, held.later_kib
        points = churn.churn(target, n, pid, concurrency=MEM_CHURN_CONCURRENCY, every=max(1, n // 20), tree=True)
        sample.churn_peak_kib = max(p.rss_kib for p in points)
        sample.churned_kib = churn.settle(pid, seconds=MEM_SETTLE, tree=True)
    except Exception as exc:  # one proxy that fails must not lose the others' numbers
        sample.error = _first_line(str(exc)) or type(exc).__name__
    opts.log(
        f"  [memory/{database}] {leg.name}: start {_mib(sample.start_kib)}, {idle} idle "
        f"{sample.kib_per_idle:.1f} KiB each, closed {_mib(sample.closed_kib)}, {n} short connections: "
        f"peak {_mib(sample.churn_peak_kib)}, after {_mib(sample.churned_kib)}"
        + (f" ERROR {sample.error}" if sample.error else "")
    )
    return sample


def memory_suite(workdir: Path, pki: PKI, opts: Options) -> None:
    """Idle connections and churn, one proxy at a time: Redis (dbmtls, stunnel, HAProxy, nginx) and
    PostgreSQL (dbmtls, stunnel's pgsql protocol, PgBouncer).  Each proxy gets room for the idle
    connections (HAProxy maxconn, nginx worker_connections, PgBouncer pool size)."""
    (redis_idle, pg_idle), (redis_n, pg_n) = opts.mem_idle, opts.mem_churn
    server = Redis(workdir, pki, maxclients=redis_idle * 2 + 1000)
    up = targets.Upstream(server.tls_port, "redis")
    legs = [
        *_dbmtls_legs(workdir, pki, up, opts),
        Leg("stunnel", [], targets.stunnel(workdir, pki, up)),
        Leg("HAProxy", [], targets.haproxy(workdir, pki, up, maxconn=redis_idle * 2 + 1000)),
        Leg("nginx", [], targets.nginx(workdir, pki, up, worker_connections=redis_idle * 4 + 1000)),
    ]
    legs = [leg for leg in legs if _wanted(opts, leg.name)]
    try:
        server.start()
        _measure_memory("redis", legs, lambda port: churn.Target("redis", port), redis_idle, redis_n, opts)
    finally:
        server.stop()

    from support.pg_server import PostgresTLS

    pg = PostgresTLS(pki.server, pki.ca_cert, hba=churn.PG_HBA, max_connections=pg_idle * 2 + 50)
    try:
        pg.start()
        pg.create_user(churn.USER, database=churn.PG_DATABASE)
        up = targets.Upstream(pg.port, "postgres")
        bouncer = targets.pgbouncer(workdir, pki, up, db=churn.PG_DATABASE, user=churn.USER, pool_size=pg_idle + 10)
        legs = [
            *_dbmtls_legs(workdir, pki, up, opts),
            # the app must say sslmode=disable to stunnel's pgsql protocol (see the pg suite)
            Leg("stunnel (`protocol=pgsql`)", ["sslmode=disable"], targets.stunnel(workdir, pki, up, protocol="pgsql")),
            Leg("PgBouncer", [], bouncer),
        ]
        legs = [leg for leg in legs if _wanted(opts, leg.name)]
        _measure_memory("pg", legs, lambda port: churn.target_for("postgres", port), pg_idle, pg_n, opts)
    finally:
        pg.stop()


@contextlib.contextmanager
def _libpq_env(settings: list[str]) -> Iterator[None]:
    """libpq reads PGSSLMODE at every connect: the memory suite's clients (psycopg, on libpq's
    defaults) get a leg's ``sslmode=...`` this way, for that leg only."""
    modes = [s.split("=", 1)[1] for s in settings if s.startswith("sslmode=")]
    if not modes:
        yield
        return
    old = os.environ.get("PGSSLMODE")
    os.environ["PGSSLMODE"] = modes[0]
    try:
        yield
    finally:
        if old is None:
            del os.environ["PGSSLMODE"]
        else:
            os.environ["PGSSLMODE"] = old


def _measure_memory(
    database: str, legs: list[Leg], target_at: Callable[[int], churn.Target], idle: int, n: int, opts: Options
) -> None:
    """One proxy at a time (the others are not even running); a proxy that does not start still gets
    its column, as an error, so every target of the run is in the table."""
    for leg in legs:
        with _started([leg], opts), _libpq_env(leg.client):
            if leg.error is None and leg.proxy is not None:
                opts.mem_samples.append(_memory_of(database, leg, target_at(leg.proxy.port), idle, n, opts))
            else:
                opts.mem_samples.append(MemSample(database, leg.name, idle=idle, churn=n, error=leg.error))
        _record(f"memory/{database}", [leg], opts)


SUITES: dict[str, Callable[[Path, PKI, Options], None]] = {
    "redis": redis_suite,
    "pg": pg_suite,
    "mysql": mysql_suite,
    "memory": memory_suite,
}
