"""Counters an operator needs, kept as plain integers on the hot path.

`Metrics` is updated by the handler and the connection set without locks or allocations (it is
only touched on the event loop's thread). :meth:`Metrics.collector` exposes it to
``prometheus_client`` (an optional dependency, ``tornado-sse[metrics]``) for ``/metrics``; embedded
users register the same collector in their own registry.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["LATENCY_BUCKETS", "Metrics", "merge_samples"]

#: publish-to-write latency histogram buckets, seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: at most this many channels are reported by name in per-channel metrics; the rest are summed
#: under the label ``_other`` so that cardinality stays bounded
MAX_CHANNEL_LABELS = 100
#: the label under which the channels past the bound are summed
OTHER_CHANNELS = "_other"
#: channels one process reports by name in its `Metrics.samples` (more than are shown, so that
#: the largest channels of the sum of several processes are still named)
SAMPLED_CHANNELS = 500


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
        #: streams shed, by reason (each also counts in ``connections_shed``): ``"rate"`` (the
        #: address is over ``sse_stream_rate``), ``"connections"``, ``"address"`` (connection
        #: limits), ``"unavailable"`` (the broker, or who decides access), ``"shutdown"``,
        #: ``"overflow"`` (live events passed the buffer bound before the stream started)
        self.streams_shed: dict[str, int] = {}
        #: publishes refused, by reason: ``"rate"`` (the credential is over ``--publish-rate``)
        self.publishes_refused: dict[str, int] = {}
        #: the rate limiters reported (`add_limiter`): ``(name, limiter)``
        self._limiters: list[tuple[str, Any]] = []
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
        for known in self._brokers:  # by identity; a loop, not any(): once per stream
            if known is broker:
                return
        self._brokers.append(broker)
        self.channel_sources.append(
            lambda: {"subscribers": broker.subscriber_counts(), "history": broker.history_sizes()}
        )
        self.health_sources.append(lambda: bool(broker.healthy))

    def add_limiter(self, name: str, limiter: Any) -> None:
        """Report the size of *limiter*'s table (a `.RateLimiter`) as
        ``tornado_sse_rate_limit_keys{limit=name}``. Idempotent."""
        if not any(known is limiter for _, known in self._limiters):
            self._limiters.append((name, limiter))

    def rate_limit_keys(self) -> dict[str, int]:
        """Live buckets of the reported limiters, by name."""
        keys: dict[str, int] = {}
        for name, limiter in self._limiters:
            keys[name] = keys.get(name, 0) + len(limiter)
        return keys

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

    def samples(self) -> list[tuple[str, str, float]]:
        """These metrics as ``(name, label, value)`` samples that add up across processes.

        What crosses processes when ``tornado-sse serve --processes N`` totals its workers'
        metrics (`merge_samples`): counters and gauges by name, latency buckets (not cumulative)
        labelled with their bound, per-channel gauges labelled with the channel (the
        `SAMPLED_CHANNELS` largest; the rest summed under ``_other``), ``healthy`` 1 or 0, and
        ``processes`` 1.
        """
        out: list[tuple[str, str, float]] = [
            ("processes", "", 1),
            ("healthy", "", 1 if all(check() for check in self.health_sources) else 0),
            ("latency_sum", "", self.latency_sum),
        ]
        out += [(name, "", value) for name, _, value in self._values()]
        bounds = [repr(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]
        out += [
            ("latency_bucket", bound, count)
            for bound, count in zip(bounds, self.latency_buckets, strict=True)
        ]
        out += [("streams_shed", reason, n) for reason, n in self.streams_shed.items()]
        out += [("publishes_refused", reason, n) for reason, n in self.publishes_refused.items()]
        out += [("rate_limit_keys", name, n) for name, n in self.rate_limit_keys().items()]
        for name, values in self.channel_gauges().items():
            ranked = sorted(values.items(), key=lambda item: -item[1])
            out += [(name, channel, value) for channel, value in ranked[:SAMPLED_CHANNELS]]
            other = sum(value for _, value in ranked[SAMPLED_CHANNELS:])
            if other:
                out.append((name, OTHER_CHANNELS, other))
        return out

    def _values(self) -> list[tuple[str, str, int]]:
        """``(name, help, value)`` of the plain counters and gauges."""
        return [
            ("connections_open", "Event streams open now", self.connections_open),
            ("connections", "Event streams opened", self.connections_total),
            ("events_published", "Events published", self.published),
            ("events_sent", "Event deliveries written to streams", self.events_sent),
            ("heartbeats_sent", "Heartbeats written to idle streams", self.heartbeats_sent),
            (
                "slow_disconnects",
                "Streams closed for exceeding the buffer bound",
                self.slow_disconnects,
            ),
            (
                "connections_shed",
                "Subscribers shed (told to retry later); by reason in streams_shed",
                self.connections_shed,
            ),
            (
                "connections_pruned",
                "Half-open, failed or expired streams pruned",
                self.connections_pruned,
            ),
            ("resumes", "Streams resumed from a Last-Event-ID", self.resumes),
            ("stream_resets", "Resumes answered with stream-reset", self.stream_resets),
            (
                "idle_connections_closed",
                "Idle non-stream connections closed (past the bound, or to make room)",
                self.idle_closed,
            ),
            (
                "accept_pauses",
                "Pauses of accepting for want of file descriptors",
                self.accept_pauses,
            ),
            (
                "idle_connections",
                "Non-stream connections waiting for a request now",
                self.idle_connections,
            ),
        ]

    def collector(self, source: Callable[[], Iterable[Iterable[Any]]] | None = None) -> Any:
        """A ``prometheus_client`` collector for these metrics (requires ``prometheus_client``).

        :param source: what to report instead of this process's own `samples`: a callable
            returning the samples of several processes (one iterable each), which are added up
            (`merge_samples`). ``tornado-sse serve --processes N`` passes its workers' samples.
        """
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        metrics = self
        gauges = frozenset({"connections_open", "idle_connections"})

        class _Collector:
            def collect(self) -> Iterator[Any]:
                totals = merge_samples(source() if source is not None else [metrics.samples()])
                for name, doc, _ in metrics._values():
                    value = totals.get((name, ""), 0)
                    if name in gauges:
                        yield GaugeMetricFamily(f"tornado_sse_{name}", doc, value=value)
                    else:
                        yield CounterMetricFamily(f"tornado_sse_{name}", doc, value=value)
                buckets = []
                running = 0.0
                for bound in [repr(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]:
                    running += totals.get(("latency_bucket", bound), 0)
                    buckets.append((bound, running))
                yield HistogramMetricFamily(
                    "tornado_sse_publish_to_write_seconds",
                    "Time from publish to the first write of an event in its process",
                    buckets=buckets,
                    sum_value=totals.get(("latency_sum", ""), 0.0),
                )
                for name, doc in (
                    ("subscribers", "Local subscriptions per channel"),
                    ("history", "Events retained per channel"),
                ):
                    family = GaugeMetricFamily(
                        f"tornado_sse_channel_{name}", doc, labels=["channel"]
                    )
                    values = {
                        label: value
                        for (key, label), value in totals.items()
                        if key == name and label != OTHER_CHANNELS
                    }
                    ranked = sorted(values.items(), key=lambda item: -item[1])
                    other = totals.get((name, OTHER_CHANNELS), 0)
                    other += sum(v for _, v in ranked[MAX_CHANNEL_LABELS:])
                    for channel, value in ranked[:MAX_CHANNEL_LABELS]:
                        family.add_metric([channel], value)
                    if other:
                        family.add_metric([OTHER_CHANNELS], other)
                    yield family
                for name, doc, label, kind in (
                    ("streams_shed", "Subscribers shed, by reason", "reason", CounterMetricFamily),
                    (
                        "publishes_refused",
                        "Publishes refused, by reason",
                        "reason",
                        CounterMetricFamily,
                    ),
                    ("rate_limit_keys", "Live token buckets, by limit", "limit", GaugeMetricFamily),
                ):
                    labelled = kind(f"tornado_sse_{name}", doc, labels=[label])
                    for (key, value_label), value in sorted(totals.items()):
                        if key == name:
                            labelled.add_metric([value_label], value)
                    yield labelled
                processes = totals.get(("processes", ""), 0)
                yield GaugeMetricFamily(
                    "tornado_sse_healthy",
                    "1 when every broker of every process reporting can deliver",
                    value=1 if processes and totals.get(("healthy", ""), 0) == processes else 0,
                )
                yield GaugeMetricFamily(
                    "tornado_sse_processes",
                    "Processes whose metrics these are (the workers of serve --processes)",
                    value=processes,
                )

        return _Collector()


def merge_samples(reports: Iterable[Iterable[Any]]) -> dict[tuple[str, str], float]:
    """Add up the `Metrics.samples` of several processes: ``{(name, label): total}``.

    A malformed sample (not a ``[str, str, number]``) is skipped, whoever sent it.
    """
    totals: dict[tuple[str, str], float] = {}
    for samples in reports:
        for sample in samples:
            try:
                name, label, value = sample
            except (TypeError, ValueError):
                continue
            if (
                not isinstance(name, str)
                or not isinstance(label, str)
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
            ):
                continue
            key = (name, label)
            totals[key] = totals.get(key, 0) + value
    return totals
