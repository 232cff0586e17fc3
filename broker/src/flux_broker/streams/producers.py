"""Idempotent producers: which batches of each producer a partition already holds.

A producer gets an id (InitProducer) and numbers its batches to each partition 0, 1, 2, ...
(``producerSequence``). Before a batch is written the partition's :class:`ProducerTable`
decides, atomically with the write (it is an :class:`~flux_broker.log.contract.AppendGuard`
built per batch by :meth:`ProducerTable.guard`):

=====================================  ==========================================================
sequence                               outcome
=====================================  ==========================================================
producer unknown to the partition      written (any first number: the producer may have written
                                       to it before its state aged out)
last + 1                               written
one of the last :data:`ACKS_REMEMBERED`  not written; the original ack again, ``duplicate`` set
older                                  not written; :class:`DuplicateSequenceError`
beyond last + 1                        not written; :class:`OutOfOrderSequenceError`
=====================================  ==========================================================

**In the log.** The first record of an idempotent batch carries the header
:data:`PRODUCER_HEADER` = producer id (u64), sequence (i64) and the batch's record count (u32),
big-endian, added by the broker (:func:`with_producer_header`) before the batch is checked and
written, so it is covered by the record's CRC and stored with the batch in one write. Nothing
else is kept: after a crash, a restart or a resume, :meth:`ProducerTable.rebuild` reads the
newest :data:`REBUILD_SCAN_MAX_BYTES` of the log backwards and recovers the last sequence and
the remembered acks of every producer found there. A producer idle for longer than that window
is unknown again, and its next batch is accepted whatever its number (a retry of a batch older
than the window would then be written twice: the window is ~500,000 128 B records).

Memory is bounded: at most :data:`PRODUCERS_MAX` producers per partition, the least recently
active forgotten first.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from dataclasses import dataclass, field
from typing import Final

from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.contract import AppendResult
from flux_broker.log.format import (
    BODY_SIZE_AT,
    HEADER_BYTES,
    UNPLACED,
    NewRecord,
    decode,
    frame,
    verify_record,
)

__all__ = [
    "ACKS_REMEMBERED",
    "PRODUCERS_MAX",
    "PRODUCER_HEADER",
    "REBUILD_SCAN_MAX_BYTES",
    "BatchAck",
    "DuplicateBatch",
    "DuplicateSequenceError",
    "OutOfOrderSequenceError",
    "ProducerGuard",
    "ProducerTable",
    "count_records",
    "cut_partial_batch",
    "parse_producer_header",
    "reserved_header_index",
    "with_producer_header",
]

_log = logging.getLogger(__name__)

#: The header the broker adds to the first record of an idempotent batch.
PRODUCER_HEADER: Final = "flux.producer"
_PRODUCER_HEADER_BYTES: Final = PRODUCER_HEADER.encode()
_HEADER_VALUE: Final = struct.Struct(">QqI")  # producer id, sequence, record count
#: Acks repeated to retries, per producer and partition (Kafka keeps 5 batches in flight).
ACKS_REMEMBERED: Final = 5
#: Producers remembered per partition; the least recently active is forgotten first.
PRODUCERS_MAX: Final = 10_000
#: How much of the log's tail a rebuild reads, newest first.
REBUILD_SCAN_MAX_BYTES: Final = 64 * 1024 * 1024
_BODY_SIZE: Final = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class BatchAck:
    """Where a producer's batch was written.

    Attributes:
        sequence: The batch's number.
        base_offset: Offset of its first record.
        count: Its number of records.
        timestamp_ns: The broker timestamp of its records.
    """

    sequence: int
    base_offset: int
    count: int
    timestamp_ns: int


class OutOfOrderSequenceError(Exception):
    """A batch number skips ahead: a batch in between is missing."""

    def __init__(self, producer_id: int, sequence: int, expected: int) -> None:
        """Name the producer, the number received and the one expected."""
        super().__init__(
            f"producer {producer_id} sent batch {sequence} but the partition expects batch "
            f"{expected} next; nothing was written"
        )


class DuplicateSequenceError(Exception):
    """A batch was written before but its ack is no longer remembered."""

    def __init__(self, producer_id: int, sequence: int, last: int) -> None:
        """Name the producer, the number received and the last one written."""
        super().__init__(
            f"producer {producer_id} batch {sequence} was written before (the last written is "
            f"{last}), but its ack is no longer remembered; it was not written again"
        )


@dataclass(slots=True)
class _Producer:
    last_sequence: int
    acks: collections.deque[BatchAck] = field(
        default_factory=lambda: collections.deque(maxlen=ACKS_REMEMBERED)
    )


class ProducerTable:
    """The idempotent producers of one partition (see the module docstring)."""

    def __init__(self) -> None:
        """Start empty; :meth:`rebuild` fills it from the log."""
        self._producers: collections.OrderedDict[int, _Producer] = collections.OrderedDict()
        self._rebuild_lock = asyncio.Lock()
        self.rebuilt = False

    def __len__(self) -> int:
        """Number of producers remembered."""
        return len(self._producers)

    def duplicate_of(self, producer_id: int, sequence: int) -> BatchAck | None:
        """The original ack if batch ``sequence`` was written, ``None`` if it may be written.

        Raises:
            OutOfOrderSequenceError: ``sequence`` is beyond the next expected number.
            DuplicateSequenceError: It was written but its ack is forgotten.
        """
        producer = self._producers.get(producer_id)
        if producer is None or sequence == producer.last_sequence + 1:
            return None
        if sequence > producer.last_sequence:
            raise OutOfOrderSequenceError(producer_id, sequence, producer.last_sequence + 1)
        for ack in producer.acks:
            if ack.sequence == sequence:
                return ack
        raise DuplicateSequenceError(producer_id, sequence, producer.last_sequence)

    def record(self, producer_id: int, ack: BatchAck) -> None:
        """Remember that ``ack``'s batch was written (newest last)."""
        producer = self._producers.get(producer_id)
        if producer is None:
            producer = self._producers[producer_id] = _Producer(ack.sequence)
            if len(self._producers) > PRODUCERS_MAX:
                self._producers.popitem(last=False)
        else:
            self._producers.move_to_end(producer_id)
        producer.last_sequence = ack.sequence
        producer.acks.append(ack)

    def guard(self, producer_id: int, sequence: int, count: int) -> ProducerGuard:
        """The append guard that records the batch once it is written."""
        return ProducerGuard(self, producer_id, sequence, count)

    async def ensure_rebuilt(self, log: FileCommitLog) -> None:
        """:meth:`rebuild` once; callers arriving meanwhile wait for it."""
        if self.rebuilt:
            return
        async with self._rebuild_lock:
            if not self.rebuilt:
                await self.rebuild(log)

    async def rebuild(self, log: FileCommitLog) -> None:
        """Recover the producers from the newest :data:`REBUILD_SCAN_MAX_BYTES` of ``log``.

        Call before the table's first use, while no idempotent batch can be written.
        """
        found: dict[int, list[BatchAck]] = {}
        scanned = 0
        if log.newest_offset >= log.oldest_offset:
            reader = log.reverse_reader(log.newest_offset, committed=False)
            try:
                while scanned < REBUILD_SCAN_MAX_BYTES:
                    batch = await reader.read(min(REBUILD_SCAN_MAX_BYTES - scanned, 1 << 20))
                    if batch is None or batch.count == 0:
                        break
                    scanned += len(batch.data)
                    if _PRODUCER_HEADER_BYTES in batch.data:
                        for record in batch.records():  # newest first
                            _collect(found, record.headers, record.offset, record.timestamp_ns)
            finally:
                reader.close()
        for producer_id, acks in found.items():  # each list is newest first
            for ack in reversed(acks):
                self.record(producer_id, ack)
        self.rebuilt = True


async def cut_partial_batch(log: FileCommitLog) -> int | None:
    """Cut the newest idempotent batch if a crash left it incomplete.

    A kill can interrupt the write of a batch between pages: the first records reach the file
    whole, the rest is torn. Recovery cuts the torn record, but the whole ones before it stay,
    and their ``flux.producer`` header claims the batch was written — a retry would then be
    answered as a duplicate and the missing records lost. Only the last write can be torn, so
    only the newest batch is checked: the records back from the newest one that share its
    timestamp (one batch, one timestamp), up to the nearest producer header. If fewer records
    follow that header than it counts, the log is truncated there (those records were never
    acknowledged: the ack follows the complete write). Call before the log takes writes.

    Returns:
        The offset the log was cut at, or ``None`` when the newest batch is complete (or not
        idempotent: a torn plain batch has no count to check against).
    """
    found = await _incomplete_newest_batch(log)
    if found is None:
        return None
    offset, present, count = found
    _log.warning(
        "%s: cutting an incomplete idempotent batch at offset %d "
        "(%d of its %d records were written before a crash)",
        log.directory,
        offset,
        present,
        count,
    )
    await log.truncate(offset)
    return offset


async def _incomplete_newest_batch(log: FileCommitLog) -> tuple[int, int, int] | None:
    """(header offset, records present, records counted) of an incomplete newest batch."""
    newest = log.newest_offset
    if newest < log.oldest_offset:
        return None
    reader = log.reverse_reader(newest, committed=False)
    tail_timestamp: int | None = None
    scanned = 0
    try:
        while scanned <= log.config.batch_max_bytes:  # a batch is never longer
            batch = await reader.read(1 << 20)
            if batch is None or batch.count == 0:
                return None
            scanned += len(batch.data)
            for record in batch.records():  # newest first
                if tail_timestamp is None:
                    tail_timestamp = record.timestamp_ns
                elif record.timestamp_ns != tail_timestamp:
                    return None  # past the newest batch: it has no producer header
                header = _producer_header_of(record.headers)
                if header is not None:
                    present, count = newest - record.offset + 1, header[2]
                    return (record.offset, present, count) if present < count else None
    finally:
        reader.close()
    return None


def _producer_header_of(headers: tuple[tuple[str, bytes], ...]) -> tuple[int, int, int] | None:
    for name, value in headers:
        if name == PRODUCER_HEADER:
            return parse_producer_header(value)
    return None


def _collect(
    found: dict[int, list[BatchAck]],
    headers: tuple[tuple[str, bytes], ...],
    offset: int,
    timestamp_ns: int,
) -> None:
    for name, value in headers:
        if name == PRODUCER_HEADER:
            parsed = parse_producer_header(value)
            if parsed is None:
                return
            producer_id, sequence, count = parsed
            acks = found.setdefault(producer_id, [])
            if len(acks) < ACKS_REMEMBERED and (not acks or acks[-1].sequence > sequence):
                acks.append(BatchAck(sequence, offset, count, timestamp_ns))
            return


class ProducerGuard:
    """Refuses duplicates and gaps and records the batch, atomically with its write."""

    __slots__ = ("_count", "_producer_id", "_sequence", "_table")

    def __init__(self, table: ProducerTable, producer_id: int, sequence: int, count: int) -> None:
        """Guard batch ``sequence`` (``count`` records) of ``producer_id``."""
        self._table = table
        self._producer_id = producer_id
        self._sequence = sequence
        self._count = count

    def check(self, base_offset: int) -> None:
        """Raise :class:`DuplicateBatch`, or the sequence errors, unless the batch is next."""
        original = self._table.duplicate_of(self._producer_id, self._sequence)
        if original is not None:
            raise DuplicateBatch(original)

    def written(self, result: AppendResult) -> None:
        """Remember the batch."""
        self._table.record(
            self._producer_id,
            BatchAck(self._sequence, result.base_offset, result.count, result.timestamp_ns),
        )


class DuplicateBatch(Exception):  # noqa: N818 -- an outcome, not a failure
    """The batch was written before; ``ack`` says where."""

    def __init__(self, ack: BatchAck) -> None:
        """Carry the original ack."""
        super().__init__(f"batch {ack.sequence} was written before at offset {ack.base_offset}")
        self.ack = ack


# -- the header in the log -------------------------------------------------------------------


def parse_producer_header(value: bytes) -> tuple[int, int, int] | None:
    """(producer id, sequence, record count) from a header value; ``None`` if malformed."""
    if len(value) != _HEADER_VALUE.size:
        return None
    producer_id, sequence, count = _HEADER_VALUE.unpack(value)
    return producer_id, sequence, count


def count_records(data: bytes | bytearray) -> int:
    """Records in framed ``data``, by walking the size fields (a record cut short counts)."""
    count = 0
    position = 0
    total = len(data)
    unpack = _BODY_SIZE.unpack_from
    while position + HEADER_BYTES <= total:
        position += HEADER_BYTES + unpack(data, position + BODY_SIZE_AT)[0]
        count += 1
    return count + (position < total)


def reserved_header_index(data: bytes) -> int | None:
    """Index of the first record of a client batch that carries :data:`PRODUCER_HEADER`.

    Only the broker writes that header (a forged one would mislead the rebuild), so a batch
    with one is refused. A search of the bytes rules almost every batch out at C speed; only a
    batch that contains the name anywhere is walked record by record. A record that does not
    pass its checks ends the walk (``None``): the log refuses the batch with its index anyway.
    """
    if _PRODUCER_HEADER_BYTES not in data:
        return None
    view = memoryview(data)
    position = 0
    index = 0
    while position < len(data):
        if verify_record(view, position) is not None:
            return None
        record, position = decode(view, position)
        if any(name == PRODUCER_HEADER for name, _ in record.headers):
            return index
        index += 1
    return None


def with_producer_header(data: bytes, producer_id: int, sequence: int, count: int) -> bytes:
    """``data`` with :data:`PRODUCER_HEADER` added to its first record (re-framed; its CRC too).

    A first record that does not pass its checks is left as it is: the log's check of the
    whole batch then refuses it with its index (0). The caller has refused batches that carry
    the header already (:func:`reserved_header_index`).
    """
    if len(data) < HEADER_BYTES or verify_record(memoryview(data), 0) is not None:
        return data
    first, end = decode(data, 0)
    value = _HEADER_VALUE.pack(producer_id, sequence, count)
    record = NewRecord(
        value=first.value, key=first.key, headers=(*first.headers, (PRODUCER_HEADER, value))
    )
    framed, _ = frame([record], UNPLACED, 2**31 - 1, 2**31 - 1)
    return bytes(framed) + data[end:]
