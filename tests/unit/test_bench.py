"""bench/: the results JSON, the charts drawn from it, and the dbmtls configs the benchmark writes.

The benchmark itself needs root, real servers and four other proxies (bench/README.md); what is
tested here is what runs without them: a results file becomes the PNGs the README shows, the
JSON carries medians and every sample, and options the running dbmtls may not know
(``tls.sessionResumption``, ``preconnect``) are written only when asked for.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from bench import charts, report, targets
from bench.procs import Service
from bench.suites import LoadInfo, Options, Sample, dbmtls_variants

from dbmtls.config.load import config_from_documents

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(name: str, kind: str, rate: float | None, cpu: float | None = None) -> dict[str, Any]:
    sample: dict[str, Any] = {"rate": rate, "ops": 1000 if rate else 0, "cpu": None, "cpu_per_100k": cpu, "error": None}
    if rate is None:
        sample["error"] = "did not start: dbmtls exited 2"
    return {
        "name": name,
        "kind": kind,
        "info": {},
        "rate": rate,
        "cpu_per_100k": cpu,
        "runs": 1,
        "ok_runs": 0 if rate is None else 1,
        "samples": [sample],
    }


def synthetic_results(*, scale: float = 0.1) -> dict[str, Any]:
    """What bench/run.py writes, small: every suite, a failed target, a pooler, a per-connection load."""
    redis_targets = [
        _row("plaintext, no TLS", "plaintext", 60000.0),
        _row("direct TLS", "direct", 40000.0),
        _row("dbmtls", "dbmtls", 35000.0, 2.2),
        _row("dbmtls native", "dbmtls", 30000.0, 1.7),
        _row("dbmtls native +resume", "dbmtls", None),
        _row("stunnel", "relay", 15000.0, 5.4),
        _row("HAProxy", "relay", 27000.0, 2.1),
        _row("nginx", "relay", 31000.0, 2.0),
    ]
    per_conn = [{**r, "rate": (r["rate"] or 0) / 150 or None} for r in redis_targets]
    return {
        "schema": 1,
        "run": {
            "stamp": "20261202-160000",
            "date": "2026-12-02T16:00:00+00:00",
            "host": "bench-host",
            "cpu_model": "Some CPU @ 2.0GHz",
            "cpus": 2,
            "load_before": [0.5, 0.4, 0.3],
            "load_after": [2.1, 1.0, 0.5],
            "elapsed_s": 60.0,
            "options": {"suites": ["redis", "pg", "mysql", "memory"], "repeat": 1, "scale": scale},
            "versions": {"nginx": "nginx version: nginx/1.22.1"},
            "failures": [],
        },
        "suites": {
            "redis": {
                "rate_unit": "req/s",
                "op_unit": "req",
                "per_connection_goal": 1.3,
                "loads": [
                    {"name": "`-t get -c 50 -P 1`", "command": "", "per_connection": False, "targets": redis_targets},
                    {"name": "`-t get -c 4 -k 0`", "command": "", "per_connection": True, "targets": per_conn},
                ],
            },
            "pg": {
                "rate_unit": "tps",
                "op_unit": "tx",
                "per_connection_goal": 1.3,
                "loads": [
                    {
                        "name": "pgbench `-S -C -c 4 -j 2`",
                        "command": "",
                        "per_connection": True,
                        "targets": [
                            _row("direct TLS", "direct", 183.0),
                            _row("dbmtls", "dbmtls", 151.0, 283.0),
                            _row("dbmtls native (ran python)", "dbmtls", 150.0, 280.0),
                            _row("stunnel (`protocol=pgsql`)", "relay", 107.0, 671.0),
                            _row("PgBouncer", "pooler", 3053.0, 17.6),
                        ],
                    }
                ],
            },
            "mysql": {
                "rate_unit": "queries/s",
                "op_unit": "queries",
                "loads": [
                    {
                        "name": "mariadb-slap `-c 8` SELECT by primary key",
                        "command": "",
                        "per_connection": False,
                        "targets": [_row("direct TLS", "direct", 31496.0), _row("dbmtls", "dbmtls", 17857.0, 3.58)],
                    }
                ],
            },
            "memory": {
                "databases": [
                    {
                        "name": "redis",
                        "title": "Redis",
                        "idle": 200,
                        "churn": 2000,
                        "targets": [
                            {"name": "dbmtls", "kind": "dbmtls", "start_kib": 61440, "kib_per_idle": 49.4},
                            {"name": "HAProxy", "kind": "relay", "start_kib": 15462, "kib_per_idle": 31.7},
                            {"name": "nginx", "kind": "relay", "start_kib": 0, "kib_per_idle": None, "error": "x"},
                        ],
                    }
                ]
            },
        },
    }


EXPECTED = {
    "redis-throughput.png",
    "redis-cpu.png",
    "pg-throughput.png",
    "pg-cpu.png",
    "mysql-throughput.png",
    "mysql-cpu.png",
    "memory.png",
    "per-connection.png",
}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def test_charts_draws_every_chart_from_a_results_file(tmp_path: Path) -> None:
    results = tmp_path / "run.json"
    results.write_text(json.dumps(synthetic_results()))
    out = tmp_path / "charts"
    assert charts.main([str(results), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == EXPECTED
    for png in out.iterdir():
        width, height = _png_size(png)
        assert width >= 600 and height >= 300, (png.name, width, height)


def test_charts_of_an_earlier_run_are_named_not_mixed_in_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    everything = tmp_path / "all.json"
    everything.write_text(json.dumps(synthetic_results()))
    assert charts.main([str(everything), "--out", str(tmp_path)]) == 0
    redis_only = synthetic_results()
    redis_only["suites"] = {"redis": redis_only["suites"]["redis"]}
    (tmp_path / "redis.json").write_text(json.dumps(redis_only))
    capsys.readouterr()
    assert charts.main([str(tmp_path / "redis.json"), "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "not redrawn by this run" in err and "memory.png" in err and "pg-cpu.png" in err
    assert "redis-cpu.png" not in err.split("earlier one:")[1]


def test_charts_refuses_a_file_that_is_not_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert charts.main([str(bad), "--out", str(tmp_path / "charts")]) == 2
    assert "not a bench/run.py results file" in capsys.readouterr().err
    assert not (tmp_path / "charts").exists() or not list((tmp_path / "charts").iterdir())


def test_a_quick_run_is_marked_in_every_title() -> None:
    quick = charts.subtitle(synthetic_results(scale=0.1)["run"])
    assert "QUICK CHECK" in quick and "2026-12-02" in quick and "Some CPU" in quick and "bench-host" in quick
    full = synthetic_results(scale=1.0)["run"]
    full["options"]["repeat"] = 3
    assert "QUICK CHECK" not in charts.subtitle(full)


def test_ratios_are_against_the_best_relay_and_the_pooler() -> None:
    rows = synthetic_results()["suites"]["redis"]["loads"][0]["targets"]
    me = next(r for r in rows if r["name"] == "dbmtls native")
    assert charts._ratio_note(me, rows, "rate", lowest=False) == "0.97× nginx"  # 30,000 / 31,000
    assert charts._ratio_note(me, rows, "cpu_per_100k", lowest=True) == "0.85× nginx"  # 1.7 / 2.0
    pg = synthetic_results()["suites"]["pg"]["loads"][0]["targets"]
    assert charts._ratio_note(pg[1], pg, "rate", lowest=False) == "1.41× stunnel, 0.05× PgBouncer"


def test_results_json_has_medians_every_sample_and_the_goal() -> None:
    load = "`-t get -c 4 -k 0` (new connection per request)"
    opts = Options()
    opts.loads.append(LoadInfo("redis", load, "redis-benchmark -t get -c 4 -k 0 -n 150", per_connection=True))
    opts.samples += [
        Sample("redis", load, "direct TLS", 200.0, 150, None),
        Sample("redis", load, "direct TLS", 220.0, 150, None),
        Sample("redis", load, "direct TLS", 180.0, 150, None),
        Sample("redis", load, "dbmtls native", 300.0, 150, 1.5),
        Sample("redis", load, "dbmtls native", None, 0, None, "redis-benchmark exit 1: boom"),
        Sample("redis", load, "dbmtls native", 280.0, 150, 1.2),
        Sample("redis", load, "nginx", 250.0, 150, 0.9),
    ]
    out = report.suite_json("redis", opts)
    (only,) = out["loads"]
    assert only["per_connection"] is True and only["command"].startswith("redis-benchmark")
    rows = {r["name"]: r for r in only["targets"]}
    assert rows["direct TLS"]["rate"] == 200.0 and rows["direct TLS"]["kind"] == "direct"
    mine = rows["dbmtls native"]
    assert mine["kind"] == "dbmtls" and mine["runs"] == 3 and mine["ok_runs"] == 2
    assert mine["rate"] == 290.0  # the median of the runs without an error
    assert mine["cpu_per_100k"] == pytest.approx((1.5 / 150 + 1.2 / 150) / 2 * 100_000)
    assert [s["error"] for s in mine["samples"]] == [None, "redis-benchmark exit 1: boom", None]
    (line,) = [c for c in out["comparison"] if "dbmtls native" in c]
    assert "1.45x direct TLS (goal 1.3x: met)" in line and "1.16x the throughput of the fastest relay (nginx)" in line
    json.dumps(out)  # what run.py writes


def test_resumption_and_preconnect_are_written_only_when_asked() -> None:
    up = targets.Upstream(6379, "redis")
    plain = targets.dbmtls_config(None, up, 16379, data_plane="native")
    (db,) = plain["databases"]
    assert "sessionResumption" not in db["tls"] and "preconnect" not in db
    # today's loader takes what a plain run writes
    assert config_from_documents([(plain, "bench")], "bench").databases[0].name == "bench"
    asked = targets.dbmtls_config(None, up, 16379, resumption=False, preconnect=2)
    (db,) = asked["databases"]
    assert db["tls"]["sessionResumption"] is False
    assert db["preconnect"] == {"connections": 2, "maxIdle": "30s"}


def test_dbmtls_columns_are_every_combination_with_clear_labels() -> None:
    opts = Options(planes=("python", "native"), resumption=(False, True), preconnect=2)
    labels = [v.label for v in dbmtls_variants(opts)]
    assert labels == [
        "dbmtls -resume",
        "dbmtls -resume +pool2",
        "dbmtls +resume",
        "dbmtls +resume +pool2",
        "dbmtls native -resume",
        "dbmtls native -resume +pool2",
        "dbmtls native +resume",
        "dbmtls native +resume +pool2",
    ]
    assert [v.label for v in dbmtls_variants(Options(metrics="both"))] == ["dbmtls", "dbmtls+metrics"]


@pytest.mark.parametrize(
    ("log", "plane"),
    [
        ("2026-12-02T16:00:00.000Z INFO    data plane native native=bench threads=1\n", "native"),
        (
            "2026-12-02T16:00:00.000Z INFO    data plane native native=none threads=1 python=bench "
            'why="their protocols (postgres, mysql) are relayed by python for now"\n',
            "python",
        ),
        ("2026-12-02T16:00:00.000Z WARNING dataPlane native is not available: using the python data plane\n", "python"),
        ("2026-12-02T16:00:00.000Z INFO    listening db=bench\n", "unknown"),
    ],
)
def test_the_native_column_says_which_plane_ran(tmp_path: Path, log: str, plane: str) -> None:
    """From this start's lines only: an earlier dbmtls of the same name (another suite) wrote before."""
    earlier = "2026-12-02T15:00:00.000Z INFO    data plane native native=none threads=1 python=bench\n"
    log_file = tmp_path / "dbmtls.log"
    log_file.write_text(earlier)
    service = Service("dbmtls", ["true"], log_file, port=1)
    proxy = targets.DbmtlsProxy("dbmtls native", service, extra_ports=(), data_plane="native")
    proxy.mark_log()  # what start() does first
    with open(log_file, "a") as f:
        f.write(log)
    assert proxy.ran_plane() == plane


def test_the_readme_shows_the_charts_that_charts_py_draws() -> None:
    """README's Performance section links PNGs under docs/bench/: each exists and is one charts.py draws."""
    linked = re.findall(r"\(docs/bench/([\w.-]+\.png)\)", (ROOT / "README.md").read_text())
    assert linked, "README.md shows no chart"
    assert set(linked) <= EXPECTED
    assert [name for name in linked if not (ROOT / "docs" / "bench" / name).is_file()] == []


def test_the_l4_passthrough_is_the_floor_not_a_rival_relay() -> None:
    """nginx copying the client's own TLS bytes (the MySQL suite's floor) is reported against on
    its own line, never as "the fastest relay": it does none of the TLS work dbmtls does."""
    assert report.kind_of("nginx L4 passthrough, client TLS") == "passthrough"
    assert report.kind_of("nginx") == "relay"
    rows = [
        _row("direct TLS", "direct", 50000.0),
        _row("dbmtls native", "dbmtls", 30000.0, 2.0),
        _row("nginx L4 passthrough, client TLS", "passthrough", 25000.0, 2.5),
    ]
    me = rows[1]
    assert charts._ratio_note(me, rows, "rate", lowest=False) == ""
    load = "mariadb-slap `-c 8` SELECT by primary key"
    samples = [
        Sample("mysql", load, "direct TLS", 50000.0, 1000, None),
        Sample("mysql", load, "dbmtls native", 30000.0, 1000, 0.02),
        Sample("mysql", load, "nginx L4 passthrough, client TLS", 25000.0, 1000, 0.025),
    ]
    (line,) = report.comparison("mysql", samples)
    assert "fastest relay" not in line and "leanest relay" not in line
    assert "1.20x the throughput of nginx L4 passthrough, client TLS, 0.80x its CPU per 100k" in line
    assert "0.60x direct TLS" in line


def test_small_cpu_figures_keep_a_third_digit() -> None:
    """Pipelined loads cost a few hundredths of a CPU second per 100k requests: at two decimals
    every relay would read 0.04 and the table and charts could not tell them apart."""
    load = "`-t get -c 50 -P 32`"
    samples = [
        Sample("redis", load, "dbmtls native", 1_500_000.0, 1_000_000, 0.35),
        Sample("redis", load, "nginx", 1_250_000.0, 1_000_000, 0.39),
        Sample("redis", load, "stunnel", 750_000.0, 1_000_000, 1.18),
    ]
    table = report.suite_table("redis", samples)
    assert "| 0.035 | 0.039 | 0.12 |" in table
    assert charts._fmt(0.035) == "0.035" and charts._fmt(0.118) == "0.12"
