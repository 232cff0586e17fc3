"""Cursors: named positions in partitions, kept in the internal compacted stream ``__cursors``.

Liftbridge's cursors (reference ``liftbridge-api.md`` §1.7, ``liftbridge-server.md`` §4.6): a
client stores an offset under a *cursor id* for one partition of one stream (SetCursor) and
reads it back later (FetchCursor), typically to resume consuming where it stopped. Consumer
groups keep their positions as cursors ``__group:<groupId>``.

**Where they live.** Each cursor is a record of the internal stream ``__cursors`` (subject
``<namespace>.cursors``), created at start-up when ``cursors.stream.partitions`` is above 0
(Flux's default is 1, Liftbridge's 0; DESIGN.md §4.5). The record's key is
``<cursorId>,<stream>,<partition>`` (UTF-8) and the ``__cursors`` partition holding it is the
IEEE CRC-32 of the key modulo the partition count, exactly as Liftbridge places them.
``__cursors`` is compacted, so the log keeps the newest record per key; retention is off for it
(compaction bounds its size), so a cursor that is not updated is never expired.

**Values.** A record's value is :data:`VALUE` (17 bytes, big-endian): a format version (1), the
offset (i64) and the creation time of the stream the cursor belongs to (Unix ns, i64). A null
value is a tombstone: the cursor was cleared (SetCursor with offset -1), and compaction drops it
later. The creation time ties a cursor to one incarnation of its stream: when a stream is
deleted and created again under the same name, its old cursors read as never set (-1) instead
of pointing into a log that no longer exists.

**Reads.** The store keeps an in-memory index, key -> (offset, stream creation time), that is a
view of the ``__cursors`` logs: :meth:`CursorStore.load` reads every partition once at start-up,
and afterwards each partition's committed records are applied in offset order, whoever appended
them (SetCursor, or a client publishing straight to the NATS subject, as Liftbridge allows).
For every key the newest record wins, which is what compaction keeps, so the index never
depends on whether the cleaner has run. A record whose key does not hash to the partition it is
in, or whose value is not :data:`VALUE`, removes its key as a tombstone would: compaction will
drop the older records of that key too, so the index agrees with the log before and after.

**Writes.** SetCursor appends one record straight to the partition's log and, the ISR being this
broker alone (DESIGN.md §4.3), moves the high watermark to it, as the ingest path does. Writes
to one ``__cursors`` partition are serialised, so the index applies them in log order. A write
returns once the log's sync policy is met, so a stored cursor survives a restart.

**Bounds.** At most :data:`CURSORS_MAX` cursors (about 200 bytes of memory each) are held; a
SetCursor that would add one more fails. Cursor ids are at most :data:`CURSOR_ID_MAX_BYTES`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Final

from flux_broker.clock import Clock, SystemClock
from flux_broker.log.errors import CorruptRecordError, LogClosedError
from flux_broker.log.format import NewRecord, Record
from flux_broker.metadata import CreateStream, PartitionAssignment, StreamConfig
from flux_broker.nats.subjects import CURSORS_STREAM, InvalidSubjectError, validate_subject
from flux_broker.streams.manager import LivePartition, StreamManager

__all__ = [
    "CURSORS_MAX",
    "CURSORS_PARTITIONS_MAX",
    "CURSORS_SUBJECT_SUFFIX",
    "CURSOR_ID_MAX_BYTES",
    "NO_CURSOR",
    "VALUE",
    "CursorError",
    "CursorLimitError",
    "CursorStats",
    "CursorStore",
    "CursorsDisabledError",
    "NotCursorsLeaderError",
    "cursor_key",
    "cursors_partition",
    "decode_value",
    "encode_value",
    "ensure_cursors_stream",
]

_logger = logging.getLogger(__name__)

#: The offset FetchCursor answers for a cursor that was never set (or was cleared).
NO_CURSOR: Final = -1
#: Longest cursor id, in UTF-8 bytes.
CURSOR_ID_MAX_BYTES: Final = 1024
#: Most cursors the store holds; a SetCursor adding one more fails (RESOURCE_EXHAUSTED).
CURSORS_MAX: Final = 1_000_000
#: Most ``__cursors`` partitions (``cursors.stream.partitions``), as for any stream.
CURSORS_PARTITIONS_MAX: Final = 1024
#: ``__cursors`` listens on ``<namespace>.cursors`` (Liftbridge's subject).
CURSORS_SUBJECT_SUFFIX: Final = "cursors"

#: A cursor record's value: format version, offset, creation time of the cursor's stream (ns).
VALUE: Final = struct.Struct(">bqq")
_VALUE_VERSION: Final = 1
_KEY_SEPARATOR: Final = ","
#: Byte budget of one read while catching up with a ``__cursors`` log.
_READ_BYTES: Final = 1024 * 1024


class CursorError(Exception):
    """A cursor request the store cannot serve."""


class CursorsDisabledError(CursorError):
    """``__cursors`` does not exist: ``cursors.stream.partitions`` is 0."""


class NotCursorsLeaderError(CursorError):
    """This broker does not lead the ``__cursors`` partition that holds the cursor."""


class CursorLimitError(CursorError):
    """The store holds :data:`CURSORS_MAX` cursors; a new one cannot be added."""


def cursor_key(cursor_id: str, stream: str, partition: int) -> bytes:
    """The ``__cursors`` record key of a cursor: ``<cursorId>,<stream>,<partition>``, UTF-8.

    Stream names hold no ``,``, so the key is unambiguous even when the cursor id holds one.
    """
    return f"{cursor_id}{_KEY_SEPARATOR}{stream}{_KEY_SEPARATOR}{partition}".encode()


def cursors_partition(key: bytes, partitions: int) -> int:
    """The ``__cursors`` partition of ``key``: IEEE CRC-32 (``zlib.crc32``) mod ``partitions``."""
    return zlib.crc32(key) % partitions


def encode_value(offset: int, stream_created_ns: int) -> bytes:
    """The record value of a cursor at ``offset`` of a stream created at ``stream_created_ns``."""
    return VALUE.pack(_VALUE_VERSION, offset, stream_created_ns)


def decode_value(value: bytes | None) -> tuple[int, int] | None:
    """``(offset, stream creation time)`` of a record value; ``None`` if it is not one."""
    if value is None or len(value) != VALUE.size:
        return None
    version, offset, created_ns = VALUE.unpack(value)
    if version != _VALUE_VERSION or offset < 0:
        return None
    return offset, created_ns


def _resolve_replication_factor(requested: int, cluster_size: int) -> int:
    # CreateStream's rule (Liftbridge): 0 means 1, -1 means every broker.
    resolved = {0: 1, -1: cluster_size}.get(requested, requested)
    if not 1 <= resolved <= cluster_size:
        raise ValueError(
            f"cursors.stream.replication.factor {requested} is impossible with {cluster_size} "
            f"broker(s): use 1..{cluster_size}, 0 (one replica) or -1 (every broker)"
        )
    return resolved


async def ensure_cursors_stream(
    streams: StreamManager,
    *,
    partitions: int,
    replication_factor: int,
    clock: Clock | None = None,
) -> int:
    """Create ``__cursors`` if it is configured and missing; return its partition count.

    An existing ``__cursors`` is kept as it is: its partition count cannot change once set
    (Liftbridge's rule), because every cursor key hashes to a partition by that count. A
    different configured count, or 0, is logged and ignored.

    Args:
        streams: The recovered stream manager.
        partitions: ``cursors.stream.partitions`` (0 = cursors disabled).
        replication_factor: ``cursors.stream.replication.factor`` (-1 = every broker).
        clock: Source of the stream's creation time.

    Returns:
        The number of ``__cursors`` partitions; 0 when cursors are disabled.

    Raises:
        ValueError: ``partitions`` or ``replication_factor`` is out of range, or the namespace
            makes no valid subject; the message names the key.
    """
    if not 0 <= partitions <= CURSORS_PARTITIONS_MAX:
        raise ValueError(
            f"cursors.stream.partitions {partitions} is out of range: use 0 (cursors "
            f"disabled) to {CURSORS_PARTITIONS_MAX}"
        )
    factor = _resolve_replication_factor(replication_factor, cluster_size=1)
    existing = streams.stream(CURSORS_STREAM)
    if existing is not None:
        count = len(existing.partitions)
        if partitions != count:
            _logger.warning(
                "cursors.stream.partitions is %d, but %s exists with %d partition(s); its "
                "partition count cannot change, so it keeps %d",
                partitions,
                CURSORS_STREAM,
                count,
                count,
            )
        return count
    if partitions == 0:
        _logger.info("cursors are disabled (cursors.stream.partitions is 0)")
        return 0
    subject = f"{streams.namespace}.{CURSORS_SUBJECT_SUFFIX}"
    try:
        validate_subject(subject, partitions=partitions)
    except InvalidSubjectError as error:
        raise ValueError(f"clustering.namespace cannot name {CURSORS_STREAM}: {error}") from None
    command = CreateStream(
        name=CURSORS_STREAM,
        subject=subject,
        replication_factor=factor,
        partitions=tuple(PartitionAssignment.single(streams.broker_id) for _ in range(partitions)),
        creation_timestamp_ns=(clock or SystemClock()).now_ns(),
        config=StreamConfig(
            compact_enabled=True,
            # Compaction bounds the stream; retention would expire cursors nobody updated.
            retention_max_bytes=0,
            retention_max_messages=0,
            retention_max_age_ms=0,
            # The store appends to the logs directly: they must stay open.
            auto_pause_time_ms=0,
        ),
    )
    await streams.create_stream(command)
    return partitions


@dataclass(slots=True, eq=False)
class _PartitionView:
    """How far the index has applied one ``__cursors`` partition's log.

    Attributes:
        lock: Serialises writes to the partition and catching up with its log.
        applied: The last offset applied to the index (-1 before the first).
        generation: The log's truncation count when last applied (a truncation re-reads it).
    """

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    applied: int = -1
    generation: int = 0


@dataclass(slots=True)
class CursorStats:
    """Counters of the cursor store.

    Attributes:
        writes: Records SetCursor appended.
        unchanged: SetCursor calls that stored nothing, the cursor already holding the value.
        records_applied: ``__cursors`` records applied to the index.
        foreign_records: Applied records that SetCursor did not write in the expected shape
            (no key, a key of another partition, a value that is not :data:`VALUE`).
    """

    writes: int = 0
    unchanged: int = 0
    records_applied: int = 0
    foreign_records: int = 0


class CursorStore:
    """Every cursor of this broker, stored in ``__cursors``; call :meth:`load` before use."""

    def __init__(
        self, streams: StreamManager, partitions: int, *, max_cursors: int = CURSORS_MAX
    ) -> None:
        """Describe the store.

        Args:
            streams: The stream manager holding ``__cursors``.
            partitions: The ``__cursors`` partition count (0 = cursors disabled), from
                :func:`ensure_cursors_stream`.
            max_cursors: Most cursors held (:data:`CURSORS_MAX`).
        """
        self._streams = streams
        self.partitions = partitions
        self.max_cursors = max_cursors
        self.stats = CursorStats()
        self._index: dict[bytes, tuple[int, int]] = {}
        self._views = [_PartitionView() for _ in range(partitions)]

    @property
    def enabled(self) -> bool:
        """Whether cursors are served (``__cursors`` exists)."""
        return self.partitions > 0

    def __len__(self) -> int:
        """Cursors held."""
        return len(self._index)

    async def load(self) -> int:
        """Read every ``__cursors`` partition once, building the index; return the cursor count.

        A corrupt record stops the reading of its partition only: the broker starts, and every
        cursor call that maps to that partition fails with the corruption (retried on each
        call) instead of answering from an index that stopped short.

        Raises:
            LogClosedError: A ``__cursors`` log is closed (the broker is stopping).
        """
        started = time.monotonic()
        for partition_id in range(self.partitions):
            live = self._live(partition_id)
            async with self._views[partition_id].lock:
                try:
                    await self._catch_up(partition_id, live)
                except CorruptRecordError:
                    _logger.exception(
                        "%s partition %d: cannot read past a corrupt record; cursor calls for "
                        "it fail until the log is repaired",
                        CURSORS_STREAM,
                        partition_id,
                    )
        if self.enabled:
            _logger.info(
                "loaded %d cursor(s) from %d %s partition(s) in %.3fs",
                len(self._index),
                self.partitions,
                CURSORS_STREAM,
                time.monotonic() - started,
            )
        return len(self._index)

    async def set(
        self, cursor_id: str, stream: str, partition: int, offset: int, *, stream_created_ns: int
    ) -> None:
        """Store ``offset`` as the cursor; ``-1`` clears it. The caller validated the request.

        Args:
            cursor_id: The cursor id (non-empty).
            stream: The stream the cursor is for (it exists).
            partition: The partition the cursor is for (it exists).
            offset: The position, at least -1 (-1 clears the cursor).
            stream_created_ns: The stream's creation time, tying the cursor to this incarnation.

        Raises:
            CursorsDisabledError: Cursors are disabled.
            NotCursorsLeaderError: This broker does not lead the cursor's partition.
            CursorLimitError: The cursor is new and the store is full.
            LogClosedError: The broker is stopping.
            CorruptRecordError: The partition's log cannot be read to its end.
            flux_broker.log.LogWriteError: The disk refused the write; nothing was stored.
        """
        assert offset >= NO_CURSOR, offset
        key = cursor_key(cursor_id, stream, partition)
        partition_id = self._partition_of(key)
        live = self._leader(partition_id)
        async with self._views[partition_id].lock:
            await self._catch_up(partition_id, live)
            held = self._index.get(key)
            wanted = None if offset == NO_CURSOR else (offset, stream_created_ns)
            if held == wanted:
                self.stats.unchanged += 1
                return
            if held is None and len(self._index) >= self.max_cursors:
                raise CursorLimitError(
                    f"this broker holds {len(self._index)} cursors, its limit; clear unused "
                    "cursors (SetCursor with offset -1) to make room"
                )
            value = None if wanted is None else encode_value(*wanted)
            log = live.log
            view = self._views[partition_id]
            result = await log.append([NewRecord(value=value, key=key)])
            self.stats.writes += 1
            # A cluster of one: what the leader wrote is on the whole ISR, so committed.
            log.set_high_watermark(result.last_offset)
            if view.applied == result.base_offset - 1 and view.generation == log.generation:
                # Nothing else was appended in between: apply the record without reading it.
                self._put(key, wanted)
                self.stats.records_applied += 1
                view.applied = result.last_offset
            else:
                await self._catch_up(partition_id, live)

    async def fetch(
        self, cursor_id: str, stream: str, partition: int, *, stream_created_ns: int
    ) -> int:
        """The cursor's offset; :data:`NO_CURSOR` if it was never set for this stream.

        Args:
            cursor_id: The cursor id (non-empty).
            stream: The stream the cursor is for.
            partition: The partition the cursor is for.
            stream_created_ns: The stream's creation time; a cursor of an earlier stream of the
                same name does not count.

        Raises:
            CursorsDisabledError: Cursors are disabled.
            NotCursorsLeaderError: This broker does not lead the cursor's partition.
            LogClosedError: The broker is stopping.
            CorruptRecordError: The partition's log cannot be read to its end.
        """
        key = cursor_key(cursor_id, stream, partition)
        partition_id = self._partition_of(key)
        live = self._leader(partition_id)
        view = self._views[partition_id]
        if live.log.high_watermark > view.applied or live.log.generation != view.generation:
            async with view.lock:
                await self._catch_up(partition_id, live)
        held = self._index.get(key)
        if held is None or held[1] != stream_created_ns:
            return NO_CURSOR
        return held[0]

    # -- internals -----------------------------------------------------------------------

    def _partition_of(self, key: bytes) -> int:
        if not self.enabled:
            raise CursorsDisabledError(
                f"cursors are disabled on this broker ({CURSORS_STREAM} does not exist): set "
                "cursors.stream.partitions above 0 and restart it"
            )
        return cursors_partition(key, self.partitions)

    def _live(self, partition_id: int) -> LivePartition:
        live = self._streams.partition(CURSORS_STREAM, partition_id)
        if live is None:
            # The manager forgets every stream when it closes; nothing else removes __cursors.
            raise LogClosedError(f"{CURSORS_STREAM} partition {partition_id} is closed")
        return live

    def _leader(self, partition_id: int) -> LivePartition:
        live = self._live(partition_id)
        if live.metadata.leader != self._streams.broker_id:
            raise NotCursorsLeaderError(
                f"this broker does not lead {CURSORS_STREAM} partition {partition_id}"
            )
        return live

    async def _catch_up(self, partition_id: int, live: LivePartition) -> None:
        """Apply the partition's committed records the index has not seen (lock held)."""
        view = self._views[partition_id]
        log = live.log
        if log.generation != view.generation:
            # Truncated (a follower's repair): records past the cut may have changed, so the
            # partition is read again from its start.
            self._forget(partition_id)
            view.applied = -1
            view.generation = log.generation
        if log.high_watermark <= view.applied:
            return
        # Never closed: closing would wake the partition's subscribers, and a reader that is
        # only polled holds no file or task of its own.
        reader = log.reader(view.applied + 1, committed=True)
        while (batch := reader.read_nowait(_READ_BYTES)) is not None:
            for record in batch.records():
                self._apply(partition_id, record)
            view.applied = batch.last_offset
            await asyncio.sleep(0)  # a long log (start-up) must not hold the loop

    def _apply(self, partition_id: int, record: Record) -> None:
        self.stats.records_applied += 1
        key = record.key
        if key is None or cursors_partition(key, self.partitions) != partition_id:
            # Never found by a lookup, and compaction keeps no older record of it here.
            self.stats.foreign_records += 1
            return
        decoded = decode_value(record.value)
        if decoded is None and record.value is not None:
            # The newest record of the key is not a cursor: after compaction nothing older
            # remains either, so it counts as a tombstone.
            self.stats.foreign_records += 1
        self._put(key, decoded)

    def _put(self, key: bytes, cursor: tuple[int, int] | None) -> None:
        if cursor is None:
            self._index.pop(key, None)
        else:
            self._index[key] = cursor

    def _forget(self, partition_id: int) -> None:
        doomed = [
            key for key in self._index if cursors_partition(key, self.partitions) == partition_id
        ]
        for key in doomed:
            del self._index[key]
