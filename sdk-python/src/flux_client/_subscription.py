"""Subscription: one or more partitions of a stream read through one async iterator.

Each partition has a **fetch task** that holds one ``SubscribeBatch`` call to the partition's
leader and puts the decoded batches into **one buffer** shared by the subscription; the
iterator takes messages from it in arrival order (offset order within a partition)::

    fetch task, partition 0 ──┐
    fetch task, partition 1 ──┼──▶ buffer (max_buffer_bytes) ──▶ __anext__ ──▶ Message
    fetch task, partition 2 ──┘      bytes freed as each batch is delivered

**Backpressure** is pull-driven: a fetch task whose next batch does not fit waits before it
reads another one from its call, so gRPC flow control slows the broker; nothing is dropped.
The buffer counts the bytes of records as framed on the wire, and stays within its bound: a
batch larger than ``max_batch_bytes`` (the broker sends records that arrive while a subscriber
waits at the end of the partition as they were written) goes in in pieces of about that size;
only a single record larger than the bound goes in alone, into an empty buffer. Besides the
buffer, each fetch task holds the batch it is putting in and gRPC's flow-control window.

**Resubscribing.** A retriable failure (a lost connection, ``UNAVAILABLE`` from a broker
shutting down, a slow-consumer cut, a leader change, no handshake within the client's request
timeout) or a call that ends without error before the stop refreshes the stream's metadata,
waits the client's :class:`~flux_client.RetryPolicy` backoff and subscribes again to the
leader. The attempts count per outage: the budget is restored once a broker accepts the
subscription again (its handshake arrives). An exhausted budget fails the subscription with the
last error. The new call starts at the **last received offset + 1**; before any record was
received it starts at the *original* start, resolved to an offset wherever that is known:

- ``Start.offset(n)`` is ``n``; ``Start.cursor(id)`` is read once (the stored offset + 1, or
  the earliest record when the cursor was never set) and kept.
- ``Start.NEW_ONLY`` and ``Start.LATEST``: the handshake of the first accepted call carries the
  partition's high watermark ``hw`` read at the same instant the broker chose its start (the
  newest offset + 1, or the newest offset), and ``hw`` never passes the newest offset. So a
  resubscribe starts at ``hw + 1`` (``NEW_ONLY``) or ``max(hw, 0)`` (``LATEST``): never after
  the original start, so no record published meanwhile is skipped; at most the records that
  were written but not yet committed when the first call opened are delivered too. A failure
  before any broker accepted the subscription re-sends the position as it is: the subscription
  starts when the broker first accepts it.
- ``Start.EARLIEST`` and ``Start.timestamp(ns)`` are sent again as they are (they name the same
  first record, or one after it that retention left).

**Stops** are kept across resubscribes: ``Stop.offset(n)`` and ``Stop.timestamp(ns)`` as given;
``Stop.LATEST`` is resolved once, before the first call, to the partition's newest offset (from
its leader's ``FetchPartitionMetadata``), and sent as that offset from then on.

**What ends a partition cleanly** (the iteration ends once every partition has, and the buffer
is drained): its stop was delivered (the call ends with OK: ``SubscribeBatch`` ends with OK
only at the stop; a call that ends so without a stop, or before an offset stop after
delivering records, is resubscribed); ``STREAM_EMPTY`` (``Stop.LATEST``
on an empty partition: ended before the first call); ``READONLY_END`` (every record of a
read-only partition delivered); and, for a ``Stop.LATEST`` resolved by the client, a stop that
lies before the start (the broker refuses it with ``INVALID_ARGUMENT``; Flux's own
``STOP_LATEST`` ends such a subscription at once, e.g. ``NEW_ONLY`` with ``Stop.LATEST``).

**Failures.** A non-retriable error (``StreamNotFoundError``, ``PartitionNotFoundError``,
``InvalidArgumentError``, ``PartitionPausedError`` — retried instead when the subscription was
made with ``resume``, which resumes the partition —, …) or an exhausted retry budget stops
every fetch task; records already buffered are delivered first, then the error is
raised by ``__anext__`` — and again by every later call, also after :meth:`Subscription.close`.

**Breaking out closes it.** ``async for msg in client.subscribe(...)`` iterates a small
iterator object whose finaliser closes the subscription: ``break``, ``return`` or an exception
in the loop body drops it, and CPython finalises it at once, which cancels the fetch tasks and
their calls. (An async generator finalised through the loop's asyncgen hooks would do the same,
but an async generator cannot raise the same error twice.) Inside ``async with
client.subscribe(...) as sub:`` the block owns the subscription instead: leaving the loop does
not close it, leaving the block does.

**Keepalive.** A call on a dead connection is noticed by the client's gRPC keepalive (about
``keepalive_ms + keepalive_timeout_ms``), counted in :attr:`SubscriptionStats.reconnects`, and
retried like any lost connection; records flow again as soon as the broker is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from itertools import repeat
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Final, Self, TypeVar, cast

import grpc

from flux_client._errors import (
    CallTimeoutError,
    CorruptRecordError,
    FluxError,
    InvalidArgumentError,
    NotLeaderError,
    PartitionPausedError,
    ReadonlyEndError,
    StopReachedError,
    StreamEmptyError,
    UnavailableError,
    UnknownError,
    from_rpc_error,
)
from flux_client._records import CorruptRecordError as _CorruptBytesError
from flux_client._records import decode_records, uniform_columns
from flux_client._retry import Backoff
from flux_client._types import Message, Start, Stop, _StartKind, _StopKind
from flux_proto import api_pb2

if TYPE_CHECKING:
    from flux_client._client import Client

__all__ = [
    "DEFAULT_SUBSCRIBE_BATCH_BYTES",
    "DEFAULT_SUBSCRIBE_BUFFER_BYTES",
    "MAX_SUBSCRIBE_BATCH_BYTES",
    "PartitionStats",
    "Subscription",
    "SubscriptionStats",
]

#: Bytes of records per batch the broker sends (its own default): ~400 records of 128 B, so
#: the per-message gRPC cost is spread thin while a batch stays small next to the buffer.
DEFAULT_SUBSCRIBE_BATCH_BYTES: Final = 64 * 1024
#: The broker's largest batch; a larger ``max_batch_bytes`` is refused.
MAX_SUBSCRIBE_BATCH_BYTES: Final = 4 * 1024 * 1024
#: Bytes of records a subscription buffers before its fetch tasks wait: 128 default batches,
#: enough to keep a fast consumer fed across a fetch round trip, small next to a process.
DEFAULT_SUBSCRIBE_BUFFER_BYTES: Final = 8 * 1024 * 1024
#: How long :meth:`Subscription.close` waits for its tasks when no bound is given. Closing
#: cancels them, which finishes at once; the bound only guards against a stuck callback.
_DEFAULT_CLOSE_TIMEOUT_S: Final = 5.0
#: Header names under which Liftbridge keeps a NATS message's subject and reply subject.
_SUBJECT_HEADER: Final = "subject"
_REPLY_HEADER: Final = "reply"
#: The headers of a record that has none (read-only, shared by every such message).
_NO_HEADERS: Final[Mapping[str, bytes]] = MappingProxyType({})
#: Errors that end a partition cleanly: its end was reached.
_CLEAN_ENDS: Final = (StreamEmptyError, ReadonlyEndError, StopReachedError)
#: Tasks of subscriptions closed by a finaliser, kept referenced until they have finished.
_LINGERING: Final[set[asyncio.Task[None]]] = set()

T = TypeVar("T")
_Call = grpc.aio.UnaryStreamCall[api_pb2.SubscribeBatchRequest, api_pb2.RecordBatch]


@dataclass(frozen=True, slots=True)
class PartitionStats:
    """One partition of a subscription (part of :class:`SubscriptionStats`).

    Attributes:
        lag: Committed records not yet delivered to the application: the partition's newest
            known high watermark minus the last delivered offset (0 while unknown). The high
            watermark comes with each batch, so while the buffer is full (fetching paused) it
            is the one of the batch waiting for room, and the lag may be larger by then.
        high_watermark: The high watermark the broker last reported (-1: none yet).
        last_delivered_offset: Offset of the last message the iterator returned (-1: none).
        delivered: Messages of this partition the iterator returned.
        buffered_bytes: Bytes of this partition's records received but not yet delivered.
        reconnects: Times the partition's call was lost (or refused) and tried again.
        connected: Whether a call is open and its handshake received.
        finished: Whether the partition ended (its stop reached, or the subscription failed
            or was closed).
    """

    lag: int
    high_watermark: int
    last_delivered_offset: int
    delivered: int
    buffered_bytes: int
    reconnects: int
    connected: bool
    finished: bool


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """Counters of a subscription (for metrics; read with :meth:`Subscription.stats`).

    Attributes:
        partitions: Per-partition figures, by partition id (empty until the partitions of a
            whole-stream subscription are known).
        buffered_bytes: Bytes of records received and not yet delivered, all partitions.
        max_buffer_bytes: The bound on ``buffered_bytes`` (see :class:`Subscription`).
        delivered: Messages the iterator returned, all partitions.
        reconnects: Resubscribe attempts, all partitions.
    """

    partitions: Mapping[int, PartitionStats]
    buffered_bytes: int
    max_buffer_bytes: int
    delivered: int
    reconnects: int

    @property
    def lag(self) -> dict[int, int]:
        """Each partition's lag, by partition id."""
        return {pid: stats.lag for pid, stats in self.partitions.items()}


class _Partition:
    """What a fetch task knows about its partition; read by the iterator and :meth:`stats`."""

    __slots__ = (
        "call",
        "connected",
        "delivered",
        "finished",
        "high_watermark",
        "id",
        "last_delivered",
        "next_offset",
        "progressed",
        "received_in_call",
        "reconnects",
        "resolved",
        "stale_metadata",
        "start_position",
        "start_value",
        "stop_from_latest",
        "stop_offset",
        "subject",
    )

    def __init__(self, pid: int, start: Start, stop: Stop | None) -> None:
        self.id = pid
        self.subject = ""
        # The offset of the next record to receive, once known; a resubscribe starts there.
        self.next_offset: int | None = start.value if start.kind is _StartKind.OFFSET else None
        self.start_position = start.kind.value
        self.start_value = start.value
        self.stop_offset: int | None = (
            stop.value if stop is not None and stop.kind is _StopKind.OFFSET else None
        )
        self.stop_from_latest = False
        # Cursor and Stop.LATEST are resolved before the first call.
        self.resolved = start.kind is not _StartKind.CURSOR and (
            stop is None or stop.kind is not _StopKind.LATEST
        )
        self.high_watermark = -1
        self.delivered = 0  # in batches the iterator has finished
        self.last_delivered = -1  # likewise
        self.reconnects = 0
        self.received_in_call = 0
        self.connected = False
        self.progressed = False  # a handshake arrived since the last failure
        self.stale_metadata = False
        self.finished = False
        self.call: _Call | None = None

    def stop_passed(self) -> bool:
        """Whether every record up to an offset stop was received."""
        return (
            self.stop_offset is not None
            and self.next_offset is not None
            and self.next_offset > self.stop_offset
        )


# A buffered batch: its messages, its bytes, its partition.
_Batch = tuple[list[Message], int, _Partition]


class Subscription:
    """Records of one or more partitions of a stream, as an async iterator of :class:`Message`.

    Made by :meth:`Client.subscribe` (one partition) and :meth:`Client.subscribe_stream`
    (every partition, merged; order is kept within each partition)::

        async for msg in client.subscribe("orders", start=Start.EARLIEST):
            ...  # leaving the loop (break, return, an exception) closes the subscription

        async with client.subscribe_stream("orders", stop=Stop.LATEST) as sub:
            async for msg in sub:  # the block owns it: closed when the block is left
                ...

    The calls start on the first iteration (or on entering ``async with``). See the module
    documentation for resubscribes, backpressure and what ends the iteration.

    Args:
        client: The client whose connections, metadata and retry policy it uses.
        stream: The stream's name.
        partitions: Partition ids to read; ``None`` for every partition of the stream (read
            from its metadata when the iteration starts).
        start: Where each partition starts (``Start.NEW_ONLY``: records published after the
            broker accepted the subscription).
        stop: Where each partition ends; ``None`` follows the partitions until closed.
        max_batch_bytes: Bytes of records per batch the broker sends, 1 to 4 MiB
            (default :data:`DEFAULT_SUBSCRIBE_BATCH_BYTES`).
        max_buffer_bytes: Bound on the bytes of records received but not yet delivered
            (default :data:`DEFAULT_SUBSCRIBE_BUFFER_BYTES`); at least ``max_batch_bytes``.
        resume: Resume a paused partition instead of failing with
            :class:`~flux_client.PartitionPausedError`.

    Raises:
        ValueError: An empty stream name, no or a negative partition id, or a byte bound out
            of range.
    """

    def __init__(
        self,
        client: Client,
        stream: str,
        partitions: list[int] | None,
        *,
        start: Start,
        stop: Stop | None,
        max_batch_bytes: int | None,
        max_buffer_bytes: int | None,
        resume: bool,
    ) -> None:
        if not stream:
            raise ValueError("the stream name must not be empty")
        if partitions is not None and (not partitions or min(partitions) < 0):
            raise ValueError("partitions must be a non-empty list of partition ids >= 0")
        batch_bytes = DEFAULT_SUBSCRIBE_BATCH_BYTES if max_batch_bytes is None else max_batch_bytes
        if not 0 < batch_bytes <= MAX_SUBSCRIBE_BATCH_BYTES:
            raise ValueError(f"max_batch_bytes must be 1 to {MAX_SUBSCRIBE_BATCH_BYTES}")
        buffer_bytes = (
            DEFAULT_SUBSCRIBE_BUFFER_BYTES if max_buffer_bytes is None else max_buffer_bytes
        )
        if buffer_bytes < batch_bytes:
            raise ValueError(
                f"max_buffer_bytes ({buffer_bytes}) must be at least max_batch_bytes "
                f"({batch_bytes})"
            )
        self._client = client
        self._stream = stream
        self._requested = list(dict.fromkeys(partitions)) if partitions is not None else None
        self._start_position = start
        self._stop_position = stop
        self._max_batch_bytes = batch_bytes
        self._max_buffer_bytes = buffer_bytes
        self._resume = resume
        self._partitions: dict[int, _Partition] = {}
        # The buffer and the batch being delivered (its messages stay counted until the last
        # one was returned).
        self._buffer: deque[_Batch] = deque()
        self._buffered_bytes = 0
        self._current: list[Message] = []
        self._current_len = 0
        self._current_bytes = 0
        self._current_partition: _Partition | None = None
        self._index = 0
        self._readable = asyncio.Event()  # the buffer got a batch, or the state changed
        self._space = asyncio.Event()  # the iterator freed buffer space
        self._error: FluxError | None = None
        self._error_traceback: TracebackType | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._live = 0  # tasks not finished (the starter, then one per partition)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._entered = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start the subscription; the ``async with`` block owns it (see the class)."""
        self._entered = True
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the subscription."""
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether the subscription was closed (by :meth:`close`, its client, or a ``break``)."""
        return self._closed

    @property
    def stream(self) -> str:
        """The stream's name."""
        return self._stream

    async def close(self, timeout_ms: float | None = None) -> None:
        """Stop reading: cancel the calls and drop what is buffered; the iteration then ends.

        Safe to call more than once and concurrently. A subscription that failed keeps
        raising its error.

        Args:
            timeout_ms: Bound on waiting for the fetch tasks to finish (they are cancelled,
                which takes no network round trip; default 5 s).
        """
        self._shut()
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            bound_s = _DEFAULT_CLOSE_TIMEOUT_S if timeout_ms is None else max(timeout_ms, 0) / 1000
            await asyncio.wait(pending, timeout=bound_s)

    def _start(self) -> None:
        """Register with the client and start the starter task (once)."""
        if self._started or self._closed:
            return
        self._client._adopt(self)  # raises ClosedError when the client is closed
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._spawn(self._run())

    def _spawn(self, work: Awaitable[None]) -> None:
        self._live += 1
        self._tasks.append(asyncio.ensure_future(work))

    def _shut(self) -> None:
        """Close without waiting: mark closed, cancel tasks and calls, drop the buffer."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._client._release(self)
        for partition in self._partitions.values():
            if partition.call is not None:
                partition.call.cancel()
        for task in self._tasks:
            if not task.done():
                task.cancel()
                _LINGERING.add(task)
                task.add_done_callback(_LINGERING.discard)
        self._buffer.clear()
        self._buffered_bytes = 0
        self._current = []
        self._current_len = self._current_bytes = self._index = 0
        self._current_partition = None
        self._readable.set()
        self._space.set()

    def _abandon(self) -> None:
        """The iterator of a plain ``async for`` was dropped: close the subscription."""
        if self._closed:
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            self._shut()
        elif not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._shut)

    # -- iteration ---------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Message]:
        """The iterator: the subscription itself inside ``async with``, else one that closes it.

        Returns:
            An async iterator of :class:`Message`.
        """
        if self._entered:
            return self
        return _Iteration(self)

    async def __anext__(self) -> Message:
        """The next message.

        Returns:
            The next message, in offset order within its partition.

        Raises:
            StopAsyncIteration: Every partition reached its end, or the subscription was
                closed.
            FluxError: The subscription failed (a non-retriable error, or retries exhausted);
                raised again by every later call.
        """
        index = self._index
        if index < self._current_len:
            self._index = index + 1
            return self._current[index]
        return await self._advance()

    async def _advance(self) -> Message:
        """Finish the current batch and take the next one, waiting for it if need be."""
        self._retire()
        while True:
            if self._buffer:
                messages, size, partition = self._buffer.popleft()
                self._current = messages
                self._current_len = len(messages)
                self._current_bytes = size
                self._current_partition = partition
                self._index = 1
                return messages[0]
            if self._error is not None:
                raise self._error.with_traceback(self._error_traceback)
            if self._closed or (self._started and self._live == 0):
                raise StopAsyncIteration
            self._start()
            self._readable.clear()
            await self._readable.wait()

    def _retire(self) -> None:
        """The current batch was delivered whole: count it and free its bytes."""
        partition = self._current_partition
        if partition is None:
            return
        partition.delivered += self._current_len
        partition.last_delivered = self._current[-1].offset
        self._buffered_bytes -= self._current_bytes
        self._current = []
        self._current_len = self._current_bytes = self._index = 0
        self._current_partition = None
        self._space.set()

    # -- observability -----------------------------------------------------------------------

    def stats(self) -> SubscriptionStats:
        """The subscription's counters now.

        Returns:
            Per-partition lag, delivered messages, reconnects and buffered bytes, and totals.
        """
        buffered: dict[int, int] = {}
        first_buffered: dict[int, int] = {}
        for messages, size, partition in self._buffer:
            buffered[partition.id] = buffered.get(partition.id, 0) + size
            first_buffered.setdefault(partition.id, messages[0].offset)
        current = self._current_partition
        if current is not None:
            buffered[current.id] = buffered.get(current.id, 0) + self._current_bytes
        partitions: dict[int, PartitionStats] = {}
        for pid, partition in sorted(self._partitions.items()):
            delivered = partition.delivered
            last = partition.last_delivered
            if partition is current and self._index:
                delivered += self._index
                last = self._current[self._index - 1].offset
            if last >= 0:
                next_to_deliver: int | None = last + 1
            elif partition is current:
                next_to_deliver = self._current[0].offset
            else:
                next_to_deliver = first_buffered.get(pid, partition.next_offset)
            lag = 0
            if next_to_deliver is not None:
                lag = max(0, partition.high_watermark + 1 - next_to_deliver)
            partitions[pid] = PartitionStats(
                lag=lag,
                high_watermark=partition.high_watermark,
                last_delivered_offset=last,
                delivered=delivered,
                buffered_bytes=buffered.get(pid, 0),
                reconnects=partition.reconnects,
                connected=partition.connected,
                finished=partition.finished,
            )
        return SubscriptionStats(
            partitions=MappingProxyType(partitions),
            buffered_bytes=self._buffered_bytes,
            max_buffer_bytes=self._max_buffer_bytes,
            delivered=sum(p.delivered for p in partitions.values()),
            reconnects=sum(p.reconnects for p in partitions.values()),
        )

    # -- fetching ----------------------------------------------------------------------------

    async def _run(self) -> None:
        """Find the partitions, then start one fetch task per partition."""
        try:
            metadata = await self._retrying(
                lambda: self._client.metadata_cache.stream(self._stream)
            )
            pids = self._requested if self._requested is not None else sorted(metadata.partitions)
            for pid in pids:
                partition = _Partition(pid, self._start_position, self._stop_position)
                partition.subject = metadata.subject if pid == 0 else f"{metadata.subject}.{pid}"
                self._partitions[pid] = partition
                self._spawn(self._fetch(partition))
        except asyncio.CancelledError:
            raise
        except FluxError as error:
            self._fail(error)
        except Exception as error:  # noqa: BLE001 -- a bug surfaces through the iterator
            self._fail_unexpected(error)
        finally:
            self._live -= 1
            self._readable.set()

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` under the retry policy (retriable errors only)."""
        backoff = Backoff(self._client.retry)
        while True:
            try:
                return await attempt()
            except FluxError as error:
                if not error.retriable or backoff.exhausted:
                    raise
            await asyncio.sleep(backoff.next_s())

    async def _fetch(self, partition: _Partition) -> None:
        """Follow one partition until its end, resubscribing; report a failure."""
        try:
            await self._follow(partition)
        except asyncio.CancelledError:
            raise
        except FluxError as error:
            self._fail(error)
        except Exception as error:  # noqa: BLE001 -- a bug surfaces through the iterator
            self._fail_unexpected(error)
        finally:
            partition.finished = True
            partition.connected = False
            self._live -= 1
            self._readable.set()

    async def _follow(self, partition: _Partition) -> None:
        """Subscribe, and again after each retriable failure, until the partition ends.

        Raises:
            FluxError: A non-retriable failure, or the last one once retries are exhausted.
        """
        backoff = Backoff(self._client.retry)
        while True:
            cause: BaseException | None = None
            try:
                if await self._subscribe(partition):
                    return
                error: FluxError = UnavailableError(
                    f"the subscription to partition {partition.id} of {self._stream!r} ended "
                    "before its stop position"
                )
            except grpc.aio.AioRpcError as rpc_error:
                error, cause = from_rpc_error(rpc_error), rpc_error
            except FluxError as flux_error:
                error, cause = flux_error, flux_error.__cause__
            finally:
                partition.connected = False
                partition.call = None
            if isinstance(error, _CLEAN_ENDS) or (
                isinstance(error, InvalidArgumentError)
                and partition.stop_from_latest
                and partition.next_offset is None
            ):
                return
            if partition.progressed:
                partition.progressed = False
                backoff.reset()
            # A partition paused under the subscription: resubscribing resumes it if asked to.
            retriable = error.retriable or (
                self._resume and isinstance(error, PartitionPausedError)
            )
            if not retriable or backoff.exhausted:
                raise error from cause
            partition.reconnects += 1
            partition.stale_metadata = True
            await asyncio.sleep(backoff.next_s())

    async def _subscribe(self, partition: _Partition) -> bool:
        """One call: open it, read until it ends.

        Returns:
            True when the partition reached its end; False when the call ended without error
            before the stop (the caller resubscribes).

        Raises:
            grpc.aio.AioRpcError: The call failed.
            FluxError: Resolving the leader, a cursor or the stop failed, no handshake came
                in time, or a batch was corrupt.
        """
        client = self._client
        if partition.stale_metadata:
            await client.metadata_cache.refresh(self._stream)
            partition.stale_metadata = False
        if not partition.resolved:
            await self._resolve(partition)
        if partition.finished or partition.stop_passed():
            return True
        address = await client.metadata_cache.leader_address(self._stream, partition.id)
        if address is None:
            raise NotLeaderError(
                f"partition {partition.id} of {self._stream!r} has no leader right now"
            )
        call = client.stub(address).SubscribeBatch(self._request(partition))
        partition.call = call
        partition.received_in_call = 0
        try:
            try:
                async with asyncio.timeout(client._request_timeout_s):
                    handshake = await call.read()
            except TimeoutError:
                raise CallTimeoutError(
                    f"no answer to the subscription of partition {partition.id} of "
                    f"{self._stream!r} within {client._request_timeout_s:g} s"
                ) from None
            if handshake is grpc.aio.EOF:
                return self._ended_early(partition)
            self._on_handshake(partition, cast("api_pb2.RecordBatch", handshake))
            read = call.read
            while True:
                received = await read()
                if received is grpc.aio.EOF:
                    return self._ended_early(partition)
                batch = cast("api_pb2.RecordBatch", received)
                if batch.recordCount:
                    await self._put(partition, batch)
                    if partition.stop_passed():
                        return True
                elif batch.highWatermark > partition.high_watermark:
                    partition.high_watermark = batch.highWatermark
        finally:
            call.cancel()

    async def _resolve(self, partition: _Partition) -> None:
        """Before the first call: read the cursor of ``Start.cursor``, resolve ``Stop.LATEST``."""
        client = self._client
        start, stop = self._start_position, self._stop_position
        if start.kind is _StartKind.CURSOR and partition.next_offset is None:
            stored = await client.fetch_cursor(self._stream, partition.id, start.cursor_id)
            if stored >= 0:
                partition.next_offset = stored + 1
            else:
                partition.start_position = api_pb2.EARLIEST
        if stop is not None and stop.kind is _StopKind.LATEST and partition.stop_offset is None:
            metadata = await client.fetch_partition_metadata(self._stream, partition.id)
            if metadata.newest_offset < 0:
                partition.finished = True  # empty: STREAM_EMPTY, a clean end
            partition.stop_offset = metadata.newest_offset
            partition.stop_from_latest = True
        partition.resolved = True

    def _request(self, partition: _Partition) -> api_pb2.SubscribeBatchRequest:
        request = api_pb2.SubscribeRequest(
            stream=self._stream, partition=partition.id, resume=self._resume
        )
        if partition.next_offset is not None:
            request.startPosition = api_pb2.OFFSET
            request.startOffset = partition.next_offset
        else:
            position = partition.start_position
            request.startPosition = cast("api_pb2.StartPosition.ValueType", position)
            if position == api_pb2.TIMESTAMP:
                request.startTimestamp = partition.start_value
        stop = self._stop_position
        if partition.stop_offset is not None:
            request.stopPosition = api_pb2.STOP_OFFSET
            request.stopOffset = partition.stop_offset
        elif stop is not None and stop.kind is _StopKind.TIMESTAMP:
            request.stopPosition = api_pb2.STOP_TIMESTAMP
            request.stopTimestamp = stop.value
        return api_pb2.SubscribeBatchRequest(subscribe=request, maxBytes=self._max_batch_bytes)

    def _on_handshake(self, partition: _Partition, handshake: api_pb2.RecordBatch) -> None:
        """A broker accepted the call: the outage is over; fix NEW_ONLY/LATEST to an offset."""
        partition.connected = True
        partition.progressed = True
        high_watermark = handshake.highWatermark
        partition.high_watermark = max(partition.high_watermark, high_watermark)
        if partition.next_offset is None:
            # The broker read the high watermark when it chose the start, and it never passes
            # the newest offset: these are at or before the start it chose (module docstring).
            if partition.start_position == api_pb2.NEW_ONLY:
                partition.next_offset = high_watermark + 1
            elif partition.start_position == api_pb2.LATEST:
                partition.next_offset = max(high_watermark, 0)

    def _ended_early(self, partition: _Partition) -> bool:
        """The call ended with OK: whether that was the stop (else the caller resubscribes).

        SubscribeBatch ends with OK only at the stop. Without a stop it is unexpected; with an
        offset stop not reached yet, a call that delivered records is tried again (the stop
        record may have been compacted away: the next call then ends at once, and is believed).
        """
        if self._stop_position is None:
            return False
        if partition.stop_offset is None:  # a timestamp stop: the broker alone can tell
            return True
        return partition.stop_passed() or partition.received_in_call == 0

    async def _put(self, partition: _Partition, batch: api_pb2.RecordBatch) -> None:
        """Decode ``batch`` into the buffer, first waiting for room (backpressure).

        A batch larger than ``max_batch_bytes`` (a server may send one) goes in in pieces of
        about that size, each waiting for room, so the buffer keeps its bound.
        """
        size = len(batch.records)
        partition.high_watermark = max(partition.high_watermark, batch.highWatermark)
        if size <= self._max_batch_bytes:
            await self._room(size)
            self._append(partition, self._decode(partition, batch), size)
        else:
            messages = self._decode(partition, batch)
            count = len(messages)
            step = max(1, count * self._max_batch_bytes // size)
            for first in range(0, count, step):
                last = min(first + step, count)
                piece = size * last // count - size * first // count
                await self._room(piece)
                self._append(partition, messages[first:last], piece)
        partition.next_offset = batch.lastOffset + 1

    async def _room(self, size: int) -> None:
        """Wait until ``size`` bytes fit the buffer (or it is empty)."""
        while self._buffered_bytes and self._buffered_bytes + size > self._max_buffer_bytes:
            self._space.clear()
            await self._space.wait()

    def _append(self, partition: _Partition, messages: list[Message], size: int) -> None:
        next_offset = partition.next_offset
        if next_offset is not None and messages and messages[0].offset < next_offset:
            # Never deliver an offset twice, whatever the broker sends.
            messages = [m for m in messages if m.offset >= next_offset]
        if messages:
            partition.received_in_call += len(messages)
            partition.next_offset = messages[-1].offset + 1
            self._buffer.append((messages, size, partition))
            self._buffered_bytes += size
            self._readable.set()

    def _decode(self, partition: _Partition, batch: api_pb2.RecordBatch) -> list[Message]:
        """The messages of a batch (the hot path: one comprehension, no per-record call)."""
        stream, pid, subject = self._stream, partition.id, partition.subject
        columns = uniform_columns(batch.records)
        if columns is not None:
            # Same-size records without headers, the common case: one tuple per message, built
            # column by column without a Python-level call per record.
            offsets, timestamps, _epochs, keys, values = columns
            count = len(offsets)
            fields = zip(
                repeat(stream, count),
                repeat(pid, count),
                offsets,
                keys,
                values,
                repeat(_NO_HEADERS, count),
                timestamps,
                repeat(subject, count),
                repeat("", count),
                strict=False,
            )
            return list(map(tuple.__new__, repeat(Message, count), fields))
        try:
            records = decode_records(batch.records)
        except _CorruptBytesError as error:
            raise CorruptRecordError(
                f"partition {partition.id} of {self._stream!r}, batch at offset "
                f"{batch.firstOffset}: {error}"
            ) from error
        stream, pid, subject, no_headers = (
            self._stream,
            partition.id,
            partition.subject,
            _NO_HEADERS,
        )
        # tuple.__new__ skips the named tuple's Python-level __new__: twice the messages a
        # second. The field order is Message's.
        new = tuple.__new__
        return [
            new(Message, (stream, pid, offset, key, value, no_headers, timestamp, subject, ""))
            if not headers
            else _with_headers(stream, pid, subject, offset, timestamp, key, value, headers)
            for offset, timestamp, _epoch, key, value, headers in records
        ]

    # -- failure -----------------------------------------------------------------------------

    def _fail(self, error: FluxError) -> None:
        """Fail the subscription with ``error``: stop fetching; the iterator raises it."""
        if self._closed:
            return  # closing cancels the tasks; what they met meanwhile no longer matters
        if self._error is None:
            self._error = error
            self._error_traceback = error.__traceback__
        for task in self._tasks:
            if task is not asyncio.current_task() and not task.done():
                task.cancel()
        self._readable.set()

    def _fail_unexpected(self, error: Exception) -> None:
        wrapped = UnknownError(f"the subscription failed unexpectedly: {error!r}")
        wrapped.__cause__ = error
        self._fail(wrapped)


class _Iteration:
    """The iterator of a plain ``async for``: dropping it (break, return, error) closes."""

    __slots__ = ("_subscription",)

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription

    def __aiter__(self) -> Self:
        return self

    def __anext__(self) -> Awaitable[Message]:
        # The subscription's own coroutine: no extra await per message.
        return self._subscription.__anext__()

    def __del__(self) -> None:
        self._subscription._abandon()


def _with_headers(  # noqa: PLR0917 -- called positionally on the hot path
    stream: str,
    partition: int,
    subject: str,
    offset: int,
    timestamp: int,
    key: bytes | None,
    value: bytes | None,
    pairs: tuple[tuple[str, bytes], ...],
) -> Message:
    """A message whose record has headers: ``subject``/``reply`` become its subjects too."""
    headers = dict(pairs)  # a name stored twice keeps its last value, as on the broker
    found = headers.get(_SUBJECT_HEADER)
    reply = headers.get(_REPLY_HEADER)
    return Message(
        stream,
        partition,
        offset,
        key,
        value,
        headers,
        timestamp,
        subject if found is None else found.decode(errors="replace"),
        "" if reply is None else reply.decode(errors="replace"),
    )
