"""Prometheus metrics, computed when scraped.

The data path only bumps plain integers (once per connection, never per chunk);
this collector reads them, plus the live byte counts of open connections, and
renders the standard exposition format through prometheus-client.  Metrics
therefore cost nothing on the hot path whether or not anyone scrapes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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
from dbmtls.proxy.runtime import DURATION_BUCKETS, Histogram
from dbmtls.tls.reload import ReloadCounts

# Every failure reason a connection can end with, so dashboards see zeros, not gaps
# (protocol violations by the app have their own metric).
FAILURE_REASONS = tuple(r for r in CONNECTION_FAILURES if r is not Reason.APP_PROTOCOL)


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


class DbmtlsCollector(Collector):
    def __init__(self, control: Control) -> None:
        self.control = control

    def collect(self) -> Iterator[Metric]:
        rts = list(self.control.runtimes.values())
        accepted = CounterMetricFamily("dbmtls_connections_accepted", "App connections accepted.", labels=["database"])
        closed = CounterMetricFamily("dbmtls_connections_closed", "App connections closed.", labels=["database"])
        active = GaugeMetricFamily("dbmtls_connections_active", "App connections open now.", labels=["database"])
        nbytes = CounterMetricFamily("dbmtls_bytes", "Bytes relayed, by direction.", labels=["database", "direction"])
        failures = CounterMetricFamily(
            "dbmtls_handshake_failures",
            "Connections that could not be set up toward the database, by reason.",
            labels=["database", "reason"],
        )
        app_errors = CounterMetricFamily(
            "dbmtls_app_protocol_errors", "App connections rejected for protocol violations.", labels=["database"]
        )
        reloads = CounterMetricFamily(
            "dbmtls_certificate_reloads", "Certificate reloads, by result.", labels=["database", "result"]
        )
        not_after = GaugeMetricFamily(
            "dbmtls_certificate_not_after_timestamp_seconds",
            "Expiry (Unix time) of each loaded client and CA certificate.",
            labels=["database", "kind", "subject", "serial"],
        )
        loaded = GaugeMetricFamily(
            "dbmtls_tls_material_loaded", "1 when the database's TLS material is loaded.", labels=["database"]
        )
        listening = GaugeMetricFamily(
            "dbmtls_listener_up", "1 when the database's listener is bound.", labels=["database"]
        )
        for rt in rts:
            s = rt.stats
            live_in = sum(c.bytes_from_app for c in rt.active)
            live_out = sum(c.bytes_from_upstream for c in rt.active)
            accepted.add_metric([rt.name], s.accepted)
            closed.add_metric([rt.name], s.closed)
            active.add_metric([rt.name], len(rt.active))
            nbytes.add_metric([rt.name, "app_to_upstream"], s.bytes_from_app + live_in)
            nbytes.add_metric([rt.name, "upstream_to_app"], s.bytes_from_upstream + live_out)
            for reason in sorted(set(FAILURE_REASONS) | set(s.handshake_failures)):
                failures.add_metric([rt.name, reason.value], s.handshake_failures.get(reason, 0))
            app_errors.add_metric([rt.name], s.app_protocol_errors)
            counts = self.control.reload_counts.get(rt.name, ReloadCounts())
            reloads.add_metric([rt.name, "success"], counts.success)
            reloads.add_metric([rt.name, "failure"], counts.failure)
            m = rt.tls.material
            loaded.add_metric([rt.name], 1.0 if (m is not None or not rt.tls.enabled) else 0.0)
            listening.add_metric([rt.name], 1.0 if rt.listening else 0.0)
            if m is not None:
                for ci in m.certs:
                    not_after.add_metric([rt.name, ci.kind, ci.subject, f"{ci.serial:x}"], ci.not_after.timestamp())
        yield from (accepted, closed, active, nbytes, failures, app_errors, reloads, not_after, loaded, listening)
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
        info = GaugeMetricFamily("dbmtls_build_info", "dbmtls version.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info


def make_registry(control: Control) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DbmtlsCollector(control))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
