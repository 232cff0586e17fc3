"""The broker's Prometheus metrics: one registry per broker, cheap on the data path.

Every metric is listed, with its type, labels and meaning, in ``docs/operating.md`` ("Metrics").
Two kinds:

- **Read at scrape time** (:class:`_BrokerCollector`): per-partition traffic, subscriptions,
  lag, ingest drops and append failures, NATS state, readiness. The data path keeps plain
  integers it already needs or adds per batch (:class:`~flux_broker.log.contract.Traffic` on
  each :class:`~flux_broker.streams.live.LivePartition`: the log adds each written batch, a
  subscription each batch it sends) and the collector turns them into samples when scraped.
  A deleted stream is no longer in the stream manager, so its series disappear with it.
- **Updated as things happen** (prometheus-client objects): acks by policy and the
  publish-to-ack latency (:class:`PublishMetrics`, once per acked batch, label children
  resolved once at start-up), and what recovery found (:meth:`BrokerMetrics.recovered`, once
  per log opened).

Each :class:`BrokerMetrics` owns its :class:`~prometheus_client.CollectorRegistry` (never the
global default one), so several brokers, or tests, in one process do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from flux_broker.log.recovery import LogStats
from flux_proto import api_pb2

if TYPE_CHECKING:
    from nats.aio.client import Client

    from flux_broker.groups.coordinator import GroupCoordinator
    from flux_broker.streams.live import LiveStream

__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS_S",
    "BrokerMetrics",
    "PublishMetrics",
]

#: Content type of :meth:`BrokerMetrics.exposition` (Prometheus text format 0.0.4).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
#: Buckets of the publish-to-ack latency: 100 µs to 10 s, about 2.5x apart.
LATENCY_BUCKETS_S: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_PARTITION_LABELS: Final = ("stream", "partition")
_NS_PER_S: Final = 1e9


class PublishMetrics:
    """What the write paths update once per acked batch: acks by policy, and their latency.

    Attributes:
        acks_leader: Acks sent for policy LEADER (a label child, resolved once).
        acks_all: Acks sent for policy ALL.
        latency: The publish-to-ack latency histogram (seconds).
    """

    __slots__ = ("acks_all", "acks_leader", "latency")

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register the metrics in ``registry``."""
        acks = Counter(
            "flux_acks",
            "Acks sent to publishers after a successful write, by ack policy: one per message "
            "on the NATS path (Publish, PublishAsync, NATS publishers), one per PublishBatch "
            "request. Policy none asks for no ack.",
            ["policy"],
            registry=registry,
        )
        self.acks_leader = acks.labels(policy="leader")
        self.acks_all = acks.labels(policy="all")
        self.latency = Histogram(
            "flux_publish_ack_latency_seconds",
            "From the moment the broker received a publish (the NATS message reached the "
            "partition, or the PublishBatch request was read) to its ack, once per acked "
            "batch: on the NATS path the oldest message of the batch, the worst of it.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )

    def acked(self, leader: int, all_: int, received_ns: int, now_ns: int) -> None:
        """Count one batch's acks; ``received_ns``: its oldest publish's reception time."""
        if leader:
            self.acks_leader.inc(leader)
        if all_:
            self.acks_all.inc(all_)
        self.latency.observe(max(now_ns - received_ns, 0) / _NS_PER_S)

    def acked_batch(self, policy: int, received_ns: int, now_ns: int) -> None:
        """Count a PublishBatch response (one ack) for ``policy`` (LEADER or ALL)."""
        leader = policy == api_pb2.AckPolicy.LEADER
        self.acked(int(leader), int(not leader), received_ns, now_ns)


class _BrokerCollector(Collector):
    """Samples read from the broker's state at scrape time (see the module docstring)."""

    def __init__(self) -> None:
        self.streams: Callable[[], Iterable[LiveStream]] | None = None
        self.nc: Client | None = None
        self.groups: GroupCoordinator | None = None
        self.readiness: Callable[[], str | None] = lambda: "starting"

    def collect(self) -> Iterator[Metric]:
        yield from self._partitions()
        yield from self._nats()
        yield from self._groups()
        ready = GaugeMetricFamily(
            "flux_ready", "1 while the broker is ready (/readyz answers 200), else 0"
        )
        ready.add_metric([], 0 if self.readiness() else 1)
        yield ready

    def _partitions(self) -> Iterator[Metric]:
        def counter(name: str, text: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, text, labels=_PARTITION_LABELS)

        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=_PARTITION_LABELS)

        messages_in = counter(
            "flux_partition_messages_in",
            "Records written to the partition, by every path (NATS, PublishBatch, the broker's "
            "own streams)",
        )
        bytes_in = counter(
            "flux_partition_bytes_in", "Bytes of those records as stored (framed, with headers)"
        )
        messages_out = counter(
            "flux_partition_messages_out", "Records sent to subscribers (Subscribe, SubscribeBatch)"
        )
        bytes_out = counter("flux_partition_bytes_out", "Bytes of those records as stored")
        subscriptions = gauge(
            "flux_active_subscriptions", "Subscribe and SubscribeBatch calls reading the partition"
        )
        lag = gauge(
            "flux_subscriber_lag_messages",
            "Committed records the furthest-behind subscriber of the partition has not been "
            "sent yet (HW - its last sent offset; 0 without subscribers)",
        )
        high_watermark = gauge(
            "flux_partition_high_watermark", "The partition's high watermark (-1 when empty)"
        )
        dropped = counter(
            "flux_ingest_dropped_messages",
            "NATS messages dropped on arrival because the partition's ingest buffer was full "
            "(not stored, not acked)",
        )
        failures = counter(
            "flux_ingest_append_failures",
            "Batches from NATS whose write failed (e.g. a full disk); their messages got no ack",
        )
        families = (
            messages_in,
            bytes_in,
            messages_out,
            bytes_out,
            subscriptions,
            lag,
            high_watermark,
            dropped,
            failures,
        )
        for stream in () if self.streams is None else self.streams():
            for partition in stream.partitions:
                labels = [partition.stream, str(partition.id)]
                written, delivered, stats = partition.written, partition.delivered, partition.stats
                messages_in.add_metric(labels, written.records)
                bytes_in.add_metric(labels, written.bytes)
                messages_out.add_metric(labels, delivered.records)
                bytes_out.add_metric(labels, delivered.bytes)
                subscriptions.add_metric(labels, partition.subscribers)
                lag.add_metric(labels, partition.subscriber_lag())
                high_watermark.add_metric(labels, partition.high_watermark)
                dropped.add_metric(labels, stats.dropped)
                failures.add_metric(labels, stats.append_failures)
        yield from families

    def _nats(self) -> Iterator[Metric]:
        nc = self.nc
        connected = GaugeMetricFamily(
            "flux_nats_connected", "1 while the broker's NATS connection is up, else 0"
        )
        connected.add_metric([], 1 if nc is not None and nc.is_connected else 0)
        yield connected
        reconnects = CounterMetricFamily(
            "flux_nats_reconnects", "Times the NATS connection was re-established"
        )
        reconnects.add_metric([], 0 if nc is None else int(nc.stats.get("reconnects", 0)))
        yield reconnects

    def _groups(self) -> Iterator[Metric]:
        coordinator = self.groups
        if coordinator is None:
            return
        members = GaugeMetricFamily(
            "flux_consumer_group_members",
            "Members of each consumer group (groups without members are not listed)",
            labels=("group",),
        )
        epochs = GaugeMetricFamily(
            "flux_consumer_group_epoch", "Current epoch of each consumer group", labels=("group",)
        )
        revoking = GaugeMetricFamily(
            "flux_consumer_group_partitions_revoking",
            "Partitions of each consumer group being revoked (awaiting their owner)",
            labels=("group",),
        )
        for state in coordinator.groups():
            if state.empty:
                continue
            members.add_metric([state.group_id], len(state.members))
            epochs.add_metric([state.group_id], state.epoch)
            revoking.add_metric(
                [state.group_id], sum(1 for own in state.owners.values() if own.revoking)
            )
        yield from (members, epochs, revoking)
        stats = coordinator.stats
        for name, text, value in (
            (
                "flux_consumer_group_changes",
                "Consumer-group changes stored (each a new epoch: joins, leaves, rebalances, "
                "finished revocations)",
                stats.changes,
            ),
            (
                "flux_consumer_group_members_expired",
                "Members removed for missing their heartbeats (groups.consumer.timeout)",
                stats.expired_members,
            ),
            (
                "flux_consumer_group_revocations_timed_out",
                "Revocations finished by groups.revoke.timeout instead of a confirmation",
                stats.revocations_timed_out,
            ),
        ):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], value)
            yield counter


class BrokerMetrics:
    """One broker's metrics and registry.

    Attributes:
        registry: The registry every metric of this broker is in.
        publish: What the write paths update (:class:`PublishMetrics`).
    """

    def __init__(self, *, process: bool = True) -> None:
        """Create the registry and the metrics.

        Args:
            process: Also export the process metrics (``process_*``: CPU, memory, open
                files) and ``python_info``.
        """
        # No ``*_created`` series beside every counter and histogram: Prometheus does not use
        # them with this text format. (A process-wide switch of prometheus-client.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self.publish = PublishMetrics(self.registry)
        self._corrupt = Counter(
            "flux_recovery_corrupt_records",
            "Records that failed their checks when a log was opened after a crash: a torn "
            "tail cut off an active segment, or a sealed segment that reads stop in",
            registry=self.registry,
        )
        self._cut_bytes = Counter(
            "flux_recovery_cut_bytes",
            "Bytes recovery cut off the end of active segments (torn or corrupt tails)",
            registry=self.registry,
        )
        self._state = _BrokerCollector()
        self.registry.register(self._state)
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    def watch(
        self,
        *,
        streams: Callable[[], Iterable[LiveStream]] | None = None,
        nc: Client | None = None,
        readiness: Callable[[], str | None] | None = None,
        groups: GroupCoordinator | None = None,
    ) -> None:
        """Tell the scrape-time collector where to read (each argument given replaces one).

        Args:
            streams: Returns the streams this broker serves.
            nc: The broker's NATS connection.
            readiness: Returns why the broker is not ready, or ``None`` when it is.
            groups: The consumer-group coordinator.
        """
        if streams is not None:
            self._state.streams = streams
        if nc is not None:
            self._state.nc = nc
        if readiness is not None:
            self._state.readiness = readiness
        if groups is not None:
            self._state.groups = groups

    def recovered(self, stats: LogStats) -> None:
        """Count what recovery found when one log was opened."""
        corrupt = stats.torn_tail_recoveries + stats.corrupt_segments
        if corrupt:
            self._corrupt.inc(corrupt)
        if stats.cut_bytes:
            self._cut_bytes.inc(stats.cut_bytes)

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
