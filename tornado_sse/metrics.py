"""Counters an operator needs, kept as plain integers on the hot path.

`Metrics` is updated by the handler and the connection set without locks or allocations (it is
only touched on the event loop's thread). :meth:`Metrics.collector` exposes it to
``prometheus_client`` (an optional dependency, ``tornado-sse[metrics]``) for ``/metrics``; embedded
users register the same collector in their own registry.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["LATENCY_BUCKETS", "Metrics"]

#: publish-to-write latency histogram buckets, seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: at most this many channels are reported by name in per-channel metrics; the rest are summed
#: under the label ``_other`` so that cardinality stays bounded
MAX_CHANNEL_LABELS = 100


class Metrics:
    """Process-wide counters for event streams. One instance is shared by default."""

    _default: Metrics | None = None

    def __init__(self) -> None:
        self.connections_open = 0
        self.connections_total = 0
        self.events_published = 0
        self.events_sent = 0
        self.heartbeats_sent = 0
        self.slow_disconnects = 0
        self.connections_shed = 0
        self.connections_pruned = 0
        self.resumes = 0
        self.stream_resets = 0
        #: the hub's HTTP server (`.HubHTTPServer`): non-stream connections waiting for a
        #: request now, those closed for idleness or to make room, and accept pauses for want
        #: of file descriptors
        self.idle_connections = 0
        self.idle_closed = 0
        self.accept_pauses = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        #: callables returning extra gauges: ``{"subscribers": {...}, "history": {...}}`` sources
        self.channel_sources: list[Callable[[], dict[str, dict[str, int]]]] = []
        self.health_sources: list[Callable[[], bool]] = []
        self._brokers: list[Any] = []

    def add_broker(self, broker: Any) -> None:
        """Report *broker* (a `.Broker`): its publishes, subscribers and history per channel, and
        its health. Idempotent; the handler calls it for the broker of every stream."""
        if any(known is broker for known in self._brokers):
            return
        self._brokers.append(broker)
        self.channel_sources.append(
            lambda: {"subscribers": broker.subscriber_counts(), "history": broker.history_sizes()}
        )
        self.health_sources.append(lambda: bool(broker.healthy))

    @property
    def published(self) -> int:
        """Events published: counted here plus through every broker reported with add_broker."""
        return self.events_published + sum(int(b.published_count) for b in self._brokers)

    @classmethod
    def default(cls) -> Metrics:
        """The process-wide instance used unless ``sse_metrics`` names another."""
        if cls._default is None:
            cls._default = cls()
        return cls._default

    def observe_latency(self, seconds: float) -> None:
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def channel_gauges(self) -> dict[str, dict[str, int]]:
        """Merged per-channel gauges (``subscribers``, ``history``) from registered sources."""
        merged: dict[str, dict[str, int]] = {}
        for source in self.channel_sources:
            for name, values in source().items():
                target = merged.setdefault(name, {})
                for channel, value in values.items():
                    target[channel] = target.get(channel, 0) + value
        return merged

    def collector(self) -> Any:
        """A ``prometheus_client`` collector for these metrics (requires ``prometheus_client``)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        metrics = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                yield GaugeMetricFamily(
                    "tornado_sse_connections_open",
                    "Event streams open now",
                    value=metrics.connections_open,
                )
                for name, doc, value in (
                    ("connections", "Event streams opened", metrics.connections_total),
                    ("events_published", "Events published", metrics.published),
                    ("events_sent", "Event deliveries written to streams", metrics.events_sent),
                    (
                        "heartbeats_sent",
                        "Heartbeats written to idle streams",
                        metrics.heartbeats_sent,
                    ),
                    (
                        "slow_disconnects",
                        "Streams closed for exceeding the buffer bound",
                        metrics.slow_disconnects,
                    ),
                    (
                        "connections_shed",
                        "Subscribers shed by connection limits",
                        metrics.connections_shed,
                    ),
                    (
                        "connections_pruned",
                        "Half-open, failed or expired streams pruned",
                        metrics.connections_pruned,
                    ),
                    ("resumes", "Streams resumed from a Last-Event-ID", metrics.resumes),
                    ("stream_resets", "Resumes answered with stream-reset", metrics.stream_resets),
                    (
                        "idle_connections_closed",
                        "Idle non-stream connections closed (past the bound, or to make room)",
                        metrics.idle_closed,
                    ),
                    (
                        "accept_pauses",
                        "Pauses of accepting for want of file descriptors",
                        metrics.accept_pauses,
                    ),
                ):
                    yield CounterMetricFamily(f"tornado_sse_{name}", doc, value=value)
                yield GaugeMetricFamily(
                    "tornado_sse_idle_connections",
                    "Non-stream connections waiting for a request now",
                    value=metrics.idle_connections,
                )
                buckets = []
                running = 0
                for bound, count in zip(LATENCY_BUCKETS, metrics.latency_buckets, strict=False):
                    running += count
                    buckets.append((repr(bound), running))
                buckets.append(("+Inf", running + metrics.latency_buckets[-1]))
                yield HistogramMetricFamily(
                    "tornado_sse_publish_to_write_seconds",
                    "Time from publish to the first write of an event in this process",
                    buckets=buckets,
                    sum_value=metrics.latency_sum,
                )
                gauges = metrics.channel_gauges()
                for name, doc in (
                    ("subscribers", "Local subscriptions per channel"),
                    ("history", "Events retained per channel"),
                ):
                    family = GaugeMetricFamily(
                        f"tornado_sse_channel_{name}", doc, labels=["channel"]
                    )
                    values = gauges.get(name, {})
                    ranked = sorted(values.items(), key=lambda item: -item[1])
                    other = sum(v for _, v in ranked[MAX_CHANNEL_LABELS:])
                    for channel, value in ranked[:MAX_CHANNEL_LABELS]:
                        family.add_metric([channel], value)
                    if other:
                        family.add_metric(["_other"], other)
                    yield family
                yield GaugeMetricFamily(
                    "tornado_sse_healthy",
                    "1 when every broker can deliver",
                    value=1 if all(check() for check in metrics.health_sources) else 0,
                )

        return _Collector()
