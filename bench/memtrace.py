"""Where does dbmtls's memory go under connection churn?  dbmtls in this process, traced.

    .venv/bin/python bench/memtrace.py                          # redis: 2000 warm-up + 3000 traced
    .venv/bin/python bench/memtrace.py --protocol pg -n 1000 --warmup 500
    .venv/bin/python bench/memtrace.py --frames 12 --top 20     # deeper tracebacks, more lines
    .venv/bin/python bench/memtrace.py --plane native --idle 2000   # dataPlane: native

The proxy (``dbmtls.proxy.server.Proxy`` on uvloop, as ``dbmtls run`` runs it) runs in the main
thread of this process; the clients (``tests/support/churn.py``) run in a worker thread and do
connect + one request + close, sequentially.  After the warm-up and after the traced
connections it prints:

* RSS and the allocator's view (``sys._debugmallocstats`` is too verbose; tracemalloc's
  traced total is shown instead);
* live objects of the per-connection types (SSL protocol and transport, SSLObject, MemoryBIO,
  Endpoint, Relay, Conn, tasks, futures, timer handles), counted by type name in
  ``gc.get_objects()`` before and after a full ``gc.collect()``: what the collection frees
  was garbage held only by reference cycles, what stays is really referenced;
* the tracemalloc difference between the two points, grouped by traceback.

Nothing in the product is changed or hooked: this is an ordinary ``Proxy`` in an ordinary loop.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import json
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import uvloop  # noqa: E402
from bench.churn import PROTOCOLS, server  # noqa: E402
from bench.procs import free_port  # noqa: E402

from dbmtls.config.load import load_config  # noqa: E402
from dbmtls.logs import setup_logging  # noqa: E402
from dbmtls.proxy.server import Proxy  # noqa: E402
from support import churn  # noqa: E402
from support.certs import make_pki  # noqa: E402

# Type names counted in gc.get_objects(): the per-connection objects of the proxy and its loop.
WATCHED = (
    "SSLProtocol",
    "_SSLProtocolTransport",
    "SSLObject",
    "MemoryBIO",
    "TCPTransport",
    "_Accepted",
    "Endpoint",
    "Relay",
    "_Half",
    "_Tap",
    "Conn",
    "AnswerRequests",
    "Reply",
    "Task",
    "Future",
    "TimerHandle",
    "Timeout",
    "frame",
    "traceback",
    "cell",
    "function",
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_info() -> str:
    """glibc's view: bytes in use (heap + mmapped) and free bytes it keeps in the heap."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return "malloc stats n/a"
    fn.restype = _MallInfo2
    m = fn()
    return f"malloc in use {(m.uordblks + m.hblkhd) / 2**20:.1f} MB, free in heap {m.fordblks / 2**20:.1f} MB"


def counts() -> collections.Counter[str]:
    c: collections.Counter[str] = collections.Counter()
    for o in gc.get_objects():
        name = type(o).__name__
        if name in WATCHED:
            c[name] += 1
    return c


def show_counts(label: str, before: collections.Counter[str], after: collections.Counter[str]) -> None:
    print(f"  live objects {label} (before gc.collect -> after):")
    for name in WATCHED:
        if before[name] or after[name]:
            print(f"    {name:<22} {before[name]:>7} -> {after[name]:>7}")


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    pki = make_pki(workdir / "pki")
    protocol = PROTOCOLS[args.protocol]
    with server(protocol, workdir, pki) as server_port:
        port = free_port()
        cfg = workdir / "dbmtls.yaml"
        database = churn.dbmtls_database(protocol, port, server_port, pki)
        cfg.write_text(json.dumps({"dataPlane": args.plane, "databases": [database]}))
        proxy = Proxy(load_config([cfg]))
        await proxy.start()
        loop = asyncio.get_running_loop()
        target = churn.target_for(protocol, port)
        pid = __import__("os").getpid()

        async def run(n: int) -> None:
            await loop.run_in_executor(None, lambda: churn.churn(target, n, pid, every=0, concurrency=args.concurrency))
            await asyncio.sleep(args.settle)  # relays linger after the app's EOF (HALF_CLOSE_LINGER)

        async def report(label: str) -> tracemalloc.Snapshot:
            before = counts()
            rss_before = churn.rss_kib(pid)
            freed = gc.collect() if args.collect else 0
            after = counts() if args.collect else before
            snap = tracemalloc.take_snapshot()  # after the collection: what cycles held is not in it
            print(
                f"== {label}: rss {rss_before / 1024:.1f} MB ({churn.rss_kib(pid) / 1024:.1f} MB after gc), traced "
                f"{tracemalloc.get_traced_memory()[0] / 1024 / 1024:.1f} MB, {malloc_info()}, "
                f"gc.collect() freed {freed} objects, "
                f"gc counts {gc.get_count()}",
                flush=True,
            )
            show_counts(label, before, after)
            if args.trim:
                print(f"  {trim(pid)}")
            return snap

        await run(args.warmup)
        first = await report(f"after {args.warmup} warm-up connections")
        await run(args.n)
        second = await report(f"after {args.n} more")
        filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib*")]
        stats = second.filter_traces(filters).compare_to(first.filter_traces(filters), "traceback")
        print(f"== tracemalloc: top {args.top} growths between the two points, per connection")
        for st in stats[: args.top]:
            print(
                f"  {st.size_diff / args.n:+9.0f} B/conn  {st.count_diff / args.n:+6.2f} blocks/conn  "
                f"(total {st.size_diff / 1024:+.0f} KiB, {st.count_diff:+d} blocks)"
            )
            for line in st.traceback.format(limit=args.frames, most_recent_first=True):
                print(f"      {line}")
        if args.idle:
            await idle(args, target, pid)
        proxy.close_all()
        await proxy.drain(1)


async def idle(args: argparse.Namespace, target: churn.Target, pid: int) -> None:
    """Hold ``args.idle`` connections open: RSS and traced memory per connection, then close them."""
    loop = asyncio.get_running_loop()
    gc.collect()
    await asyncio.sleep(args.settle)
    rss0, traced0 = churn.rss_kib(pid), tracemalloc.get_traced_memory()[0]
    snap0 = tracemalloc.take_snapshot()
    conns = await loop.run_in_executor(None, lambda: [target.open() for _ in range(args.idle)])
    await asyncio.sleep(args.settle)
    rss1, traced1 = churn.rss_kib(pid), tracemalloc.get_traced_memory()[0]
    snap1 = tracemalloc.take_snapshot()
    m = args.idle
    print(
        f"== {m} idle connections: rss +{(rss1 - rss0) / m:.1f} KiB each, traced by tracemalloc "
        f"+{(traced1 - traced0) / 1024 / m:.1f} KiB each (Python objects and PyMem_RawMalloc, not OpenSSL)"
    )
    for st in snap1.compare_to(snap0, "traceback")[: args.top]:
        print(f"  {st.size_diff / m:+9.0f} B/conn  {st.count_diff / m:+6.2f} blocks/conn")
        for line in st.traceback.format(limit=args.frames, most_recent_first=True):
            print(f"      {line}")
    counted = counts()
    show_counts("while idle", counted, counted)
    if args.trim:
        print(f"  while they are open, {trim(pid)}")

    def close_them() -> None:
        for c in conns:
            c.close()
        conns.clear()

    await loop.run_in_executor(None, close_them)
    await asyncio.sleep(args.settle * 2)
    rss2 = churn.rss_kib(pid)
    print(f"== closed them: rss {rss0 / 1024:.1f} MB before, {rss1 / 1024:.1f} MB open, {rss2 / 1024:.1f} MB closed")
    if args.trim:
        print(f"== {trim(pid)}")


def trim(pid: int) -> str:
    """glibc's malloc_trim(0): give the free pages inside the heap back to the kernel."""
    started = time.perf_counter()
    ctypes.CDLL(None).malloc_trim(0)
    took = time.perf_counter() - started
    return f"malloc_trim(0): rss {churn.rss_kib(pid) / 1024:.1f} MB ({took * 1000:.1f} ms), {malloc_info()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="redis", choices=sorted(PROTOCOLS))
    p.add_argument("-n", type=int, default=3000, help="connections between the two snapshots")
    p.add_argument("--warmup", type=int, default=2000, help="connections before the first snapshot")
    p.add_argument("--concurrency", type=int, default=1, help="clients at a time")
    p.add_argument("--frames", type=int, default=8, help="traceback depth recorded by tracemalloc")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait after each phase")
    p.add_argument("--idle", type=int, default=0, help="then hold this many connections open, and close them")
    p.add_argument("--plane", choices=("python", "native"), default="python", help="dbmtls's dataPlane")
    p.add_argument(
        "--trim",
        action="store_true",
        help="call glibc malloc_trim(0) at each report point (and after closing the idle ones)",
    )
    p.add_argument(
        "--no-collect", dest="collect", action="store_false", help="do not gc.collect() at the report points"
    )
    args = p.parse_args(argv)
    setup_logging("warning")
    tracemalloc.start(args.frames)
    workdir = Path(tempfile.mkdtemp(prefix="dbmtls-memtrace-"))
    try:
        uvloop.run(main_async(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
