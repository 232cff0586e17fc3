"""Starting and stopping partitions: their logs, their leaders and their auto-pause timers.

The :class:`~flux_broker.streams.manager.StreamManager` decides *when* (after the metadata
command is durable, under its lock); the :class:`PartitionRunner` does the work:

- :meth:`PartitionRunner.open_stream` builds a stream's live partitions and activates the ones
  the metadata does not say are paused. A paused one gets no log; its offsets come from its HW
  checkpoint.
- :meth:`PartitionRunner.activate` opens the logs (HW = newest offset: the ISR is this broker
  alone; the leader epoch from the metadata), then starts the leaders (each subscribed to NATS
  when this returns), then marks the partitions active and starts their auto-pause timers.
  No leader starts, and so nothing is acked, before every log of the call is open.
- :meth:`PartitionRunner.deactivate` puts partitions into a new state first (synchronously, so
  a concurrent publish sees it before anything is awaited), cancels their timers, stops their
  leaders (draining NATS: what was delivered is stored and acked), closes their logs, and
  wakes everyone waiting on them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nats.aio.client import Client

from flux_broker.clock import Clock
from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.config import LogConfig
from flux_broker.logs import partition_context
from flux_broker.metadata import Partition, Stream
from flux_broker.nats.subjects import partition_subject
from flux_broker.streams.auto_pause import AutoPause, run_auto_pause
from flux_broker.streams.live import LivePartition, LiveStream, PartitionState
from flux_broker.streams.partition import Partition as PartitionLeader
from flux_broker.streams.producers import cut_partial_batch
from flux_broker.streams.storage import close_partitions, read_high_watermark, stream_log_config

if TYPE_CHECKING:
    from flux_broker.metrics import BrokerMetrics

__all__ = ["PartitionRunner", "Pauser"]

#: Given a partition and its auto-pause settings, the coroutine function its timer calls to
#: pause it (the manager re-checks, under its lock, that the pause is still due).
Pauser = Callable[[LivePartition, AutoPause], Callable[[], Awaitable[None]]]


class PartitionRunner:
    """Opens and closes partitions' logs and leaders for the stream manager."""

    def __init__(
        self,
        *,
        streams_dir: Path,
        nc: Client,
        namespace: str,
        log_config: LogConfig,
        batch_max_messages: int,
        clock: Clock,
        auto_pause_time_s: float,
        auto_pause_disable_if_subscribers: bool,
        pauser: Pauser,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        """Describe the runner (see :class:`~flux_broker.streams.manager.StreamManager`)."""
        self.streams_dir = streams_dir
        self.log_config = log_config
        self._nc = nc
        self._namespace = namespace
        self._batch_max_messages = batch_max_messages
        self._clock = clock
        self._auto_pause_time_s = auto_pause_time_s
        self._auto_pause_disable = auto_pause_disable_if_subscribers
        self._pauser = pauser
        self._metrics = metrics

    def auto_pause(self, stream: Stream) -> AutoPause | None:
        """The stream's auto-pause settings; ``None`` when it never auto-pauses."""
        return AutoPause.of(
            stream.config,
            default_s=self._auto_pause_time_s,
            default_disable_if_subscribers=self._auto_pause_disable,
        )

    async def open_stream(self, stream: Stream) -> LiveStream:
        """The live stream, with every partition the metadata does not mark paused active.

        Raises:
            OSError: A log could not be opened; whatever was opened is closed again.
            nats.errors.Error: A leader could not subscribe; likewise.
        """
        live = LiveStream(stream)
        for meta in stream.partitions:
            live.partitions.append(
                LivePartition(
                    stream=stream.name,
                    id=meta.id,
                    subject=partition_subject(stream.subject, meta.id),
                    metadata=meta,
                    clock=self._clock,
                )
            )
        try:
            await self.activate(live, [p for p in live.partitions if not p.metadata.paused])
        except BaseException:
            await self.deactivate(live.partitions, PartitionState.CLOSED)
            raise
        for partition in live.partitions:
            if partition.metadata.paused:
                directory = self._directory(stream.name, partition.id)
                hw = await asyncio.to_thread(read_high_watermark, directory)
                partition.release(offsets=(hw, hw))  # a cluster of one: newest = HW
        return live

    async def activate(self, live: LiveStream, partitions: Sequence[LivePartition]) -> None:
        """Open the partitions' logs, start their leaders, mark them active, start timers.

        On failure the caller deactivates them (what was opened is closed).

        Raises:
            OSError: A log could not be opened.
            nats.errors.Error: A leader could not subscribe.
        """
        stream = live.metadata
        config = stream_log_config(self.log_config, stream.config)
        for partition in partitions:
            # Recovery (in a worker thread) and the log's own tasks log with the partition.
            with partition_context(stream.name, partition.id):
                log = await FileCommitLog.open(
                    self._directory(stream.name, partition.id), config, self._clock
                )
                if self._metrics is not None:
                    self._metrics.recovered(log.stats)
                await cut_partial_batch(log)
            # A cluster of one: everything written is on the whole ISR, so it is committed.
            log.set_high_watermark(log.newest_offset)
            meta = partition.metadata
            if meta.leader_epoch > log.leader_epoch:
                log.set_leader_epoch(meta.leader_epoch)
            partition.attach(log, self._new_leader(stream, meta, log, config, partition))
        for partition in partitions:
            with partition_context(stream.name, partition.id):  # inherited by its ingest task
                await partition.leader.start()
        policy = self.auto_pause(stream)
        for partition in partitions:
            partition.state = PartitionState.ACTIVE
            partition.activated_ns = self._clock.now_ns()
            if policy is not None:
                timer = run_auto_pause(
                    partition, policy, self._clock, self._pauser(partition, policy)
                )
                with partition_context(stream.name, partition.id):
                    partition.auto_pause = asyncio.create_task(
                        timer, name=f"auto-pause-{stream.name}-{partition.id}"
                    )
            partition.notify()

    async def deactivate(self, partitions: Sequence[LivePartition], state: PartitionState) -> None:
        """Put the partitions in ``state``, stop their leaders and close their logs.

        The state changes before anything is awaited. A partition that fails to stop or close
        is logged; the others are closed regardless.
        """
        for partition in partitions:
            partition.state = state
            task, partition.auto_pause = partition.auto_pause, None
            if task is not None:
                task.cancel()
        await close_partitions([p for p in partitions if p.has_log])
        for partition in partitions:
            if state is PartitionState.PAUSED:
                partition.release()
            partition.notify()

    def _directory(self, stream: str, partition_id: int) -> Path:
        return self.streams_dir / stream / str(partition_id)

    def _new_leader(
        self,
        stream: Stream,
        meta: Partition,
        log: FileCommitLog,
        config: LogConfig,
        partition: LivePartition,
    ) -> PartitionLeader:
        return PartitionLeader(
            stream=stream.name,
            partition_id=meta.id,
            subject=stream.subject,
            group=stream.group,
            log=log,
            nc=self._nc,
            namespace=self._namespace,
            record_max_bytes=config.record_max_bytes,
            batch_max_messages=self._batch_max_messages,
            clock=self._clock,
            optimistic_concurrency=bool(stream.config.optimistic_concurrency_control),
            readonly=meta.readonly,
            stats=partition.stats,
            metrics=None if self._metrics is None else self._metrics.publish,
        )
