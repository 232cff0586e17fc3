"""InitProducer and PublishBatch: client-framed batches appended straight to a partition.

The fast write path of Flux (DESIGN.md §4.2, §5): one request carries a whole batch in the
log's own record format, the broker checks and stamps it in one pass and writes it with one
write, and one response answers it. No NATS hop: other streams on the subject do not see it.

**Per request**, in order (each failure is a :class:`~flux_proto.api_pb2.PublishBatchError`
response with the row's gRPC code, reason and text, and ``recordIndex`` where one record is at
fault; the call goes on with the next request):

1. the checks of Publish, with their precedence: stream named (INVALID_ARGUMENT), stream
   exists (STREAM_NOT_FOUND), partition exists (PARTITION_NOT_FOUND), not read-only (READONLY),
   ``ackPolicy`` defined, NONE refused on a stream with optimistic concurrency control;
2. the batch: not empty (INVALID_ARGUMENT), within ``streams.batch.max.bytes``
   (MESSAGE_TOO_LARGE), ``producerSequence`` not negative with a ``producerId``, no record
   carrying the broker's ``flux.producer`` header (INVALID_ARGUMENT with its index);
3. only then is a paused partition resumed (as Publish does), its records verified first,
   so a refused batch changes nothing;
4. atomically with the write (:class:`~flux_broker.log.contract.AppendGuard`): the expected
   offset (INCORRECT_OFFSET) and the producer's sequence (a duplicate answers the original
   ack with ``duplicate`` set; OUT_OF_ORDER_SEQUENCE, DUPLICATE_SEQUENCE: see
   :mod:`flux_broker.streams.producers`);
5. every record is verified (length, CRC-32C, structure: INVALID_ARGUMENT with its index;
   over ``record_max_bytes``: INVALID_ARGUMENT too) while it is stamped, then the batch is
   written (a failing disk: STORAGE_FAILED).

**Ordering and flow control.** Requests are written in the order they arrive, one at a time;
only their durability waits (``streams.sync.policy``) overlap, so under ``always`` the fsyncs
of consecutive batches are shared (group commit). Responses go back in request order. At most
:data:`PUBLISH_BATCH_IN_FLIGHT_MAX` batches are written but not yet answered: past that the
broker stops reading the call, and gRPC's flow control makes the client wait -- memory stays
bounded by one batch being written per call (written batches are not held) plus what gRPC
buffers.

After the durability wait the partition's HW moves to the batch's last offset (this broker is
the whole ISR) and the response is sent (none for ackPolicy NONE). When the broker shuts down
the call ends with UNAVAILABLE; batches already written stay written.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from flux_broker.api.context import BrokerContext
from flux_broker.api.publish_request import NONE, RejectedError, resume, target
from flux_broker.api.status import UNAVAILABLE_MESSAGE, FluxStatus, status_for
from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.contract import AppendResult
from flux_broker.log.errors import InvalidBatchError, RecordTooLargeError
from flux_broker.log.format import UNPLACED, check_and_stamp
from flux_broker.streams.live import LivePartition
from flux_broker.streams.producers import (
    PRODUCER_HEADER,
    DuplicateBatch,
    ProducerGuard,
    count_records,
    reserved_header_index,
    with_producer_header,
)
from flux_proto import api_pb2
from flux_proto.errors import ErrorEntry

__all__ = ["PUBLISH_BATCH_IN_FLIGHT_MAX", "init_producer", "publish_batch"]

_T = TypeVar("_T")

#: Batches per call written but not yet answered; the call is not read further meanwhile.
PUBLISH_BATCH_IN_FLIGHT_MAX: Final = 32
_NO_RECORD: Final = -1
_PRODUCER_ID_BITS: Final = 63


def init_producer() -> api_pb2.InitProducerResponse:
    """A fresh producer id: 63 random bits, never 0 (0 means "not idempotent")."""
    producer_id = 0
    while producer_id == 0:
        producer_id = secrets.randbits(_PRODUCER_ID_BITS)
    return api_pb2.InitProducerResponse(producerId=producer_id)


class IncorrectOffsetError(Exception):
    """The batch's first record would not get the expected offset."""

    def __init__(self, expected: int, actual: int) -> None:
        """Name both offsets."""
        super().__init__(
            f"expectedOffset is {expected} but the batch's first record would get offset "
            f"{actual} (optimistic concurrency control); nothing was written"
        )


@dataclass(slots=True)
class _Guard:
    """The checks made atomically with the write: expected offset, then producer sequence."""

    expected_offset: int | None
    producer: ProducerGuard | None

    def check(self, base_offset: int) -> None:
        if self.expected_offset is not None and self.expected_offset != base_offset:
            raise IncorrectOffsetError(self.expected_offset, base_offset)
        if self.producer is not None:
            self.producer.check(base_offset)

    def written(self, result: AppendResult) -> None:
        if self.producer is not None:
            self.producer.written(result)


class _Failed(Exception):  # noqa: N818 -- carries a response, raised to leave the checks
    def __init__(self, entry: ErrorEntry, message: str, record_index: int = _NO_RECORD) -> None:
        super().__init__(message)
        self.error = api_pb2.PublishBatchError(
            code=entry.grpc_code.value[0],
            reason=entry.reason,
            message=message,
            recordIndex=record_index,
        )


def _failed(row: str, message: str, record_index: int = _NO_RECORD) -> _Failed:
    return _Failed(FluxStatus.from_entry(row).entry, message, record_index)


# -- one batch ---------------------------------------------------------------------------------


def _checked(broker: BrokerContext, request: api_pb2.PublishBatchRequest) -> LivePartition:
    """Checks 1-2 of the module docstring (nothing changes yet); the partition."""
    try:
        partition = target(
            broker,
            api_pb2.PublishRequest(
                stream=request.stream, partition=request.partition, ackPolicy=request.ackPolicy
            ),
        )
    except RejectedError as rejected:
        raise _Failed(rejected.status().entry, rejected.detail) from None
    data = request.records
    if not data:
        raise _failed("INVALID_ARGUMENT", "records is empty: a batch holds at least one record")
    limit = broker.streams.log_config.batch_max_bytes  # a server-wide setting
    if len(data) > limit:
        raise _failed(
            "MESSAGE_TOO_LARGE",
            f"the batch is {len(data)} bytes, over the limit of {limit} "
            "(streams.batch.max.bytes); nothing was written",
        )
    if request.producerId and request.producerSequence < 0:
        raise _failed(
            "INVALID_ARGUMENT",
            f"producerSequence {request.producerSequence} is negative: batches are numbered from 0",
        )
    forged = reserved_header_index(data)
    if forged is not None:
        raise _failed(
            "INVALID_ARGUMENT",
            f"record {forged} carries the header {PRODUCER_HEADER!r}, which is reserved for the "
            "broker; nothing was written",
            forged,
        )
    return partition


def _verified(data: bytes, record_max_bytes: int) -> None:
    """Refuse a batch whose records fail the log's checks, without writing anything."""
    try:
        check_and_stamp(bytearray(data), UNPLACED, record_max_bytes)
    except (InvalidBatchError, RecordTooLargeError) as error:
        raise _failed("INVALID_ARGUMENT", str(error), error.index) from None


async def _write(
    broker: BrokerContext, request: api_pb2.PublishBatchRequest
) -> tuple[FileCommitLog, AppendResult | api_pb2.PublishBatchResponse]:
    """Check and write one batch: the log and where it landed, or the response to send now.

    Raises:
        _Failed: The batch was refused.
    """
    partition = _checked(broker, request)
    if partition.paused:
        # Verified before the resume, so a malformed batch leaves the partition paused (an
        # active partition's batch is verified once, by the log, while it is stamped).
        _verified(request.records, broker.streams.log_config.record_max_bytes)
    try:
        await resume(broker, partition)
    except RejectedError as rejected:
        raise _Failed(rejected.status().entry, rejected.detail) from None
    log = partition.log
    data = request.records
    producer: ProducerGuard | None = None
    if request.producerId:
        table = partition.producers
        await table.ensure_rebuilt(log)
        count = count_records(data)
        data = with_producer_header(data, request.producerId, request.producerSequence, count)
        producer = table.guard(request.producerId, request.producerSequence, count)
    expected = request.expectedOffset.value if request.HasField("expectedOffset") else None
    try:
        guard = None if expected is None and producer is None else _Guard(expected, producer)
        result = await log.write_framed(data, guard=guard)
    except DuplicateBatch as duplicate:
        ack = duplicate.ack
        return log, _response(
            request,
            baseOffset=ack.base_offset,
            recordCount=ack.count,
            timestamp=ack.timestamp_ns,
            duplicate=True,
        )
    except IncorrectOffsetError as error:
        raise _failed("INCORRECT_OFFSET", str(error)) from None
    except (InvalidBatchError, RecordTooLargeError) as error:
        raise _failed("INVALID_ARGUMENT", str(error), error.index) from None
    except Exception as error:  # noqa: BLE001 -- every other failure becomes its table row
        entry, text = status_for(error)
        raise _Failed(entry, text) from None
    return log, result


def _response(
    request: api_pb2.PublishBatchRequest, **fields: object
) -> api_pb2.PublishBatchResponse:
    return api_pb2.PublishBatchResponse(
        correlationId=request.correlationId,
        stream=request.stream,
        partition=request.partition,
        **fields,  # type: ignore[arg-type]
    )


async def _commit(
    broker: BrokerContext,
    log: FileCommitLog,
    result: AppendResult,
    request: api_pb2.PublishBatchRequest,
    received_ns: int,
) -> api_pb2.PublishBatchResponse:
    """Wait for durability, move the HW, and build the ack."""
    try:
        await log.wait_durable()
    except Exception as error:  # noqa: BLE001 -- answered with its table row
        entry, text = status_for(error)
        return _response(request, error=_Failed(entry, text).error)
    with contextlib.suppress(ValueError):  # a truncation raced the commit: nothing to move
        log.set_high_watermark(result.last_offset)
    if request.ackPolicy != NONE:
        broker.metrics.publish.acked_batch(request.ackPolicy, received_ns, broker.clock.now_ns())
    return _response(
        request,
        baseOffset=result.base_offset,
        recordCount=result.count,
        timestamp=result.timestamp_ns,
    )


async def _answer(
    broker: BrokerContext, request: api_pb2.PublishBatchRequest
) -> asyncio.Future[api_pb2.PublishBatchResponse]:
    """Write one batch; the future of its response (done at once for a refusal)."""
    received_ns = broker.clock.now_ns()
    try:
        log, outcome = await _write(broker, request)
    except _Failed as failed:
        outcome_now = _response(request, error=failed.error)
    except Exception as error:  # noqa: BLE001 -- e.g. the partition paused or deleted meanwhile
        entry, text = status_for(error)
        outcome_now = _response(request, error=_Failed(entry, text).error)
    else:
        if isinstance(outcome, AppendResult):
            # The commit keeps only what the response echoes, not the batch's bytes.
            echoed = api_pb2.PublishBatchRequest(
                correlationId=request.correlationId,
                stream=request.stream,
                partition=request.partition,
                ackPolicy=request.ackPolicy,
            )
            return asyncio.ensure_future(_commit(broker, log, outcome, echoed, received_ns))
        outcome_now = outcome
    future: asyncio.Future[api_pb2.PublishBatchResponse] = (
        asyncio.get_running_loop().create_future()
    )
    future.set_result(outcome_now)
    return future


# -- the call ----------------------------------------------------------------------------------

#: Whether the response is sent (not for ackPolicy NONE), and its future. The request itself is
#: not kept: a written batch's bytes are released at once, whatever the window holds.
_Answer = tuple[bool, "asyncio.Future[api_pb2.PublishBatchResponse]"]


async def _read_requests(
    broker: BrokerContext,
    requests: AsyncIterator[api_pb2.PublishBatchRequest],
    answers: asyncio.Queue[_Answer | None],
) -> None:
    try:
        async for request in requests:
            answer = await _answer(broker, request)
            await answers.put((request.ackPolicy != NONE, answer))  # waits while full
    finally:
        await answers.put(None)


async def _unless_closing(work: Awaitable[_T], closed: asyncio.Task[Literal[True]]) -> _T:
    """``work``'s result, or UNAVAILABLE if the broker starts shutting down first."""
    task = asyncio.ensure_future(work)
    if not task.done():
        await asyncio.wait((task, closed), return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    raise FluxStatus.from_entry("UNAVAILABLE", UNAVAILABLE_MESSAGE)


async def publish_batch(
    broker: BrokerContext,
    requests: AsyncIterator[api_pb2.PublishBatchRequest],
    closing: asyncio.Event,
) -> AsyncGenerator[api_pb2.PublishBatchResponse, None]:
    """Write each batch of the call and yield its response, in request order.

    Raises:
        FluxStatus: UNAVAILABLE when the broker shuts down.
    """
    answers: asyncio.Queue[_Answer | None] = asyncio.Queue(maxsize=PUBLISH_BATCH_IN_FLIGHT_MAX)
    reader = asyncio.create_task(_read_requests(broker, requests, answers))
    closed = asyncio.ensure_future(closing.wait())
    try:
        while True:
            item = await _unless_closing(answers.get(), closed)
            if item is None:
                break
            answered, answer = item
            # Shielded: the commit (HW move) finishes even if the call ends first.
            response = await _unless_closing(asyncio.shield(answer), closed)
            if answered:
                yield response
        await reader  # raises what reading the call raised
    finally:
        closed.cancel()
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
