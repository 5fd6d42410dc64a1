"""Prometheus metrics, computed when scraped.

The data path only bumps plain integers (once per connection, never per chunk);
this collector reads them, plus the live byte counts of open connections, and
renders the standard exposition format through prometheus-client.  Metrics
therefore cost nothing on the hot path whether or not anyone scrapes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dbmtls import __version__
from dbmtls.admin.control import Control
from dbmtls.errors import CONNECTION_FAILURES, Reason
from dbmtls.proxy.runtime import DURATION_BUCKETS, DatabaseRuntime, Histogram
from dbmtls.tls.reload import ReloadCounts

# Every failure reason a connection can end with, so dashboards see zeros, not gaps
# (protocol violations by the app have their own metric).
FAILURE_REASONS = tuple(r for r in CONNECTION_FAILURES if r is not Reason.APP_PROTOCOL)


def _per_database(
    family: type[CounterMetricFamily | GaugeMetricFamily],
    name: str,
    doc: str,
    rts: Iterable[DatabaseRuntime],
    value: Callable[[DatabaseRuntime], float],
) -> Metric:
    """A metric with one sample per database."""
    fam = family(name, doc, labels=["database"])
    for rt in rts:
        fam.add_metric([rt.name], value(rt))
    return fam


def _connections(rts: list[DatabaseRuntime]) -> Iterator[Metric]:
    """Accepted / closed / open connections and bytes relayed (open connections included)."""
    yield _per_database(
        CounterMetricFamily,
        "dbmtls_connections_accepted",
        "App connections accepted.",
        rts,
        lambda rt: rt.stats.accepted,
    )
    yield _per_database(
        CounterMetricFamily,
        "dbmtls_connections_closed",
        "App connections closed.",
        rts,
        lambda rt: rt.stats.closed,
    )
    yield _per_database(
        GaugeMetricFamily,
        "dbmtls_connections_active",
        "App connections open now.",
        rts,
        lambda rt: len(rt.active),
    )
    nbytes = CounterMetricFamily("dbmtls_bytes", "Bytes relayed, by direction.", labels=["database", "direction"])
    for rt in rts:
        live_in = sum(c.bytes_from_app for c in rt.active)
        live_out = sum(c.bytes_from_upstream for c in rt.active)
        nbytes.add_metric([rt.name, "app_to_upstream"], rt.stats.bytes_from_app + live_in)
        nbytes.add_metric([rt.name, "upstream_to_app"], rt.stats.bytes_from_upstream + live_out)
    yield nbytes


def _resumption(rts: list[DatabaseRuntime]) -> Iterator[Metric]:
    """Upstream TLS session resumption and the preconnect pool (docs/tls-resumption.md)."""
    yield _per_database(
        CounterMetricFamily,
        "dbmtls_upstream_tls_resumed",
        "Upstream TLS handshakes that resumed a session.",
        rts,
        lambda rt: rt.stats.tls_resumed,
    )
    yield _per_database(
        CounterMetricFamily,
        "dbmtls_upstream_tls_resumption_refused",
        "Upstream TLS handshakes that offered a session and failed (sessions are then not offered for a while).",
        rts,
        lambda rt: rt.stats.tls_resume_refused,
    )
    yield _per_database(
        GaugeMetricFamily,
        "dbmtls_preconnect_ready",
        "Upstream connections handshaken ahead, waiting for an app connection.",
        rts,
        lambda rt: len(rt.pool.ready) if rt.pool is not None else 0,
    )
    yield _per_database(
        CounterMetricFamily,
        "dbmtls_preconnect_used",
        "App connections given an upstream connection handshaken ahead.",
        rts,
        lambda rt: rt.stats.preconnect_used,
    )
    yield _per_database(
        CounterMetricFamily,
        "dbmtls_preconnect_discarded",
        "Connections handshaken ahead and closed unused (server closed them, maxIdle, reload).",
        rts,
        lambda rt: rt.stats.preconnect_discarded,
    )


def _certificates(rts: list[DatabaseRuntime], reload_counts: Mapping[str, ReloadCounts]) -> Iterator[Metric]:
    """Reloads by result and the expiry of every loaded certificate."""
    reloads = CounterMetricFamily(
        "dbmtls_certificate_reloads", "Certificate reloads, by result.", labels=["database", "result"]
    )
    not_after = GaugeMetricFamily(
        "dbmtls_certificate_not_after_timestamp_seconds",
        "Expiry (Unix time) of each loaded client and CA certificate.",
        labels=["database", "kind", "subject", "serial"],
    )
    for rt in rts:
        counts = reload_counts.get(rt.name, ReloadCounts())
        reloads.add_metric([rt.name, "success"], counts.success)
        reloads.add_metric([rt.name, "failure"], counts.failure)
        m = rt.tls.material
        if m is not None:
            for ci in m.certs:
                not_after.add_metric([rt.name, ci.kind, ci.subject, f"{ci.serial:x}"], ci.not_after.timestamp())
    yield reloads
    yield not_after


def _readiness(rts: list[DatabaseRuntime]) -> Iterator[Metric]:
    """What ``/readyz`` checks, per database."""
    yield _per_database(
        GaugeMetricFamily,
        "dbmtls_tls_material_loaded",
        "1 when the database's TLS material is loaded.",
        rts,
        lambda rt: 1.0 if (rt.tls.material is not None or not rt.tls.enabled) else 0.0,
    )
    yield _per_database(
        GaugeMetricFamily,
        "dbmtls_listener_up",
        "1 when the database's listener is bound.",
        rts,
        lambda rt: 1.0 if rt.listening else 0.0,
    )


def _histogram(name: str, doc: str, per_db: Iterable[tuple[str, Histogram]]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["database"])
    for db, h in per_db:
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(DURATION_BUCKETS, h.counts, strict=True):
            cumulative += count
            buckets.append((repr(bound), float(cumulative)))
        buckets.append(("+Inf", float(h.n)))
        fam.add_metric([db], buckets, h.total)
    return fam


def _durations(rts: list[DatabaseRuntime]) -> Iterator[Metric]:
    yield _histogram(
        "dbmtls_upstream_connect_duration_seconds",
        "TCP connect time to the database.",
        ((rt.name, rt.stats.connect_seconds) for rt in rts),
    )
    yield _histogram(
        "dbmtls_upstream_tls_handshake_duration_seconds",
        "TLS handshake time with the database.",
        ((rt.name, rt.stats.handshake_seconds) for rt in rts),
    )


def _build_info() -> Metric:
    info = GaugeMetricFamily("dbmtls_build_info", "dbmtls version.", labels=["version"])
    info.add_metric([__version__], 1.0)
    return info


class DbmtlsCollector(Collector):
    def __init__(self, control: Control) -> None:
        self.control = control

    def collect(self) -> Iterator[Metric]:
        rts = list(self.control.runtimes.values())
        yield from _connections(rts)
        failures = CounterMetricFamily(
            "dbmtls_handshake_failures",
            "Connections that could not be set up toward the database, by reason.",
            labels=["database", "reason"],
        )
        for rt in rts:
            s = rt.stats
            for reason in sorted(set(FAILURE_REASONS) | set(s.handshake_failures)):
                failures.add_metric([rt.name, reason.value], s.handshake_failures.get(reason, 0))
        yield failures
        yield _per_database(
            CounterMetricFamily,
            "dbmtls_app_protocol_errors",
            "App connections rejected for protocol violations.",
            rts,
            lambda rt: rt.stats.app_protocol_errors,
        )
        yield from _resumption(rts)
        yield from _certificates(rts, self.control.reload_counts)
        yield from _readiness(rts)
        yield from _durations(rts)
        yield _build_info()


def make_registry(control: Control) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DbmtlsCollector(control))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
