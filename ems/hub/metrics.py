"""`/metrics`: the hub's counters in Prometheus text, read at scrape time.

The hot path only bumps plain integers (`Hub.counters`); this collector turns them into metric
families when scraped, so counting costs nothing per frame. One registry per Hub, no globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ems.hub.hub import Hub


class HubCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        c = hub.counters
        stats = hub.ingest.stats
        online = sum(1 for conn in hub.connections.values() if conn.welcomed)
        yield GaugeMetricFamily(
            "ems_connected_devices", "Devices with a welcomed connection", online
        )
        yield GaugeMetricFamily(
            "ems_connected_dashboards", "Open dashboard connections", len(hub.fanout.subscribers)
        )
        for name, doc, value in (
            ("ems_frames_in", "Frames received from devices", c.frames_in),
            ("ems_frames_out", "Frames sent to devices (acks included)", c.frames_out),
            ("ems_samples_in", "Valid samples received", c.samples_in),
            ("ems_samples_rejected", "Samples rejected by validation", c.samples_rejected),
            ("ems_messages_rejected", "Reliable messages rejected whole", c.messages_rejected),
            ("ems_acks_sent", "Cumulative acks sent to devices", c.acks_sent),
            ("ems_dashboard_frames_out", "Frames sent to dashboards", c.dashboard_frames_out),
            ("ems_auth_failures", "Refused device and dashboard handshakes", c.auth_failures),
            ("ems_device_connections", "Device connections accepted", c.connections_total),
            ("ems_device_replaced", "Connections closed 4000 by a newer one", c.replaced),
            ("ems_store_batches", "Store transactions committed", stats.batches),
            ("ems_store_messages", "Messages committed to the store", stats.messages),
            ("ems_store_errors", "Failed store transactions (retried)", stats.store_errors),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        dropped = sum(s.queue.dropped_total for s in hub.fanout.subscribers)
        yield CounterMetricFamily(
            "ems_dashboard_dropped", "Telemetry updates dropped for slow dashboards", value=dropped
        )
        yield CounterMetricFamily(
            "ems_bus_dropped",
            "Messages for the other hubs dropped (Redis away or the outgoing queue full); their "
            "dashboards get `lagged` for the updates among them with the next relayed message",
            value=hub.bus.dropped,
        )
        yield GaugeMetricFamily(
            "ems_store_batch_seconds",
            "Duration of the last store transaction",
            stats.last_batch_seconds,
        )
        yield CounterMetricFamily(
            "ems_store_batch_seconds_total",
            "Time spent in store transactions",
            value=stats.total_batch_seconds,
        )
        yield GaugeMetricFamily(
            "ems_ingest_queued", "Messages waiting for the store", hub.ingest.queued()
        )
        yield GaugeMetricFamily(
            "ems_ingest_peak_queue", "Most messages waiting for the store at once", stats.peak_queue
        )
        pauses = hub.collector.pauses
        count = CounterMetricFamily(
            "ems_gc_collections", "GC runs by generation", labels=["generation"]
        )
        total = CounterMetricFamily(
            "ems_gc_pause_seconds", "Time spent in GC by generation", labels=["generation"]
        )
        worst = GaugeMetricFamily(
            "ems_gc_pause_max_seconds", "Longest GC pause by generation", labels=["generation"]
        )
        for generation in range(3):
            label = [str(generation)]
            count.add_metric(label, pauses.count[generation])
            total.add_metric(label, pauses.total_s[generation])
            worst.add_metric(label, pauses.max_s[generation])
        yield count
        yield total
        yield worst


def render_metrics(hub: Hub) -> bytes:
    if hub.metrics_registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(HubCollector(hub))
        hub.metrics_registry = registry
    return generate_latest(hub.metrics_registry)
