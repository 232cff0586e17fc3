"""Subscribe: one partition's committed records, streamed to the client in offset order.

The protocol is Liftbridge's (reference ``liftbridge-api.md`` §1.4, §3) with the precedence
rules of DESIGN.md §4::

    request ─▶ validate ─▶ resolve start and stop ─▶ handshake (one empty Message)
            ─▶ committed records from the start offset, in offset order, waiting at the end
            ─▶ the stream ends with a status

**Validation** happens before anything is sent, in Liftbridge's order: the consumer-group
fields (``readISRReplica`` with a consumer, or a consumer without ``consumerId`` or
``groupId``: INVALID_ARGUMENT), the partition (NOT_FOUND "No such partition"), the start and
stop positions (values proto3 passes through but the enums do not name: INVALID_ARGUMENT),
then the group's slot of the partition (epoch fencing, :func:`_group_slot`: an older epoch
than the current group subscriber's is GROUP_FENCED, FAILED_PRECONDITION; an equal or newer
one ends that subscriber with GROUP_FENCED and takes its place). ``readISRReplica`` alone is
accepted (this broker leads every partition it holds).

**Paused partitions**: with ``resume`` the partition is resumed first (every paused partition
of its stream if it was paused with ``resumeAll``; a failure is INTERNAL, a stream deleted
meanwhile STREAM_NOT_FOUND); without it the call fails with PARTITION_PAUSED
(FAILED_PRECONDITION) before the handshake.

**Start offset** (committed records only)::

    NEW_ONLY   newest + 1
    OFFSET     startOffset; negative means 0, below the oldest means the oldest; beyond
               newest + 1 the subscription waits there and delivers only records >= it
    EARLIEST   oldest
    LATEST     newest (delivered); on an empty partition, newest + 1 (as NEW_ONLY)
    TIMESTAMP  the first offset whose timestamp is >= startTimestamp (newest + 1 if none)

**Stop**::

    STOP_ON_CANCEL  never
    STOP_OFFSET     after stopOffset; stopOffset below the start is INVALID_ARGUMENT
    STOP_LATEST     after the newest offset at subscribe time; on an empty partition the
                    call fails with STREAM_EMPTY (RESOURCE_EXHAUSTED "Stream is empty")
    STOP_TIMESTAMP  after the last record whose timestamp is < stopTimestamp: before the first
                    record at or after it (also one that arrives later), or, once the broker's
                    clock has passed stopTimestamp, as soon as every written record has been
                    delivered (every later record is stamped at or after that time)

Reaching the stop ends the stream with STOP_REACHED (RESOURCE_EXHAUSTED "Stop offset
reached"); a stop already behind the start (``NEW_ONLY`` with ``STOP_LATEST`` on a partition
that has records) sends the handshake and ends the same way.

**Read-only partitions** end where they end: a subscriber that has delivered every committed
record of a read-only partition (its next offset is past the HW) ends with READONLY_END
(RESOURCE_EXHAUSTED "End of readonly partition", reason ``readonly-end``), whatever its stop
position, unless that stop is reached first. A subscriber waiting at the end when the
partition becomes read-only is woken and ends the same way; ``NEW_ONLY`` on a read-only
partition sends the handshake and ends at once.

**Other ends**: the stream's deletion (its logs close with ``LivePartition.deleted`` set) ends
the stream with STREAM_NOT_FOUND (NOT_FOUND, which Liftbridge clients read as "stream
deleted"); a pause of the partition (its log closes) ends it with PARTITION_PAUSED
(FAILED_PRECONDITION, which the Go client reads as ErrPartitionPaused); broker shutdown
(``closing``) or a log closed for any other reason ends it with UNAVAILABLE, on which clients
resubscribe from their last offset + 1. A corrupt record
propagates as :class:`~flux_broker.log.errors.CorruptRecordError` (INTERNAL, mapped by
:mod:`flux_broker.api.status`); records before it have been delivered. A client that cancels
ends the generator at its ``yield``; the reader is closed in every case.

Records are read in byte-bounded batches (the log's ``read_max_bytes``) and yielded one
message at a time: grpc.aio writes each yielded message before asking for the next, so at most
one batch per subscription is held and a slow client slows only its own subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Final

from flux_broker.api.context import BrokerContext
from flux_broker.api.status import FluxStatus
from flux_broker.clock import Clock
from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.contract import RecordBatch
from flux_broker.log.errors import LogClosedError
from flux_broker.log.format import HEADER, HEADER_BYTES, Record
from flux_broker.log.reader import ForwardReader
from flux_broker.streams.delivery import record_to_message
from flux_broker.streams.live import LivePartition, Subscriber
from flux_proto import api_pb2

__all__ = [
    "SUBSCRIBE_BATCH_DEFAULT_BYTES",
    "SUBSCRIBE_BATCH_MAX_BYTES",
    "subscribe",
    "subscribe_batch",
]

#: SubscribeBatch's byte budget per batch when the client sets none (reliability-plan §6.24).
SUBSCRIBE_BATCH_DEFAULT_BYTES: Final = 64 * 1024
#: The largest budget a client may ask for; larger requests are lowered to it.
SUBSCRIBE_BATCH_MAX_BYTES: Final = 4 * 1024 * 1024
_START_POSITIONS: Final = frozenset(api_pb2.StartPosition.values())
_STOP_POSITIONS: Final = frozenset(api_pb2.StopPosition.values())
_NS_PER_S: Final = 1_000_000_000
#: Shortest wait for the STOP_TIMESTAMP time to pass. The wait is timed by the event loop's
#: monotonic clock and checked against the broker's wall clock; the floor keeps a residue of a
#: few nanoseconds between the two from turning into a busy loop.
_STOP_TIME_WAIT_MIN_S: Final = 0.001


@dataclass(frozen=True, slots=True)
class _Stop:
    """Where a subscription ends; both ``None`` means never (STOP_ON_CANCEL).

    Attributes:
        last_offset: The last offset to deliver (STOP_OFFSET, STOP_LATEST).
        before_timestamp_ns: Deliver only records stamped before this (STOP_TIMESTAMP).
    """

    last_offset: int | None = None
    before_timestamp_ns: int | None = None

    def excludes(self, record: Record) -> bool:
        """Whether ``record`` lies past the stop (the stream ends before it)."""
        if self.last_offset is not None and record.offset > self.last_offset:
            return True
        return (
            self.before_timestamp_ns is not None and record.timestamp_ns >= self.before_timestamp_ns
        )

    def reached_at(self, offset: int) -> bool:
        """Whether nothing at or after ``offset`` may be delivered."""
        return self.last_offset is not None and offset > self.last_offset

    def reached_in_time(self, clock: Clock, caught_up: bool) -> bool:
        """Whether STOP_TIMESTAMP is met: everything written delivered, and its time passed."""
        return (
            caught_up
            and self.before_timestamp_ns is not None
            and clock.now_ns() >= self.before_timestamp_ns
        )

    def wait_s(self, clock: Clock) -> float | None:
        """How long to wait for records before checking :meth:`reached_in_time` again."""
        if self.before_timestamp_ns is None:
            return None
        remaining_ns = self.before_timestamp_ns - clock.now_ns()
        return max(remaining_ns / _NS_PER_S, _STOP_TIME_WAIT_MIN_S)


def _invalid(message: str) -> FluxStatus:
    return FluxStatus.from_entry("INVALID_ARGUMENT", message)


def _stop_reached() -> FluxStatus:
    return FluxStatus.from_entry("STOP_REACHED")


# -- validation ----------------------------------------------------------------------------


def _check_consumer(request: api_pb2.SubscribeRequest) -> None:
    """Liftbridge's checks of a consumer-group subscription, before the partition lookup."""
    if not request.HasField("consumer"):
        return
    if request.readISRReplica:
        raise _invalid("readISRReplica cannot be used with a consumer-group subscription")
    if not request.consumer.consumerId:
        raise _invalid("consumer.consumerId is required for a consumer-group subscription")
    if not request.consumer.groupId:
        raise _invalid("consumer.groupId is required for a consumer-group subscription")


def _check_positions(request: api_pb2.SubscribeRequest) -> None:
    if request.startPosition not in _START_POSITIONS:
        raise _invalid(f"unknown startPosition {request.startPosition}")
    if request.stopPosition not in _STOP_POSITIONS:
        raise _invalid(f"unknown stopPosition {request.stopPosition}")


def _find_partition(broker: BrokerContext, request: api_pb2.SubscribeRequest) -> LivePartition:
    _check_consumer(request)
    partition = broker.streams.partition(request.stream, request.partition)
    if partition is None:
        raise FluxStatus.from_entry("PARTITION_NOT_FOUND")
    _check_positions(request)
    return partition


async def _running(broker: BrokerContext, request: api_pb2.SubscribeRequest) -> LivePartition:
    """The requested partition, resumed first if it is paused and the request says so."""
    partition = _find_partition(broker, request)
    if partition.paused:
        if not request.resume:
            raise _paused(partition)
        await broker.streams.resume(partition.stream, partition.id)
    return partition


# -- start and stop ------------------------------------------------------------------------


def _start_offset(log: FileCommitLog, request: api_pb2.SubscribeRequest) -> int:
    """The first offset to deliver (records below it are never sent)."""
    position = request.startPosition
    if position == api_pb2.OFFSET:
        return max(request.startOffset, 0, log.oldest_offset)
    if position == api_pb2.EARLIEST:
        return log.oldest_offset
    if position == api_pb2.LATEST:
        # An empty partition has no newest record: start where the next one will be.
        return max(log.newest_offset, log.oldest_offset)
    if position == api_pb2.TIMESTAMP:
        return log.offset_for_timestamp(request.startTimestamp)
    assert position == api_pb2.NEW_ONLY, position
    return log.newest_offset + 1


def _stop(log: FileCommitLog, request: api_pb2.SubscribeRequest, start: int) -> _Stop:
    """Where to stop, checked against ``start``.

    Raises:
        FluxStatus: INVALID_ARGUMENT for a stopOffset below the start; STREAM_EMPTY for
            STOP_LATEST on an empty partition.
    """
    position = request.stopPosition
    if position == api_pb2.STOP_OFFSET:
        if request.stopOffset < start:
            raise _invalid(f"stopOffset {request.stopOffset} is before the start offset {start}")
        return _Stop(last_offset=request.stopOffset)
    if position == api_pb2.STOP_LATEST:
        if log.newest_offset < log.oldest_offset:
            raise FluxStatus.from_entry("STREAM_EMPTY")
        return _Stop(last_offset=log.newest_offset)
    if position == api_pb2.STOP_TIMESTAMP:
        return _Stop(before_timestamp_ns=request.stopTimestamp)
    assert position == api_pb2.STOP_ON_CANCEL, position
    return _Stop()


# -- ends ----------------------------------------------------------------------------------


def _log_closed(partition: LivePartition, closing: asyncio.Event, pauses: int) -> FluxStatus:
    """The status for a partition log that closed under a subscription.

    Args:
        partition: The partition.
        closing: The broker's shutdown event.
        pauses: The partition's pause count when the subscription opened its log; a different
            count now means a pause closed it (even if the partition was resumed since).
    """
    if closing.is_set():
        return _shutting_down()
    if partition.deleted:
        return FluxStatus.from_entry("STREAM_NOT_FOUND", f"stream {partition.stream!r} was deleted")
    if partition.paused or partition.pauses != pauses:
        return _paused(partition)
    return _shutting_down()


def _paused(partition: LivePartition) -> FluxStatus:
    return FluxStatus.from_entry(
        "PARTITION_PAUSED",
        f"stream {partition.stream!r} partition {partition.id} is paused; subscribe with "
        "resume=true, or publish to it, to resume it",
    )


def _readonly_end() -> FluxStatus:
    return FluxStatus.from_entry("READONLY_END")


def _shutting_down() -> FluxStatus:
    return FluxStatus.from_entry(
        "UNAVAILABLE", "the broker is shutting down; resubscribe from the last offset + 1"
    )


# -- reading -------------------------------------------------------------------------------


async def _wait_for_batch(
    reader: ForwardReader,
    closing: asyncio.Event,
    changed: asyncio.Event,
    timeout_s: float | None,
    budget_bytes: int,
) -> RecordBatch | None:
    """Wait for the next committed batch, racing shutdown, a partition change and a timeout.

    The batch holds at most ``budget_bytes`` of records (at least one record), as one read
    without waiting would.

    Returns:
        The batch, or ``None`` when ``timeout_s`` passed or the partition changed first.

    Raises:
        FluxStatus: UNAVAILABLE when ``closing`` was set first.
        LogClosedError: The log closed.
        CorruptRecordError: The next record is corrupt.
    """
    read = asyncio.ensure_future(reader.read(budget_bytes))
    closed = asyncio.ensure_future(closing.wait())
    change = asyncio.ensure_future(changed.wait())
    waits = (read, closed, change)
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        pending = [task for task in waits if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    if closing.is_set():
        if not read.cancelled():
            read.exception()  # retrieved: a read that failed meanwhile is not logged as lost
        raise _shutting_down()
    # A read cancelled above (the timeout or a change came first) has no result.
    return read.result() if read.done() and not read.cancelled() else None


async def _batches(
    partition: LivePartition,
    reader: ForwardReader,
    *,
    start: int,
    stop: _Stop,
    closing: asyncio.Event,
    clock: Clock,
    budget_bytes: int,
) -> AsyncGenerator[RecordBatch, None]:
    """Yield committed batches from ``start`` up to ``stop``; raise the status that ends the call.

    Each batch holds at most ``budget_bytes`` of records (at least one record), cut to the
    start and the stop.
    """
    log = partition.log
    while True:
        if closing.is_set():
            raise _shutting_down()
        if stop.reached_at(max(reader.next_offset, start)):
            raise _stop_reached()
        batch = reader.read_nowait(budget_bytes)
        if batch is None:
            # Taken before the checks, so a change right after them still wakes the wait.
            changed = partition.changed()
            if partition.readonly and reader.next_offset > log.high_watermark:
                raise _readonly_end()
            if stop.reached_in_time(clock, caught_up=reader.next_offset > log.newest_offset):
                raise _stop_reached()
            batch = await _wait_for_batch(
                reader, closing, changed, stop.wait_s(clock), budget_bytes
            )
            if batch is None:
                continue
        cut, stopped = _cut(batch, start, stop)
        if cut is not None:
            yield cut
        if stopped:
            raise _stop_reached()


def _cut(batch: RecordBatch, start: int, stop: _Stop) -> tuple[RecordBatch | None, bool]:
    """``batch`` without records before ``start`` or past ``stop``; and whether it hit the stop.

    Only a batch that straddles the start or an offset stop, or any batch under a timestamp
    stop, is walked record by record (headers only); others pass as they are.
    """
    last_offset = stop.last_offset
    if (
        batch.first_offset >= start
        and (last_offset is None or batch.last_offset <= last_offset)
        and stop.before_timestamp_ns is None
    ):
        return batch, False
    data = batch.data
    begin = end = position = 0
    first = -1
    last = -1
    stopped = False
    while position < len(data):
        offset, timestamp_ns, _epoch, body_size = HEADER.unpack_from(data, position)
        size = HEADER_BYTES + body_size
        if offset < start:
            begin = end = position + size
        elif (last_offset is not None and offset > last_offset) or (
            stop.before_timestamp_ns is not None and timestamp_ns >= stop.before_timestamp_ns
        ):
            stopped = True
            break
        else:
            if first < 0:
                first = offset
            last = offset
            end = position + size
        position += size
    if first < 0:
        return None, stopped
    return RecordBatch(data[begin:end], first, last, last - first + 1), stopped


async def _deliver(
    partition: LivePartition,
    reader: ForwardReader,
    subscriber: Subscriber,
    *,
    start: int,
    stop: _Stop,
    closing: asyncio.Event,
    clock: Clock,
) -> AsyncGenerator[api_pb2.Message, None]:
    """Yield the messages from ``start`` until ``stop``; raise the status that ends the call."""
    batches = _batches(
        partition,
        reader,
        start=start,
        stop=stop,
        closing=closing,
        clock=clock,
        budget_bytes=partition.log.config.read_max_bytes,
    )
    async with contextlib.aclosing(batches):
        async for batch in batches:
            subscriber.sent(batch)
            for record in batch.records():
                yield record_to_message(record, partition.stream, partition.id, partition.subject)


async def subscribe(
    broker: BrokerContext, request: api_pb2.SubscribeRequest, closing: asyncio.Event
) -> AsyncGenerator[api_pb2.Message, None]:
    """Stream one partition's committed messages after the empty handshake message.

    Args:
        broker: The broker.
        request: The client's request.
        closing: Set when the broker shuts down; the stream then ends with UNAVAILABLE.

    Yields:
        The handshake (an empty ``Message``), then one ``Message`` per committed record.

    Raises:
        FluxStatus: The status that ends the stream: a validation error (or PARTITION_PAUSED)
            before the handshake, or STOP_REACHED, READONLY_END, STREAM_NOT_FOUND (deleted),
            PARTITION_PAUSED or UNAVAILABLE after it.
        CorruptRecordError: A stored record failed its checks.
    """
    partition, pauses, start, stop, reader = await _open(broker, request, closing)
    try:
        with (
            partition.subscription(start) as subscriber,
            _group_slot(broker, request, partition, closing) as ending,
        ):
            yield api_pb2.Message()
            messages = _deliver(
                partition,
                reader,
                subscriber,
                start=start,
                stop=stop,
                closing=ending,
                clock=broker.clock,
            )
            async with contextlib.aclosing(messages):
                async for message in messages:
                    yield message
    except LogClosedError:
        raise _log_closed(partition, closing, pauses) from None
    finally:
        reader.close()


@contextlib.contextmanager
def _group_slot(
    broker: BrokerContext,
    request: api_pb2.SubscribeRequest,
    partition: LivePartition,
    closing: asyncio.Event,
) -> Iterator[asyncio.Event]:
    """Hold the partition's slot of a consumer-group subscription (epoch fencing).

    Yields the event that ends the subscription: ``closing`` for a plain subscription; for a
    group one, also set when a subscription of the same group with an equal or newer epoch
    takes the slot, which then ends this one with GROUP_FENCED (FAILED_PRECONDITION).

    Raises:
        GroupFencedError: The slot is held with a newer epoch (before the handshake).
    """
    if not request.HasField("consumer"):
        yield closing
        return
    if broker.groups is None:
        raise _shutting_down()
    consumer = request.consumer
    with broker.groups.subscriptions.hold(
        group=consumer.groupId,
        consumer=consumer.consumerId,
        epoch=consumer.groupEpoch,
        stream=partition.stream,
        partition=partition.id,
        closing=closing,
    ) as slot:
        try:
            yield slot.ending
        except FluxStatus as status:
            if slot.replaced and status.entry.name == "UNAVAILABLE":
                raise FluxStatus.from_entry(
                    "GROUP_FENCED",
                    "a subscription of the same consumer group with an equal or newer epoch "
                    "took this partition",
                ) from None
            raise


async def _open(
    broker: BrokerContext, request: api_pb2.SubscribeRequest, closing: asyncio.Event
) -> tuple[LivePartition, int, int, _Stop, ForwardReader]:
    """Validate, resume, and open a committed reader: (partition, pauses, start, stop, reader)."""
    partition = await _running(broker, request)
    if closing.is_set():
        raise _shutting_down()
    pauses = partition.pauses
    try:
        log = partition.log
        start = _start_offset(log, request)
        stop = _stop(log, request, start)
        reader = log.reader(start, committed=True)
    except LogClosedError:
        raise _log_closed(partition, closing, pauses) from None
    return partition, pauses, start, stop, reader


async def subscribe_batch(
    broker: BrokerContext, request: api_pb2.SubscribeBatchRequest, closing: asyncio.Event
) -> AsyncGenerator[api_pb2.RecordBatch, None]:
    """Stream one partition's committed records in batches after an empty handshake batch.

    The positions, checks and ends are those of :func:`subscribe`, except that reaching the
    stop ends the stream normally (OK). Each batch holds at most ``maxBytes`` of records (0:
    :data:`SUBSCRIBE_BATCH_DEFAULT_BYTES`, capped at :data:`SUBSCRIBE_BATCH_MAX_BYTES`), and
    at least one record.

    Raises:
        FluxStatus: As :func:`subscribe`, but never STOP_REACHED; INVALID_ARGUMENT for a
            negative ``maxBytes``.
    """
    if request.maxBytes < 0:
        raise _invalid(f"maxBytes {request.maxBytes} is negative: use 0 for the default")
    budget_bytes = min(request.maxBytes or SUBSCRIBE_BATCH_DEFAULT_BYTES, SUBSCRIBE_BATCH_MAX_BYTES)
    partition, pauses, start, stop, reader = await _open(broker, request.subscribe, closing)
    try:
        with (
            partition.subscription(start) as subscriber,
            _group_slot(broker, request.subscribe, partition, closing) as ending,
        ):
            yield api_pb2.RecordBatch(
                firstOffset=-1, lastOffset=-1, highWatermark=partition.high_watermark
            )
            batches = _batches(
                partition,
                reader,
                start=start,
                stop=stop,
                closing=ending,
                clock=broker.clock,
                budget_bytes=budget_bytes,
            )
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    subscriber.sent(batch)
                    yield api_pb2.RecordBatch(
                        records=batch.data,
                        recordCount=batch.count,
                        firstOffset=batch.first_offset,
                        lastOffset=batch.last_offset,
                        highWatermark=partition.high_watermark,
                    )
    except LogClosedError:
        raise _log_closed(partition, closing, pauses) from None
    except FluxStatus as status:
        if status.entry.name != "STOP_REACHED":
            raise
    finally:
        reader.close()
