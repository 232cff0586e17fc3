"""Producer: sends records in batches over the batched publish RPC, idempotently by default.

``send`` frames the record at once (so the buffer counts exact bytes), appends it to its
partition's open batch and waits for the ack; one sender task takes batches from the partition
queues (:mod:`flux_client._accumulator`) and writes them on one ``PublishBatch`` call per
broker; one reader task per call matches the answers. While a partition's window of batches in
flight is full, sends keep filling its open batch, so load alone makes batches grow; ``linger_ms``
adds a wait on top. Every send settles: with an ack, an error, or — at ``delivery_timeout_ms``
— an :class:`~flux_client.AckTimeoutError`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self, cast, overload

import grpc

from flux_client._accumulator import AckedRun, Batch, PartitionQueue
from flux_client._errors import (
    AckTimeoutError,
    BufferFullError,
    CallTimeoutError,
    ClosedError,
    DuplicateSequenceError,
    FluxError,
    InvalidArgumentError,
    MessageTooLargeError,
    NotLeaderError,
    OutOfOrderSequenceError,
    from_batch_error,
    from_rpc_error,
)
from flux_client._partitioner import KeyHashPartitioner, Partitioner
from flux_client._records import encode_record
from flux_client._retry import Backoff
from flux_client._types import AckPolicy, Record, RecordMetadata
from flux_proto import api_pb2

if TYPE_CHECKING:
    from flux_client._client import Client

__all__ = [
    "DEFAULT_DELIVERY_TIMEOUT_MS",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BLOCK_MS",
    "DEFAULT_MAX_BUFFER_BYTES",
    "Producer",
    "ProducerStats",
]

_log = logging.getLogger("flux_client.producer")

#: Largest batch: big enough to amortise a round trip, well under the broker's 8 MiB default.
DEFAULT_MAX_BATCH_BYTES: Final = 1024 * 1024
#: Bytes of records a producer holds before ``send`` waits (Kafka's buffer.memory).
DEFAULT_MAX_BUFFER_BYTES: Final = 32 * 1024 * 1024
#: How long ``send`` waits for buffer space before failing with BufferFullError.
DEFAULT_MAX_BLOCK_MS: Final = 10_000
#: How long a send may take in total, retries included, before it fails with AckTimeoutError.
DEFAULT_DELIVERY_TIMEOUT_MS: Final = 30_000
#: Records ``send_batch`` frames between yields to the event loop (a few milliseconds).
_ENCODE_SLICE_RECORDS: Final = 2048
#: Wake-up interval of the sender when nothing else is due (expiry checks).
_IDLE_WAKE_S: Final = 1.0
#: Bound on a leader lookup or producer-id request by the sender, which must stay responsive
#: (delivery timeouts are enforced by it); a slower answer is retried after a backoff.
_LOOKUP_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class ProducerStats:
    """Counters of a producer (for metrics; read with :meth:`Producer.stats`).

    Attributes:
        buffered_bytes: Bytes of records held (waiting, or sent and not yet answered).
        sends_in_flight: Records sent or waiting whose send has not settled.
        batches_in_flight: Batches sent and not yet answered.
        records_acked: Records acknowledged since the producer was made.
        records_failed: Records whose send raised.
        batches_sent: Batch writes, resends included.
        retries: Batches sent again (after a retriable refusal or a lost connection).
        reconnects: Publish connections opened after the first one to a broker.
        send_latency_ms_avg: Mean time from a batch's first record to its ack.
        send_latency_ms_max: Longest such time.
    """

    buffered_bytes: int
    sends_in_flight: int
    batches_in_flight: int
    records_acked: int
    records_failed: int
    batches_sent: int
    retries: int
    reconnects: int
    send_latency_ms_avg: float
    send_latency_ms_max: float


class _Concatenated(Sequence[RecordMetadata]):
    """Acked runs of one partition, read as one sequence."""

    def __init__(self, runs: list[AckedRun]) -> None:
        self._runs = runs
        self._starts: list[int] = list(itertools.accumulate((len(r) for r in runs), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def __iter__(self) -> Iterator[RecordMetadata]:
        for run in self._runs:
            yield from run

    @overload
    def __getitem__(self, index: int) -> RecordMetadata: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[RecordMetadata]: ...
    def __getitem__(self, index: int | slice) -> RecordMetadata | Sequence[RecordMetadata]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("record index out of range")
        run = bisect.bisect_right(self._starts, index) - 1
        return self._runs[run][index - self._starts[run]]


class _Connection:
    """One ``PublishBatch`` call to one broker and the batches it carries.

    Requests wait in ``outbox`` for the connection's writer task, so a write held up by flow
    control (a slow or unreachable broker) never stalls the producer's sender; the outbox is
    bounded by the partitions' windows of batches in flight.
    """

    def __init__(self, address: str, call: grpc.aio.StreamStreamCall[object, object]) -> None:
        self.address = address
        self.call = call
        self.pending: dict[str, tuple[PartitionQueue, Batch]] = {}
        self.outbox: deque[tuple[api_pb2.PublishBatchRequest, PartitionQueue, Batch]] = deque()
        self.writable = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.alive = True


class Producer:
    """Sends records to streams; make one with :meth:`Client.producer`.

    Args:
        client: The client whose connections it uses.
        ack_policy: When the broker acks (default ``AckPolicy.LEADER``, as Liftbridge).
            With ``NONE`` sends resolve once written to the connection, offset -1, and
            idempotence is off (there is no answer to deduplicate against).
        linger_ms: How long a batch may wait for more records before it is sent (0: only
            while the partition's window of batches in flight is full).
        max_batch_bytes: Largest batch (a larger single record goes alone).
        max_buffer_bytes: Bytes of records held before ``send`` waits. Memory use is this plus
            about one batch per partition and per-send futures.
        max_block_ms: How long ``send`` waits for buffer space before raising BufferFullError.
        delivery_timeout_ms: Bound on a send, retries included; then AckTimeoutError.
        partitioner: Picks the partition when a send names none (default: key hash).
        idempotent: Number batches so a retry never writes twice (default on).
    """

    def __init__(
        self,
        client: Client,
        *,
        ack_policy: AckPolicy | None = None,
        linger_ms: float = 0.0,
        max_batch_bytes: int | None = None,
        max_buffer_bytes: int | None = None,
        max_block_ms: float | None = None,
        delivery_timeout_ms: float | None = None,
        partitioner: Partitioner | None = None,
        idempotent: bool = True,
    ) -> None:
        self._client = client
        self._ack_policy = ack_policy if ack_policy is not None else AckPolicy.LEADER
        self._idempotent = idempotent and self._ack_policy is not AckPolicy.NONE
        self._linger_s = max(0.0, linger_ms) / 1000
        self._max_batch_bytes = max_batch_bytes or DEFAULT_MAX_BATCH_BYTES
        self._max_buffer_bytes = max_buffer_bytes or DEFAULT_MAX_BUFFER_BYTES
        if self._max_batch_bytes > self._max_buffer_bytes:
            raise ValueError("max_batch_bytes must not exceed max_buffer_bytes")
        self._max_block_s = (
            max_block_ms if max_block_ms is not None else DEFAULT_MAX_BLOCK_MS
        ) / 1000
        self._delivery_timeout_s = (
            delivery_timeout_ms if delivery_timeout_ms is not None else DEFAULT_DELIVERY_TIMEOUT_MS
        ) / 1000
        self._partitioner = partitioner or KeyHashPartitioner()
        self._queues: dict[tuple[str, int], PartitionQueue] = {}
        self._connections: dict[str, _Connection] = {}
        self._backoffs: dict[str, Backoff] = {}
        self._not_before_s: dict[str, float] = {}
        self._producer_id = 0
        self._correlation = itertools.count()
        self._buffered_bytes = 0
        self._space = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._flushing = 0
        self._closed = False
        self._sender: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        # Counters.
        self._sends_in_flight = 0
        self._records_acked = 0
        self._records_failed = 0
        self._batches_sent = 0
        self._retries = 0
        self._reconnects = 0
        self._latency_total_s = 0.0
        self._latency_count = 0
        self._latency_max_s = 0.0
        self._opened: set[str] = set()
        self._settled = asyncio.Event()
        self._stopped = asyncio.Event()
        client._adopt(self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def flush(self, timeout_ms: float | None = None) -> None:
        """Send everything buffered now and wait until each of those sends has settled.

        Args:
            timeout_ms: Bound on the wait (default: the delivery timeout, which bounds every
                send anyway).

        Raises:
            CallTimeoutError: Sends were still pending after ``timeout_ms``.
        """
        batches = [b for queue in self._queues.values() for b in queue.batches() if not b.done]
        if not batches:
            return
        self._flushing += 1
        self._wake()
        bound_s = (timeout_ms / 1000) if timeout_ms is not None else self._delivery_timeout_s + 1
        deadline = time.monotonic() + bound_s
        try:
            while any(not b.done and not b.ghost for b in batches):
                if time.monotonic() >= deadline:
                    raise CallTimeoutError(f"sends still pending after {bound_s:g} s")
                self._settled.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settled.wait(), deadline - time.monotonic())
        finally:
            self._flushing -= 1

    async def close(self, timeout_ms: float | None = None) -> None:
        """Flush (within ``timeout_ms``), then stop; sends still pending fail with ClosedError.

        Safe to call more than once and concurrently; returns within ``timeout_ms`` + 1 s in
        every state (broker unreachable included).

        Args:
            timeout_ms: Bound for the flush (default: the delivery timeout).
        """
        if self._closed:
            await self._stopped.wait()
            return
        self._closed = True
        self._client._release(self)
        bound_s = (timeout_ms / 1000) if timeout_ms is not None else self._delivery_timeout_s + 1
        deadline = time.monotonic() + bound_s
        try:
            with contextlib.suppress(FluxError):
                await self.flush(bound_s * 1000)
            await self._end_calls(deadline)
        finally:
            self._shutdown(ClosedError("the producer was closed before the send completed"))
            self._stopped.set()

    async def _end_calls(self, deadline: float) -> None:
        """Half-close every publish call and wait (until ``deadline``) for the broker to end it.

        Cancelling a call right after its last write could let the broker drop requests it
        had not read yet — with ``AckPolicy.NONE`` those were already reported as sent.
        """
        for connection in list(self._connections.values()):
            remaining = deadline - time.monotonic()
            if not connection.alive or connection.outbox or remaining <= 0:
                continue
            with contextlib.suppress(
                TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
            ):
                async with asyncio.timeout(remaining):
                    await connection.call.done_writing()
                    if connection.reader is not None:
                        await asyncio.shield(connection.reader)

    def _shutdown(self, error: FluxError) -> None:
        for queue in self._queues.values():
            for batch in queue.batches():
                count = sum(w.count for w in batch.waiters)
                batch.fail(lambda: ClosedError(error.message))
                self._records_failed += count
                self._sends_in_flight -= count
        self._queues.clear()
        self._buffered_bytes = 0
        self._space.set()
        if self._sender is not None:
            self._sender.cancel()
        for connection in self._connections.values():
            connection.alive = False
            connection.call.cancel()
            for task in (connection.reader, connection.writer):
                if task is not None:
                    task.cancel()
        self._connections.clear()
        self._settle()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the producer is closed")
        if self._client.closed:
            raise ClosedError("the client is closed")
        if self._fatal is not None:
            raise ClosedError("the producer stopped after an internal error") from self._fatal

    def stats(self) -> ProducerStats:
        """The producer's counters now."""
        count = self._latency_count
        return ProducerStats(
            buffered_bytes=self._buffered_bytes,
            sends_in_flight=self._sends_in_flight,
            batches_in_flight=sum(len(q.in_flight) for q in self._queues.values()),
            records_acked=self._records_acked,
            records_failed=self._records_failed,
            batches_sent=self._batches_sent,
            retries=self._retries,
            reconnects=self._reconnects,
            send_latency_ms_avg=(self._latency_total_s / count * 1000) if count else 0.0,
            send_latency_ms_max=self._latency_max_s * 1000,
        )

    # -- sending -----------------------------------------------------------------------------

    async def send(
        self,
        stream: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
        expected_offset: int | None = None,
    ) -> RecordMetadata:
        """Send one record and wait for its ack.

        Concurrent sends to a partition share batches.

        Args:
            stream: The stream.
            value: The payload; ``None`` writes a tombstone.
            key: Partitioning and compaction key.
            headers: Header names and values.
            partition: The partition; chosen by the partitioner when None.
            expected_offset: Optimistic concurrency: the offset the record must get, or
                nothing is written (IncorrectOffsetError). The record goes in a batch of its
                own.

        Returns:
            Where the record was written.

        Raises:
            ClosedError: The producer or client is closed (at once), or closed before the ack.
            BufferFullError: No buffer space within ``max_block_ms``; nothing was sent.
            AckTimeoutError: No ack within ``delivery_timeout_ms``; ``retry_safe`` says whether
                the record was certainly not written.
            FluxError: The broker refused the record (IncorrectOffsetError, ReadonlyError,
                StreamNotFoundError, MessageTooLargeError, ...); nothing was written.
        """
        self._check_open()
        record = self._encode(value, key, headers)
        if partition is None:
            partition = await self._partition_for(stream, key)
        await self._reserve(len(record))
        queue = self._queue(stream, partition)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        if expected_offset is not None:
            queue.seal_open()
            batch = Batch(now, now + self._delivery_timeout_s, expected_offset)
            batch.add(record, future)
            queue.sealed.append(batch)
        else:
            open_batch = queue.open
            if open_batch is None or (
                open_batch.count and open_batch.size + len(record) > self._max_batch_bytes
            ):
                queue.seal_open()
                open_batch = queue.open = Batch(now, now + self._delivery_timeout_s)
            open_batch.add(record, future)
        self._sends_in_flight += 1
        self._wake()
        return cast(RecordMetadata, await future)

    async def send_batch(
        self,
        stream: str,
        records: Sequence[Record | bytes | None],
        *,
        partition: int | None = None,
    ) -> Sequence[RecordMetadata]:
        """Send many records with one await — the high-throughput path.

        Records (values, or :class:`Record` with key and headers) are framed here and cut
        into batches of at most ``max_batch_bytes`` per partition; there is no task or future
        per record, and the answer makes each record's metadata only when it is read.

        Args:
            stream: The stream.
            records: The records, in order.
            partition: Their partition; chosen per record by the partitioner when None.

        Returns:
            Where each record was written, in the order given (a read-only sequence).

        Raises:
            The same errors as :meth:`send`; if any batch fails, the first error is raised
            (records of other batches may have been written).
        """
        self._check_open()
        if not records:
            return []
        framed = await self._encode_all(records)
        if partition is not None:
            runs = await self._send_runs(stream, partition, framed)
            return _Concatenated([run for _, run in runs])
        count = await self._client.metadata_cache.partition_count(stream)
        choose = self._partitioner.partition
        by_partition: dict[int, list[int]] = {}
        for index, item in enumerate(records):
            key = item.key if isinstance(item, Record) else None
            by_partition.setdefault(choose(stream, key, count), []).append(index)
        sent = await asyncio.gather(
            *(
                self._send_runs(stream, target, [framed[i] for i in indexes])
                for target, indexes in by_partition.items()
            )
        )
        results: list[RecordMetadata | None] = [None] * len(records)
        for indexes, runs in zip(by_partition.values(), sent, strict=True):
            metas = [meta for _, run in runs for meta in run]
            for index, meta in zip(indexes, metas, strict=True):
                results[index] = meta
        return cast(list[RecordMetadata], results)

    async def _encode_all(self, records: Sequence[Record | bytes | None]) -> list[bytes]:
        """Frame every record, yielding to the event loop between slices of them.

        A call of many records would otherwise hold the loop for its whole framing (tens of
        milliseconds), and acks and writes of other calls would wait.
        """
        framed: list[bytes] = []
        for start in range(0, len(records), _ENCODE_SLICE_RECORDS):
            if start:
                await asyncio.sleep(0)
            try:
                framed += [
                    encode_record(
                        item.value, item.key, list(item.headers.items()) if item.headers else ()
                    )
                    if isinstance(item, Record)
                    else encode_record(item, None, ())
                    for item in records[start : start + _ENCODE_SLICE_RECORDS]
                ]
            except (ValueError, TypeError) as error:
                raise InvalidArgumentError(f"records refused before sending: {error}") from error
        largest = max(map(len, framed))
        if largest > self._max_buffer_bytes:
            raise MessageTooLargeError(
                f"a record of {largest} bytes exceeds max_buffer_bytes ({self._max_buffer_bytes})"
            )
        return framed

    async def _send_runs(
        self, stream: str, partition: int, framed: list[bytes]
    ) -> list[tuple[int, AckedRun]]:
        """Queue ``framed`` for one partition in batches; wait for all their acks."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[object]] = []
        ends = list(itertools.accumulate(map(len, framed), initial=0))
        start, total = 0, len(framed)
        while start < total:
            # The most records from ``start`` within max_batch_bytes, at least one.
            limit = ends[start] + self._max_batch_bytes
            end = max(start + 1, bisect.bisect_right(ends, limit, lo=start + 1) - 1)
            size = ends[end] - ends[start]
            await self._reserve(size)
            queue = self._queue(stream, partition)
            now = time.monotonic()
            batch = Batch(now, now + self._delivery_timeout_s)
            future: asyncio.Future[object] = loop.create_future()
            batch.add_many(b"".join(framed[start:end]), end - start, future)
            queue.seal_open()
            queue.sealed.append(batch)
            self._sends_in_flight += end - start
            futures.append(future)
            self._wake()
            start = end
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [(partition, cast(AckedRun, outcome)) for outcome in outcomes]

    def _encode(
        self, value: bytes | None, key: bytes | None, headers: Mapping[str, bytes] | None
    ) -> bytes:
        try:
            framed = encode_record(value, key, list(headers.items()) if headers else ())
        except (ValueError, TypeError) as error:
            raise InvalidArgumentError(f"record refused before sending: {error}") from error
        if len(framed) > self._max_buffer_bytes:
            raise MessageTooLargeError(
                f"record of {len(framed)} bytes exceeds max_buffer_bytes ({self._max_buffer_bytes})"
            )
        return framed

    async def _partition_for(self, stream: str, key: bytes | None) -> int:
        count = await self._client.metadata_cache.partition_count(stream)
        return self._partitioner.partition(stream, key, count)

    def _queue(self, stream: str, partition: int) -> PartitionQueue:
        """The queue of a partition, made on first use and kept: it holds the sequence."""
        self._check_open()
        queue = self._queues.get((stream, partition))
        if queue is None:
            queue = PartitionQueue(stream, partition, idempotent=self._idempotent)
            self._queues[(stream, partition)] = queue
        if self._sender is None:
            self._sender = asyncio.create_task(self._run_sender(), name="flux-producer-sender")
        return queue

    async def _reserve(self, size: int) -> None:
        if self._buffered_bytes + size <= self._max_buffer_bytes:
            self._buffered_bytes += size
            return
        deadline = time.monotonic() + self._max_block_s
        while self._buffered_bytes + size > self._max_buffer_bytes:
            self._check_open()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BufferFullError(
                    f"the producer's buffer ({self._max_buffer_bytes} bytes) stayed full for "
                    f"{self._max_block_s * 1000:g} ms; the record was not sent"
                )
            self._space.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._space.wait(), remaining)
        self._check_open()
        self._buffered_bytes += size

    def _release(self, batch: Batch) -> None:
        self._buffered_bytes -= batch.size
        self._space.set()

    def _wake(self) -> None:
        self._wakeup.set()

    def _settle(self) -> None:
        self._settled.set()

    # -- the sender --------------------------------------------------------------------------

    async def _run_sender(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                next_due = await self._send_due()
                timeout = max(0.0, next_due - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.CancelledError:
            raise
        except ClosedError:
            return  # the client closed under the producer; close() fails what is pending
        except BaseException as error:  # a bug: fail every send rather than hang them
            _log.exception("the producer's sender failed; failing every pending send")
            self._fatal = error
            self._shutdown(ClosedError(f"the producer stopped after an internal error: {error}"))
            raise

    async def _send_due(self) -> float:
        """Send every batch that may go; return when the sender must look again."""
        now = time.monotonic()
        next_due = now + _IDLE_WAKE_S
        flushing = self._flushing > 0 or self._closed
        for queue in list(self._queues.values()):
            self._expire(queue, now)
            queue.resync()
            self._fail_unknown(queue)
            if queue.needs_new_producer_id and not queue.in_flight:
                producer_id = await self._new_producer_id(queue)
                if producer_id:
                    queue.use_producer_id(producer_id)  # resyncs under the new id
            while queue.ready(time.monotonic(), self._linger_s, flushing):
                connection = await self._connection_for(queue)
                if connection is None:
                    break
                if self._idempotent and not self._producer_id:
                    self._producer_id = await self._new_producer_id(queue)
                    if not self._producer_id:
                        break
                batch = queue.next_to_send(time.monotonic(), self._linger_s, flushing)
                if batch is None:
                    break
                self._write(connection, queue, batch)
            next_due = min(next_due, *self._due_times(queue))
        return next_due

    def _due_times(self, queue: PartitionQueue) -> list[float]:
        times = [queue.not_before_s] if queue.not_before_s > time.monotonic() else []
        if queue.open is not None:
            times.append(queue.open.created_s + self._linger_s)
        if queue.address is not None and queue.address in self._not_before_s:
            times.append(self._not_before_s[queue.address])
        times.extend(b.deadline_s for b in queue.batches() if not b.ghost)
        return times or [time.monotonic() + _IDLE_WAKE_S]

    def _expire(self, queue: PartitionQueue, now: float) -> None:
        retry_safe_message = "no ack within the delivery timeout ({:g} ms); {}"

        def timeout_error(never_sent: bool) -> AckTimeoutError:
            return AckTimeoutError(
                retry_safe_message.format(
                    self._delivery_timeout_s * 1000,
                    "the records were never sent"
                    if never_sent
                    else "they may or may not have been written",
                ),
                retry_safe=never_sent,
            )

        before = {id(b): sum(w.count for w in b.waiters) for b in queue.batches()}
        dropped = queue.expire(now, timeout_error)
        for batch in queue.batches() + dropped:
            failed = before.get(id(batch), 0) - sum(w.count for w in batch.waiters)
            if failed:
                self._records_failed += failed
                self._sends_in_flight -= failed
        for batch in dropped:
            self._release(batch)
        if dropped:
            self._settle()

    async def _new_producer_id(self, queue: PartitionQueue) -> int:
        """A producer id from the broker; 0 (and a backoff for ``queue``) when none came."""
        try:
            response = await self._client.call(
                lambda stub, timeout: stub.InitProducer(
                    api_pb2.InitProducerRequest(), timeout=timeout
                ),
                timeout_s=_LOOKUP_TIMEOUT_S,
            )
        except FluxError as error:
            wait = self._backoff(queue.stream).next_s()
            queue.not_before_s = time.monotonic() + wait
            _log.info("no producer id yet (%s); retrying in %.0f ms", error.message, wait * 1000)
            return 0
        return int(response.producerId)

    async def _connection_for(self, queue: PartitionQueue) -> _Connection | None:
        """The live publish call to the queue's leader, opened if needed; None while backing off."""
        if queue.address is None:
            try:
                async with asyncio.timeout(_LOOKUP_TIMEOUT_S):
                    queue.address = await self._client.metadata_cache.leader_address(
                        queue.stream, queue.partition
                    )
            except (FluxError, TimeoutError) as error:
                if isinstance(error, FluxError) and not error.retriable:
                    self._fail_queue(queue, error)
                else:
                    queue.not_before_s = time.monotonic() + self._backoff(queue.stream).next_s()
                return None
            if queue.address is None:
                queue.not_before_s = time.monotonic() + self._backoff(queue.stream).next_s()
                return None
        address = queue.address
        connection = self._connections.get(address)
        if connection is not None and connection.alive:
            return connection
        if time.monotonic() < self._not_before_s.get(address, 0.0):
            return None
        call = self._client.stub(address).PublishBatch()
        connection = _Connection(address, cast(grpc.aio.StreamStreamCall[object, object], call))
        if address in self._opened:
            self._reconnects += 1
        self._opened.add(address)
        self._connections[address] = connection
        connection.reader = asyncio.create_task(
            self._read(connection), name=f"flux-producer-reader-{address}"
        )
        connection.writer = asyncio.create_task(
            self._run_writer(connection), name=f"flux-producer-writer-{address}"
        )
        return connection

    def _fail_unknown(self, queue: PartitionQueue) -> None:
        """Fail the batches the queue gave up with an unknown outcome."""
        for batch in queue.unknown:
            self._finish_failed(
                batch,
                AckTimeoutError(
                    "the records' outcome is unknown: they were sent on a connection that was "
                    "lost, and a refusal of an earlier batch means they cannot be retried "
                    "safely; they may or may not have been written",
                    retry_safe=False,
                ),
            )
        queue.unknown = []

    def _fail_queue(self, queue: PartitionQueue, error: FluxError) -> None:
        """A failure no retry can fix (the stream or partition is gone): fail what waits."""
        for batch in [*queue.resend, *queue.sealed, *([queue.open] if queue.open else [])]:
            self._finish_failed(batch, error)
        queue.resend = []
        queue.resyncing = False
        queue.sealed.clear()
        queue.open = None

    def _backoff(self, key: str) -> Backoff:
        """The backoff of one broker address or one stream's leader lookups."""
        backoff = self._backoffs.get(key)
        if backoff is None:
            backoff = self._backoffs[key] = Backoff(self._client.retry)
        return backoff

    def _write(self, connection: _Connection, queue: PartitionQueue, batch: Batch) -> None:
        """Hand ``batch`` to the connection's writer (answers are matched by correlation id)."""
        correlation_id = str(next(self._correlation))
        request = api_pb2.PublishBatchRequest(
            stream=queue.stream,
            partition=queue.partition,
            records=batch.payload(),
            ackPolicy=self._ack_policy.value,
            correlationId=correlation_id,
        )
        if batch.expected_offset is not None:
            request.expectedOffset.value = batch.expected_offset
        if self._idempotent:
            request.producerId = queue.producer_id or self._producer_id
            request.producerSequence = batch.seq or 0
        self._batches_sent += 1
        if self._ack_policy is not AckPolicy.NONE:
            connection.pending[correlation_id] = (queue, batch)
        connection.outbox.append((request, queue, batch))
        connection.writable.set()

    async def _run_writer(self, connection: _Connection) -> None:
        no_answer = self._ack_policy is AckPolicy.NONE
        while connection.alive:
            if not connection.outbox:
                connection.writable.clear()
                await connection.writable.wait()
                continue
            request, queue, batch = connection.outbox.popleft()
            try:
                await connection.call.write(request)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # The call was cancelled under the write (the connection was declared lost).
                self._connection_lost(connection, None)
                return
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as error:
                self._connection_lost(connection, error)
                return
            if no_answer:
                queue.acked(batch)
                self._finish_acked(queue, batch, -1, -1)
                self._wake()

    # -- answers -----------------------------------------------------------------------------

    async def _read(self, connection: _Connection) -> None:
        error: BaseException | None = None
        try:
            while True:
                response = await connection.call.read()
                if response is grpc.aio.EOF:
                    break
                self._on_response(connection, cast(api_pb2.PublishBatchResponse, response))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as rpc_error:
            error = rpc_error
        except BaseException as other:  # noqa: BLE001 -- a lost connection whatever the cause
            error = other
        self._connection_lost(connection, error)

    def _on_response(self, connection: _Connection, response: api_pb2.PublishBatchResponse) -> None:
        found = connection.pending.pop(response.correlationId, None)
        if found is None:
            return
        queue, batch = found
        if not response.HasField("error"):
            queue.acked(batch)
            self._backoff(connection.address).reset()
            self._backoff(queue.stream).reset()
            self._finish_acked(queue, batch, response.baseOffset, response.timestamp)
        else:
            failure = response.error
            error = from_batch_error(
                failure.code, failure.reason, failure.message, retry_safe=False
            )
            self._on_refusal(queue, batch, error)
        self._wake()

    def _on_refusal(self, queue: PartitionQueue, batch: Batch, error: FluxError) -> None:
        if isinstance(error, OutOfOrderSequenceError):
            queue.out_of_order(batch)
            self._retries += 1
        elif isinstance(error, DuplicateSequenceError):
            queue.refused(batch, resend=False, seq_used=True)
            self._finish_failed(batch, error)
        elif error.retriable:
            queue.refused(batch, resend=True)
            self._retries += 1
            queue.not_before_s = time.monotonic() + self._backoff(queue.stream).next_s()
            if isinstance(error, NotLeaderError):
                queue.address = None
                self._client.metadata_cache.forget(queue.stream)
            if not self._idempotent:
                # Without numbers a resend is still safe: the broker said it wrote nothing.
                queue.sealed.appendleft(queue.resend.pop())
        else:
            queue.refused(batch, resend=False)
            if batch.lost:
                # The refusal is about this attempt; an earlier one, on a connection given up
                # for lost, may still have been written: the outcome is unknown.
                unknown = AckTimeoutError(
                    f"a retry was refused ({error.reason}: {error.message}), but an earlier "
                    "attempt whose connection was lost may still have written the records",
                    retry_safe=False,
                )
                self._finish_failed(batch, unknown, cause=error)
            else:
                self._finish_failed(batch, error)

    def _connection_lost(self, connection: _Connection, error: BaseException | None) -> None:
        if not connection.alive:
            return
        connection.alive = False
        if self._connections.get(connection.address) is connection:
            del self._connections[connection.address]
        connection.call.cancel()
        connection.outbox.clear()
        connection.writable.set()  # the writer sees the connection is gone and ends
        wait = self._backoff(connection.address).next_s()
        self._not_before_s[connection.address] = time.monotonic() + wait
        cause = from_rpc_error(error) if isinstance(error, grpc.aio.AioRpcError) else None
        if not self._closed:
            _log.info(
                "publish connection to %s lost (%s); retrying in %.0f ms",
                connection.address,
                cause.message if cause is not None else (error or "closed by the broker"),
                wait * 1000,
            )
        for queue, batch in connection.pending.values():
            if queue.connection_lost(batch):
                self._retries += 1
            else:
                self._finish_failed(
                    batch,
                    AckTimeoutError(
                        "the connection was lost before the ack; the records may or may not "
                        "have been written (not retried: the producer is not idempotent)",
                        retry_safe=False,
                    ),
                    cause=error,
                )
            queue.address = None
        connection.pending.clear()
        self._wake()

    def _finish_acked(
        self, queue: PartitionQueue, batch: Batch, offset: int, timestamp: int
    ) -> None:
        waiting = sum(w.count for w in batch.waiters)
        batch.resolve(queue.stream, queue.partition, offset, timestamp)
        self._records_acked += batch.count
        self._sends_in_flight -= waiting
        latency = time.monotonic() - batch.created_s
        self._latency_total_s += latency
        self._latency_count += 1
        self._latency_max_s = max(self._latency_max_s, latency)
        self._release(batch)
        self._settle()

    def _finish_failed(
        self, batch: Batch, error: FluxError, cause: BaseException | None = None
    ) -> None:
        waiting = sum(w.count for w in batch.waiters)

        def make() -> FluxError:
            fresh = copy.copy(error)  # each waiter raises its own instance
            fresh.__cause__ = cause if cause is not None else error.__cause__
            return fresh

        batch.fail(make)
        self._records_failed += waiting
        self._sends_in_flight -= waiting
        self._release(batch)
        self._settle()
