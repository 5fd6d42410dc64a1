"""Syscalls and CPU time per request of each relay, counted by the kernel (``perf stat``).

    .venv/bin/python bench/percall.py                  # redis-benchmark -t get -c 50 -P 1, 200k requests
    .venv/bin/python bench/percall.py --load "-c 4 -P 1 -d 65536" -n 50000

Why: throughput on a 2-core machine moves 10-20 % between repeats of one target (three busy
processes share two cores), so it cannot say whether a relay does more work per request than
another.  The kernel's counters can: ``raw_syscalls:sys_enter`` (every syscall), ``task-clock``
(CPU time of every thread) and ``context-switches``, for the relay's processes only, divided by
the requests of one run.  Each relay runs twice, interleaved.  Needs ``perf`` (Debian:
``linux-perf``) and root or ``kernel.perf_event_paranoid`` <= 0.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench import targets  # noqa: E402
from bench.servers import Redis  # noqa: E402
from bench.suites import REDIS_KEY  # noqa: E402

from support.certs import make_pki  # noqa: E402

EVENTS = ("raw_syscalls:sys_enter", "task-clock", "context-switches")


def _pids(proxy: targets.Proxy) -> list[int]:
    """The proxy's processes: nginx's worker is a child of its master."""
    out = list(proxy.pids)
    for pid in proxy.pids:
        kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        out += [int(k) for k in kids]
    return out


def _bench(port: int, load: list[str], n: int) -> float:
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "get", *load, "-n", str(n), "--csv"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1].split(",")[1].strip('"'))


def measure(proxy: targets.Proxy, load: list[str], n: int) -> tuple[float, dict[str, float]]:
    """req/s, and each counter per request, over one run of ``n`` requests."""
    _bench(proxy.port, load, max(1000, n // 10))  # warm: connections, sessions, caches
    pids = ",".join(str(p) for p in _pids(proxy))
    perf = subprocess.Popen(
        ["perf", "stat", "-x,", "-e", ",".join(EVENTS), "-p", pids], stderr=subprocess.PIPE, text=True
    )
    try:
        rate = _bench(proxy.port, load, n)
    finally:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate()
    counts: dict[str, float] = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in EVENTS:
            with contextlib.suppress(ValueError):  # "<not supported>"
                counts[fields[2]] = float(fields[0]) / n
    return rate, counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", default="-c 50 -P 1", help="redis-benchmark options (default: %(default)s)")
    p.add_argument("-n", type=int, default=200_000, help="requests per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs per relay (default: %(default)s)")
    args = p.parse_args(argv)
    if not shutil.which("perf"):
        print("perf is not installed (Debian: apt-get install linux-perf)", file=sys.stderr)
        return 2
    load = shlex.split(args.load)
    work = Path(tempfile.mkdtemp(prefix="dbmtls-percall-"))
    pki = make_pki(work / "pki")
    server = Redis(work, pki).start()
    try:
        server.command(b"SET", REDIS_KEY, b"x" * 3)
        up = targets.Upstream(server.tls_port, "redis")
        proxies = [
            targets.dbmtls(work, pki, up, label="dbmtls native", data_plane="native"),
            targets.nginx(work, pki, up),
            targets.haproxy(work, pki, up),
        ]
        print(f"redis-benchmark -t get {args.load} -n {args.n}; per request: syscalls, CPU us, context switches")
        for _ in range(args.rounds):
            for proxy in proxies:
                proxy.start()
                try:
                    rate, c = measure(proxy, load, args.n)
                finally:
                    proxy.stop()
                nan = float("nan")
                print(
                    f"  {proxy.name:14s} {rate:>10,.0f} req/s  {c.get('raw_syscalls:sys_enter', nan):5.2f} syscalls"
                    f"  {c.get('task-clock', nan) * 1000:6.2f} us  {c.get('context-switches', nan):5.3f} cs"
                )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
