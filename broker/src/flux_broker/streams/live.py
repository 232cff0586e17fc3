"""The partitions and streams a broker serves, as the gRPC handlers see them.

A :class:`LivePartition` lives as long as its stream does on this broker, whatever happens to
its log: pausing closes the log and stops the leader but keeps the object (so lookups, metadata
and subscriber counts go on), resuming opens a new log and a new leader in it. Its
:attr:`~LivePartition.state` says which::

    ACTIVE ──pause──▶ PAUSED ──resume──▶ ACTIVE
       │                 │
       └──── delete ─────┴──▶ DELETED        (broker shutdown: CLOSED)

Only the :class:`~flux_broker.streams.manager.StreamManager` changes the state, the log and the
leader, under its lock. Readers take what they need when they need it: :attr:`LivePartition.log`
raises :class:`~flux_broker.log.errors.LogClosedError` while no log is open (a paused
partition), and the offsets (:attr:`~LivePartition.high_watermark`,
:attr:`~LivePartition.newest_offset`) are answered in every state.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from flux_broker.clock import Clock
from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.contract import RecordBatch, Traffic
from flux_broker.log.errors import LogClosedError
from flux_broker.metadata import Partition, Stream
from flux_broker.streams.partition import Partition as PartitionLeader
from flux_broker.streams.partition import PartitionStats
from flux_broker.streams.producers import ProducerTable

__all__ = ["LivePartition", "LiveStream", "PartitionState", "Subscriber"]


class PartitionState(enum.Enum):
    """What a :class:`LivePartition` is doing (see the module docstring)."""

    #: Log open, leader subscribed to NATS and appending.
    ACTIVE = "active"
    #: Log closed, no NATS subscription; a publish or a resuming subscription reopens it.
    PAUSED = "paused"
    #: Its stream was deleted; subscribers that end now answer NOT_FOUND.
    DELETED = "deleted"
    #: The broker is shutting down.
    CLOSED = "closed"


class LivePartition:
    """A partition this broker serves: metadata, state, and while active its log and leader.

    Attributes:
        stream: The stream's name.
        id: The partition id.
        subject: The partition's NATS subject.
        metadata: Its metadata (leader, replicas, ISR, epochs, flags) as last applied.
        state: See :class:`PartitionState`.
        stats: The ingest counters, kept across pauses (every leader of it adds to them).
        pauses: How often it was paused since the broker started; a subscriber whose log
            closed under it and sees a different count knows a pause closed it.
        subscribers: Subscribe calls reading it now.
        written: Records written to it, over every log it had (metrics: messages in).
        delivered: Records sent to its subscribers (metrics: messages out).
        unsubscribed_ns: When its last subscriber left (Unix ns; 0 = never).
        activated_ns: When it last became active (Unix ns).
        auto_pause: The task that pauses it when idle, while active (``None`` when off).
    """

    __slots__ = (
        "_changed",
        "_clock",
        "_leader",
        "_log",
        "_no_subscribers",
        "_offsets",
        "_producers",
        "_subscriptions",
        "activated_ns",
        "auto_pause",
        "delivered",
        "id",
        "metadata",
        "pauses",
        "state",
        "stats",
        "stream",
        "subject",
        "subscribers",
        "unsubscribed_ns",
        "written",
    )

    def __init__(
        self, *, stream: str, id: int, subject: str, metadata: Partition, clock: Clock
    ) -> None:
        """Describe the partition, paused and without a log; the manager opens it."""
        self.stream = stream
        self.id = id
        self.subject = subject
        self.metadata = metadata
        self.state = PartitionState.PAUSED
        self.stats = PartitionStats()
        self.pauses = 0
        self.subscribers = 0
        self.written = Traffic()
        self.delivered = Traffic()
        self._subscriptions: set[Subscriber] = set()
        self.unsubscribed_ns = 0
        self.activated_ns = 0
        self.auto_pause: asyncio.Task[None] | None = None
        self._clock = clock
        self._log: FileCommitLog | None = None
        self._leader: PartitionLeader | None = None
        self._offsets = (-1, -1)  # (HW, newest) while no log is open
        self._producers: ProducerTable | None = None
        self._changed = asyncio.Event()
        self._no_subscribers = asyncio.Event()
        self._no_subscribers.set()

    # -- state -----------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """Whether it is paused."""
        return self.state is PartitionState.PAUSED

    @property
    def deleted(self) -> bool:
        """Whether its stream was deleted."""
        return self.state is PartitionState.DELETED

    @property
    def readonly(self) -> bool:
        """Whether it refuses new messages (the metadata's flag)."""
        return self.metadata.readonly

    @property
    def has_log(self) -> bool:
        """Whether a log is attached (open, or being closed)."""
        return self._log is not None

    @property
    def log(self) -> FileCommitLog:
        """Its commit log (possibly closed, when its stream was deleted or the broker stops).

        Raises:
            LogClosedError: No log is open: the partition is paused.
        """
        if self._log is None:
            raise LogClosedError(f"stream {self.stream!r} partition {self.id} is paused")
        return self._log

    @property
    def leader(self) -> PartitionLeader:
        """The NATS ingest of the partition.

        Raises:
            LogClosedError: The partition is paused.
        """
        if self._leader is None:
            raise LogClosedError(f"stream {self.stream!r} partition {self.id} is paused")
        return self._leader

    @property
    def producers(self) -> ProducerTable:
        """The idempotent producers of the open log (rebuilt from each newly opened log).

        Raises:
            LogClosedError: The partition is paused.
        """
        if self._producers is None:
            raise LogClosedError(f"stream {self.stream!r} partition {self.id} is paused")
        return self._producers

    @property
    def high_watermark(self) -> int:
        """Its HW: the log's, or the last known one while paused (-1 when empty)."""
        return self._offsets[0] if self._log is None else self._log.high_watermark

    @property
    def newest_offset(self) -> int:
        """Its newest offset: the log's, or the last known one while paused (-1 when empty)."""
        return self._offsets[1] if self._log is None else self._log.newest_offset

    # -- the manager's side ----------------------------------------------------------------

    def attach(self, log: FileCommitLog, leader: PartitionLeader) -> None:
        """Hold a freshly opened log and its (not yet started) leader."""
        assert self._log is None, "attach only a partition without a log"
        log.written = self.written  # counted on, across pauses
        self._log = log
        self._leader = leader
        self._producers = ProducerTable()

    def release(self, offsets: tuple[int, int] | None = None) -> None:
        """Let go of the (closed) log and its leader, remembering the offsets.

        Args:
            offsets: The (HW, newest offset) to answer while paused; default: the log's.
        """
        if offsets is None and self._log is not None:
            offsets = (self._log.high_watermark, self._log.newest_offset)
        if offsets is not None:
            self._offsets = offsets
        self._log = None
        self._leader = None
        self._producers = None

    def changed(self) -> asyncio.Event:
        """An event set at the next state or flag change (take it before checking the state)."""
        return self._changed

    def notify(self) -> None:
        """Wake everyone waiting in :meth:`changed`: the state or a flag changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- subscribers -----------------------------------------------------------------------

    @contextlib.contextmanager
    def subscription(self, start_offset: int = 0) -> Iterator[Subscriber]:
        """Count a Subscribe call reading the partition for as long as the block runs.

        Args:
            start_offset: The first offset it will deliver (for its lag).

        Yields:
            Its :class:`Subscriber`: tell it each batch sent.
        """
        subscriber = Subscriber(self.delivered, start_offset - 1)
        self._subscriptions.add(subscriber)
        self.subscribers += 1
        self._no_subscribers.clear()
        try:
            yield subscriber
        finally:
            self._subscriptions.discard(subscriber)
            self.subscribers -= 1
            if self.subscribers == 0:
                self.unsubscribed_ns = self._clock.now_ns()
                self._no_subscribers.set()

    async def wait_unsubscribed(self) -> None:
        """Return once no Subscribe call reads the partition."""
        await self._no_subscribers.wait()

    def subscriber_lag(self) -> int:
        """The most committed records one subscriber has yet to be sent (0 without any)."""
        hw = self.high_watermark
        behind = max((hw - s.last_offset for s in self._subscriptions), default=0)
        return max(behind, 0)


class Subscriber:
    """One Subscribe call reading a partition, as the metrics see it.

    Attributes:
        last_offset: The last offset sent (the start offset - 1 before the first batch).
    """

    __slots__ = ("_delivered", "last_offset")

    def __init__(self, delivered: Traffic, last_offset: int) -> None:
        """Count into the partition's ``delivered``; nothing sent yet up to ``last_offset``."""
        self._delivered = delivered
        self.last_offset = last_offset

    def sent(self, batch: RecordBatch) -> None:
        """Count ``batch`` as sent to the subscriber (once per batch, never per record)."""
        self.last_offset = batch.last_offset
        delivered = self._delivered
        delivered.records += batch.count
        delivered.bytes += len(batch.data)


@dataclass(slots=True, eq=False)
class LiveStream:
    """A stream this broker serves.

    Attributes:
        metadata: The stream's metadata as last applied.
        partitions: Its partitions, by id.
    """

    metadata: Stream
    partitions: list[LivePartition] = field(default_factory=list)
