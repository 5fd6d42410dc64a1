"""PNG charts of one bench/run.py results JSON: the side-by-side numbers the README shows.

    .venv/bin/python bench/charts.py [bench/results/<ts>.json] [--out docs/bench/]

Without a file it draws the newest bench/results/*.json (``make charts``); ``bench/run.py
--charts`` draws right after the run.  Headless (matplotlib's Agg backend, no display).  For
each timed suite: throughput and proxy CPU per 100k operations, per target and load, the dbmtls
bars highlighted and annotated with their ratio to the best other relay; the loads that open a
new connection per request, as a ratio to direct TLS with the goal line; memory: RSS at start and
KiB per idle connection per target.  Every title carries the run's date and machine; a run with
``--scale`` below 1 or a single repeat is marked as a quick check in every chart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before anything draws: no display, ever

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

SUITE_TITLES = {
    "redis": "Redis 7 (tls-auth-clients yes)",
    "pg": "PostgreSQL 15 (clientcert=verify-full)",
    "mysql": "MariaDB 10.11 (REQUIRE X509)",
}
COLORS = {
    "dbmtls": "#d9480f",  # the highlighted bars
    "relay": "#4c6ef5",
    "pooler": "#7048e8",
    "passthrough": "#74c0fc",  # a relay copying the client's TLS bytes: the floor of any relay
    "direct": "#868e96",
    "plaintext": "#ced4da",
    "other": "#adb5bd",
}
GOAL_COLOR = "#2b8a3e"
RELAY_KINDS = ("relay",)

Row = dict[str, Any]  # one target of one load in the results JSON


def _plain(label: str) -> str:
    return label.replace("`", "")


def subtitle(run: dict[str, Any]) -> str:
    """The run's date, machine and conditions, for every chart."""
    opts = run.get("options", {})
    load = run.get("load_before", [0.0])[0], run.get("load_after", [0.0])[0]
    line = (
        f"run {run.get('date', '?')} on {run.get('host', '?')}: {run.get('cpu_model', '?')}, "
        f"{run.get('cpus', '?')} CPUs, load average {load[0]:.2f} before, {load[1]:.2f} after; "
        f"medians of {opts.get('repeat', '?')} run(s)"
    )
    if float(opts.get("scale", 1.0)) < 1.0 or int(opts.get("repeat", 3)) < 2:
        line += (
            f"\nQUICK CHECK (--scale {opts.get('scale', '?')}, --repeat {opts.get('repeat', '?')}): "
            "not a measurement, the numbers are noise"
        )
    return line


def _best_other(rows: list[Row], key: str, *, lowest: bool, kinds: tuple[str, ...] = RELAY_KINDS) -> Row | None:
    """The best relay (stunnel, HAProxy, nginx) on ``key``: the fastest, or the leanest."""
    rivals = [r for r in rows if r.get("kind") in kinds and r.get(key) is not None]
    if not rivals:
        return None
    ranked = sorted(rivals, key=lambda r: float(r[key]))
    return ranked[0] if lowest else ranked[-1]


def _ratio_note(
    row: Row,
    rows: list[Row],
    key: str,
    *,
    lowest: bool,
    fallback: str | None = None,
    kinds: tuple[str, ...] = RELAY_KINDS,
) -> str:
    """dbmtls's value against the best relay's (or against ``fallback``'s, e.g. direct TLS), and
    against a pooler's unless ``kinds`` already has poolers among the rivals."""
    value = row.get(key)
    if value is None:
        return ""
    best = _best_other(rows, key, lowest=lowest, kinds=kinds)
    if best is None and fallback:
        best = next((r for r in rows if r["name"] == fallback and r.get(key)), None)
    notes = []
    if best is not None and best[key]:
        notes.append(f"{value / best[key]:.2f}× {_short(best['name'])}")
    if "pooler" not in kinds:
        for pooler in (r for r in rows if r.get("kind") == "pooler" and r.get(key)):
            notes.append(f"{value / pooler[key]:.2f}× {_short(pooler['name'])}")
    return ", ".join(notes)


def _short(name: str) -> str:
    """A target's name in a note: 'stunnel (`protocol=pgsql`)' is 'stunnel'."""
    return _plain(name).split(" (")[0]


def _versus(
    rows: list[Row], key: str, *, lowest: bool, fallback: str | None = None, kinds: tuple[str, ...] = RELAY_KINDS
) -> Callable[[Row], str]:
    """The note on dbmtls's bars: its ratio to the best relay (and to a pooler)."""

    def note(row: Row) -> str:
        if row.get("kind") != "dbmtls":
            return ""
        return _ratio_note(row, rows, key, lowest=lowest, fallback=fallback, kinds=kinds)

    return note


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v < 0.1:  # pipelined loads' CPU per 100k: a third digit tells the relays apart
        return f"{v:.3f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _tick(x: float, _pos: int) -> str:
    return f"{x:,.0f}" if x >= 10 or x == 0 else f"{x:g}"


def _bars(
    ax: Axes,
    rows: list[Row],
    key: str,
    *,
    notes: Callable[[Row], str] | None = None,
    unit: str = "",
    limit: float | None = None,
) -> None:
    """Horizontal bars, one per target, first target on top; missing values say why.  Bars longer
    than the axis (``limit`` sets it: a pooler among relays) are cut, their value written inside."""
    names = [_plain(r["name"]) for r in rows]
    values = [float(r[key]) if r.get(key) is not None else 0.0 for r in rows]
    colors = [COLORS.get(r.get("kind", "other"), COLORS["other"]) for r in rows]
    ys = list(range(len(rows)))[::-1]
    top = limit or max(values, default=0.0) or 1.0
    end = top * (1.9 if notes else 1.35)  # room for the labels right of the bars
    ax.barh(ys, [min(v, end) for v in values], color=colors, height=0.7)
    ax.set_yticks(ys, names)
    for tick, row in zip(ax.get_yticklabels(), rows, strict=True):
        if row.get("kind") == "dbmtls":
            tick.set_fontweight("bold")
    ax.set_xlim(0, end)
    for y, row, v in zip(ys, rows, values, strict=True):
        if row.get(key) is None:
            text = "n/a (error)" if row.get("error") or row.get("ok_runs", 1) == 0 else "n/a"
        else:
            text = _fmt(v) + unit
            note = notes(row) if notes else ""
            if note:
                text += f"  ({note})"
        weight = "bold" if row.get("kind") == "dbmtls" else "normal"
        if v > top * 1.05:  # cut: the value inside the bar's end
            ax.text(end * 0.99, y, text, va="center", ha="right", fontsize=7.5, color="white", fontweight=weight)
        else:
            ax.text(v + top * 0.01, y, text, va="center", fontsize=7.5, fontweight=weight)
    ax.xaxis.set_major_formatter(FuncFormatter(_tick))
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


KIND_LABELS = {
    "dbmtls": "dbmtls",
    "relay": "relays",
    "pooler": "pooler",
    "passthrough": "L4 passthrough (copies the client's TLS: no TLS work)",
    "direct": "direct TLS (the client does TLS)",
    "plaintext": "plaintext, no TLS",
}


def _legend(fig: Figure, rows: list[Row], extra: Sequence[Artist] = ()) -> None:
    kinds = {r.get("kind", "other") for r in rows}
    handles: list[Artist] = []
    for kind, label in KIND_LABELS.items():
        if kind not in kinds:
            continue
        if kind in ("relay", "pooler"):  # the ones in this chart
            names = list(dict.fromkeys(_short(r["name"]) for r in rows if r.get("kind") == kind))
            label = f"{label.split(' (')[0]} ({', '.join(names)})"
        handles.append(Patch(color=COLORS[kind], label=label))
    handles += extra
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)


def _figure(n: int, *, rows_each: int, cols: int = 1, width: float = 6.5) -> tuple[Figure, list[Axes]]:
    per = 0.32 * rows_each + 1.0
    nrows = (n + cols - 1) // cols
    fig = Figure(figsize=(width * cols, per * nrows + 1.6), layout="constrained")
    grid = fig.subplots(nrows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for extra in axes[n:]:
        extra.set_visible(False)
    return fig, axes[:n]


def _save(fig: Figure, path: Path, paths: list[Path]) -> None:
    fig.savefig(path, dpi=110)
    paths.append(path)


def _suite_charts(name: str, suite: dict[str, Any], run: dict[str, Any], out: Path, paths: list[Path]) -> None:
    title = SUITE_TITLES.get(name, name)
    loads = [ld for ld in suite.get("loads", []) if ld.get("targets")]
    if not loads:
        return
    rate_unit, op_unit = suite.get("rate_unit", "ops/s"), suite.get("op_unit", "ops")
    most = max(len(ld["targets"]) for ld in loads)

    fig, axes = _figure(len(loads), rows_each=most, cols=2)
    for ax, load in zip(axes, loads, strict=True):
        _bars(ax, load["targets"], "rate", notes=_versus(load["targets"], "rate", lowest=False, fallback="direct TLS"))
        ax.set_title(_plain(load["name"]), fontsize=9)
        ax.set_xlabel(f"{rate_unit} (higher is better)", fontsize=8)
    fig.suptitle(f"{title}: throughput through each proxy\n{subtitle(run)}", fontsize=9)
    _legend(fig, [r for ld in loads for r in ld["targets"]])
    _save(fig, out / f"{name}-throughput.png", paths)

    with_cpu = [ld for ld in loads if any(r.get("cpu_per_100k") is not None for r in ld["targets"])]
    if not with_cpu:
        return
    fig, axes = _figure(len(with_cpu), rows_each=most, cols=2)
    charged: list[Row] = []
    for ax, load in zip(axes, with_cpu, strict=True):
        # direct TLS and plaintext have no proxy to charge
        rows = [r for r in load["targets"] if r.get("kind") not in ("direct", "plaintext")]
        charged += rows
        _bars(ax, rows, "cpu_per_100k", notes=_versus(rows, "cpu_per_100k", lowest=True))
        ax.set_title(_plain(load["name"]), fontsize=9)
        ax.set_xlabel(f"proxy CPU seconds per 100k {op_unit} (lower is better)", fontsize=8)
    fig.suptitle(f"{title}: the proxy's own CPU per 100,000 {op_unit}\n{subtitle(run)}", fontsize=9)
    _legend(fig, charged)
    _save(fig, out / f"{name}-cpu.png", paths)


def _per_connection_chart(results: dict[str, Any], out: Path, paths: list[Path]) -> None:
    """Every load that opens a new connection per request, as a ratio to direct TLS, with the goal."""
    panels = []
    goal = 1.3
    for name, suite in results.get("suites", {}).items():
        for load in suite.get("loads", []) if isinstance(suite, dict) else []:
            if not load.get("per_connection"):
                continue
            goal = float(suite.get("per_connection_goal", goal))
            direct = next((r for r in load["targets"] if r.get("kind") == "direct" and r.get("rate")), None)
            rows = []
            for r in load["targets"]:
                if r.get("kind") in ("direct", "plaintext"):  # the reference, and no TLS at all
                    continue
                ratio = r["rate"] / direct["rate"] if direct and r.get("rate") is not None else None
                label = r["name"] + (" (pools server connections)" if r.get("kind") == "pooler" else "")
                rows.append({**r, "name": label, "ratio": ratio})
            panels.append((f"{SUITE_TITLES.get(name, name).split(' (')[0]}: {_plain(load['name'])}", rows, direct))
    if not panels:
        return
    fig, axes = _figure(len(panels), rows_each=max(len(p[1]) for p in panels), cols=1, width=10.0)
    for ax, (title, rows, direct) in zip(axes, panels, strict=True):
        # A pooler keeps its server connections: its bar is cut, the relays and dbmtls set the scale.
        others = [r["ratio"] for r in rows if r.get("ratio") is not None and r.get("kind") != "pooler"]
        limit = max([goal * 1.1, *others])
        _bars(ax, rows, "ratio", notes=_rate_note, unit="×", limit=limit)
        ax.axvline(1.0, color=COLORS["direct"], linestyle="-", linewidth=1.2)
        ax.axvline(goal, color=GOAL_COLOR, linestyle="--", linewidth=1.5)
        where = f"direct TLS: {direct['rate']:,.0f}/s" if direct else "direct TLS: n/a"
        ax.set_title(f"{title} ({where})", fontsize=9)
        ax.set_xlabel("rate / direct TLS's rate (the client doing TLS itself; higher is better)", fontsize=8)
    fig.suptitle(
        f"A new connection per request / transaction / query, against direct TLS\n{subtitle(run_of(results))}",
        fontsize=9,
    )
    lines = [
        Line2D([], [], color=COLORS["direct"], linewidth=1.2, label="direct TLS (1×)"),
        Line2D([], [], color=GOAL_COLOR, linestyle="--", linewidth=1.5, label=f"goal: {goal:g}× direct TLS"),
    ]
    _legend(fig, [r for p in panels for r in p[1]], extra=lines)
    _save(fig, out / "per-connection.png", paths)


def _rate_note(row: Row) -> str:
    return f"{row['rate']:,.0f}/s" if row.get("rate") else ""


def _memory_chart(memory: dict[str, Any], run: dict[str, Any], out: Path, paths: list[Path]) -> None:
    dbs = [db for db in memory.get("databases", []) if db.get("targets")]
    if not dbs:
        return
    fig, axes = _figure(len(dbs) * 2, rows_each=max(len(db["targets"]) for db in dbs), cols=2)
    for i, db in enumerate(dbs):
        rows = [
            {**r, "start_mib": r["start_kib"] / 1024 if r.get("start_kib") and not r.get("error") else None}
            for r in db["targets"]
        ]
        start_ax, idle_ax = axes[2 * i], axes[2 * i + 1]
        rivals = ("relay", "pooler")  # the leanest other proxy, PgBouncer included
        _bars(start_ax, rows, "start_mib", notes=_versus(rows, "start_mib", lowest=True, kinds=rivals))
        start_ax.set_title(f"{db['title']}: RSS after one connection", fontsize=9)
        start_ax.set_xlabel("MiB, the proxy's whole process tree (lower is better)", fontsize=8)
        _bars(idle_ax, rows, "kib_per_idle", notes=_versus(rows, "kib_per_idle", lowest=True, kinds=rivals))
        idle_ax.set_title(f"{db['title']}: per idle connection ({db['idle']:,} held open)", fontsize=9)
        idle_ax.set_xlabel("KiB per connection (lower is better)", fontsize=8)
    fig.suptitle(f"Memory of each proxy (RSS)\n{subtitle(run)}", fontsize=9)
    _legend(fig, [r for db in dbs for r in db["targets"]])
    _save(fig, out / "memory.png", paths)


def run_of(results: dict[str, Any]) -> dict[str, Any]:
    run = results.get("run")
    return run if isinstance(run, dict) else {}


def draw(results: dict[str, Any], out: Path) -> list[Path]:
    """Every chart the results have data for; returns the PNGs written."""
    if results.get("schema") != 1:
        raise ValueError(f"not a bench/run.py results file (schema {results.get('schema')!r}, expected 1)")
    out.mkdir(parents=True, exist_ok=True)
    run = run_of(results)
    paths: list[Path] = []
    for name, suite in results.get("suites", {}).items():
        if name == "memory":
            _memory_chart(suite, run, out, paths)
        else:
            _suite_charts(name, suite, run, out, paths)
    _per_connection_chart(results, out, paths)
    drawn = {p.name for p in paths}
    stale = sorted(p.name for p in out.glob("*.png") if p.name not in drawn and _ours(p.name))
    if stale:
        # A run without some suite leaves the earlier run's charts of it: say so, never mix silently.
        print(f"{out}: not redrawn by this run, from an earlier one: {', '.join(stale)}", file=sys.stderr)
    return paths


def _ours(name: str) -> bool:
    return name in ("memory.png", "per-connection.png") or any(
        name == f"{suite}-{what}.png" for suite in SUITE_TITLES for what in ("throughput", "cpu")
    )


def latest_results(directory: Path = RESULTS) -> Path | None:
    found = sorted(directory.glob("*.json"))
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    import json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", help="a results JSON of bench/run.py (default: the newest in bench/results/)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="directory for the PNGs")
    args = p.parse_args(argv)
    path = Path(args.results) if args.results else latest_results()
    if path is None:
        print(f"no results JSON in {RESULTS}: run bench/run.py first, or name one", file=sys.stderr)
        return 2
    try:
        results = json.loads(path.read_text())
        paths = draw(results, Path(args.out))
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if not paths:
        print(f"{path}: no results to draw", file=sys.stderr)
        return 1
    for png in paths:
        print(f"chart: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
