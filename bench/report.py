"""Markdown tables from the samples: medians per (load, target), laid out like the anchors table."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from bench.suites import MEM_CHURN_CONCURRENCY, MEM_SETTLE, PER_CONNECTION_GOAL, LoadInfo, MemSample, Options, Sample

MEMORY_DATABASES = {"redis": "Redis", "pg": "PostgreSQL"}
UNITS = {"redis": ("req/s", "req"), "pg": ("tps", "tx"), "mysql": ("queries/s", "queries")}
# Relays that, like dbmtls, open one server connection per client connection; PgBouncer pools
# server connections, so it is compared separately (it wins any new-connection-per-transaction load).
RELAYS = ("stunnel", "HAProxy", "nginx")
POOLERS = ("PgBouncer",)


def kind_of(target: str) -> str:
    """What a column is, for the comparisons and the charts: dbmtls, relay, pooler, direct, plaintext."""
    if target.startswith("dbmtls"):
        return "dbmtls"
    if "passthrough" in target:  # copies the client's own TLS bytes: the floor, not a rival doing TLS
        return "passthrough"
    if target.startswith(RELAYS):
        return "relay"
    if target.startswith(POOLERS):
        return "pooler"
    if target == "direct TLS":
        return "direct"
    return "plaintext" if target.startswith("plaintext") else "other"


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return ""
    return f"{v:,.{digits}f}"


def _ordered(items: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for i in items:
        if i not in seen:
            seen.append(i)
    return seen


def suite_table(suite: str, samples: list[Sample]) -> str:
    mine = [s for s in samples if s.suite == suite]
    if not mine:
        return ""
    rate_unit, op_unit = UNITS[suite]
    loads = _ordered(s.load for s in mine)
    cols = _ordered(s.target for s in mine)
    lines = ["| load | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for load in loads:
        rate_row, cpu_row = [f"{load} {rate_unit}"], [f"... proxy CPU s / 100k {op_unit}"]
        for col in cols:
            runs = [s for s in mine if s.load == load and s.target == col]
            good = [s for s in runs if s.error is None]
            if not good:
                rate_row.append("n/a (error)" if runs else "")
                cpu_row.append("")
                continue
            flag = f" ({len(runs) - len(good)} failed)" if len(good) < len(runs) else ""
            rate_row.append(_fmt(_median(s.rate for s in good)) + flag)
            cpu = _median(s.cpu_per_100k for s in good)
            # pipelined loads cost a few hundredths of a second per 100k: a third digit tells them apart
            cpu_row.append(_fmt(cpu, 2 if cpu is None or cpu >= 0.1 else 3))
        lines.append("| " + " | ".join(rate_row) + " |")
        if any(c for c in cpu_row[1:]):
            lines.append("| " + " | ".join(cpu_row) + " |")
    return "\n".join(lines)


def comparison(suite: str, samples: list[Sample], loads: Sequence[LoadInfo] = ()) -> list[str]:
    """dbmtls's medians as ratios to the best other proxy in the same run (the number that travels);
    on a new-connection-per-transaction load, also against the goal of PER_CONNECTION_GOAL x direct TLS."""
    per_connection = {ld.name for ld in loads if ld.suite == suite and ld.per_connection}
    out = []
    mine = [s for s in samples if s.suite == suite and s.error is None]
    for load in _ordered(s.load for s in mine):

        def med(target: str, attr: str, load: str = load) -> float | None:
            return _median(getattr(s, attr) for s in mine if s.load == load and s.target == target)

        names = _ordered(s.target for s in mine)
        relays = [t for t in names if kind_of(t) == "relay"]
        passthroughs = [t for t in names if kind_of(t) == "passthrough"]
        poolers = [t for t in names if t.startswith(POOLERS)]
        for me in [t for t in names if t.startswith("dbmtls")]:
            rate, mine_cpu = med(me, "rate"), med(me, "cpu_per_100k")
            if rate is None:
                continue
            parts = []
            best_rate = max(((med(o, "rate") or 0.0, o) for o in relays), default=(0.0, ""))
            if best_rate[0]:
                parts.append(f"{rate / best_rate[0]:.2f}x the throughput of the fastest relay ({best_rate[1]})")
            cpus = [(c, o) for o in relays if (c := med(o, "cpu_per_100k")) is not None]
            if cpus and mine_cpu is not None:
                c, o = min(cpus)
                parts.append(f"{mine_cpu / c:.2f}x the CPU per 100k of the leanest relay ({o})")
            for t in passthroughs:
                t_rate, t_cpu = med(t, "rate"), med(t, "cpu_per_100k")
                if t_rate:
                    cpu = f", {mine_cpu / t_cpu:.2f}x its CPU per 100k" if t_cpu and mine_cpu is not None else ""
                    parts.append(f"{rate / t_rate:.2f}x the throughput of {t}{cpu}")
            for p in poolers:
                p_rate, p_cpu = med(p, "rate"), med(p, "cpu_per_100k")
                if p_rate:
                    cpu = f", {mine_cpu / p_cpu:.2f}x its CPU per 100k" if p_cpu and mine_cpu is not None else ""
                    parts.append(f"{rate / p_rate:.2f}x the throughput of {p}{cpu}")
            direct = med("direct TLS", "rate")
            if direct:
                goal = ""
                if load in per_connection:
                    met = "met" if rate / direct >= PER_CONNECTION_GOAL else "not met"
                    goal = f" (goal {PER_CONNECTION_GOAL:g}x: {met})"
                parts.append(f"{rate / direct:.2f}x direct TLS{goal}")
            if parts:
                out.append(f"- {load}, {me}: " + "; ".join(parts))
    return out


def raw_runs(samples: list[Sample]) -> str:
    lines = ["| suite | load | target | rate | ops | proxy CPU s | CPU s / 100k | error |", "|---" * 8 + "|"]
    for s in samples:
        lines.append(
            f"| {s.suite} | {s.load} | {s.target} | {_fmt(s.rate)} | {s.ops} | {_fmt(s.cpu, 2)} | "
            f"{_fmt(s.cpu_per_100k, 2)} | {(s.error or '').replace('|', '/')} |"
        )
    return "\n".join(lines)


def memory_tables(samples: list[MemSample]) -> str:
    """One table per database: each proxy's memory with idle connections and after churn."""
    out: list[str] = []
    for database, title in MEMORY_DATABASES.items():
        mine = [s for s in samples if s.database == database]
        if not mine:
            continue
        first = mine[0]
        head = (
            f"| {title}: {first.idle:,} idle connections, then {first.churn:,} short ones "
            f"({MEM_CHURN_CONCURRENCY} at a time); RSS of the process tree | "
        )
        lines = [head + " | ".join(s.target for s in mine) + " |", "|---" * (len(mine) + 1) + "|"]
        rows: list[tuple[str, Callable[[MemSample], str]]] = [
            ("RSS after one connection, MiB", lambda s: f"{s.start_kib / 1024:.1f}"),
            ("**KiB per idle connection**", lambda s: f"**{s.kib_per_idle:.1f}**"),
            (f"RSS with the {first.idle:,} open, MiB", lambda s: f"{s.idle_kib / 1024:.1f}"),
            (f"RSS {MEM_SETTLE:g} s after closing them, MiB", lambda s: f"{s.closed_kib / 1024:.1f}"),
            ("highest RSS during the churn, MiB", lambda s: f"{s.churn_peak_kib / 1024:.1f}"),
            (f"**RSS {MEM_SETTLE:g} s after the churn, MiB**", lambda s: f"**{s.churned_kib / 1024:.1f}**"),
        ]
        for label, cell in rows:
            lines.append(f"| {label} | " + " | ".join("n/a (error)" if s.error else cell(s) for s in mine) + " |")
        out.append("\n".join(lines))
        out += [f"- {s.target}: {s.error}" for s in mine if s.error]
    return "\n\n".join(out)


# ------------------------------------------------------------------------------------------------ JSON


def _sample_json(s: Sample) -> dict[str, object]:
    return {"rate": s.rate, "ops": s.ops, "cpu": s.cpu, "cpu_per_100k": s.cpu_per_100k, "error": s.error}


def suite_json(suite: str, opts: Options) -> dict[str, Any]:
    """One timed suite: per load, per target, the medians and every sample."""
    mine = [s for s in opts.samples if s.suite == suite]
    rate_unit, op_unit = UNITS[suite]
    infos = {ld.name: ld for ld in opts.loads if ld.suite == suite}
    loads = []
    for load in _ordered(s.load for s in mine):
        info = infos.get(load)
        rows = []
        for target in _ordered(s.target for s in mine):
            runs = [s for s in mine if s.load == load and s.target == target]
            if not runs:
                continue
            good = [s for s in runs if s.error is None]
            rows.append(
                {
                    "name": target,
                    "kind": kind_of(target),
                    "info": opts.target_info.get((suite, target), {}),
                    "rate": _median(s.rate for s in good),
                    "cpu_per_100k": _median(s.cpu_per_100k for s in good),
                    "runs": len(runs),
                    "ok_runs": len(good),
                    "samples": [_sample_json(s) for s in runs],
                }
            )
        loads.append(
            {
                "name": load,
                "command": info.command if info else "",
                "per_connection": bool(info and info.per_connection),
                "targets": rows,
            }
        )
    return {
        "rate_unit": rate_unit,
        "op_unit": op_unit,
        "per_connection_goal": PER_CONNECTION_GOAL,
        "loads": loads,
        "comparison": comparison(suite, opts.samples, opts.loads),
    }


def memory_json(opts: Options) -> dict[str, Any]:
    databases = []
    for database, title in MEMORY_DATABASES.items():
        mine = [s for s in opts.mem_samples if s.database == database]
        if not mine:
            continue
        rows = [
            {
                "name": s.target,
                "kind": kind_of(s.target),
                "info": opts.target_info.get((f"memory/{database}", s.target), {}),
                "start_kib": s.start_kib,
                "idle_kib": s.idle_kib,
                "kib_per_idle": s.kib_per_idle if not s.error else None,
                "closed_kib": s.closed_kib,
                "churn_peak_kib": s.churn_peak_kib,
                "churned_kib": s.churned_kib,
                "error": s.error,
            }
            for s in mine
        ]
        databases.append(
            {
                "name": database,
                "title": title,
                "idle": mine[0].idle,
                "churn": mine[0].churn,
                "churn_concurrency": MEM_CHURN_CONCURRENCY,
                "settle_s": MEM_SETTLE,
                "targets": rows,
            }
        )
    return {"databases": databases}
