"""Side-by-side benchmarks: dbmtls against stunnel, HAProxy, nginx and PgBouncer on this machine.

    .venv/bin/python bench/run.py [--suite redis,pg,mysql,memory] [--repeat N] [--metrics off|on|both]
                                  [--plane python|native|both] [--resumption on|off|both] [--preconnect N]
                                  [--redis-n 100000,1000000,15000] [--redis-conn-n 1500] [--duration 6]
                                  [--mysql-queries 40000] [--mem-idle 2000,200] [--mem-churn 20000,2000]
                                  [--scale 0.1] [--only dbmtls,stunnel] [--out bench/results/<ts>.md] [--keep]
                                  [--charts [--charts-out docs/bench]]

Everything generated (PKI, configs, data directories, logs) lives in one temp
dir, removed at the end unless --keep.  Results are printed as Markdown and
written under bench/results/ (gitignored), with the same results as JSON next
to it (<ts>.json: medians, every sample and the conditions), which
bench/charts.py draws.  See bench/README.md for what the columns mean and the
caveats.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _versions() -> dict[str, str]:
    """Each server's, proxy's and load generator's version line, and dbmtls's own."""
    probes = [
        ("dbmtls", [sys.executable, "-m", "dbmtls", "version"]),
        ("redis-server", ["redis-server", "--version"]),
        ("postgres", ["/usr/lib/postgresql/15/bin/postgres", "--version"]),
        ("mariadbd", ["mariadbd", "--version"]),
        ("stunnel", ["stunnel4", "-version"]),
        ("haproxy", ["haproxy", "-v"]),
        ("nginx", ["nginx", "-v"]),
        ("pgbouncer", ["pgbouncer", "--version"]),
        ("redis-benchmark", ["redis-benchmark", "--version"]),
        ("pgbench", ["pgbench", "--version"]),
        ("mariadb-slap", ["mariadb-slap", "--version"]),
    ]
    out = {}
    for name, cmd in probes:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (p.stdout + p.stderr).splitlines()
        line = next((ln for ln in text if any(ch.isdigit() for ch in ln) and "inetd" not in ln), "")
        out[name] = line.strip()
    out["python"] = platform.python_version()
    out["python ssl"] = ssl.OPENSSL_VERSION
    try:
        from dbmtls import _native  # type: ignore[attr-defined]

        out["dbmtls native plane"] = str(_native.OPENSSL_VERSION)
    except ImportError as exc:
        out["dbmtls native plane"] = f"not available: {exc}"
    return out


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="redis,pg,mysql", help="comma-separated: redis, pg, mysql, memory")
    p.add_argument("--repeat", type=int, default=3, help="runs per (load, target); medians are reported")
    p.add_argument(
        "--metrics",
        choices=["off", "on", "both"],
        default="off",
        help="dbmtls with --admin off, with the admin/metrics server on, or both as two columns",
    )
    p.add_argument(
        "--plane",
        choices=["python", "native", "both"],
        default="python",
        help="dbmtls's dataPlane in every suite (both: two columns; a protocol the native plane does not "
        "relay yet runs on python, and its column says so; docs/native.md)",
    )
    p.add_argument(
        "--resumption",
        choices=["default", "on", "off", "both"],
        default="default",
        help="dbmtls's tls.sessionResumption: default writes nothing (dbmtls's default); on/off write "
        "true/false (columns '+resume'/'-resume'); both: two columns",
    )
    p.add_argument(
        "--preconnect",
        type=int,
        default=0,
        help="N > 0: also a dbmtls column with preconnect: {connections: N, maxIdle: 30s} ('+poolN'); 0: none",
    )
    p.add_argument(
        "--redis-n", default="100000,1000000,15000", help="redis-benchmark -n of the 3 loads (-P 1, -P 32, -d 65536)"
    )
    p.add_argument(
        "--redis-conn-n", type=int, default=1500, help="redis-benchmark -n of the new-connection-per-request load"
    )
    p.add_argument("--duration", type=int, default=6, help="pgbench -T seconds per run")
    p.add_argument("--pg-scale", type=int, default=10, help="pgbench -i -s")
    p.add_argument("--mysql-queries", type=int, default=40000, help="mariadb-slap --number-of-queries (SELECT load)")
    p.add_argument("--mysql-connects", type=int, default=150, help="mariadb-slap --iterations (connection load)")
    p.add_argument("--mem-idle", default="2000,200", help="memory suite: idle connections held (Redis, PostgreSQL)")
    p.add_argument("--mem-churn", default="20000,2000", help="memory suite: short connections then (Redis, PostgreSQL)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply request counts and durations (0.1: quick check)")
    p.add_argument("--only", default="", help="comma-separated target names to run (e.g. dbmtls,stunnel)")
    p.add_argument("--out", default=None, help="Markdown output file (default bench/results/<timestamp>.md)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--charts", action="store_true", help="draw the PNG charts from this run (bench/charts.py)")
    p.add_argument("--charts-out", default=str(ROOT / "docs" / "bench"), help="where --charts writes the PNGs")
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    # bench/ and tests/support/ are imported as packages from the repository root.
    for path in (ROOT, ROOT / "tests"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from bench import report
    from bench.suites import SUITES, Options, preflight

    from support.certs import make_pki

    args = _parse(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        print(f"unknown suite(s): {', '.join(unknown)}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    n = [max(100, int(int(x) * args.scale)) for x in args.redis_n.split(",")]
    if len(n) != 3:
        print("--redis-n takes three numbers", file=sys.stderr)
        return 2
    mem_idle = [max(10, int(int(x) * args.scale)) for x in args.mem_idle.split(",")]
    mem_churn = [max(100, int(int(x) * args.scale)) for x in args.mem_churn.split(",")]
    if len(mem_idle) != 2 or len(mem_churn) != 2:
        print("--mem-idle and --mem-churn take two numbers (Redis, PostgreSQL)", file=sys.stderr)
        return 2
    if args.preconnect < 0:
        print("--preconnect takes a number of connections (0: none)", file=sys.stderr)
        return 2
    resumption: tuple[bool | None, ...] = {"default": (None,), "on": (True,), "off": (False,), "both": (False, True)}[
        args.resumption
    ]
    opts = Options(
        repeat=args.repeat,
        metrics=args.metrics,
        planes=("python", "native") if args.plane == "both" else (args.plane,),
        resumption=resumption,
        preconnect=args.preconnect,
        only=tuple(o.strip() for o in args.only.split(",") if o.strip()),
        redis_n=(n[0], n[1], n[2]),
        redis_conn_n=max(100, int(args.redis_conn_n * args.scale)),
        pg_duration=max(1, round(args.duration * args.scale)),
        pg_scale=args.pg_scale,
        mysql_queries=max(100, int(args.mysql_queries * args.scale)),
        mysql_connects=max(5, int(args.mysql_connects * args.scale)),
        mem_idle=(mem_idle[0], mem_idle[1]),
        mem_churn=(mem_churn[0], mem_churn[1]),
        log=lambda line: print(line, flush=True),
    )
    problem = preflight(suites, opts)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{stamp}.md"
    workdir = Path(tempfile.mkdtemp(prefix="dbmtls-bench-"))
    started = time.monotonic()
    load_before = os.getloadavg()
    failures: list[str] = []
    suite_seconds: dict[str, float] = {}
    try:
        pki = make_pki(workdir / "pki")
        for name in suites:
            print(f"== {name}", flush=True)
            suite_started = time.monotonic()
            try:
                SUITES[name](workdir, pki, opts)
            except Exception as exc:  # one broken suite must not lose the others' numbers
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"suite {name} failed: {exc}", file=sys.stderr, flush=True)
            suite_seconds[name] = round(time.monotonic() - suite_started, 1)
    finally:
        if args.keep:
            print(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - started
    load_after = os.getloadavg()
    versions = _versions()
    options = {
        "suites": suites,
        "repeat": opts.repeat,
        "scale": args.scale,
        "metrics": opts.metrics,
        "planes": list(opts.planes),
        "resumption": args.resumption,
        "preconnect": opts.preconnect,
        "redis_n": list(opts.redis_n),
        "redis_conn_n": opts.redis_conn_n,
        "pg_duration_s": opts.pg_duration,
        "pg_scale": opts.pg_scale,
        "mysql_queries": opts.mysql_queries,
        "mysql_connects": opts.mysql_connects,
        "mem_idle": list(opts.mem_idle),
        "mem_churn": list(opts.mem_churn),
        "only": list(opts.only),
    }
    parts = [
        f"# dbmtls side-by-side benchmark, {stamp}",
        "",
        f"- host: {platform.node()}, {_cpu_model()}, {os.cpu_count()} CPUs, load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f}; took {elapsed:.0f}s ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in suite_seconds.items())
        + ")",
        f"- options: suites={','.join(suites)} repeat={opts.repeat} scale={args.scale:g} metrics={opts.metrics} "
        f"planes={','.join(opts.planes)} resumption={args.resumption} preconnect={opts.preconnect} "
        f"redis -n={list(opts.redis_n)} new-connection -n={opts.redis_conn_n} "
        f"pgbench -T={opts.pg_duration}s scale={opts.pg_scale} mysql queries={opts.mysql_queries} "
        f"connects={opts.mysql_connects}"
        + (f" memory idle={list(opts.mem_idle)} churn={list(opts.mem_churn)}" if "memory" in suites else ""),
        *(f"- {k}: {v}" for k, v in versions.items()),
        "",
        "Medians over the repeats. Proxy CPU = user+system seconds of the proxy process(es) over the run, "
        "per 100,000 operations. Compare ratios within this run only (see bench/README.md).",
    ]
    for name in suites:
        table = report.memory_tables(opts.mem_samples) if name == "memory" else report.suite_table(name, opts.samples)
        if table:
            parts += ["", f"## {name}", "", table]
            cmp = report.comparison(name, opts.samples, opts.loads)
            if cmp:
                parts += ["", *cmp]
    if failures:
        parts += ["", "## suites that failed", "", *(f"- {f}" for f in failures)]
    if opts.not_for:
        parts += ["", "## dbmtls columns left out", ""]
        parts += [f"- {label}, {protocol}: {why}" for (protocol, label), why in opts.not_for.items()]
    if opts.samples:
        parts += ["", "## every run", "", report.raw_runs(opts.samples)]
    parts.append("")
    text = "\n".join(parts)
    print()
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")

    results = {
        "schema": 1,
        "run": {
            "stamp": stamp,
            "date": now.isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpu_model": _cpu_model(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after],
            "elapsed_s": round(elapsed, 1),
            "suite_s": suite_seconds,
            "options": options,
            "versions": versions,
            "failures": failures,
            "left_out": [{"protocol": p, "column": c, "why": w} for (p, c), w in opts.not_for.items()],
            "markdown": out.name,
        },
        "suites": {
            name: report.memory_json(opts) if name == "memory" else report.suite_json(name, opts) for name in suites
        },
    }
    json_out = out.with_suffix(".json")
    json_out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {json_out}")
    if args.charts:
        from bench.charts import draw

        for png in draw(results, Path(args.charts_out)):
            print(f"chart: {png}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
